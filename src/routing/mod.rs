//! Route matching: which route takes a request, decided by host, path and method.
//!
//! Precedence, most specific first (see `docs/routing.md`):
//!
//! 1. **Host**: routes naming the exact host, then routes whose `*.suffix` wildcard matches
//!    (longest suffix first), then routes with no `hosts`.
//! 2. **Path**, within one host tier: `path` (exact), then `path_regex` (in file order), then
//!    `path_prefix` (longest first), then routes with no path condition.
//! 3. **Method**: a route listing methods comes before one that takes any method.
//! 4. File order breaks any remaining tie.
//!
//! The tables are built once per configuration: per host tier, exact paths and prefixes are hash
//! maps, so a lookup costs a few probes whatever the number of routes, and allocates nothing.

mod normalize;
mod rewrite;
mod tier;

use std::collections::HashMap;

use http::Method;

use crate::config::{HostPattern, PathMatch, RouteConfig};
pub use normalize::{PathError, normalize_path};
pub use rewrite::{forwarded_path, has_dot_segment};
use tier::{FastMap, Tier};

/// The outcome of matching one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteMatch {
    /// Route index into the configuration's `routes`.
    Found(usize),
    /// Some route matched host and path but none allows this method.
    MethodNotAllowed(usize),
    /// No route matches host and path.
    NotFound,
}

/// Compiled routing tables.
#[derive(Debug, Default)]
pub struct Router {
    routes: Vec<RouteConfig>,
    exact: FastMap<Tier>,
    /// By suffix (`".example.com"`); a host's candidate suffixes are probed longest first.
    wildcard: FastMap<Tier>,
    any_host: Tier,
}

impl Router {
    /// Build the tables for `routes` (in file order).
    pub fn new(routes: Vec<RouteConfig>) -> Router {
        let mut exact: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut wildcard: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut any_host = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            if r.hosts.is_empty() {
                any_host.push(i);
            }
            for h in &r.hosts {
                let (table, key) = match h {
                    HostPattern::Exact(name) => (&mut exact, name),
                    HostPattern::Suffix(suffix) => (&mut wildcard, suffix),
                };
                let list = table.entry(key.as_str()).or_default();
                if !list.contains(&i) {
                    list.push(i);
                }
            }
        }
        let tier = |mut list: Vec<usize>| {
            list.sort_by_key(|&i| specificity(&routes[i], i));
            Tier::new(&routes, &list)
        };
        let tiers = |m: HashMap<&str, Vec<usize>>| -> FastMap<Tier> {
            m.into_iter().map(|(k, v)| (k.into(), tier(v))).collect()
        };
        let (exact, wildcard, any_host) = (tiers(exact), tiers(wildcard), tier(any_host));
        Router {
            routes,
            exact,
            wildcard,
            any_host,
        }
    }

    /// The route at `index`.
    pub fn route(&self, index: usize) -> &RouteConfig {
        &self.routes[index]
    }

    /// All routes, in file order.
    pub fn routes(&self) -> &[RouteConfig] {
        &self.routes
    }

    /// Match a request. `host` must already be normalised with [`normalize_host`]; `path` is the
    /// path without the query.
    pub fn find(&self, host: &str, path: &str, method: &Method) -> RouteMatch {
        let mut method_miss = None;
        let mut found = |tier: &Tier| tier.find(&self.routes, path, method, &mut method_miss);
        if let Some(i) = self.exact.get(host).and_then(&mut found) {
            return RouteMatch::Found(i);
        }
        if !self.wildcard.is_empty() {
            // Suffixes at each dot after the first byte, longest first: `a.b.example.com`
            // tries `.b.example.com`, `.example.com`, `.com`.
            for (k, _) in host.match_indices('.').filter(|&(k, _)| k > 0) {
                if let Some(i) = self.wildcard.get(&host[k..]).and_then(&mut found) {
                    return RouteMatch::Found(i);
                }
            }
        }
        if let Some(i) = found(&self.any_host) {
            return RouteMatch::Found(i);
        }
        method_miss.map_or(RouteMatch::NotFound, RouteMatch::MethodNotAllowed)
    }
}

/// Sort key: smaller is more specific.
fn specificity(r: &RouteConfig, index: usize) -> (u8, usize, bool, usize) {
    let (rank, len) = match &r.path {
        PathMatch::Exact(p) => (0, p.len()),
        PathMatch::Regex(_) => (1, 0),
        PathMatch::Prefix(p) => (2, usize::MAX - p.len()),
        PathMatch::Any => (3, 0),
    };
    (rank, len, r.methods.is_empty(), index)
}

/// Does `path` satisfy the condition? Prefixes match on segment boundaries: `/api` matches
/// `/api` and `/api/x`, not `/apix`; a prefix ending in `/` matches anything below it.
pub fn path_matches(cond: &PathMatch, path: &str) -> bool {
    match cond {
        PathMatch::Any => true,
        PathMatch::Exact(p) => path == p,
        PathMatch::Regex(re) => re.is_match(path),
        PathMatch::Prefix(p) => {
            path.starts_with(p.as_str())
                && (p.ends_with('/') || path.len() == p.len() || path.as_bytes()[p.len()] == b'/')
        }
    }
}

/// Lower-case a Host value and drop its port and a trailing dot: `API.Example.com.:8080` →
/// `api.example.com`; `[::1]:80` → `[::1]`. Borrowed when nothing changes.
pub fn normalize_host(raw: &str) -> std::borrow::Cow<'_, str> {
    let without_port = if raw.starts_with('[') {
        raw.find(']').map_or(raw, |end| &raw[..=end])
    } else {
        raw.rsplit_once(':').map_or(raw, |(h, _)| h)
    };
    let trimmed = without_port.strip_suffix('.').unwrap_or(without_port);
    if trimmed.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(trimmed.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(trimmed)
    }
}

#[cfg(test)]
mod tests;

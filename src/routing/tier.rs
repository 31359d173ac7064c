//! One host tier's routes, indexed by path condition so that a lookup costs a few hash probes
//! instead of a scan of every route.
//!
//! A tier keeps the precedence of `docs/routing.md` exactly: exact paths (one probe), regexes in
//! order (these are scanned), prefixes longest first (one probe per candidate prefix of the
//! request path whose length some prefix has), then routes without a path condition. Each list
//! is in specificity order (method-specific first, then file order).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use http::Method;

use crate::config::{PathMatch, RouteConfig};

/// Hash maps keyed by configuration strings (hosts, paths). Lookups take request bytes, but
/// only configuration keys are ever stored, so a fast non-keyed hash cannot be flooded.
pub(super) type FastMap<V> = HashMap<Box<str>, V, BuildHasherDefault<FxHasher>>;

/// The rustc/Firefox "Fx" hash: a rotate, xor and multiply per 8 bytes.
#[derive(Default, Clone, Copy)]
pub(super) struct FxHasher(u64);

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(last));
        }
    }

    fn write_u8(&mut self, b: u8) {
        self.add(u64::from(b));
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// The routes of one host tier.
#[derive(Debug, Default)]
pub(super) struct Tier {
    exact: FastMap<Box<[usize]>>,
    regex: Box<[usize]>,
    prefix: FastMap<Box<[usize]>>,
    /// The distinct lengths of the prefixes, longest first.
    prefix_lens: Box<[usize]>,
    any: Box<[usize]>,
}

impl Tier {
    /// Index `list` (route indices in specificity order).
    pub(super) fn new(routes: &[RouteConfig], list: &[usize]) -> Tier {
        let mut exact: FastMap<Vec<usize>> = FastMap::default();
        let mut prefix: FastMap<Vec<usize>> = FastMap::default();
        let (mut regex, mut any) = (Vec::new(), Vec::new());
        for &i in list {
            match &routes[i].path {
                PathMatch::Exact(p) => exact.entry(p.as_str().into()).or_default().push(i),
                PathMatch::Regex(_) => regex.push(i),
                PathMatch::Prefix(p) => prefix.entry(p.as_str().into()).or_default().push(i),
                PathMatch::Any => any.push(i),
            }
        }
        let mut prefix_lens: Vec<usize> = prefix.keys().map(|p| p.len()).collect();
        prefix_lens.sort_unstable_by(|a, b| b.cmp(a));
        prefix_lens.dedup();
        let boxed = |m: FastMap<Vec<usize>>| m.into_iter().map(|(k, v)| (k, v.into())).collect();
        Tier {
            exact: boxed(exact),
            regex: regex.into(),
            prefix: boxed(prefix),
            prefix_lens: prefix_lens.into(),
            any: any.into(),
        }
    }

    /// The first route of this tier matching `path` and `method`. The first that matches the
    /// path but refuses the method is kept in `method_miss` (if it is still empty).
    pub(super) fn find(
        &self,
        routes: &[RouteConfig],
        path: &str,
        method: &Method,
        method_miss: &mut Option<usize>,
    ) -> Option<usize> {
        let mut take = |list: &[usize]| {
            for &i in list {
                let m = &routes[i].methods;
                if m.is_empty() || m.contains(method) {
                    return Some(i);
                }
                method_miss.get_or_insert(i);
            }
            None
        };
        if let Some(i) = self.exact.get(path).and_then(|l| take(l)) {
            return Some(i);
        }
        for &i in self.regex.iter() {
            if let PathMatch::Regex(re) = &routes[i].path
                && re.is_match(path)
                && let Some(i) = take(&[i])
            {
                return Some(i);
            }
        }
        let b = path.as_bytes();
        for &len in self.prefix_lens.iter() {
            // `path[..len]` is a prefix on a segment boundary: it is the whole path, or the
            // byte after it is `/`, or it ends with `/` itself.
            let boundary = len == b.len()
                || (len < b.len() && (b[len] == b'/' || (len > 0 && b[len - 1] == b'/')));
            if !boundary {
                continue;
            }
            if let Some(i) = self.prefix.get(&path[..len]).and_then(|l| take(l)) {
                return Some(i);
            }
        }
        take(&self.any)
    }
}

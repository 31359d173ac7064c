//! The path sent upstream: `strip_prefix`, then the regex `rewrite`, query kept.

use std::borrow::Cow;

use super::normalize::is_dot_segment;
use crate::config::{PathMatch, RouteConfig};

/// The path-and-query to forward for `route`, or `None` when it is unchanged.
///
/// `path` is the request path without the query; `query` is what follows `?`, if anything.
/// A stripped path that would be empty becomes `/`; a rewrite result is forced to start with `/`.
pub fn forwarded_path(route: &RouteConfig, path: &str, query: Option<&str>) -> Option<String> {
    let mut out: Cow<'_, str> = Cow::Borrowed(path);
    if route.strip_prefix
        && let PathMatch::Prefix(prefix) = &route.path
    {
        let rest = path
            .strip_prefix(prefix.trim_end_matches('/'))
            .unwrap_or(path);
        out = if rest.starts_with('/') {
            Cow::Borrowed(rest)
        } else {
            Cow::Owned(format!("/{rest}"))
        };
    }
    if let Some((re, replace)) = &route.rewrite
        && let Cow::Owned(s) = re.replace(&out, replace.as_str())
    {
        out = Cow::Owned(if s.starts_with('/') {
            s
        } else {
            format!("/{s}")
        });
    }
    if out == path {
        return None;
    }
    let mut p = out.into_owned();
    if let Some(q) = query {
        p.push('?');
        p.push_str(q);
    }
    Some(p)
}

/// Does the path of `forwarded` (a [`forwarded_path`] result) hold a segment a backend reads
/// as `.` or `..` (`is_dot_segment`: `%2e`, and `..;`, count)?
///
/// The client's path is normalised before routing, so only a `rewrite` can put one back
/// (`^/static-(.*)$` → `/static/$1` on `/static-%2e%2e/admin`, or on `/static-..;/admin`): the
/// backend would resolve it out of the route's reach. Such a request is refused.
pub fn has_dot_segment(forwarded: &str) -> bool {
    let path = forwarded.split('?').next().unwrap_or(forwarded);
    path.split('/').any(is_dot_segment)
}

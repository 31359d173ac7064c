//! The path sent upstream: `strip_prefix`, then the regex `rewrite`, query kept.

use std::borrow::Cow;

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

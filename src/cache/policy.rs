//! What a caching route stores, and for how long (RFC 9111, shared cache).
//!
//! In order, a response is not stored when:
//! 0. the request carried an input the key leaves out ([`unkeyed_input`]): a body, or a field
//!    some frameworks read as another URL or method;
//! 1. its status is not in the route's `statuses` (default 200, 301, 302);
//! 2. it sets a cookie (`Set-Cookie`) and the route does not allow that;
//! 3. it has `Vary: *`;
//! 4. the request carried `Authorization` and the response lacks `public`, `s-maxage` and
//!    `must-revalidate` (RFC 9111 §3.5);
//! 5. it says `no-store` or `private`.
//!
//! Freshness: `s-maxage`, else `max-age` (minus the response's `Age`), else `Expires`, else the
//! route's `ttl` for a status that allows a heuristic freshness (RFC 9110 §15.1: 200, 301,
//! 404, …; a 302 without one is not stored); `no-cache` stores it as already stale, so every
//! use is revalidated. Serving stale: the origin's `stale-while-revalidate` /
//! `stale-if-error`, else the route's defaults (not for `no-cache`); `must-revalidate`,
//! `proxy-revalidate` and `s-maxage` forbid both. Header fields named by `private="…"` /
//! `no-cache="…"` are removed from the stored copy.

use std::time::{Duration, SystemTime};

use pingora::cache::cache_control::{CacheControl, Cacheable, InterpretCacheControl};
use pingora::cache::filters::{calculate_expires_header_time, calculate_serve_stale_durations};
use pingora::cache::{CacheMeta, CacheMetaDefaults, NoCacheReason, RespCacheable};
use pingora::http::{RequestHeader, ResponseHeader};

use super::key;
use crate::config::RouteCache;

/// Statuses a cache may give a freshness of its own (the route's `ttl`) when the origin gives
/// none (RFC 9110 §15.1); others (302, 303, 307, most errors) are stored only with an explicit
/// one.
fn heuristically_cacheable(status: u16) -> bool {
    matches!(
        status,
        200 | 203 | 204 | 206 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Request fields some frameworks read as the method instead of the request line's.
const METHOD_OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];
/// … and as the URL.
const URL_OVERRIDES: [&str; 2] = ["x-original-url", "x-rewrite-url"];

/// What in `req` an answer may depend on that the cache key does not hold: a body (a `GET` may
/// carry one, and an application may answer by it: a search query), or a field some
/// frameworks read as the method or URL. A response to such a request is not stored, or it
/// would be served for the plain URL.
///
/// `body`: the request has one, however framed (an HTTP/2 body need not announce its length).
pub fn unkeyed_input(req: &RequestHeader, body: bool) -> Option<&'static str> {
    if body {
        return Some("request-body");
    }
    METHOD_OVERRIDES
        .into_iter()
        .chain(URL_OVERRIDES)
        .find(|name| req.headers.contains_key(*name))
}

/// Whether a `GET`/`HEAD` skips the lookup too: a body, or a method override, may make it a
/// different request to the application, which a stored answer must not stand in for. (A URL
/// override still looks up: its answer is the plain URL's at worst.)
pub fn lookup_bypassed(req: &RequestHeader, body: bool) -> bool {
    body || METHOD_OVERRIDES
        .iter()
        .any(|n| req.headers.contains_key(*n))
}

/// Whether and how `resp` (to `req`, which has a body if `body`) is stored under `route`'s
/// policy, as of `now`.
pub fn decide(
    route: &RouteCache,
    req: &RequestHeader,
    body: bool,
    resp: &ResponseHeader,
    now: SystemTime,
) -> RespCacheable {
    use RespCacheable::Uncacheable;
    if let Some(what) = unkeyed_input(req, body) {
        return Uncacheable(NoCacheReason::Custom(what));
    }
    if !route.statuses.contains(&resp.status.as_u16()) {
        return Uncacheable(NoCacheReason::Custom("status"));
    }
    if !route.allow_set_cookie && resp.headers.contains_key(http::header::SET_COOKIE) {
        return Uncacheable(NoCacheReason::Custom("set-cookie"));
    }
    if key::vary_names(&resp.headers).is_none() {
        return Uncacheable(NoCacheReason::Custom("vary-star"));
    }
    let cc = CacheControl::from_resp_headers(resp);
    if req.headers.contains_key(http::header::AUTHORIZATION)
        && !cc
            .as_ref()
            .is_some_and(InterpretCacheControl::allow_caching_authorized_req)
    {
        return Uncacheable(NoCacheReason::Custom("authorization"));
    }
    if cc
        .as_ref()
        .is_some_and(|c| c.is_cacheable() == Cacheable::No)
    {
        return Uncacheable(NoCacheReason::OriginNotCache);
    }
    let age = resp
        .headers
        .get(http::header::AGE)
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_secs);
    let created = now.checked_sub(age).unwrap_or(now);
    let stale = now - Duration::from_secs(1);
    let after = |ttl: Duration| {
        if ttl.is_zero() { stale } else { created + ttl }
    };
    let explicit = cc
        .as_ref()
        .and_then(InterpretCacheControl::fresh_duration)
        .map(after)
        .or_else(|| calculate_expires_header_time(resp));
    let fresh_until = match explicit {
        Some(t) => t,
        None if heuristically_cacheable(resp.status.as_u16()) => after(route.ttl),
        // A 302 (a login redirect) says nothing of how long it holds: not stored.
        None => return RespCacheable::Uncacheable(NoCacheReason::OriginNotCache),
    };
    // `no-cache` forbids serving the copy unvalidated (RFC 9111 §4.2.4, §5.2.2.4): the
    // route's stale windows do not apply to it (the origin's own `stale-*` directives do).
    let (swr, sie) = if cc.as_ref().is_some_and(|c| c.no_cache()) {
        (0, 0)
    } else {
        (route.stale_while_revalidate, route.stale_if_error)
    };
    let defaults = CacheMetaDefaults::new(|_| None, swr, sie);
    let (swr, sie) = calculate_serve_stale_durations(cc.as_ref(), &defaults);
    let mut header = resp.clone();
    if let Some(cc) = &cc {
        cc.strip_private_headers(&mut header);
    }
    RespCacheable::Cacheable(CacheMeta::new(fresh_until, created, swr, sie, header))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route() -> RouteCache {
        RouteCache {
            ttl: Duration::from_secs(300),
            statuses: vec![200, 301, 302],
            max_object_size: 1 << 20,
            key_headers: vec![],
            allow_set_cookie: false,
            stale_while_revalidate: 0,
            stale_if_error: 7,
        }
    }

    fn resp(status: u16, headers: &[(&str, &str)]) -> ResponseHeader {
        let mut r = ResponseHeader::build(status, None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    fn req(auth: bool) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/", None).unwrap();
        if auth {
            r.insert_header("authorization", "Bearer x").unwrap();
        }
        r
    }

    /// Seconds of freshness left, or None when not stored.
    fn ttl(status: u16, headers: &[(&str, &str)], auth: bool) -> Option<i64> {
        let now = SystemTime::now();
        match decide(&route(), &req(auth), false, &resp(status, headers), now) {
            RespCacheable::Cacheable(m) => Some(match m.fresh_until().duration_since(now) {
                Ok(d) => d.as_secs_f64().round() as i64,
                Err(e) => -(e.duration().as_secs_f64().round() as i64),
            }),
            RespCacheable::Uncacheable(_) => None,
        }
    }

    #[test]
    fn the_route_stale_windows_do_not_cover_no_cache() {
        let mut r = route();
        r.stale_while_revalidate = 30;
        let now = SystemTime::now();
        // (stale-while-revalidate, stale-if-error) a second after the copy went stale.
        let windows = |headers: &[(&str, &str)]| match decide(
            &r,
            &req(false),
            false,
            &resp(200, headers),
            now,
        ) {
            RespCacheable::Cacheable(m) => {
                let t = m.fresh_until() + Duration::from_secs(1);
                (m.serve_stale_while_revalidate(t), m.serve_stale_if_error(t))
            }
            RespCacheable::Uncacheable(_) => panic!("not stored"),
        };
        assert_eq!(windows(&[("cache-control", "max-age=60")]), (true, true));
        assert_eq!(windows(&[("cache-control", "no-cache")]), (false, false));
        assert_eq!(
            windows(&[("cache-control", "no-cache, stale-if-error=60")]),
            (false, true),
            "the origin's own directive"
        );
        // `no-cache=field` is not the unqualified directive.
        assert_eq!(
            windows(&[("cache-control", "no-cache=\"set-cookie\", max-age=60")]),
            (true, true)
        );
    }

    #[test]
    fn each_directive() {
        assert_eq!(ttl(200, &[], false), Some(300), "route default");
        assert_eq!(
            ttl(200, &[("cache-control", "max-age=60")], false),
            Some(60)
        );
        assert_eq!(
            ttl(200, &[("cache-control", "max-age=60, s-maxage=10")], false),
            Some(10),
            "s-maxage wins for a shared cache"
        );
        assert_eq!(
            ttl(
                200,
                &[("cache-control", "max-age=60"), ("age", "50")],
                false
            ),
            Some(10),
            "Age counts against max-age"
        );
        assert_eq!(ttl(200, &[("cache-control", "no-cache")], false), Some(-1));
        assert_eq!(ttl(200, &[("cache-control", "no-store")], false), None);
        assert_eq!(
            ttl(200, &[("cache-control", "private, max-age=60")], false),
            None
        );
        let in_a_minute = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(60));
        // HTTP dates have whole seconds.
        assert!(
            ttl(200, &[("expires", in_a_minute.as_str())], false)
                .is_some_and(|t| (59..=60).contains(&t))
        );
        assert!(
            ttl(200, &[("expires", "0")], false).is_some_and(|t| t <= 0),
            "an invalid Expires is in the past"
        );
        assert_eq!(ttl(404, &[("cache-control", "max-age=60")], false), None);
        assert_eq!(ttl(301, &[], false), Some(300));
        assert_eq!(
            ttl(302, &[], false),
            None,
            "no heuristic freshness for a 302"
        );
        assert_eq!(
            ttl(302, &[("cache-control", "max-age=60")], false),
            Some(60)
        );
        assert_eq!(ttl(200, &[("set-cookie", "a=b")], false), None);
        assert_eq!(ttl(200, &[("vary", "*")], false), None);
    }

    #[test]
    fn inputs_outside_the_key_are_not_stored() {
        let ok = resp(200, &[("cache-control", "max-age=60")]);
        let with = |name: &str, value: &str| {
            let mut r = req(false);
            r.insert_header(name.to_string(), value).unwrap();
            r
        };
        for (name, value) in [
            ("x-original-url", "/admin"),
            ("x-rewrite-url", "/admin"),
            ("x-http-method-override", "DELETE"),
            ("x-http-method", "DELETE"),
            ("x-method-override", "DELETE"),
        ] {
            assert!(
                matches!(
                    decide(&route(), &with(name, value), false, &ok, SystemTime::now()),
                    RespCacheable::Uncacheable(_)
                ),
                "{name}"
            );
        }
        // A body, however framed (the caller tells: HTTP/2 needs no Content-Length).
        let plain = req(false);
        assert!(matches!(
            decide(&route(), &plain, true, &ok, SystemTime::now()),
            RespCacheable::Uncacheable(_)
        ));
        assert!(matches!(
            decide(&route(), &plain, false, &ok, SystemTime::now()),
            RespCacheable::Cacheable(_)
        ));
        assert!(
            lookup_bypassed(&plain, true) && lookup_bypassed(&with("x-http-method", "PUT"), false)
        );
        assert!(
            !lookup_bypassed(&with("x-original-url", "/a"), false)
                && !lookup_bypassed(&plain, false)
        );
    }

    #[test]
    fn authorization_needs_an_explicit_permission() {
        assert_eq!(ttl(200, &[("cache-control", "max-age=60")], true), None);
        assert_eq!(
            ttl(200, &[("cache-control", "public, max-age=60")], true),
            Some(60)
        );
        assert_eq!(
            ttl(200, &[("cache-control", "s-maxage=30")], true),
            Some(30)
        );
    }

    #[test]
    fn stale_windows_and_stripped_fields() {
        let now = SystemTime::now();
        let decide = |h: &[(&str, &str)]| decide(&route(), &req(false), false, &resp(200, h), now);
        let RespCacheable::Cacheable(m) =
            decide(&[("cache-control", "max-age=1, stale-while-revalidate=30")])
        else {
            panic!("stored")
        };
        assert_eq!(m.stale_while_revalidate_sec(), 30);
        assert_eq!(m.stale_if_error_sec(), 7, "the route's default");
        let RespCacheable::Cacheable(m) = decide(&[(
            "cache-control",
            "max-age=1, must-revalidate, stale-if-error=60",
        )]) else {
            panic!("stored")
        };
        assert_eq!(m.stale_if_error_sec(), 0, "must-revalidate forbids stale");
        let RespCacheable::Cacheable(m) = decide(&[
            ("cache-control", "max-age=60, no-cache=\"x-secret\""),
            ("x-secret", "s"),
            ("x-kept", "k"),
        ]) else {
            panic!("stored")
        };
        assert!(m.headers().get("x-secret").is_none());
        assert!(m.headers().get("x-kept").is_some());
    }
}

//! The cache phases of a request on a route with `cache:` (see `crate::cache`).

use std::time::SystemTime;

use pingora::cache::key::HashBinary;
use pingora::cache::{CacheKey, CacheMeta, CacheOptionOverrides, CachePhase, RespCacheable};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{RangeType, range_header_filter};

use super::RequestCtx;
use crate::cache::{self, key, policy};
use crate::config::RouteCache;

/// The name of the response header saying what the cache did.
pub const STATUS_HEADER: &str = "x-cache-status";

/// What the cache did for a request on a caching route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Served from a fresh copy.
    Hit,
    /// Not stored: fetched (and stored if allowed).
    Miss,
    /// Stored but expired: fetched again.
    Expired,
    /// Served from a stale copy (stale-if-error / stale-while-revalidate).
    Stale,
    /// Expired, and the origin's 304 confirmed the stored copy.
    Revalidated,
    /// Not looked up, or not storable.
    Bypass,
}

const _: () = assert!(CacheStatus::Bypass as usize + 1 == crate::metrics::CACHE_RESULTS);

impl CacheStatus {
    fn of(phase: &CachePhase) -> CacheStatus {
        match phase {
            CachePhase::Hit => CacheStatus::Hit,
            CachePhase::Miss => CacheStatus::Miss,
            CachePhase::Expired => CacheStatus::Expired,
            CachePhase::Stale | CachePhase::StaleUpdating => CacheStatus::Stale,
            CachePhase::Revalidated | CachePhase::RevalidatedNoCache(_) => CacheStatus::Revalidated,
            _ => CacheStatus::Bypass,
        }
    }

    /// The `X-Cache-Status` value (and the access log's `cache`).
    pub fn header(self) -> &'static str {
        match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
            CacheStatus::Expired => "EXPIRED",
            CacheStatus::Stale => "STALE",
            CacheStatus::Revalidated => "REVALIDATED",
            CacheStatus::Bypass => "BYPASS",
        }
    }

    /// Its place among the `result` label's values (`RouteMetrics::cache_lookup`).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The `result` label of `tollgate_cache_lookups_total`.
    pub fn label(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Expired => "expired",
            CacheStatus::Stale => "stale",
            CacheStatus::Revalidated => "revalidated",
            CacheStatus::Bypass => "bypass",
        }
    }
}

fn route_cache(ctx: &RequestCtx) -> Option<&RouteCache> {
    let state = ctx.state.as_ref()?;
    state.router.route(ctx.route?).cache.as_ref()
}

/// The Host the key is built from: the client's, before filters edit the request.
fn host<'a>(session: &'a Session, ctx: &'a RequestCtx) -> &'a str {
    ctx.host
        .as_ref()
        .or_else(|| session.req_header().headers.get(http::header::HOST))
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
}

/// `request_cache_filter`: GET and HEAD on a caching route look up the cache; a successful
/// unsafe method, on any route, will invalidate the URL (the cache is the process's, and the
/// route that writes a URL is often not the one that caches its reads: RFC 9111 §4.4).
pub fn enable(session: &mut Session, ctx: &mut RequestCtx) {
    // Nothing is stored unless a route caches: no lookup, nothing to invalidate.
    if !ctx.state.as_ref().is_some_and(|s| s.caching) {
        return;
    }
    let Some(cache) = cache::get() else {
        return;
    };
    let method = session.req_header().method.clone();
    if matches!(
        method,
        http::Method::POST | http::Method::PUT | http::Method::PATCH | http::Method::DELETE
    ) {
        let req = session.req_header();
        ctx.invalidate = Some(key::both_schemes(
            host(session, ctx),
            req.uri.path(),
            req.uri.query(),
        ));
        return;
    }
    let Some(policy) = route_cache(ctx) else {
        return;
    };
    if method == http::Method::GET || method == http::Method::HEAD {
        // A body or a method override the application may answer by: no lookup (a stored
        // answer to the plain URL would stand in for it) and, by `policy`, no store.
        if policy::lookup_bypassed(session.req_header(), ctx.body) {
            ctx.cache_status = Some(CacheStatus::Bypass);
            return;
        }
        let max_object_size = policy.max_object_size;
        let mut overrides = CacheOptionOverrides::default();
        overrides.wait_timeout = Some(cache.lock_timeout);
        session.cache.enable(
            cache.storage,
            Some(cache.eviction),
            Some(cache.predictor),
            Some(cache.lock),
            Some(overrides),
        );
        session.cache.set_max_file_size_bytes(max_object_size);
        ctx.cache_status = Some(CacheStatus::Bypass);
    }
}

/// `cache_key_callback`.
pub fn key(session: &Session, ctx: &RequestCtx) -> CacheKey {
    key::for_request(
        session.req_header(),
        host(session, ctx),
        https(session, ctx),
    )
}

/// The scheme the origin is told the request came in on: a trusted proxy's
/// `X-Forwarded-Proto` is forwarded as it is (a TLS-terminating load balancer in front), so it
/// is the scheme an answer (an `https` redirect, absolute links) may depend on; otherwise the
/// socket's.
fn https(session: &Session, ctx: &RequestCtx) -> bool {
    if ctx.client.is_some_and(|c| c.trusted)
        && let Some(proto) = session
            .req_header()
            .headers
            .get(super::header_case::X_FORWARDED_PROTO.name())
    {
        // The first proxy's word (`https, http` from a chain of two), as origins read it.
        let first = proto.as_bytes().split(|&b| b == b',').next().unwrap_or(b"");
        return first.trim_ascii().eq_ignore_ascii_case(b"https");
    }
    ctx.tls
}

/// `response_cache_filter`.
pub fn cacheable(session: &Session, resp: &ResponseHeader, ctx: &RequestCtx) -> RespCacheable {
    // A trusted proxy's X-Forwarded-Host goes to the origin as it is (others' is replaced by
    // Host): one that names another host than the key's is an input the key leaves out.
    if ctx.client.is_some_and(|c| c.trusted) {
        let h = &session.req_header().headers;
        if let Some(fwd) = h.get(super::header_case::X_FORWARDED_HOST.name())
            && !h
                .get(http::header::HOST)
                .is_some_and(|host| host.as_bytes().eq_ignore_ascii_case(fwd.as_bytes()))
        {
            return RespCacheable::Uncacheable(pingora::cache::NoCacheReason::Custom(
                "x-forwarded-host",
            ));
        }
    }
    match route_cache(ctx) {
        Some(policy) => policy::decide(
            policy,
            session.req_header(),
            ctx.body,
            resp,
            SystemTime::now(),
        ),
        None => RespCacheable::Uncacheable(pingora::cache::NoCacheReason::NeverEnabled),
    }
}

/// `cache_vary_filter`: the route's key headers plus what the stored response varies on.
pub fn variance(meta: &CacheMeta, ctx: &RequestCtx, req: &RequestHeader) -> Option<HashBinary> {
    let policy = route_cache(ctx)?;
    let vary = key::vary_names(meta.headers()).unwrap_or_default();
    let trusted = ctx.client.is_some_and(|c| c.trusted);
    key::variance(req, &policy.key_headers, &vary, trusted)
}

/// `should_serve_stale`: on an upstream failure (including every backend unavailable), or to
/// revalidate in the background, within the windows the stored response allows.
pub fn serve_stale(ctx: &mut RequestCtx, error: Option<&Error>) -> bool {
    // Pingora asks this for an upstream error *status* before the response reaches
    // `upstream_response_filter`, where the breaker learns of statuses: count it here, once
    // (the attempt ignores a second record).
    if let Some(e) = error
        && let ErrorType::HTTPStatus(status) = e.etype()
    {
        super::resilience::record_status(ctx, *status);
    }
    error.is_none_or(|e| *e.esource() != ErrorSource::Downstream)
}

/// `response_filter`: what the cache did, for the `X-Cache-Status` the caller adds (`None`
/// when the route does not cache).
pub fn status(session: &Session, ctx: &mut RequestCtx) -> Option<http::HeaderValue> {
    ctx.cache_status?;
    let status = CacheStatus::of(&session.cache.phase());
    ctx.cache_status = Some(status);
    Some(http::HeaderValue::from_static(status.header()))
}

/// The most ranges one request may ask for (Pingora's default).
const MAX_RANGES: Option<usize> = Some(200);

/// `range_header_filter` (Pingora calls it for a hit, and for a miss on a caching route):
/// Pingora's range handling, with its usual outcome done directly on a head without a case
/// map. A request without `Range` gets the whole body, and a `200` with a valid
/// `Content-Length` says `Accept-Ranges: bytes` (as nginx does); room is made for that and for
/// the fields `response_filter` adds, so neither grows the map. The unit tests hold the two
/// paths equal.
pub fn range(req: &RequestHeader, resp: &mut ResponseHeader) -> RangeType {
    if resp.has_case() || req.headers.contains_key(http::header::RANGE) {
        return range_header_filter(req, resp, MAX_RANGES);
    }
    let ranges = resp.status == http::StatusCode::OK
        && resp
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
            .is_some_and(|v| v.parse::<usize>().is_ok());
    // A head that says nothing of ranges (a 304, a 404, no length) is left as it is.
    if ranges {
        let edited = super::header_case::edit_response(resp, 4, |h| {
            h.insert(super::header_case::ACCEPT_RANGES, BYTES)
        });
        // Only a map already at its size limit refuses a field (heads are capped far below
        // it), where Pingora's insert would panic: the body goes whole without the field.
        if let Err(e) = edited {
            log::debug!("no Accept-Ranges on a cached response: {e}");
        }
    }
    RangeType::None
}

/// The value of `Accept-Ranges`.
const BYTES: http::HeaderValue = http::HeaderValue::from_static("bytes");

/// `logging`: an unsafe request that succeeded invalidates its URL.
pub fn finish(session: &Session, ctx: &mut RequestCtx) {
    let Some(keys) = ctx.invalidate.take() else {
        return;
    };
    let ok = session
        .response_written()
        .is_some_and(|r| r.status.is_success() || r.status.is_redirection());
    if ok && let Some(cache) = cache::get() {
        for key in &keys {
            cache.purge(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(resp: &ResponseHeader) -> Vec<(String, Vec<u8>)> {
        resp.headers
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect()
    }

    /// One head and request, as the equivalence test varies them.
    #[derive(Debug, Clone, Copy)]
    struct Case {
        status: u16,
        lengths: &'static [&'static str],
        origin_says: Option<&'static str>,
        method: &'static str,
        if_range: Option<&'static str>,
        range: Option<&'static str>,
        cased: bool,
    }

    /// `range` and Pingora's `range_header_filter` on copies of one case: same outcome, same
    /// status, same fields in the same order.
    fn compare(c: Case) {
        let mut resp = ResponseHeader::build(c.status, None).unwrap();
        for l in c.lengths {
            resp.append_header("Content-Length", *l).unwrap();
        }
        if let Some(v) = c.origin_says {
            resp.append_header("Accept-Ranges", v).unwrap();
        }
        resp.append_header("ETag", "\"v1\"").unwrap();
        if !c.cased {
            super::super::header_case::drop_response_case(&mut resp).unwrap();
        }
        let mut req = RequestHeader::build(c.method, b"/r", None).unwrap();
        if let Some(v) = c.if_range {
            req.insert_header("If-Range", v).unwrap();
        }
        if let Some(v) = c.range {
            req.insert_header("Range", v).unwrap();
        }
        let mut ours = resp.clone();
        let got = range(&req, &mut ours);
        let want = range_header_filter(&req, &mut resp, MAX_RANGES);
        assert_eq!(got, want, "{c:?}");
        assert_eq!(ours.status, resp.status, "{c:?}");
        assert_eq!(fields(&ours), fields(&resp), "{c:?}");
    }

    /// `range` gives what Pingora's `range_header_filter` gives, head and outcome, for every
    /// combination that decides it: status, `Content-Length` (valid, invalid, missing,
    /// repeated), an origin's own `Accept-Ranges`, method, `If-Range` and `Range`, with and
    /// without a case map.
    #[test]
    fn range_matches_pingoras_range_header_filter() {
        let mut cases = vec![Case {
            status: 200,
            lengths: &["11"],
            origin_says: None,
            method: "GET",
            if_range: None,
            range: None,
            cased: false,
        }];
        // Each dimension multiplies the cases so far by its values.
        let mut vary = |f: &dyn Fn(Case) -> Vec<Case>| {
            cases = cases.iter().flat_map(|c| f(*c)).collect();
        };
        vary(&|c| [200, 304, 404].map(|status| Case { status, ..c }).to_vec());
        vary(&|c| {
            [&["11"][..], &["1x"], &[], &["11", "11"]]
                .map(|lengths| Case { lengths, ..c })
                .to_vec()
        });
        vary(&|c| {
            [None, Some("none")]
                .map(|origin_says| Case { origin_says, ..c })
                .to_vec()
        });
        vary(&|c| {
            ["GET", "HEAD", "POST"]
                .map(|method| Case { method, ..c })
                .to_vec()
        });
        vary(&|c| {
            [None, Some("\"v1\"")]
                .map(|if_range| Case { if_range, ..c })
                .to_vec()
        });
        vary(&|c| {
            [None, Some("bytes=0-4"), Some("bytes=20-30")]
                .map(|range| Case { range, ..c })
                .to_vec()
        });
        vary(&|c| [false, true].map(|cased| Case { cased, ..c }).to_vec());
        assert_eq!(cases.len(), 3 * 4 * 2 * 3 * 2 * 3 * 2);
        for c in cases {
            compare(c);
        }
    }

    /// The usual outcome is taken on the map itself: the head keeps no case map and has room
    /// for the fields `response_filter` adds. The head is filled to one free slot, so the
    /// room is there only if `range` made it.
    #[test]
    fn a_head_without_a_case_map_keeps_none_and_gains_room() {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.append_header("Content-Length", "11").unwrap();
        for i in 0..64 {
            if resp.headers.capacity() - resp.headers.len() == 1 {
                break;
            }
            resp.append_header(format!("x-{i}"), "1").unwrap();
        }
        super::super::header_case::drop_response_case(&mut resp).unwrap();
        assert_eq!(
            resp.headers.capacity() - resp.headers.len(),
            1,
            "the premise: one free slot"
        );
        let req = RequestHeader::build("GET", b"/r", None).unwrap();
        assert_eq!(range(&req, &mut resp), RangeType::None);
        assert!(!resp.has_case());
        assert_eq!(resp.headers["accept-ranges"], "bytes");
        assert!(resp.headers.capacity() >= resp.headers.len() + 3);
    }
}

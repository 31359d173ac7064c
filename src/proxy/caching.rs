//! The cache phases of a request on a route with `cache:` (see `crate::cache`).

use std::time::SystemTime;

use pingora::cache::key::HashBinary;
use pingora::cache::{CacheKey, CacheMeta, CacheOptionOverrides, CachePhase, RespCacheable};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;

use super::RequestCtx;
use crate::cache::{self, key, policy};
use crate::config::RouteCache;

/// The name of the response header saying what the cache did.
pub const STATUS_HEADER: &str = "x-cache-status";

fn route_cache(ctx: &RequestCtx) -> Option<&RouteCache> {
    let state = ctx.state.as_ref()?;
    state.router.route(ctx.route?).cache.as_ref()
}

/// The Host the key is built from: the client's, before filters edit the request.
fn host(session: &Session, ctx: &RequestCtx) -> String {
    ctx.host
        .as_ref()
        .or_else(|| session.req_header().headers.get(http::header::HOST))
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// `request_cache_filter`: GET and HEAD on a caching route look up the cache; a successful
/// unsafe method will invalidate the URL.
pub fn enable(session: &mut Session, ctx: &mut RequestCtx) {
    let Some(policy) = route_cache(ctx) else {
        return;
    };
    let Some(cache) = cache::get() else {
        return;
    };
    let method = session.req_header().method.clone();
    if method == http::Method::GET || method == http::Method::HEAD {
        let max_object_size = policy.max_object_size;
        let mut overrides = CacheOptionOverrides::default();
        overrides.wait_timeout = Some(cache.lock_timeout);
        session.cache.enable(
            cache.storage,
            Some(cache.eviction),
            None,
            Some(cache.lock),
            Some(overrides),
        );
        session.cache.set_max_file_size_bytes(max_object_size);
        ctx.cache_status = Some("BYPASS");
    } else if matches!(
        method,
        http::Method::POST | http::Method::PUT | http::Method::PATCH | http::Method::DELETE
    ) {
        ctx.invalidate = Some(key::for_request(session.req_header(), &host(session, ctx)));
    }
}

/// `cache_key_callback`.
pub fn key(session: &Session, ctx: &RequestCtx) -> CacheKey {
    key::for_request(session.req_header(), &host(session, ctx))
}

/// `response_cache_filter`.
pub fn cacheable(session: &Session, resp: &ResponseHeader, ctx: &RequestCtx) -> RespCacheable {
    match route_cache(ctx) {
        Some(policy) => policy::decide(policy, session.req_header(), resp, SystemTime::now()),
        None => RespCacheable::Uncacheable(pingora::cache::NoCacheReason::NeverEnabled),
    }
}

/// `cache_vary_filter`: the route's key headers plus what the stored response varies on.
pub fn variance(meta: &CacheMeta, ctx: &RequestCtx, req: &RequestHeader) -> Option<HashBinary> {
    let policy = route_cache(ctx)?;
    let vary = key::vary_names(meta.headers()).unwrap_or_default();
    key::variance(req, &policy.key_headers, &vary)
}

/// `should_serve_stale`: on an upstream failure (including every backend unavailable), or to
/// revalidate in the background, within the windows the stored response allows.
pub fn serve_stale(error: Option<&Error>) -> bool {
    error.is_none_or(|e| *e.esource() != ErrorSource::Downstream)
}

/// `response_filter`: say what the cache did.
pub fn status(session: &Session, ctx: &mut RequestCtx, resp: &mut ResponseHeader) -> Result<()> {
    if ctx.cache_status.is_none() {
        return Ok(());
    }
    let status = match session.cache.phase() {
        CachePhase::Hit => "HIT",
        CachePhase::Miss => "MISS",
        CachePhase::Expired => "EXPIRED",
        CachePhase::Stale | CachePhase::StaleUpdating => "STALE",
        CachePhase::Revalidated | CachePhase::RevalidatedNoCache(_) => "REVALIDATED",
        _ => "BYPASS",
    };
    ctx.cache_status = Some(status);
    resp.insert_header(STATUS_HEADER, status)
}

/// `logging`: an unsafe request that succeeded invalidates its URL.
pub fn finish(session: &Session, ctx: &mut RequestCtx) {
    let Some(key) = ctx.invalidate.take() else {
        return;
    };
    let ok = session
        .response_written()
        .is_some_and(|r| r.status.is_success() || r.status.is_redirection());
    if ok && let Some(cache) = cache::get() {
        cache.purge(&key);
    }
}

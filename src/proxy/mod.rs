//! The gateway's [`ProxyHttp`] implementation: a thin dispatcher. Each phase hands off to a
//! small piece built once from the configuration (router, upstream selectors) or to a helper
//! module here (header hygiene, client address, request id, error responses).
//!
//! ```text
//! early_request_filter     snapshot, client address, request id, keep-alive, hop-by-hop strip
//! request_filter           path normalisation (400), route match → 404/405 JSON, forwarded path
//! upstream_peer            selection (skips backends that refused to connect) → HttpPeer;
//!                          a WebSocket upgrade is armed to leave Pingora after its 101
//! fail_to_connect          retry another backend while attempts remain
//! upstream_request_filter  X-Forwarded-*, X-Request-Id, path rewrite, Host override
//! upstream_response_filter hop-by-hop strip on the response
//! response_filter          X-Request-Id to the client
//! fail_to_proxy            502/504/… as JSON
//! logging                  metrics and access log (a spliced upgrade's: when its tunnel ends)
//! ```

mod attempt;
pub mod caching;
pub mod client;
mod compression;
mod ctx;
pub mod error;
mod filter_chain;
pub(crate) mod header_case;
pub mod headers;
pub(crate) mod hygiene;
pub(crate) mod observe;
pub mod request_id;
mod resilience;
mod upgrade;

use std::borrow::Cow;
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use pingora::upstreams::peer::HttpPeer;

use crate::config::{HashKey, UpstreamProtocol};
use crate::routing::{RouteMatch, forwarded_path, normalize_host, normalize_path};
use crate::runtime::RuntimeState;
use crate::wire::GuardedStream;
pub use ctx::RequestCtx;

/// The gateway: one per process, reading the current [`RuntimeState`].
pub struct Gateway {
    state: Arc<ArcSwap<RuntimeState>>,
}

impl Gateway {
    /// A gateway serving whatever snapshot `state` holds.
    pub fn new(state: Arc<ArcSwap<RuntimeState>>) -> Gateway {
        Gateway { state }
    }
}

/// Room `upstream_request_filter` makes for the fields it adds: `X-Forwarded-For`, `-Proto`,
/// `-Host`, `X-Request-Id`, and sometimes `TE` or `Connection` (a route's `Host` replaces the
/// client's), plus one on a caching route (its `Accept-Encoding`, which the client may not
/// have sent).
const FORWARDING_HEADERS: usize = 6;

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::default()
    }

    fn init_downstream_modules(&self, modules: &mut pingora::modules::http::HttpModules) {
        // Instead of Pingora's default compression module: the same, with brotli fixed.
        modules.add_module(compression::CompressionBuilder::module());
    }

    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.started = Some(std::time::Instant::now());
        ctx.in_flight = Some(observe::RequestGuard::start());
        let state = self.state.load_full();
        let client = client::resolve(
            &state,
            session.client_addr().and_then(|a| a.as_inet()),
            session.req_header(),
        );
        ctx.request_id = request_id::pick(session.req_header(), client.trusted);
        // Keep-alive was decided from the client's `Connection` when the head was read;
        // apply our idle timeout only where it stays on, before `Connection` is stripped.
        // Pingora decides a body's framing the first time it is read, from the head as it is
        // then: decide it now, from the head as the client sent it (and as the connection
        // guard framed it), before any filter can edit Content-Length or Transfer-Encoding.
        ctx.body = !session.as_downstream_mut().is_body_empty();
        if session.get_keepalive().is_some() {
            // The connection guard closes an idle connection after the keep-alive timeout and
            // bounds a head by its deadline; Pingora's timeout (which, with heads held back
            // until complete, would also count the head's transfer) is only the backstop.
            let c = &state.config.server;
            let secs = (c.downstream_keepalive_timeout + c.connections.request_head_timeout)
                .as_secs()
                .max(1);
            session.set_keepalive(Some(secs));
        }
        // Per read: a body that sends nothing this long ends the request (and the head
        // deadline of the next one is the connection guard's).
        let c = &state.config.server.connections;
        session.set_read_timeout(Some(c.body_idle_timeout));
        // A client that stops reading a response would otherwise hold the request and its
        // upstream connection for as long as it keeps the socket open (Pingora's default is
        // no write timeout). Over HTTP/1 the connection guard times every write as a progress
        // timer (heads and the final flush too); over HTTP/2 a stream can stall on its own
        // flow-control window while the connection moves, so Pingora's per-write timeout
        // covers each stream's writes.
        match session.as_downstream().stream().and_then(GuardedStream::of) {
            Some(guard) => {
                guard.set_send_timeout(c.send_timeout);
                guard.set_body_pace(c.body_idle_timeout, c.min_body_rate);
            }
            None => session.set_write_timeout(Some(c.send_timeout)),
        }
        ctx.tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        let req = session.req_header_mut();
        // HTTP/2 has no Host, only `:authority` (the URI's): make it the Host the rest of the
        // gateway routes on and the upstream receives.
        if !req.headers.contains_key(http::header::HOST)
            && let Some(authority) = req.uri.authority()
            && let Ok(host) = http::HeaderValue::from_str(authority.as_str())
        {
            req.insert_header(http::header::HOST, host)?;
        }
        // The head as sent is what the limits and framing checks judge (answered in
        // request_filter): stripping must not make an oversized head fit.
        ctx.refusal = hygiene::check(req, &state.config.server.head).err();
        if !state.config.server.preserve_header_case {
            header_case::drop_request_case(req)?;
        }
        hygiene::join_cookie_crumbs(req);
        ctx.te_trailers = headers::wants_trailers(req);
        headers::strip_request(req);
        if !client.trusted {
            headers::drop_forwarding(req);
        }
        if !hygiene::underscores(req, state.config.server.underscore_headers) {
            ctx.refusal = ctx.refusal.or(Some(hygiene::UNDERSCORE_REFUSED));
        }
        ctx.client = Some(client);
        ctx.state = Some(state);
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let state = Arc::clone(ctx.state());
        // What Pingora's parser lets through but a gateway must not (tests/conformance.rs),
        // judged in early_request_filter.
        if let Some(r) = ctx.refusal {
            if r.close {
                session.set_keepalive(None);
            }
            error::respond_with(session, r.status, r.message, &ctx.request_id, &[]).await?;
            return Ok(true);
        }
        // One normalised path for routing, filters and the upstream (see routing::normalize).
        let normalized = match normalize_path(session.req_header().uri.path()) {
            Ok(Cow::Borrowed(_)) => None,
            Ok(Cow::Owned(p)) => Some(p),
            Err(e) => {
                error::respond_with(session, 400, e.as_str(), &ctx.request_id, &[]).await?;
                return Ok(true);
            }
        };
        if let Some(mut p) = normalized {
            let req = session.req_header_mut();
            if let Some(q) = req.uri.query() {
                p.push('?');
                p.push_str(q);
            }
            let uri = http::Uri::try_from(p).or_err(ErrorType::InvalidHTTPHeader, "bad path")?;
            req.set_uri(uri);
        }
        // Pingora 0.9.1 already rejected an absolute-form target whose authority differs from
        // Host (400) and keeps the target origin-form, so Host is the one name to route on.
        let req = session.req_header();
        let raw_host = req
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let host = normalize_host(raw_host);
        let path = req.uri.path();
        let found = state.router.find(&host, path, &req.method);
        // A CORS preflight (`OPTIONS`) to a route that does not take `OPTIONS` is answered by
        // the filters of the route that takes the method it asks about, as the request it
        // announces will be.
        let preflight_route = match found {
            RouteMatch::MethodNotAllowed(_) => {
                crate::filters::preflight_method(req).and_then(|m| {
                    match state.router.find(&host, path, &m) {
                        RouteMatch::Found(j) => Some(j),
                        _ => None,
                    }
                })
            }
            _ => None,
        };
        if let RouteMatch::Found(i) = found {
            let route = state.router.route(i);
            // The path only: the query is the one the filters leave (an API key taken out of
            // it must not come back through the rewrite).
            ctx.forwarded_path = forwarded_path(route, path, None);
            // The client's Host, for X-Forwarded-Host, before any filter edits the request.
            ctx.host = req.headers.get(http::header::HOST).cloned();
            ctx.upstream = Some(Arc::clone(&state.upstreams[route.upstream]));
            ctx.route = Some(i);
        }
        if ctx
            .forwarded_path
            .as_deref()
            .is_some_and(crate::routing::has_dot_segment)
        {
            let message = "the rewritten path has a dot segment";
            error::respond_with(session, 400, message, &ctx.request_id, &[]).await?;
            return Ok(true);
        }
        let route_name = ctx
            .route
            .map_or("", |i| state.router.route(i).name.as_str());
        // Global filters see every request, routed or not (a redirect, CORS preflight, IP deny…).
        if filter_chain::request(&state.config.filters, session, ctx, route_name).await? {
            return Ok(true);
        }
        match found {
            RouteMatch::Found(i) => {
                let route = state.router.route(i);
                if filter_chain::request(&route.filters, session, ctx, route_name).await? {
                    return Ok(true);
                }
                Ok(false)
            }
            RouteMatch::MethodNotAllowed(i) => {
                if let Some(j) = preflight_route {
                    let route = state.router.route(j);
                    if filter_chain::request(&route.filters, session, ctx, &route.name).await? {
                        return Ok(true);
                    }
                }
                let allow = state
                    .router
                    .route(i)
                    .methods
                    .iter()
                    .map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join(", ");
                error::respond(session, 405, &ctx.request_id, &[("allow", &allow)]).await?;
                Ok(true)
            }
            RouteMatch::NotFound => {
                error::respond(session, 404, &ctx.request_id, &[]).await?;
                Ok(true)
            }
        }
    }

    fn request_cache_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        caching::enable(session, ctx);
        Ok(())
    }

    fn cache_key_callback(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
    ) -> Result<pingora::cache::CacheKey> {
        Ok(caching::key(session, ctx))
    }

    fn response_cache_filter(
        &self,
        session: &Session,
        resp: &ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<pingora::cache::RespCacheable> {
        Ok(caching::cacheable(session, resp, ctx))
    }

    fn cache_vary_filter(
        &self,
        meta: &pingora::cache::CacheMeta,
        ctx: &mut RequestCtx,
        req: &RequestHeader,
    ) -> Option<pingora::cache::key::HashBinary> {
        caching::variance(meta, ctx, req)
    }

    fn should_serve_stale(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
        error: Option<&Error>,
    ) -> bool {
        caching::serve_stale(ctx, error)
    }

    fn range_header_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        _ctx: &mut RequestCtx,
    ) -> pingora::proxy::RangeType {
        caching::range(session.req_header(), resp)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if end_of_stream && ctx.body_done_at.is_none() {
            ctx.body_done_at = Some(std::time::Instant::now());
        }
        let Some(state) = ctx.state.clone() else {
            return Ok(());
        };
        let route = ctx
            .route
            .map_or("", |i| state.router.route(i).name.as_str());
        filter_chain::body(route, ctx, body.as_ref(), end_of_stream)
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let upstream = ctx
            .upstream
            .clone()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no upstream chosen"))?;
        let key = hash_key(upstream.config.hash_key.as_ref(), session.req_header(), ctx);
        let mut peer = resilience::choose(&upstream, &key, ctx).await?;
        upgrade::arm(session, &upstream, &mut peer, ctx);
        Ok(peer)
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        e: Box<Error>,
    ) -> Box<Error> {
        resilience::connect_failed(ctx, e)
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let e = e.more_context(format!("Peer: {peer}"));
        resilience::proxy_failed(session, ctx, e, client_reused)
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let client = ctx.client.expect("set in early_request_filter");
        // The upstream always gets origin-form: a rewritten path, or the client's absolute-form
        // target (`GET http://host/p`, whose authority Pingora already checked against Host;
        // an HTTP/2 request's `:authority`, copied to Host) cut down to its path and query.
        // Host is then the one authority, also for an HTTP/2 upstream's `:authority`.
        let raw = upstream_request.raw_path();
        let absolute = upstream_request.uri.authority().is_some()
            || (raw.first() != Some(&b'/') && raw != b"*");
        // Cloned, not taken: a retry runs this filter again on a fresh copy of the request.
        let path = match &ctx.forwarded_path {
            Some(p) => Some(match upstream_request.uri.query() {
                Some(q) => format!("{p}?{q}"),
                None => p.clone(),
            }),
            None if absolute => {
                // Every HTTP/2 request comes here: reuse the parsed path and query (a cheap
                // clone of shared bytes) instead of formatting and parsing it again.
                let mut parts = http::uri::Parts::default();
                parts.path_and_query = upstream_request.uri.path_and_query().cloned();
                if let Ok(uri) = http::Uri::from_parts(parts) {
                    upstream_request.set_uri(uri);
                }
                None
            }
            None => None,
        };
        if let Some(path) = path {
            let uri = http::Uri::try_from(path).or_err(
                ErrorType::InternalError,
                "rewritten path is not a valid URI",
            )?;
            upstream_request.set_uri(uri);
        }
        let state = ctx.state();
        let upstream_host = ctx
            .route
            .and_then(|i| state.router.route(i).upstream_host.clone());
        let upstream = ctx.upstream.as_ref().map(|u| &u.config);
        let te_trailers =
            ctx.te_trailers && upstream.is_some_and(|u| u.protocol != UpstreamProtocol::Http1);
        let close = upstream.is_some_and(|u| u.pool_size == 0)
            && !headers::is_websocket_upgrade(upstream_request);
        let peer = observe::Inline::ip(client.peer);
        let xff = headers::forwarded_for(upstream_request, client.trusted, peer.as_str());
        // A request the cache may store the answer to asks the origin only for the codings
        // its variance tells apart (`cache::key::accepted_codings`).
        let codings = ctx
            .cache_status
            .is_some()
            .then(|| crate::cache::key::accepted_codings(upstream_request));
        let room = FORWARDING_HEADERS + usize::from(codings.is_some());
        header_case::edit_request(upstream_request, room, |h| {
            // None of the three: `identity` (no `Accept-Encoding` would allow any coding).
            if let Some(c) = codings {
                let value = if c.is_empty() {
                    http::HeaderValue::from_static("identity")
                } else {
                    http::HeaderValue::from_str(&c).expect("coding names are valid")
                };
                h.insert(header_case::ACCEPT_ENCODING, value)?;
            }
            h.insert(header_case::X_FORWARDED_FOR, xff)?;
            if !(client.trusted && h.map().contains_key(header_case::X_FORWARDED_PROTO.name())) {
                let proto = if ctx.tls { "https" } else { "http" };
                h.insert(
                    header_case::X_FORWARDED_PROTO,
                    http::HeaderValue::from_static(proto),
                )?;
            }
            if !(client.trusted && h.map().contains_key(header_case::X_FORWARDED_HOST.name()))
                && let Some(host) = ctx.host.clone()
            {
                h.insert(header_case::X_FORWARDED_HOST, host)?;
            }
            h.insert(header_case::X_REQUEST_ID, ctx.request_id.header_value())?;
            if let Some(host) = upstream_host {
                h.insert(header_case::HOST, host)?;
            }
            if te_trailers {
                h.insert(header_case::TE, http::HeaderValue::from_static("trailers"))?;
            }
            if close {
                h.insert(
                    header_case::CONNECTION,
                    http::HeaderValue::from_static("close"),
                )?;
            }
            Ok(())
        })
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if ctx.drops_header_case() {
            header_case::drop_response_case(upstream_response)?;
        }
        headers::strip_response(upstream_response);
        resilience::response_received(session, ctx, upstream_response)
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // A cache hit's head may come from the cache with a case map (a proxied one lost it in
        // upstream_response_filter; the cache keeps none for such heads).
        if ctx.drops_header_case() {
            header_case::drop_response_case(upstream_response)?;
        }
        // An interim head (`100`, `103 Early Hints`) gets the route's header filters (what
        // they remove from responses must not leak through it); compression, the cache status
        // and the request id are for the final head.
        let interim = resilience::is_interim(upstream_response.status.as_u16());
        if let Some(state) = ctx.state.clone() {
            let route = ctx
                .route
                .map_or("", |i| state.router.route(i).name.as_str());
            filter_chain::response(upstream_response, ctx, route);
            if state.compression && !interim {
                let levels = filter_chain::compression(ctx)
                    .map(|c| c.levels_for(upstream_response))
                    .unwrap_or_default();
                compression_module(session).offer(levels);
            }
        }
        if interim {
            return Ok(());
        }
        let cache_status = caching::status(session, ctx);
        // Room for Pingora's Connection too (`strip_response` removed the upstream's; Date
        // usually replaces the upstream's).
        let more = 2 + usize::from(cache_status.is_some());
        header_case::edit_response(upstream_response, more, |h| {
            if let Some(status) = cache_status {
                h.insert(header_case::X_CACHE_STATUS, status)?;
            }
            h.insert(header_case::X_REQUEST_ID, ctx.request_id.header_value())
        })
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        caching::finish(session, ctx);
        if upgrade::defer(session, ctx) {
            return; // recorded when its tunnel ends
        }
        observe::finish(session, e, ctx);
        // The connection guard may answer a refusal of the next head only once this response
        // is complete.
        if let Some(guard) = session.as_downstream().stream().and_then(GuardedStream::of) {
            guard.response_done();
        }
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let status = error::status_for(e);
        if status > 0 && session.response_written().is_none() {
            if ctx.request_id.is_empty() {
                ctx.request_id = request_id::generate();
            }
            // The connection is not reused after a failed proxy attempt (the request body may
            // be half read): say so in the response, as Pingora's own error pages do.
            session.set_keepalive(None);
            let message = ctx
                .unavailable
                .map_or(error::message_for(status), resilience::unavailable_message);
            let retry_after = ctx
                .retry_after()
                .filter(|_| status == 503)
                .map(|s| s.to_string());
            let extra: Vec<(&'static str, &str)> = retry_after
                .iter()
                .map(|v| ("retry-after", v.as_str()))
                .collect();
            if let Err(write_err) =
                error::respond_with(session, status, message, &ctx.request_id, &extra).await
            {
                log::debug!("could not write the {status} error response: {write_err}");
            }
        }
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }
}

/// The response compression module of this session (installed for every session, disabled).
fn compression_module(session: &mut Session) -> &mut compression::Compression {
    session
        .downstream_modules_ctx
        .get_mut::<compression::Compression>()
        .expect("init_downstream_modules installs the compression module")
}

/// The bytes `consistent_hash` hashes. A missing header/cookie/query value falls back to the
/// client address, so such requests still spread and stay sticky per client.
fn hash_key(key: Option<&HashKey>, req: &RequestHeader, ctx: &RequestCtx) -> Bytes {
    let client_ip = || {
        Bytes::from(
            ctx.client
                .map(|c| c.client_ip.to_string())
                .unwrap_or_default(),
        )
    };
    let found = match key {
        None => return Bytes::new(),
        Some(HashKey::ClientIp) => None,
        Some(HashKey::Path) => Some(Bytes::copy_from_slice(req.uri.path().as_bytes())),
        Some(HashKey::Header(name)) => req
            .headers
            .get(name)
            .map(|v| Bytes::copy_from_slice(v.as_bytes())),
        Some(HashKey::Cookie(name)) => req
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| Bytes::copy_from_slice(v.as_bytes())),
        Some(HashKey::Query(name)) => req.uri.query().and_then(|q| {
            q.split('&')
                .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
                .find(|(k, _)| k == name)
                .map(|(_, v)| Bytes::copy_from_slice(v.as_bytes()))
        }),
    };
    found.unwrap_or_else(client_ip)
}

//! What the `logging` phase records: request metrics and the access log line. Plus two gauge
//! guards: open client connections (carried across keep-alive requests in Pingora's
//! per-connection context, so it drops when the connection does) and requests in flight.

use pingora::prelude::*;

use super::RequestCtx;
use super::resilience::unavailable_message;
use crate::access_log::Entry;
use crate::metrics::{method_label, metrics, status_class};

/// Counts one open client connection until dropped.
#[derive(Debug)]
pub struct ConnectionGuard(());

impl ConnectionGuard {
    /// A new client connection.
    pub fn open() -> ConnectionGuard {
        let m = metrics();
        m.connections.inc();
        m.connections_total.inc();
        ConnectionGuard(())
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        metrics().connections.dec();
    }
}

/// Counts one request in flight until dropped.
#[derive(Debug)]
pub struct RequestGuard(());

impl RequestGuard {
    /// A request started.
    pub fn start() -> RequestGuard {
        metrics().in_flight.inc();
        RequestGuard(())
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        metrics().in_flight.dec();
    }
}

/// Record a finished request: metrics, then the access log line.
pub fn finish(session: &Session, e: Option<&Error>, ctx: &RequestCtx) {
    let Some(state) = ctx.state.as_ref() else {
        return;
    };
    let status = session.response_written().map_or(0, |r| r.status.as_u16());
    let req = session.req_header();
    let route = ctx
        .route
        .map_or("", |i| state.router.route(i).name.as_str());
    let route_label = if route.is_empty() { "none" } else { route };
    let elapsed = ctx.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let (bytes_in, bytes_out) = (session.body_bytes_read(), session.body_bytes_sent());
    let m = metrics();
    m.requests
        .with_label_values(&[route_label, method_label(&req.method), status_class(status)])
        .inc();
    m.request_duration
        .with_label_values(&[route_label])
        .observe(elapsed);
    m.bytes_in
        .with_label_values(&[route_label])
        .inc_by(bytes_in as u64);
    m.bytes_out
        .with_label_values(&[route_label])
        .inc_by(bytes_out as u64);
    if let Some(status) = ctx.cache_status {
        m.cache_lookups
            .with_label_values(&[route_label, status.label()])
            .inc();
    }
    let upstream = ctx.upstream.as_ref().map_or("", |u| u.name.as_str());
    let backend = ctx.last_backend.map(|a| a.to_string()).unwrap_or_default();
    if let Some(t) = ctx.upstream_time {
        m.upstream_duration
            .with_label_values(&[upstream, &backend])
            .observe(t.as_secs_f64());
    }
    let Some(log) = &state.access_log else { return };
    let host = req
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let path = req.uri.path_and_query().map_or("", |p| p.as_str());
    log.log(&Entry {
        time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        request_id: &ctx.request_id,
        client: ctx
            .client
            .map(|c| c.client_ip.to_string())
            .unwrap_or_default(),
        method: req.method.as_str(),
        host,
        path,
        status,
        bytes_in,
        bytes_out,
        route,
        upstream,
        backend,
        attempts: ctx.attempts,
        retries: ctx.retries,
        upstream_ms: ctx.upstream_time.map(|t| t.as_secs_f64() * 1000.0),
        total_ms: elapsed * 1000.0,
        unavailable: ctx.unavailable.map(unavailable_message),
        cache: ctx.cache_status.map(|s| s.header()),
        error: e.map(|e| e.to_string()),
    });
}

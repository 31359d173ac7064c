//! The admin listener (default 127.0.0.1:9901):
//!
//! | endpoint | answers |
//! |---|---|
//! | `GET /health` | 200 while the process runs |
//! | `GET /health/ready` | 200 when serving: not shutting down, every upstream has a usable backend; else 503 with reasons |
//! | `GET /metrics` | Prometheus text exposition |
//! | `GET /upstreams` | backends, health, breaker state, in-flight, counters (JSON) |
//! | `GET /config` | the effective configuration (JSON; the admin token and filter secrets redacted) |
//! | `POST /reload` | reload the configuration file; 200, or 400 with the errors |
//! | `POST /cache/purge` | body `{"url": "http://host/path?query"}`: remove that URL's cached copies (every variant); 200 with the count |
//!
//! With `admin.token` set, every endpoint but the two health checks needs
//! `Authorization: Bearer <token>` (compared in constant time).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::{Method, Response};
use pingora::apps::ServerApp;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::Stream;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use pingora::services::listening::Service;
use serde_json::{Value, json};

use super::control::Lifecycle;
use super::reload::Reloader;
use crate::config::{Config, Discovery, HostPattern, PathMatch, Readiness};
use crate::metrics;
use crate::runtime::RuntimeState;

/// The admin HTTP application.
pub struct Admin {
    state: Arc<ArcSwap<RuntimeState>>,
    reloader: Arc<Reloader>,
    lifecycle: Arc<Lifecycle>,
}

impl Admin {
    /// The admin API over `state` (whose `admin.token` it checks: a reload rotates it).
    pub fn new(
        state: Arc<ArcSwap<RuntimeState>>,
        reloader: Arc<Reloader>,
        lifecycle: Arc<Lifecycle>,
    ) -> Admin {
        Admin {
            state,
            reloader,
            lifecycle,
        }
    }

    fn authorized(&self, session: &ServerSession) -> bool {
        let state = self.state.load();
        let Some(token) = state.config.admin.as_ref().and_then(|a| a.token.as_ref()) else {
            return true;
        };
        let given = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| bearer(v.as_bytes()))
            .unwrap_or(b"");
        token_matches(given, token.as_bytes())
    }
}

/// The credentials of an `Authorization: Bearer …` value (the scheme is case-insensitive,
/// RFC 9110 §11.1).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then_some(rest)
}

/// Compares digests in constant time, so that neither the bytes nor the length of the token
/// show in the time an answer takes.
fn token_matches(given: &[u8], token: &[u8]) -> bool {
    let a = ring::digest::digest(&ring::digest::SHA256, given);
    let b = ring::digest::digest(&ring::digest::SHA256, token);
    a.as_ref()
        .iter()
        .zip(b.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

fn respond(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("content-length", body.len())
        .header("cache-control", "no-store")
        .body(body)
        .expect("static response parts are valid")
}

fn json_response(status: u16, v: &Value) -> Response<Vec<u8>> {
    let mut body = serde_json::to_vec_pretty(v).unwrap_or_default();
    body.push(b'\n');
    respond(status, "application/json", body)
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let open = matches!(path.as_str(), "/health" | "/health/ready");
        if !open && !self.authorized(session) {
            return json_response(401, &json!({"error": "admin token required"}));
        }
        let state = self.state.load_full();
        match (method, path.as_str()) {
            (Method::GET, "/health") => json_response(200, &json!({"status": "ok"})),
            (Method::GET, "/health/ready") => {
                let reasons = not_ready(&state, &self.lifecycle);
                let status = if reasons.is_empty() { 200 } else { 503 };
                json_response(
                    status,
                    &json!({"ready": reasons.is_empty(), "reasons": reasons}),
                )
            }
            (Method::GET, "/metrics") => respond(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                metrics::render(&state).into_bytes(),
            ),
            (Method::GET, "/upstreams") => json_response(200, &upstreams(&state)),
            (Method::GET, "/config") => json_response(200, &effective_config(&state.config)),
            (Method::POST, "/cache/purge") => purge(session).await,
            (Method::POST, "/reload") => {
                let r = Arc::clone(&self.reloader);
                match tokio::task::spawn_blocking(move || r.reload()).await {
                    Ok(Ok(())) => json_response(200, &json!({"status": "reloaded"})),
                    Ok(Err(e)) => json_response(
                        400,
                        &json!({"error": "configuration rejected; the previous one stays",
                                "errors": e.lines().collect::<Vec<_>>()}),
                    ),
                    Err(_) => json_response(500, &json!({"error": "reload task failed"})),
                }
            }
            (
                _,
                "/health" | "/health/ready" | "/metrics" | "/upstreams" | "/config" | "/reload"
                | "/cache/purge",
            ) => json_response(405, &json!({"error": "method not allowed"})),
            _ => json_response(404, &json!({"error": "not found"})),
        }
    }
}

/// Why the gateway is not ready; empty when it is.
pub fn not_ready(state: &RuntimeState, lifecycle: &Lifecycle) -> Vec<String> {
    let mut reasons = Vec::new();
    if lifecycle.stopping() {
        reasons.push("shutting down".to_string());
    }
    let by_upstreams = state
        .config
        .admin
        .as_ref()
        .is_some_and(|a| a.readiness == Readiness::Upstreams);
    if !by_upstreams {
        // A new process is not ready before each discovery has answered once: it would take
        // traffic its discovered upstreams cannot serve yet.
        for u in &state.upstreams {
            if !u.discovery_answered() {
                reasons.push(format!(
                    "upstream {}: discovery has not answered yet",
                    u.name
                ));
            }
        }
        return reasons;
    }
    for u in &state.upstreams {
        let members = u.members();
        if members.backends.is_empty() {
            reasons.push(format!(
                "upstream {} has no backends (discovery found none yet)",
                u.name
            ));
        } else if u.config.health.as_ref().is_some_and(|h| !h.fail_open)
            && !members.backends.iter().any(|b| b.is_healthy())
        {
            reasons.push(format!("upstream {} has no healthy backend", u.name));
        }
    }
    reasons
}

fn upstreams(state: &RuntimeState) -> Value {
    let now = Instant::now();
    let list: Vec<Value> = state
        .upstreams
        .iter()
        .map(|u| {
            let backends: Vec<Value> = u
                .members()
                .backends
                .iter()
                .map(|b| {
                    json!({
                        "address": b.label(),
                        "weight": b.weight,
                        "healthy": b.is_healthy(),
                        "breaker": b.breaker_state(now).as_str(),
                        "in_flight": b.in_flight(),
                    })
                })
                .collect();
            let counters: serde_json::Map<String, Value> = u
                .stats
                .snapshot()
                .into_iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            json!({
                "name": u.name,
                "balance": u.config.balance.as_str(),
                "in_flight": u.in_flight(),
                "backends": backends,
                "counters": counters,
            })
        })
        .collect();
    json!({ "upstreams": list })
}

/// `POST /cache/purge`: `{"url": "http://host[:port]/path?query"}` (GET and HEAD share it).
async fn purge(session: &mut ServerSession) -> Response<Vec<u8>> {
    const MAX_BODY: usize = 16 * 1024;
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) if body.len() + chunk.len() <= MAX_BODY => {
                body.extend_from_slice(&chunk)
            }
            Ok(Some(_)) => return json_response(413, &json!({"error": "body over 16 KiB"})),
            Ok(None) => break,
            Err(e) => return json_response(400, &json!({"error": e.to_string()})),
        }
    }
    let bad = |why: &str| json_response(400, &json!({"error": why}));
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return bad(r#"send {"url": "http://host/path?query"}"#);
    };
    let Some(url) = v.get("url").and_then(Value::as_str) else {
        return bad(r#"send {"url": "http://host/path?query"}"#);
    };
    let Ok(uri) = url.parse::<http::Uri>() else {
        return bad("url is not a URL");
    };
    let (Some(authority), Some("http" | "https")) = (uri.authority(), uri.scheme_str()) else {
        return bad("url needs http:// or https:// and a host");
    };
    // The cache keys the normalised path, as routing sees it.
    let path = match crate::routing::normalize_path(uri.path()) {
        Ok(p) => p.into_owned(),
        Err(e) => return bad(e.as_str()),
    };
    // Both schemes: the same URL served on a plain and a TLS listener is one resource.
    let keys = crate::cache::key::both_schemes(authority.as_str(), &path, uri.query());
    let purged = crate::cache::get().map_or(0, |c| keys.iter().map(|k| c.purge(k)).sum());
    json_response(200, &json!({"purged": purged}))
}

fn addr(a: SocketAddr) -> String {
    a.to_string()
}

/// The configuration in force, as JSON, with the admin token and filter secrets redacted.
pub fn effective_config(c: &Config) -> Value {
    let d = |d: std::time::Duration| humantime::format_duration(d).to_string();
    let upstreams: Vec<Value> = c
        .upstreams
        .iter()
        .map(|u| {
            json!({
                "name": u.name,
                "balance": u.balance.as_str(),
                "hash_key": u.hash_key.as_ref().map(|k| format!("{k:?}")),
                "backends": u.backends.iter().map(|b| json!({"address": addr(b.addr), "weight": b.weight})).collect::<Vec<_>>(),
                "timeouts": {"connect": d(u.connect_timeout), "read": d(u.read_timeout), "write": d(u.write_timeout), "idle": d(u.idle_timeout)},
                "keepalive": {"pool_size": u.pool_size},
                "retries": {
                    "attempts": u.retry.attempts,
                    "on": u.retry.on.iter().map(|k| format!("{k:?}")).collect::<Vec<_>>(),
                    "statuses": u.retry.statuses,
                    "methods": if u.retry.all_methods { "all" } else { "idempotent" },
                    "budget_percent": u.retry.budget_percent,
                    "backoff": d(u.retry.backoff),
                },
                "circuit_breaker": u.breaker.map(|b| json!({
                    "consecutive_failures": b.consecutive_failures,
                    "failure_rate": b.failure_rate,
                    "min_requests": b.min_requests,
                    "window": d(b.window),
                    "open_for": d(b.open_for),
                    "max_open_for": d(b.max_open_for),
                    "half_open_requests": b.half_open_requests,
                    "failure_statuses": u.failure.statuses,
                    "slow_call": u.failure.slow_call.map(d),
                })),
                "max_in_flight": u.max_in_flight,
                "health_check": u.health.as_ref().map(|h| json!({
                    "kind": format!("{:?}", h.kind).to_lowercase(),
                    "path": h.path,
                    "interval": d(h.interval),
                    "timeout": d(h.timeout),
                    "healthy": h.healthy,
                    "unhealthy": h.unhealthy,
                    "fail_open": h.fail_open,
                })),
                "discovery": u.discovery.as_ref().map(|x| match x {
                    Discovery::Dns { name, port, refresh, nameservers } => json!({
                        "kind": "dns", "name": name, "port": port, "refresh": d(*refresh),
                        "nameservers": nameservers.iter().map(|a| addr(*a)).collect::<Vec<_>>(),
                    }),
                    Discovery::Zookeeper { servers, path, session_timeout } => json!({
                        "kind": "zookeeper", "servers": servers, "path": path,
                        "session_timeout": d(*session_timeout),
                    }),
                }),
                "tls": u.tls.as_ref().map(|t| json!({
                    "sni": t.sni, "verify": t.verify, "verify_hostname": t.verify_hostname,
                    "ca_file": t.ca_file, "client_cert": t.client_cert,
                })),
                "protocol": format!("{:?}", u.protocol).to_lowercase(),
                "h2_max_streams": u.h2_max_streams,
            })
        })
        .collect();
    let routes: Vec<Value> = c
        .routes
        .iter()
        .map(|r| {
            json!({
                "name": r.name,
                "hosts": r.hosts.iter().map(|h| match h {
                    HostPattern::Exact(n) => n.clone(),
                    HostPattern::Suffix(s) => format!("*{s}"),
                }).collect::<Vec<_>>(),
                "path": match &r.path {
                    PathMatch::Any => json!(null),
                    PathMatch::Exact(p) => json!({"exact": p}),
                    PathMatch::Prefix(p) => json!({"prefix": p}),
                    PathMatch::Regex(re) => json!({"regex": re.as_str()}),
                },
                "methods": r.methods.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
                "upstream": c.upstreams[r.upstream].name,
                "strip_prefix": r.strip_prefix,
                "rewrite": r.rewrite.as_ref().map(|(re, rep)| json!({"regex": re.as_str(), "replace": rep})),
                "upstream_host": r.upstream_host.as_ref().and_then(|h| h.to_str().ok()),
                "filters": r.filter_specs,
            })
        })
        .collect();
    json!({
        "server": {
            "threads": c.server.threads,
            "work_stealing": c.server.work_stealing,
            "grace_period": d(c.server.grace_period),
            "graceful_shutdown_timeout": d(c.server.graceful_shutdown_timeout),
            "pid_file": c.server.pid_file,
            "upgrade_sock": c.server.upgrade_sock,
            "upstream_keepalive_pool_size": c.server.upstream_keepalive_pool_size,
            "downstream_keepalive_timeout": d(c.server.downstream_keepalive_timeout),
            "log_level": c.server.log_level,
            "preserve_header_case": c.server.preserve_header_case,
            "request_head_timeout": d(c.server.connections.request_head_timeout),
            "body_idle_timeout": d(c.server.connections.body_idle_timeout),
            "send_timeout": d(c.server.connections.send_timeout),
            "min_body_rate": c.server.connections.min_body_rate,
            "max_connections": c.server.connections.max,
            "max_connections_per_ip": c.server.connections.max_per_ip,
            "http2": {
                "max_concurrent_streams": c.server.http2.max_concurrent_streams,
                "max_header_list_size": c.server.http2.max_header_list_size,
                "max_pending_reset_streams": c.server.http2.max_pending_reset_streams,
                "max_local_error_reset_streams": c.server.http2.max_local_error_reset_streams,
                "initial_window_size": c.server.http2.initial_window_size,
                "idle_timeout": d(c.server.http2.idle_timeout),
            },
        },
        "listeners": c.listeners.iter().map(|l| json!({
            "address": addr(l.address),
            "read_buffer": l.read_buffer,
            "h2c": l.h2c,
            "tls": l.tls.as_ref().map(|t| json!({
                "http2": t.http2,
                "reject_unknown_sni": t.store.reject_unknown(),
                "certificates": t.store.summary.iter().map(|s| json!({
                    "cert": s.cert, "names": s.names, "not_after": s.not_after,
                })).collect::<Vec<_>>(),
            })),
        })).collect::<Vec<_>>(),
        "admin": c.admin.as_ref().map(|a| json!({
            "address": addr(a.address),
            "token": a.token.as_ref().map(|_| "<redacted>"),
            "token_file": a.token_file,
            "readiness": format!("{:?}", a.readiness).to_lowercase(),
        })),
        "trusted_proxies": c.trusted_proxies.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        "access_log": c.access_log.as_ref().map(|a| json!({
            "format": format!("{:?}", a.format).to_lowercase(), "path": a.path,
        })),
        "upstreams": upstreams,
        "routes": routes,
        "filters": c.filter_specs,
    })
}

/// The admin service bound to `address`.
pub fn service(address: SocketAddr, admin: Admin) -> Service<AdminGuard> {
    let guard = AdminGuard {
        inner: Arc::new(admin),
        open: AtomicUsize::new(0),
    };
    let mut svc = Service::new("tollgate admin".to_string(), guard);
    svc.add_tcp(&address.to_string());
    svc
}

/// Admin requests served at once; a connection over it is closed at once. The admin listener is
/// outside the proxy's connection guard: this keeps a client (token or not) from holding the
/// process's file descriptors through it.
const MAX_ADMIN_REQUESTS: usize = 64;

/// Longest one admin request may take, from waiting for its head (on a kept-alive connection,
/// the wait for the next one) to its answer written; then the connection is closed. A scraper
/// keeping its connection open across scrapes reconnects after it.
const ADMIN_REQUEST_DEADLINE: Duration = Duration::from_secs(30);

/// The admin application, at most 64 requests at once and 30 s each (`MAX_ADMIN_REQUESTS`,
/// `ADMIN_REQUEST_DEADLINE`).
pub struct AdminGuard {
    inner: Arc<Admin>,
    open: AtomicUsize,
}

#[async_trait]
impl ServerApp for AdminGuard {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= MAX_ADMIN_REQUESTS {
            self.open.fetch_sub(1, Ordering::AcqRel);
            log::debug!("admin: {MAX_ADMIN_REQUESTS} requests in progress; connection closed");
            return None;
        }
        let served = tokio::time::timeout(
            ADMIN_REQUEST_DEADLINE,
            ServerApp::process_new(&self.inner, stream, shutdown),
        )
        .await;
        self.open.fetch_sub(1, Ordering::AcqRel);
        served.ok().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(token_matches(b"abc", b"abc"));
        assert!(!token_matches(b"abc", b"abd"));
        assert!(!token_matches(b"abc", b"abcd"));
        assert!(!token_matches(b"", b"abc"));
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer(b"Bearer tok"), Some(&b"tok"[..]));
        assert_eq!(bearer(b"bearer tok"), Some(&b"tok"[..]));
        assert_eq!(bearer(b"BEARER tok"), Some(&b"tok"[..]));
        assert_eq!(bearer(b"Basic dG9r"), None);
        assert_eq!(bearer(b"Bearer"), None);
    }
}

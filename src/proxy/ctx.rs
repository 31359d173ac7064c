//! Per-request state carried between the `ProxyHttp` phases.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::proxy::attempt::Attempt;
use crate::proxy::client::ClientInfo;
use crate::proxy::observe::RequestGuard;
use crate::runtime::RuntimeState;
use crate::upstream::{Backend, Unavailable, Upstream};

/// What one request has learnt so far. Created empty by `new_ctx`, filled phase by phase.
#[derive(Debug, Default)]
pub struct RequestCtx {
    /// The configuration snapshot this request runs on (taken in `early_request_filter`).
    pub state: Option<Arc<RuntimeState>>,
    /// Request id: the trusted client's, or generated.
    pub request_id: super::request_id::RequestId,
    /// Peer and resolved client.
    pub client: Option<ClientInfo>,
    /// Index of the matched route.
    pub route: Option<usize>,
    /// The route's upstream.
    pub upstream: Option<Arc<Upstream>>,
    /// The path to send upstream, when it differs from the client's (the query sent is the
    /// request's as the filters leave it).
    pub forwarded_path: Option<String>,
    /// Original `Host`, for `X-Forwarded-Host`.
    pub host: Option<http::HeaderValue>,
    /// The request arrived over TLS.
    pub tls: bool,
    /// The request has a body, as framed when its head arrived: over HTTP/1 a Content-Length
    /// above 0 or a Transfer-Encoding; over HTTP/2 no end of stream with the head and no
    /// `content-length: 0` (a body need not announce its length there).
    pub body: bool,
    /// When the last byte of the request body was read (`None`: no body, or still coming).
    pub body_done_at: Option<Instant>,
    /// The client sent `TE: trailers` (forwarded to HTTP/2 upstreams, as gRPC needs).
    pub te_trailers: bool,
    /// Why the head is refused, if it is (`proxy::hygiene`).
    pub refusal: Option<super::hygiene::Refusal>,
    /// Upstream attempts so far (connects, and Pingora's retries of stale pooled connections).
    pub attempts: usize,
    /// Retries on another backend so far (counted against `retries.attempts`).
    pub retries: usize,
    /// Backends that failed this request; never offered to it again.
    pub excluded: Vec<SocketAddr>,
    /// The attempt in progress.
    pub attempt: Option<Attempt>,
    /// Wait before the next attempt (a retry after a failure other than a refused connect).
    pub backoff_due: bool,
    /// Why no backend could be picked (for the 503 message and `Retry-After`).
    pub unavailable: Option<Unavailable>,
    /// The next upstream error is a status retry we raised ourselves (already recorded).
    pub status_retry: bool,
    /// When the request head was read.
    pub started: Option<Instant>,
    /// The backend of the last attempt.
    pub last_backend: Option<Arc<Backend>>,
    /// Time from choosing the last backend to its response head.
    pub upstream_time: Option<Duration>,
    /// A WebSocket upgrade whose backend connection may be spliced (`proxy::upgrade`).
    pub splice_armed: bool,
    /// The in-flight gauge guard.
    pub in_flight: Option<RequestGuard>,
    /// Filters' per-request state.
    pub filter_state: http::Extensions,
    /// `X-Cache-Status` of a caching route's response (`HIT`, `MISS`, …).
    pub cache_status: Option<super::caching::CacheStatus>,
    /// An unsafe request on a caching route: the keys (both schemes) to invalidate if it
    /// succeeds.
    pub invalidate: Option<[pingora::cache::CacheKey; 2]>,
}

impl RequestCtx {
    /// The snapshot; set for every request that reached routing.
    pub fn state(&self) -> &Arc<RuntimeState> {
        self.state
            .as_ref()
            .expect("state is set in early_request_filter")
    }

    /// Do heads lose their header-case map (`server.preserve_header_case: false`)?
    pub fn drops_header_case(&self) -> bool {
        self.state
            .as_ref()
            .is_some_and(|s| !s.config.server.preserve_header_case)
    }

    /// `Retry-After` seconds for a 503, when known.
    pub fn retry_after(&self) -> Option<u64> {
        let d = match self.unavailable? {
            Unavailable::AllUnhealthy { retry_after } | Unavailable::AllOpen { retry_after } => {
                retry_after
            }
            Unavailable::Overloaded | Unavailable::NoneLeft => Duration::from_secs(1),
        };
        Some(d.as_secs().max(1) + u64::from(d.subsec_nanos() > 0 && d.as_secs() > 0))
    }
}

//! Per-request state carried between the `ProxyHttp` phases.

use std::sync::Arc;

use crate::proxy::client::ClientInfo;
use crate::runtime::RuntimeState;
use crate::upstream::{InFlight, Upstream};

/// What one request has learnt so far. Created empty by `new_ctx`, filled phase by phase.
#[derive(Debug, Default)]
pub struct RequestCtx {
    /// The configuration snapshot this request runs on (taken in `early_request_filter`).
    pub state: Option<Arc<RuntimeState>>,
    /// Request id: the trusted client's, or generated.
    pub request_id: String,
    /// Peer and resolved client.
    pub client: Option<ClientInfo>,
    /// Index of the matched route.
    pub route: Option<usize>,
    /// The route's upstream.
    pub upstream: Option<Arc<Upstream>>,
    /// The path-and-query to send upstream, when it differs from the client's.
    pub forwarded_path: Option<String>,
    /// Original `Host`, for `X-Forwarded-Host`.
    pub host: Option<http::HeaderValue>,
    /// Upstream attempts so far (connects, and Pingora's retries of stale pooled connections).
    pub attempts: usize,
    /// Backends whose connect failed for this request; never offered again to it.
    pub connect_failed: Vec<usize>,
    /// Counts the request against the backend it is on now.
    pub in_flight: Option<InFlight>,
}

impl RequestCtx {
    /// The snapshot; set for every request that reached routing.
    pub fn state(&self) -> &Arc<RuntimeState> {
        self.state
            .as_ref()
            .expect("state is set in early_request_filter")
    }
}

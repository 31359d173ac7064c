//! Prometheus metrics, prefix `tollgate_`, served on the admin listener's `/metrics`.
//!
//! Request metrics are registered once in the default registry (which Pingora's own metrics,
//! if any, share) and recorded in the `logging` phase. Upstream and backend state (health,
//! breaker, in-flight, resilience counters) is read from the live [`RuntimeState`] at scrape
//! time, so it always matches the configuration being served. Label values are bounded: route
//! and upstream names come from the configuration, backends from the member sets, methods from
//! a fixed list (anything else is `OTHER`), statuses by class.

pub mod process;

use std::sync::OnceLock;
use std::sync::atomic::Ordering;
use std::time::Instant;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::proxy::caching::CacheStatus;
use crate::runtime::RuntimeState;
use crate::upstream::breaker::BreakerState;

/// Seconds buckets for request and upstream durations.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Metrics recorded on the request path.
#[derive(Debug)]
pub struct Metrics {
    /// `tollgate_requests_total{route,method,status_class}`.
    pub requests: IntCounterVec,
    /// `tollgate_request_duration_seconds{route}`.
    pub request_duration: HistogramVec,
    /// `tollgate_upstream_duration_seconds{upstream,backend}`: attempt start to response head.
    pub upstream_duration: HistogramVec,
    /// `tollgate_requests_in_flight`.
    pub in_flight: IntGauge,
    /// `tollgate_downstream_connections`: open client connections.
    pub connections: IntGauge,
    /// `tollgate_downstream_connections_total`: accepted client connections.
    pub connections_total: IntCounter,
    /// `tollgate_tunnels_open`: upgraded connections (WebSockets) relayed by the gateway's own
    /// tunnel after the handshake (`wire::tunnel`).
    pub tunnels: IntGauge,
    /// `tollgate_request_bytes_total{route}`: request body bytes received.
    pub bytes_in: IntCounterVec,
    /// `tollgate_response_bytes_total{route}`: response body bytes sent.
    pub bytes_out: IntCounterVec,
    /// `tollgate_config_reloads_total{outcome}`.
    pub reloads: IntCounterVec,
    /// `tollgate_config_last_reload_timestamp_seconds` (successful reloads and start-up).
    pub last_reload: Gauge,
    /// `tollgate_config_last_reload_success` (1 or 0).
    pub last_reload_success: IntGauge,
    /// `tollgate_access_log_dropped_total`: lines dropped because the writer fell behind.
    pub access_log_dropped: IntCounter,
    /// `tollgate_rate_limited_total{route}`: requests answered 429 by a rate limit.
    pub rate_limited: IntCounterVec,
    /// `tollgate_cache_lookups_total{route,result}`: caching routes' requests by what the cache
    /// did (`hit`, `miss`, `expired`, `stale`, `revalidated`, `bypass`).
    pub cache_lookups: IntCounterVec,
    /// `tollgate_rate_limit_backend_errors_total`: Redis failures (request let through or 503).
    pub rate_limit_backend_errors: IntCounter,
    /// `tollgate_protocol_refusals_total{status}`: requests refused by the connection guard
    /// before Pingora parsed them (malformed framing, head limits, the head deadline).
    pub protocol_refusals: IntCounterVec,
    /// `tollgate_connections_refused_total{limit}`: connections closed at accept by
    /// `server.max_connections` (`global`) or `server.max_connections_per_ip` (`per_ip`).
    pub connections_refused: IntCounterVec,
}

/// The process-wide metrics, registered on first use.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let r = prometheus::default_registry();
        let m = Metrics {
            requests: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "tollgate_requests_total",
                        "Requests by route, method and status class.",
                    ),
                    &["route", "method", "status_class"],
                ),
            ),
            request_duration: reg(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "tollgate_request_duration_seconds",
                        "Time from request head to the end of the response, by route.",
                    )
                    .buckets(DURATION_BUCKETS.to_vec()),
                    &["route"],
                ),
            ),
            upstream_duration: reg(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "tollgate_upstream_duration_seconds",
                        "Time from choosing a backend to its response head.",
                    )
                    .buckets(DURATION_BUCKETS.to_vec()),
                    &["upstream", "backend"],
                ),
            ),
            in_flight: reg(
                r,
                IntGauge::new("tollgate_requests_in_flight", "Requests being handled."),
            ),
            connections: reg(
                r,
                IntGauge::new(
                    "tollgate_downstream_connections",
                    "Open client connections.",
                ),
            ),
            connections_total: reg(
                r,
                IntCounter::new(
                    "tollgate_downstream_connections_total",
                    "Client connections accepted.",
                ),
            ),
            tunnels: reg(
                r,
                IntGauge::new(
                    "tollgate_tunnels_open",
                    "Upgraded connections (WebSockets) relayed by the gateway's own tunnel.",
                ),
            ),
            bytes_in: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "tollgate_request_bytes_total",
                        "Request body bytes received from clients, by route.",
                    ),
                    &["route"],
                ),
            ),
            bytes_out: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "tollgate_response_bytes_total",
                        "Response body bytes sent to clients, by route.",
                    ),
                    &["route"],
                ),
            ),
            reloads: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "tollgate_config_reloads_total",
                        "Configuration reloads by outcome.",
                    ),
                    &["outcome"],
                ),
            ),
            last_reload: reg(
                r,
                Gauge::new(
                    "tollgate_config_last_reload_timestamp_seconds",
                    "Unix time the configuration in force was loaded.",
                ),
            ),
            last_reload_success: reg(
                r,
                IntGauge::new(
                    "tollgate_config_last_reload_success",
                    "Whether the last reload attempt succeeded.",
                ),
            ),
            access_log_dropped: reg(
                r,
                IntCounter::new(
                    "tollgate_access_log_dropped_total",
                    "Access log lines dropped because the writer could not keep up.",
                ),
            ),
            rate_limited: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "tollgate_rate_limited_total",
                        "Requests answered 429 by a rate limit, by route.",
                    ),
                    &["route"],
                ),
            ),
            cache_lookups: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "tollgate_cache_lookups_total",
                        "Requests on caching routes by cache result (X-Cache-Status).",
                    ),
                    &["route", "result"],
                ),
            ),
            rate_limit_backend_errors: reg(
                r,
                IntCounter::new(
                    "tollgate_rate_limit_backend_errors_total",
                    "Rate-limit backend (Redis) failures.",
                ),
            ),
            protocol_refusals: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "tollgate_protocol_refusals_total",
                        "Requests refused by the connection guard before parsing, by status.",
                    ),
                    &["status"],
                ),
            ),
            connections_refused: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "tollgate_connections_refused_total",
                        "Connections closed at accept by a connection limit.",
                    ),
                    &["limit"],
                ),
            ),
        };
        // Every label value the guard uses exists from the start (at 0), so rates and alerts
        // see a series before the first refusal.
        for status in [400, 408, 414, 431, 505] {
            m.protocol_refusals
                .with_label_values(&[status_label(status)]);
        }
        for limit in ["global", "per_ip"] {
            m.connections_refused.with_label_values(&[limit]);
        }
        let build = reg(
            r,
            IntGaugeVec::new(
                Opts::new("tollgate_build_info", "Build information; always 1."),
                &["version", "pingora"],
            ),
        );
        build
            .with_label_values(&[env!("CARGO_PKG_VERSION"), "0.9.1"])
            .set(1);
        for outcome in ["success", "failure"] {
            m.reloads.with_label_values(&[outcome]);
        }
        r.register(Box::new(process::ProcessCollector::new()))
            .expect("the process metrics are registered once");
        m
    })
}

fn reg<C: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    c: prometheus::Result<C>,
) -> C {
    let c = c.expect("static metric definitions are valid");
    r.register(Box::new(c.clone()))
        .expect("each metric is registered once");
    c
}

/// The `method` label values: the standard methods, then `OTHER`.
const METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "OTHER",
];

fn method_index(m: &http::Method) -> usize {
    METHODS[..METHODS.len() - 1]
        .iter()
        .position(|&name| name == m.as_str())
        .unwrap_or(METHODS.len() - 1)
}

/// The `method` label: the standard methods, or `OTHER` (client-chosen tokens are unbounded).
pub fn method_label(m: &http::Method) -> &'static str {
    METHODS[method_index(m)]
}

/// A status code as a label value (the codes the connection guard answers; others `other`).
pub fn status_label(status: u16) -> &'static str {
    match status {
        400 => "400",
        408 => "408",
        414 => "414",
        431 => "431",
        505 => "505",
        _ => "other",
    }
}

/// The `status_class` label values, by `status / 100 - 1`; `none` for everything else.
const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

fn status_class_index(status: u16) -> usize {
    match status / 100 {
        c @ 1..=5 => usize::from(c - 1),
        _ => STATUS_CLASSES.len() - 1,
    }
}

/// The `status_class` label: `1xx`…`5xx`, or `none` when no response was sent.
pub fn status_class(status: u16) -> &'static str {
    STATUS_CLASSES[status_class_index(status)]
}

/// Values of the `result` label of `tollgate_cache_lookups_total` a route can record.
pub const CACHE_RESULTS: usize = 6;

/// One route's request metrics, kept with the snapshot. Each series is looked up in its metric
/// vector (hash the labels, take the vector's lock, clone an `Arc`) once, on first use, instead
/// of on every finished request; series still appear in `/metrics` only once recorded.
#[derive(Debug)]
pub struct RouteMetrics {
    /// The `route` label (`none` for requests no route took).
    route: String,
    duration: OnceLock<Histogram>,
    bytes_in: OnceLock<IntCounter>,
    bytes_out: OnceLock<IntCounter>,
    /// `tollgate_requests_total`, by method and status class.
    requests: [[OnceLock<IntCounter>; STATUS_CLASSES.len()]; METHODS.len()],
    /// `tollgate_cache_lookups_total`, by the result's index.
    cache: [OnceLock<IntCounter>; CACHE_RESULTS],
}

impl RouteMetrics {
    /// The metrics of the route labelled `route`.
    pub fn new(route: &str) -> RouteMetrics {
        RouteMetrics {
            route: route.to_string(),
            duration: OnceLock::new(),
            bytes_in: OnceLock::new(),
            bytes_out: OnceLock::new(),
            requests: Default::default(),
            cache: Default::default(),
        }
    }

    /// One finished request.
    pub fn record(
        &self,
        method: &http::Method,
        status: u16,
        seconds: f64,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        let m = metrics();
        let route = self.route.as_str();
        let (mi, ci) = (method_index(method), status_class_index(status));
        self.requests[mi][ci]
            .get_or_init(|| {
                m.requests
                    .with_label_values(&[route, METHODS[mi], STATUS_CLASSES[ci]])
            })
            .inc();
        self.duration
            .get_or_init(|| m.request_duration.with_label_values(&[route]))
            .observe(seconds);
        self.bytes_in
            .get_or_init(|| m.bytes_in.with_label_values(&[route]))
            .inc_by(bytes_in);
        self.bytes_out
            .get_or_init(|| m.bytes_out.with_label_values(&[route]))
            .inc_by(bytes_out);
    }

    /// One cache lookup and what the cache did.
    pub fn cache_lookup(&self, status: CacheStatus) {
        let route = self.route.as_str();
        if let Some(slot) = self.cache.get(status.index()) {
            slot.get_or_init(|| {
                metrics()
                    .cache_lookups
                    .with_label_values(&[route, status.label()])
            })
            .inc();
        }
    }
}

/// The text exposition: the registered metrics plus the live upstream state of `state`.
pub fn render(state: &RuntimeState) -> String {
    metrics(); // registered even before the first request
    let mut families = prometheus::gather();
    families.extend(upstream_families(state));
    families.extend(cache_families());
    families.sort_by(|a, b| a.name().cmp(b.name()));
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&families, &mut out)
        .expect("encoding gathered metrics cannot fail");
    String::from_utf8(out).expect("the text format is UTF-8")
}

fn cache_families() -> Vec<prometheus::proto::MetricFamily> {
    let Some(cache) = crate::cache::get() else {
        return Vec::new();
    };
    let r = Registry::new();
    let (s, purged) = cache.stats();
    let gauge = |name: &str, help: &str, v: usize| {
        reg(&r, IntGauge::new(name, help)).set(v as i64);
    };
    gauge(
        "tollgate_cache_bytes",
        "Bytes the response cache holds (bodies, headers, per-entry overhead).",
        s.bytes,
    );
    gauge(
        "tollgate_cache_max_bytes",
        "The response cache's limit (cache.max_size).",
        cache.max_size(),
    );
    gauge(
        "tollgate_cache_entries",
        "Objects in the response cache.",
        s.entries,
    );
    let counter = |name: &str, help: &str, v: u64| {
        reg(&r, IntCounter::new(name, help)).inc_by(v);
    };
    counter(
        "tollgate_cache_evictions_total",
        "Objects evicted to stay under cache.max_size.",
        s.evictions,
    );
    counter(
        "tollgate_cache_purged_total",
        "Objects removed by the admin purge or by successful unsafe requests.",
        purged,
    );
    r.gather()
}

fn upstream_families(state: &RuntimeState) -> Vec<prometheus::proto::MetricFamily> {
    let r = Registry::new();
    let gauge = |name: &str, help: &str, labels: &[&str]| {
        reg(&r, IntGaugeVec::new(Opts::new(name, help), labels))
    };
    let counter = |name: &str, help: &str, labels: &[&str]| {
        reg(&r, IntCounterVec::new(Opts::new(name, help), labels))
    };
    let healthy = gauge(
        "tollgate_backend_healthy",
        "1 if the backend passes its health checks (or has none).",
        &["upstream", "backend"],
    );
    let breaker = gauge(
        "tollgate_backend_breaker_state",
        "1 for the breaker's current state.",
        &["upstream", "backend", "state"],
    );
    let backend_in_flight = gauge(
        "tollgate_backend_in_flight",
        "Requests in flight to the backend.",
        &["upstream", "backend"],
    );
    let transitions = counter(
        "tollgate_backend_breaker_transitions_total",
        "Breaker state changes, by the state entered.",
        &["upstream", "backend", "to"],
    );
    let backends = gauge(
        "tollgate_upstream_backends",
        "Backends in the upstream's member set.",
        &["upstream"],
    );
    let up_in_flight = gauge(
        "tollgate_upstream_in_flight",
        "Requests in flight to the upstream.",
        &["upstream"],
    );
    let retries = counter(
        "tollgate_retries_total",
        "Requests resent to another backend.",
        &["upstream"],
    );
    let budget = counter(
        "tollgate_retries_budget_exhausted_total",
        "Retries refused by the retry budget.",
        &["upstream"],
    );
    let rejected = counter(
        "tollgate_upstream_rejected_total",
        "Requests answered 503 without trying a backend, by reason.",
        &["upstream", "reason"],
    );
    let health = counter(
        "tollgate_backend_health_transitions_total",
        "Health-check flips, by the state entered.",
        &["upstream", "to"],
    );
    let discovery = counter(
        "tollgate_discovery_failures_total",
        "Failed discovery rounds (the last good set was kept).",
        &["upstream"],
    );
    let now = Instant::now();
    for u in &state.upstreams {
        let name = u.name.as_str();
        let members = u.members();
        backends
            .with_label_values(&[name])
            .set(members.backends.len() as i64);
        up_in_flight
            .with_label_values(&[name])
            .set(u.in_flight() as i64);
        let s = &u.stats;
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        retries.with_label_values(&[name]).inc_by(get(&s.retries));
        budget
            .with_label_values(&[name])
            .inc_by(get(&s.retries_refused_by_budget));
        for (reason, c) in [
            ("breaker_open", &s.rejected_breaker_open),
            ("unhealthy", &s.rejected_unhealthy),
            ("in_flight_limit", &s.rejected_in_flight),
        ] {
            rejected.with_label_values(&[name, reason]).inc_by(get(c));
        }
        health
            .with_label_values(&[name, "healthy"])
            .inc_by(get(&s.health_up));
        health
            .with_label_values(&[name, "unhealthy"])
            .inc_by(get(&s.health_down));
        discovery
            .with_label_values(&[name])
            .inc_by(get(&s.discovery_failures));
        for b in &members.backends {
            let addr = b.label();
            let l = [name, addr];
            healthy.with_label_values(&l).set(i64::from(b.is_healthy()));
            backend_in_flight
                .with_label_values(&l)
                .set(b.in_flight() as i64);
            let current = b.breaker_state(now);
            for st in [
                BreakerState::Closed,
                BreakerState::Open,
                BreakerState::HalfOpen,
            ] {
                breaker
                    .with_label_values(&[name, addr, st.as_str()])
                    .set(i64::from(st == current));
                transitions
                    .with_label_values(&[name, addr, st.as_str()])
                    .inc_by(b.transitions(st));
            }
        }
    }
    r.gather()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded() {
        assert_eq!(method_label(&http::Method::GET), "GET");
        assert_eq!(
            method_label(&http::Method::from_bytes(b"BREW").unwrap()),
            "OTHER"
        );
        assert_eq!(method_label(&http::Method::TRACE), "TRACE");
        assert_eq!(status_class(204), "2xx");
        assert_eq!(status_class(100), "1xx");
        assert_eq!(status_class(599), "5xx");
        assert_eq!(status_class(0), "none");
        assert_eq!(status_class(99), "none");
        assert_eq!(status_class(600), "none");
    }

    fn series(name: &str, route: &str) -> Vec<(Vec<(String, String)>, f64)> {
        prometheus::gather()
            .into_iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric().to_vec())
            .filter(|m| m.get_label().iter().any(|l| l.value() == route))
            .map(|m| {
                let labels = m
                    .get_label()
                    .iter()
                    .map(|l| (l.name().to_string(), l.value().to_string()))
                    .collect();
                let v = if m.get_counter().has_value() {
                    m.get_counter().value()
                } else {
                    m.get_histogram().get_sample_count() as f64
                };
                (labels, v)
            })
            .collect()
    }

    /// A route's handles count into the very series the vectors hold, and make none before
    /// they are used.
    #[test]
    fn route_metrics_record_into_the_labelled_series() {
        let route = "route-metrics-test";
        let rm = RouteMetrics::new(route);
        assert!(series("tollgate_requests_total", route).is_empty());
        assert!(series("tollgate_request_duration_seconds", route).is_empty());
        rm.record(&http::Method::GET, 200, 0.01, 3, 1024);
        rm.record(&http::Method::GET, 204, 0.01, 0, 0);
        rm.record(&http::Method::from_bytes(b"BREW").unwrap(), 0, 0.5, 0, 0);
        rm.cache_lookup(CacheStatus::Hit);
        let m = metrics();
        assert_eq!(
            m.requests.with_label_values(&[route, "GET", "2xx"]).get(),
            2
        );
        assert_eq!(
            m.requests
                .with_label_values(&[route, "OTHER", "none"])
                .get(),
            1
        );
        assert_eq!(m.bytes_in.with_label_values(&[route]).get(), 3);
        assert_eq!(m.bytes_out.with_label_values(&[route]).get(), 1024);
        let d = m.request_duration.with_label_values(&[route]);
        assert_eq!(d.get_sample_count(), 3);
        assert!((d.get_sample_sum() - 0.52).abs() < 1e-9);
        assert_eq!(m.cache_lookups.with_label_values(&[route, "hit"]).get(), 1);
        // A second snapshot's handles for the same route continue the same series.
        RouteMetrics::new(route).record(&http::Method::GET, 200, 0.0, 0, 0);
        assert_eq!(
            m.requests.with_label_values(&[route, "GET", "2xx"]).get(),
            3
        );
        assert_eq!(series("tollgate_requests_total", route).len(), 2);
    }
}

//! Configuration: the YAML file schema ([`mod@file`]), its validation (`validate`) into the runtime
//! model defined here, and located errors ([`error`]).
//!
//! ```text
//! YAML ──serde (deny_unknown_fields)──► FileConfig ──validate──► Config ──► RuntimeState
//!        line/column errors                     path/value errors, all of them at once
//! ```

pub mod error;
pub mod file;
mod validate;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use regex::Regex;

use crate::filters::{Filter, FilterRegistry};
pub use crate::upstream::breaker::BreakerSettings;
pub use error::{ConfigError, ConfigErrors};
pub use file::{
    AccessLogFormat, Balance, FailureKind, HealthCheckKind, Readiness, UnderscoreHeaders,
    UpstreamProtocol,
};
pub use validate::{MAX_POOL_SIZE, MAX_RETRIES, MAX_WEIGHT, writable_log};

/// One client-facing listener.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Address to bind.
    pub address: SocketAddr,
    /// Bytes of read buffer per client connection.
    pub read_buffer: usize,
    /// Accept HTTP/2 with prior knowledge (plain listeners).
    pub h2c: bool,
    /// TLS termination.
    pub tls: Option<ListenerTls>,
}

impl ListenerConfig {
    /// What only a restart (or binary upgrade) can change: everything but the certificates.
    pub fn socket_settings(&self) -> (SocketAddr, usize, bool, Option<bool>) {
        (
            self.address,
            self.read_buffer,
            self.h2c,
            self.tls.as_ref().map(|t| t.http2),
        )
    }
}

impl Config {
    /// Files besides the configuration file itself that a reload reads again: listener
    /// certificates and keys, upstream CA bundles and client certificates, the admin token file.
    pub fn watched_files(&self) -> Vec<&str> {
        let listeners = self
            .listeners
            .iter()
            .filter_map(|l| l.tls.as_ref())
            .flat_map(|t| t.store.summary.iter())
            .flat_map(|s| [s.cert.as_str(), s.key.as_str()]);
        let upstreams = self
            .upstreams
            .iter()
            .filter_map(|u| u.tls.as_ref())
            .flat_map(|t| [&t.ca_file, &t.client_cert, &t.client_key])
            .filter_map(|f| f.as_deref());
        let admin = self.admin.iter().filter_map(|a| a.token_file.as_deref());
        listeners.chain(upstreams).chain(admin).collect()
    }
}

/// A listener's TLS, its certificates loaded.
#[derive(Debug, Clone)]
pub struct ListenerTls {
    /// Certificates by SNI; reloads swap a new store into the listener's resolver.
    pub store: Arc<crate::tls::CertStore>,
    /// Offer HTTP/2 through ALPN.
    pub http2: bool,
}

/// `server.http2` after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Http2Settings {
    /// SETTINGS_MAX_CONCURRENT_STREAMS.
    pub max_concurrent_streams: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE.
    pub max_header_list_size: u32,
    /// Client resets of unseen streams before GOAWAY.
    pub max_pending_reset_streams: usize,
    /// Streams reset for protocol errors before GOAWAY.
    pub max_local_error_reset_streams: usize,
    /// Per-stream window.
    pub initial_window_size: u32,
    /// Idle connection timeout.
    pub idle_timeout: Duration,
}

/// A validated configuration: every name resolved, every value parsed.
#[derive(Debug, Clone)]
pub struct Config {
    /// Process settings.
    pub server: ServerSettings,
    /// Client-facing listeners.
    pub listeners: Vec<ListenerConfig>,
    /// Admin listener, if any.
    pub admin: Option<AdminConfig>,
    /// Access log, if on.
    pub access_log: Option<AccessLogConfig>,
    /// Peers whose forwarding headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Upstream groups, sorted by name.
    pub upstreams: Vec<UpstreamConfig>,
    /// Routes in file order.
    pub routes: Vec<RouteConfig>,
    /// Filters run on every request.
    pub filters: Vec<Arc<dyn Filter>>,
    /// Their configuration as written, secrets redacted (for `GET /config`).
    pub filter_specs: Vec<serde_json::Value>,
    /// The shared response cache storage.
    pub cache: CacheConfig,
}

/// `cache:` (top level) after validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// Most bytes stored.
    pub max_size: usize,
    /// How long concurrent misses wait for the first.
    pub lock_timeout: Duration,
}

/// A route's `cache:` after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteCache {
    /// Freshness when the origin gives none.
    pub ttl: Duration,
    /// Statuses that may be stored.
    pub statuses: Vec<u16>,
    /// Largest body stored.
    pub max_object_size: usize,
    /// Request headers in the key (lower case).
    pub key_headers: Vec<http::HeaderName>,
    /// Store responses with `Set-Cookie`.
    pub allow_set_cookie: bool,
    /// Default stale-while-revalidate, seconds.
    pub stale_while_revalidate: u32,
    /// Default stale-if-error, seconds.
    pub stale_if_error: u32,
}

/// `admin:` after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Address.
    pub address: SocketAddr,
    /// Bearer token, if required.
    pub token: Option<String>,
    /// The file the token was read from (watched by `reload_on_change`).
    pub token_file: Option<String>,
    /// What `/health/ready` reports on.
    pub readiness: Readiness,
}

/// `access_log:` after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogConfig {
    /// Line format.
    pub format: AccessLogFormat,
    /// `stdout`, `stderr` or a file path.
    pub path: String,
}

/// `server:` after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// Worker threads.
    pub threads: usize,
    /// Work stealing between the worker threads (Pingora's `work_stealing`).
    pub work_stealing: bool,
    /// Serve in-flight requests this long after a graceful signal.
    pub grace_period: Duration,
    /// Then wait this long for the runtimes to stop.
    pub graceful_shutdown_timeout: Duration,
    /// Pid file path.
    pub pid_file: String,
    /// Upgrade socket path.
    pub upgrade_sock: String,
    /// Shared upstream keep-alive pool size (per thread).
    pub upstream_keepalive_pool_size: usize,
    /// Idle downstream keep-alive timeout.
    pub downstream_keepalive_timeout: Duration,
    /// Log level filter.
    pub log_level: String,
    /// Downstream HTTP/2 limits.
    pub http2: Http2Settings,
    /// Poll the configuration's files and reload on a change.
    pub reload_on_change: Option<Duration>,
    /// Request head limits (414/431).
    pub head: HeadLimits,
    /// Header fields with `_` in their name.
    pub underscore_headers: UnderscoreHeaders,
    /// Keep HTTP/1 header names' case (`proxy::header_case`).
    pub preserve_header_case: bool,
    /// Client connection caps and timeouts.
    pub connections: ConnectionLimits,
    /// The settings above that have a derived default, as written (`None`: not written).
    pub written: WrittenServer,
}

/// The `server:` settings whose defaults are derived (from the host's CPUs, from the sum of
/// the upstreams' pools), as the file gave them: a reload compares these, so that adding an
/// upstream or a changed CPU quota is not taken for a changed setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WrittenServer {
    /// `server.threads`.
    pub threads: Option<usize>,
    /// `server.work_stealing`.
    pub work_stealing: Option<bool>,
    /// `server.upstream_keepalive_pool_size`.
    pub upstream_keepalive_pool_size: Option<usize>,
}

/// Client connection caps and timeouts (`server.max_connections…`, `…_timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Time for a request head to arrive (408 after).
    pub request_head_timeout: Duration,
    /// Longest silence inside a request body.
    pub body_idle_timeout: Duration,
    /// Longest a client may take nothing written to it (over HTTP/1 a progress timer in the
    /// connection guard; over HTTP/2 Pingora's per-write timeout).
    pub send_timeout: Duration,
    /// Slowest request body in bytes per second after `body_idle_timeout` of waiting in all
    /// (0: no floor).
    pub min_body_rate: u64,
    /// Most open connections; `None`: from the file-descriptor limit.
    pub max: Option<usize>,
    /// Most open connections from one address.
    pub max_per_ip: usize,
}

/// Request head limits, checked before routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLimits {
    /// Request line bytes (414 above).
    pub max_request_line: usize,
    /// Header section bytes (431 above).
    pub max_header_size: usize,
    /// Header fields (431 above).
    pub max_header_count: usize,
}

/// One upstream group after validation.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// Its name (the key under `upstreams:`).
    pub name: String,
    /// Balancing algorithm.
    pub balance: Balance,
    /// Hash key, for `consistent_hash`.
    pub hash_key: Option<HashKey>,
    /// Backends, in file order.
    pub backends: Vec<BackendConfig>,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Per-read timeout.
    pub read_timeout: Duration,
    /// Per-write timeout.
    pub write_timeout: Duration,
    /// Pooled idle connection lifetime.
    pub idle_timeout: Duration,
    /// Idle connections kept; 0 disables reuse.
    pub pool_size: usize,
    /// Retry policy.
    pub retry: RetryPolicy,
    /// Breaker thresholds; `None` when the breaker is disabled.
    pub breaker: Option<BreakerSettings>,
    /// What counts as a failed request (for the breaker).
    pub failure: FailurePolicy,
    /// In-flight cap for the whole upstream; 0 = none.
    pub max_in_flight: usize,
    /// Active health checking.
    pub health: Option<HealthCheck>,
    /// Dynamic backends.
    pub discovery: Option<Discovery>,
    /// TLS to the backends.
    pub tls: Option<crate::tls::UpstreamTls>,
    /// HTTP version to the backends.
    pub protocol: UpstreamProtocol,
    /// Streams per HTTP/2 connection.
    pub h2_max_streams: usize,
}

/// `retries:` after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Further attempts after the first.
    pub attempts: usize,
    /// Errors retried.
    pub on: Vec<FailureKind>,
    /// Statuses retried.
    pub statuses: Vec<u16>,
    /// Retry non-idempotent methods too.
    pub all_methods: bool,
    /// Retry budget as a percentage of requests.
    pub budget_percent: u8,
    /// Backoff base.
    pub backoff: Duration,
}

/// What counts as a failure for the breaker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailurePolicy {
    /// Error kinds that count.
    pub on: Vec<FailureKind>,
    /// Statuses that count.
    pub statuses: Vec<u16>,
    /// Response heads slower than this count.
    pub slow_call: Option<Duration>,
}

/// `health_check:` after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// HTTP or TCP.
    pub kind: HealthCheckKind,
    /// Path for HTTP checks.
    pub path: String,
    /// Host header for HTTP checks (default: the backend address).
    pub host: Option<String>,
    /// Passing statuses; empty = 200–399.
    pub statuses: Vec<u16>,
    /// Time between checks.
    pub interval: Duration,
    /// Time allowed per check.
    pub timeout: Duration,
    /// Passes in a row to become healthy.
    pub healthy: u32,
    /// Failures in a row to become unhealthy.
    pub unhealthy: u32,
    /// Route to unhealthy backends when none is healthy.
    pub fail_open: bool,
}

/// `discovery:` after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    /// DNS A/AAAA.
    Dns {
        /// Name to resolve.
        name: String,
        /// Backend port.
        port: u16,
        /// Re-resolve interval.
        refresh: Duration,
        /// Resolvers; empty = system.
        nameservers: Vec<SocketAddr>,
    },
    /// ZooKeeper children.
    Zookeeper {
        /// Connect string (`host:port,host:port`).
        servers: String,
        /// Parent znode.
        path: String,
        /// Session timeout.
        session_timeout: Duration,
    },
}

/// One backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// Address.
    pub addr: SocketAddr,
    /// Relative weight (≥ 1).
    pub weight: u32,
}

/// What `consistent_hash` hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// The client address (after trusted-proxy resolution).
    ClientIp,
    /// The request path (without query).
    Path,
    /// A request header's value.
    Header(http::HeaderName),
    /// A cookie's value.
    Cookie(String),
    /// A query parameter's value.
    Query(String),
}

/// One route after validation.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Unique name.
    pub name: String,
    /// Host patterns (lower case); empty = any host.
    pub hosts: Vec<HostPattern>,
    /// Path condition.
    pub path: PathMatch,
    /// Allowed methods; empty = any.
    pub methods: Vec<http::Method>,
    /// Index into [`Config::upstreams`].
    pub upstream: usize,
    /// Strip the `path_prefix` before forwarding.
    pub strip_prefix: bool,
    /// Regex rewrite of the forwarded path.
    pub rewrite: Option<(Regex, String)>,
    /// Host header to send upstream instead of the client's.
    pub upstream_host: Option<http::HeaderValue>,
    /// The route's filters, in order.
    pub filters: Vec<Arc<dyn Filter>>,
    /// Their configuration as written, secrets redacted (for `GET /config`).
    pub filter_specs: Vec<serde_json::Value>,
    /// Response caching, if on.
    pub cache: Option<RouteCache>,
}

/// A host condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// `api.example.com`.
    Exact(String),
    /// `*.example.com`: stores `.example.com`.
    Suffix(String),
}

/// A path condition.
#[derive(Debug, Clone)]
pub enum PathMatch {
    /// Any path.
    Any,
    /// Exactly this path.
    Exact(String),
    /// This prefix, on a segment boundary.
    Prefix(String),
    /// Paths this regex matches.
    Regex(Regex),
}

impl Config {
    /// Parse and validate YAML text with the built-in filter kinds. `source` names the file in
    /// error messages.
    pub fn from_yaml(text: &str, source: &str) -> Result<Config, ConfigErrors> {
        Config::from_yaml_with(text, source, &FilterRegistry::new())
    }

    /// Parse and validate YAML text; filter kinds come from `filters`.
    pub fn from_yaml_with(
        text: &str,
        source: &str,
        filters: &FilterRegistry,
    ) -> Result<Config, ConfigErrors> {
        let file: file::FileConfig = serde_saphyr::from_str(text).map_err(|e| ConfigErrors {
            source: source.to_string(),
            errors: vec![ConfigError::new("", e.to_string())],
        })?;
        validate::validate(file, filters).map_err(|errors| ConfigErrors {
            source: source.to_string(),
            errors,
        })
    }

    /// Read, parse and validate a file with the built-in filter kinds.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        Config::load_with(path, &FilterRegistry::new())
    }

    /// Read, parse and validate a file; filter kinds come from `filters`.
    pub fn load_with(path: &Path, filters: &FilterRegistry) -> Result<Config, ConfigErrors> {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
            source: source.clone(),
            errors: vec![ConfigError::new("", format!("cannot read the file: {e}"))],
        })?;
        Config::from_yaml_with(&text, &source, filters)
    }

    /// The upstream named `name`.
    pub fn upstream(&self, name: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|u| u.name == name)
    }
}

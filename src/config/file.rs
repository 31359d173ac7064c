//! The file schema: what the YAML file may contain, exactly as written.
//!
//! Every struct here is `deny_unknown_fields`, so a misspelt key is an error with its line and
//! column. Defaults live in named functions so `docs/configuration.md` can point at them. Nothing
//! here is checked beyond its type: `validate` turns a [`FileConfig`] into the runtime
//! [`super::Config`] and reports every problem with its path.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// The whole configuration file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Process-wide settings (threads, shutdown timing, pid file, upgrade socket).
    #[serde(default)]
    pub server: ServerSection,
    /// Where the gateway accepts client traffic. At least one.
    #[serde(default)]
    pub listeners: Vec<ListenerSection>,
    /// The admin listener (health, readiness). Optional.
    #[serde(default)]
    pub admin: Option<AdminSection>,
    /// CIDRs whose `X-Forwarded-For` / `X-Request-Id` are believed. Default: none.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Named groups of backends.
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamSection>,
    /// Routes, matched most-specific first (see `docs/routing.md`).
    #[serde(default)]
    pub routes: Vec<RouteSection>,
    /// One line per request. Default: off.
    #[serde(default)]
    pub access_log: Option<AccessLogSection>,
    /// Filters run on every request, before the route's own. Default: none.
    #[serde(default)]
    pub filters: Vec<serde_json::Value>,
    /// The shared response cache storage (routes opt in with their own `cache:`).
    #[serde(default)]
    pub cache: CacheSection,
}

/// `cache:` at the top level: the one in-memory storage every caching route shares.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSection {
    /// Most bytes stored (bodies, headers and per-entry overhead). Default 256MiB.
    #[serde(deserialize_with = "de_size")]
    pub max_size: u64,
    /// How long concurrent misses for one key wait for the first to fill it. Default 5s.
    #[serde(deserialize_with = "de_duration")]
    pub lock_timeout: Duration,
}

impl Default for CacheSection {
    fn default() -> Self {
        CacheSection {
            max_size: 256 << 20,
            lock_timeout: Duration::from_secs(5),
        }
    }
}

/// `cache:` on a route: what of its responses are stored.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteCacheSection {
    /// Freshness when the origin gives none (no max-age, s-maxage or Expires). Default 300s.
    #[serde(deserialize_with = "de_duration")]
    pub ttl: Duration,
    /// Statuses that may be stored. Default 200, 301, 302.
    pub statuses: Vec<u16>,
    /// Largest body stored; larger responses pass through uncached. Default 1MiB.
    #[serde(deserialize_with = "de_size")]
    pub max_object_size: u64,
    /// Request headers whose values are part of the key (beyond the origin's `Vary`).
    pub key_headers: Vec<String>,
    /// Store responses that carry `Set-Cookie`. Default false.
    pub allow_set_cookie: bool,
    /// Serve a stale copy while refreshing it, when the origin does not say. Default 0s.
    #[serde(deserialize_with = "de_duration")]
    pub stale_while_revalidate: Duration,
    /// Serve a stale copy when the upstream fails, when the origin does not say. Default 0s.
    #[serde(deserialize_with = "de_duration")]
    pub stale_if_error: Duration,
}

impl Default for RouteCacheSection {
    fn default() -> Self {
        RouteCacheSection {
            ttl: Duration::from_secs(300),
            statuses: vec![200, 301, 302],
            max_object_size: 1 << 20,
            key_headers: Vec::new(),
            allow_set_cookie: false,
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
        }
    }
}

/// `access_log:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogSection {
    /// `json` (default) or `text`.
    #[serde(default)]
    pub format: AccessLogFormat,
    /// `stdout` (default), `stderr`, or a file path (appended to).
    #[serde(default = "default_access_log_path")]
    pub path: String,
}

fn default_access_log_path() -> String {
    "stdout".into()
}

/// Access log line formats.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum AccessLogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// `key=value` pairs, space separated.
    Text,
}

/// `server:`: Pingora's own server settings plus tollgate's process settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Worker threads. Default: the CPUs this process may use.
    pub threads: Option<usize>,
    /// Let idle worker threads take queued work from busy ones (tokio's multi-thread
    /// scheduler) instead of one single-threaded runtime per thread, each keeping the
    /// connections it was handed. Default: on with more than one thread.
    pub work_stealing: Option<bool>,
    /// After SIGTERM/SIGQUIT, keep serving in-flight requests this long. Default 10s.
    #[serde(deserialize_with = "de_duration")]
    pub grace_period: Duration,
    /// Then wait at most this long for the runtimes to stop. Default 10s.
    #[serde(deserialize_with = "de_duration")]
    pub graceful_shutdown_timeout: Duration,
    /// Pid file. Default `/tmp/tollgate.pid`.
    pub pid_file: String,
    /// Unix socket used to hand listening sockets to a new binary. Default `/tmp/tollgate_upgrade.sock`.
    pub upgrade_sock: String,
    /// Size of the shared upstream keep-alive pool (per thread). Default: the sum of every
    /// upstream's `keepalive.pool_size`.
    pub upstream_keepalive_pool_size: Option<usize>,
    /// Close idle downstream keep-alive connections after this long. Default 60s.
    #[serde(deserialize_with = "de_duration")]
    pub downstream_keepalive_timeout: Duration,
    /// Log level (`error`, `warn`, `info`, `debug`, `trace`); `RUST_LOG` overrides. Default info.
    pub log_level: String,
    /// Downstream HTTP/2 limits.
    pub http2: Http2Section,
    /// Check the configuration file and the TLS files it names this often, and reload when one
    /// changed (a Kubernetes ConfigMap or Secret update). Default: off.
    #[serde(deserialize_with = "de_opt_duration")]
    pub reload_on_change: Option<Duration>,
    /// Longest request line (method, target, version) before 414. Default 8KiB.
    #[serde(deserialize_with = "de_size")]
    pub max_request_line: u64,
    /// Largest header section (names and values) before 431. Default 64KiB.
    #[serde(deserialize_with = "de_size")]
    pub max_header_size: u64,
    /// Most header fields before 431. Default 100.
    pub max_header_count: usize,
    /// Header fields with `_` in their name. Default `drop`.
    pub underscore_headers: UnderscoreHeaders,
    /// Send HTTP/1 header names in the case each peer wrote them, instead of lower-case.
    /// Default false.
    pub preserve_header_case: bool,
    /// A request head (request line and fields) must arrive within this long of its first
    /// byte (of the connection, for its first request), else 408 and close. Default 15s.
    #[serde(deserialize_with = "de_duration")]
    pub request_head_timeout: Duration,
    /// Close a request whose body sends nothing for this long. Default 60s.
    #[serde(deserialize_with = "de_duration")]
    pub body_idle_timeout: Duration,
    /// A client that takes nothing written to it for this long (it stopped reading) fails the
    /// write: the request ends and the connection closes. Default 120s.
    #[serde(deserialize_with = "de_duration")]
    pub send_timeout: Duration,
    /// Slowest HTTP/1 request body, in bytes per second: the client may keep the gateway
    /// waiting for body bytes `body_idle_timeout` in all, plus one second per this many bytes
    /// it sent (else 408). 0 turns it off. Default 500.
    #[serde(deserialize_with = "de_size")]
    pub min_body_rate: u64,
    /// Most open client connections; more are answered 503 and closed. Default: half the
    /// process's file-descriptor limit, less 256.
    pub max_connections: Option<usize>,
    /// Most open client connections from one address (`trusted_proxies` are exempt).
    /// Default 4096.
    pub max_connections_per_ip: usize,
}

/// `server.underscore_headers`.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum UnderscoreHeaders {
    /// Remove them before anything sees the request.
    #[default]
    Drop,
    /// Forward them.
    Keep,
    /// Answer 400.
    Reject,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            threads: None,
            work_stealing: None,
            grace_period: DEFAULT_GRACE_PERIOD,
            graceful_shutdown_timeout: DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT,
            pid_file: "/tmp/tollgate.pid".into(),
            upgrade_sock: "/tmp/tollgate_upgrade.sock".into(),
            upstream_keepalive_pool_size: None,
            downstream_keepalive_timeout: DEFAULT_DOWNSTREAM_KEEPALIVE,
            log_level: "info".into(),
            http2: Http2Section::default(),
            reload_on_change: None,
            max_request_line: 8 << 10,
            max_header_size: 64 << 10,
            max_header_count: 100,
            underscore_headers: UnderscoreHeaders::Drop,
            preserve_header_case: false,
            request_head_timeout: Duration::from_secs(15),
            body_idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(120),
            min_body_rate: 500,
            max_connections: None,
            max_connections_per_ip: 4096,
        }
    }
}

/// Default `server.grace_period`: short enough for Kubernetes' 30 s termination grace.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(10);
/// Default `server.graceful_shutdown_timeout`.
pub const DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `server.downstream_keepalive_timeout`.
pub const DEFAULT_DOWNSTREAM_KEEPALIVE: Duration = Duration::from_secs(60);

/// One entry of `listeners:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSection {
    /// `IP:port` to bind.
    pub address: String,
    /// Read buffer per client connection. Default [`DEFAULT_READ_BUFFER`].
    #[serde(default, deserialize_with = "de_opt_size")]
    pub read_buffer: Option<u64>,
    /// Terminate TLS on this listener.
    #[serde(default)]
    pub tls: Option<ListenerTlsSection>,
    /// Also accept HTTP/2 with prior knowledge (plain listeners). Default false.
    #[serde(default)]
    pub h2c: bool,
}

/// `listeners[].tls:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsSection {
    /// Certificates, chosen by SNI; the first is the default.
    pub certificates: Vec<CertificateSection>,
    /// What a handshake naming no configured certificate gets. Default `default`.
    #[serde(default)]
    pub unknown_sni: UnknownSni,
    /// Offer HTTP/2 through ALPN. Default true.
    #[serde(default = "yes")]
    pub http2: bool,
}

fn yes() -> bool {
    true
}

/// `listeners[].tls.certificates[]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateSection {
    /// PEM certificate chain, leaf first.
    pub cert: String,
    /// PEM private key.
    pub key: String,
    /// Names to serve it for. Default: the certificate's DNS subject alternative names.
    #[serde(default)]
    pub names: Option<Vec<String>>,
}

/// `listeners[].tls.unknown_sni`.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum UnknownSni {
    /// Serve the first certificate.
    #[default]
    Default,
    /// Fail the handshake.
    Reject,
}

/// `server.http2:`: limits on downstream HTTP/2 connections.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Http2Section {
    /// Streams one connection may have open at once. Default 100.
    pub max_concurrent_streams: u32,
    /// Largest header list a client may send. Default 64KiB.
    #[serde(deserialize_with = "de_size")]
    pub max_header_list_size: u64,
    /// Streams reset by the client before the gateway saw them, before GOAWAY. Default 20.
    pub max_pending_reset_streams: usize,
    /// Streams the gateway reset for protocol errors, before GOAWAY. Default 1024.
    pub max_local_error_reset_streams: usize,
    /// Per-stream flow-control window. Default 1MiB.
    #[serde(deserialize_with = "de_size")]
    pub initial_window_size: u64,
    /// Close a connection with no open stream after this long. Default 5m.
    #[serde(deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
}

impl Default for Http2Section {
    fn default() -> Self {
        Http2Section {
            max_concurrent_streams: 100,
            max_header_list_size: 64 << 10,
            max_pending_reset_streams: 20,
            max_local_error_reset_streams: 1024,
            initial_window_size: 1 << 20,
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// Default `listeners[].read_buffer`: 1 KiB. Pingora's own is 64 KiB, allocated zeroed, so
/// resident for as long as a connection is open. The connection guard reads 4 KiB at a time
/// and bodies are read into Pingora's 64 KiB buffers, both of which bypass a smaller buffer:
/// 1 KiB costs no CPU and ~15 KiB less per connection than 16 KiB (docs/performance.md).
pub const DEFAULT_READ_BUFFER: u64 = 1 << 10;

/// `admin:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// `IP:port` to bind. Default `127.0.0.1:9901`.
    #[serde(default = "default_admin_address")]
    pub address: String,
    /// Bearer token required by every endpoint but `/health` and `/health/ready`.
    #[serde(default)]
    pub token: Option<String>,
    /// Read the token from this file instead (trailing newline ignored).
    #[serde(default)]
    pub token_file: Option<String>,
    /// Allow a non-loopback address without a token. Default false.
    #[serde(default)]
    pub allow_insecure: bool,
    /// What `/health/ready` answers for. Default `process`.
    #[serde(default)]
    pub readiness: Readiness,
}

/// What `/health/ready` reports on (`admin.readiness`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Readiness {
    /// The process: ready unless it is shutting down. Upstream trouble is for metrics and
    /// `/upstreams`: every replica sees the same backends, and taking them all out of a load
    /// balancer at once would turn one failed upstream into an outage of every route.
    #[default]
    Process,
    /// The process, and every upstream has a backend (and a healthy one, unless health checks
    /// fail open).
    Upstreams,
}

fn default_admin_address() -> String {
    "127.0.0.1:9901".into()
}

/// One entry of `upstreams:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    /// Balancing algorithm. Default `round_robin`.
    #[serde(default)]
    pub balance: Balance,
    /// Key for `consistent_hash`. Default `client_ip` when the balancer hashes.
    #[serde(default)]
    pub hash_key: Option<String>,
    /// Static backends.
    #[serde(default)]
    pub backends: Vec<BackendSection>,
    /// Connection timeouts.
    #[serde(default)]
    pub timeouts: TimeoutsSection,
    /// Connection reuse.
    #[serde(default)]
    pub keepalive: KeepaliveSection,
    /// Failover.
    #[serde(default)]
    pub retries: RetriesSection,
    /// Active health checks. Default: none (every backend counts as healthy).
    #[serde(default)]
    pub health_check: Option<HealthCheckSection>,
    /// Per-backend circuit breakers and the in-flight cap. On by default.
    #[serde(default)]
    pub circuit_breaker: BreakerSection,
    /// Where backends come from besides `backends`.
    #[serde(default)]
    pub discovery: Option<DiscoverySection>,
    /// TLS to the backends. Default: plain TCP.
    #[serde(default)]
    pub tls: Option<UpstreamTlsSection>,
    /// HTTP version towards the backends. Default `http1`.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// Concurrent streams per HTTP/2 connection to a backend. Default 100.
    #[serde(default = "default_h2_streams")]
    pub h2_max_streams: usize,
}

fn default_h2_streams() -> usize {
    100
}

/// `upstreams.NAME.tls:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsSection {
    /// Server name sent (SNI) and verified. Default: the discovery name, else the backend IP.
    #[serde(default)]
    pub sni: Option<String>,
    /// Verify the backend's certificate chain. Default true.
    #[serde(default = "yes")]
    pub verify: bool,
    /// Verify the backend's name. Default true.
    #[serde(default = "yes")]
    pub verify_hostname: bool,
    /// PEM file of the roots to trust instead of the system's.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// PEM client certificate chain (mTLS), with `client_key`.
    #[serde(default)]
    pub client_cert: Option<String>,
    /// PEM client private key.
    #[serde(default)]
    pub client_key: Option<String>,
}

/// `upstreams.NAME.protocol`.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1.
    #[default]
    Http1,
    /// HTTP/2 only: ALPN h2 over TLS, prior knowledge (h2c) without.
    Http2,
    /// ALPN h2, falling back to http/1.1 (TLS only).
    Auto,
}

/// Kinds of upstream failure (`retries.on`, `circuit_breaker.failure_on`).
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The TCP connect failed or timed out.
    ConnectError,
    /// Connected, then a read or write timed out.
    Timeout,
    /// Connected, then the connection broke (reset, closed early, malformed response).
    Reset,
}

/// `circuit_breaker:` on an upstream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerSection {
    /// Turn the outcome breaker off (the in-flight cap still applies). Default true.
    pub enabled: bool,
    /// Open after this many failures in a row; 0 disables the rule. Default 5.
    pub consecutive_failures: u32,
    /// Open at this failure percentage over `window`; 0 disables the rule. Default 50.
    pub failure_rate: u8,
    /// The rate rule needs this many requests in the window. Default 20.
    pub min_requests: u32,
    /// Sliding window for the rate rule. Default 10s.
    #[serde(deserialize_with = "de_duration")]
    pub window: Duration,
    /// First open period; doubles on each repeated trip. Default 10s.
    #[serde(deserialize_with = "de_duration")]
    pub open_for: Duration,
    /// Cap on the open period. Default 5m.
    #[serde(deserialize_with = "de_duration")]
    pub max_open_for: Duration,
    /// Probes admitted in half-open; this many must succeed to close. Default 3.
    pub half_open_requests: u32,
    /// Requests in flight to the whole upstream beyond which new ones get 503. Default 1024;
    /// 0 disables the cap.
    pub max_in_flight: usize,
    /// Which errors count as failures. Default [connect_error, timeout, reset].
    pub failure_on: Vec<FailureKind>,
    /// Response statuses that count as failures. Default [502, 503, 504].
    pub failure_statuses: Vec<u16>,
    /// A response head slower than this counts as a failure. Default: off.
    #[serde(deserialize_with = "de_opt_duration")]
    pub slow_call: Option<Duration>,
}

impl Default for BreakerSection {
    fn default() -> Self {
        BreakerSection {
            enabled: true,
            consecutive_failures: 5,
            failure_rate: 50,
            min_requests: 20,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(10),
            max_open_for: Duration::from_secs(300),
            half_open_requests: 3,
            max_in_flight: 1024,
            failure_on: vec![
                FailureKind::ConnectError,
                FailureKind::Timeout,
                FailureKind::Reset,
            ],
            failure_statuses: vec![502, 503, 504],
            slow_call: None,
        }
    }
}

/// `health_check:` on an upstream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSection {
    /// `http` or `tcp`.
    pub kind: HealthCheckKind,
    /// Path requested by `http` checks. Default `/`.
    #[serde(default = "default_health_path")]
    pub path: String,
    /// Host header of `http` checks. Default: the backend address.
    #[serde(default)]
    pub host: Option<String>,
    /// Statuses that pass. Default: any 2xx or 3xx.
    #[serde(default)]
    pub statuses: Vec<u16>,
    /// Time between checks of one backend. Default 5s.
    #[serde(default = "default_health_interval", deserialize_with = "de_duration")]
    pub interval: Duration,
    /// Time allowed for one check. Default 1s.
    #[serde(default = "default_health_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Passing checks in a row to mark a backend healthy. Default 2.
    #[serde(default = "default_healthy")]
    pub healthy: u32,
    /// Failing checks in a row to mark a backend unhealthy. Default 3.
    #[serde(default = "default_unhealthy")]
    pub unhealthy: u32,
    /// When every backend is unhealthy, send traffic anyway instead of answering 503.
    /// Default false.
    #[serde(default)]
    pub fail_open: bool,
}

/// Health check kinds.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HealthCheckKind {
    /// `GET path`, expecting a passing status.
    Http,
    /// A TCP connect.
    Tcp,
}

fn default_health_path() -> String {
    "/".into()
}
fn default_health_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_health_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_healthy() -> u32 {
    2
}
fn default_unhealthy() -> u32 {
    3
}

/// `discovery:` on an upstream.
#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DiscoverySection {
    /// A/AAAA records of `name`, re-resolved every `refresh`.
    Dns {
        /// The name to resolve (e.g. a Kubernetes headless Service).
        name: String,
        /// Port of every discovered backend.
        port: u16,
        /// Re-resolve interval. Default 10s.
        #[serde(default = "default_refresh", deserialize_with = "de_duration")]
        refresh: Duration,
        /// Resolvers to ask (`IP:port`). Default: the system's (`/etc/resolv.conf`).
        #[serde(default)]
        nameservers: Vec<String>,
    },
    /// Children of a znode, each named `IP:port` (or holding it as data), watched.
    Zookeeper {
        /// Ensemble addresses (`host:port`).
        servers: Vec<String>,
        /// The znode whose children are the backends.
        path: String,
        /// ZooKeeper session timeout. Default 10s.
        #[serde(default = "default_refresh", deserialize_with = "de_duration")]
        session_timeout: Duration,
    },
}

fn default_refresh() -> Duration {
    Duration::from_secs(10)
}

/// Balancing algorithms (`balance:`).
#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Each backend in turn; weights ignored.
    #[default]
    RoundRobin,
    /// Smooth weighted round robin.
    Weighted,
    /// Ketama ring on `hash_key`.
    ConsistentHash,
    /// Uniformly random, weighted.
    Random,
    /// Fewest in-flight requests (per weight).
    LeastConnections,
}

impl Balance {
    /// The name used in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::Weighted => "weighted",
            Balance::ConsistentHash => "consistent_hash",
            Balance::Random => "random",
            Balance::LeastConnections => "least_connections",
        }
    }
}

/// One entry of `backends:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSection {
    /// `IP:port`.
    pub address: String,
    /// Relative share of traffic. Default 1.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// `timeouts:` on an upstream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsSection {
    /// TCP connect. Default 2s.
    #[serde(deserialize_with = "de_duration")]
    pub connect: Duration,
    /// Each read from the backend (time to first byte, and between chunks). Default 30s.
    #[serde(deserialize_with = "de_duration")]
    pub read: Duration,
    /// Each write to the backend. Default 30s.
    #[serde(deserialize_with = "de_duration")]
    pub write: Duration,
    /// A pooled idle connection is closed after this long. Default 60s.
    #[serde(deserialize_with = "de_duration")]
    pub idle: Duration,
}

impl Default for TimeoutsSection {
    fn default() -> Self {
        TimeoutsSection {
            connect: Duration::from_secs(2),
            read: Duration::from_secs(30),
            write: Duration::from_secs(30),
            idle: Duration::from_secs(60),
        }
    }
}

/// `keepalive:` on an upstream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeepaliveSection {
    /// Idle connections this upstream contributes to the shared pool; 0 disables reuse.
    /// Default 128.
    pub pool_size: usize,
}

impl Default for KeepaliveSection {
    fn default() -> Self {
        KeepaliveSection { pool_size: 128 }
    }
}

/// `retries:` on an upstream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetriesSection {
    /// Further attempts after the first, each on another backend. Default 2.
    pub attempts: usize,
    /// Errors that are retried. Default [connect_error, reset].
    pub on: Vec<FailureKind>,
    /// Response statuses that are retried. Default: none.
    pub statuses: Vec<u16>,
    /// Which methods may be retried once sent: `idempotent` (default) or `all`.
    pub methods: RetryMethods,
    /// Retries (other than after a failed connect) may be at most this percentage of requests
    /// over 10 s (at least 3 per 10 s). Default 20.
    pub budget_percent: u8,
    /// Base of the jittered exponential backoff before a retry. Default 25ms.
    #[serde(deserialize_with = "de_duration")]
    pub backoff: Duration,
}

impl Default for RetriesSection {
    fn default() -> Self {
        RetriesSection {
            attempts: 2,
            on: vec![FailureKind::ConnectError, FailureKind::Reset],
            statuses: Vec::new(),
            methods: RetryMethods::Idempotent,
            budget_percent: 20,
            backoff: Duration::from_millis(25),
        }
    }
}

/// `retries.methods`.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RetryMethods {
    /// GET, HEAD, PUT, DELETE, OPTIONS, TRACE only.
    #[default]
    Idempotent,
    /// Every method (the request body must fit the 64 KiB replay buffer).
    All,
}

/// One entry of `routes:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    /// Unique name (used in logs and metrics).
    pub name: String,
    /// What requests this route takes. Default: everything.
    #[serde(default, rename = "match")]
    pub matcher: MatchSection,
    /// Name of the upstream that serves it.
    pub upstream: String,
    /// Remove the matched `path_prefix` before forwarding. Default false.
    #[serde(default)]
    pub strip_prefix: bool,
    /// Regex rewrite of the (stripped) path.
    #[serde(default)]
    pub rewrite: Option<RewriteSection>,
    /// Host header sent upstream. Default: the client's Host, unchanged.
    #[serde(default)]
    pub upstream_host: Option<String>,
    /// Filters, run in order after the global ones. Default: none.
    #[serde(default)]
    pub filters: Vec<serde_json::Value>,
    /// Cache this route's GET/HEAD responses. Default: off.
    #[serde(default)]
    pub cache: Option<RouteCacheSection>,
}

/// `match:` on a route. All given conditions must hold.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MatchSection {
    /// Exact names or `*.suffix` wildcards.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Exact path.
    #[serde(default)]
    pub path: Option<String>,
    /// Path prefix, matched on segment boundaries.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Regex on the path.
    #[serde(default)]
    pub path_regex: Option<String>,
    /// Allowed methods. Default: any.
    #[serde(default)]
    pub methods: Vec<String>,
}

/// `rewrite:` on a route.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewriteSection {
    /// Regex applied to the path.
    pub regex: String,
    /// Replacement, with `$1`/`${name}` captures.
    pub replace: String,
}

/// Parse a human duration (`250ms`, `10s`, `5m`, `1h 30m`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("invalid duration {s:?} ({e}); write e.g. 250ms, 10s or 5m"))
}

/// Parse a human size (`512`, `64KiB`, `10MiB`, `1GB`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("invalid size {s:?} ({e}); write e.g. 512, 64KiB or 10MiB"))
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = Option::<String>::deserialize(d)?;
    s.map(|s| parse_duration(&s).map_err(serde::de::Error::custom))
        .transpose()
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

fn de_opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    de_size(d).map(Some)
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Number(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Number(n) => Ok(n),
        Size::Text(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

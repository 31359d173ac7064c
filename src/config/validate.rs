//! [`FileConfig`] → [`Config`]: resolve names, parse values, and report every problem with the
//! key path and the offending value. Never stops at the first error.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use regex::Regex;

use crate::filters::FilterRegistry;
use crate::tls::{CertificateFiles, UpstreamTls, UpstreamTlsFiles};

use super::file::{
    AdminSection, Balance, BreakerSection, CacheSection, DEFAULT_READ_BUFFER, DiscoverySection,
    FileConfig, HealthCheckKind, HealthCheckSection, Http2Section, ListenerTlsSection,
    RetriesSection, RetryMethods, RouteCacheSection, RouteSection, ServerSection, UnknownSni,
    UpstreamProtocol, UpstreamSection, UpstreamTlsSection,
};
use super::{
    AccessLogConfig, AdminConfig, BackendConfig, BreakerSettings, CacheConfig, Config, ConfigError,
    ConnectionLimits, Discovery, FailurePolicy, HashKey, HeadLimits, HealthCheck, HostPattern,
    Http2Settings, ListenerConfig, ListenerTls, PathMatch, RetryPolicy, RouteCache, RouteConfig,
    ServerSettings, UpstreamConfig, WrittenServer,
};

/// Highest accepted backend weight.
pub const MAX_WEIGHT: u32 = 10_000;
/// Highest accepted idle-connection pool size (Pingora allocates the pool up front).
pub const MAX_POOL_SIZE: usize = 65_536;
/// Highest accepted `retries.attempts` (Pingora caps retries per request at this).
pub const MAX_RETRIES: usize = 16;
/// Accepted `listeners[].read_buffer` range.
const MIN_READ_BUFFER: u64 = 1 << 10;
const MAX_READ_BUFFER: u64 = 1 << 20;

struct Errors(Vec<ConfigError>);

impl Errors {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError::new(path, message));
    }
}

pub(super) fn validate(
    file: FileConfig,
    registry: &FilterRegistry,
) -> Result<Config, Vec<ConfigError>> {
    let mut errs = Errors(Vec::new());

    let server = server_settings(&file, &mut errs);

    if file.listeners.is_empty() {
        errs.push("listeners", "at least one listener is needed");
    }
    let mut listeners: Vec<ListenerConfig> = Vec::new();
    for (i, l) in file.listeners.iter().enumerate() {
        let path = format!("listeners[{i}].address");
        let read_buffer = l.read_buffer.unwrap_or(DEFAULT_READ_BUFFER);
        let tls = l
            .tls
            .as_ref()
            .and_then(|t| listener_tls(t, &format!("listeners[{i}].tls"), &mut errs));
        if l.h2c && l.tls.is_some() {
            errs.push(
                format!("listeners[{i}].h2c"),
                "h2c is HTTP/2 without TLS; a TLS listener offers HTTP/2 through ALPN (tls.http2)",
            );
        }
        if !(MIN_READ_BUFFER..=MAX_READ_BUFFER).contains(&read_buffer) {
            errs.push(
                format!("listeners[{i}].read_buffer"),
                format!("{read_buffer} bytes is outside 1KiB..=1MiB"),
            );
        }
        if let Some(address) = socket_addr(&l.address, &path, &mut errs) {
            if listeners.iter().any(|l| l.address == address) {
                errs.push(&path, format!("{address} is listed twice"));
            }
            listeners.push(ListenerConfig {
                address,
                read_buffer: read_buffer as usize,
                h2c: l.h2c,
                tls,
            });
        }
    }
    let admin = file.admin.as_ref().and_then(|a| admin(a, &mut errs));
    if let Some(a) = admin.as_ref().map(|a| a.address)
        && listeners.iter().any(|l| l.address == a)
    {
        errs.push(
            "admin.address",
            format!("{a} is also a traffic listener; give the admin API its own port"),
        );
    }

    let mut trusted_proxies = Vec::new();
    for (i, t) in file.trusted_proxies.iter().enumerate() {
        match parse_cidr(t) {
            Ok(net) => trusted_proxies.push(net),
            Err(m) => errs.push(format!("trusted_proxies[{i}]"), m),
        }
    }

    let upstreams: Vec<UpstreamConfig> = file
        .upstreams
        .iter()
        .filter_map(|(name, u)| upstream(name, u, &mut errs))
        .collect();
    let known: HashSet<&str> = file.upstreams.keys().map(String::as_str).collect();

    let mut routes = Vec::new();
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut signatures: HashMap<String, usize> = HashMap::new();
    for (i, r) in file.routes.iter().enumerate() {
        let path = format!("routes[{i}]");
        if r.name.trim().is_empty() {
            errs.push(format!("{path}.name"), "a route needs a non-empty name");
        } else if let Some(first) = names.insert(&r.name, i) {
            errs.push(
                format!("{path}.name"),
                format!("duplicate route name {:?} (also routes[{first}])", r.name),
            );
        }
        let upstream_index = upstreams.iter().position(|u| u.name == r.upstream);
        if !known.contains(r.upstream.as_str()) {
            errs.push(
                format!("{path}.upstream"),
                format!("no upstream named {:?}", r.upstream),
            );
        }
        if let Some(route) = route(
            r,
            &path,
            upstream_index.unwrap_or(0),
            file.cache.max_size,
            registry,
            &mut errs,
        ) {
            let sig = route_signature(&route);
            if let Some(first) = signatures.insert(sig, i) {
                errs.push(
                    format!("{path}.match"),
                    format!(
                        "matches exactly the requests routes[{first}] matches, so it would never be used"
                    ),
                );
            }
            if upstream_index.is_some() {
                routes.push(route);
            }
        }
    }

    let access_log = file.access_log.as_ref().map(|a| AccessLogConfig {
        format: a.format,
        path: a.path.trim().to_string(),
    });
    if let Some(a) = &access_log
        && a.path.is_empty()
    {
        errs.push(
            "access_log.path",
            "must not be empty; use stdout, stderr or a file path",
        );
    }

    let filters = build_filters(&file.filters, "filters", registry, &mut errs);
    let cache = cache_settings(&file.cache, &mut errs);

    if errs.0.is_empty() {
        Ok(Config {
            filters,
            filter_specs: file.filters.iter().map(crate::filters::redacted).collect(),
            server,
            listeners,
            admin,
            access_log,
            trusted_proxies,
            upstreams,
            routes,
            cache,
        })
    } else {
        Err(errs.0)
    }
}

fn server_settings(file: &FileConfig, errs: &mut Errors) -> ServerSettings {
    let s = &file.server;
    let threads = match s.threads {
        Some(0) => {
            errs.push("server.threads", "0 is not a thread count; use 1 or more");
            1
        }
        Some(n) if n > 1024 => {
            errs.push(
                "server.threads",
                format!("{n} is more than the 1024 allowed"),
            );
            1
        }
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    for (key, value) in [("pid_file", &s.pid_file), ("upgrade_sock", &s.upgrade_sock)] {
        if value.trim().is_empty() {
            errs.push(format!("server.{key}"), "must not be empty");
        }
    }
    if s.log_level.parse::<log::LevelFilter>().is_err() {
        errs.push(
            "server.log_level",
            format!(
                "invalid level {:?}; use error, warn, info, debug or trace",
                s.log_level
            ),
        );
    }
    if s.downstream_keepalive_timeout.is_zero() {
        errs.push(
            "server.downstream_keepalive_timeout",
            "must be greater than 0s",
        );
    }
    let pool_sum = file
        .upstreams
        .values()
        .map(|u| u.keepalive.pool_size.min(MAX_POOL_SIZE))
        .fold(0usize, usize::saturating_add)
        .min(MAX_POOL_SIZE);
    if let Some(n) = s.upstream_keepalive_pool_size
        && n > MAX_POOL_SIZE
    {
        errs.push(
            "server.upstream_keepalive_pool_size",
            format!("{n} is above the maximum {MAX_POOL_SIZE}"),
        );
    }
    ServerSettings {
        threads,
        // One thread has no one to steal from: a single-threaded runtime does the same work
        // for ~2.5% fewer instructions and ~5% less CPU per request (docs/performance.md).
        work_stealing: s.work_stealing.unwrap_or(threads > 1),
        grace_period: s.grace_period,
        graceful_shutdown_timeout: s.graceful_shutdown_timeout,
        pid_file: s.pid_file.clone(),
        upgrade_sock: s.upgrade_sock.clone(),
        upstream_keepalive_pool_size: s.upstream_keepalive_pool_size.unwrap_or(pool_sum),
        downstream_keepalive_timeout: s.downstream_keepalive_timeout,
        log_level: s.log_level.clone(),
        http2: http2_settings(&s.http2, errs),
        head: {
            let mut size = |key: &str, v: u64, min: u64, max: u64| {
                if !(min..=max).contains(&v) {
                    errs.push(
                        format!("server.{key}"),
                        format!("{v} bytes is outside {min}..={max}"),
                    );
                }
                v.clamp(min, max) as usize
            };
            HeadLimits {
                max_request_line: size("max_request_line", s.max_request_line, 256, 64 << 10),
                max_header_size: size("max_header_size", s.max_header_size, 1 << 10, 1 << 20),
                max_header_count: if (1..=256).contains(&s.max_header_count) {
                    s.max_header_count
                } else {
                    errs.push(
                        "server.max_header_count",
                        format!(
                            "{} is outside 1..=256 (Pingora refuses more than 256 fields)",
                            s.max_header_count
                        ),
                    );
                    100
                },
            }
        },
        underscore_headers: s.underscore_headers,
        preserve_header_case: s.preserve_header_case,
        connections: connection_limits(s, errs),
        written: WrittenServer {
            threads: s.threads,
            work_stealing: s.work_stealing,
            upstream_keepalive_pool_size: s.upstream_keepalive_pool_size,
        },
        reload_on_change: match s.reload_on_change {
            Some(d) if d < std::time::Duration::from_millis(100) => {
                errs.push(
                    "server.reload_on_change",
                    "must be at least 100ms (each check reads every file)",
                );
                None
            }
            other => other,
        },
    }
}

/// `server.request_head_timeout`, `body_idle_timeout`, `send_timeout`, `min_body_rate`,
/// `max_connections`, `…_per_ip`.
fn connection_limits(s: &ServerSection, errs: &mut Errors) -> ConnectionLimits {
    for (key, d) in [
        ("request_head_timeout", s.request_head_timeout),
        ("body_idle_timeout", s.body_idle_timeout),
        ("send_timeout", s.send_timeout),
    ] {
        if d.is_zero() {
            errs.push(format!("server.{key}"), "must be greater than 0s");
        }
    }
    // Pingora reads a connection's first head under its fixed 60 s read timeout, which would
    // close it silently before a longer deadline could answer 408.
    if s.request_head_timeout >= std::time::Duration::from_secs(60) {
        errs.push(
            "server.request_head_timeout",
            "must be below 60s (Pingora's first-read timeout)",
        );
    }
    if s.max_connections == Some(0) {
        errs.push(
            "server.max_connections",
            "must be at least 1 (omit it for the default)",
        );
    }
    if s.max_connections_per_ip == 0 {
        errs.push("server.max_connections_per_ip", "must be at least 1");
    }
    ConnectionLimits {
        request_head_timeout: s.request_head_timeout,
        body_idle_timeout: s.body_idle_timeout,
        send_timeout: s.send_timeout,
        min_body_rate: s.min_body_rate,
        max: s.max_connections,
        max_per_ip: s.max_connections_per_ip,
    }
}

fn http2_settings(h: &Http2Section, errs: &mut Errors) -> Http2Settings {
    let path = "server.http2";
    if h.max_concurrent_streams == 0 {
        errs.push(
            format!("{path}.max_concurrent_streams"),
            "must be at least 1",
        );
    }
    // h2 takes u32 sizes; windows are capped by the protocol at 2^31-1.
    let size = |key: &str, v: u64, min: u64, max: u64, errs: &mut Errors| -> u32 {
        if !(min..=max).contains(&v) {
            errs.push(
                format!("{path}.{key}"),
                format!("{v} bytes is outside {min}..={max}"),
            );
        }
        v.clamp(min, max) as u32
    };
    let max_header_list_size = size(
        "max_header_list_size",
        h.max_header_list_size,
        1 << 10,
        16 << 20,
        errs,
    );
    let initial_window_size = size(
        "initial_window_size",
        h.initial_window_size,
        65_535,
        (1 << 31) - 1,
        errs,
    );
    if h.idle_timeout.is_zero() {
        errs.push(format!("{path}.idle_timeout"), "must be greater than 0s");
    }
    Http2Settings {
        max_concurrent_streams: h.max_concurrent_streams,
        max_header_list_size,
        max_pending_reset_streams: h.max_pending_reset_streams,
        max_local_error_reset_streams: h.max_local_error_reset_streams,
        initial_window_size,
        idle_timeout: h.idle_timeout,
    }
}

fn listener_tls(t: &ListenerTlsSection, path: &str, errs: &mut Errors) -> Option<ListenerTls> {
    if t.certificates.is_empty() {
        errs.push(
            format!("{path}.certificates"),
            "at least one certificate is needed",
        );
        return None;
    }
    let files: Vec<CertificateFiles<'_>> = t
        .certificates
        .iter()
        .map(|c| CertificateFiles {
            cert: &c.cert,
            key: &c.key,
            names: c.names.as_deref(),
        })
        .collect();
    match crate::tls::cert_store(&files, t.unknown_sni == UnknownSni::Reject) {
        Ok(store) => Some(ListenerTls {
            store: Arc::new(store),
            http2: t.http2,
        }),
        Err(list) => {
            for (i, e) in list {
                errs.push(format!("{path}.certificates[{i}].{}", e.key), e.message);
            }
            None
        }
    }
}

/// Whether the access log at `path` can be opened for appending (`tollgate -t` would otherwise
/// pass a configuration the start then refuses): an existing regular file the process may
/// write, or a new file in a directory it may write. Nothing is created.
///
/// Only `tollgate -t` asks: a start or reload opens the file and reports its own error, and a
/// reload that keeps the log keeps its open file (whose path may have become unwritable, or be
/// relative to a directory a daemon has left).
pub fn writable_log(path: &str) -> Result<(), String> {
    use nix::unistd::{AccessFlags, access};
    if matches!(path, "stdout" | "stderr") {
        return Ok(());
    }
    let p = std::path::Path::new(path);
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => Err(format!("{path:?} is a directory")),
        Ok(_) => access(p, AccessFlags::W_OK).map_err(|e| format!("cannot write {path:?}: {e}")),
        Err(_) => {
            let dir = p
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            match std::fs::metadata(dir) {
                Ok(m) if m.is_dir() => access(dir, AccessFlags::W_OK | AccessFlags::X_OK)
                    .map_err(|e| format!("cannot create {path:?} in {}: {e}", dir.display())),
                _ => Err(format!("directory {} does not exist", dir.display())),
            }
        }
    }
}

fn admin(a: &AdminSection, errs: &mut Errors) -> Option<AdminConfig> {
    // Every check runs whatever fails first: a bad address must not hide a bad token.
    let address = socket_addr(&a.address, "admin.address", errs);
    let mut ok = address.is_some();
    let token = match (&a.token, &a.token_file) {
        (Some(_), Some(_)) => {
            errs.push("admin", "set token or token_file, not both");
            ok = false;
            None
        }
        (Some(t), None) => Some(t.clone()),
        (None, Some(f)) => match std::fs::read_to_string(f) {
            Ok(t) => Some(t.trim_end_matches(['\r', '\n']).to_string()),
            Err(e) => {
                errs.push("admin.token_file", format!("cannot read {f:?}: {e}"));
                ok = false;
                None
            }
        },
        (None, None) => None,
    };
    if let Some(t) = &token
        && (t.len() < 16 || t.bytes().any(|b| !b.is_ascii_graphic()))
    {
        errs.push(
            "admin.token",
            "must be at least 16 visible ASCII characters (no spaces)",
        );
    }
    let address = address?;
    if ok && token.is_none() && !address.ip().is_loopback() && !a.allow_insecure {
        errs.push(
            "admin.address",
            format!(
                "{address} is not a loopback address: set admin.token (or allow_insecure: true) \
                 so reload and config are not open to the network"
            ),
        );
    }
    ok.then_some(AdminConfig {
        address,
        token,
        token_file: a.token_file.clone(),
        readiness: a.readiness,
    })
}

fn socket_addr(value: &str, path: &str, errs: &mut Errors) -> Option<SocketAddr> {
    match value.trim().parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            errs.push(
                path,
                format!(
                    "invalid address {value:?}; write IP:port, e.g. 127.0.0.1:8080 or [::1]:8080"
                ),
            );
            None
        }
    }
}

fn parse_cidr(value: &str) -> Result<IpNet, String> {
    let v = value.trim();
    if let Ok(net) = v.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    if let Ok(ip) = v.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    Err(format!(
        "invalid CIDR {value:?}; write e.g. 10.0.0.0/8, 192.168.1.7 or fd00::/8"
    ))
}

fn upstream(name: &str, u: &UpstreamSection, errs: &mut Errors) -> Option<UpstreamConfig> {
    let path = format!("upstreams.{name}");
    let before = errs.0.len();
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        errs.push(
            &path,
            format!("invalid upstream name {name:?}; use letters, digits, '-', '_' and '.'"),
        );
    }
    if u.backends.is_empty() && u.discovery.is_none() {
        errs.push(
            format!("{path}.backends"),
            "no backends and no discovery; list at least one backend or add discovery",
        );
    }
    let mut backends = Vec::new();
    for (i, b) in u.backends.iter().enumerate() {
        let bpath = format!("{path}.backends[{i}]");
        if let Some(addr) = socket_addr(&b.address, &format!("{bpath}.address"), errs) {
            if addr.port() == 0 {
                errs.push(
                    format!("{bpath}.address"),
                    format!("{addr}: port 0 is not a backend port"),
                );
            }
            if backends.iter().any(|x: &BackendConfig| x.addr == addr) {
                errs.push(
                    format!("{bpath}.address"),
                    format!("{addr} is listed twice"),
                );
            }
            backends.push(BackendConfig {
                addr,
                weight: b.weight.max(1),
            });
        }
        if b.weight == 0 {
            errs.push(
                format!("{bpath}.weight"),
                "weight 0 is not allowed; remove the backend to send it no traffic",
            );
        } else if b.weight > MAX_WEIGHT {
            errs.push(
                format!("{bpath}.weight"),
                format!("weight {} is above the maximum {MAX_WEIGHT}", b.weight),
            );
        } else if b.weight != 1 && u.balance == Balance::RoundRobin {
            errs.push(
                format!("{bpath}.weight"),
                format!(
                    "weight {} has no effect with balance: round_robin; use balance: weighted",
                    b.weight
                ),
            );
        }
    }
    let hash_key = match (&u.hash_key, u.balance) {
        (Some(k), Balance::ConsistentHash) => match parse_hash_key(k) {
            Ok(k) => Some(k),
            Err(m) => {
                errs.push(format!("{path}.hash_key"), m);
                None
            }
        },
        (None, Balance::ConsistentHash) => Some(HashKey::ClientIp),
        (Some(k), other) => {
            errs.push(
                format!("{path}.hash_key"),
                format!(
                    "hash_key {k:?} is only used by balance: consistent_hash, not {}",
                    other.as_str()
                ),
            );
            None
        }
        (None, _) => None,
    };
    let t = &u.timeouts;
    for (key, d) in [
        ("connect", t.connect),
        ("read", t.read),
        ("write", t.write),
        ("idle", t.idle),
    ] {
        if d.is_zero() {
            errs.push(format!("{path}.timeouts.{key}"), "must be greater than 0s");
        }
    }
    if u.keepalive.pool_size > MAX_POOL_SIZE {
        errs.push(
            format!("{path}.keepalive.pool_size"),
            format!(
                "{} is above the maximum {MAX_POOL_SIZE}",
                u.keepalive.pool_size
            ),
        );
    }
    if u.retries.attempts > MAX_RETRIES {
        errs.push(
            format!("{path}.retries.attempts"),
            format!("{} is above the maximum {MAX_RETRIES}", u.retries.attempts),
        );
    }
    let retry = retry_policy(&u.retries, &path, errs);
    let (breaker, failure) = breaker_settings(&u.circuit_breaker, &path, errs);
    let health = u
        .health_check
        .as_ref()
        .and_then(|h| health_check(h, &path, errs));
    let discovery = u.discovery.as_ref().and_then(|d| discovery(d, &path, errs));
    let tls = u.tls.as_ref().and_then(|t| upstream_tls(t, &path, errs));
    match (u.protocol, &u.tls) {
        (UpstreamProtocol::Auto, None) => errs.push(
            format!("{path}.protocol"),
            "auto negotiates HTTP/2 through TLS ALPN: add tls:, or use http2 (prior knowledge) or http1",
        ),
        (UpstreamProtocol::Http2, _)
            if u
                .health_check
                .as_ref()
                .is_some_and(|h| h.kind == HealthCheckKind::Http) =>
        {
            errs.push(
                format!("{path}.health_check.kind"),
                "http health checks speak HTTP/1.1, which an HTTP/2-only backend refuses: use kind: tcp, or protocol: auto",
            )
        }
        _ => {}
    }
    // Checked on its own: an earlier protocol error must not hide it.
    if u.h2_max_streams == 0 {
        errs.push(format!("{path}.h2_max_streams"), "must be at least 1");
    }
    if errs.0.len() > before {
        return None;
    }
    Some(UpstreamConfig {
        name: name.to_string(),
        balance: u.balance,
        hash_key,
        backends,
        connect_timeout: t.connect,
        read_timeout: t.read,
        write_timeout: t.write,
        idle_timeout: t.idle,
        pool_size: u.keepalive.pool_size,
        retry,
        breaker,
        failure,
        max_in_flight: u.circuit_breaker.max_in_flight,
        health,
        discovery,
        tls,
        protocol: u.protocol,
        h2_max_streams: u.h2_max_streams,
    })
}

fn upstream_tls(t: &UpstreamTlsSection, path: &str, errs: &mut Errors) -> Option<UpstreamTls> {
    let mut sni_ok = true;
    if let Some(sni) = &t.sni
        && (sni.is_empty() || sni.bytes().any(|b| b.is_ascii_whitespace() || b == b'/'))
    {
        errs.push(
            format!("{path}.tls.sni"),
            format!("{sni:?} is not a server name"),
        );
        // The files are still checked: their errors are reported with this one.
        sni_ok = false;
    }
    let files = UpstreamTlsFiles {
        sni: t.sni.as_deref(),
        verify: t.verify,
        verify_hostname: t.verify_hostname,
        ca_file: t.ca_file.as_deref(),
        client_cert: t.client_cert.as_deref(),
        client_key: t.client_key.as_deref(),
    };
    crate::tls::upstream_tls(&files)
        .map_err(|list| {
            for e in list {
                errs.push(format!("{path}.tls.{}", e.key), e.message);
            }
        })
        .ok()
        .filter(|_| sni_ok)
}

fn check_statuses(statuses: &[u16], path: &str, errs: &mut Errors) {
    for (i, s) in statuses.iter().enumerate() {
        if !(100..=599).contains(s) {
            errs.push(
                format!("{path}[{i}]"),
                format!("{s} is not an HTTP status (100-599)"),
            );
        }
    }
}

fn retry_policy(r: &RetriesSection, path: &str, errs: &mut Errors) -> RetryPolicy {
    if r.budget_percent > 100 {
        errs.push(
            format!("{path}.retries.budget_percent"),
            format!("{} is not a percentage (0-100)", r.budget_percent),
        );
    }
    if r.backoff > std::time::Duration::from_secs(10) {
        errs.push(
            format!("{path}.retries.backoff"),
            "more than 10s between retries; use a smaller backoff",
        );
    }
    check_statuses(&r.statuses, &format!("{path}.retries.statuses"), errs);
    RetryPolicy {
        attempts: r.attempts,
        on: r.on.clone(),
        statuses: r.statuses.clone(),
        all_methods: r.methods == RetryMethods::All,
        budget_percent: r.budget_percent,
        backoff: r.backoff,
    }
}

fn breaker_settings(
    b: &BreakerSection,
    path: &str,
    errs: &mut Errors,
) -> (Option<BreakerSettings>, FailurePolicy) {
    let p = format!("{path}.circuit_breaker");
    if b.failure_rate > 100 {
        errs.push(
            format!("{p}.failure_rate"),
            format!("{} is not a percentage (0-100)", b.failure_rate),
        );
    }
    if b.enabled && b.failure_rate == 0 && b.consecutive_failures == 0 {
        errs.push(
            &p,
            "failure_rate and consecutive_failures are both 0, so the breaker can never open; \
             set enabled: false instead",
        );
    }
    if b.open_for.is_zero() {
        errs.push(format!("{p}.open_for"), "must be greater than 0s");
    }
    if b.max_open_for < b.open_for {
        errs.push(format!("{p}.max_open_for"), "must be at least open_for");
    }
    if b.window < std::time::Duration::from_millis(10) {
        errs.push(format!("{p}.window"), "must be at least 10ms");
    }
    if b.half_open_requests == 0 {
        errs.push(format!("{p}.half_open_requests"), "must be at least 1");
    }
    if b.slow_call.is_some_and(|d| d.is_zero()) {
        errs.push(format!("{p}.slow_call"), "must be greater than 0s");
    }
    check_statuses(&b.failure_statuses, &format!("{p}.failure_statuses"), errs);
    let settings = b.enabled.then_some(BreakerSettings {
        consecutive_failures: b.consecutive_failures,
        failure_rate: b.failure_rate,
        min_requests: b.min_requests,
        window: b.window,
        open_for: b.open_for,
        max_open_for: b.max_open_for,
        half_open_requests: b.half_open_requests.max(1),
    });
    let failure = FailurePolicy {
        on: b.failure_on.clone(),
        statuses: b.failure_statuses.clone(),
        slow_call: b.slow_call,
    };
    (settings, failure)
}

fn health_check(h: &HealthCheckSection, path: &str, errs: &mut Errors) -> Option<HealthCheck> {
    let p = format!("{path}.health_check");
    let before = errs.0.len();
    if h.interval.is_zero() {
        errs.push(format!("{p}.interval"), "must be greater than 0s");
    }
    if h.timeout.is_zero() {
        errs.push(format!("{p}.timeout"), "must be greater than 0s");
    }
    if h.healthy == 0 {
        errs.push(format!("{p}.healthy"), "must be at least 1");
    }
    if h.unhealthy == 0 {
        errs.push(format!("{p}.unhealthy"), "must be at least 1");
    }
    check_path(&h.path, &format!("{p}.path"), errs);
    if let Some(host) = &h.host
        && host.parse::<http::uri::Authority>().is_err()
    {
        errs.push(format!("{p}.host"), format!("invalid Host value {host:?}"));
    }
    check_statuses(&h.statuses, &format!("{p}.statuses"), errs);
    (errs.0.len() == before).then(|| HealthCheck {
        kind: h.kind,
        path: h.path.clone(),
        host: h.host.clone(),
        statuses: h.statuses.clone(),
        interval: h.interval,
        timeout: h.timeout,
        healthy: h.healthy,
        unhealthy: h.unhealthy,
        fail_open: h.fail_open,
    })
}

fn discovery(d: &DiscoverySection, path: &str, errs: &mut Errors) -> Option<Discovery> {
    let p = format!("{path}.discovery");
    let before = errs.0.len();
    let out = match d {
        DiscoverySection::Dns {
            name,
            port,
            refresh,
            nameservers,
        } => {
            if host_pattern(name).is_err() || name.starts_with('*') {
                errs.push(format!("{p}.name"), format!("invalid DNS name {name:?}"));
            }
            if *port == 0 {
                errs.push(format!("{p}.port"), "port 0 is not a backend port");
            }
            if refresh.is_zero() {
                errs.push(format!("{p}.refresh"), "must be greater than 0s");
            }
            let ns: Vec<SocketAddr> = nameservers
                .iter()
                .enumerate()
                .filter_map(|(i, a)| socket_addr(a, &format!("{p}.nameservers[{i}]"), errs))
                .collect();
            Discovery::Dns {
                name: name.trim_end_matches('.').to_string(),
                port: *port,
                refresh: *refresh,
                nameservers: ns,
            }
        }
        DiscoverySection::Zookeeper {
            servers,
            path: znode,
            session_timeout,
        } => {
            if servers.is_empty() {
                errs.push(format!("{p}.servers"), "list at least one ZooKeeper server");
            }
            for (i, s) in servers.iter().enumerate() {
                if s.parse::<http::uri::Authority>()
                    .map_or(true, |a| a.port_u16().is_none())
                {
                    errs.push(
                        format!("{p}.servers[{i}]"),
                        format!("invalid server {s:?}; write host:port"),
                    );
                }
            }
            if !znode.starts_with('/') || (znode.len() > 1 && znode.ends_with('/')) {
                errs.push(
                    format!("{p}.path"),
                    format!("invalid znode path {znode:?}; write e.g. /services/api"),
                );
            }
            if session_timeout.is_zero() {
                errs.push(format!("{p}.session_timeout"), "must be greater than 0s");
            }
            Discovery::Zookeeper {
                servers: servers.join(","),
                path: znode.clone(),
                session_timeout: *session_timeout,
            }
        }
    };
    (errs.0.len() == before).then_some(out)
}

fn parse_hash_key(k: &str) -> Result<HashKey, String> {
    let bad = || {
        format!(
            "invalid hash_key {k:?}; use client_ip, path, header:NAME, cookie:NAME or query:NAME"
        )
    };
    match k.split_once(':') {
        None if k == "client_ip" => Ok(HashKey::ClientIp),
        None if k == "path" => Ok(HashKey::Path),
        Some((_, "")) | None => Err(bad()),
        Some(("header", name)) => http::HeaderName::from_bytes(name.as_bytes())
            .map(HashKey::Header)
            .map_err(|_| format!("invalid header name {name:?} in hash_key")),
        Some(("cookie", name)) => Ok(HashKey::Cookie(name.to_string())),
        Some(("query", name)) => Ok(HashKey::Query(name.to_string())),
        Some(_) => Err(bad()),
    }
}

fn route(
    r: &RouteSection,
    path: &str,
    upstream: usize,
    cache_max: u64,
    registry: &FilterRegistry,
    errs: &mut Errors,
) -> Option<RouteConfig> {
    let before = errs.0.len();
    let m = &r.matcher;
    let mut hosts = Vec::new();
    for (i, h) in m.hosts.iter().enumerate() {
        match host_pattern(h) {
            Ok(p) => hosts.push(p),
            Err(msg) => errs.push(format!("{path}.match.hosts[{i}]"), msg),
        }
    }
    let given: Vec<&str> = [
        m.path.as_ref().map(|_| "path"),
        m.path_prefix.as_ref().map(|_| "path_prefix"),
        m.path_regex.as_ref().map(|_| "path_regex"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if given.len() > 1 {
        errs.push(
            format!("{path}.match"),
            format!(
                "use only one of path, path_prefix and path_regex (got {})",
                given.join(", ")
            ),
        );
    }
    let path_match = if let Some(p) = &m.path {
        check_path(p, &format!("{path}.match.path"), errs);
        PathMatch::Exact(p.clone())
    } else if let Some(p) = &m.path_prefix {
        check_path(p, &format!("{path}.match.path_prefix"), errs);
        PathMatch::Prefix(p.clone())
    } else if let Some(re) = &m.path_regex {
        match compile(re, &format!("{path}.match.path_regex"), errs) {
            Some(re) => PathMatch::Regex(re),
            None => PathMatch::Any,
        }
    } else {
        PathMatch::Any
    };
    let mut methods: Vec<http::Method> = Vec::new();
    for (i, name) in m.methods.iter().enumerate() {
        let upper = name.trim().to_ascii_uppercase();
        match http::Method::from_bytes(upper.as_bytes()) {
            Ok(meth) if !upper.is_empty() => {
                if methods.contains(&meth) {
                    errs.push(
                        format!("{path}.match.methods[{i}]"),
                        format!("{upper} is listed twice"),
                    );
                }
                methods.push(meth);
            }
            _ => errs.push(
                format!("{path}.match.methods[{i}]"),
                format!("invalid method {name:?}"),
            ),
        }
    }
    if r.strip_prefix && !matches!(path_match, PathMatch::Prefix(_)) {
        errs.push(
            format!("{path}.strip_prefix"),
            "strip_prefix needs match.path_prefix",
        );
    }
    let rewrite = r.rewrite.as_ref().and_then(|rw| {
        let rpath = format!("{path}.rewrite.regex");
        let re = compile(&rw.regex, &rpath, errs)?;
        check_replacement(&re, &rw.replace, &format!("{path}.rewrite.replace"), errs);
        Some((re, rw.replace.clone()))
    });
    let upstream_host = r.upstream_host.as_ref().and_then(|h| {
        let h = h.trim();
        match (
            h.parse::<http::uri::Authority>(),
            http::HeaderValue::from_str(h),
        ) {
            (Ok(a), Ok(v)) if !a.as_str().contains('@') => Some(v),
            _ => {
                errs.push(
                    format!("{path}.upstream_host"),
                    format!("invalid Host value {h:?}; write host or host:port"),
                );
                None
            }
        }
    });
    let filters = build_filters(&r.filters, &format!("{path}.filters"), registry, errs);
    let cache = r
        .cache
        .as_ref()
        .map(|c| route_cache(c, &format!("{path}.cache"), cache_max, errs));
    if errs.0.len() > before {
        return None;
    }
    Some(RouteConfig {
        name: r.name.clone(),
        hosts,
        path: path_match,
        methods,
        upstream,
        strip_prefix: r.strip_prefix,
        rewrite,
        upstream_host,
        filters,
        filter_specs: r.filters.iter().map(crate::filters::redacted).collect(),
        cache,
    })
}

fn cache_settings(c: &CacheSection, errs: &mut Errors) -> CacheConfig {
    const MIN: u64 = 1 << 20;
    if c.max_size < MIN {
        errs.push(
            "cache.max_size",
            format!("{} bytes is too small; at least 1MiB", c.max_size),
        );
    }
    if c.lock_timeout.is_zero() {
        errs.push("cache.lock_timeout", "must be more than 0");
    }
    CacheConfig {
        max_size: usize::try_from(c.max_size).unwrap_or(usize::MAX),
        lock_timeout: c.lock_timeout,
    }
}

fn route_cache(c: &RouteCacheSection, path: &str, cache_max: u64, errs: &mut Errors) -> RouteCache {
    for (i, s) in c.statuses.iter().enumerate() {
        if !(200..=599).contains(s) || *s == 206 || *s == 304 {
            errs.push(
                format!("{path}.statuses[{i}]"),
                format!("{s} cannot be cached; list final statuses 200-599 (not 206 or 304)"),
            );
        }
    }
    if c.statuses.is_empty() {
        errs.push(format!("{path}.statuses"), "list at least one status");
    }
    if c.max_object_size == 0 || c.max_object_size > cache_max {
        errs.push(
            format!("{path}.max_object_size"),
            format!(
                "{} bytes: must be more than 0 and at most cache.max_size ({cache_max} bytes)",
                c.max_object_size
            ),
        );
    }
    let mut key_headers = Vec::new();
    for (i, h) in c.key_headers.iter().enumerate() {
        match http::HeaderName::from_bytes(h.trim().as_bytes()) {
            Ok(n) => key_headers.push(n),
            Err(_) => errs.push(
                format!("{path}.key_headers[{i}]"),
                format!("invalid header name {h:?}"),
            ),
        }
    }
    // Pingora counts stale windows in whole seconds: a fraction would be cut off silently
    // (`500ms` turning stale serving off).
    for (key, d) in [
        ("stale_while_revalidate", c.stale_while_revalidate),
        ("stale_if_error", c.stale_if_error),
    ] {
        if d.subsec_nanos() != 0 {
            errs.push(
                format!("{path}.{key}"),
                format!("{d:?}: must be whole seconds (the cache counts stale windows in seconds)"),
            );
        }
    }
    let secs = |d: std::time::Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
    RouteCache {
        ttl: c.ttl,
        statuses: c.statuses.clone(),
        max_object_size: usize::try_from(c.max_object_size).unwrap_or(usize::MAX),
        key_headers,
        allow_set_cookie: c.allow_set_cookie,
        stale_while_revalidate: secs(c.stale_while_revalidate),
        stale_if_error: secs(c.stale_if_error),
    }
}

fn build_filters(
    specs: &[serde_json::Value],
    path: &str,
    registry: &FilterRegistry,
    errs: &mut Errors,
) -> Vec<std::sync::Arc<dyn crate::filters::Filter>> {
    specs
        .iter()
        .enumerate()
        .filter_map(|(i, spec)| {
            let kind = spec.get("kind").and_then(|k| k.as_str()).unwrap_or("?");
            registry
                .build(spec)
                .map_err(|e| errs.push(format!("{path}[{i}] ({kind})"), e))
                .ok()
        })
        .collect()
}

fn host_pattern(h: &str) -> Result<HostPattern, String> {
    let lower = h.trim().trim_end_matches('.').to_ascii_lowercase();
    let (wild, name) = match lower.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, lower.as_str()),
    };
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "invalid host {h:?}; write a name such as api.example.com or a wildcard such as *.example.com"
        ));
    }
    Ok(if wild {
        HostPattern::Suffix(format!(".{name}"))
    } else {
        HostPattern::Exact(name.to_string())
    })
}

fn check_path(p: &str, path: &str, errs: &mut Errors) {
    if !p.starts_with('/') {
        errs.push(path, format!("{p:?} must start with '/'"));
    } else if p
        .bytes()
        .any(|b| b.is_ascii_control() || b == b' ' || b == b'?' || b == b'#')
    {
        errs.push(
            path,
            format!("{p:?} contains a space, control character, '?' or '#'"),
        );
    }
}

fn compile(re: &str, path: &str, errs: &mut Errors) -> Option<Regex> {
    match Regex::new(re) {
        Ok(r) => Some(r),
        Err(e) => {
            let detail = e
                .to_string()
                .lines()
                .last()
                .unwrap_or("")
                .trim()
                .to_string();
            errs.push(path, format!("invalid regex {re:?}: {detail}"));
            None
        }
    }
}

/// Every `$N` / `$name` / `${name}` in a replacement must name a group of the regex (names
/// are read the way the regex crate reads them: the longest run of `[A-Za-z0-9_]`, so `$1_x`
/// means a group called `1_x`), and the literal text must be valid in a URI path.
fn check_replacement(re: &Regex, replace: &str, path: &str, errs: &mut Errors) {
    let b = replace.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'$' {
            let c = b[i];
            if !c.is_ascii_graphic() || b"\"<>\\^`{|}#".contains(&c) {
                errs.push(
                    path,
                    format!(
                        "{replace:?} contains {:?}, which is not allowed in a URI path",
                        c as char
                    ),
                );
                return;
            }
            i += 1;
            continue;
        }
        if b.get(i + 1) == Some(&b'$') {
            i += 2; // `$$` is a literal dollar
            continue;
        }
        let (name, next) = if b.get(i + 1) == Some(&b'{') {
            match replace[i + 2..].find('}') {
                Some(end) => (&replace[i + 2..i + 2 + end], i + 3 + end),
                None => ("", b.len()),
            }
        } else {
            let len = b[i + 1..]
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric() || **c == b'_')
                .count();
            (&replace[i + 1..i + 1 + len], i + 1 + len)
        };
        i = next;
        if name.is_empty() {
            errs.push(
                path,
                format!("{replace:?} has a '$' that names no group; write $$ for a literal '$'"),
            );
            continue;
        }
        let exists = match name.parse::<usize>() {
            Ok(n) => n < re.captures_len(),
            Err(_) => re.capture_names().flatten().any(|n| n == name),
        };
        if !exists {
            errs.push(
                path,
                format!(
                    "{replace:?} refers to ${name}, which the regex does not capture \
                     (write ${{1}}x to follow a group with text)"
                ),
            );
        }
    }
}

/// A string equal for two routes exactly when they match the same requests.
fn route_signature(r: &RouteConfig) -> String {
    let mut hosts: Vec<String> = r.hosts.iter().map(|h| format!("{h:?}")).collect();
    hosts.sort();
    let mut methods: Vec<&str> = r.methods.iter().map(|m| m.as_str()).collect();
    methods.sort();
    let path = match &r.path {
        PathMatch::Any => "any".to_string(),
        PathMatch::Exact(p) => format!("exact:{p}"),
        PathMatch::Prefix(p) => format!("prefix:{p}"),
        PathMatch::Regex(re) => format!("regex:{}", re.as_str()),
    };
    format!("{hosts:?}|{path}|{methods:?}")
}

//! The runtime snapshot: everything a request needs, built whole from one validated
//! [`Config`] and swapped atomically on reload. A request keeps the snapshot it started with.
//!
//! Built from the previous snapshot on reload, it carries live state over: an upstream whose
//! configuration did not change is reused as is (member set, health, breakers, retry budget,
//! counters); a changed one passes health and breaker state on to the backends that remain;
//! an unchanged access log keeps its writer. Pingora's connection pool is process-wide and
//! keeps its idle connections either way.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::access_log::AccessLog;
use crate::config::Config;
use crate::metrics::RouteMetrics;
use crate::routing::Router;
use crate::upstream::Upstream;

/// One configuration, compiled for the request path.
#[derive(Debug)]
pub struct RuntimeState {
    /// The configuration it was built from.
    pub config: Arc<Config>,
    /// Route tables.
    pub router: Router,
    /// Upstreams, in the order of `config.upstreams`.
    pub upstreams: Vec<Arc<Upstream>>,
    /// The access log, when configured.
    pub access_log: Option<Arc<AccessLog>>,
    /// Whether any route or global filter compresses responses (the compression module is then
    /// armed for every request, to parse `Accept-Encoding`).
    pub compression: bool,
    /// Whether any route caches (a successful unsafe request then invalidates its URL).
    pub caching: bool,
    trusted_proxies: Vec<IpNet>,
    /// Request metrics per route (by index), and for requests no route took.
    route_metrics: Vec<RouteMetrics>,
    unrouted_metrics: RouteMetrics,
}

impl RuntimeState {
    /// Compile a validated configuration (at start-up). Panics only if the access log
    /// cannot be opened; use [`RuntimeState::build`] to handle that.
    pub fn new(config: Config) -> RuntimeState {
        Self::build(config, None).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Compile `config`, carrying live state over from `previous` (a reload). Fails only when
    /// the access log destination cannot be opened.
    pub fn build(config: Config, previous: Option<&RuntimeState>) -> Result<RuntimeState, String> {
        // The one step that can fail goes first: a backend's metric series exist from when it
        // is built, and a failed build must leave none behind.
        let access_log = match &config.access_log {
            None => None,
            Some(cfg) => match previous.and_then(|p| p.access_log.as_ref()) {
                Some(log) if log.config == *cfg => Some(Arc::clone(log)),
                _ => Some(Arc::new(AccessLog::start(cfg).map_err(|e| {
                    format!("access_log.path: cannot open {:?}: {e}", cfg.path)
                })?)),
            },
        };
        let upstreams = config
            .upstreams
            .iter()
            .map(|cfg| {
                let old = previous.and_then(|p| p.upstreams.iter().find(|u| u.name == cfg.name));
                match old {
                    Some(old) if old.config == *cfg => Arc::clone(old),
                    Some(old) => Arc::new(Upstream::succeed(cfg, old)),
                    None => Arc::new(Upstream::new(cfg)),
                }
            })
            .collect();
        let router = Router::new(config.routes.clone());
        let compression = config
            .filters
            .iter()
            .chain(config.routes.iter().flat_map(|r| r.filters.iter()))
            .any(|f| f.compression().is_some());
        let route_metrics = config
            .routes
            .iter()
            .map(|r| RouteMetrics::new(&r.name))
            .collect();
        let caching = config.routes.iter().any(|r| r.cache.is_some());
        Ok(RuntimeState {
            route_metrics,
            unrouted_metrics: RouteMetrics::new("none"),
            compression,
            caching,
            trusted_proxies: config.trusted_proxies.clone(),
            config: Arc::new(config),
            router,
            upstreams,
            access_log,
        })
    }

    /// Is `ip` a trusted proxy (its forwarding headers are believed)?
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.trusted_proxies.iter().any(|n| n.contains(&ip))
    }

    /// The request metrics of the route at `route`, or of requests no route took.
    pub fn route_metrics(&self, route: Option<usize>) -> &RouteMetrics {
        route
            .and_then(|i| self.route_metrics.get(i))
            .unwrap_or(&self.unrouted_metrics)
    }

    /// The upstream named `name`.
    pub fn upstream(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| u.name == name)
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) compare as IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

//! The runtime snapshot: everything a request needs, built whole from one validated
//! [`Config`] and swapped atomically on reload. A request keeps the snapshot it started with.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::config::Config;
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
    trusted_proxies: Vec<IpNet>,
}

impl RuntimeState {
    /// Compile a validated configuration. Infallible: validation already ran.
    pub fn new(config: Config) -> RuntimeState {
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| Arc::new(Upstream::new(u)))
            .collect();
        let router = Router::new(config.routes.clone());
        RuntimeState {
            trusted_proxies: config.trusted_proxies.clone(),
            config: Arc::new(config),
            router,
            upstreams,
        }
    }

    /// Is `ip` a trusted proxy (its forwarding headers are believed)?
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.trusted_proxies.iter().any(|n| n.contains(&ip))
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) compare as IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

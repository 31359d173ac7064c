//! Upstream groups: their backends, the selector that picks one, per-backend in-flight
//! counters, and the Pingora peer each backend is reached through.

pub mod select;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use pingora::upstreams::peer::HttpPeer;

use crate::config::{HashKey, UpstreamConfig};
use select::Select;

/// One backend of an upstream.
#[derive(Debug)]
pub struct Backend {
    /// Address.
    pub addr: SocketAddr,
    /// Weight.
    pub weight: u32,
    peer: HttpPeer,
}

/// A running upstream group, built once per configuration.
#[derive(Debug)]
pub struct Upstream {
    /// Name from the configuration.
    pub name: String,
    backends: Box<[Backend]>,
    in_flight: Box<[AtomicUsize]>,
    selector: Box<dyn Select>,
    /// What `consistent_hash` hashes on.
    pub hash_key: Option<HashKey>,
    /// Further backends tried after a failed connect.
    pub connect_retries: usize,
    /// Whether connections to it are pooled.
    pub reuse_connections: bool,
}

impl Upstream {
    /// Build from a validated configuration.
    pub fn new(cfg: &UpstreamConfig) -> Upstream {
        let weights: Vec<u32> = cfg.backends.iter().map(|b| b.weight).collect();
        let addrs: Vec<SocketAddr> = cfg.backends.iter().map(|b| b.addr).collect();
        let backends: Box<[Backend]> = cfg
            .backends
            .iter()
            .map(|b| {
                let mut peer = HttpPeer::new(b.addr, false, String::new());
                let o = &mut peer.options;
                o.connection_timeout = Some(cfg.connect_timeout);
                o.read_timeout = Some(cfg.read_timeout);
                o.write_timeout = Some(cfg.write_timeout);
                o.idle_timeout = Some(cfg.idle_timeout);
                Backend {
                    addr: b.addr,
                    weight: b.weight,
                    peer,
                }
            })
            .collect();
        Upstream {
            name: cfg.name.clone(),
            in_flight: backends.iter().map(|_| AtomicUsize::new(0)).collect(),
            backends,
            selector: select::build(cfg.balance, &weights, &addrs),
            hash_key: cfg.hash_key.clone(),
            connect_retries: cfg.connect_retries,
            reuse_connections: cfg.pool_size > 0,
        }
    }

    /// The backends, in configuration order.
    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// Requests currently sent to backend `i` and not finished.
    pub fn in_flight(&self, i: usize) -> usize {
        self.in_flight[i].load(Ordering::Relaxed)
    }

    /// Pick a backend for a request hashed on `key`, skipping those `accept` refuses.
    pub fn select(&self, key: &[u8], accept: &dyn Fn(usize) -> bool) -> Option<usize> {
        self.selector.select(key, &self.in_flight, accept)
    }

    /// The Pingora peer for backend `i`, with this upstream's timeouts.
    pub fn peer(&self, i: usize) -> Box<HttpPeer> {
        Box::new(self.backends[i].peer.clone())
    }
}

/// Counts one request against a backend's in-flight number until dropped.
#[derive(Debug)]
pub struct InFlight {
    upstream: Arc<Upstream>,
    index: usize,
}

impl InFlight {
    /// Start counting a request sent to backend `index`.
    pub fn start(upstream: Arc<Upstream>, index: usize) -> InFlight {
        upstream.in_flight[index].fetch_add(1, Ordering::Relaxed);
        InFlight { upstream, index }
    }

    /// The backend being counted.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The upstream it belongs to.
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.upstream.in_flight[self.index].fetch_sub(1, Ordering::Relaxed);
    }
}

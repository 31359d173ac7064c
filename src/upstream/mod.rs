//! Upstream groups: their backends (static and discovered), the selector that picks one, and
//! the per-backend state the resilience features share: in-flight count, health, breaker.
//!
//! The member set lives behind an `ArcSwap`: discovery swaps in a new set, reusing the
//! `Backend` of every address that stays, so health, breaker state and in-flight counts carry
//! over and requests already sent are not disturbed.

pub mod breaker;
pub mod discovery;
pub mod health;
pub mod retry_budget;
pub mod select;
pub mod stats;
mod window;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use pingora::upstreams::peer::HttpPeer;
use prometheus::Histogram;

use crate::config::{UpstreamConfig, UpstreamProtocol};
use breaker::{Admission, Breaker, BreakerState, Outcome, Transition};
use retry_budget::RetryBudget;
use select::Select;

/// One backend and its live state.
#[derive(Debug)]
pub struct Backend {
    /// Address.
    pub addr: SocketAddr,
    /// Weight.
    pub weight: u32,
    peer: HttpPeer,
    in_flight: AtomicUsize,
    healthy: AtomicBool,
    /// Consecutive (passes, failures) of the active health check.
    streak: Mutex<(u32, u32)>,
    breaker: Option<Mutex<Breaker>>,
    /// Breaker transitions into closed, open, half-open.
    transitions: [std::sync::atomic::AtomicU64; 3],
    /// `addr` as text: the `backend` label and the access log's field.
    label: Box<str>,
    /// Its `tollgate_upstream_duration_seconds` series, looked up once, when the backend
    /// joins (lazily, a request finishing after its removal would bring the series back).
    duration: Histogram,
}

impl Backend {
    fn new(addr: SocketAddr, weight: u32, cfg: &UpstreamConfig, now: Instant) -> Backend {
        let label: Box<str> = addr.to_string().into();
        let duration = crate::metrics::metrics()
            .upstream_duration
            .with_label_values(&[cfg.name.as_str(), &label]);
        Backend {
            addr,
            weight,
            peer: peer_for(addr, cfg),
            in_flight: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
            streak: Mutex::new((0, 0)),
            breaker: cfg.breaker.map(|b| Mutex::new(Breaker::new(b, now))),
            transitions: Default::default(),
            label,
            duration,
        }
    }

    /// `addr` as text.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Record one attempt's time to the response head.
    pub fn observe_upstream_duration(&self, seconds: f64) {
        self.duration.observe(seconds);
    }

    /// Count a breaker transition of this backend.
    pub fn count_transition(&self, t: Transition) {
        self.transitions[t.to as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Transitions into `state` so far.
    pub fn transitions(&self, state: BreakerState) -> u64 {
        self.transitions[state as usize].load(Ordering::Relaxed)
    }

    /// Take over the live state of `old` (same address, previous configuration): health,
    /// the health-check streak, breaker state (when its settings did not change) and
    /// transition counts. In-flight counts stay with the old object, which in-flight requests
    /// still hold.
    fn inherit(&self, old: &Backend, health_checked: bool) {
        // Without health checks nothing would ever mark it healthy again: start healthy.
        if health_checked {
            self.healthy.store(old.is_healthy(), Ordering::Relaxed);
            *lock(&self.streak) = *lock(&old.streak);
        }
        if let (Some(new), Some(prev)) = (&self.breaker, &old.breaker) {
            // Probes in flight report to the old breaker: the carried one starts its half-open
            // round afresh, or its probe slots would never be freed.
            let prev = lock(prev).carried_over();
            let mut new = lock(new);
            if new.settings() == prev.settings() {
                *new = prev;
            }
        }
        for (n, o) in self.transitions.iter().zip(&old.transitions) {
            n.store(o.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    /// Requests sent to it and not finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether the active health check counts it healthy (always true without checks).
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Breaker state now (`Closed` when the breaker is disabled).
    pub fn breaker_state(&self, now: Instant) -> BreakerState {
        self.breaker
            .as_ref()
            .map_or(BreakerState::Closed, |b| lock(b).state(now))
    }

    fn breaker_available(&self, now: Instant) -> bool {
        self.breaker.as_ref().is_none_or(|b| lock(b).available(now))
    }

    /// Record an admitted request's outcome; returns a breaker transition to report.
    pub fn record(&self, now: Instant, probe: Option<u32>, outcome: Outcome) -> Option<Transition> {
        lock(self.breaker.as_ref()?).record(now, probe, outcome)
    }

    /// Feed one health-check result; returns the new health when it flips.
    pub fn health_report(
        &self,
        passed: bool,
        healthy_after: u32,
        unhealthy_after: u32,
    ) -> Option<bool> {
        let mut streak = lock(&self.streak);
        *streak = if passed {
            (streak.0 + 1, 0)
        } else {
            (0, streak.1 + 1)
        };
        let was = self.is_healthy();
        let now = if was {
            streak.1 < unhealthy_after
        } else {
            streak.0 >= healthy_after
        };
        (now != was).then(|| {
            self.healthy.store(now, Ordering::Relaxed);
            now
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave them inconsistent; keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The current backends and their selector.
pub struct Members {
    /// Backends, static ones first, then discovered ones in address order.
    pub backends: Vec<Arc<Backend>>,
    selector: Box<dyn Select>,
}

impl std::fmt::Debug for Members {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.backends.iter().map(|b| b.addr))
            .finish()
    }
}

/// Why no backend could be picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// Every backend failed its health checks (503).
    AllUnhealthy {
        /// Suggested `Retry-After`.
        retry_after: Duration,
    },
    /// Every remaining backend's breaker is open (503, without touching the network).
    AllOpen {
        /// When the first breaker admits again.
        retry_after: Duration,
    },
    /// The upstream's in-flight cap is reached (503).
    Overloaded,
    /// No backend is known (discovery found none) or every one failed this request.
    NoneLeft,
}

/// A picked backend.
#[derive(Debug)]
pub struct Pick {
    /// The backend.
    pub backend: Arc<Backend>,
    /// The half-open round it was admitted as a probe in, if any.
    pub probe: Option<u32>,
    /// A breaker transition that admission caused (open → half-open), to report.
    pub transition: Option<Transition>,
}

/// A running upstream group, built once per configuration.
#[derive(Debug)]
pub struct Upstream {
    /// Name from the configuration.
    pub name: String,
    /// Its validated configuration.
    pub config: UpstreamConfig,
    members: ArcSwap<Members>,
    in_flight: AtomicUsize,
    budget: Mutex<RetryBudget>,
    /// The discovered part of the member set, kept to rebuild on change.
    discovered: Mutex<BTreeSet<SocketAddr>>,
    /// Discovery has answered at least once (readiness waits for it).
    discovered_once: std::sync::atomic::AtomicBool,
    /// Resilience counters (retries, transitions, rejections, discovery failures).
    pub stats: stats::UpstreamStats,
}

impl Upstream {
    /// Build from a validated configuration, with its static backends.
    pub fn new(cfg: &UpstreamConfig) -> Upstream {
        let now = Instant::now();
        let backends = cfg
            .backends
            .iter()
            .map(|b| Arc::new(Backend::new(b.addr, b.weight, cfg, now)))
            .collect();
        Upstream {
            name: cfg.name.clone(),
            members: ArcSwap::from_pointee(Self::members_of(cfg, backends)),
            in_flight: AtomicUsize::new(0),
            budget: Mutex::new(RetryBudget::new(cfg.retry.budget_percent, now)),
            discovered: Mutex::new(BTreeSet::new()),
            discovered_once: Default::default(),
            stats: stats::UpstreamStats::default(),
            config: cfg.clone(),
        }
    }

    /// Build from a new configuration of an upstream that already runs as `old`: backends
    /// that remain inherit their live state, and the discovered set is kept until discovery
    /// reports again. (An unchanged upstream is reused whole instead; see `RuntimeState`.)
    pub fn succeed(cfg: &UpstreamConfig, old: &Upstream) -> Upstream {
        let new = Upstream::new(cfg);
        if cfg.discovery.is_some() && cfg.discovery == old.config.discovery {
            let found = lock(&old.discovered).clone();
            if old.discovery_answered() {
                new.set_discovered(found);
            }
        }
        let previous = old.members();
        for b in &new.members().backends {
            if let Some(o) = previous.backends.iter().find(|o| o.addr == b.addr) {
                b.inherit(o, cfg.health.is_some());
            }
        }
        new
    }

    fn members_of(cfg: &UpstreamConfig, backends: Vec<Arc<Backend>>) -> Members {
        let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
        let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
        Members {
            selector: select::build(cfg.balance, &weights, &addrs),
            backends,
        }
    }

    /// Whether this upstream's discovery (if it has one) has answered at least once.
    pub fn discovery_answered(&self) -> bool {
        self.config.discovery.is_none() || self.discovered_once.load(Ordering::Acquire)
    }

    /// The current member set.
    pub fn members(&self) -> Arc<Members> {
        self.members.load_full()
    }

    /// Replace the discovered backends (static ones always stay). Backends that remain keep
    /// their state. Returns (added, removed) addresses; nothing is swapped when nothing changed.
    pub fn set_discovered(
        &self,
        found: BTreeSet<SocketAddr>,
    ) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
        self.discovered_once.store(true, Ordering::Release);
        let mut discovered = lock(&self.discovered);
        if *discovered == found {
            return (Vec::new(), Vec::new());
        }
        let added: Vec<SocketAddr> = found.difference(&discovered).copied().collect();
        let removed: Vec<SocketAddr> = discovered.difference(&found).copied().collect();
        let current = self.members();
        let now = Instant::now();
        let mut backends: Vec<Arc<Backend>> = self
            .config
            .backends
            .iter()
            .filter_map(|b| current.backends.iter().find(|x| x.addr == b.addr).cloned())
            .collect();
        for addr in &found {
            if backends.iter().any(|b| b.addr == *addr) {
                continue; // also listed statically
            }
            let kept = current.backends.iter().find(|b| b.addr == *addr).cloned();
            backends
                .push(kept.unwrap_or_else(|| Arc::new(Backend::new(*addr, 1, &self.config, now))));
        }
        self.members
            .store(Arc::new(Self::members_of(&self.config, backends)));
        *discovered = found;
        let gone: Vec<SocketAddr> = removed
            .iter()
            .filter(|a| !self.config.backends.iter().any(|b| b.addr == **a))
            .copied()
            .collect();
        forget_series(&self.name, &gone);
        (added, removed)
    }

    /// Requests in flight to the whole upstream.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Count a first attempt, made `now`, for the retry budget.
    pub fn budget_request(&self, now: Instant) {
        lock(&self.budget).request(now);
    }

    /// Take one retry from the budget, if it has one.
    pub fn budget_retry(&self) -> bool {
        let granted = lock(&self.budget).try_retry(Instant::now());
        stats::UpstreamStats::inc(if granted {
            &self.stats.retries
        } else {
            &self.stats.retries_refused_by_budget
        });
        granted
    }

    /// Is there a backend a retry could go to (not excluded, healthy, breaker admitting)?
    pub fn has_alternative(&self, excluded: &[SocketAddr]) -> bool {
        let now = Instant::now();
        self.members()
            .backends
            .iter()
            .any(|b| !excluded.contains(&b.addr) && b.is_healthy() && b.breaker_available(now))
    }

    /// Pick a backend for a request hashed on `key`, skipping `excluded` addresses, unhealthy
    /// backends (unless failing open) and backends whose breaker refuses, as of `now`.
    pub fn pick(
        &self,
        key: &[u8],
        excluded: &[SocketAddr],
        now: Instant,
    ) -> Result<Pick, Unavailable> {
        let cap = self.config.max_in_flight;
        if cap > 0 && self.in_flight() >= cap {
            return Err(Unavailable::Overloaded);
        }
        // A borrowed snapshot: no reference-count traffic on the shared member set per pick.
        let m = self.members.load();
        let health = self.config.health.as_ref();
        // No members at all (discovery has found none yet) is "no backend", not "unhealthy".
        let any_healthy =
            health.is_none() || m.backends.is_empty() || m.backends.iter().any(|b| b.is_healthy());
        let ignore_health = health.is_some_and(|h| h.fail_open) && !any_healthy;
        let mut refused: Vec<usize> = Vec::new();
        let load = |i: usize| m.backends[i].in_flight();
        for _ in 0..m.backends.len() {
            let accept = |i: usize| {
                let b = &m.backends[i];
                !excluded.contains(&b.addr)
                    && !refused.contains(&i)
                    && (ignore_health || b.is_healthy())
                    && b.breaker_available(now)
            };
            let Some(i) = m.selector.select(key, &load, &accept) else {
                break;
            };
            let b = &m.backends[i];
            let (admission, transition) = match &b.breaker {
                None => (Admission::Allowed, None),
                Some(br) => lock(br).admit(now),
            };
            match admission {
                Admission::Allowed | Admission::Probe(_) => {
                    return Ok(Pick {
                        backend: Arc::clone(b),
                        probe: match admission {
                            Admission::Probe(round) => Some(round),
                            _ => None,
                        },
                        transition,
                    });
                }
                Admission::Refused { .. } => refused.push(i),
            }
        }
        Err(self.why_unavailable(&m, excluded, any_healthy || ignore_health, now))
    }

    fn why_unavailable(
        &self,
        m: &Members,
        excluded: &[SocketAddr],
        any_healthy: bool,
        now: Instant,
    ) -> Unavailable {
        if !any_healthy {
            let retry_after = self
                .config
                .health
                .as_ref()
                .map_or(Duration::from_secs(1), health::recovery_time);
            return Unavailable::AllUnhealthy { retry_after };
        }
        // Every candidate left is held back by its breaker: say when the first reopens.
        let waits: Option<Vec<Duration>> = m
            .backends
            .iter()
            .filter(|b| !excluded.contains(&b.addr))
            .map(|b| b.breaker.as_ref().map(|br| lock(br).retry_after(now)))
            .collect();
        match waits {
            Some(w) if !w.is_empty() && w.iter().all(|d| !d.is_zero()) => Unavailable::AllOpen {
                retry_after: w.into_iter().min().unwrap_or(Duration::from_secs(1)),
            },
            _ => Unavailable::NoneLeft,
        }
    }

    /// The Pingora peer for `backend`, with this upstream's timeouts.
    pub fn peer(&self, backend: &Backend) -> Box<HttpPeer> {
        Box::new(backend.peer.clone())
    }
}

/// Drop the per-backend latency series (`tollgate_upstream_duration_seconds`) of backends
/// `upstream` no longer has: under discovery, every rollout brings new addresses, and their
/// series would otherwise pile up and be exported for backends long gone. (The other
/// per-backend metrics are built from the live member sets at each scrape.)
fn forget_series(upstream: &str, addrs: &[SocketAddr]) {
    let h = &crate::metrics::metrics().upstream_duration;
    for a in addrs {
        let _ = h.remove_label_values(&[upstream, &a.to_string()]);
    }
}

/// After a reload swapped `new` in for `old`: forget the series of backends no upstream of
/// that name has any more (the upstream removed, or the backend dropped from it).
pub fn forget_removed(old: &[Arc<Upstream>], new: &[Arc<Upstream>]) {
    for u in old {
        let kept = new.iter().find(|n| n.name == u.name).map(|n| n.members());
        let gone: Vec<SocketAddr> = u
            .members()
            .backends
            .iter()
            .map(|b| b.addr)
            .filter(|a| {
                kept.as_ref()
                    .is_none_or(|m| !m.backends.iter().any(|b| b.addr == *a))
            })
            .collect();
        forget_series(&u.name, &gone);
    }
}

/// The TLS server name for a backend: `tls.sni`, else the DNS discovery name, else the
/// backend's IP (rustls then verifies an IP SAN and sends no SNI; Pingora fails on an empty one).
pub fn tls_server_name(cfg: &UpstreamConfig, addr: SocketAddr) -> String {
    let sni = cfg.tls.as_ref().and_then(|t| t.sni.clone());
    sni.unwrap_or_else(|| match &cfg.discovery {
        Some(crate::config::Discovery::Dns { name, .. }) => name.clone(),
        _ => addr.ip().to_string(),
    })
}

/// The Pingora peer for one backend: timeouts, TLS and HTTP version from its upstream.
fn peer_for(addr: SocketAddr, cfg: &UpstreamConfig) -> HttpPeer {
    let mut peer = match &cfg.tls {
        None => HttpPeer::new(addr, false, String::new()),
        Some(tls) => {
            let mut p = HttpPeer::new(addr, true, tls_server_name(cfg, addr));
            p.options.verify_cert = tls.verify;
            p.options.verify_hostname = tls.verify_hostname;
            p.options.ca = tls.ca.clone();
            p.client_cert_key = tls.client.clone();
            // Pingora's pool key ignores the CA and ALPN: keep connections made under other
            // TLS settings apart.
            p.group_key = tls.fingerprint;
            p
        }
    };
    let o = &mut peer.options;
    o.connection_timeout = Some(cfg.connect_timeout);
    o.read_timeout = Some(cfg.read_timeout);
    o.write_timeout = Some(cfg.write_timeout);
    o.idle_timeout = Some(cfg.idle_timeout);
    match cfg.protocol {
        UpstreamProtocol::Http1 => {}
        UpstreamProtocol::Http2 => o.set_http_version(2, 2),
        UpstreamProtocol::Auto => o.set_http_version(2, 1),
    }
    if cfg.protocol != UpstreamProtocol::Http1 {
        o.max_h2_streams = cfg.h2_max_streams;
        // Separate h1 and h2 connections to the same backend in the pool.
        peer.group_key ^= 0x5f3a_9c21 * (cfg.protocol as u64 + 1);
    }
    peer
}

/// Counts one request against a backend's and its upstream's in-flight numbers until dropped.
#[derive(Debug)]
pub struct InFlight {
    upstream: Arc<Upstream>,
    backend: Arc<Backend>,
}

impl InFlight {
    /// Start counting a request sent to `backend` of `upstream`.
    pub fn start(upstream: Arc<Upstream>, backend: Arc<Backend>) -> InFlight {
        upstream.in_flight.fetch_add(1, Ordering::Relaxed);
        backend.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight { upstream, backend }
    }

    /// The backend being counted.
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.upstream.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.backend.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

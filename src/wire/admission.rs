//! Connection caps, and the service wrapper that applies them and the stream guard.
//!
//! [`Guarded`] wraps Pingora's HTTP application as a [`ServerApp`]: Pingora hands it each
//! accepted (and TLS-terminated) connection, it admits or refuses the connection, wraps an
//! HTTP/1 stream in a [`GuardedStream`], and runs the proxy over it for as long as the
//! connection is reused, waiting for each request in the guard (`super::idle`). The caps and
//! limits are read from the live configuration at each accept, so a reload changes them for
//! new connections.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use pingora_core::protocols::ALPN;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::framing::Limits;
use super::splice::Splice;
use super::stream::{GuardedStream, LINGER, LINGER_BYTES};
use crate::runtime::RuntimeState;

/// Which cap refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    /// `server.max_connections`.
    Global,
    /// `server.max_connections_per_ip`.
    PerIp,
}

impl Cap {
    fn label(self) -> &'static str {
        match self {
            Cap::Global => "global",
            Cap::PerIp => "per_ip",
        }
    }
}

/// Open connections, in all and per client address.
#[derive(Debug, Default)]
pub struct Admission {
    open: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct Permit {
    admission: Arc<Admission>,
    ip: Option<IpAddr>,
}

impl Admission {
    /// Admit a connection from `ip` (`None`: not counted per address) under the caps.
    pub fn admit(
        self: &Arc<Self>,
        ip: Option<IpAddr>,
        max: usize,
        max_per_ip: usize,
    ) -> Result<Permit, Cap> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Cap::Global);
        }
        if let Some(ip) = ip {
            let mut per_ip = self.per_ip.lock();
            let n = per_ip.entry(ip).or_insert(0);
            if *n >= max_per_ip {
                drop(per_ip);
                self.open.fetch_sub(1, Ordering::AcqRel);
                return Err(Cap::PerIp);
            }
            *n += 1;
        }
        Ok(Permit {
            admission: Arc::clone(self),
            ip,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Connections open now from `ip`.
    pub fn open_from(&self, ip: IpAddr) -> usize {
        self.per_ip.lock().get(&ip).copied().unwrap_or(0)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            let mut per_ip = self.admission.per_ip.lock();
            if let Some(n) = per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
        self.admission.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A Pingora application behind the connection caps and the stream guard.
pub struct Guarded<A> {
    inner: Arc<A>,
    state: Arc<ArcSwap<RuntimeState>>,
    admission: Arc<Admission>,
    /// The process's default for `server.max_connections` (from its file-descriptor limit).
    auto_max: usize,
    h2c: bool,
}

impl<A> Guarded<A> {
    /// Guard `inner`, one of the services sharing `admission`.
    pub fn new(
        inner: A,
        state: Arc<ArcSwap<RuntimeState>>,
        admission: Arc<Admission>,
        auto_max: usize,
        h2c: bool,
    ) -> Guarded<A> {
        Guarded {
            inner: Arc::new(inner),
            state,
            admission,
            auto_max,
            h2c,
        }
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for Guarded<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let (limits, head_timeout, keepalive, send_timeout, max, max_per_ip, ip) = {
            let state = self.state.load();
            let s = &state.config.server;
            let ip = stream
                .get_socket_digest()
                .and_then(|d| {
                    d.peer_addr()
                        .and_then(|a| a.as_inet())
                        .map(|a| crate::runtime::canonical(a.ip()))
                })
                .filter(|ip| !state.is_trusted(*ip))
                .map(address_key);
            let limits = Limits {
                max_request_line: s.head.max_request_line,
                max_header_size: s.head.max_header_size,
                max_header_count: s.head.max_header_count,
                h2c: self.h2c,
            };
            let c = &s.connections;
            (
                limits,
                c.request_head_timeout,
                s.downstream_keepalive_timeout,
                c.send_timeout,
                c.max.unwrap_or(self.auto_max),
                c.max_per_ip,
                ip,
            )
        };
        let permit = match self.admission.admit(ip, max, max_per_ip) {
            Ok(p) => p,
            Err(cap) => {
                // Boxed: its buffers would otherwise size every connection's future.
                Box::pin(refuse(stream, cap)).await;
                return None;
            }
        };
        let open = crate::proxy::observe::ConnectionGuard::open();
        // tollgate offers only `h2` and `http/1.1` by ALPN (no custom protocols, so none of
        // Pingora's `process_custom_session`), and h2c only on plain listeners.
        if stream.selected_alpn_proto() == Some(ALPN::H2) {
            ServerApp::process_new(&self.inner, stream, shutdown).await;
            drop((open, permit));
            return None;
        }
        let splice = Arc::new(Splice::default());
        let mut guarded = Box::new(GuardedStream::new(
            stream,
            limits,
            head_timeout,
            keepalive,
            send_timeout,
            Arc::clone(&splice),
        ));
        // Until the first request's bytes arrive, the connection holds none of Pingora's
        // per-request state (`super::idle`).
        if super::idle::first_request(&mut guarded, shutdown).await {
            let h2 = if self.h2c {
                super::idle::h2_preface(&mut guarded).await
            } else {
                Some(false)
            };
            match h2 {
                Some(false) => super::idle::serve_http1(&self.inner, guarded, shutdown).await,
                Some(true) => {
                    ServerApp::process_new(&self.inner, guarded, shutdown).await;
                }
                None => {}
            }
        }
        // An upgrade spliced out of Pingora's session runs in a task of its own (this one's
        // future is sized for Pingora's session and TLS handshake: ~9 KiB), still counted as
        // an open connection and under its admission permit.
        if let Some((ends, deferred)) = splice.take_tunnel() {
            tokio::spawn(async move {
                super::tunnel::run(ends, deferred).await;
                drop((open, permit));
            });
        } else {
            drop((open, permit));
        }
        None
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}

/// Answer a connection over a cap with 503 (HTTP/1) and close it.
async fn refuse(mut stream: Stream, cap: Cap) {
    crate::metrics::metrics()
        .connections_refused
        .with_label_values(&[cap.label()])
        .inc();
    log::debug!(
        "connection refused: {} connection limit reached",
        cap.label()
    );
    if stream.selected_alpn_proto() == Some(ALPN::H2) {
        return;
    }
    let body = crate::proxy::error::json_body(
        match cap {
            Cap::Global => "too many connections",
            Cap::PerIp => "too many connections from this address",
        },
        &crate::proxy::request_id::generate(),
    );
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        stream.flush().await
    };
    if tokio::time::timeout(Duration::from_secs(1), write)
        .await
        .is_ok()
    {
        // Read what the client already sent, so closing does not reset the connection before
        // it reads the answer.
        let _ = stream.shutdown().await;
        let mut scratch = [0u8; 2048];
        let mut drained = 0;
        let drain = async {
            while drained < LINGER_BYTES {
                match stream.read(&mut scratch).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => drained += n,
                }
            }
        };
        let _ = tokio::time::timeout(LINGER, drain).await;
    }
}

/// The address a connection counts against for `max_connections_per_ip`: IPv4 addresses as
/// they are, IPv6 by their /64 (what one host or subscriber line is usually given).
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from(
            u128::from(v6) & !((1u128 << 64) - 1),
        )),
    }
}

/// The default `server.max_connections`: half the file descriptors this process may open
/// (each client connection may hold an upstream one), less a reserve for listeners, log files
/// and health checks. Raises the soft `RLIMIT_NOFILE` to the hard limit first, as nginx's
/// `worker_rlimit_nofile` and Go's runtime do.
pub fn fd_budget() -> usize {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    const RESERVE: u64 = 256;
    let Ok((mut soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 384;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        soft = hard;
    }
    let budget = soft.saturating_sub(RESERVE) / 2;
    usize::try_from(budget.clamp(64, 1 << 20)).unwrap_or(1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_and_free_places() {
        let a = Arc::new(Admission::default());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let p1 = a.admit(Some(ip), 3, 2).unwrap();
        let p2 = a.admit(Some(ip), 3, 2).unwrap();
        assert_eq!(a.admit(Some(ip), 3, 2).unwrap_err(), Cap::PerIp);
        let p3 = a.admit(Some(other), 3, 2).unwrap();
        assert_eq!(a.admit(None, 3, 2).unwrap_err(), Cap::Global);
        assert_eq!((a.open(), a.open_from(ip)), (3, 2));
        drop(p1);
        let p4 = a.admit(None, 3, 2).unwrap();
        drop((p2, p3, p4));
        assert_eq!(
            (a.open(), a.open_from(ip), a.per_ip.lock().len()),
            (0, 0, 0)
        );
    }

    #[test]
    fn ipv6_addresses_count_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_eq!(address_key(a), "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        assert_ne!(address_key(a), address_key(other));
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(address_key(v4), v4);
    }

    #[test]
    fn the_fd_budget_leaves_a_reserve() {
        let b = fd_budget();
        let (soft, _) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        assert!(b >= 64 && (b as u64) < soft, "{b} of {soft}");
    }
}

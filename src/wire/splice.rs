//! Taking an upgraded connection (a WebSocket) out of Pingora's proxy loop once its handshake
//! is done, so that it costs a few KiB instead of Pingora's ~70 (docs/performance.md).
//!
//! Pingora does the handshake as for any request: routing, filters, balancer, breaker,
//! retries, the `101`'s response filters. For a WebSocket upgrade to a plain-HTTP backend,
//! `upstream_peer` [arms](Splice::arm) the client connection's [`Splice`] and gives Pingora a
//! connector ([`SpliceConnect`]) whose connection to the backend is an [`UpstreamSide`]. Then,
//! in this order:
//!
//! 1. The upstream side watches the response heads Pingora reads. At the end of a `101` head it
//!    hands Pingora nothing more: it deposits its socket, with whatever the backend sent after
//!    the head, in the splice. Pingora's further reads wait.
//! 2. The client connection's guard ([`super::GuardedStream`]) sees Pingora write the whole
//!    `101` head. It [joins](Splice::join) the splice: it gives up its own connection, with
//!    whatever the client sent after the upgrade request (which the guard holds back until the
//!    answer is known). Both sides now read as closed to Pingora, which has nothing of the
//!    tunnel buffered in either direction and ends the session.
//! 3. The `logging` phase [defers](Splice::defer) the request's record (metrics, access log,
//!    in-flight counts) to the tunnel, and the connection's task (`Guarded::process_new`) runs
//!    the tunnel ([`super::tunnel`]) with both ends, then records the request.
//!
//! Nothing is spliced unless each step happens, in this order, for the armed attempt; else
//! Pingora relays the connection itself as before: TLS backends, HTTP/2 clients, a pooled
//! connection reused for the upgrade, a `101` Pingora does not forward.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::protocols::Stream;
use pingora::upstreams::peer::HttpPeer;
use pingora_core::connectors::L4Connect;
use pingora_core::protocols::l4::socket::SocketAddr;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::l4::virt::{VirtualSockOpt, VirtualSocket, VirtualSocketStream};
use pingora_error::{Error, ErrorType, Result};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::tunnel::{Deferred, Ends};

/// A response head longer than this is not watched for a `101` (Pingora refuses it anyway).
const MAX_WATCHED_HEAD: usize = 64 << 10;

/// Peers whose connections go through a [`SpliceConnect`] are pooled apart from the others.
const SPLICE_GROUP: u64 = 0x7e1a_5b0c_3d29_c4f1;

/// One client connection's splice: where the two ends of an upgraded connection meet.
#[derive(Debug, Default)]
pub struct Splice {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The attempt allowed to splice (0: none).
    armed: u64,
    /// The last attempt id given out.
    last: u64,
    /// The backend's end, deposited at the end of its `101` head.
    backend: Option<(TcpStream, Vec<u8>)>,
    /// Pingora's reader on the upstream side, parked once that side has deposited its socket.
    parked: Option<Waker>,
    /// Both ends, once joined.
    ends: Option<Ends>,
    /// The request's record, from the `logging` phase.
    deferred: Option<Deferred>,
}

impl State {
    fn wake_parked(&mut self) {
        if let Some(w) = self.parked.take() {
            w.wake();
        }
    }
}

impl Splice {
    /// A new attempt of a request on this connection may splice; any earlier one may not.
    pub fn arm(&self) -> u64 {
        let mut s = self.state.lock();
        s.last += 1;
        s.armed = s.last;
        s.backend = None;
        s.wake_parked();
        s.armed
    }

    /// Route `peer`'s new connection through the splice: it is the armed attempt's.
    pub fn arm_peer(self: &Arc<Self>, peer: &mut HttpPeer) {
        let connect = SpliceConnect {
            splice: Arc::clone(self),
            id: self.arm(),
            timeout: peer.options.connection_timeout,
        };
        peer.options.custom_l4 = Some(Arc::new(connect));
        // Pingora's pool key ignores the connector: keep these connections apart, so that no
        // other request is offered one. They cannot be reused anyway (a virtual socket has no
        // fd for the pool's checks, and its id is -1 for all of them): a refused upgrade's
        // connection, handed back to the pool, is closed at once.
        peer.group_key ^= SPLICE_GROUP;
        peer.options.idle_timeout = Some(Duration::ZERO);
    }

    /// Step 1: the backend answered `101`; keep its socket if `id` is still the armed attempt.
    pub(super) fn deposit(&self, id: u64, socket: TcpStream, early: Vec<u8>) -> Option<TcpStream> {
        let mut s = self.state.lock();
        if s.armed != id || s.ends.is_some() {
            return Some(socket);
        }
        s.backend = Some((socket, early));
        None
    }

    /// Pingora reads the deposited upstream side: wait until the splice is joined (or given
    /// up), then end of stream.
    fn poll_parked(&self, id: u64, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.state.lock();
        if s.armed == id && s.backend.is_some() {
            s.parked = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(())
    }

    /// Step 2: Pingora wrote the whole `101` head to the client. If the backend's end is here,
    /// take the client's from `client` and join them.
    pub fn join(&self, client: impl FnOnce() -> (Stream, Vec<u8>)) -> bool {
        let mut s = self.state.lock();
        let Some((backend, backend_early)) = s.backend.take() else {
            return false;
        };
        let (client, client_early) = client();
        s.ends = Some(Ends {
            client,
            client_early,
            backend,
            backend_early,
        });
        s.armed = 0;
        s.wake_parked();
        true
    }

    /// Both ends are joined.
    #[cfg(test)]
    pub fn is_joined(&self) -> bool {
        self.state.lock().ends.is_some()
    }

    /// The request's session is over: were both ends joined (the connection is the
    /// tunnel's)? If not, release anything the attempt left here.
    pub fn settle(&self) -> bool {
        let mut s = self.state.lock();
        if s.ends.is_some() {
            return true;
        }
        s.armed = 0;
        s.backend = None;
        s.wake_parked();
        false
    }

    /// Step 3: record the request when the tunnel ends.
    pub fn defer(&self, deferred: Deferred) {
        self.state.lock().deferred = Some(deferred);
    }

    /// The tunnel to run, once Pingora's session is over.
    pub fn take_tunnel(&self) -> Option<(Ends, Deferred)> {
        let mut s = self.state.lock();
        match (s.ends.take(), s.deferred.take()) {
            (Some(ends), Some(deferred)) => Some((ends, deferred)),
            _ => None,
        }
    }
}

/// The connector Pingora uses for an armed upgrade's backend connection. It replaces
/// Pingora's TCP connect, so it does what tollgate's peers use: the connect timeout, and (set
/// by Pingora after connecting, through [`VirtualSocket::set_socket_option`]) nodelay and TCP
/// keepalive. Peer options tollgate never sets (bind address or port range, TCP fast open,
/// receive buffer, DSCP, a socket tweak hook) are not applied here: arm nothing that sets them.
#[derive(Debug)]
pub struct SpliceConnect {
    splice: Arc<Splice>,
    id: u64,
    timeout: Option<Duration>,
}

#[async_trait]
impl L4Connect for SpliceConnect {
    async fn connect(&self, addr: &SocketAddr) -> Result<L4Stream> {
        let SocketAddr::Inet(inet) = addr else {
            return Error::e_explain(ErrorType::InternalError, "splice: not an IP backend");
        };
        let connect = TcpStream::connect(*inet);
        let res = match self.timeout {
            Some(t) => match tokio::time::timeout(t, connect).await {
                Ok(res) => res,
                Err(_) => {
                    return Error::e_explain(
                        ErrorType::ConnectTimedout,
                        format!("timeout {t:?} connecting to server {addr}"),
                    );
                }
            },
            None => connect.await,
        };
        let socket = res.map_err(|e| connect_error(e, addr))?;
        let side = UpstreamSide {
            splice: Arc::clone(&self.splice),
            id: self.id,
            socket: Some(socket),
            watch: HeadWatch::default(),
        };
        Ok(L4Stream::from(VirtualSocketStream::new(Box::new(side))))
    }
}

/// The error type Pingora's own connector gives the same failure (retries and the breaker
/// classify by it).
fn connect_error(e: io::Error, addr: &SocketAddr) -> Box<Error> {
    let etype = match e.kind() {
        io::ErrorKind::ConnectionRefused => ErrorType::ConnectRefused,
        io::ErrorKind::TimedOut => ErrorType::ConnectTimedout,
        io::ErrorKind::AddrNotAvailable => ErrorType::BindError,
        io::ErrorKind::PermissionDenied | io::ErrorKind::AddrInUse => ErrorType::InternalError,
        _ => match e.raw_os_error() {
            Some(nix::libc::ENETUNREACH | nix::libc::EHOSTUNREACH) => ErrorType::ConnectNoRoute,
            _ => ErrorType::ConnectError,
        },
    };
    Error::because(etype, format!("Fail to connect to {addr}"), e)
}

/// The backend connection of an armed upgrade, as Pingora reads and writes it.
#[derive(Debug)]
pub struct UpstreamSide {
    splice: Arc<Splice>,
    id: u64,
    /// None once deposited in the splice.
    socket: Option<TcpStream>,
    watch: HeadWatch,
}

impl VirtualSocket for UpstreamSide {
    fn set_socket_option(&self, opt: VirtualSockOpt) -> io::Result<()> {
        let Some(s) = &self.socket else {
            return Ok(());
        };
        match opt {
            VirtualSockOpt::NoDelay => s.set_nodelay(true),
            VirtualSockOpt::KeepAlive(ka) => {
                pingora_core::protocols::l4::ext::set_tcp_keepalive(s, &ka)
                    .map_err(|e| io::Error::other(e.to_string()))
            }
            _ => Ok(()),
        }
    }
}

impl AsyncRead for UpstreamSide {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(socket) = this.socket.as_mut() else {
            ready!(this.splice.poll_parked(this.id, cx));
            return Poll::Ready(Ok(()));
        };
        if this.watch.done() {
            return Pin::new(socket).poll_read(cx, out);
        }
        let before = out.filled().len();
        ready!(Pin::new(socket).poll_read(cx, out))?;
        let read = &out.filled()[before..];
        if read.is_empty() {
            this.watch.give_up();
        } else if let Some(end) = this.watch.feed(read) {
            let early = read[end..].to_vec();
            let socket = this.socket.take().expect("checked above");
            match this.splice.deposit(this.id, socket, early) {
                None => out.set_filled(before + end),
                Some(socket) => this.socket = Some(socket),
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Bytes written after the deposit would be lost: refuse them.
fn spliced_away() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "connection spliced into a tunnel",
    )
}

impl AsyncWrite for UpstreamSide {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().socket.as_mut() {
            Some(s) => Pin::new(s).poll_write(cx, buf),
            None if buf.is_empty() => Poll::Ready(Ok(0)),
            None => Poll::Ready(Err(spliced_away())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().socket.as_mut() {
            Some(s) => Pin::new(s).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().socket.as_mut() {
            Some(s) => Pin::new(s).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

/// The client's end as Pingora sees it once joined: closed, and nothing may be written.
#[derive(Debug)]
struct Detached;

impl VirtualSocket for Detached {
    fn set_socket_option(&self, _opt: VirtualSockOpt) -> io::Result<()> {
        Ok(())
    }
}

impl AsyncRead for Detached {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Detached {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            Poll::Ready(Ok(0))
        } else {
            Poll::Ready(Err(spliced_away()))
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// What the guard keeps in place of the client's connection once it is joined.
pub fn detached() -> Stream {
    Box::new(L4Stream::from(VirtualSocketStream::new(Box::new(Detached))))
}

/// Finds the end of a `101` head in the response bytes read from a backend: interim (`1xx`)
/// heads are skipped, anything else ends the watch.
#[derive(Debug, Default)]
pub struct HeadWatch {
    /// The status line's first 13 bytes (`HTTP/1.1 101 `).
    line: [u8; 13],
    len: usize,
    /// The head being read is a `101` (status line read), or another interim one.
    upgrade: Option<bool>,
    /// Line-end state: 1 after `\n`, 2 after `\n\r`.
    nl: u8,
    /// Bytes of the head seen.
    seen: usize,
    done: bool,
}

impl HeadWatch {
    /// Nothing more to find.
    pub fn done(&self) -> bool {
        self.done
    }

    fn give_up(&mut self) {
        self.done = true;
    }

    /// Feed the next bytes; the offset just past a `101` head's end if it is in `bytes`.
    pub fn feed(&mut self, bytes: &[u8]) -> Option<usize> {
        for (i, &b) in bytes.iter().enumerate() {
            if self.done {
                return None;
            }
            self.seen += 1;
            if self.seen > MAX_WATCHED_HEAD {
                self.done = true;
                return None;
            }
            let Some(upgrade) = self.upgrade else {
                self.line[self.len] = b;
                self.len += 1;
                if self.len < self.line.len() {
                    continue;
                }
                // `HTTP/1.x 1xx` and the byte after the status code.
                let l = &self.line;
                if !l.starts_with(b"HTTP/1.")
                    || l[8] != b' '
                    || l[9] != b'1'
                    || !matches!(l[12], b' ' | b'\r' | b'\n')
                {
                    self.done = true; // a final answer, or not HTTP/1
                    return None;
                }
                self.upgrade = Some(&l[9..12] == b"101");
                if b == b'\n' {
                    self.nl = 1;
                }
                continue;
            };
            match (b, self.nl) {
                (b'\n', 1 | 2) => {
                    if upgrade {
                        self.done = true;
                        return Some(i + 1);
                    }
                    // An interim head ended: the next head follows.
                    *self = HeadWatch::default();
                }
                (b'\n', _) => self.nl = 1,
                (b'\r', 1) => self.nl = 2,
                _ => self.nl = 0,
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end_of(chunks: &[&[u8]]) -> Option<(usize, usize)> {
        let mut w = HeadWatch::default();
        for (i, c) in chunks.iter().enumerate() {
            if let Some(at) = w.feed(c) {
                return Some((i, at));
            }
        }
        None
    }

    #[test]
    fn finds_the_end_of_a_101_head_in_any_split() {
        let head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n";
        let mut all = head.to_vec();
        all.extend_from_slice(b"\x81\x02hi");
        assert_eq!(end_of(&[&all]), Some((0, head.len())));
        for cut in 1..all.len() {
            let (a, b) = all.split_at(cut);
            let want = if cut >= head.len() {
                (0, head.len())
            } else {
                (1, head.len() - cut)
            };
            assert_eq!(end_of(&[a, b]), Some(want), "cut at {cut}");
        }
    }

    #[test]
    fn skips_interim_heads_and_accepts_bare_line_feeds() {
        let interim = b"HTTP/1.1 100 Continue\r\n\r\n";
        let up = b"HTTP/1.1 101 Switching Protocols\nUpgrade: websocket\n\n";
        let all = [&interim[..], &up[..]].concat();
        assert_eq!(end_of(&[&all]), Some((0, all.len())));
        let mixed = b"HTTP/1.1 101 OK\r\nA: b\n\r\n";
        assert_eq!(end_of(&[mixed]), Some((0, mixed.len())));
    }

    #[test]
    fn a_final_answer_or_garbage_ends_the_watch() {
        for head in [
            &b"HTTP/1.1 200 OK\r\n\r\nHTTP/1.1 101 x\r\n\r\n"[..],
            b"HTTP/1.1 403 Forbidden\r\n\r\n",
            b"ICY 101 hello\r\n\r\n...",
            b"HTTP/1.1 1010 x\r\n\r\n",
        ] {
            let mut w = HeadWatch::default();
            assert_eq!(w.feed(head), None, "{}", String::from_utf8_lossy(head));
            assert!(w.done());
        }
        let mut w = HeadWatch::default();
        let long = [
            b"HTTP/1.1 101 x\r\nA: ".as_slice(),
            &[b'a'; MAX_WATCHED_HEAD],
        ]
        .concat();
        assert_eq!(w.feed(&long), None);
        assert!(w.done());
        assert_eq!(w.feed(b"\r\n\r\n"), None);
    }
}

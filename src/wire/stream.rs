//! The client connection as Pingora reads it: [`GuardedStream`] runs [`Framing`] over the
//! bytes, holds each request head back until it is complete and valid, enforces the head
//! deadline, and answers what it refuses itself.
//!
//! Holding heads back means Pingora never sees a refused head, so a refusal is one response
//! and a close, not a Pingora parse error. Body bytes are handed through as they arrive (never
//! buffered); a body that turns malformed ends in a read error at the exact byte, so Pingora
//! aborts the upstream request instead of completing it.
//!
//! A refusal is answered only when no response is in flight on the connection (otherwise the
//! answer would land inside it): [`GuardedStream::response_done`], called from the proxy's
//! `logging` phase, counts the finished ones.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType,
};
use pingora_core::protocols::ALPN;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::tls::{SslDigest, TlsRef};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::framing::{Framing, Limits, Phase, Violation};

/// Bytes read at a time into `held`.
const READ_CHUNK: usize = 4096;
/// Held bytes an upgrade's early tunnel data may fill before reading pauses.
const MAX_HELD_UPGRADE: usize = 64 << 10;
/// After answering a refusal, read and discard what the client still sends for this long (so
/// closing with unread data does not reset the connection before the answer is read).
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 << 10;

/// The request-stream guard around one client connection.
#[derive(Debug)]
pub struct GuardedStream {
    inner: Stream,
    framing: Framing,
    /// Read but not yet handed to Pingora: `held[..fed]` judged, `held[..ready]` deliverable,
    /// `held[..delivered]` delivered.
    held: Vec<u8>,
    fed: usize,
    ready: usize,
    delivered: usize,
    /// A body turned malformed at the end of what was delivered.
    failed: Option<Violation>,
    refusal: Option<Refusing>,
    head_timeout: Duration,
    deadline: Pin<Box<Sleep>>,
    armed: bool,
    /// Request heads handed to Pingora, and responses it has finished.
    heads: u64,
    answered: AtomicU64,
    /// The reader waiting while an upgrade's answer is unknown.
    parked: Option<Waker>,
}

#[derive(Debug)]
struct Refusing {
    answer: Vec<u8>,
    written: usize,
    stage: Stage,
    lingered: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Write,
    Flush,
    Shutdown,
    Linger,
    Done,
}

/// Why a connection was refused, for the metric and the log.
pub fn refused_metric(status: u16) {
    crate::metrics::metrics()
        .protocol_refusals
        .with_label_values(&[crate::metrics::status_label(status)])
        .inc();
}

impl GuardedStream {
    /// Guard `inner`; the first head's deadline starts now.
    pub fn new(inner: Stream, limits: Limits, head_timeout: Duration) -> GuardedStream {
        GuardedStream {
            inner,
            framing: Framing::new(limits),
            held: Vec::new(),
            fed: 0,
            ready: 0,
            delivered: 0,
            failed: None,
            refusal: None,
            head_timeout,
            deadline: Box::pin(tokio::time::sleep(head_timeout)),
            armed: true,
            heads: 0,
            answered: AtomicU64::new(0),
            parked: None,
        }
    }

    /// Pingora finished a response on this connection (called from the `logging` phase).
    pub fn response_done(&self) {
        self.answered.fetch_add(1, Ordering::Relaxed);
    }

    /// The guard under a Pingora stream, if it is one.
    pub fn of(stream: &Stream) -> Option<&GuardedStream> {
        (**stream).as_any().downcast_ref::<GuardedStream>()
    }

    fn idle(&self) -> bool {
        self.answered.load(Ordering::Relaxed) >= self.heads
    }

    /// Refuse: answer `v` (when no response is in flight) and close.
    fn refuse(&mut self, v: Violation) {
        refused_metric(v.status);
        log::debug!(
            "refused a request before routing: {} {}",
            v.status,
            v.reason
        );
        let answer = if self.idle() { answer(v) } else { Vec::new() };
        self.held = Vec::new();
        self.fed = 0;
        self.ready = 0;
        self.delivered = 0;
        self.refusal = Some(Refusing {
            stage: if answer.is_empty() {
                Stage::Done
            } else {
                Stage::Write
            },
            answer,
            written: 0,
            lingered: 0,
        });
    }

    /// Write the refusal, close our side, drain briefly; then report end of stream.
    fn poll_refusal(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(r) = self.refusal.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        loop {
            match r.stage {
                Stage::Write => {
                    while r.written < r.answer.len() {
                        match ready!(
                            Pin::new(&mut self.inner).poll_write(cx, &r.answer[r.written..])
                        ) {
                            Ok(0) | Err(_) => {
                                r.stage = Stage::Done;
                                break;
                            }
                            Ok(n) => r.written += n,
                        }
                    }
                    if r.stage == Stage::Write {
                        r.stage = Stage::Flush;
                    }
                }
                Stage::Flush => {
                    let _ = ready!(Pin::new(&mut self.inner).poll_flush(cx));
                    r.stage = Stage::Shutdown;
                }
                Stage::Shutdown => {
                    let _ = ready!(Pin::new(&mut self.inner).poll_shutdown(cx));
                    self.deadline.as_mut().reset(Instant::now() + LINGER);
                    r.stage = Stage::Linger;
                }
                Stage::Linger => {
                    let mut scratch = [0u8; 2048];
                    let mut buf = ReadBuf::new(&mut scratch);
                    match Pin::new(&mut self.inner).poll_read(cx, &mut buf) {
                        Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                            r.lingered += buf.filled().len();
                            if r.lingered > LINGER_BYTES {
                                r.stage = Stage::Done;
                            }
                        }
                        Poll::Ready(_) => r.stage = Stage::Done,
                        Poll::Pending => {
                            ready!(self.deadline.as_mut().poll(cx));
                            r.stage = Stage::Done;
                        }
                    }
                }
                Stage::Done => return Poll::Ready(Ok(())),
            }
        }
    }

    /// Judge the held bytes not judged yet.
    fn feed_held(&mut self) {
        while self.fed < self.held.len() {
            let was_head = self.framing.phase() == Phase::Head;
            match self.framing.feed(&self.held[self.fed..]) {
                Err(v) => return self.refuse(v),
                Ok(f) => {
                    self.fed += f.used;
                    let phase = self.framing.phase();
                    if was_head && (f.complete || phase != Phase::Head) {
                        self.heads += 1;
                    }
                    if f.complete || phase != Phase::Head {
                        self.ready = self.fed;
                    }
                    if f.used == 0 && !f.complete {
                        break; // waiting for an upgrade's answer
                    }
                }
            }
        }
        self.arm();
    }

    /// Run the head deadline while a head is partly here, and for a new connection's first
    /// (which starts at accept); an idle kept-alive connection is the keep-alive timeout's.
    fn arm(&mut self) {
        let first = self.heads == 0;
        if self.framing.phase() != Phase::Head || !(first || self.framing.head_started()) {
            self.armed = false;
        } else if !self.armed {
            self.armed = true;
            self.deadline
                .as_mut()
                .reset(Instant::now() + self.head_timeout);
        }
    }

    /// Hand out deliverable held bytes.
    fn deliver(&mut self, out: &mut ReadBuf<'_>) {
        let n = out.remaining().min(self.ready - self.delivered);
        out.put_slice(&self.held[self.delivered..self.delivered + n]);
        self.delivered += n;
        if self.delivered == self.held.len() {
            self.held = Vec::new();
            self.fed = 0;
            self.ready = 0;
            self.delivered = 0;
        }
    }

    /// Read body (or tunnel) bytes straight into Pingora's buffer, judging them there.
    fn poll_body(&mut self, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = out.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, out))?;
        let end = out.filled().len();
        let mut at = before;
        while at < end {
            match self.framing.feed(&out.filled()[at..end]) {
                Err(v) => {
                    refused_metric(v.status);
                    log::debug!("refused a request body: {}", v.reason);
                    out.set_filled(at);
                    if at == before {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            v.reason,
                        )));
                    }
                    self.failed = Some(v);
                    break;
                }
                Ok(f) => {
                    at += f.used;
                    if f.complete || f.used == 0 {
                        // The next head (or an upgrade's early data) is held back from here.
                        self.held.extend_from_slice(&out.filled()[at..end]);
                        out.set_filled(at);
                        if f.complete {
                            self.arm();
                        }
                        break;
                    }
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Read more of a head (or early upgrade data) into `held`.
    fn poll_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let waiting = self.framing.phase() == Phase::AwaitUpgrade;
        if waiting && self.held.len() >= MAX_HELD_UPGRADE {
            self.parked = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let len = self.held.len();
        self.held.resize(len + READ_CHUNK, 0);
        let mut buf = ReadBuf::new(&mut self.held[len..]);
        let polled = Pin::new(&mut self.inner).poll_read(cx, &mut buf);
        let n = buf.filled().len();
        self.held.truncate(len + n);
        match polled {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(n)),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if waiting {
                    self.parked = Some(cx.waker().clone());
                } else if self.armed && self.deadline.as_mut().poll(cx).is_ready() {
                    self.refuse(Violation {
                        status: 408,
                        reason: "request head not received in time",
                    });
                    return Poll::Ready(Ok(0));
                }
                Poll::Pending
            }
        }
    }

    /// Note the status of an upgrade's answer as Pingora writes it.
    fn watch_answer(&mut self, buf: &[u8]) {
        if self.framing.phase() != Phase::AwaitUpgrade
            || buf.len() < 12
            || !buf.starts_with(b"HTTP/1.")
        {
            return;
        }
        match &buf[9..12] {
            b"101" => self.framing.upgraded(),
            [b'1', _, _] => return, // interim; the final answer follows
            _ => self.framing.upgrade_refused(),
        }
        if let Some(w) = self.parked.take() {
            w.wake();
        }
    }
}

/// The response for a refusal: the gateway's JSON error, and a close.
fn answer(v: Violation) -> Vec<u8> {
    let body = crate::proxy::error::json_body(v.reason, &crate::proxy::request_id::generate());
    let reason = http::StatusCode::from_u16(v.status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        v.status,
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.refusal.is_some() {
                return this.poll_refusal(cx);
            }
            if this.delivered < this.ready {
                this.deliver(out);
                return Poll::Ready(Ok(()));
            }
            if let Some(v) = this.failed.take() {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, v.reason)));
            }
            let phase = this.framing.phase();
            if this.fed < this.held.len() && phase != Phase::AwaitUpgrade {
                this.feed_held();
                continue;
            }
            if this.held.is_empty() && matches!(phase, Phase::Body | Phase::Tunnel | Phase::Opaque)
            {
                return if phase == Phase::Body {
                    this.poll_body(cx, out)
                } else {
                    Pin::new(&mut this.inner).poll_read(cx, out)
                };
            }
            // A head (or an upgrade's answer) is awaited: read into `held`.
            match ready!(this.poll_more(cx))? {
                0 if this.refusal.is_some() => continue,
                // End of stream: a partial head is dropped unseen (Pingora sees a clean close).
                0 => return Poll::Ready(Ok(())),
                _ => {
                    if phase == Phase::Head {
                        this.feed_held();
                    }
                }
            }
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.watch_answer(buf);
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            this.watch_answer(first);
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for GuardedStream {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await;
    }
}

impl UniqueID for GuardedStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for GuardedStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<std::sync::Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for GuardedStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for GuardedStream {
    fn get_proxy_digest(&self) -> Option<std::sync::Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest);
    }
}

impl GetSocketDigest for GuardedStream {
    fn get_socket_digest(&self) -> Option<std::sync::Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest);
    }
}

#[async_trait]
impl Peek for GuardedStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        if self.held.is_empty() {
            self.inner.try_peek(buf).await
        } else {
            Ok(false)
        }
    }
}

//! The client connection as Pingora reads it: [`GuardedStream`] runs [`Framing`] over the
//! bytes, holds each request head back until it is complete and valid, enforces the head
//! deadline, and answers what it refuses itself.
//!
//! Holding heads back means Pingora never sees a refused head, so a refusal is one response
//! and a close, not a Pingora parse error. Body bytes are handed through as they arrive (never
//! buffered); a body that turns malformed ends in a read error at the exact byte, so Pingora
//! aborts the upstream request instead of completing it.
//!
//! A refusal is answered once no response is in flight on the connection (an answer would
//! land inside it, and an early close would abort it): [`GuardedStream::response_done`],
//! called from the proxy's `logging` phase, counts the finished ones.
//!
//! Writes to the client run under the send timeout as a progress timer (`WriteStall`): a
//! write, flush or shutdown that cannot proceed for that long fails, and so does every later
//! one, whatever Pingora is writing (a response head, a body, the final flush, an answer of
//! the guard's own). Request body reads run under `server.min_body_rate` (`BodyPace`). One
//! read hands Pingora at most one message, so it never reads past a request's end, and a
//! pipelined next request is judged and handed on only once the response in flight is done
//! (before, an upgrade request would take that response for its answer).
//!
//! After an upgrade request, the client's bytes are held until the answer is known; once the
//! whole `101` head is written, the guard joins the connection's [`Splice`] if the backend's
//! end waits there, and from then on reads as closed to Pingora (`super::splice`).

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::task::AtomicWaker;
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
use super::splice::Splice;

/// Bytes read at a time into `held`.
const READ_CHUNK: usize = 4096;
/// Held bytes an upgrade's early tunnel data may fill before reading pauses.
const MAX_HELD_UPGRADE: usize = 64 << 10;
/// Bytes of pipelined requests read on while a response is in flight (to see a close) before
/// reading pauses: the client's socket buffers the rest.
const MAX_HELD_PIPELINED: usize = READ_CHUNK;
/// After answering a refusal, read and discard what the client still sends for this long (so
/// closing with unread data does not reset the connection before the answer is read).
pub const LINGER: Duration = Duration::from_secs(1);
/// And at most this much.
pub const LINGER_BYTES: usize = 64 << 10;
/// What Pingora's h2c detection peeks for (its only use of `try_peek`).
pub(super) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

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
    /// Where the message being judged starts in `held`.
    msg_start: usize,
    /// A body turned malformed at the end of what was delivered.
    failed: Option<Violation>,
    /// A head turned malformed after `held[..ready]`, which is delivered first.
    violation: Option<Violation>,
    refusal: Option<Refusing>,
    head_timeout: Duration,
    keepalive: Duration,
    born: Instant,
    deadline: Pin<Box<Sleep>>,
    /// When the head being read must be complete (none: no head is awaited).
    head_deadline: Option<Instant>,
    /// Request heads handed to Pingora, and responses it has finished (the last one this long
    /// after `born`, in nanoseconds).
    heads: u64,
    answered: AtomicU64,
    answered_at: AtomicU64,
    /// A reader waiting for the response in flight to finish (to answer a refusal).
    answered_waker: AtomicWaker,
    /// The reader waiting while an upgrade's answer is unknown (or its `101` head unwritten).
    parked: Option<Waker>,
    answer: AnswerWatch,
    /// Where an upgraded connection may leave Pingora (`super::splice`).
    splice: Arc<Splice>,
    stall: WriteStall,
    /// The request body being read, against `server.min_body_rate`.
    pace: BodyPace,
    /// The client closed its side while pipelined requests were held: reads report the end
    /// of the stream once they are handed on.
    eof: bool,
}

/// What a slow request body fails its read with (the proxy answers it 408).
pub const BODY_TOO_SLOW: &str = "request body slower than min_body_rate";

/// A request body's pace: the time its reads waited for the client may add up to `grace`
/// (`body_idle_timeout`) plus one second per `rate` bytes received (Apache's `mod_reqtimeout`
/// MinRate). Only waits of a read count: while Pingora does not read (the upstream is slow to
/// take the body) or writes a response, the client keeps nobody waiting.
#[derive(Debug)]
struct BodyPace {
    /// Set per request, in nanoseconds.
    grace: AtomicU64,
    /// Bytes per second, set per request; 0: no floor.
    rate: AtomicU64,
    waited: Duration,
    /// A read has waited since then.
    since: Option<Instant>,
    received: u64,
}

impl BodyPace {
    /// A new request (and its body, if any).
    fn start(&mut self) {
        self.waited = Duration::ZERO;
        self.since = None;
        self.received = 0;
    }

    /// A read waits: when its wait runs out (`None`: never).
    fn deadline(&mut self) -> Option<Instant> {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 {
            return None;
        }
        let since = *self.since.get_or_insert_with(Instant::now);
        let earned = u128::from(self.received) * 1_000_000_000 / u128::from(rate);
        let budget = Duration::from_nanos(self.grace.load(Ordering::Relaxed)).saturating_add(
            Duration::from_nanos(u64::try_from(earned).unwrap_or(u64::MAX)),
        );
        since.checked_add(budget.saturating_sub(self.waited))
    }

    /// A read returned with `n` bytes.
    fn arrived(&mut self, n: usize) {
        self.pause();
        self.received = self.received.saturating_add(n as u64);
    }

    /// Pingora writes to the client: a read it left waiting (a `select!` branch it dropped to
    /// write a response while the body comes) is not waited on meanwhile. A read polled again
    /// starts a new wait.
    fn pause(&mut self) {
        if let Some(since) = self.since.take() {
            self.waited += since.elapsed();
        }
    }
}

/// The send timeout as a progress timer over writes to the client: from the first write (or
/// flush, or shutdown) that cannot proceed, the client has the timeout to take something;
/// any write that proceeds restarts the clock. Once it runs out, every write fails (so
/// Pingora, failing, does not wait again to write an error answer nobody reads).
#[derive(Debug)]
struct WriteStall {
    /// The timeout in nanoseconds: set per request (a reload applies to the next one).
    timeout: AtomicU64,
    /// Created at the first stall, then reset (most connections never stall).
    timer: Option<Pin<Box<Sleep>>>,
    /// A stall is being timed (from a write that returned pending; none of Pingora's HTTP/1
    /// paths abandons one, so the next write continues it).
    stalled: bool,
    expired: bool,
}

impl WriteStall {
    fn new(timeout: Duration) -> WriteStall {
        WriteStall {
            timeout: AtomicU64::new(nanos(timeout)),
            timer: None,
            stalled: false,
            expired: false,
        }
    }

    /// Run one write operation on the client's stream under the timer.
    fn poll<T>(
        &mut self,
        cx: &mut Context<'_>,
        op: impl FnOnce(&mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if self.expired {
            return Poll::Ready(Err(stalled()));
        }
        if let Poll::Ready(r) = op(cx) {
            self.stalled = false;
            return Poll::Ready(r);
        }
        let timeout = Duration::from_nanos(self.timeout.load(Ordering::Relaxed));
        if !self.stalled {
            self.stalled = true;
            let at = Instant::now() + timeout;
            match self.timer.as_mut() {
                Some(t) => t.as_mut().reset(at),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
            }
        }
        let Some(timer) = self.timer.as_mut() else {
            return Poll::Pending;
        };
        ready!(timer.as_mut().poll(cx));
        log::debug!("the client took nothing written to it for {timeout:?}: closing");
        self.expired = true;
        Poll::Ready(Err(stalled()))
    }
}

fn stalled() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the client stopped reading (send_timeout)",
    )
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The status line of the answer to an upgrade request, as Pingora writes it.
#[derive(Debug, Default)]
struct AnswerWatch {
    line: [u8; 12],
    len: usize,
    /// Inside an interim (1xx) head: skip to its end.
    skipping: bool,
    /// Inside a `101` head: the tunnel starts at its end.
    upgrade_head: bool,
    last4: u32,
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

/// Count a refusal in `tollgate_protocol_refusals_total`.
pub fn refused_metric(status: u16) {
    crate::metrics::metrics()
        .protocol_refusals
        .with_label_values(&[crate::metrics::status_label(status)])
        .inc();
}

impl GuardedStream {
    /// Guard `inner`. The first head's deadline starts now; an idle kept-alive connection is
    /// closed `keepalive` after its last response; writes fail once the client takes nothing
    /// for `send_timeout`. An upgrade may leave Pingora through `splice`. The pace of request
    /// bodies is off until [`Self::set_body_pace`].
    pub fn new(
        inner: Stream,
        limits: Limits,
        head_timeout: Duration,
        keepalive: Duration,
        send_timeout: Duration,
        splice: Arc<Splice>,
    ) -> GuardedStream {
        let born = Instant::now();
        GuardedStream {
            inner,
            framing: Framing::new(limits),
            held: Vec::new(),
            fed: 0,
            ready: 0,
            delivered: 0,
            msg_start: 0,
            failed: None,
            violation: None,
            refusal: None,
            head_timeout,
            keepalive,
            born,
            deadline: Box::pin(tokio::time::sleep_until(born + head_timeout)),
            head_deadline: Some(born + head_timeout),
            heads: 0,
            answered: AtomicU64::new(0),
            answered_at: AtomicU64::new(0),
            answered_waker: AtomicWaker::new(),
            parked: None,
            answer: AnswerWatch::default(),
            splice,
            stall: WriteStall::new(send_timeout),
            pace: BodyPace {
                grace: AtomicU64::new(0),
                rate: AtomicU64::new(0),
                waited: Duration::ZERO,
                since: None,
                received: 0,
            },
            eof: false,
        }
    }

    /// The send timeout from now on (set per request, so that a reload applies).
    pub fn set_send_timeout(&self, timeout: Duration) {
        self.stall.timeout.store(nanos(timeout), Ordering::Relaxed);
    }

    /// This connection's splice.
    pub fn splice(&self) -> &Arc<Splice> {
        &self.splice
    }

    /// The floor on request bodies from now on (set per request): reads may wait `grace` in
    /// all plus one second per `min_rate` bytes received (0: no floor).
    pub fn set_body_pace(&self, grace: Duration, min_rate: u64) {
        self.pace.grace.store(nanos(grace), Ordering::Relaxed);
        self.pace.rate.store(min_rate, Ordering::Relaxed);
    }

    /// Pingora finished a response on this connection (called from the `logging` phase).
    pub fn response_done(&self) {
        self.answered_at
            .store(nanos(self.born.elapsed()), Ordering::Relaxed);
        self.answered.fetch_add(1, Ordering::Release);
        self.answered_waker.wake();
    }

    /// The guard under a Pingora stream, if it is one.
    pub fn of(stream: &Stream) -> Option<&GuardedStream> {
        (**stream).as_any().downcast_ref::<GuardedStream>()
    }

    /// Wait for the next request's first bytes (`super::idle`): `Ok(true)` once Pingora has
    /// something to read (bytes of a head, a refusal to answer, or any state other than a
    /// quiet connection between requests), `Ok(false)` when the connection ended or was closed
    /// quietly (the keep-alive timeout, or a first head's deadline with nothing sent).
    ///
    /// The deadlines are the ones a read would keep, so waiting here instead of in Pingora's
    /// `read_request` changes nothing the client sees.
    pub async fn next_request(&mut self) -> io::Result<bool> {
        std::future::poll_fn(|cx| self.poll_next_request(cx)).await
    }

    fn poll_next_request(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        loop {
            let quiet = self.refusal.is_none()
                && self.failed.is_none()
                && self.violation.is_none()
                && self.held.is_empty()
                && !self.answer.upgrade_head
                && self.framing.phase() == Phase::Head
                && !self.framing.head_started()
                && self.idle();
            if !quiet {
                return Poll::Ready(Ok(true));
            }
            if ready!(self.poll_more(cx))? == 0 {
                // End of stream, or closed quietly at a deadline (with no head started there
                // is nothing to answer).
                return Poll::Ready(Ok(false));
            }
        }
    }

    /// No response in flight: a refusal may be answered.
    fn idle(&self) -> bool {
        self.answered.load(Ordering::Acquire) >= self.heads
    }

    /// Refuse: answer `v` and close, once no response is in flight (closing earlier would
    /// abort the one in flight: Pingora treats a client's end of stream as an abort).
    fn refuse(&mut self, v: Violation) {
        refused_metric(v.status);
        log::debug!(
            "refused a request before routing: {} {}",
            v.status,
            v.reason
        );
        self.held.truncate(self.ready);
        self.fed = self.ready;
        self.violation = Some(v);
    }

    /// Stop reading requests: write `answer` (if any), then report end of stream.
    fn close(&mut self, answer: Vec<u8>) {
        self.clear_held();
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
                        let inner = &mut self.inner;
                        let rest = &r.answer[r.written..];
                        match ready!(
                            self.stall
                                .poll(cx, |cx| Pin::new(&mut *inner).poll_write(cx, rest))
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
                    let inner = &mut self.inner;
                    let _ = ready!(
                        self.stall
                            .poll(cx, |cx| Pin::new(&mut *inner).poll_flush(cx))
                    );
                    r.stage = Stage::Shutdown;
                }
                Stage::Shutdown => {
                    let inner = &mut self.inner;
                    let _ = ready!(
                        self.stall
                            .poll(cx, |cx| Pin::new(&mut *inner).poll_shutdown(cx))
                    );
                    self.deadline.as_mut().reset(Instant::now() + LINGER);
                    r.stage = Stage::Linger;
                }
                Stage::Linger => {
                    let mut scratch = [MaybeUninit::<u8>::uninit(); 2048];
                    let mut buf = ReadBuf::uninit(&mut scratch);
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
                Err(v)
                    if self.framing.phase() == Phase::Body && self.delivered <= self.msg_start =>
                {
                    // The body is malformed before its head was handed on: refuse the whole
                    // request (nothing of it reaches Pingora or the origin).
                    self.heads -= 1;
                    self.ready = self.msg_start;
                    self.refuse(v);
                    break;
                }
                Err(v) if self.framing.phase() == Phase::Body => {
                    // A body turned malformed: what came before it goes first, then a read
                    // error (Pingora aborts the request and answers 400).
                    refused_metric(v.status);
                    log::debug!("refused a request body: {}", v.reason);
                    self.held.truncate(self.ready);
                    self.fed = self.ready;
                    self.failed = Some(v);
                    break;
                }
                Err(v) => {
                    // What is already judged deliverable (an earlier request) goes first.
                    self.refuse(v);
                    break;
                }
                Ok(f) => {
                    self.fed += f.used;
                    let phase = self.framing.phase();
                    if was_head && (f.complete || phase != Phase::Head) {
                        self.heads += 1;
                        self.pace.start();
                    }
                    if f.complete || phase != Phase::Head {
                        self.ready = self.fed;
                    }
                    if f.complete {
                        // One message at a time: the next is judged once this one is
                        // delivered (and no response is in flight, `poll_read`), so a read
                        // never hands Pingora bytes past a request's end.
                        self.msg_start = self.fed;
                        break;
                    }
                    if f.used == 0 {
                        break; // an upgrade's answer awaited, or an opaque request
                    }
                }
            }
        }
        self.arm();
    }

    /// The head deadline runs while a head is partly here, and for a new connection's first
    /// (from the accept); an idle kept-alive connection has the keep-alive timeout instead.
    fn arm(&mut self) {
        let first = self.heads == 0;
        if self.framing.phase() != Phase::Head || !(first || self.framing.head_started()) {
            self.head_deadline = None;
        } else if self.head_deadline.is_none() {
            self.head_deadline = Some(Instant::now() + self.head_timeout);
        }
    }

    /// Drop everything held (and its memory).
    fn clear_held(&mut self) {
        self.held = Vec::new();
        self.fed = 0;
        self.ready = 0;
        self.delivered = 0;
        self.msg_start = 0;
    }

    /// Hand out deliverable held bytes.
    fn deliver(&mut self, out: &mut ReadBuf<'_>) {
        let n = out.remaining().min(self.ready - self.delivered);
        out.put_slice(&self.held[self.delivered..self.delivered + n]);
        self.delivered += n;
        if self.delivered == self.held.len() {
            self.clear_held();
        } else if self.delivered == self.ready
            && self.msg_start == self.delivered
            && self.delivered >= READ_CHUNK
        {
            // A message's end, the next one's bytes behind it: drop what is delivered, so that
            // a client that keeps pipelining does not grow `held` (once a read's worth, so
            // that tiny requests do not each move the rest).
            self.held.drain(..self.delivered);
            self.fed -= self.delivered;
            self.ready = 0;
            self.msg_start = 0;
            self.delivered = 0;
        }
    }

    /// Read body (or tunnel) bytes straight into Pingora's buffer, judging them there.
    fn poll_body(&mut self, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = out.filled().len();
        let Poll::Ready(read) = Pin::new(&mut self.inner).poll_read(cx, out) else {
            return self.poll_pace(cx);
        };
        self.pace.arrived(out.filled().len() - before);
        read?;
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
                        self.arm();
                        break;
                    }
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// A body read waits for the client: fail it once the body is slower than its floor.
    fn poll_pace(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(at) = self.pace.deadline() else {
            return Poll::Pending;
        };
        if self.deadline.deadline() != at {
            self.deadline.as_mut().reset(at);
        }
        ready!(self.deadline.as_mut().poll(cx));
        refused_metric(408);
        log::debug!("refused a request body: {BODY_TOO_SLOW}");
        Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, BODY_TOO_SLOW)))
    }

    /// A next request waits in `held` for the response in flight: read on (so that a close is
    /// seen, as Pingora's probe would see it), up to a bound.
    fn poll_pipelined(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.held.len() - self.delivered < MAX_HELD_PIPELINED {
            if ready!(self.poll_fill(cx))? == 0 {
                // A half-close after complete requests is no abort: they are served first
                // (Pingora would abort the response in flight on seeing the end now).
                self.eof = true;
                break;
            }
        }
        Poll::Pending
    }

    /// Read what the client sent into `held`; `Ok(0)` at end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.eof {
            return Poll::Ready(Ok(0));
        }
        let mut raw = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut buf = ReadBuf::uninit(&mut raw);
        ready!(Pin::new(&mut self.inner).poll_read(cx, &mut buf))?;
        self.held.extend_from_slice(buf.filled());
        Poll::Ready(Ok(buf.filled().len()))
    }

    /// Read more of a head (or early upgrade data) into `held`, under the head deadline and
    /// the keep-alive timeout.
    fn poll_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let waiting = self.framing.phase() == Phase::AwaitUpgrade;
        if waiting && self.held.len() >= MAX_HELD_UPGRADE {
            self.parked = Some(cx.waker().clone());
            return Poll::Pending;
        }
        if let Poll::Ready(r) = self.poll_fill(cx) {
            return Poll::Ready(r);
        }
        if waiting {
            self.parked = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let (at, head) = match self.head_deadline {
            Some(at) => (at, true),
            None if self.heads > 0 && self.idle() && !self.framing.head_started() => {
                let last = Duration::from_nanos(self.answered_at.load(Ordering::Relaxed));
                (self.born + last + self.keepalive, false)
            }
            None => return Poll::Pending,
        };
        if self.deadline.deadline() != at {
            self.deadline.as_mut().reset(at);
        }
        ready!(self.deadline.as_mut().poll(cx));
        if head && self.framing.head_started() {
            self.refuse(Violation {
                status: 408,
                reason: "request head not received in time",
            });
        } else {
            // Nothing of a request came: close quietly, as for an idle keep-alive connection.
            if head {
                refused_metric(408);
            }
            self.close(Vec::new());
        }
        Poll::Ready(Ok(0))
    }

    /// Read and drop what the client sends (after an opaque request's head).
    fn poll_discard(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.clear_held();
        loop {
            if ready!(self.poll_fill(cx))? == 0 {
                return Poll::Ready(Ok(()));
            }
            self.held.clear();
        }
    }

    /// Note the status of an upgrade's answer from the bytes of it written to the client;
    /// at the end of a `101` head, join the splice.
    fn watch_answer(&mut self, buf: &[u8]) {
        if !self.answer.upgrade_head && !self.framing.awaiting_answer() {
            self.answer = AnswerWatch::default();
            return;
        }
        for &b in buf {
            let w = &mut self.answer;
            if w.skipping || w.upgrade_head {
                w.last4 = w.last4 << 8 | u32::from(b);
                if w.last4 == u32::from_be_bytes(*b"\r\n\r\n") {
                    let upgraded = w.upgrade_head;
                    *w = AnswerWatch::default();
                    if upgraded {
                        self.join_splice();
                        self.wake_parked();
                        return;
                    }
                }
                continue;
            }
            w.line[w.len] = b;
            w.len += 1;
            if w.len < w.line.len() {
                continue;
            }
            let line = w.line;
            *w = AnswerWatch::default();
            match &line[9..12] {
                _ if !line.starts_with(b"HTTP/1.") => self.framing.upgrade_refused(),
                b"101" => {
                    // The reader stays parked until the head is written: the client's early
                    // bytes go to the tunnel if it is joined there.
                    self.framing.upgraded();
                    self.answer.upgrade_head = true;
                    continue;
                }
                [b'1', _, _] => {
                    // Interim: the final answer follows its head.
                    self.answer.skipping = true;
                    continue;
                }
                _ => self.framing.upgrade_refused(),
            }
            self.wake_parked();
            return;
        }
    }

    /// A write to the client failed: a `101` head being written never completes, so nothing
    /// is joined (an error answer Pingora may write next is not the end of that head).
    fn write_failed(&mut self) {
        if self.answer.upgrade_head {
            self.answer = AnswerWatch::default();
            self.wake_parked();
        }
    }

    fn wake_parked(&mut self) {
        if let Some(waker) = self.parked.take() {
            waker.wake();
        }
    }

    /// The `101` head is written: if the backend's end waits in the splice, give it this
    /// connection (and what the client sent after the upgrade request) and read as closed.
    fn join_splice(&mut self) {
        let splice = Arc::clone(&self.splice);
        splice.join(|| {
            let client = std::mem::replace(&mut self.inner, super::splice::detached());
            let early = self.held.get(self.delivered..).unwrap_or_default().to_vec();
            self.clear_held();
            (client, early)
        });
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
            if this.answer.upgrade_head {
                this.parked = Some(cx.waker().clone());
                return Poll::Pending;
            }
            if this.delivered < this.ready {
                this.deliver(out);
                return Poll::Ready(Ok(()));
            }
            if let Some(v) = this.failed.take() {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, v.reason)));
            }
            if let Some(v) = this.violation {
                if !this.idle() {
                    this.answered_waker.register(cx.waker());
                    if !this.idle() {
                        return Poll::Pending;
                    }
                }
                this.violation = None;
                this.close(answer(v));
                continue;
            }
            let phase = this.framing.phase();
            if phase == Phase::Opaque {
                return this.poll_discard(cx);
            }
            if this.fed < this.held.len() && phase != Phase::AwaitUpgrade {
                // A pipelined next request waits for the response in flight: judged now, an
                // upgrade request would take that response for its answer, and its head
                // deadline would run during it.
                if phase == Phase::Head && !this.framing.head_started() && !this.idle() {
                    this.answered_waker.register(cx.waker());
                    if !this.idle() {
                        return this.poll_pipelined(cx);
                    }
                }
                this.feed_held();
                continue;
            }
            if this.held.is_empty() && matches!(phase, Phase::Body | Phase::Tunnel) {
                return if phase == Phase::Body {
                    this.poll_body(cx, out)
                } else {
                    Pin::new(&mut this.inner).poll_read(cx, out)
                };
            }
            // A head (or an upgrade's answer) is awaited: read into `held`.
            if ready!(this.poll_more(cx))? == 0
                && this.refusal.is_none()
                && this.violation.is_none()
            {
                // End of stream: a partial head is dropped unseen (Pingora sees a clean close).
                return Poll::Ready(Ok(()));
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
        this.pace.pause();
        let inner = &mut this.inner;
        let n = ready!(
            this.stall
                .poll(cx, |cx| Pin::new(&mut *inner).poll_write(cx, buf))
        )
        .inspect_err(|_| {
            this.write_failed();
        })?;
        this.watch_answer(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.pace.pause();
        let inner = &mut this.inner;
        let n = ready!(
            this.stall
                .poll(cx, |cx| Pin::new(&mut *inner).poll_write_vectored(cx, bufs))
        )
        .inspect_err(|_| {
            this.write_failed();
        })?;
        let mut left = n;
        for b in bufs {
            if left == 0 {
                break;
            }
            let take = left.min(b.len());
            this.watch_answer(&b[..take]);
            left -= take;
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let inner = &mut this.inner;
        this.stall
            .poll(cx, |cx| Pin::new(&mut *inner).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let inner = &mut this.inner;
        this.stall
            .poll(cx, |cx| Pin::new(&mut *inner).poll_shutdown(cx))
    }
}

#[async_trait]
impl Shutdown for GuardedStream {
    /// As Pingora's, under the send timeout.
    async fn shutdown(&mut self) {
        if let Err(e) = tokio::io::AsyncWriteExt::shutdown(self).await {
            log::debug!("failed to shut down a client connection: {e}");
        }
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
    /// Pingora peeks only for the h2c preface, before reading anything: the bytes are read
    /// into `held` (to be judged and delivered later) under the head deadline, until there are
    /// enough or they stop matching the preface. A short or late peek reads as HTTP/1, where
    /// the deadline then answers.
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        let deadline = self
            .head_deadline
            .unwrap_or_else(|| Instant::now() + self.head_timeout);
        loop {
            let n = self.held.len().min(buf.len());
            if n == buf.len() || !H2_PREFACE.starts_with(&self.held[..n]) {
                break;
            }
            match tokio::time::timeout_at(deadline, std::future::poll_fn(|cx| self.poll_fill(cx)))
                .await
            {
                Ok(Ok(0)) | Err(_) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
            }
        }
        let n = self.held.len().min(buf.len());
        buf[..n].copy_from_slice(&self.held[..n]);
        buf[n..].fill(0);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora_core::protocols::l4::stream::Stream as L4Stream;
    use pingora_core::protocols::l4::virt::{VirtualSockOpt, VirtualSocket, VirtualSocketStream};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// The client's socket: a duplex pipe whose writes fail once after `fail_at` bytes.
    #[derive(Debug)]
    struct Sock {
        io: DuplexStream,
        written: usize,
        fail_at: Option<usize>,
    }

    impl VirtualSocket for Sock {
        fn set_socket_option(&self, _: VirtualSockOpt) -> io::Result<()> {
            Ok(())
        }
    }

    impl AsyncRead for Sock {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Sock {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let buf = match self.fail_at {
                Some(at) if self.written == at => {
                    self.fail_at = None;
                    return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
                }
                Some(at) => &buf[..buf.len().min(at - self.written)],
                None => buf,
            };
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, buf))?;
            self.written += n;
            Poll::Ready(Ok(n))
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    const REQUEST: &[u8] =
        b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";
    const SWITCH: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n";

    /// A guard that has handed Pingora an upgrade request (the client's early bytes held),
    /// and a splice holding a backend's socket for the armed attempt.
    async fn upgraded(fail_at: Option<usize>) -> (GuardedStream, Arc<Splice>, DuplexStream) {
        let secs = Duration::from_secs(60);
        let (mut guard, mut client) = guard_over(secs, secs, fail_at);
        let splice = Arc::clone(guard.splice());
        client
            .write_all(&[REQUEST, b"EARLY"].concat())
            .await
            .unwrap();
        let mut head = vec![0; 4096];
        let n = guard.read(&mut head).await.unwrap();
        assert_eq!(&head[..n], REQUEST);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let id = splice.arm();
        assert!(splice.deposit(id, backend, b"LATE".to_vec()).is_none());
        (guard, splice, client)
    }

    #[tokio::test]
    async fn a_pipelined_upgrade_waits_for_the_response_in_flight_and_takes_its_own_answer() {
        let secs = Duration::from_secs(60);
        let (mut guard, mut client) = fresh(secs, secs);
        let splice = Arc::clone(guard.splice());
        client.write_all(&[GET, REQUEST].concat()).await.unwrap();
        let mut buf = vec![0; 4096];
        let n = guard.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], GET, "one message per read");
        // Pingora probes the client while it answers the GET: the upgrade request waits.
        let probe = tokio::time::timeout(Duration::from_millis(100), guard.read(&mut buf)).await;
        assert!(probe.is_err(), "handed on during a response: {probe:?}");
        // The GET's answer is not the upgrade's, even with a 101 head for a body.
        let body = b"HTTP/1.1 101 Switching Protocols\r\n\r\n";
        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
        guard
            .write_all(&[head.as_bytes(), body].concat())
            .await
            .unwrap();
        assert!(!splice.is_joined());
        guard.response_done();
        let n = guard.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], REQUEST);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let id = splice.arm();
        assert!(splice.deposit(id, backend, Vec::new()).is_none());
        guard.write_all(SWITCH).await.unwrap();
        assert!(
            splice.is_joined(),
            "the upgrade's own 101 did not start the tunnel"
        );
    }

    #[tokio::test]
    async fn pipelined_requests_before_a_half_close_are_each_handed_on_then_the_end() {
        let secs = Duration::from_secs(60);
        let (mut guard, mut client) = fresh(secs, secs);
        client.write_all(&GET.repeat(2)).await.unwrap();
        AsyncWriteExt::shutdown(&mut client).await.unwrap();
        let mut buf = vec![0; 4096];
        let n = guard.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], GET);
        // Pingora's probe during the first response sees neither the second nor the close
        // (the close would abort the response in flight).
        let probe = tokio::time::timeout(Duration::from_millis(100), guard.read(&mut buf)).await;
        assert!(probe.is_err(), "the probe got {probe:?}");
        guard.response_done();
        let n = guard.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], GET);
        guard.response_done();
        assert_eq!(guard.read(&mut buf).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_client_that_keeps_pipelining_does_not_grow_what_is_held() {
        const REQUESTS: usize = 5000;
        let secs = Duration::from_secs(60);
        let (mut guard, mut client) = fresh(secs, secs);
        // ~135 KB of requests whose size does not divide the guard's reads.
        let writer = tokio::spawn(async move {
            client.write_all(&GET.repeat(REQUESTS)).await.unwrap();
            client
        });
        let mut buf = vec![0; 4096];
        let mut most = 0;
        for i in 0..REQUESTS {
            let n = guard.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], GET, "request {i}");
            most = most.max(guard.held.len());
            guard.response_done();
        }
        assert!(most <= 3 * READ_CHUNK, "held grew to {most} bytes");
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn the_whole_101_head_written_joins_the_splice_with_the_early_bytes() {
        let (mut guard, splice, mut client) = upgraded(None).await;
        // Written in two parts: only the head's end joins.
        guard.write_all(&SWITCH[..20]).await.unwrap();
        assert!(!splice.is_joined());
        guard.write_all(&SWITCH[20..]).await.unwrap();
        assert!(splice.is_joined());
        let mut got = vec![0; SWITCH.len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, SWITCH);
        // Pingora sees end of stream, and may write nothing more.
        let mut rest = Vec::new();
        assert_eq!(guard.read_to_end(&mut rest).await.unwrap(), 0);
        assert!(guard.write_all(b"x").await.is_err());
        splice.defer(crate::wire::tunnel::Deferred {
            timeouts: crate::wire::tunnel::Timeouts {
                idle: Duration::from_secs(1),
                to_client: Duration::from_secs(1),
                to_backend: Duration::from_secs(1),
            },
            record: Box::new(|_| {}),
        });
        let (ends, _) = splice.take_tunnel().unwrap();
        assert_eq!(ends.client_early, b"EARLY");
        assert_eq!(ends.backend_early, b"LATE");
    }

    #[tokio::test]
    async fn a_101_head_whose_write_failed_joins_nothing() {
        let (mut guard, splice, _client) = upgraded(Some(20)).await;
        assert!(guard.write_all(SWITCH).await.is_err());
        // Pingora's error answer, written next, is not the end of that head.
        guard
            .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        assert!(!splice.is_joined());
        assert!(!splice.settle());
    }

    /// The send timeout of the guards under test, unless a test sets one.
    const SEND: Duration = Duration::from_secs(3600);

    /// A guard over a fresh client connection (head deadline `head`, keep-alive `keepalive`).
    fn fresh(head: Duration, keepalive: Duration) -> (GuardedStream, DuplexStream) {
        guard_over(head, keepalive, None)
    }

    /// A guard over a client connection whose writes fail once after `fail_at` bytes.
    fn guard_over(
        head: Duration,
        keepalive: Duration,
        fail_at: Option<usize>,
    ) -> (GuardedStream, DuplexStream) {
        let (io, client) = tokio::io::duplex(4096);
        let sock = Sock {
            io,
            written: 0,
            fail_at,
        };
        let inner: Stream = Box::new(L4Stream::from(VirtualSocketStream::new(Box::new(sock))));
        let limits = Limits {
            max_request_line: 8192,
            max_header_size: 65536,
            max_header_count: 100,
            h2c: false,
        };
        let splice = Arc::new(Splice::default());
        let guard = GuardedStream::new(inner, limits, head, keepalive, SEND, splice);
        (guard, client)
    }

    const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";

    /// Pingora reads one whole request and answers it.
    async fn one_request(guard: &mut GuardedStream, client: &mut DuplexStream) {
        client.write_all(GET).await.unwrap();
        let mut head = vec![0; 4096];
        let n = guard.read(&mut head).await.unwrap();
        assert_eq!(&head[..n], GET);
        guard.response_done();
    }

    /// A guard that has handed Pingora the head of a 1000-byte POST, its body floor `grace`
    /// plus one second per 100 bytes.
    async fn posting(grace: Duration) -> (GuardedStream, DuplexStream) {
        const POST: &[u8] = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n";
        let secs = Duration::from_secs(60);
        let (mut guard, mut client) = fresh(secs, secs);
        guard.set_body_pace(grace, 100);
        client.write_all(POST).await.unwrap();
        let mut head = vec![0; 4096];
        let n = guard.read(&mut head).await.unwrap();
        assert_eq!(&head[..n], POST);
        (guard, client)
    }

    /// Send `piece` bytes every `every` until 1000 are sent, reading them as Pingora would;
    /// how many arrived before a read failed, and its error.
    async fn trickle(
        guard: &mut GuardedStream,
        client: DuplexStream,
        piece: usize,
        every: Duration,
    ) -> (usize, Option<io::Error>) {
        let sender = tokio::spawn(async move {
            let mut client = client;
            for _ in 0..1000 / piece {
                tokio::time::sleep(every).await;
                if client.write_all(&vec![b'b'; piece]).await.is_err() {
                    break;
                }
            }
            client
        });
        let mut got = 0;
        let mut buf = vec![0; 4096];
        let err = loop {
            if got == 1000 {
                break None;
            }
            match guard.read(&mut buf).await {
                Ok(n) => got += n,
                Err(e) => break Some(e),
            }
        };
        sender.abort();
        (got, err)
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_slower_than_its_floor_fails_the_read_once_its_wait_is_spent() {
        let (mut guard, client) = posting(Duration::from_secs(2)).await;
        let start = Instant::now();
        // 10 bytes a second: the wait earned is a tenth of what is spent.
        let (got, err) = trickle(&mut guard, client, 10, Duration::from_secs(1)).await;
        let err = err.expect("the slow body was read to its end");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(err.to_string(), BODY_TOO_SLOW);
        assert!((20..=30).contains(&got), "{got} bytes");
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(2) && waited < Duration::from_secs(4),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_at_its_floor_is_read_however_long_it_waits_in_all() {
        let (mut guard, client) = posting(Duration::from_secs(2)).await;
        let start = Instant::now();
        // 125 bytes a second for 8 s: four times the grace, but earned by the bytes.
        let (got, err) = trickle(&mut guard, client, 50, Duration::from_millis(400)).await;
        assert!(err.is_none(), "{err:?}");
        assert_eq!(got, 1000);
        assert!(start.elapsed() >= Duration::from_secs(8));
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_left_waiting_while_a_response_is_written_is_not_counted() {
        let (mut guard, mut client) = posting(Duration::from_secs(2)).await;
        let mut buf = vec![0; 4096];
        // Pingora polls the body read, then drops it to write an early response, and is busy
        // elsewhere for a minute.
        let read = tokio::time::timeout(Duration::from_secs(1), guard.read(&mut buf)).await;
        assert!(read.is_err());
        guard
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
        client.write_all(&[b'b'; 500]).await.unwrap();
        assert_eq!(guard.read(&mut buf).await.unwrap(), 500);
        // One second waited so far, of two plus five earned.
        let rest = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(4)).await;
            client.write_all(&[b'b'; 500]).await.unwrap();
            client
        });
        assert_eq!(guard.read(&mut buf).await.unwrap(), 500);
        drop(rest.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_not_read_is_not_waited_for() {
        let (mut guard, mut client) = posting(Duration::from_secs(2)).await;
        client.write_all(&[b'b'; 1000]).await.unwrap();
        // The upstream is slow to take the body: Pingora reads on a minute later.
        tokio::time::sleep(Duration::from_secs(60)).await;
        let mut body = vec![0; 1000];
        guard.read_exact(&mut body).await.unwrap();
        assert_eq!(body, [b'b'; 1000]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_takes_nothing_for_the_send_timeout_fails_every_later_write() {
        let secs = Duration::from_secs(60);
        let (mut guard, _client) = fresh(secs, secs);
        guard.set_send_timeout(Duration::from_secs(10));
        let start = Instant::now();
        // More than the pipe holds, and the client reads nothing.
        let err = guard.write_all(&[b'x'; 8192]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(10) && waited < Duration::from_secs(11),
            "{waited:?}"
        );
        // Nothing later (Pingora's error answer, its flush) waits again.
        assert_eq!(
            guard.write(b"x").await.unwrap_err().kind(),
            io::ErrorKind::TimedOut
        );
        assert!(guard.flush().await.is_err());
        assert!(AsyncWriteExt::shutdown(&mut guard).await.is_err());
        assert_eq!(start.elapsed(), waited);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_keeps_taking_is_not_cut_off_however_long_a_write_takes() {
        const LEN: usize = 64 << 10;
        let secs = Duration::from_secs(60);
        let (mut guard, mut client) = fresh(secs, secs);
        guard.set_send_timeout(Duration::from_secs(10));
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0; 1024];
            while got < LEN {
                tokio::time::sleep(Duration::from_secs(6)).await;
                let n = client.read(&mut buf).await.unwrap();
                assert!(n > 0, "end of stream after {got} bytes");
                got += n;
            }
            got
        });
        let start = Instant::now();
        // One write, as large as what Pingora gathers for a lagging HTTP/1 client: it takes
        // minutes, but the client takes some of it every 6 s.
        guard.write_all(&[b'x'; LEN]).await.unwrap();
        guard.flush().await.unwrap();
        assert!(start.elapsed() > Duration::from_secs(300));
        assert_eq!(reader.await.unwrap(), LEN);
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_for_a_request_ends_when_its_bytes_come_and_hands_them_on() {
        let secs = Duration::from_secs(60);
        let (mut guard, mut client) = fresh(secs, secs);
        one_request(&mut guard, &mut client).await;
        let early = tokio::time::timeout(Duration::from_secs(30), guard.next_request()).await;
        assert!(early.is_err(), "returned with nothing sent: {early:?}");
        client.write_all(&GET[..5]).await.unwrap();
        assert!(guard.next_request().await.unwrap());
        client.write_all(&GET[5..]).await.unwrap();
        let mut head = vec![0; 4096];
        let n = guard.read(&mut head).await.unwrap();
        assert_eq!(
            &head[..n],
            GET,
            "the bytes the wait saw are delivered intact"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_keep_alive_timeout_ends_the_wait_quietly() {
        let (mut guard, mut client) = fresh(Duration::from_secs(60), Duration::from_secs(5));
        one_request(&mut guard, &mut client).await;
        let t = Instant::now();
        let waited = tokio::time::timeout(Duration::from_secs(600), guard.next_request()).await;
        assert!(
            !waited
                .expect("the keep-alive timeout ends the wait")
                .unwrap()
        );
        assert_eq!(t.elapsed().as_secs(), 5);
        drop(guard);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "closed with no answer: {rest:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_head_that_never_starts_ends_the_wait_at_its_deadline() {
        let (mut guard, _client) = fresh(Duration::from_secs(3), Duration::from_secs(60));
        let t = Instant::now();
        let waited = tokio::time::timeout(Duration::from_secs(600), guard.next_request()).await;
        assert!(!waited.expect("the head deadline ends the wait").unwrap());
        assert_eq!(t.elapsed().as_secs(), 3);
    }

    #[tokio::test]
    async fn the_wait_ends_at_end_of_stream_and_not_while_a_response_is_owed() {
        let secs = Duration::from_secs(60);
        let (mut guard, mut client) = fresh(secs, secs);
        client.write_all(GET).await.unwrap();
        let mut head = vec![0; GET.len()];
        guard.read_exact(&mut head).await.unwrap();
        // The request is not answered yet: not a quiet connection, Pingora reads on.
        assert!(guard.next_request().await.unwrap());
        guard.response_done();
        drop(client);
        assert!(!guard.next_request().await.unwrap());
    }

    #[tokio::test]
    async fn a_pipelined_head_after_a_body_ends_the_wait_at_once_and_is_delivered_whole() {
        let secs = Duration::from_secs(60);
        let (mut guard, mut client) = fresh(secs, secs);
        let post = b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc";
        client.write_all(&[&post[..], GET].concat()).await.unwrap();
        let mut got = vec![0; post.len()];
        guard.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..], &post[..]);
        guard.response_done();
        assert!(guard.next_request().await.unwrap());
        let mut head = vec![0; GET.len()];
        guard.read_exact(&mut head).await.unwrap();
        assert_eq!(head, GET);
    }

    #[tokio::test]
    async fn shutdown_ends_an_idle_wait_but_not_one_whose_bytes_are_here() {
        let secs = Duration::from_secs(60);
        let (tx, watch) = tokio::sync::watch::channel(false);
        let (mut guard, mut client) = fresh(secs, secs);
        one_request(&mut guard, &mut client).await;
        // Bytes already here win over a shutdown already under way (Pingora's read is biased
        // the same way: the request is served, on a connection that is then closed).
        client.write_all(GET).await.unwrap();
        tx.send(true).unwrap();
        assert!(crate::wire::idle::next_request(&mut guard, &watch).await);
        // Idle when the shutdown comes: closed.
        let (tx, watch) = tokio::sync::watch::channel(false);
        let (mut guard, mut client) = fresh(secs, secs);
        one_request(&mut guard, &mut client).await;
        let stop = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            tx.send(true).unwrap();
            tx
        });
        let waited =
            tokio::time::timeout(secs, crate::wire::idle::next_request(&mut guard, &watch)).await;
        assert!(!waited.expect("the shutdown ends the wait"));
        drop(stop.await.unwrap());
    }

    #[tokio::test]
    async fn a_new_connection_s_first_bytes_are_awaited_briefly_after_a_shutdown() {
        let secs = Duration::from_secs(60);
        let (tx, watch) = tokio::sync::watch::channel(true);
        let (mut guard, mut client) = fresh(secs, secs);
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            client.write_all(GET).await.unwrap();
            client
        });
        assert!(crate::wire::idle::first_request(&mut guard, &watch).await);
        let _client = late.await.unwrap();
        // Nothing comes: closed soon after the shutdown.
        let (mut guard, _client) = fresh(secs, secs);
        let t = std::time::Instant::now();
        assert!(!crate::wire::idle::first_request(&mut guard, &watch).await);
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        drop(tx);
    }
}

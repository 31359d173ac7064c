//! The tunnel of a spliced upgraded connection ([`super::splice`]): bytes both ways between
//! the client and the backend, with no buffer held while the connection is idle.
//!
//! Each direction reads into a stack buffer and writes straight on; only what the other side
//! does not take at once is kept (at most one read's worth), so a slow reader holds the other
//! side back instead of growing memory. An end of stream is passed on as a write shutdown (TCP
//! half-close) and the other direction goes on.
//!
//! Timeouts: Pingora, relaying an upgraded connection itself, restarts both sides' per-read
//! timeouts whenever either side moves, so it closes one on which nothing moved either way for
//! the shorter of the backend's `timeouts.read` and the client's `body_idle_timeout`; the
//! tunnel does the same. In addition, a write that nobody takes (a peer that stopped reading
//! while the other side still talks) ends the tunnel: after `server.send_timeout` for a client
//! that stopped reading, as for any other response, after the upstream's `timeouts.write` for
//! a backend that did.

use std::fmt;
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pingora::protocols::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Bytes read at a time (on the stack).
const CHUNK: usize = 16 << 10;
/// Reads per direction before yielding to other tasks.
const READS_PER_POLL: usize = 32;

/// Both ends of a spliced connection.
#[derive(Debug)]
pub struct Ends {
    /// The client's connection (under TLS if the listener has it).
    pub client: Stream,
    /// What the client sent after the upgrade request, before the answer.
    pub client_early: Vec<u8>,
    /// The backend's connection.
    pub backend: TcpStream,
    /// What the backend sent after its `101` head.
    pub backend_early: Vec<u8>,
}

/// How long a tunnel may stall.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Nothing moved either way (the shorter of the upstream's `timeouts.read` and
    /// `server.connections.body_idle_timeout`).
    pub idle: Duration,
    /// Bytes waiting for a client that takes none (`server.send_timeout`).
    pub to_client: Duration,
    /// Bytes waiting for a backend that takes none (the upstream's `timeouts.write`).
    pub to_backend: Duration,
}

/// How a tunnel ended.
#[derive(Debug)]
pub struct Outcome {
    /// Bytes from the client to the backend.
    pub bytes_in: u64,
    /// Bytes from the backend to the client.
    pub bytes_out: u64,
    /// Why it ended, if not by both sides closing.
    pub error: Option<io::Error>,
}

/// The request's record, made when the tunnel ends (metrics, access log, in-flight counts).
pub struct Deferred {
    /// The tunnel's timeouts.
    pub timeouts: Timeouts,
    /// Records the request.
    pub record: Box<dyn FnOnce(&Outcome) + Send + Sync>,
}

impl fmt::Debug for Deferred {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deferred")
            .field("timeouts", &self.timeouts)
            .finish_non_exhaustive()
    }
}

/// Counts one tunnel in `tollgate_tunnels_open` until dropped.
struct Open;

impl Open {
    fn new() -> Open {
        crate::metrics::metrics().tunnels.inc();
        Open
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        crate::metrics::metrics().tunnels.dec();
    }
}

/// Run the tunnel to its end, then record the request.
pub async fn run(ends: Ends, deferred: Deferred) {
    let _open = Open::new();
    let outcome = relay(
        ends.client,
        ends.client_early,
        ends.backend,
        ends.backend_early,
        deferred.timeouts,
    )
    .await;
    if let Some(e) = &outcome.error {
        log::debug!("tunnel ended: {e}");
    }
    (deferred.record)(&outcome);
}

/// Relay between `client` and `backend` until both have closed, one fails, or the tunnel
/// stalls past a timeout. The early bytes go first.
pub async fn relay<C, B>(
    mut client: C,
    client_early: Vec<u8>,
    mut backend: B,
    backend_early: Vec<u8>,
    timeouts: Timeouts,
) -> Outcome
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let now = Instant::now();
    let mut up = Pipe::new(client_early, now, "backend", timeouts.to_backend);
    let mut down = Pipe::new(backend_early, now, "client", timeouts.to_client);
    // The `101` head may still sit in the client connection's write buffer.
    down.unflushed = true;
    let mut last = now;
    let first = timeouts
        .idle
        .min(timeouts.to_client)
        .min(timeouts.to_backend);
    let sleep = tokio::time::sleep_until(now + first);
    tokio::pin!(sleep);
    let error = std::future::poll_fn(|cx| {
        loop {
            let u = up.poll(cx, &mut client, &mut backend);
            let d = down.poll(cx, &mut backend, &mut client);
            if std::mem::take(&mut up.moved) | std::mem::take(&mut down.moved) {
                last = Instant::now();
            }
            match (u, d) {
                (Poll::Ready(Err(e)), _) | (_, Poll::Ready(Err(e))) => {
                    return Poll::Ready(Some(e));
                }
                (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => return Poll::Ready(None),
                _ => {}
            }
            let idle_at = last + timeouts.idle;
            let stuck = [&up, &down]
                .into_iter()
                .filter_map(|p| Some((p.waiting_since? + p.timeout, p)))
                .min_by_key(|(at, _)| *at);
            let at = stuck.map_or(idle_at, |(stuck_at, _)| idle_at.min(stuck_at));
            if Instant::now() >= at {
                let why = match stuck {
                    Some((stuck_at, p)) if stuck_at <= idle_at => {
                        format!("tunnel: the {} took nothing for {:?}", p.to, p.timeout)
                    }
                    _ => format!("tunnel: nothing moved either way for {:?}", timeouts.idle),
                };
                return Poll::Ready(Some(io::Error::new(io::ErrorKind::TimedOut, why)));
            }
            if sleep.deadline() != at {
                sleep.as_mut().reset(at);
            }
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    })
    .await;
    Outcome {
        bytes_in: up.bytes,
        bytes_out: down.bytes,
        error,
    }
}

/// One direction of the tunnel.
struct Pipe {
    /// Read but not yet written: `pending[at..]`.
    pending: Vec<u8>,
    at: usize,
    unflushed: bool,
    /// The reader reached end of stream.
    eof: bool,
    /// End of stream passed on: this direction is done.
    finished: bool,
    bytes: u64,
    /// Bytes moved since the relay last looked.
    moved: bool,
    /// Since when `pending` has waited without the writer taking any of it.
    waiting_since: Option<Instant>,
    /// Who the bytes go to.
    to: &'static str,
    /// How long `pending` may wait without the writer taking any of it.
    timeout: Duration,
}

impl Pipe {
    fn new(early: Vec<u8>, now: Instant, to: &'static str, timeout: Duration) -> Pipe {
        Pipe {
            bytes: early.len() as u64,
            waiting_since: (!early.is_empty()).then_some(now),
            pending: early,
            at: 0,
            unflushed: false,
            eof: false,
            finished: false,
            moved: false,
            to,
            timeout,
        }
    }

    /// Move bytes from `r` to `w`; ready once the end of stream has been passed on.
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        let mut scratch = [MaybeUninit::<u8>::uninit(); CHUNK];
        for _ in 0..READS_PER_POLL {
            while self.at < self.pending.len() {
                let n = ready!(write(cx, w, &self.pending[self.at..]))?;
                self.at += n;
                self.moved = true;
                self.waiting_since = Some(Instant::now());
            }
            if !self.pending.is_empty() {
                // Written: give the memory back.
                self.pending = Vec::new();
                self.at = 0;
                self.unflushed = true;
                self.waiting_since = None;
            }
            if self.unflushed {
                // A buffered writer (the client's connection has Pingora's write buffer, or
                // TLS) takes bytes it cannot send yet: a flush that waits is the writer
                // taking nothing, and timed as such.
                ready!(self.stalls(Pin::new(&mut *w).poll_flush(cx)))?;
                self.unflushed = false;
            }
            if self.eof {
                // The other side may be gone already; the direction is done either way.
                let _ = ready!(self.stalls(Pin::new(&mut *w).poll_shutdown(cx)));
                self.finished = true;
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::uninit(&mut scratch);
            ready!(Pin::new(&mut *r).poll_read(cx, &mut buf))?;
            let data = buf.filled();
            if data.is_empty() {
                self.eof = true;
                continue;
            }
            self.bytes += data.len() as u64;
            self.moved = true;
            let mut off = 0;
            while off < data.len() {
                match write(cx, w, &data[off..]) {
                    Poll::Ready(Ok(n)) => off += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                }
            }
            if off < data.len() {
                self.pending = data[off..].to_vec();
                self.waiting_since = Some(Instant::now());
            }
            self.unflushed = true;
        }
        // Let other tasks run; come back at once.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// A flush or shutdown of the writer: while it waits, this direction waits on the writer
    /// (from the first wait on); once done, it no longer does.
    fn stalls(&mut self, p: Poll<io::Result<()>>) -> Poll<io::Result<()>> {
        match p {
            Poll::Pending => {
                self.waiting_since.get_or_insert_with(Instant::now);
                Poll::Pending
            }
            Poll::Ready(r) => {
                self.waiting_since = None;
                Poll::Ready(r)
            }
        }
    }
}

fn write<W: AsyncWrite + Unpin>(
    cx: &mut Context<'_>,
    w: &mut W,
    buf: &[u8],
) -> Poll<io::Result<usize>> {
    match ready!(Pin::new(w).poll_write(cx, buf)) {
        Ok(0) => Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
        r => Poll::Ready(r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const T: Timeouts = Timeouts {
        idle: Duration::from_secs(30),
        to_client: Duration::from_secs(20),
        to_backend: Duration::from_secs(25),
    };

    #[tokio::test(start_paused = true)]
    async fn relays_both_ways_early_bytes_first_and_half_closes() {
        let (client, mut c) = tokio::io::duplex(64);
        let (backend, mut b) = tokio::io::duplex(64);
        let tunnel = tokio::spawn(relay(
            client,
            b"early-c".to_vec(),
            backend,
            b"early-b".to_vec(),
            T,
        ));
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let send = big.clone();
        let backend_side = tokio::spawn(async move {
            let mut got = vec![0; 7 + 5];
            b.read_exact(&mut got).await.unwrap();
            assert_eq!(got, b"early-chello");
            b.write_all(&send).await.unwrap();
            // The client half-closed: the rest still flows back.
            let mut rest = Vec::new();
            b.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
            b.write_all(b"bye").await.unwrap();
            b.shutdown().await.unwrap();
        });
        c.write_all(b"hello").await.unwrap();
        let mut got = vec![0; 7 + big.len()];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..7], b"early-b");
        assert!(got[7..] == big[..], "backend bytes corrupted");
        c.shutdown().await.unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"bye");
        backend_side.await.unwrap();
        let o = tunnel.await.unwrap();
        assert!(o.error.is_none(), "{:?}", o.error);
        assert_eq!(o.bytes_in, 12);
        assert_eq!(o.bytes_out, 7 + big.len() as u64 + 3);
    }

    #[tokio::test(start_paused = true)]
    async fn traffic_either_way_keeps_the_tunnel_open_and_silence_both_ways_ends_it() {
        let (client, mut c) = tokio::io::duplex(64);
        let (backend, mut b) = tokio::io::duplex(64);
        let started = Instant::now();
        let tunnel = tokio::spawn(relay(client, Vec::new(), backend, Vec::new(), T));
        // The client talks every 20 s for two minutes; the backend reads but never answers.
        let mut got = [0u8; 4];
        for _ in 0..6 {
            c.write_all(b"ping").await.unwrap();
            b.read_exact(&mut got).await.unwrap();
            tokio::time::sleep(Duration::from_secs(20)).await;
        }
        assert!(!tunnel.is_finished(), "closed while the client talked");
        // Then nothing moves either way: closed 30 s after the last ping.
        let o = tunnel.await.unwrap();
        let e = o.error.expect("timed out");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(
            e.to_string().contains("nothing moved either way for 30s"),
            "{e}"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(100 + 30));
        assert_eq!(o.bytes_in, 24);
    }

    /// Fill one direction until the tunnel stops taking bytes, keep the other side talking
    /// (so the tunnel is not idle) without reading: the tunnel ends after the write timeout of
    /// the side that takes nothing.
    async fn a_peer_that_does_not_read(backend_stalls: bool) -> (io::Error, Duration) {
        let (client, c) = tokio::io::duplex(1024);
        let (backend, b) = tokio::io::duplex(1024);
        let started = Instant::now();
        let tunnel = tokio::spawn(relay(client, Vec::new(), backend, Vec::new(), T));
        let (mut filler, mut talker) = if backend_stalls { (c, b) } else { (b, c) };
        // Only the two pipes' buffers and one pending read fit.
        let chunk = [7u8; 1024];
        let mut sent = 0;
        while tokio::time::timeout(Duration::from_millis(100), filler.write_all(&chunk))
            .await
            .is_ok()
        {
            sent += chunk.len();
            assert!(sent <= 1024 + 1024 + CHUNK, "unbounded: {sent} bytes taken");
        }
        let talk = tokio::spawn(async move {
            loop {
                if talker.write_all(b"x").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
        let o = tunnel.await.unwrap();
        talk.abort();
        let e = o.error.unwrap();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        (e, started.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_does_not_read_holds_the_backend_back_then_times_out() {
        let (e, waited) = a_peer_that_does_not_read(false).await;
        assert!(
            e.to_string().contains("the client took nothing for 20s"),
            "{e}"
        );
        assert!(
            waited >= Duration::from_secs(20) && waited < Duration::from_secs(21),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_behind_a_write_buffer_that_does_not_read_times_out_too() {
        // As the client's connection is (Pingora's 1460-byte write buffer): small writes are
        // taken into the buffer at once, and then its flush waits.
        let (client, c) = tokio::io::duplex(1024);
        let client = tokio::io::BufWriter::with_capacity(4096, client);
        let (backend, mut b) = tokio::io::duplex(1024);
        let started = Instant::now();
        let tunnel = tokio::spawn(relay(client, Vec::new(), backend, Vec::new(), T));
        // The backend writes in small pieces and keeps writing; the client reads nothing.
        let talk = tokio::spawn(async move {
            while b.write_all(&[7u8; 100]).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        let o = tokio::time::timeout(Duration::from_secs(60), tunnel)
            .await
            .expect("the tunnel waited on a flush with no timeout")
            .unwrap();
        talk.abort();
        drop(c);
        let e = o.error.unwrap();
        assert!(
            e.to_string().contains("the client took nothing for 20s"),
            "{e}"
        );
        let waited = started.elapsed();
        assert!(waited < Duration::from_secs(21), "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_backend_that_does_not_read_times_out_after_its_own_write_timeout() {
        let (e, waited) = a_peer_that_does_not_read(true).await;
        assert!(
            e.to_string().contains("the backend took nothing for 25s"),
            "{e}"
        );
        assert!(
            waited >= Duration::from_secs(25) && waited < Duration::from_secs(26),
            "{waited:?}"
        );
    }
}

//! Between requests, an HTTP/1 connection waits in its guard, not in Pingora.
//!
//! Pingora's own HTTP/1 loop (`impl<T: HttpServerApp> ServerApp for T`, in pingora-core's
//! `apps`) starts each request by calling `process_new_http` with a fresh session, which then
//! waits in `read_request` for the head. While it waits, the connection holds the proxy's
//! boxed session future (~13 KiB), the session and its header buffer, and that loop's own
//! future (~4 KiB, sized for its HTTP/2 branch too): most of an idle keep-alive connection's
//! memory (docs/architecture.md, "Idle connections"; the figures in docs/performance.md).
//!
//! [`serve_http1`] is that loop for guarded connections, with one change: before each
//! request it waits on the guard ([`GuardedStream::next_request`]) for the request's first
//! bytes, and only then builds the session and hands it to Pingora. Pingora's per-request
//! state exists only while a request is on its way; an idle connection holds the guard, the
//! socket and a few hundred bytes of future.
//!
//! The wait keeps what Pingora's read would: the guard's keep-alive timeout and first-head
//! deadline (a read there enforces the same ones), and the end of an idle connection when the
//! service shuts down (Pingora races `read_request` against shutdown the same way). What the
//! loop passes from one request to the next is Pingora's own `HttpPersistentSettings`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Peek, Stream};
use pingora::server::ShutdownWatch;

use super::GuardedStream;
use super::stream::H2_PREFACE;

type Request<'a> = Pin<Box<dyn Future<Output = Option<ReusedHttpStream>> + Send + 'a>>;

/// Serve HTTP/1 requests on `conn` with `app` until the connection is not reused, waiting for
/// each request's first bytes in the guard (the first request's have arrived).
pub async fn serve_http1<A: HttpServerApp + Send + Sync + 'static>(
    app: &Arc<A>,
    conn: Box<GuardedStream>,
    shutdown: &ShutdownWatch,
) {
    let limit = app.server_options().and_then(|o| o.keepalive_request_limit);
    let mut request = first(app, conn, shutdown, limit);
    while let Some(reused) = request.await {
        // `settings` carries the pipelining opt-in (and would carry a byte of a next request,
        // had Pingora's probe read one: the guard holds them back until a response is done).
        let (stream, settings) = reused.consume();
        let stream = match guarded(stream) {
            Ok(mut conn) => {
                if !next_request(&mut conn, shutdown).await {
                    return;
                }
                conn as Stream
            }
            Err(stream) => stream,
        };
        request = next(app, stream, settings, shutdown);
    }
}

/// The first request's session, set up as Pingora's loop sets it up. (Built outside the loop's
/// future so that no session is kept in it while the connection waits.)
fn first<'a, A: HttpServerApp + Send + Sync + 'static>(
    app: &'a Arc<A>,
    conn: Box<GuardedStream>,
    shutdown: &'a ShutdownWatch,
    limit: Option<u32>,
) -> Request<'a> {
    let mut session = ServerSession::new_http1(conn);
    // Pingora's defaults: no keep-alive once shutting down, else 60 s (the proxy sets the
    // configured one in `early_request_filter`).
    session.set_keepalive(if *shutdown.borrow() { None } else { Some(60) });
    session.set_keepalive_reuses_remaining(limit);
    pipelining(&mut session);
    app.process_new_http(session, shutdown)
}

/// A reused connection's next session, with what the last one passed on.
fn next<'a, A: HttpServerApp + Send + Sync + 'static>(
    app: &'a Arc<A>,
    stream: Stream,
    settings: Option<HttpPersistentSettings>,
    shutdown: &'a ShutdownWatch,
) -> Request<'a> {
    let mut session = ServerSession::new_http1(stream);
    if let Some(settings) = settings {
        settings.apply_to_session(&mut session);
    }
    pipelining(&mut session);
    app.process_new_http(session, shutdown)
}

/// Pipelined requests, served in turn: the guard hands on one message per read and holds a
/// next request until the response in flight is done, so neither Pingora's head read nor the
/// probe it reads the client with while answering (for a close) gets a byte of it. Without
/// this opt-in, such a byte would fail the request in flight ("Sent data after end of body",
/// answered 400); with it, Pingora would pass the byte on to the next session. It is the
/// backstop: nothing should reach it.
fn pipelining(session: &mut ServerSession) {
    session.set_pipelining_enabled(true);
}

/// The guard itself, if `stream` is one.
fn guarded(stream: Stream) -> Result<Box<GuardedStream>, Stream> {
    if GuardedStream::of(&stream).is_none() {
        return Err(stream);
    }
    Ok(stream
        .into_any()
        .downcast::<GuardedStream>()
        .expect("checked above"))
}

/// Wait for the next request on `conn`: `false` when the connection should close instead (it
/// ended, was closed idle, failed, or the service is shutting down).
pub async fn next_request(conn: &mut GuardedStream, shutdown: &ShutdownWatch) -> bool {
    let mut shutdown = shutdown.clone();
    tokio::select! {
        // Bytes already here go first, as in Pingora's read.
        biased;
        r = conn.next_request() => r.unwrap_or(false),
        _ = shutdown.wait_for(|down| *down) => false,
    }
}

/// How long a new connection's first bytes are still awaited once the service shuts down.
pub const LATE_FIRST_BYTES: Duration = Duration::from_millis(250);

/// Wait for a new connection's first request: as [`next_request`], except that a shutdown
/// leaves it [`LATE_FIRST_BYTES`] more. A connection accepted as the service stopped accepting
/// (Pingora's accept loop can take one more after the shutdown signal) almost always has its
/// request on the way; Pingora's own wait would have been ended a moment later, at cleanup.
pub async fn first_request(conn: &mut GuardedStream, shutdown: &ShutdownWatch) -> bool {
    let mut shutdown = shutdown.clone();
    tokio::select! {
        biased;
        r = conn.next_request() => return r.unwrap_or(false),
        _ = shutdown.wait_for(|down| *down) => {}
    }
    matches!(
        tokio::time::timeout(LATE_FIRST_BYTES, conn.next_request()).await,
        Ok(Ok(true))
    )
}

/// On an h2c listener: whether the connection starts with the HTTP/2 preface (Pingora's test,
/// on the bytes the guard holds; they stay held for whichever protocol reads them). `None`:
/// the connection failed (Pingora then drops it).
pub async fn h2_preface(conn: &mut GuardedStream) -> Option<bool> {
    let mut buf = [0u8; H2_PREFACE.len()];
    conn.try_peek(&mut buf).await.ok()?;
    Some(buf == H2_PREFACE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::runtime::RuntimeState;
    use crate::wire::{Admission, Guarded};
    use arc_swap::ArcSwap;
    use async_trait::async_trait;
    use pingora::apps::ServerApp;
    use pingora_core::protocols::l4::stream::Stream as L4Stream;

    /// An application that answers nothing.
    struct Nothing;

    #[async_trait]
    impl HttpServerApp for Nothing {
        async fn process_new_http(
            self: &Arc<Self>,
            _: ServerSession,
            _: &ShutdownWatch,
        ) -> Option<ReusedHttpStream> {
            None
        }
    }

    async fn stream() -> Stream {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        Box::new(L4Stream::from(c))
    }

    /// What an idle HTTP/1 connection holds besides its sockets is, apart from Pingora's task
    /// (the accept and TLS handshake), the guard and this service's future: keep them small.
    /// Pingora's own loop's future, which this replaces for HTTP/1, is measured for scale.
    #[tokio::test]
    async fn an_idle_connection_holds_a_small_future() {
        let (_tx, watch) = tokio::sync::watch::channel(false);
        let config = Config::from_yaml(
            "listeners: [{address: 127.0.0.1:1}]\nupstreams: {u: {backends: [{address: 127.0.0.1:2}]}}\n",
            "",
        )
        .unwrap();
        let state = Arc::new(ArcSwap::from_pointee(RuntimeState::new(config)));
        let guarded = Arc::new(Guarded::new(
            Nothing,
            state,
            Arc::new(Admission::default()),
            100,
            false,
        ));
        let ours = std::mem::size_of_val(&*guarded.process_new(stream().await, &watch));
        let pingoras = std::mem::size_of_val(&*ServerApp::process_new(
            &Arc::new(Nothing),
            stream().await,
            &watch,
        ));
        let guard = std::mem::size_of::<GuardedStream>();
        assert!(ours <= 1024, "the connection's future: {ours} bytes");
        assert!(guard <= 1024, "the guard: {guard} bytes");
        assert!(
            pingoras > 2 * ours,
            "Pingora's loop {pingoras} bytes, ours {ours}"
        );
    }
}

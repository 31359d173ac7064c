//! The clients of the soak: the backends' endpoints, one loop per kind of request, and the
//! checks of every answer (bodies byte for byte, upload digests, WebSocket echoes), counted
//! in [`Stats`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::Message;

use crate::common::{Behavior, TestGateway, pattern};

const LARGE: usize = 1 << 20;
const CACHED: usize = 64 * 1024;
const CACHED_KEYS: u64 = 16;
pub const SMALL_BODY: &[u8] = b"small answer from the soak backend";
const UPLOAD_BODY: &[u8] = b"stored";

/// Every kind of request, for the counters.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Small,
    Large,
    Upload,
    Cached,
    Ws,
}
pub const KINDS: [Kind; 5] = [
    Kind::Small,
    Kind::Large,
    Kind::Upload,
    Kind::Cached,
    Kind::Ws,
];

/// What the clients saw, per kind.
#[derive(Default)]
pub struct Stats {
    pub ok: [AtomicU64; 5],
    /// 502/503/504 and connection resets / cut bodies: what a kill may cause.
    pub expected_errors: [AtomicU64; 5],
    pub bytes: AtomicU64,
    /// Cached-route answers served from the cache (`X-Cache-Status: HIT`).
    pub cache_hits: AtomicU64,
    /// Expected errors by cause: status, body cut short, connection reset before the head.
    pub causes: Mutex<std::collections::BTreeMap<&'static str, u64>>,
    /// Corrupted bodies and errors of kinds no kill or reload may cause (first 20 of each).
    pub corrupted: Mutex<Vec<String>>,
    pub unexpected: Mutex<Vec<String>>,
    pub corrupted_count: AtomicU64,
    pub unexpected_count: AtomicU64,
}

impl Stats {
    fn ok(&self, k: Kind, bytes: usize) {
        self.ok[k as usize].fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
    fn expected(&self, k: Kind, cause: &'static str) {
        self.expected_errors[k as usize].fetch_add(1, Ordering::Relaxed);
        *self.causes.lock().unwrap().entry(cause).or_default() += 1;
    }
    fn corrupted(&self, k: Kind, what: String) {
        self.corrupted_count.fetch_add(1, Ordering::Relaxed);
        let mut v = self.corrupted.lock().unwrap();
        if v.len() < 20 {
            v.push(format!("{k:?}: {what}"));
        }
    }
    fn unexpected(&self, k: Kind, what: String) {
        self.unexpected_count.fetch_add(1, Ordering::Relaxed);
        let mut v = self.unexpected.lock().unwrap();
        if v.len() < 20 {
            v.push(format!("{k:?}: {what}"));
        }
    }
    /// A response status that is not 2xx: a gateway error page is expected during kills,
    /// anything else is not.
    fn bad_status(&self, k: Kind, status: u16) {
        if let Some(cause) = match status {
            502 => Some("502"),
            503 => Some("503"),
            504 => Some("504"),
            _ => None,
        } {
            self.expected(k, cause);
        } else {
            self.unexpected(k, format!("status {status}"));
        }
    }
    /// A transport error. Connection resets and bodies cut short are what a killed backend
    /// causes once the head was forwarded; a refused connect (the gateway always listens) or a
    /// client timeout (a hang) are not.
    fn transport(&self, k: Kind, e: &reqwest::Error) {
        if e.is_connect() || e.is_timeout() {
            self.unexpected(k, format!("{e:?}"));
        } else if e.is_body() || e.is_decode() {
            self.expected(k, "body cut");
        } else {
            self.expected(k, "reset before the head");
        }
    }
    pub fn total(&self, a: &[AtomicU64; 5]) -> u64 {
        a.iter().map(|x| x.load(Ordering::Relaxed)).sum()
    }
}

/// A deterministic xorshift generator: the same run sends the same uploads.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// The backends' endpoints: `/small` (answered after 1 ms, so kills catch some in flight),
/// `/large` (1 MiB of `pattern`, streamed 64 KiB every 2 ms, so kills cut some in the middle),
/// `/upload` (the body's digest in headers), `/cached` (64 KiB, fresh for 1 s), `/healthz`.
pub fn backend() -> Behavior {
    Behavior {
        body: SMALL_BODY.to_vec(),
        delay: Duration::from_millis(1),
        paths: vec![
            (
                "/large".into(),
                Behavior {
                    generated_len: Some(LARGE as u64),
                    chunk_delay: Duration::from_millis(2),
                    ..Behavior::default()
                },
            ),
            (
                "/upload".into(),
                Behavior {
                    body: UPLOAD_BODY.to_vec(),
                    echo_body_digest: true,
                    ..Behavior::default()
                },
            ),
            (
                "/cached".into(),
                Behavior {
                    generated_len: Some(CACHED as u64),
                    headers: vec!["cache-control: public, max-age=1".into()],
                    ..Behavior::default()
                },
            ),
        ],
        ..Behavior::default()
    }
}

pub fn soak_client() -> reqwest::Client {
    // The client drops idle connections before the gateway's 1 s keep-alive timeout does, so
    // no request is sent on a connection the gateway is closing (a client-side race, not a
    // gateway fault).
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .pool_idle_timeout(Duration::from_millis(500))
        .build()
        .unwrap()
}

/// One client's loop of `kind` requests until `until` (or a generous count).
async fn traffic(
    kind: Kind,
    base: String,
    ws: String,
    seed: u64,
    until: Instant,
    stats: Arc<Stats>,
) {
    let c = soak_client();
    let large = pattern(0, LARGE);
    let cached = pattern(0, CACHED);
    let mut rng = Rng(seed | 1);
    for i in 0..10_000_000u64 {
        if Instant::now() >= until {
            return;
        }
        match kind {
            Kind::Small => {
                let r = c.get(format!("{base}/small/{i}")).send().await;
                check_body(&stats, kind, r, SMALL_BODY).await;
            }
            Kind::Large => {
                let r = c.get(format!("{base}/large/{i}")).send().await;
                check_body(&stats, kind, r, &large).await;
            }
            Kind::Cached => {
                let key = rng.next() % CACHED_KEYS;
                let r = c.get(format!("{base}/cached/{key}")).send().await;
                check_body(&stats, kind, r, &cached).await;
            }
            Kind::Upload => upload(&c, &base, &mut rng, i, &stats).await,
            Kind::Ws => websocket(&ws, &mut rng, &stats).await,
        }
    }
}

async fn check_body(stats: &Stats, kind: Kind, r: reqwest::Result<reqwest::Response>, want: &[u8]) {
    let r = match r {
        Ok(r) => r,
        Err(e) => return stats.transport(kind, &e),
    };
    let status = r.status().as_u16();
    if !r.status().is_success() {
        let _ = r.bytes().await;
        return stats.bad_status(kind, status);
    }
    if r.headers()
        .get("x-cache-status")
        .is_some_and(|v| v == "HIT")
    {
        stats.cache_hits.fetch_add(1, Ordering::Relaxed);
    }
    match r.bytes().await {
        Ok(b) if b.as_ref() == want => stats.ok(kind, b.len()),
        Ok(b) => {
            let at = b.iter().zip(want).position(|(x, y)| x != y);
            stats.corrupted(
                kind,
                format!(
                    "{} bytes, want {}; first difference at {at:?}",
                    b.len(),
                    want.len()
                ),
            );
        }
        Err(e) => stats.transport(kind, &e),
    }
}

/// POST 1 B–256 KiB of random bytes (every other one chunked) and check the digest the
/// backend computed of what reached it.
async fn upload(c: &reqwest::Client, base: &str, rng: &mut Rng, i: u64, stats: &Stats) {
    let len = 1 + (rng.next() % (256 * 1024)) as usize;
    let data = rng.bytes(len);
    let digest: String = Sha256::digest(&data)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect();
    let body = if i.is_multiple_of(2) {
        reqwest::Body::from(data)
    } else {
        let chunks: Vec<Vec<u8>> = data.chunks(16 * 1024).map(<[u8]>::to_vec).collect();
        let stream = futures_util::stream::iter(chunks.into_iter().map(Ok::<_, std::io::Error>));
        reqwest::Body::wrap_stream(stream)
    };
    let r = match c.post(format!("{base}/upload/{i}")).body(body).send().await {
        Ok(r) => r,
        Err(e) => return stats.transport(Kind::Upload, &e),
    };
    let status = r.status().as_u16();
    if !r.status().is_success() {
        let _ = r.bytes().await;
        return stats.bad_status(Kind::Upload, status);
    }
    let header = |n: &str| {
        r.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (seen_digest, seen_len) = (header("x-body-sha256"), header("x-body-length"));
    match r.bytes().await {
        Ok(b) if b.as_ref() == UPLOAD_BODY && seen_digest == digest && seen_len == len.to_string() => {
            stats.ok(Kind::Upload, len)
        }
        Ok(b) => stats.corrupted(
            Kind::Upload,
            format!(
                "sent {len} bytes sha256 {digest}; backend saw {seen_len} bytes sha256 {seen_digest}; answer {:?}",
                String::from_utf8_lossy(&b)
            ),
        ),
        Err(e) => stats.transport(Kind::Upload, &e),
    }
}

/// One WebSocket session: ten text and two binary messages, 20 ms apart (so sessions span
/// reloads), each echoed exactly. The WebSocket backend is never killed: any failure counts.
async fn websocket(url: &str, rng: &mut Rng, stats: &Stats) {
    let (mut socket, _) = match tokio_tungstenite::connect_async(url).await {
        Ok(s) => s,
        Err(e) => return stats.unexpected(Kind::Ws, format!("handshake: {e}")),
    };
    for i in 0..12 {
        let msg = if i % 6 == 5 {
            Message::Binary(rng.bytes(32 * 1024))
        } else {
            Message::Text(format!("message {i} {}", rng.next()))
        };
        if let Err(e) = socket.send(msg.clone()).await {
            return stats.unexpected(Kind::Ws, format!("send: {e}"));
        }
        match socket.next().await {
            Some(Ok(echo)) if echo == msg => stats.ok(Kind::Ws, msg.len()),
            Some(Ok(echo)) => {
                return stats.corrupted(Kind::Ws, format!("sent {msg:?}, echoed {echo:?}"));
            }
            other => return stats.unexpected(Kind::Ws, format!("echo: {other:?}")),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = socket.close(None).await;
}

/// Run every kind of client until `until`: four small, two large, two upload, one cached, one
/// WebSocket.
pub fn start_traffic(
    gw: &TestGateway,
    until: Instant,
    stats: &Arc<Stats>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mix = [
        Kind::Small,
        Kind::Small,
        Kind::Small,
        Kind::Small,
        Kind::Large,
        Kind::Large,
        Kind::Upload,
        Kind::Upload,
        Kind::Cached,
        Kind::Ws,
    ];
    let base = gw.url("");
    let ws = format!("ws://{}/ws/echo", gw.addr);
    mix.iter()
        .enumerate()
        .map(|(n, &k)| {
            tokio::spawn(traffic(
                k,
                base.clone(),
                ws.clone(),
                0x9e37_79b9_7f4a_7c15 ^ n as u64,
                until,
                Arc::clone(stats),
            ))
        })
        .collect()
}

//! The access log: one line per request, JSON or `key=value` text, to stdout, stderr or a file.
//!
//! Workers never block on it and never allocate for it: each formats its line into a
//! per-thread buffer and appends it to one shared pending buffer (a short, uncontended lock);
//! a writer thread swaps that buffer out every 10 ms (it is never woken per line) and writes it
//! with one call. Lines therefore reach the destination within ~10 ms, whole and in order.
//! When the writer falls behind and 16 MiB are pending, lines are dropped and counted in
//! `tollgate_access_log_dropped_total`.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;

use crate::config::{AccessLogConfig, AccessLogFormat};
use crate::metrics::metrics;

/// Bytes that may wait for the writer before lines are dropped (~50,000 JSON lines).
const MAX_PENDING: usize = 16 << 20;
/// How often the writer takes what is pending.
const POLL: Duration = Duration::from_millis(10);
/// The buffers keep this much room between bursts; a burst's extra is given back.
const KEEP: usize = 256 * 1024;

/// One request's record.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    /// RFC 3339 time the request finished, in UTC with milliseconds.
    pub time: &'a str,
    /// `X-Request-Id`.
    pub request_id: &'a str,
    /// Client address (after trusted-proxy resolution).
    pub client: &'a str,
    /// Method.
    pub method: &'a str,
    /// Host header.
    pub host: &'a str,
    /// Path and query as received (normalised).
    pub path: &'a str,
    /// Status sent, 0 if none.
    pub status: u16,
    /// Request body bytes received.
    pub bytes_in: usize,
    /// Response body bytes sent.
    pub bytes_out: usize,
    /// Matched route, empty if none.
    pub route: &'a str,
    /// Upstream, empty if none.
    pub upstream: &'a str,
    /// Backend of the last attempt, empty if none.
    pub backend: &'a str,
    /// Attempts made (0 when answered by the gateway).
    pub attempts: usize,
    /// Of which retries on another backend.
    pub retries: usize,
    /// Milliseconds from choosing the last backend to its response head.
    pub upstream_ms: Option<f64>,
    /// Milliseconds from the request head to the end of the response.
    pub total_ms: f64,
    /// Why no backend was tried (breaker, health, in-flight cap), if so.
    pub unavailable: Option<&'static str>,
    /// What the cache did (`HIT`, `MISS`, …) on a caching route.
    pub cache: Option<&'static str>,
    /// The error that ended the request, if any.
    pub error: Option<String>,
}

/// A running access log.
pub struct AccessLog {
    shared: Arc<Shared>,
    /// The destination, until the writer thread takes it at the first line: the thread starts
    /// then, not when the log is opened, because the first log is opened before Pingora forks
    /// into the background (`-d`), and a thread does not survive a fork.
    out: Mutex<Option<Box<dyn Write + Send>>>,
    started: std::sync::Once,
    format: AccessLogFormat,
    /// The configuration it was started from (a reload keeps the log when unchanged).
    pub config: AccessLogConfig,
}

/// What the workers and the writer thread share.
#[derive(Debug, Default)]
struct Shared {
    /// Whole lines, each ending in `\n`, not yet written.
    pending: Mutex<Vec<u8>>,
    /// The log was dropped (replaced by a reload, or shut down): write what is left and stop.
    closed: AtomicBool,
}

impl AccessLog {
    /// Open the destination (the writer thread starts at the first line).
    pub fn start(config: &AccessLogConfig) -> std::io::Result<AccessLog> {
        let out: Box<dyn Write + Send> = match config.path.as_str() {
            "stdout" => Box::new(std::io::stdout()),
            "stderr" => Box::new(std::io::stderr()),
            path => Box::new(OpenOptions::new().create(true).append(true).open(path)?),
        };
        Ok(AccessLog {
            shared: Arc::new(Shared::default()),
            out: Mutex::new(Some(out)),
            started: std::sync::Once::new(),
            format: config.format,
            config: config.clone(),
        })
    }

    /// Start the writer thread, once.
    fn start_writer(&self) {
        self.started.call_once(|| {
            let Some(out) = self.out.lock().take() else {
                return;
            };
            let theirs = Arc::clone(&self.shared);
            if let Err(e) = std::thread::Builder::new()
                .name("tollgate-access-log".into())
                .spawn(move || writer(&theirs, out))
            {
                log::error!("access log: cannot start its writer thread: {e}");
            }
        });
    }

    /// Queue one entry; never blocks on the destination.
    pub fn log(&self, e: &Entry<'_>) {
        self.start_writer();
        SCRATCH.with_borrow_mut(|line| {
            line.clear();
            format_line(self.format, e, line);
            if !append(&mut self.shared.pending.lock(), line, MAX_PENDING) {
                metrics().access_log_dropped.inc();
            }
        });
    }
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("config", &self.config)
            .field("started", &self.started.is_completed())
            .finish_non_exhaustive()
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
    }
}

thread_local! {
    /// Each worker's formatting buffer (a line is a few hundred bytes).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(1024));
}

/// Append `line` to `pending` unless that would pass `max` bytes: whole lines or nothing.
fn append(pending: &mut Vec<u8>, line: &[u8], max: usize) -> bool {
    if pending.len() + line.len() > max {
        return false;
    }
    pending.extend_from_slice(line);
    true
}

/// The writer thread: every `POLL`, swap the pending lines out and write them in one call.
fn writer(shared: &Shared, mut out: Box<dyn Write + Send>) {
    // Polling instead of a wake-up per line: a blocked receiver woken for every line (a futex
    // call and a context switch) cost ~16 µs of CPU per request under load.
    let mut batch = Vec::new();
    loop {
        std::thread::sleep(POLL);
        let closed = shared.closed.load(Ordering::Acquire);
        std::mem::swap(&mut *shared.pending.lock(), &mut batch);
        if !batch.is_empty() {
            let _ = out.write_all(&batch);
            let _ = out.flush();
            batch.clear();
            batch.shrink_to(KEEP);
        }
        if closed {
            return;
        }
    }
}

/// `e` as one line in `format`, ending in `\n`, appended to `out`.
pub fn format_line(format: AccessLogFormat, e: &Entry<'_>, out: &mut Vec<u8>) {
    match format {
        AccessLogFormat::Json => json(out, e),
        AccessLogFormat::Text => text(out, e),
    }
    out.push(b'\n');
}

/// `e` as one JSON object, appended to `out`: the bytes `serde_json` writes for `Entry` (a test
/// holds the two equal), without its per-field serializer calls.
fn json(out: &mut Vec<u8>, e: &Entry<'_>) {
    let strings = |out: &mut Vec<u8>, fields: &[(&[u8], &str)]| {
        for (key, v) in fields {
            out.extend_from_slice(key);
            json_str(out, v);
        }
    };
    let mut digits = itoa::Buffer::new();
    let mut ints = |out: &mut Vec<u8>, fields: &[(&[u8], u64)]| {
        for (key, v) in fields {
            out.extend_from_slice(key);
            out.extend_from_slice(digits.format(*v).as_bytes());
        }
    };
    out.push(b'{');
    strings(
        out,
        &[
            (b"\"time\":", e.time),
            (b",\"request_id\":", e.request_id),
            (b",\"client\":", e.client),
            (b",\"method\":", e.method),
            (b",\"host\":", e.host),
            (b",\"path\":", e.path),
        ],
    );
    ints(
        out,
        &[
            (b",\"status\":", e.status.into()),
            (b",\"bytes_in\":", e.bytes_in as u64),
            (b",\"bytes_out\":", e.bytes_out as u64),
        ],
    );
    strings(
        out,
        &[
            (b",\"route\":", e.route),
            (b",\"upstream\":", e.upstream),
            (b",\"backend\":", e.backend),
        ],
    );
    ints(
        out,
        &[
            (b",\"attempts\":", e.attempts as u64),
            (b",\"retries\":", e.retries as u64),
        ],
    );
    out.extend_from_slice(b",\"upstream_ms\":");
    match e.upstream_ms {
        Some(v) => json_f64(out, v),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"total_ms\":");
    json_f64(out, e.total_ms);
    for (key, v) in [
        (&b",\"unavailable\":"[..], e.unavailable),
        (b",\"cache\":", e.cache),
        (b",\"error\":", e.error.as_deref()),
    ] {
        out.extend_from_slice(key);
        json_opt_str(out, v);
    }
    out.push(b'}');
}

fn json_opt_str(out: &mut Vec<u8>, v: Option<&str>) {
    match v {
        Some(v) => json_str(out, v),
        None => out.extend_from_slice(b"null"),
    }
}

/// As `serde_json`: shortest round-trip form, `null` for NaN and infinities.
fn json_f64(out: &mut Vec<u8>, v: f64) {
    if v.is_finite() {
        out.extend_from_slice(zmij::Buffer::new().format_finite(v).as_bytes());
    } else {
        out.extend_from_slice(b"null");
    }
}

/// A JSON string as `serde_json` escapes it: `"`, `\\` and the C0 controls; the rest as is.
fn json_str(out: &mut Vec<u8>, v: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = v.as_bytes();
    // Most values need no escape: one branch-free pass (it vectorises) decides.
    let plain = !bytes.iter().fold(false, |any, &b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if plain {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short = match b {
            b'"' => b'"',
            b'\\' => b'\\',
            0x08 => b'b',
            0x0c => b'f',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            0..=0x1f => b'u',
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.push(b'\\');
        out.push(short);
        if short == b'u' {
            out.extend_from_slice(&[
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

fn dash(v: &str) -> &str {
    if v.is_empty() { "-" } else { v }
}

/// `e` as one `key=value` line, appended to `out`.
fn text(out: &mut Vec<u8>, e: &Entry<'_>) {
    // Writing to a Vec cannot fail.
    let _ = write!(
        out,
        "time={} request_id={} client={} method={} host={:?} path={:?} status={} bytes_in={} bytes_out={} route={} upstream={} backend={} attempts={} retries={} upstream_ms=",
        e.time,
        e.request_id,
        e.client,
        e.method,
        e.host,
        e.path,
        e.status,
        e.bytes_in,
        e.bytes_out,
        dash(e.route),
        dash(e.upstream),
        dash(e.backend),
        e.attempts,
        e.retries,
    );
    let _ = match e.upstream_ms {
        Some(v) => write!(out, "{v:.3}"),
        None => write!(out, "-"),
    };
    let _ = write!(
        out,
        " total_ms={:.3} unavailable={} cache={} error={:?}",
        e.total_ms,
        e.unavailable.unwrap_or("-"),
        e.cache.unwrap_or("-"),
        e.error.as_deref().unwrap_or(""),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            time: "2026-11-25T00:00:00.000Z",
            request_id: "abc",
            client: "127.0.0.1",
            method: "GET",
            host: "h",
            path: "/p?q=\"x\"",
            status: 200,
            bytes_in: 0,
            bytes_out: 2,
            route: "r",
            upstream: "u",
            backend: "127.0.0.1:1",
            attempts: 1,
            retries: 0,
            upstream_ms: Some(1.5),
            total_ms: 2.0,
            unavailable: None,
            cache: Some("HIT"),
            error: None,
        }
    }

    /// The hand-written JSON line is byte for byte what `serde_json` makes of the `Entry`.
    #[test]
    fn json_lines_match_serde_json() {
        let all_ascii: String = (0u8..0x80).map(char::from).collect();
        let strings = [
            "",
            "plain",
            "/p?q=\"x\"&b=\\",
            all_ascii.as_str(),
            "caf\u{e9} \u{1F600} \u{2028}\u{7f}",
        ];
        let floats = [
            0.0,
            -0.0,
            1.5,
            2.0,
            0.1 + 0.2,
            1e-7,
            123_456_789.125,
            1e21,
            f64::NAN,
            f64::INFINITY,
            f64::MIN_POSITIVE,
        ];
        let error = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let mut n = 0;
        for (i, s) in strings.iter().enumerate() {
            for (j, f) in floats.iter().enumerate() {
                let mut e = entry();
                e.time = s;
                e.request_id = strings[(i + 1) % strings.len()];
                e.client = s;
                e.method = s;
                e.host = s;
                e.path = strings[(i + j) % strings.len()];
                e.route = s;
                e.upstream = s;
                e.backend = s;
                e.status = [0, 200, 599, u16::MAX][j % 4];
                e.bytes_in = [0, 1, usize::MAX][j % 3];
                e.bytes_out = j * 1_000_003;
                e.attempts = j;
                e.retries = i;
                e.upstream_ms = (j % 2 == 0).then_some(*f);
                e.total_ms = *f;
                e.unavailable = [None, Some("breaker_open")][j % 2];
                e.cache = [None, Some("HIT"), Some("STALE")][j % 3];
                e.error = error(strings[(i + 2) % strings.len()]);
                let mut ours = Vec::new();
                format_line(AccessLogFormat::Json, &e, &mut ours);
                let mut theirs = serde_json::to_vec(&e).unwrap();
                theirs.push(b'\n');
                assert_eq!(
                    String::from_utf8_lossy(&ours),
                    String::from_utf8_lossy(&theirs)
                );
                n += 1;
            }
        }
        assert_eq!(n, strings.len() * floats.len());
    }

    #[test]
    fn json_and_text_lines() {
        let json: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&entry()).unwrap()).unwrap();
        assert_eq!(json["path"], "/p?q=\"x\"");
        assert_eq!(json["upstream_ms"], 1.5);
        let mut t = Vec::new();
        text(&mut t, &entry());
        let t = String::from_utf8(t).unwrap();
        assert!(
            t.contains("path=\"/p?q=\\\"x\\\"\"") && t.contains("upstream_ms=1.500"),
            "{t}"
        );
    }

    #[test]
    fn pending_lines_are_bounded_and_whole() {
        let mut pending = Vec::new();
        assert!(append(&mut pending, b"one\n", 8));
        assert!(!append(&mut pending, b"two..\n", 8), "past the bound");
        assert!(append(&mut pending, b"3\n", 8));
        assert_eq!(pending, b"one\n3\n");
    }

    #[test]
    fn lines_are_written_whole_and_in_order_and_dropping_the_log_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::start(&AccessLogConfig {
            format: AccessLogFormat::Text,
            path: path.display().to_string(),
        })
        .unwrap();
        let n = 5000;
        let ids: Vec<String> = (0..n).map(|i| format!("id{i}")).collect();
        std::thread::scope(|s| {
            for half in ids.chunks(n / 2) {
                let log = &log;
                s.spawn(move || {
                    for id in half {
                        let mut e = entry();
                        e.request_id = id;
                        log.log(&e);
                    }
                });
            }
        });
        drop(log);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let lines = loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.lines().count() >= n || std::time::Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut seen: Vec<usize> = lines
            .lines()
            .map(|l| {
                assert!(l.starts_with("time=") && l.ends_with("error=\"\""), "{l}");
                let id = l.split(' ').nth(1).unwrap();
                id.strip_prefix("request_id=id").unwrap().parse().unwrap()
            })
            .collect();
        // Each thread's lines in its order; all of them, once.
        let first: Vec<usize> = seen.iter().copied().filter(|&i| i < n / 2).collect();
        assert!(first.windows(2).all(|w| w[0] < w[1]));
        seen.sort_unstable();
        assert_eq!(seen, (0..n).collect::<Vec<_>>());
    }

    #[test]
    fn file_destination_receives_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::start(&AccessLogConfig {
            format: AccessLogFormat::Json,
            path: path.display().to_string(),
        })
        .unwrap();
        for _ in 0..3 {
            log.log(&entry());
        }
        drop(log);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .count()
            < 3
        {
            assert!(std::time::Instant::now() < deadline, "lines not written");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

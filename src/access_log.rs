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
#[derive(Debug)]
pub struct AccessLog {
    shared: Arc<Shared>,
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
    /// Open the destination and start the writer thread.
    pub fn start(config: &AccessLogConfig) -> std::io::Result<AccessLog> {
        let out: Box<dyn Write + Send> = match config.path.as_str() {
            "stdout" => Box::new(std::io::stdout()),
            "stderr" => Box::new(std::io::stderr()),
            path => Box::new(OpenOptions::new().create(true).append(true).open(path)?),
        };
        let shared = Arc::new(Shared::default());
        let theirs = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("tollgate-access-log".into())
            .spawn(move || writer(&theirs, out))?;
        Ok(AccessLog {
            shared,
            format: config.format,
            config: config.clone(),
        })
    }

    /// Queue one entry; never blocks on the destination.
    pub fn log(&self, e: &Entry<'_>) {
        SCRATCH.with_borrow_mut(|line| {
            line.clear();
            match self.format {
                AccessLogFormat::Json => {
                    if serde_json::to_writer(&mut *line, e).is_err() {
                        return;
                    }
                }
                AccessLogFormat::Text => text(line, e),
            }
            line.push(b'\n');
            if !append(&mut self.shared.pending.lock(), line, MAX_PENDING) {
                metrics().access_log_dropped.inc();
            }
        });
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

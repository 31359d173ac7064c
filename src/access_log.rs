//! The access log: one line per request, JSON or `key=value` text, to stdout, stderr or a file.
//!
//! Workers never block on it: lines go through a bounded channel to a writer thread that drains
//! it every 10 ms (never woken per line) and writes through a 64 KiB buffer flushed when full or
//! at least every 100 ms. When the writer falls behind
//! and the channel is full, lines are dropped and counted in
//! `tollgate_access_log_dropped_total`.

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{AccessLogConfig, AccessLogFormat};
use crate::metrics::metrics;

/// Lines buffered between the workers and the writer thread.
const QUEUE: usize = 65_536;
/// Longest time a written line may wait in the buffer.
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// How often the writer drains the queue (65,536 lines per 10 ms is far above any load).
const POLL: Duration = Duration::from_millis(10);

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
    tx: SyncSender<String>,
    format: AccessLogFormat,
    /// The configuration it was started from (a reload keeps the log when unchanged).
    pub config: AccessLogConfig,
}

impl AccessLog {
    /// Open the destination and start the writer thread.
    pub fn start(config: &AccessLogConfig) -> std::io::Result<AccessLog> {
        let out: Box<dyn Write + Send> = match config.path.as_str() {
            "stdout" => Box::new(std::io::stdout()),
            "stderr" => Box::new(std::io::stderr()),
            path => Box::new(OpenOptions::new().create(true).append(true).open(path)?),
        };
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("tollgate-access-log".into())
            .spawn(move || writer(rx, BufWriter::with_capacity(64 * 1024, out)))?;
        Ok(AccessLog {
            tx,
            format: config.format,
            config: config.clone(),
        })
    }

    /// Queue one entry; never blocks.
    pub fn log(&self, e: &Entry<'_>) {
        // Formatted into a per-thread buffer, then copied into a line of exactly its length:
        // one allocation per line (it crosses to the writer thread), none for growing it.
        let line = SCRATCH.with_borrow_mut(|buf| {
            buf.clear();
            match self.format {
                AccessLogFormat::Json => {
                    if serde_json::to_writer(&mut *buf, e).is_err() {
                        buf.clear();
                    }
                }
                AccessLogFormat::Text => text(buf, e),
            }
            // Always UTF-8 (JSON, or text of `&str`s); checked without the lossy path's cost.
            match std::str::from_utf8(buf) {
                Ok(line) => line.to_owned(),
                Err(_) => String::from_utf8_lossy(buf).into_owned(),
            }
        });
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                metrics().access_log_dropped.inc();
            }
        }
    }
}

thread_local! {
    /// Each worker's formatting buffer (a line is a few hundred bytes).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(1024));
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

fn writer(rx: Receiver<String>, mut out: BufWriter<Box<dyn Write + Send>>) {
    // The writer polls instead of blocking on the channel: a blocked receiver would be woken
    // (a futex call and a context switch) for every line, which cost ~16 µs of CPU per request
    // under load. Draining every POLL costs nothing per line; the buffer goes out when full or
    // at least every FLUSH_EVERY.
    let mut last_flush = Instant::now();
    loop {
        std::thread::sleep(POLL);
        loop {
            match rx.try_recv() {
                Ok(line) => {
                    let _ = out.write_all(line.as_bytes());
                    let _ = out.write_all(b"\n");
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    let _ = out.flush();
                    return;
                }
            }
        }
        if last_flush.elapsed() >= FLUSH_EVERY {
            let _ = out.flush();
            last_flush = Instant::now();
        }
    }
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

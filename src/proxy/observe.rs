//! What the `logging` phase records: request metrics and the access log line. Plus two gauge
//! guards: open client connections (held by the connection guard, `wire::admission`, for the
//! connection's life: HTTP/1 and HTTP/2 alike, with no per-request work) and requests in flight.

use pingora::prelude::*;

use super::RequestCtx;
use super::resilience::unavailable_message;
use crate::access_log::Entry;
use crate::metrics::metrics;

/// Counts one open client connection until dropped.
#[derive(Debug)]
pub struct ConnectionGuard(());

impl ConnectionGuard {
    /// A new client connection.
    pub fn open() -> ConnectionGuard {
        let m = metrics();
        m.connections.inc();
        m.connections_total.inc();
        ConnectionGuard(())
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        metrics().connections.dec();
    }
}

/// Counts one request in flight until dropped.
#[derive(Debug)]
pub struct RequestGuard(());

impl RequestGuard {
    /// A request started.
    pub fn start() -> RequestGuard {
        metrics().in_flight.inc();
        RequestGuard(())
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        metrics().in_flight.dec();
    }
}

/// Record a finished request: metrics, then the access log line.
pub fn finish(session: &Session, e: Option<&Error>, ctx: &RequestCtx) {
    let status = session.response_written().map_or(0, |r| r.status.as_u16());
    let bytes = (session.body_bytes_read(), session.body_bytes_sent());
    record(session.req_header(), status, bytes, e.map(|e| e as _), ctx);
}

/// Record a request answered `status` with `(in, out)` body bytes: metrics, then the access
/// log line. (A spliced upgrade's record is made when its tunnel ends.)
pub fn record(
    req: &RequestHeader,
    status: u16,
    (bytes_in, bytes_out): (usize, usize),
    e: Option<&dyn std::fmt::Display>,
    ctx: &RequestCtx,
) {
    let Some(state) = ctx.state.as_ref() else {
        return;
    };
    let route = ctx
        .route
        .map_or("", |i| state.router.route(i).name.as_str());
    let elapsed = ctx.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let rm = state.route_metrics(ctx.route);
    rm.record(
        &req.method,
        status,
        elapsed,
        bytes_in as u64,
        bytes_out as u64,
    );
    if let Some(status) = ctx.cache_status {
        rm.cache_lookup(status);
    }
    let upstream = ctx.upstream.as_ref().map_or("", |u| u.name.as_str());
    let backend = ctx.last_backend.as_deref().map_or("", |b| b.label());
    if let (Some(t), Some(b)) = (ctx.upstream_time, &ctx.last_backend) {
        b.observe_upstream_duration(t.as_secs_f64());
    }
    let Some(log) = &state.access_log else { return };
    let host = req
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let path = req.uri.path_and_query().map_or("", |p| p.as_str());
    let time = timestamp(std::time::SystemTime::now());
    let client = ctx
        .client
        .map(|c| Inline::ip(c.client_ip))
        .unwrap_or_default();
    log.log(&Entry {
        time: time.as_str(),
        request_id: &ctx.request_id,
        client: client.as_str(),
        method: req.method.as_str(),
        host,
        path,
        status,
        bytes_in,
        bytes_out,
        route,
        upstream,
        backend,
        attempts: ctx.attempts,
        retries: ctx.retries,
        upstream_ms: ctx.upstream_time.map(|t| t.as_secs_f64() * 1000.0),
        total_ms: elapsed * 1000.0,
        unavailable: ctx.unavailable.map(unavailable_message),
        cache: ctx.cache_status.map(|s| s.header()),
        error: e.map(|e| e.to_string()),
    });
}

/// `t` as RFC 3339 UTC with milliseconds (`2026-12-01T15:04:05.123Z`). The part up to the
/// seconds is formatted once per second per thread; each request only writes its milliseconds.
fn timestamp(t: std::time::SystemTime) -> Inline {
    thread_local! {
        static SECOND: std::cell::Cell<(u64, Inline)> = std::cell::Cell::new((u64::MAX, Inline::default()));
    }
    let since = t
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let (secs, millis) = (since.as_secs(), since.subsec_millis());
    let (cached, mut text) = SECOND.get();
    if cached != secs {
        // "….SSZ" without the milliseconds: humantime writes `YYYY-MM-DDTHH:MM:SSZ`.
        let whole = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        text = Inline::display(humantime::format_rfc3339_seconds(whole));
        text.len = text.len.saturating_sub(1);
        SECOND.set((secs, text));
    }
    let digits = [
        b'.',
        b'0' + (millis / 100) as u8,
        b'0' + (millis / 10 % 10) as u8,
        b'0' + (millis % 10) as u8,
        b'Z',
    ];
    let end = text.len + digits.len();
    if let Some(room) = text.buf.get_mut(text.len..end) {
        room.copy_from_slice(&digits);
        text.len = end;
    }
    text
}

/// A short value (an address, a timestamp) formatted on the stack: `to_string()` would
/// allocate for every finished request.
#[derive(Clone, Copy)]
pub(crate) struct Inline {
    buf: [u8; 80],
    len: usize,
}

impl Default for Inline {
    fn default() -> Inline {
        Inline {
            buf: [0; 80],
            len: 0,
        }
    }
}

impl Inline {
    /// `v` as text; empty in the impossible case that it does not fit (the longest socket
    /// address is 64 bytes).
    pub(crate) fn display(v: impl std::fmt::Display) -> Inline {
        use std::fmt::Write;
        let mut s = Inline::default();
        if write!(s, "{v}").is_err() {
            s.len = 0;
        }
        s
    }

    /// `ip` as text, as `Display` writes it. IPv4 (nearly every client) is written digit by
    /// digit: the formatting machinery took ~10x the instructions, twice per request (the
    /// `X-Forwarded-For` value and the access log).
    pub(crate) fn ip(ip: std::net::IpAddr) -> Inline {
        let std::net::IpAddr::V4(v4) = ip else {
            return Inline::display(ip);
        };
        let mut s = Inline::default();
        for (i, octet) in v4.octets().into_iter().enumerate() {
            if i > 0 {
                s.buf[s.len] = b'.';
                s.len += 1;
            }
            if octet >= 100 {
                s.buf[s.len] = b'0' + octet / 100;
                s.len += 1;
            }
            if octet >= 10 {
                s.buf[s.len] = b'0' + octet / 10 % 10;
                s.len += 1;
            }
            s.buf[s.len] = b'0' + octet % 10;
            s.len += 1;
        }
        s
    }

    pub(crate) fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl std::fmt::Write for Inline {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        self.buf
            .get_mut(self.len..end)
            .ok_or(std::fmt::Error)?
            .copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{Inline, timestamp};
    use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};

    #[test]
    fn inline_text_matches_to_string() {
        let ip = Ipv6Addr::from([0xffff; 8]);
        let longest = SocketAddr::V6(SocketAddrV6::new(ip, 65535, u32::MAX, u32::MAX));
        for a in [longest, "10.0.0.1:8080".parse().unwrap()] {
            assert_eq!(Inline::display(a).as_str(), a.to_string());
        }
        let t = humantime::format_rfc3339_millis(std::time::SystemTime::UNIX_EPOCH);
        assert_eq!(Inline::display(t).as_str(), "1970-01-01T00:00:00.000Z");
        assert_eq!(Inline::display("x".repeat(81)).as_str(), "");
    }

    #[test]
    fn an_ip_is_written_as_display_writes_it() {
        for ip in [
            "0.0.0.0",
            "255.255.255.255",
            "10.0.100.9",
            "192.168.1.20",
            "1.22.103.250",
            "::1",
            "2001:db8::ff00:42:8329",
            "::ffff:10.0.0.1",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(Inline::ip(ip).as_str(), ip.to_string());
        }
        for n in (0..=u32::MAX).step_by(65_521) {
            let ip = std::net::IpAddr::from(std::net::Ipv4Addr::from(n));
            assert_eq!(Inline::ip(ip).as_str(), ip.to_string());
        }
    }

    #[test]
    fn timestamps_match_humantime_across_seconds() {
        use std::time::{Duration, UNIX_EPOCH};
        let start = 1_764_600_000_000u64; // 2025-12-01, in milliseconds
        // Steps that stay within a second, cross one, and repeat one (the per-thread cache).
        for ms in [
            0, 1, 999, 1000, 1001, 1999, 1001, 59_999, 60_000, 86_399_999, 86_400_000,
        ] {
            let t = UNIX_EPOCH + Duration::from_millis(start + ms);
            let want = humantime::format_rfc3339_millis(t).to_string();
            assert_eq!(timestamp(t).as_str(), want, "{ms}");
        }
        assert_eq!(timestamp(UNIX_EPOCH).as_str(), "1970-01-01T00:00:00.000Z");
    }
}

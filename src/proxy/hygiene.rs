//! Request-head checks Pingora 0.9.1 leaves to the gateway (../shared/notes/security.md and the
//! vectors of `tests/conformance.rs`), made before routing: the size of the head, the framing
//! headers, `Host`, the request target and the method. Each refusal names its status; framing
//! refusals close the connection, so no byte after a doubtful head is ever read as a request.

use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, Method, Version};
use pingora::http::RequestHeader;

use crate::config::HeadLimits;

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The status to answer.
    pub status: u16,
    /// The JSON error message.
    pub message: &'static str,
    /// Close the connection after answering (framing could be misread).
    pub close: bool,
}

/// A header name with an underscore under `server.underscore_headers: reject`.
pub const UNDERSCORE_REFUSED: Refusal = refuse(400, "header field name with an underscore", false);

const fn refuse(status: u16, message: &'static str, close: bool) -> Refusal {
    Refusal {
        status,
        message,
        close,
    }
}

/// Check a request head as the client sent it (before any header is removed); `Ok` if it may
/// be routed.
pub fn check(req: &RequestHeader, limits: &HeadLimits) -> Result<(), Refusal> {
    head_size(req, limits)?;
    framing(&req.headers)?;
    if req.method == Method::TRACE || req.method == Method::CONNECT {
        return Err(refuse(405, "method not allowed", false));
    }
    host(req)?;
    target(req)
}

fn head_size(req: &RequestHeader, limits: &HeadLimits) -> Result<(), Refusal> {
    // Method, target and `HTTP/1.1` with their two spaces.
    let line = req.method.as_str().len() + req.raw_path().len() + 10;
    if line > limits.max_request_line {
        return Err(refuse(414, "request line too long", true));
    }
    if req.headers.len() > limits.max_header_count {
        return Err(refuse(431, "too many header fields", true));
    }
    let size: usize = req
        .headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    if size > limits.max_header_size {
        return Err(refuse(431, "header section too large", true));
    }
    Ok(())
}

/// One `Content-Length` of digits only; a `Transfer-Encoding` that is exactly `chunked`.
fn framing(h: &HeaderMap) -> Result<(), Refusal> {
    let mut lengths = h.get_all(CONTENT_LENGTH).iter();
    if let Some(v) = lengths.next() {
        let digits = v.as_bytes();
        if lengths.next().is_some() || digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return Err(refuse(400, "invalid Content-Length", true));
        }
    }
    let mut codings = h.get_all(TRANSFER_ENCODING).iter();
    if let Some(v) = codings.next() {
        if codings.next().is_some() {
            return Err(refuse(400, "invalid Transfer-Encoding", true));
        }
        let value = v.to_str().unwrap_or("").trim();
        if !value.eq_ignore_ascii_case("chunked") {
            // Another coding than chunked alone: one the gateway does not implement (RFC 9112
            // §6.1: 501), or a malformed list (`chunked, chunked`, `,chunked`).
            let known_list = value.split(',').all(|t| {
                !t.trim().is_empty() && t.trim().bytes().all(|b| b.is_ascii_alphanumeric())
            });
            let chunked_twice = value
                .split(',')
                .filter(|t| t.trim().eq_ignore_ascii_case("chunked"))
                .count()
                > 1;
            return Err(if known_list && !chunked_twice {
                refuse(501, "transfer coding not implemented", true)
            } else {
                refuse(400, "invalid Transfer-Encoding", true)
            });
        }
    }
    Ok(())
}

/// Exactly one Host (HTTP/1.1; HTTP/1.0 may omit it), a valid `host[:port]`.
fn host(req: &RequestHeader) -> Result<(), Refusal> {
    let mut hosts = req.headers.get_all(HOST).iter();
    let Some(first) = hosts.next() else {
        return if req.version == Version::HTTP_10 {
            Ok(())
        } else {
            Err(refuse(400, "missing Host header", false))
        };
    };
    if hosts.next().is_some() {
        return Err(refuse(400, "more than one Host header", false));
    }
    if valid_authority(first.as_bytes()) {
        Ok(())
    } else {
        Err(refuse(400, "invalid Host header", false))
    }
}

/// `uri-host [ ":" port ]` (RFC 9110 §7.2): a reg-name of letters, digits, `-`, `.`, `_`,
/// `~` (or empty), an IPv4 address, or a bracketed IPv6 literal; a port of 1–5 digits ≤ 65535.
/// Not a name of dots only, nor one with an empty label (`..`), as nginx refuses them: a
/// backend that maps hosts to directories would read them as paths.
pub fn valid_authority(a: &[u8]) -> bool {
    let (host, port) = if let Some(rest) = a.strip_prefix(b"[") {
        let Some(end) = rest.iter().position(|&b| b == b']') else {
            return false;
        };
        let (v6, after) = (&rest[..end], &rest[end + 1..]);
        if !std::str::from_utf8(v6).is_ok_and(|s| s.parse::<std::net::Ipv6Addr>().is_ok()) {
            return false;
        }
        match after {
            [] => return true,
            [b':', port @ ..] => (&b""[..], Some(port)),
            _ => return false,
        }
    } else {
        match a.iter().rposition(|&b| b == b':') {
            Some(i) => (&a[..i], Some(&a[i + 1..])),
            None => (a, None),
        }
    };
    let host_ok = host
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
        && !host.windows(2).any(|w| w == b"..")
        && host != b".";
    let port_ok = port.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 5
            && p.iter().all(u8::is_ascii_digit)
            && std::str::from_utf8(p).is_ok_and(|s| s.parse::<u16>().is_ok_and(|n| n > 0))
    });
    host_ok && port_ok
}

/// The request target: origin-form (`/…`), absolute-form with an http(s) scheme, or `*` for
/// OPTIONS; never a fragment, and none of the bytes no client sends unescaped.
fn target(req: &RequestHeader) -> Result<(), Refusal> {
    let raw = req.raw_path();
    let form_ok = match raw.first() {
        Some(b'/') => true,
        Some(b'*') => raw == b"*" && req.method == Method::OPTIONS,
        _ => {
            let lower: Vec<u8> = raw.iter().take(8).map(u8::to_ascii_lowercase).collect();
            lower.starts_with(b"http://") || lower.starts_with(b"https://")
        }
    };
    // HTTP/2 requests carry their target as :scheme/:authority/:path; Pingora gives an
    // absolute URI there, already checked by the h2 layer.
    if !form_ok && req.version != Version::HTTP_2 {
        return Err(refuse(400, "invalid request target", false));
    }
    if raw
        .iter()
        .any(|&b| b <= b' ' || b == 0x7f || b"\"<>\\".contains(&b))
    {
        return Err(refuse(400, "invalid request target", false));
    }
    Ok(())
}

/// HTTP/2 clients may send `Cookie` as one field per cookie (RFC 9113 §8.2.3): join them into
/// one `; `-separated field, as an HTTP/1 upstream must receive it. Allocates only then.
pub fn join_cookie_crumbs(req: &mut RequestHeader) {
    if req.version != Version::HTTP_2
        || req
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .nth(1)
            .is_none()
    {
        return;
    }
    let mut joined = Vec::new();
    for v in req.headers.get_all(http::header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = http::HeaderValue::from_bytes(&joined) {
        let _ = req.insert_header(http::header::COOKIE, v);
    }
}

/// What to do with header fields whose name has an underscore (`X_Forwarded_For`): backends
/// that map `-` and `_` alike (CGI, some frameworks) would read them as the real header.
pub fn underscores(req: &mut RequestHeader, policy: crate::config::UnderscoreHeaders) -> bool {
    use crate::config::UnderscoreHeaders as U;
    if policy == U::Keep || !req.headers.keys().any(|k| k.as_str().contains('_')) {
        return true;
    }
    if policy == U::Reject {
        return false;
    }
    let names: Vec<http::HeaderName> = req
        .headers
        .keys()
        .filter(|k| k.as_str().contains('_'))
        .cloned()
        .collect();
    for n in names {
        req.remove_header(&n);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> HeadLimits {
        HeadLimits {
            max_request_line: 8192,
            max_header_size: 65536,
            max_header_count: 100,
        }
    }

    fn req(method: &str, path: &[u8], headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build(method, path, None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    fn status(r: &RequestHeader) -> Option<u16> {
        check(r, &limits()).err().map(|e| e.status)
    }

    #[test]
    fn authorities() {
        for ok in [
            &b"a.test"[..],
            b"a.test:8080",
            b"127.0.0.1:1",
            b"[::1]",
            b"[::1]:443",
            b"",
            b"x_y.test",
            b"a.test.",
        ] {
            assert!(valid_authority(ok), "{:?}", String::from_utf8_lossy(ok));
        }
        for bad in [
            &b"a.test:99999"[..],
            b"a.test:0",
            b"a.test:",
            b"a.test:1:2",
            b"a .test",
            b"a.test\\",
            b"a.test, b.test",
            b"a.test/x",
            b"u@a.test",
            b"[::1",
            b"[zz]:1",
            b"[::1]x",
            b".",
            b"..",
            b"a..test",
            b"..:80",
        ] {
            assert!(!valid_authority(bad), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn framing_headers() {
        let h = |k: &'static str, v: &'static str| req("POST", b"/", &[("host", "a"), (k, v)]);
        assert_eq!(status(&h("content-length", "5")), None);
        for bad in ["+5", "-0", "0x10", "", "5, 5", " 5"] {
            assert_eq!(status(&h("content-length", bad)), Some(400), "{bad:?}");
        }
        let two = req(
            "POST",
            b"/",
            &[
                ("host", "a"),
                ("content-length", "5"),
                ("content-length", "5"),
            ],
        );
        assert_eq!(status(&two), Some(400));
        assert_eq!(status(&h("transfer-encoding", "Chunked")), None);
        for (bad, want) in [
            ("chunked, chunked", 400),
            (",chunked", 400),
            ("gzip, chunked", 501),
            ("identity", 501),
            ("chunked\x0b", 400),
        ] {
            let r = RequestHeader::build("POST", b"/", None);
            let mut r = r.unwrap();
            r.insert_header("host", "a").unwrap();
            if r.insert_header("transfer-encoding", bad).is_err() {
                continue; // not even a valid header value
            }
            assert_eq!(status(&r), Some(want), "{bad:?}");
        }
    }

    #[test]
    fn host_target_and_method() {
        assert_eq!(
            status(&req("GET", b"/", &[])),
            Some(400),
            "HTTP/1.1 without Host"
        );
        let mut old = req("GET", b"/", &[]);
        old.set_version(Version::HTTP_10);
        assert_eq!(status(&old), None, "HTTP/1.0 may omit Host");
        assert_eq!(
            status(&req("GET", b"/", &[("host", "a"), ("host", "a")])),
            Some(400)
        );
        for t in [&b"api/x"[..], b"*", b"a.test:80", b"ftp://b/f", b"/a\"b"] {
            assert_eq!(
                status(&req("GET", t, &[("host", "a")])),
                Some(400),
                "{:?}",
                String::from_utf8_lossy(t)
            );
        }
        assert_eq!(status(&req("OPTIONS", b"*", &[("host", "a")])), None);
        assert_eq!(status(&req("GET", b"http://a/x", &[("host", "a")])), None);
        assert_eq!(status(&req("TRACE", b"/", &[("host", "a")])), Some(405));
        assert_eq!(
            status(&req("CONNECT", b"a.test:443", &[("host", "a")])),
            Some(405)
        );
    }

    #[test]
    fn cookie_crumbs_are_joined_for_http2_only() {
        let crumbs = [("host", "a"), ("cookie", "a=1"), ("cookie", "b=2")];
        let mut h2 = req("GET", b"/", &crumbs);
        h2.set_version(Version::HTTP_2);
        join_cookie_crumbs(&mut h2);
        let got: Vec<_> = h2.headers.get_all("cookie").iter().collect();
        assert_eq!(got, ["a=1; b=2"]);
        let mut h1 = req("GET", b"/", &crumbs);
        join_cookie_crumbs(&mut h1);
        assert_eq!(h1.headers.get_all("cookie").iter().count(), 2);
    }

    #[test]
    fn head_limits() {
        let long = vec![b'a'; 9000];
        let mut path = b"/".to_vec();
        path.extend(&long);
        assert_eq!(status(&req("GET", &path, &[("host", "a")])), Some(414));
        let big = "b".repeat(70_000);
        assert_eq!(
            status(&req("GET", b"/", &[("host", "a"), ("x-big", &big)])),
            Some(431)
        );
        let mut many = req("GET", b"/", &[("host", "a")]);
        for i in 0..100 {
            many.append_header(format!("x-{i}"), "v").unwrap();
        }
        assert_eq!(status(&many), Some(431));
    }
}

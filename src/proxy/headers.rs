//! Header hygiene at the proxy boundary: hop-by-hop stripping (RFC 9110 §7.6.1) and the
//! forwarding headers (`X-Forwarded-*`, `Forwarded`, `X-Real-IP`).

use http::header::{CONNECTION, UPGRADE};
use http::{HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};

/// Hop-by-hop fields that are removed even when `Connection` does not name them. Static
/// `HeaderName`s: removing by `&str` would parse and validate each name on every request.
const HOP_BY_HOP: [HeaderName; 5] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::TE,
    UPGRADE,
];

/// Forwarding fields a client must not be able to forge: dropped from untrusted peers
/// (the last five are read by common frameworks to build URLs and decide on HTTPS).
pub const FORWARDING: [HeaderName; 10] = [
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-host"),
    http::header::FORWARDED,
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-forwarded-scheme"),
    HeaderName::from_static("x-forwarded-ssl"),
    HeaderName::from_static("x-forwarded-server"),
];

/// Is this a WebSocket handshake that may be tunnelled (HTTP/1.1, `Upgrade: websocket`,
/// `Connection: upgrade`)?
pub fn is_websocket_upgrade(req: &RequestHeader) -> bool {
    req.version == http::Version::HTTP_11
        && req
            .headers
            .get(UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
        && connection_tokens(req.headers.get_all(CONNECTION).iter())
            .any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens<'a>(
    values: impl Iterator<Item = &'a http::HeaderValue>,
) -> impl Iterator<Item = &'a str> {
    values
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Does the request's `TE` accept trailers? (The one `TE` value HTTP/2 forwards, RFC 9113
/// §8.2.2; gRPC servers require it.)
pub fn wants_trailers(req: &RequestHeader) -> bool {
    req.headers.get_all(http::header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',').any(|t| {
                t.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .eq_ignore_ascii_case("trailers")
            })
        })
    })
}

/// Remove `Connection`, every field it names, and the fixed hop-by-hop set from a request.
/// A WebSocket handshake keeps exactly `Connection: upgrade` and `Upgrade: websocket`.
pub fn strip_request(req: &mut RequestHeader) {
    let websocket = is_websocket_upgrade(req);
    for name in nominated(&req.headers) {
        req.remove_header(&name);
    }
    for i in present(&req.headers, &HOP_BY_HOP) {
        req.remove_header(&HOP_BY_HOP[i]);
    }
    if websocket {
        // Infallible: static, valid values.
        let _ = req.insert_header(CONNECTION, HeaderValue::from_static("upgrade"));
        let _ = req.insert_header(UPGRADE, HeaderValue::from_static("websocket"));
    }
}

/// The response counterpart: a `101 Switching Protocols` keeps its `Connection`/`Upgrade`.
pub fn strip_response(resp: &mut ResponseHeader) {
    let switching = resp.status == http::StatusCode::SWITCHING_PROTOCOLS;
    let upgrade = resp.headers.get(UPGRADE).cloned();
    for name in nominated(&resp.headers) {
        resp.remove_header(&name);
    }
    for i in present(&resp.headers, &HOP_BY_HOP) {
        resp.remove_header(&HOP_BY_HOP[i]);
    }
    if switching && let Some(up) = upgrade {
        let _ = resp.insert_header(CONNECTION, HeaderValue::from_static("upgrade"));
        let _ = resp.insert_header(UPGRADE, up);
    }
}

/// Indices of the `names` (at most 16) that `headers` has, found in one pass over its names:
/// a message with none of them (the usual case) costs no lookups, where removing each name
/// would hash it twice (Pingora's `remove_header` also updates its header-case map).
fn present(headers: &http::HeaderMap, names: &[HeaderName]) -> impl Iterator<Item = usize> + use<> {
    debug_assert!(names.len() <= 16);
    let found = headers.keys().fold(0u16, |found, k| {
        names
            .iter()
            .position(|n| n == k)
            .map_or(found, |i| found | 1 << i)
    });
    (0..names.len()).filter(move |i| found & (1 << i) != 0)
}

/// Field names listed in `Connection` values that the message has (valid names only;
/// `HeaderName::from_bytes` lower-cases). Names it does not have would be removed for nothing,
/// and the fixed hop-by-hop set goes anyway, so the usual `Connection: keep-alive` (with or
/// without a `Keep-Alive` field) or `close` builds no name and allocates nothing.
fn nominated(headers: &http::HeaderMap) -> Vec<HeaderName> {
    let connection = headers.get_all(CONNECTION);
    let mut values = connection.iter();
    if let (Some(v), None) = (values.next(), values.next())
        && v.as_bytes().eq_ignore_ascii_case(b"keep-alive")
    {
        return Vec::new(); // the usual case (Keep-Alive goes anyway), without tokenising
    }
    connection_tokens(connection.iter())
        .filter(|t| {
            !HOP_BY_HOP
                .iter()
                .any(|h| t.eq_ignore_ascii_case(h.as_str()))
        })
        .filter(|t| headers.contains_key(*t))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        // Framing belongs to Pingora, and Host to routing: a client naming them in
        // `Connection` changes nothing (`Connection: host` would route past host rules).
        .filter(|n| {
            n != http::header::CONTENT_LENGTH
                && n != http::header::TRANSFER_ENCODING
                && n != http::header::HOST
        })
        .collect()
}

/// The `X-Forwarded-For` to send: the peer alone, or, for a trusted peer, every incoming
/// `X-Forwarded-For` line joined in order with the peer appended.
pub fn forwarded_for(req: &RequestHeader, trusted: bool, peer: &str) -> http::HeaderValue {
    let lines = || {
        req.headers
            .get_all(&FORWARDING[0])
            .iter()
            .filter(|_| trusted)
    };
    let len = lines().map(|l| l.len() + 2).sum::<usize>() + peer.len();
    let mut v: Vec<u8> = Vec::with_capacity(len);
    for line in lines() {
        v.extend_from_slice(line.as_bytes());
        v.extend_from_slice(b", ");
    }
    v.extend_from_slice(peer.as_bytes());
    // Incoming lines were valid header values and the peer is an IP address. The buffer
    // becomes the value without a copy (one allocation in all).
    http::HeaderValue::from_maybe_shared(bytes::Bytes::from(v))
        .expect("joined header values stay valid")
}

/// Drop client-supplied forwarding headers (for peers that are not trusted proxies).
pub fn drop_forwarding(req: &mut RequestHeader) {
    for i in present(&req.headers, &FORWARDING) {
        req.remove_header(&FORWARDING[i]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/", None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn strips_nominated_and_fixed_hop_by_hop() {
        let mut r = req(&[
            ("Connection", "close, X-Secret"),
            ("Connection", "Keep-Alive"),
            ("X-Secret", "1"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Proxy-Connection", "keep-alive"),
            ("Upgrade", "h2c"),
            ("X-Kept", "yes"),
        ]);
        strip_request(&mut r);
        let names: Vec<&str> = r.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
        // A lone `keep-alive` or `close` (the former takes a shortcut): the fixed set goes,
        // and a field named by the option goes too.
        for option in ["Keep-Alive", "close"] {
            let mut r = req(&[
                ("Connection", option),
                ("Keep-Alive", "timeout=5"),
                ("Close", "1"),
                ("X-Kept", "yes"),
            ]);
            strip_request(&mut r);
            let mut names: Vec<&str> = r.headers.keys().map(|k| k.as_str()).collect();
            names.sort_unstable();
            let expected: &[&str] = if option == "close" {
                &["x-kept"]
            } else {
                &["close", "x-kept"]
            };
            assert_eq!(names, expected, "{option}");
        }
    }

    #[test]
    fn every_forwarding_field_is_dropped_alone_or_together() {
        for name in &FORWARDING {
            let upper = name.as_str().to_ascii_uppercase();
            let mut r = req(&[("Accept", "*/*"), (&upper, "a"), (&upper, "b")]);
            drop_forwarding(&mut r);
            let names: Vec<&str> = r.headers.keys().map(|k| k.as_str()).collect();
            assert_eq!(names, ["accept"], "{name}");
            assert_eq!(
                r.case_header_iter().count(),
                1,
                "{name} kept in the case map"
            );
        }
        let forwarding = FORWARDING;
        let all: Vec<(&str, &str)> = forwarding.iter().map(|n| (n.as_str(), "x")).collect();
        let mut r = req(&all);
        drop_forwarding(&mut r);
        assert!(r.headers.is_empty());
    }

    #[test]
    fn websocket_handshake_keeps_upgrade() {
        let mut r = req(&[
            ("Connection", "Upgrade, X-Drop"),
            ("Upgrade", "websocket"),
            ("X-Drop", "1"),
            ("Sec-WebSocket-Key", "abc"),
        ]);
        assert!(is_websocket_upgrade(&r));
        strip_request(&mut r);
        assert_eq!(r.headers["connection"], "upgrade");
        assert_eq!(r.headers["upgrade"], "websocket");
        assert!(r.headers.get("x-drop").is_none());
        assert!(r.headers.get("sec-websocket-key").is_some());
    }

    #[test]
    fn forwarded_for_joins_every_line_from_trusted_peers_only() {
        let r = req(&[
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Forwarded-For", "203.0.113.7, 10.0.0.2"),
        ]);
        assert_eq!(
            forwarded_for(&r, true, "10.0.0.1"),
            "6.6.6.6, 203.0.113.7, 10.0.0.2, 10.0.0.1"
        );
        assert_eq!(forwarded_for(&r, false, "192.0.2.1"), "192.0.2.1");
    }

    #[test]
    fn framing_fields_cannot_be_nominated_away() {
        let mut r = req(&[("Connection", "content-length"), ("Content-Length", "3")]);
        strip_request(&mut r);
        assert_eq!(r.headers["content-length"], "3");
    }

    #[test]
    fn response_keeps_upgrade_only_on_101() {
        let mut ok = ResponseHeader::build(200, None).unwrap();
        ok.append_header("Connection", "upgrade, X-Hop").unwrap();
        ok.append_header("Upgrade", "websocket").unwrap();
        ok.append_header("X-Hop", "1").unwrap();
        strip_response(&mut ok);
        assert!(ok.headers.is_empty(), "{:?}", ok.headers);
        let mut sw = ResponseHeader::build(101, None).unwrap();
        sw.append_header("Connection", "Upgrade").unwrap();
        sw.append_header("Upgrade", "websocket").unwrap();
        strip_response(&mut sw);
        assert_eq!(sw.headers["upgrade"], "websocket");
    }
}

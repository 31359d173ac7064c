//! `server.preserve_header_case: false` (the default): HTTP/1 header names go out lower-case,
//! as over HTTP/2, instead of in the case each peer sent them.
//!
//! Pingora keeps a second map beside each HTTP/1 message's headers with every name as it was
//! received. Each `insert_header` or `remove_header` updates both maps, copying the name for
//! the second; the request Pingora clones for the upstream clones both. Dropping that map once
//! per message (the client's request head, the upstream's response head), then editing the
//! maps directly on pre-built names ([`edit_request`], [`edit_response`]), takes ~6% of
//! tollgate's instructions per proxied request and 16 of its 30 allocations
//! (docs/performance.md, "2026-12-02 (2)").
//!
//! Field names are case-insensitive (RFC 9110 §5.1); Envoy and HAProxy lower-case HTTP/1 names
//! by default too. Pingora still writes its dozen common names title-cased (`Host`,
//! `Content-Type`, `Content-Length`, `Connection`, …), so most heads read as before. A peer that
//! matches names case-sensitively needs `preserve_header_case: true`.

use http::{HeaderMap, HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;

/// A header name the gateway sets: pre-built for a direct map edit, and as text for Pingora's
/// `insert_header` (which keeps a `&'static str` in its case map without copying it).
#[derive(Debug)]
pub struct Field {
    cased: &'static str,
    name: HeaderName,
}

impl Field {
    /// A name written lower-case.
    pub const fn new(lower: &'static str) -> Field {
        Field {
            cased: lower,
            name: HeaderName::from_static(lower),
        }
    }

    /// A standard name, written `cased` where case is kept (`Host`).
    pub const fn standard(cased: &'static str, name: HeaderName) -> Field {
        Field { cased, name }
    }

    /// The name, to look it up.
    pub fn name(&self) -> &HeaderName {
        &self.name
    }
}

/// `X-Forwarded-For`.
pub const X_FORWARDED_FOR: Field = Field::new("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub const X_FORWARDED_PROTO: Field = Field::new("x-forwarded-proto");
/// `X-Forwarded-Host`.
pub const X_FORWARDED_HOST: Field = Field::new("x-forwarded-host");
/// `X-Request-Id`.
pub const X_REQUEST_ID: Field = Field::new(super::request_id::HEADER);
/// `X-Cache-Status`.
pub const X_CACHE_STATUS: Field = Field::new(super::caching::STATUS_HEADER);
/// `Host`.
pub const HOST: Field = Field::standard("Host", http::header::HOST);
/// `TE` (lower-case where case is kept, as Pingora titles it: not at all).
pub const TE: Field = Field::new("te");
/// `Accept-Ranges`.
pub const ACCEPT_RANGES: Field = Field::standard("Accept-Ranges", http::header::ACCEPT_RANGES);
/// `Connection`.
pub const CONNECTION: Field = Field::standard("Connection", http::header::CONNECTION);
/// `Accept-Encoding`.
pub const ACCEPT_ENCODING: Field =
    Field::standard("Accept-Encoding", http::header::ACCEPT_ENCODING);

/// A message's headers being edited: its map itself where it has no case map, else through
/// Pingora, which keeps the case map in step.
pub enum Headers<'a> {
    /// No case map: each edit is one map operation on a pre-built name.
    Map(&'a mut HeaderMap),
    /// A request whose names' case is kept.
    Request(&'a mut RequestHeader),
    /// A response whose names' case is kept.
    Response(&'a mut ResponseHeader),
}

impl Headers<'_> {
    /// The headers as they stand.
    pub fn map(&self) -> &HeaderMap {
        match self {
            Headers::Map(m) => m,
            Headers::Request(r) => &r.headers,
            Headers::Response(r) => &r.headers,
        }
    }

    /// Set `field` to `value`, replacing any values it had.
    pub fn insert(&mut self, field: Field, value: HeaderValue) -> Result<()> {
        match self {
            Headers::Map(m) => {
                m.try_insert(field.name, value)
                    .or_err(InvalidHTTPHeader, "too many header fields")?;
                Ok(())
            }
            Headers::Request(r) => r.insert_header(field.cased, value),
            Headers::Response(r) => r.insert_header(field.cased, value),
        }
    }
}

/// Edit `req`'s headers with `f`, directly on its map where it has no case map (Pingora gives
/// no mutable access to it: the head is taken apart and put back together), with room made
/// first for `more` fields (a clone of a head has none spare).
pub fn edit_request<T>(
    req: &mut RequestHeader,
    more: usize,
    f: impl FnOnce(&mut Headers<'_>) -> Result<T>,
) -> Result<T> {
    if req.has_case() {
        return f(&mut Headers::Request(req));
    }
    rebuild_request(req, |parts| {
        let _ = parts.headers.try_reserve(more);
        f(&mut Headers::Map(&mut parts.headers))
    })?
}

/// The response counterpart of [`edit_request`].
pub fn edit_response<T>(
    resp: &mut ResponseHeader,
    more: usize,
    f: impl FnOnce(&mut Headers<'_>) -> Result<T>,
) -> Result<T> {
    if resp.has_case() {
        return f(&mut Headers::Response(resp));
    }
    rebuild_response(resp, |parts| {
        let _ = parts.headers.try_reserve(more);
        f(&mut Headers::Map(&mut parts.headers))
    })?
}

/// Drop `req`'s header-case map, keeping everything else: method, target (its bytes as
/// received, where the URI would not reproduce them), version, headers and their order,
/// extensions and the HTTP/2 end-of-stream flag. A head without one (HTTP/2) is left as it is.
pub fn drop_request_case(req: &mut RequestHeader) -> Result<()> {
    if req.has_case() {
        rebuild_request(req, |_| ())?;
    }
    Ok(())
}

/// Drop `resp`'s header-case map, keeping its status, reason phrase, version, headers and
/// their order, and extensions. A head without one is left as it is.
pub fn drop_response_case(resp: &mut ResponseHeader) -> Result<()> {
    if resp.has_case() {
        rebuild_response(resp, |_| ())?;
    }
    Ok(())
}

/// Take `req` apart, let `f` edit the parts, and put it back together without a case map.
fn rebuild_request<T>(
    req: &mut RequestHeader,
    f: impl FnOnce(&mut http::request::Parts) -> T,
) -> Result<T> {
    let end_stream = req.send_end_stream();
    // Origin-form targets round-trip through the URI; absolute-form and the rare others
    // Pingora keeps verbatim, and so do we.
    let raw = {
        let raw = req.raw_path();
        let from_uri = req.uri.path_and_query().map(|p| p.as_str().as_bytes());
        (Some(raw) != from_uri).then(|| raw.to_vec())
    };
    let mut parts: http::request::Parts = std::mem::replace(req, empty_request()).into();
    let out = f(&mut parts);
    *req = RequestHeader::from(parts);
    if let Some(raw) = raw {
        req.set_raw_path(&raw)?;
    }
    if let Some(end) = end_stream {
        req.set_send_end_stream(end);
    }
    Ok(out)
}

/// The response counterpart of [`rebuild_request`]; the reason phrase is kept.
fn rebuild_response<T>(
    resp: &mut ResponseHeader,
    f: impl FnOnce(&mut http::response::Parts) -> T,
) -> Result<T> {
    let canonical = resp.status.canonical_reason();
    let reason = resp
        .get_reason_phrase()
        .filter(|r| Some(*r) != canonical)
        .map(str::to_owned);
    let mut parts: http::response::Parts = std::mem::replace(resp, empty_response()).into();
    let out = f(&mut parts);
    *resp = ResponseHeader::from(parts);
    if let Some(reason) = reason {
        resp.set_reason_phrase(Some(&reason))?;
    }
    Ok(out)
}

/// A placeholder to swap in while a head is taken apart: allocates nothing and parses
/// nothing (`RequestHeader::build_no_case` would parse its target).
fn empty_request() -> RequestHeader {
    RequestHeader::from(http::Request::new(()).into_parts().0)
}

/// The response counterpart of [`empty_request`].
fn empty_response() -> ResponseHeader {
    ResponseHeader::from(http::Response::new(()).into_parts().0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire_request(req: &RequestHeader) -> String {
        let mut buf = Vec::new();
        req.header_to_h1_wire(&mut buf);
        String::from_utf8(buf).unwrap()
    }

    fn cased_request(target: &[u8]) -> RequestHeader {
        let mut req = RequestHeader::build("GET", target, None).unwrap();
        req.append_header("Host", "a.test").unwrap();
        req.append_header("X-Custom-Name", "1").unwrap();
        req.append_header("accept", "*/*").unwrap();
        req.append_header("X-Custom-Name", "2").unwrap();
        req
    }

    #[test]
    fn a_request_keeps_everything_but_the_case_of_its_names() {
        let mut req = cased_request(b"/p?q=1");
        req.set_version(http::Version::HTTP_10);
        assert!(wire_request(&req).contains("X-Custom-Name: 1"));
        drop_request_case(&mut req).unwrap();
        assert!(!req.has_case());
        assert_eq!(req.method, http::Method::GET);
        assert_eq!(req.raw_path(), b"/p?q=1");
        assert_eq!(req.version, http::Version::HTTP_10);
        // Order and repeated names kept; Pingora title-cases the names it knows.
        assert_eq!(
            wire_request(&req),
            "Host: a.test\r\nx-custom-name: 1\r\nx-custom-name: 2\r\naccept: */*\r\n"
        );
    }

    #[test]
    fn a_target_the_uri_does_not_reproduce_stays_verbatim() {
        for target in [&b"http://a.test/p?q"[..], b"/caf\xe9", b"*"] {
            let mut req = cased_request(target);
            let before = (
                req.raw_path().to_vec(),
                req.raw_path_is_utf8(),
                req.uri.clone(),
            );
            drop_request_case(&mut req).unwrap();
            let after = (
                req.raw_path().to_vec(),
                req.raw_path_is_utf8(),
                req.uri.clone(),
            );
            assert_eq!(before, after, "{}", String::from_utf8_lossy(target));
        }
    }

    #[test]
    fn the_http2_end_of_stream_flag_is_kept() {
        let mut req = RequestHeader::build_no_case("POST", b"/", None).unwrap();
        req.set_version(http::Version::HTTP_2);
        req.set_send_end_stream(false);
        // An HTTP/2 head has no case map: left alone.
        drop_request_case(&mut req).unwrap();
        assert_eq!(req.send_end_stream(), Some(false));
        let mut req = cased_request(b"/");
        req.set_version(http::Version::HTTP_2);
        req.set_send_end_stream(false);
        drop_request_case(&mut req).unwrap();
        assert_eq!(req.send_end_stream(), Some(false));
    }

    #[test]
    fn a_response_keeps_its_status_reason_and_headers() {
        let mut resp = ResponseHeader::build(404, None).unwrap();
        resp.set_reason_phrase(Some("Gone Fishing")).unwrap();
        resp.append_header("X-Trace", "t").unwrap();
        resp.append_header("Content-Type", "text/plain").unwrap();
        drop_response_case(&mut resp).unwrap();
        assert!(!resp.has_case());
        assert_eq!(resp.status, 404);
        assert_eq!(resp.get_reason_phrase(), Some("Gone Fishing"));
        let mut buf = Vec::new();
        resp.header_to_h1_wire(&mut buf);
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "x-trace: t\r\nContent-Type: text/plain\r\n"
        );
        let mut ok = ResponseHeader::build(200, None).unwrap();
        drop_response_case(&mut ok).unwrap();
        assert_eq!(ok.get_reason_phrase(), Some("OK"));
    }

    fn edit_both_ways(req: &mut RequestHeader) {
        edit_request(req, 2, |h| {
            assert_eq!(h.map().get("x-custom-name").unwrap(), "1");
            h.insert(X_FORWARDED_FOR, HeaderValue::from_static("1.2.3.4"))?;
            h.insert(HOST, HeaderValue::from_static("b.test"))
        })
        .unwrap();
    }

    #[test]
    fn an_edit_goes_through_the_case_map_where_there_is_one() {
        let mut req = cased_request(b"/p");
        edit_both_ways(&mut req);
        assert!(req.has_case(), "the case map is kept");
        assert_eq!(
            wire_request(&req),
            "Host: b.test\r\nX-Custom-Name: 1\r\nX-Custom-Name: 2\r\naccept: */*\r\n\
             x-forwarded-for: 1.2.3.4\r\n"
        );
    }

    #[test]
    fn an_edit_without_a_case_map_keeps_the_rest_of_the_head() {
        let mut parts = http::Request::builder()
            .method("PUT")
            .uri("/q?x")
            .version(http::Version::HTTP_2)
            .header("x-custom-name", "1")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        parts.extensions.insert(7u8);
        let mut req = RequestHeader::from(parts);
        req.set_send_end_stream(false);
        edit_both_ways(&mut req);
        assert!(!req.has_case());
        assert_eq!(req.method, http::Method::PUT);
        assert_eq!(req.raw_path(), b"/q?x");
        assert_eq!(req.version, http::Version::HTTP_2);
        assert_eq!(req.extensions.get::<u8>(), Some(&7));
        assert_eq!(req.send_end_stream(), Some(false));
        let names: Vec<&str> = req.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-custom-name", "x-forwarded-for", "host"]);
    }

    #[test]
    fn a_response_edit_keeps_a_custom_reason() {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.set_reason_phrase(Some("Fine")).unwrap();
        drop_response_case(&mut resp).unwrap();
        edit_response(&mut resp, 1, |h| {
            h.insert(X_REQUEST_ID, HeaderValue::from_static("abc"))
        })
        .unwrap();
        assert_eq!(resp.get_reason_phrase(), Some("Fine"));
        assert_eq!(resp.headers.get("x-request-id").unwrap(), "abc");
        // With a case map, through Pingora.
        let mut cased = ResponseHeader::build(200, None).unwrap();
        edit_response(&mut cased, 1, |h| {
            h.insert(X_REQUEST_ID, HeaderValue::from_static("abc"))
        })
        .unwrap();
        assert!(cased.has_case());
        assert_eq!(cased.headers.get("x-request-id").unwrap(), "abc");
    }
}

//! The downstream response compression module: Pingora's encoders, tollgate's negotiation,
//! and brotli streams that end.
//!
//! Two things in Pingora 0.9.1's default module are wrong for a gateway, so this module wraps
//! its [`ResponseCompressionCtx`] instead of using it as is:
//!
//! - **Negotiation.** Pingora compresses with the *first* coding the client lists, ignoring
//!   q-values, and does nothing when that one is not enabled: a route offering only `br` never
//!   compressed for a browser sending `gzip, deflate, br, zstd`, and `gzip;q=0, br` got gzip.
//!   Here the route's offer is matched against the whole `Accept-Encoding` ([`negotiate`]):
//!   the highest q wins, `q=0` excludes, `*` covers unlisted codings, ties go to the route's
//!   order. Pingora's ctx is then told only the chosen coding.
//! - **Brotli.** Its brotli encoder ends a response with a *flush* and never writes the final
//!   (`ISLAST`) meta-block (cloudflare/pingora#1013): lenient decoders (curl, browsers) accept
//!   the body, strict ones (Node's `fetch`, the `brotli` CLI, Python) reject every one. A flush
//!   leaves the stream byte-aligned, so the missing end is one byte, `0x03` (ISLAST=1,
//!   ISLASTEMPTY=1), appended here when the body ends. Gzip and zstd finish their streams.

use std::any::Any;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::HeaderValue;
use http::header::{ACCEPT_ENCODING, CONTENT_ENCODING};
use pingora::Result;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::{HttpModule, HttpModuleBuilder, Module, ModuleBuilder};
use pingora::protocols::http::compression::{Algorithm, ResponseCompressionCtx};

/// The last, empty meta-block of a brotli stream, after a flush has byte-aligned it.
const BROTLI_END: u8 = 0x03;
/// A whole empty brotli stream: WBITS=16, then ISLAST, ISLASTEMPTY.
const BROTLI_EMPTY: u8 = 0x06;

/// One response's compression state.
pub struct Compression {
    /// Pingora's encoder state; disabled (all levels 0) unless this response is compressed.
    inner: ResponseCompressionCtx,
    /// The client's `Accept-Encoding`.
    accept: Option<HeaderValue>,
    /// What the route offers for this response, in preference order (empty: nothing).
    offered: Vec<(Algorithm, u32)>,
    /// This module's encoder is writing brotli.
    brotli: bool,
    /// The brotli stream has its end.
    finished: bool,
    /// Bytes the encoder has produced so far.
    produced: usize,
}

/// The coding to use: the offered one the client accepts with the highest q (ties: the first
/// offered). `None`: no `Accept-Encoding`, or nothing offered is acceptable.
pub fn negotiate(accept: Option<&HeaderValue>, offered: &[Algorithm]) -> Option<Algorithm> {
    let accept = accept?.to_str().ok()?;
    let mut listed: Vec<(Option<Algorithm>, f32)> = Vec::new(); // None: `*`
    for item in accept.split(',') {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or("").trim();
        let q = parts
            .filter_map(|p| {
                let (k, v) = p.split_once('=')?;
                k.trim()
                    .eq_ignore_ascii_case("q")
                    .then(|| v.trim().parse::<f32>().ok())?
            })
            .next()
            .unwrap_or(1.0)
            .clamp(0.0, 1.0);
        let algorithm = match coding.to_ascii_lowercase().as_str() {
            "gzip" | "x-gzip" => Some(Algorithm::Gzip),
            "br" => Some(Algorithm::Brotli),
            "zstd" => Some(Algorithm::Zstd),
            "*" => None,
            _ => continue,
        };
        listed.push((algorithm, q));
    }
    let star = listed.iter().find(|(a, _)| a.is_none()).map(|(_, q)| *q);
    let mut best: Option<(Algorithm, f32)> = None;
    for a in offered {
        let q = listed
            .iter()
            .find(|(l, _)| *l == Some(*a))
            .map(|(_, q)| *q)
            .or(star)
            .unwrap_or(0.0);
        if q > 0.0 && best.is_none_or(|(_, b)| q > b) {
            best = Some((*a, q));
        }
    }
    best.map(|(a, _)| a)
}

impl Compression {
    fn new() -> Compression {
        Compression {
            inner: ResponseCompressionCtx::new(0, false, false),
            accept: None,
            offered: Vec::new(),
            brotli: false,
            finished: false,
            produced: 0,
        }
    }

    /// What the route offers for this response (algorithm, level), in preference order; set
    /// before the response head reaches the module.
    pub fn offer(&mut self, offered: Vec<(Algorithm, u32)>) {
        self.offered = offered;
    }

    /// Run the encoder on a chunk and, at the end of a brotli stream, add its final block.
    fn encode(&mut self, data: Option<&Bytes>, end: bool) -> Option<Bytes> {
        let out = self.inner.response_body_filter(data, end);
        if let Some(b) = &out {
            self.produced += b.len();
        }
        if !(end && self.brotli && !self.finished) {
            return out;
        }
        self.finished = true;
        if self.produced == 0 {
            return Some(Bytes::from_static(&[BROTLI_EMPTY]));
        }
        let mut buf = BytesMut::from(out.unwrap_or_default().as_ref());
        buf.extend_from_slice(&[BROTLI_END]);
        Some(buf.freeze())
    }
}

#[async_trait]
impl HttpModule for Compression {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    async fn request_header_filter(&mut self, req: &mut RequestHeader) -> Result<()> {
        self.accept = req.headers.get(ACCEPT_ENCODING).cloned();
        Ok(())
    }

    async fn response_header_filter(
        &mut self,
        resp: &mut ResponseHeader,
        end_of_stream: bool,
    ) -> Result<()> {
        if self.offered.is_empty() || resp.status.is_informational() {
            return Ok(());
        }
        let algorithms: Vec<Algorithm> = self.offered.iter().map(|(a, _)| *a).collect();
        let chosen = negotiate(self.accept.as_ref(), &algorithms);
        // Every offered level is set, so Pingora adds `Vary: Accept-Encoding` even when this
        // client gets the identity body; it sees only the chosen coding as acceptable.
        for (a, level) in &self.offered {
            self.inner.adjust_algorithm_level(*a, *level);
        }
        let mut req = RequestHeader::build("GET", b"/", None)?;
        req.insert_header(ACCEPT_ENCODING, chosen.map_or("identity", |a| a.as_str()))?;
        self.inner.request_filter(&req);
        let encoded_by_backend = resp.headers.contains_key(CONTENT_ENCODING);
        self.inner.response_header_filter(resp, end_of_stream);
        self.brotli = !encoded_by_backend
            && self.inner.is_enabled()
            && chosen == Some(Algorithm::Brotli)
            && resp.headers.contains_key(CONTENT_ENCODING);
        Ok(())
    }

    fn response_body_filter(
        &mut self,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
    ) -> Result<()> {
        if !self.inner.is_enabled() {
            return Ok(());
        }
        if let Some(encoded) = self.encode(body.as_ref(), end_of_stream) {
            *body = Some(encoded);
        }
        Ok(())
    }

    fn response_done_filter(&mut self) -> Result<Option<Bytes>> {
        if !self.inner.is_enabled() || self.finished {
            return Ok(None);
        }
        // The body ended without an end-of-stream chunk: finish the encoding now.
        Ok(self.encode(None, true))
    }
}

/// Installs [`Compression`] in place of Pingora's default module, at the same order.
pub struct CompressionBuilder;

impl CompressionBuilder {
    /// The builder, boxed for `HttpModules::add_module`.
    pub fn module() -> ModuleBuilder {
        Box::new(CompressionBuilder)
    }
}

impl HttpModuleBuilder for CompressionBuilder {
    fn init(&self) -> Module {
        Box::new(Compression::new())
    }

    fn order(&self) -> i16 {
        // Pingora's: after most other modules, so it sees the final body.
        i16::MIN / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Drive a response through the module as Pingora does and return the bytes sent.
    async fn run(
        accept: &str,
        chunks: &[&[u8]],
        done_filter_ends: bool,
    ) -> (Option<String>, Vec<u8>) {
        let mut m = Compression::new();
        m.offer(vec![
            (Algorithm::Zstd, 5),
            (Algorithm::Brotli, 5),
            (Algorithm::Gzip, 5),
        ]);
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.insert_header("accept-encoding", accept).unwrap();
        m.request_header_filter(&mut req).await.unwrap();
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.insert_header("content-type", "text/plain").unwrap();
        resp.insert_header("transfer-encoding", "chunked").unwrap();
        m.response_header_filter(&mut resp, false).await.unwrap();
        let mut sent = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let end = !done_filter_ends && i + 1 == chunks.len();
            let mut body = Some(Bytes::copy_from_slice(c));
            m.response_body_filter(&mut body, end).unwrap();
            sent.extend_from_slice(&body.unwrap_or_default());
        }
        if (done_filter_ends || chunks.is_empty())
            && let Some(b) = m.response_done_filter().unwrap()
        {
            sent.extend_from_slice(&b);
        }
        let ce = resp
            .headers
            .get("content-encoding")
            .map(|v| v.to_str().unwrap().to_string());
        (ce, sent)
    }

    fn unbrotli(b: &[u8]) -> Vec<u8> {
        // The strict decoder: `read_to_end` fails on a stream without its final block.
        let mut out = Vec::new();
        brotli::Decompressor::new(b, 4096)
            .read_to_end(&mut out)
            .expect("a complete brotli stream");
        out
    }

    #[tokio::test]
    async fn brotli_streams_are_complete() {
        let text = "tollgate compresses text. ".repeat(500);
        let (a, b) = text.as_bytes().split_at(4000);
        for done_filter_ends in [false, true] {
            let (ce, sent) = run("br", &[a, b], done_filter_ends).await;
            assert_eq!(ce.as_deref(), Some("br"));
            assert_eq!(
                unbrotli(&sent),
                text.as_bytes(),
                "ended by done filter: {done_filter_ends}"
            );
        }
        let (_, sent) = run("br", &[], true).await;
        assert_eq!(unbrotli(&sent), b"", "an empty body is an empty stream");
        let (_, sent) = run("br", &[b""], false).await;
        assert_eq!(unbrotli(&sent), b"");
    }

    #[test]
    fn negotiation_follows_q_values_and_the_routes_order() {
        use Algorithm::{Brotli, Gzip, Zstd};
        let n = |ae: Option<&str>, offered: &[Algorithm]| {
            negotiate(
                ae.map(HeaderValue::from_str).transpose().unwrap().as_ref(),
                offered,
            )
        };
        let all = [Zstd, Brotli, Gzip];
        assert_eq!(n(None, &all), None, "no Accept-Encoding: identity");
        assert_eq!(n(Some("gzip"), &all), Some(Gzip));
        assert_eq!(
            n(Some("gzip, deflate, br, zstd"), &[Brotli]),
            Some(Brotli),
            "not only the first listed"
        );
        assert_eq!(
            n(Some("gzip, deflate, br, zstd"), &all),
            Some(Zstd),
            "ties: the route's order"
        );
        assert_eq!(
            n(Some("gzip;q=1.0, br;q=0.5"), &all),
            Some(Gzip),
            "higher q wins"
        );
        assert_eq!(n(Some("gzip;q=0, br"), &[Gzip]), None, "q=0 refuses");
        assert_eq!(n(Some("GZIP ; Q=0.3"), &[Gzip]), Some(Gzip));
        assert_eq!(
            n(Some("*"), &[Brotli, Gzip]),
            Some(Brotli),
            "* covers the unlisted"
        );
        assert_eq!(n(Some("*;q=0, gzip"), &all), Some(Gzip));
        assert_eq!(n(Some("identity"), &all), None);
        assert_eq!(n(Some("deflate"), &all), None);
    }

    #[tokio::test]
    async fn gzip_is_left_as_pingora_writes_it() {
        let text = "tollgate compresses text. ".repeat(500);
        let (ce, sent) = run("gzip", &[text.as_bytes()], false).await;
        assert_eq!(ce.as_deref(), Some("gzip"));
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&sent[..])
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, text.as_bytes());
    }
}

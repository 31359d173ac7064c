//! Entry points of the cargo-fuzz targets in `fuzz/` (see `docs/security.md`, "Fuzzing"), kept
//! in the library so that `cargo test` compiles them and replays the committed seeds and
//! regression inputs through them (`tests/fuzz_regressions.rs`). Not an API: each function
//! panics when the input breaks an invariant of the code it drives, which is what a fuzzer
//! reports.
//!
//! | function | drives | asserts beyond "no panic" |
//! |---|---|---|
//! | [`config`] | YAML through [`Config::from_yaml`] (what `tollgate -t` runs) | an error is never empty and names where |
//! | [`normalize_path`] | [`routing::normalize_path`] | agrees with a byte-level model; output absolute, idempotent, no `//`, `.`, `..` |
//! | [`head`] | the head checks, `Cookie` joining, hop-by-hop and forwarding stripping, the `_` policy | an accepted head satisfies RFC 9112 framing/Host/target rules |
//! | [`request`] | Pingora's HTTP/1 parser, then the gateway's phases and filter chain | answers are well-formed; a forwarded request is origin-form, normalised, stripped |
//! | [`framing`] | the connection guard's HTTP/1 reader (`wire::framing`) | the same verdict and message boundaries however the bytes are split; an accepted head is one Pingora's parser accepts too |

use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use http::{Method, Version};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::HttpModules;
use pingora::protocols::http::v1::client::HttpSession as ClientSession;
use pingora::proxy::{ProxyHttp, Session};
use tokio::io::{AsyncWriteExt, DuplexStream};

use crate::config::{Config, HeadLimits, UnderscoreHeaders};
use crate::proxy::{Gateway, headers, hygiene};
use crate::routing::{self, PathError, Router};
use crate::runtime::RuntimeState;

// ---------------------------------------------------------------------------------------------
// config
// ---------------------------------------------------------------------------------------------

/// Files a configuration may name that would never finish reading (`jwks_file: /dev/zero`):
/// the operator's choice, not a bug, so such inputs are skipped.
const ENDLESS_FILES: [&str; 3] = ["/dev/", "/proc/", "/sys/"];

/// Parse and validate `data` as a configuration file: `Ok`, or errors that each say where.
pub fn config(data: &[u8]) {
    // `Config::load` refuses a file that is not UTF-8 before parsing.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if ENDLESS_FILES.iter().any(|p| text.contains(p)) {
        return;
    }
    match Config::from_yaml(text, "fuzz.yaml") {
        Ok(config) => {
            let router = Router::new(config.routes.clone());
            assert_eq!(router.routes().len(), config.routes.len());
            let _ = config.watched_files();
        }
        Err(errors) => {
            assert!(!errors.errors.is_empty(), "an Err without any error");
            for e in &errors.errors {
                assert!(!e.message.is_empty(), "an error without a message: {e:?}");
                assert!(
                    !e.path.is_empty() || located(&e.message),
                    "an error that does not say where: {e:?}"
                );
            }
            assert!(!errors.to_string().is_empty());
        }
    }
}

/// A parser message carries its position (`line 3 column 7`, or `at line 3`).
fn located(message: &str) -> bool {
    message.contains("line ")
}

// ---------------------------------------------------------------------------------------------
// normalize_path
// ---------------------------------------------------------------------------------------------

/// Normalise `data` (a path, as `http::Uri::path` gives it: any UTF-8) and check the result.
pub fn normalize_path(data: &[u8]) {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let got = routing::normalize_path(path);
    let want = model(path);
    assert_eq!(
        got.as_deref().map_err(|e| *e),
        want.as_deref().map_err(|e| *e),
        "normalize_path({path:?}) disagrees with the model"
    );
    let Ok(out) = got else {
        return;
    };
    if path == "*" {
        assert_eq!(out, "*");
        return;
    }
    assert!(out.starts_with('/'), "{path:?} → {out:?}: not absolute");
    assert!(!out.contains("//"), "{path:?} → {out:?}: empty segment");
    assert!(
        !out.split('/').any(|s| s == "." || s == ".."),
        "{path:?} → {out:?}: dot segment"
    );
    // Escaped paths are always copied, so only the value must not change.
    match routing::normalize_path(&out) {
        Ok(again) => assert_eq!(again, out, "{path:?}: not idempotent"),
        Err(e) => panic!("{path:?} → {out:?} → {e:?}: not idempotent"),
    }
    if matches!(out, std::borrow::Cow::Borrowed(_)) {
        assert_eq!(out, path, "borrowed but changed");
    }
}

/// RFC 3986 §6.2.2 and §5.2.4 on bytes, written independently of `routing::normalize`: the
/// same refusals in the same precedence (a forbidden byte anywhere, then the first bad or
/// forbidden escape, then a `.;`/`..;` segment once decoded), then unreserved escapes
/// decoded, others upper-cased, dot segments removed, empty segments dropped, a trailing slash
/// kept.
fn model(path: &str) -> Result<String, PathError> {
    if path == "*" {
        return Ok("*".into());
    }
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    if b.iter().any(|&c| c == b'\\' || c.is_ascii_control()) {
        return Err(PathError::ForbiddenByte);
    }
    let mut decoded = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            decoded.push(b[i]);
            i += 1;
            continue;
        }
        let hex = b
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .ok_or(PathError::BadEscape)?;
        let text = std::str::from_utf8(hex).expect("hex digits are ASCII");
        let byte = u8::from_str_radix(text, 16).expect("two hex digits");
        if matches!(byte, b'/' | b'\\' | b'#') || byte.is_ascii_control() {
            return Err(PathError::ForbiddenEscape);
        }
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            decoded.push(byte);
        } else {
            decoded.push(b'%');
            decoded.extend(hex.iter().map(u8::to_ascii_uppercase));
        }
        i += 3;
    }
    if decoded
        .split(|&c| c == b'/')
        .any(|s| s.starts_with(b".;") || s.starts_with(b"..;"))
    {
        return Err(PathError::DotParameter);
    }
    let mut kept: Vec<&[u8]> = Vec::new();
    let mut dir = false;
    for seg in decoded.split(|&c| c == b'/').skip(1) {
        match seg {
            b"" => {}
            b"." => dir = true,
            b".." => {
                kept.pop();
                dir = true;
            }
            s => {
                kept.push(s);
                dir = false;
            }
        }
    }
    dir |= decoded.ends_with(b"/");
    let mut out = Vec::with_capacity(decoded.len());
    for s in &kept {
        out.push(b'/');
        out.extend_from_slice(s);
    }
    if out.is_empty() || dir {
        out.push(b'/');
    }
    // Only ASCII was decoded and only ASCII inserted, so UTF-8 stays UTF-8.
    Ok(String::from_utf8(out).expect("normalising keeps UTF-8"))
}

// ---------------------------------------------------------------------------------------------
// head
// ---------------------------------------------------------------------------------------------

/// A request head the HTTP/1 parser may never produce (any version, any bytes in the target),
/// for the checks of `early_request_filter` (`proxy::hygiene`, `proxy::headers`).
#[derive(Debug, Clone, Default)]
pub struct Head {
    /// Method token (invalid ones are skipped).
    pub method: String,
    /// Request target bytes.
    pub target: Vec<u8>,
    /// 0: HTTP/1.0, 1: HTTP/1.1, else HTTP/2.
    pub version: u8,
    /// Header fields (invalid names or values are skipped).
    pub headers: Vec<(String, Vec<u8>)>,
    /// Pick the head limits: 0 the defaults, else small ones.
    pub limits: u8,
}

/// Run the head checks and header hygiene on `input`.
pub fn head(input: &Head) {
    let Ok(mut req) = RequestHeader::build(input.method.as_str(), &input.target, None) else {
        return;
    };
    req.set_version(match input.version {
        0 => Version::HTTP_10,
        1 => Version::HTTP_11,
        _ => Version::HTTP_2,
    });
    for (name, value) in &input.headers {
        let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_bytes(value),
        ) else {
            continue;
        };
        let _ = req.append_header(n, v);
    }
    let limits = if input.limits == 0 {
        HeadLimits {
            max_request_line: 8192,
            max_header_size: 65536,
            max_header_count: 100,
        }
    } else {
        HeadLimits {
            max_request_line: 64 + usize::from(input.limits),
            max_header_size: 256 + 4 * usize::from(input.limits),
            max_header_count: usize::from(input.limits % 16),
        }
    };
    match hygiene::check(&req, &limits) {
        Ok(()) => accepted(&req, &limits),
        Err(r) => {
            assert!(
                matches!(r.status, 400 | 405 | 414 | 431 | 501),
                "refused with {r:?}"
            );
            assert!(!r.message.is_empty());
        }
    }
    let host = req
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_string();
    let _ = routing::normalize_host(&host);

    let cookies = req.headers.get_all(http::header::COOKIE).iter().count();
    hygiene::join_cookie_crumbs(&mut req);
    let after = req.headers.get_all(http::header::COOKIE).iter().count();
    if req.version == Version::HTTP_2 && cookies > 1 {
        assert_eq!(after, 1, "cookie crumbs not joined");
    } else {
        assert_eq!(after, cookies, "cookies changed");
    }

    let nominated: Vec<String> = req
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !matches!(t.as_str(), "content-length" | "transfer-encoding" | "host"))
        .collect();
    let websocket = headers::is_websocket_upgrade(&req);
    headers::strip_request(&mut req);
    for n in ["keep-alive", "proxy-connection", "te"] {
        assert!(!req.headers.contains_key(n), "{n} survived stripping");
    }
    if websocket {
        assert_eq!(req.headers.get_all("connection").iter().count(), 1);
        assert_eq!(req.headers.get_all("upgrade").iter().count(), 1);
    } else {
        for n in ["connection", "upgrade"] {
            assert!(!req.headers.contains_key(n), "{n} survived stripping");
        }
        for n in &nominated {
            assert!(
                !req.headers.contains_key(n.as_str()),
                "{n} (nominated) survived"
            );
        }
    }
    headers::drop_forwarding(&mut req);
    for n in &headers::FORWARDING {
        assert!(!req.headers.contains_key(n), "{n} survived drop_forwarding");
    }

    let underscored = req.headers.keys().any(|k| k.as_str().contains('_'));
    let count = req.headers.len();
    assert!(hygiene::underscores(&mut req, UnderscoreHeaders::Keep));
    assert_eq!(req.headers.len(), count);
    assert_eq!(
        hygiene::underscores(&mut req, UnderscoreHeaders::Reject),
        !underscored
    );
    assert!(hygiene::underscores(&mut req, UnderscoreHeaders::Drop));
    assert!(!req.headers.keys().any(|k| k.as_str().contains('_')));
}

/// What an accepted head must satisfy (RFC 9112 §6, RFC 9110 §7.2, §8.6).
fn accepted(req: &RequestHeader, limits: &HeadLimits) {
    let h = &req.headers;
    let lengths: Vec<_> = h.get_all(http::header::CONTENT_LENGTH).iter().collect();
    assert!(lengths.len() <= 1, "two Content-Length accepted");
    for v in lengths {
        assert!(
            !v.is_empty() && v.as_bytes().iter().all(u8::is_ascii_digit),
            "Content-Length {v:?} accepted"
        );
    }
    let codings: Vec<_> = h.get_all(http::header::TRANSFER_ENCODING).iter().collect();
    assert!(codings.len() <= 1, "two Transfer-Encoding accepted");
    for v in codings {
        let v = String::from_utf8_lossy(v.as_bytes());
        assert!(
            v.trim().eq_ignore_ascii_case("chunked"),
            "Transfer-Encoding {v:?} accepted"
        );
    }
    assert!(req.method != Method::TRACE && req.method != Method::CONNECT);
    let hosts: Vec<_> = h.get_all(http::header::HOST).iter().collect();
    match hosts.as_slice() {
        [] => assert_eq!(req.version, Version::HTTP_10, "no Host accepted"),
        [one] => assert!(hygiene::valid_authority(one.as_bytes()), "Host {one:?}"),
        _ => panic!("two Host fields accepted"),
    }
    let raw = req.raw_path();
    assert!(
        !raw.iter().any(|&b| b <= b' ' || b == 0x7f),
        "target with a space or control byte accepted"
    );
    if req.version != Version::HTTP_2 {
        let lower = raw.to_ascii_lowercase();
        assert!(
            raw.first() == Some(&b'/')
                || (raw == b"*" && req.method == Method::OPTIONS)
                || lower.starts_with(b"http://")
                || lower.starts_with(b"https://"),
            "target {:?} accepted",
            String::from_utf8_lossy(raw)
        );
    }
    assert!(req.method.as_str().len() + raw.len() + 10 <= limits.max_request_line);
    assert!(h.len() <= limits.max_header_count);
}

// ---------------------------------------------------------------------------------------------
// request
// ---------------------------------------------------------------------------------------------

/// Separates the request bytes from an optional upstream response head in [`request`] input.
pub const RESPONSE_MARKER: &[u8] = b"\n--upstream-response--\n";

/// The configuration [`request`] runs, every built-in filter kind but the Redis backend, with
/// `{TRUSTED}`, `{UNDERSCORES}` and `{CASE}` filled in for its two gateways.
const GATEWAY_YAML: &str = r#"
server:
  max_request_line: 2KiB
  max_header_size: 8KiB
  max_header_count: 40
  underscore_headers: {UNDERSCORES}
  preserve_header_case: {CASE}
listeners:
  - address: 127.0.0.1:1
trusted_proxies: [{TRUSTED}]
filters:
  - { kind: tracing, echo: true }
  - { kind: security_headers, content_security_policy: "default-src 'self'" }
upstreams:
  api:
    backends: [{ address: "127.0.0.1:9" }]
  pool0:
    backends: [{ address: "127.0.0.1:9" }]
    keepalive: { pool_size: 0 }
  cookie:
    balance: consistent_hash
    hash_key: cookie:session
    backends: [{ address: "127.0.0.1:9" }, { address: "127.0.0.1:10" }]
  tenant:
    balance: consistent_hash
    hash_key: header:x-tenant
    backends: [{ address: "127.0.0.1:9" }, { address: "127.0.0.1:10" }]
routes:
  - name: api
    match: { hosts: [api.example.com, "*.example.org"], path_prefix: /api, methods: [GET, POST, PUT, OPTIONS] }
    upstream: api
    strip_prefix: true
    rewrite: { regex: "^/v1/(.*)$", replace: "/$1" }
    filters:
      - { kind: limits, max_body_size: 64, max_header_count: 30, max_header_size: 4KiB,
          methods: [GET, POST, PUT, OPTIONS], deny_cidrs: [192.0.2.0/24] }
      - { kind: cors, allow_origins: [https://app.example.com, "https://*.example.com"],
          allow_methods: [GET, POST], allow_headers: [Authorization, X-Api-Key],
          expose_headers: [X-Request-Id], allow_credentials: true, max_age: 10m }
      - { kind: headers,
          request: { set: { X-Env: prod, X-Path: "${path}", X-Client: "${client_ip}" },
                     add: { X-Host: "${host}" }, remove: [X-Debug] },
          response: { set: { X-Route: "${route}", X-Scheme: "${scheme}" }, remove: [Server] } }
      - { kind: auth, api_keys: [key-one-0001, key-two-0002], header: X-Api-Key, query: api_key }
      - { kind: rate_limit, key: "header:x-api-key", rate: 1000000/s, burst: 1000, max_keys: 1000 }
      - { kind: concurrency, max: 1000 }
      - { kind: compression, algorithms: [zstd, br, gzip], level: 1, min_size: 1 }
  - name: jwt
    match: { path_prefix: /jwt }
    upstream: cookie
    filters:
      - { kind: auth, jwt: { secret: "fuzzing-secret-0123456789abcdef-0123", algorithms: [HS256],
          issuer: "https://idp.test", audience: [api], claims_to_headers: { sub: X-User } } }
      - { kind: rate_limit, key: "claim:sub", rate: 1000000/s }
  - name: exact
    match: { path: /exact, methods: [GET, HEAD] }
    upstream: pool0
    upstream_host: internal.test
  - name: assets
    match: { path_regex: "^/assets/.+\\.(css|js)$" }
    upstream: tenant
    cache: { ttl: 10s }
  - name: plain
    match: { hosts: [plain.example.com] }
    upstream: api
    filters:
      - { kind: redirect, to: "https://${host}${path}", status: 308, plain_only: true }
  - name: site
    upstream: api
    filters:
      - { kind: headers, response: { add: { X-Site: "${host}" } } }
"#;

struct Fixture {
    rt: tokio::runtime::Runtime,
    /// Untrusted peer, `_` headers dropped, names lower-cased; trusted peer (`0.0.0.0/32`), `_`
    /// headers refused, names' case kept.
    gateways: [Gateway; 2],
    modules: HttpModules,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let gateway = |trusted: &str, underscores: &str, case: bool| {
            let yaml = GATEWAY_YAML
                .replace("{TRUSTED}", trusted)
                .replace("{UNDERSCORES}", underscores)
                .replace("{CASE}", &case.to_string());
            let config = Config::from_yaml(&yaml, "fuzz gateway")
                .unwrap_or_else(|e| panic!("the fuzz gateway's configuration: {e}"));
            Gateway::new(Arc::new(ArcSwap::from_pointee(RuntimeState::new(config))))
        };
        let gateways = [
            gateway("", "drop", false),
            gateway("0.0.0.0/32", "reject", true),
        ];
        let mut modules = HttpModules::new();
        gateways[0].init_downstream_modules(&mut modules);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        Fixture {
            rt,
            gateways,
            modules,
        }
    })
}

/// Drive raw bytes through Pingora's HTTP/1 parser and the gateway's request phases, as
/// `pingora_proxy` calls them, on both fuzz gateways. `data` is a request (head and body),
/// optionally followed by [`RESPONSE_MARKER`] and an upstream response head for the response
/// phases.
pub fn request(data: &[u8]) {
    let (req, resp) = match find(data, RESPONSE_MARKER) {
        Some(i) => (&data[..i], Some(&data[i + RESPONSE_MARKER.len()..])),
        None => (data, None),
    };
    let f = fixture();
    for gw in &f.gateways {
        f.rt.block_on(exchange(gw, &f.modules, req, resp));
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn exchange(gw: &Gateway, modules: &HttpModules, req: &[u8], resp: Option<&[u8]>) {
    // Room for everything the gateway might answer, so no write waits for a reader.
    let (mut client, server) = tokio::io::duplex(1 << 20);
    client.write_all(req).await.expect("duplex write");
    client.shutdown().await.expect("duplex shutdown");
    let mut session = Session::new_h1_with_modules(Box::new(server), modules);
    match session.read_request().await {
        Ok(true) => {}
        _ => return, // Pingora refused or the head is incomplete: nothing of ours ran.
    }
    let sent = session.req_header().uri.path().to_string();
    let mut ctx = gw.new_ctx();
    let answered = phases(gw, &mut session, &mut ctx).await;
    match answered {
        Ok(true) => {
            gw.logging(&mut session, None, &mut ctx).await;
            drop(session);
            check_answer(client).await;
        }
        Ok(false) => {
            routed(gw, &mut session, &mut ctx, &sent, resp).await;
            gw.logging(&mut session, None, &mut ctx).await;
        }
        Err(e) => {
            gw.fail_to_proxy(&mut session, &e, &mut ctx).await;
            gw.logging(&mut session, Some(&e), &mut ctx).await;
        }
    }
}

/// `early_request_filter`, the downstream modules, `request_filter`: `Ok(true)` if answered.
async fn phases(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut crate::proxy::RequestCtx,
) -> pingora::Result<bool> {
    gw.early_request_filter(session, ctx).await?;
    let req = session.downstream_session.req_header_mut();
    session
        .downstream_modules_ctx
        .request_header_filter(req)
        .await?;
    gw.request_filter(session, ctx).await
}

/// A request the gateway sends on: what the upstream would receive, and the response phases.
async fn routed(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut crate::proxy::RequestCtx,
    sent: &str,
    resp: Option<&[u8]>,
) {
    let state = Arc::clone(ctx.state());
    let route = ctx.route.expect("a request sent on has a route");
    assert!(ctx.upstream.is_some());
    // What routing and the filters saw is the client's path, normalised.
    let path = session.req_header().uri.path().to_string();
    assert_eq!(
        Ok(path.as_str()),
        model(sent).as_deref(),
        "routed {sent:?} as {path:?}"
    );
    let _ = gw.request_cache_filter(session, ctx);
    let _ = gw.cache_key_callback(session, ctx);
    let _ = gw.upstream_peer(session, ctx).await;
    for _ in 0..8 {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                let mut body = Some(chunk);
                if gw
                    .request_body_filter(session, &mut body, false, ctx)
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Ok(None) => {
                let _ = gw.request_body_filter(session, &mut None, true, ctx).await;
                break;
            }
            Err(_) => return,
        }
    }
    let mut up = session.req_header().clone();
    gw.upstream_request_filter(session, &mut up, ctx)
        .await
        .unwrap_or_else(|e| panic!("upstream_request_filter failed on {path:?}: {e}"));
    let raw = up.raw_path();
    assert!(
        raw.first() == Some(&b'/') || raw == b"*",
        "upstream target {:?} is not origin-form",
        String::from_utf8_lossy(raw)
    );
    for n in ["keep-alive", "proxy-connection", "te"] {
        assert!(!up.headers.contains_key(n), "{n} sent upstream");
    }
    if !headers::is_websocket_upgrade(&up) {
        assert!(!up.headers.contains_key("upgrade"), "Upgrade sent upstream");
        if state.router.route(route).name != "exact" {
            assert!(
                !up.headers.contains_key("connection"),
                "Connection sent upstream"
            );
        }
    }
    assert!(up.headers.contains_key("x-forwarded-for"));
    assert!(up.headers.contains_key(crate::proxy::request_id::HEADER));
    assert!(
        !up.headers.keys().any(|k| k.as_str().contains('_')),
        "a header with '_' sent upstream"
    );
    let hosts = up.headers.get_all(http::header::HOST).iter().count();
    assert!(hosts <= 1, "{hosts} Host fields sent upstream");

    let parsed = match resp {
        Some(r) => upstream_response(r).await,
        None => None,
    };
    let mut response = parsed.unwrap_or_else(default_response);
    if gw
        .upstream_response_filter(session, &mut response, ctx)
        .await
        .is_err()
    {
        return;
    }
    for n in ["keep-alive", "proxy-connection", "te"] {
        assert!(!response.headers.contains_key(n), "{n} sent to the client");
    }
    if gw
        .response_filter(session, &mut response, ctx)
        .await
        .is_err()
    {
        return;
    }
    assert!(
        response
            .headers
            .contains_key(crate::proxy::request_id::HEADER)
    );
    let _ = session
        .downstream_modules_ctx
        .response_header_filter(&mut response, false)
        .await;
}

/// An upstream response head, read by Pingora's HTTP/1 client parser.
async fn upstream_response(bytes: &[u8]) -> Option<ResponseHeader> {
    let (mut origin, gateway_end) = tokio::io::duplex(bytes.len() + 1);
    origin.write_all(bytes).await.ok()?;
    origin.shutdown().await.ok()?;
    let mut upstream = ClientSession::new(Box::new(gateway_end));
    upstream.read_response().await.ok()?;
    upstream.resp_header().cloned()
}

fn default_response() -> ResponseHeader {
    let mut r = ResponseHeader::build(200, None).expect("200");
    for (k, v) in [
        ("content-type", "text/html"),
        ("content-length", "2048"),
        ("connection", "keep-alive, x-hop"),
        ("x-hop", "1"),
        ("server", "origin"),
        ("vary", "accept-encoding"),
    ] {
        r.append_header(k, v).expect("static header");
    }
    r
}

/// What the gateway wrote when it answered: one well-formed response head.
async fn check_answer(client: DuplexStream) {
    let mut reader = ClientSession::new(Box::new(client));
    reader
        .read_response()
        .await
        .unwrap_or_else(|e| panic!("the gateway's answer does not parse: {e}"));
    let resp = reader.resp_header().expect("a response head");
    assert!(
        (100..600).contains(&resp.status.as_u16()),
        "status {}",
        resp.status
    );
    assert!(
        resp.headers.contains_key(crate::proxy::request_id::HEADER),
        "an answer without X-Request-Id: {resp:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// framing
// ---------------------------------------------------------------------------------------------

/// What [`crate::wire::framing::Framing`] made of a byte stream: message ends, then the verdict.
fn frame(
    data: &[u8],
    split: usize,
) -> (
    Vec<usize>,
    Result<crate::wire::framing::Phase, crate::wire::framing::Violation>,
) {
    use crate::wire::framing::{Framing, Limits, Phase};
    let limits = Limits {
        max_request_line: 256,
        max_header_size: 1024,
        max_header_count: 16,
        h2c: data.first().is_some_and(|b| b & 1 == 1),
    };
    let mut f = Framing::new(limits);
    let mut ends = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let piece = &data[pos..(pos + split.max(1)).min(data.len())];
        let mut off = 0;
        while off < piece.len() {
            match f.feed(&piece[off..]) {
                Err(v) => return (ends, Err(v)),
                Ok(fed) => {
                    assert!(fed.used <= piece.len() - off, "fed more than given");
                    off += fed.used;
                    if fed.complete {
                        ends.push(pos + off);
                    } else if fed.used == 0 {
                        assert!(
                            matches!(f.phase(), Phase::AwaitUpgrade | Phase::Opaque),
                            "stalled in {:?}",
                            f.phase()
                        );
                        return (ends, Ok(f.phase()));
                    }
                }
            }
        }
        pos += piece.len();
    }
    (ends, Ok(f.phase()))
}

/// The connection guard's reader: any split of the input gives the same boundaries and
/// verdict, boundaries increase, a refusal has one of the guard's statuses, and every head it
/// accepts as complete is one httparse (Pingora's parser) accepts too.
pub fn framing(data: &[u8]) {
    let whole = frame(data, data.len());
    for split in [1, 3, 17] {
        assert_eq!(frame(data, split), whole, "split {split} disagrees");
    }
    let (ends, verdict) = whole;
    assert!(ends.windows(2).all(|w| w[0] < w[1]));
    if let Err(v) = verdict {
        assert!([400, 414, 431, 505].contains(&v.status), "{v:?}");
    }
    // The first message: if its head ended in the input, httparse must parse that head.
    if let Some(&end) = ends.first() {
        let mut fields = [httparse::EMPTY_HEADER; 16];
        let mut req = httparse::Request::new(&mut fields);
        let parsed = req.parse(&data[..end]);
        assert!(
            matches!(parsed, Ok(httparse::Status::Complete(_))),
            "the guard accepted a head httparse refuses: {parsed:?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fuzz_gateway_answers_and_forwards() {
        request(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n");
        request(b"GET /api/v1/x?api_key=key-one-0001 HTTP/1.1\r\nHost: api.example.com\r\n\r\n");
        request(b"GET /jwt HTTP/1.1\r\nHost: a.test\r\n\r\n");
        request(b"GET /x HTTP/1.1\r\nHost: plain.example.com\r\n\r\n");
        let mut with_response = b"GET /exact HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
        with_response.extend_from_slice(RESPONSE_MARKER);
        with_response.extend_from_slice(b"HTTP/1.1 404 Nope\r\nKeep-Alive: 5\r\n\r\n");
        request(&with_response);
    }

    #[test]
    fn the_model_agrees_on_the_unit_cases() {
        for p in [
            "/",
            "/a/../b",
            "/%2e%2e/x",
            "/a%2fb",
            "/a%zz",
            "*",
            "a",
            "//x//",
            "/a/.",
        ] {
            normalize_path(p.as_bytes());
        }
    }
}

//! The filter chain on a realistic API request, and the header hygiene every request gets.
//!
//! `proxy::filter_chain` takes a live Pingora `Session`, so the chain is driven here the way it
//! drives it: every filter's `on_request` in order (global, then the route's), then every
//! `on_response` in reverse, on the request and response heads, with a fresh per-request
//! `FilterCtx`. Local filters finish on their first poll; what is measured is their work plus
//! the boxed future `async_trait` makes per call.
//!
//! Also the access log's line formatting.
//!
//! `cargo bench --bench filters`; allocations per operation are printed before each timing.

mod support;

use std::future::Future;
use std::hint::black_box;
use std::net::IpAddr;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use criterion::{Criterion, criterion_group, criterion_main};
use pingora::http::{RequestHeader, ResponseHeader};
use tollgate::Config;
use tollgate::access_log::{Entry, format_line};
use tollgate::config::AccessLogFormat;
use tollgate::filters::{Filter, FilterCtx, Outcome};
use tollgate::proxy::headers;

const CONFIG: &str = "\
listeners: [{address: 127.0.0.1:1}]
upstreams: {u: {backends: [{address: 127.0.0.1:2}]}}
filters:
  - { kind: tracing }
routes:
  - name: api
    upstream: u
    match: { hosts: [api.example.com], path_prefix: /api, methods: [GET, POST] }
    filters:
      - { kind: limits, max_body_size: 10MiB, max_header_count: 100 }
      - { kind: auth, api_keys: [s3cret-key-0123], header: X-API-Key }
      - { kind: cors, allow_origins: [https://app.example.com, \"https://*.example.com\"],
          allow_methods: [GET, POST], allow_headers: [Authorization], allow_credentials: true, max_age: 10m }
      - { kind: headers, request: { set: { X-Env: prod }, remove: [X-Debug] },
          response: { set: { X-Route: \"${route}\" } } }
      - { kind: security_headers, hsts: \"max-age=31536000\", frame_options: DENY }
      - { kind: rate_limit, key: client_ip, rate: 1000000000/s, burst: 1000000 }
";

fn request() -> RequestHeader {
    let mut r = RequestHeader::build("GET", b"/api/orders?id=42", None).unwrap();
    for (k, v) in [
        ("Host", "api.example.com"),
        (
            "User-Agent",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36",
        ),
        ("Accept", "application/json"),
        ("Accept-Encoding", "gzip, br"),
        ("Origin", "https://app.example.com"),
        ("X-API-Key", "s3cret-key-0123"),
        ("Cookie", "session=abc123; theme=dark"),
        ("X-Debug", "1"),
    ] {
        r.append_header(k, v).unwrap();
    }
    r
}

fn response() -> ResponseHeader {
    let mut r = ResponseHeader::build(200, None).unwrap();
    r.append_header("Content-Type", "application/json").unwrap();
    r.append_header("Content-Length", "512").unwrap();
    r.append_header("Date", "Tue, 01 Dec 2026 12:00:00 GMT")
        .unwrap();
    r
}

/// Poll a future once: local filters never wait.
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("a local filter waited"),
    }
}

/// One request through the chain: request hooks in order, response hooks in reverse.
fn run_chain(
    chain: &[Arc<dyn Filter>],
    (mut req, mut resp): (RequestHeader, ResponseHeader),
) -> (RequestHeader, ResponseHeader) {
    let mut state = http::Extensions::new();
    let client_ip = IpAddr::from([198, 51, 100, 7]);
    for f in chain {
        let mut cx = FilterCtx {
            client_ip,
            request_id: "0123456789abcdef0123456789abcdef",
            tls: false,
            route: "api",
            state: &mut state,
        };
        if let Outcome::Respond(r) = ready(f.on_request(&mut req, &mut cx)) {
            panic!("{f:?} answered {}", r.status);
        }
    }
    for f in chain.iter().rev() {
        let mut cx = FilterCtx {
            client_ip,
            request_id: "0123456789abcdef0123456789abcdef",
            tls: false,
            route: "api",
            state: &mut state,
        };
        f.on_response(&mut resp, &mut cx);
    }
    (req, resp)
}

fn chain(c: &mut Criterion) {
    let mut cfg = Config::from_yaml(CONFIG, "bench").unwrap_or_else(|e| panic!("{e}"));
    let route = cfg.routes.remove(0);
    let all: Vec<Arc<dyn Filter>> = cfg.filters.iter().chain(&route.filters).cloned().collect();
    let (_, resp) = run_chain(&all, (request(), response()));
    assert!(resp.headers.get("access-control-allow-origin").is_some());
    assert_eq!(resp.headers["x-route"], "api");
    support::bench_with(
        c,
        "filter_chain/7_filters",
        || (request(), response()),
        |heads| run_chain(&all, heads),
    );
    for f in &all {
        let name = format!("{f:?}");
        let kind = name
            .split([' ', '{', '('])
            .next()
            .unwrap_or("?")
            .to_ascii_lowercase();
        support::bench_with(
            c,
            &format!("filter/{kind}"),
            || (request(), response()),
            |heads| run_chain(std::slice::from_ref(f), heads),
        );
    }
}

fn hygiene(c: &mut Criterion) {
    let forged = || {
        let mut r = request();
        r.append_header("Connection", "keep-alive, X-Hop").unwrap();
        r.append_header("X-Hop", "1").unwrap();
        r.append_header("X-Forwarded-For", "6.6.6.6").unwrap();
        r
    };
    support::bench_with(c, "headers/strip_request", forged, |mut r| {
        headers::strip_request(&mut r);
        r
    });
    support::bench_with(c, "headers/drop_forwarding", forged, |mut r| {
        headers::drop_forwarding(&mut r);
        r
    });
    let r = request();
    support::bench(c, "headers/forwarded_for", || {
        headers::forwarded_for(black_box(&r), false, black_box("198.51.100.7"))
    });
}

/// A typical access log line, formatted into a reused buffer: ours against `serde_json`'s.
fn access_log(c: &mut Criterion) {
    let e = Entry {
        time: "2026-12-01T16:00:00.123Z",
        request_id: "0193a1b2c3d4e5f60718293a4b5c6d7e",
        client: "198.51.100.7",
        method: "GET",
        host: "api.example.com",
        path: "/api/v1/items?page=2",
        status: 200,
        bytes_in: 0,
        bytes_out: 1024,
        route: "api",
        upstream: "u",
        backend: "127.0.0.1:8080",
        attempts: 1,
        retries: 0,
        upstream_ms: Some(0.412),
        total_ms: 0.538,
        unavailable: None,
        cache: None,
        error: None,
    };
    let mut line = Vec::with_capacity(1024);
    support::bench(c, "access_log/json_line", || {
        line.clear();
        format_line(AccessLogFormat::Json, black_box(&e), &mut line);
        line.len()
    });
    support::bench(c, "access_log/json_line_serde_json", || {
        line.clear();
        serde_json::to_writer(&mut line, black_box(&e)).unwrap();
        line.push(b'\n');
        line.len()
    });
}

criterion_group!(benches, chain, hygiene, access_log);
criterion_main!(benches);

//! Allocation counts of the hot paths, asserted: unlike timings they are deterministic.
//!
//! This test binary counts every allocation with an instrumented global allocator
//! (`stats_alloc`; the crate forbids `unsafe`, so it cannot wrap mimalloc itself). Everything is
//! checked in one `#[test]` so no other test allocates while a region is measured. Timings are
//! in `benches/` (docs/performance.md, "Micro-benchmarks").

use std::alloc::System;
use std::sync::atomic::{AtomicUsize, Ordering};

use std::sync::Arc;

use arc_swap::ArcSwap;
use http::Method;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::HttpModules;
use pingora::proxy::{ProxyHttp, Session};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tokio::io::AsyncWriteExt;
use tollgate::Config;
use tollgate::config::Balance;
use tollgate::proxy::{Gateway, headers};
use tollgate::routing::{RouteMatch, Router};
use tollgate::runtime::RuntimeState;
use tollgate::upstream::select;

#[path = "../benches/support/fixtures.rs"]
mod fixtures;

use fixtures::{ALGORITHMS, addrs, upstream};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const OPS: usize = 1000;

/// Rounds of each measurement: the counter is process-wide and the test harness's own threads
/// allocate now and then, so the least of a few rounds is the operation's own count.
const ROUNDS: usize = 3;

/// Allocations made by `OPS` calls of `op` (after one warm-up call).
fn allocations<R>(mut op: impl FnMut() -> R) -> usize {
    drop(op());
    (0..ROUNDS)
        .map(|_| {
            let region = Region::new(GLOBAL);
            for _ in 0..OPS {
                drop(std::hint::black_box(op()));
            }
            region.change().allocations
        })
        .min()
        .unwrap_or(0)
}

/// Allocations per call of `op` on a fresh input from `setup` (not counted).
fn allocations_with<I, R>(mut setup: impl FnMut() -> I, mut op: impl FnMut(I) -> R) -> usize {
    (0..ROUNDS)
        .map(|_| {
            let mut total = 0;
            for _ in 0..OPS {
                let input = setup();
                let region = Region::new(GLOBAL);
                let out = std::hint::black_box(op(input));
                total += region.change().allocations;
                drop(out);
            }
            total / OPS
        })
        .min()
        .unwrap_or(0)
}

fn balancers() {
    for n in [1, 3, 100, 300] {
        let weights: Vec<u32> = (0..n).map(|i| (i % 5) as u32 + 1).collect();
        let load: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        let load = |i: usize| load[i].load(Ordering::Relaxed);
        for (name, balance) in ALGORITHMS {
            let s = select::build(balance, &weights, &addrs(n));
            let keys: Vec<Vec<u8>> = (0..64)
                .map(|k| format!("198.51.100.{k}").into_bytes())
                .collect();
            let mut j = 0;
            let a = allocations(|| {
                j = (j + 1) % keys.len();
                s.select(&keys[j], &load, &|_| true)
            });
            assert_eq!(a, 0, "select/{name}/{n}: {a} allocations in {OPS} picks");
            // Failing over past a refused backend allocates nothing either (the consistent
            // ring's walk keeps its bitmap on the stack up to 256 backends).
            let refuse = s.select(b"k", &load, &|_| true).unwrap();
            let a = allocations(|| s.select(b"k", &load, &|i| i != refuse));
            let bound = if balance == Balance::ConsistentHash && n > 256 {
                OPS
            } else {
                0
            };
            assert!(
                a <= bound,
                "select/{name}/{n} failover: {a} allocations in {OPS} picks"
            );
        }
    }
    for n in [3, 100] {
        for (name, _) in ALGORITHMS {
            let up = upstream(name, n);
            let a = allocations(|| {
                up.pick(b"198.51.100.7", &[], std::time::Instant::now())
                    .map(|p| p.backend.addr)
            });
            assert_eq!(a, 0, "pick/{name}/{n}: {a} allocations in {OPS} picks");
        }
    }
}

fn routing() {
    let mut routes = String::new();
    for i in 0..300 {
        routes.push_str(&format!(
            "  - {{name: h{i}, upstream: u, match: {{hosts: [svc{i}.example.com, '*.t{i}.example.net'], path_prefix: /v1, methods: [GET]}}}}\n\
             \x20 - {{name: e{i}, upstream: u, match: {{path: /exact/{i}}}}}\n\
             \x20 - {{name: p{i}, upstream: u, match: {{path_prefix: /prefix/{i}/}}}}\n"
        ));
    }
    routes.push_str("  - {name: re, upstream: u, match: {path_regex: '^/re/[0-9]+$'}}\n");
    let yaml = format!(
        "listeners: [{{address: 127.0.0.1:1}}]\n\
         upstreams: {{u: {{backends: [{{address: 127.0.0.1:2}}]}}}}\nroutes:\n{routes}"
    );
    let cfg = Config::from_yaml(&yaml, "test").unwrap_or_else(|e| panic!("{e}"));
    let r = Router::new(cfg.routes);
    for (host, path, method) in [
        ("svc7.example.com", "/v1/x", Method::GET),
        ("a.t9.example.net", "/v1", Method::GET),
        ("a.t9.example.net", "/v1", Method::POST),
        ("x.org", "/exact/299", Method::GET),
        ("x.org", "/prefix/299/deep/er", Method::GET),
        ("x.org", "/re/12", Method::GET),
        ("x.org", "/nothing", Method::GET),
    ] {
        let found = r.find(host, path, &method);
        assert_eq!(
            found == RouteMatch::NotFound,
            path == "/nothing",
            "{host}{path}: {found:?}"
        );
        let a = allocations(|| r.find(host, path, &method));
        assert_eq!(
            a, 0,
            "find {method} {host}{path}: {a} allocations in {OPS} lookups"
        );
    }
}

fn header_hygiene() {
    let request = || {
        let mut r = RequestHeader::build("GET", b"/api/orders?id=42", None).unwrap();
        for (k, v) in [
            ("Host", "api.example.com"),
            ("Connection", "keep-alive"),
            ("Keep-Alive", "timeout=5"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("Accept", "*/*"),
        ] {
            r.append_header(k, v).unwrap();
        }
        r
    };
    let strip = |mut r: RequestHeader| {
        headers::strip_request(&mut r);
        headers::drop_forwarding(&mut r);
        r
    };
    assert_eq!(
        allocations_with(request, strip),
        0,
        "strip_request + drop_forwarding"
    );
    let r = request();
    let a = allocations(|| headers::forwarded_for(&r, true, "198.51.100.7"));
    assert_eq!(a, OPS, "forwarded_for: one allocation (the value) per call");
}

/// The gateway's own hooks for one proxied `GET` on bench/realistic.yaml's `app` route (several
/// routes, round robin, breaker, retries, metrics, JSON access log), as `pingora_proxy` calls
/// them: what each hook allocates, the boxed future of Pingora's `async_trait` `ProxyHttp`
/// included. Pingora's own work (parsing, the session, the connection) is outside the counts.
fn gateway_hooks() {
    let dir = tempfile::tempdir().unwrap();
    let yaml =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/bench/realistic.yaml"))
            .unwrap()
            .replace("/tmp/tollgate-realistic", dir.path().to_str().unwrap());
    let config = Config::from_yaml(&yaml, "bench/realistic.yaml").unwrap_or_else(|e| panic!("{e}"));
    let gw = Gateway::new(Arc::new(ArcSwap::from_pointee(RuntimeState::new(config))));
    let mut modules = HttpModules::new();
    gw.init_downstream_modules(&mut modules);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut per_hook = [0usize; HOOKS.len()];
    let rounds: Vec<[usize; HOOKS.len()]> = (0..ROUNDS + 1)
        .map(|_| {
            let mut counts = [0usize; HOOKS.len()];
            for _ in 0..REQUESTS {
                rt.block_on(one_request(&gw, &modules, &mut counts));
            }
            counts
        })
        .collect();
    // The first round warms up (lazily created metric children, the breaker's window).
    for (i, slot) in per_hook.iter_mut().enumerate() {
        *slot = rounds[1..].iter().map(|r| r[i]).min().unwrap_or(0) / REQUESTS;
    }
    let report: Vec<String> = HOOKS
        .iter()
        .zip(per_hook)
        .map(|(h, n)| format!("{h} {n}"))
        .collect();
    eprintln!(
        "allocations per request in the gateway's hooks: {}",
        report.join(", ")
    );
    for (hook, n) in HOOKS.iter().zip(per_hook) {
        let bound = hook_bound(hook);
        assert!(
            n <= bound,
            "{hook}: {n} allocations per request (at most {bound}); all: {report:?}"
        );
    }
}

const REQUESTS: usize = 200;

/// The hooks of a proxied request, in the order Pingora calls them.
const HOOKS: [&str; 10] = [
    "early_request_filter",
    "request_header_module",
    "request_filter",
    "request_cache_filter",
    "upstream_peer",
    "upstream_request_filter",
    "upstream_response_filter",
    "response_filter",
    "response_header_module",
    "logging",
];

/// What each hook may allocate per request, and why it must. Of the 14 allocations, 2 are
/// ours: the request id (shared by the upstream request, the response and the log) and the
/// `X-Forwarded-For` value (the access log line is formatted into a per-thread buffer and
/// appended to the writer's, no allocation). The rest is Pingora's API: the boxed future of each
/// `async_trait` hook (`ProxyHttp`, `HttpModule`), the `Box<HttpPeer>` `upstream_peer` returns,
/// and growing the header map of the request Pingora cloned for the upstream (a clone has no
/// spare room) once for the fields the gateway adds. With `server.preserve_header_case` off
/// (the default, as here) the gateway edits header maps directly on pre-built names: through
/// Pingora's `insert_header` each non-standard name would be built twice (a `HeaderName` from
/// bytes, and its copy for the header-case map) and both maps grown field by field: 16 more.
/// docs/performance.md, "Allocations per request".
fn hook_bound(hook: &str) -> usize {
    match hook {
        // The future; the request id.
        "early_request_filter" => 2,
        // The future.
        "request_header_module" | "response_header_module" => 1,
        "request_filter" | "upstream_response_filter" => 1,
        "request_cache_filter" => 0,
        // The future, `Box<HttpPeer>`.
        "upstream_peer" => 2,
        // The future, the `X-Forwarded-For` value, growing the header map once for the fields
        // added (its index and its entries).
        "upstream_request_filter" => 4,
        // The future (the response's map has room for `X-Request-Id`).
        "response_filter" => 1,
        // The future.
        "logging" => 1,
        _ => 0,
    }
}

/// One request through the hooks, adding each hook's allocations to `counts`.
async fn one_request(gw: &Gateway, modules: &HttpModules, counts: &mut [usize; HOOKS.len()]) {
    let (mut client, server) = tokio::io::duplex(1 << 16);
    client
        .write_all(
            b"GET /index.html HTTP/1.1\r\nHost: bench\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n",
        )
        .await
        .unwrap();
    let mut session = Session::new_h1_with_modules(Box::new(server), modules);
    assert!(session.read_request().await.unwrap());
    let mut ctx = gw.new_ctx();
    let counted = |i: usize, counts: &mut [usize; HOOKS.len()], region: Region<'_, System>| {
        let c = region.change();
        counts[i] += c.allocations + c.reallocations;
    };
    let r = Region::new(GLOBAL);
    gw.early_request_filter(&mut session, &mut ctx)
        .await
        .unwrap();
    counted(0, counts, r);
    let r = Region::new(GLOBAL);
    let req = session.downstream_session.req_header_mut();
    session
        .downstream_modules_ctx
        .request_header_filter(req)
        .await
        .unwrap();
    counted(1, counts, r);
    let r = Region::new(GLOBAL);
    assert!(!gw.request_filter(&mut session, &mut ctx).await.unwrap());
    counted(2, counts, r);
    let r = Region::new(GLOBAL);
    gw.request_cache_filter(&mut session, &mut ctx).unwrap();
    counted(3, counts, r);
    let r = Region::new(GLOBAL);
    let peer = gw.upstream_peer(&mut session, &mut ctx).await.unwrap();
    counted(4, counts, r);
    drop(peer);
    let mut upstream_request = session.req_header().clone();
    let r = Region::new(GLOBAL);
    gw.upstream_request_filter(&mut session, &mut upstream_request, &mut ctx)
        .await
        .unwrap();
    counted(5, counts, r);
    assert!(upstream_request.headers.contains_key("x-forwarded-for"));
    let mut response = ResponseHeader::build(200, Some(4)).unwrap();
    response
        .append_header("Content-Type", "text/plain")
        .unwrap();
    response.append_header("Content-Length", "1024").unwrap();
    let r = Region::new(GLOBAL);
    gw.upstream_response_filter(&mut session, &mut response, &mut ctx)
        .await
        .unwrap();
    counted(6, counts, r);
    let r = Region::new(GLOBAL);
    gw.response_filter(&mut session, &mut response, &mut ctx)
        .await
        .unwrap();
    counted(7, counts, r);
    let r = Region::new(GLOBAL);
    session
        .downstream_modules_ctx
        .response_header_filter(&mut response, false)
        .await
        .unwrap();
    counted(8, counts, r);
    assert!(response.headers.contains_key("x-request-id"));
    let r = Region::new(GLOBAL);
    gw.logging(&mut session, None, &mut ctx).await;
    counted(9, counts, r);
}

#[test]
fn hot_paths_allocate_only_what_they_must() {
    balancers();
    routing();
    header_hygiene();
    gateway_hooks();
}

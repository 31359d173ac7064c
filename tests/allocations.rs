//! Allocation counts of the hot paths, asserted: unlike timings they are deterministic.
//!
//! This test binary counts every allocation with an instrumented global allocator
//! (`stats_alloc`; the crate forbids `unsafe`, so it cannot wrap mimalloc itself). Everything is
//! checked in one `#[test]` so no other test allocates while a region is measured. Timings are
//! in `benches/` (docs/performance.md, "Micro-benchmarks").

use std::alloc::System;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::Method;
use pingora::http::RequestHeader;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tollgate::Config;
use tollgate::config::Balance;
use tollgate::proxy::headers;
use tollgate::routing::{RouteMatch, Router};
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
            let a = allocations(|| up.pick(b"198.51.100.7", &[]).map(|p| p.backend.addr));
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

#[test]
fn hot_paths_allocate_nothing_per_request() {
    balancers();
    routing();
    header_hygiene();
}

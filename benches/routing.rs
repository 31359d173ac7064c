//! Route matching over 1,000 routes: 100 exact hosts (3 routes each), 200 `*.suffix` hosts and
//! 500 host-less routes (250 exact paths, 249 prefixes, 1 catch-all). Each case puts the
//! matching route where the lookup reaches it last within its tier.
//!
//! `cargo bench --bench routing`; allocations per operation are printed before each timing.

mod support;

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use http::Method;
use tollgate::Config;
use tollgate::routing::{RouteMatch, Router, normalize_host, normalize_path};

fn routes_yaml() -> String {
    let mut y = String::new();
    let mut route = |m: String| {
        y.push_str(&format!(
            "  - {{name: r{}, upstream: u, match: {{{m}}}}}\n",
            y.lines().count()
        ));
    };
    for h in 0..100 {
        let host = format!("hosts: [svc{h}.example.com]");
        route(format!("{host}, path: /v1/status, methods: [GET]"));
        route(format!("{host}, path_prefix: /v1, methods: [GET, POST]"));
        route(format!("{host}, path_prefix: /"));
    }
    for w in 0..200 {
        route(format!("hosts: ['*.t{w}.example.net'], path_prefix: /api"));
    }
    for i in 0..250 {
        route(format!("path: /exact/{i}/resource"));
    }
    for i in 0..249 {
        route(format!("path_prefix: /prefix/{i}"));
    }
    y.push_str("  - {name: catch_all, upstream: u}\n");
    y
}

fn router() -> Router {
    let yaml = format!(
        "listeners: [{{address: 127.0.0.1:1}}]\n\
         upstreams: {{u: {{backends: [{{address: 127.0.0.1:2}}]}}}}\n\
         routes:\n{}",
        routes_yaml()
    );
    let cfg = Config::from_yaml(&yaml, "bench").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.routes.len(), 1000);
    Router::new(cfg.routes)
}

/// (bench name, host, path, expected route name)
const CASES: [(&str, &str, &str, &str); 5] = [
    // The exact-host tier: second of its host's three routes.
    ("exact_host", "svc57.example.com", "/v1/users/42", "r172"),
    // The last of 200 wildcard suffixes in lookup order (shortest, then greatest).
    ("wildcard_last", "a.t9.example.net", "/api/orders", "r309"),
    // Host-less tier, after 250 exact paths and 248 longer prefixes.
    ("prefix_last", "www.example.com", "/prefix/9/items", "r759"),
    // Host-less exact path, the last of 250.
    (
        "exact_path_last",
        "www.example.com",
        "/exact/249/resource",
        "r749",
    ),
    // Nothing specific matches: the catch-all, the very last route considered.
    ("catch_all", "www.example.com", "/nothing/here", "catch_all"),
];

fn matching(c: &mut Criterion) {
    let r = router();
    for (name, host, path, want) in CASES {
        match r.find(host, path, &Method::GET) {
            RouteMatch::Found(i) => assert_eq!(r.route(i).name, want, "{name}"),
            other => panic!("{name}: {other:?}"),
        }
        support::bench(c, &format!("route/1000/{name}"), || {
            r.find(black_box(host), black_box(path), &Method::GET)
        });
    }
    // The whole per-request routing step: Host and path normalisation, then the lookup.
    support::bench(c, "route/1000/normalize_and_find", || {
        let host = normalize_host(black_box("svc57.example.com:8080"));
        let path = normalize_path(black_box("/v1/users/42")).ok()?;
        Some(r.find(&host, &path, &Method::GET))
    });
}

criterion_group!(benches, matching);
criterion_main!(benches);

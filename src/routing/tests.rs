use http::Method;

use super::*;
use crate::config::Config;

fn router(routes: &str) -> Router {
    let yaml = format!(
        "listeners: [{{address: 127.0.0.1:1}}]\nupstreams: {{u: {{backends: [{{address: 127.0.0.1:2}}]}}}}\nroutes:\n{routes}"
    );
    let cfg = Config::from_yaml(&yaml, "").unwrap_or_else(|e| panic!("{e}"));
    Router::new(cfg.routes)
}

fn name(r: &Router, host: &str, path: &str, method: Method) -> String {
    match r.find(&normalize_host(host), path, &method) {
        RouteMatch::Found(i) => r.route(i).name.clone(),
        RouteMatch::MethodNotAllowed(i) => format!("405:{}", r.route(i).name),
        RouteMatch::NotFound => "404".into(),
    }
}

#[test]
fn precedence_exact_regex_prefix_any() {
    let r = router(
        "  - {name: any, upstream: u}\n\
         \x20 - {name: short, upstream: u, match: {path_prefix: /a}}\n\
         \x20 - {name: long, upstream: u, match: {path_prefix: /a/b}}\n\
         \x20 - {name: re, upstream: u, match: {path_regex: '^/a/[0-9]+$'}}\n\
         \x20 - {name: exact, upstream: u, match: {path: /a/b}}\n",
    );
    assert_eq!(name(&r, "h", "/a/b", Method::GET), "exact");
    assert_eq!(name(&r, "h", "/a/b/c", Method::GET), "long");
    assert_eq!(name(&r, "h", "/a/7", Method::GET), "re");
    assert_eq!(name(&r, "h", "/a/x", Method::GET), "short");
    assert_eq!(name(&r, "h", "/ab", Method::GET), "any");
}

#[test]
fn methods_and_hosts() {
    let r = router(
        "  - {name: get_only, upstream: u, match: {path: /x, methods: [GET]}}\n\
         \x20 - {name: wild, upstream: u, match: {hosts: ['*.example.com']}}\n\
         \x20 - {name: deep, upstream: u, match: {hosts: ['*.api.example.com']}}\n\
         \x20 - {name: exact, upstream: u, match: {hosts: [www.example.com], methods: [POST]}}\n",
    );
    assert_eq!(name(&r, "h", "/x", Method::GET), "get_only");
    assert_eq!(name(&r, "h", "/x", Method::POST), "405:get_only");
    assert_eq!(name(&r, "h", "/y", Method::GET), "404");
    assert_eq!(name(&r, "a.example.com", "/y", Method::GET), "wild");
    assert_eq!(name(&r, "v1.api.example.com", "/y", Method::GET), "deep");
    assert_eq!(name(&r, "WWW.example.com:80", "/y", Method::POST), "exact");
    // The exact-host route refuses GET, so the wildcard takes it.
    assert_eq!(name(&r, "www.example.com", "/y", Method::GET), "wild");
    assert_eq!(name(&r, "example.com", "/y", Method::GET), "404");
}

#[test]
fn method_specific_route_wins_a_tie() {
    let r = router(
        "  - {name: any_method, upstream: u, match: {path_prefix: /p}}\n\
         \x20 - {name: posts, upstream: u, match: {path_prefix: /p, methods: [POST]}}\n",
    );
    assert_eq!(name(&r, "h", "/p", Method::POST), "posts");
    assert_eq!(name(&r, "h", "/p", Method::GET), "any_method");
}

#[test]
fn prefix_segment_boundaries() {
    let p = PathMatch::Prefix("/api".into());
    assert!(path_matches(&p, "/api"));
    assert!(path_matches(&p, "/api/"));
    assert!(path_matches(&p, "/api/x"));
    assert!(!path_matches(&p, "/apix"));
    let slash = PathMatch::Prefix("/api/".into());
    assert!(path_matches(&slash, "/api/x"));
    assert!(!path_matches(&slash, "/api"));
}

#[test]
fn host_normalisation() {
    assert_eq!(normalize_host("API.Example.COM.:8443"), "api.example.com");
    assert_eq!(normalize_host("[::1]:80"), "[::1]");
    assert_eq!(normalize_host("plain"), "plain");
    assert!(matches!(
        normalize_host("plain"),
        std::borrow::Cow::Borrowed(_)
    ));
}

#[test]
fn strip_and_rewrite() {
    let r = router(
        "  - {name: s, upstream: u, match: {path_prefix: /api/}, strip_prefix: true}\n\
         \x20 - {name: rw, upstream: u, match: {path_prefix: /v1}, strip_prefix: true,\n\
         \x20     rewrite: {regex: '^/users/(?P<id>[0-9]+)$', replace: '/people/${id}'}}\n\
         \x20 - {name: plain, upstream: u, match: {path: /same}}\n",
    );
    let fwd = |i: usize, path: &str, q: Option<&str>| forwarded_path(r.route(i), path, q);
    assert_eq!(fwd(0, "/api/x/y", Some("a=1")).as_deref(), Some("/x/y?a=1"));
    assert_eq!(fwd(0, "/api/", None).as_deref(), Some("/"));
    assert_eq!(
        fwd(1, "/v1/users/9", Some("z")).as_deref(),
        Some("/people/9?z")
    );
    assert_eq!(fwd(1, "/v1/other", None).as_deref(), Some("/other"));
    assert_eq!(fwd(1, "/v1", None).as_deref(), Some("/"));
    assert_eq!(
        fwd(2, "/same", Some("q=1")),
        None,
        "unchanged paths are not rebuilt"
    );
}

#[test]
fn dot_segments_in_a_rewritten_path_are_found() {
    for p in [
        "/static/../admin",
        "/a/./b",
        "/..",
        "/a/..?q=1",
        "/.",
        "/%2e%2E/a",
        "/.%2e",
        "/static/..;/admin",
        "/a/.;x/b",
    ] {
        assert!(has_dot_segment(p), "{p}");
    }
    for p in [
        "/static/..x/a",
        "/a.b/c",
        "/...",
        "/a?q=/../",
        "/%2e%2ex",
        "/",
    ] {
        assert!(!has_dot_segment(p), "{p}");
    }
}

/// The matcher before the tables were indexed: every route of a tier scanned in specificity
/// order. The indexed `Router::find` must agree with it on every request.
fn linear_find(routes: &[RouteConfig], host: &str, path: &str, method: &Method) -> RouteMatch {
    let ordered = |pred: &dyn Fn(&RouteConfig) -> bool| {
        let mut v: Vec<usize> = (0..routes.len()).filter(|&i| pred(&routes[i])).collect();
        v.sort_by_key(|&i| specificity(&routes[i], i));
        v
    };
    let exact = ordered(&|r| {
        r.hosts
            .iter()
            .any(|h| *h == HostPattern::Exact(host.into()))
    });
    let mut suffixes: Vec<&str> = routes
        .iter()
        .flat_map(|r| &r.hosts)
        .filter_map(|h| match h {
            HostPattern::Suffix(s) if host.len() > s.len() && host.ends_with(s.as_str()) => {
                Some(s.as_str())
            }
            _ => None,
        })
        .collect();
    suffixes.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    suffixes.dedup();
    let mut tiers = vec![exact];
    for s in suffixes {
        tiers.push(ordered(&|r| {
            r.hosts.iter().any(|h| *h == HostPattern::Suffix(s.into()))
        }));
    }
    tiers.push(ordered(&|r| r.hosts.is_empty()));
    let mut method_miss = None;
    for tier in tiers {
        for i in tier {
            let r = &routes[i];
            if !path_matches(&r.path, path) {
                continue;
            }
            if r.methods.is_empty() || r.methods.contains(method) {
                return RouteMatch::Found(i);
            }
            method_miss.get_or_insert(i);
        }
    }
    method_miss.map_or(RouteMatch::NotFound, RouteMatch::MethodNotAllowed)
}

#[test]
fn indexed_tables_agree_with_a_linear_scan() {
    use rand::{Rng, SeedableRng, seq::SliceRandom};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let hosts = ["a.example.com", "b.a.example.com", "example.com", "x.org"];
    let host_rules = [
        "a.example.com",
        "'*.example.com'",
        "'*.a.example.com'",
        "x.org",
    ];
    let paths = [
        "/", "/a", "/a/", "/a/b", "/a/b/", "/a/b/c", "/ab", "/a/bc", "/b", "/b/a", "*",
    ];
    let methods = [Method::GET, Method::POST, Method::DELETE];
    for round in 0..40 {
        let mut yaml = String::new();
        // Validation refuses a route that another one shadows exactly: no duplicates.
        let mut seen = std::collections::HashSet::new();
        for k in 0..rng.gen_range(1..25) {
            let mut m = Vec::new();
            if rng.gen_bool(0.5) {
                let n = rng.gen_range(1..3);
                let mut hs: Vec<&str> = host_rules.choose_multiple(&mut rng, n).copied().collect();
                hs.sort();
                m.push(format!("hosts: [{}]", hs.join(", ")));
            }
            let p = paths[rng.gen_range(0..paths.len() - 1)];
            match rng.gen_range(0..4) {
                0 => m.push(format!("path: {p}")),
                1 => m.push(format!("path_prefix: {p}")),
                2 => m.push(format!("path_regex: '^{p}[a-z]*$'")),
                _ => {}
            }
            if rng.gen_bool(0.4) {
                m.push(["methods: [GET]", "methods: [POST, DELETE]"][rng.gen_range(0..2)].into());
            }
            let m = m.join(", ");
            if seen.insert(m.clone()) {
                yaml.push_str(&format!(
                    "  - {{name: r{k}, upstream: u, match: {{{m}}}}}\n"
                ));
            }
        }
        let r = router(&yaml);
        for host in hosts {
            for path in paths {
                for method in &methods {
                    assert_eq!(
                        r.find(host, path, method),
                        linear_find(r.routes(), host, path, method),
                        "round {round}: {method} {host}{path} with routes\n{yaml}"
                    );
                }
            }
        }
    }
}

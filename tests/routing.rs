//! Routing through the real gateway: precedence, wildcard hosts, methods, strip/rewrite,
//! Host handling and the 404/405 JSON errors.

mod common;

use common::{TestGateway, Upstream, client, error_json};

/// Six upstreams, one per route, so the receiving upstream names the route that matched.
struct Fixture {
    gw: TestGateway,
    ups: Vec<Upstream>,
}

async fn fixture() -> Fixture {
    let mut ups = Vec::new();
    for _ in 0..7 {
        ups.push(Upstream::start().await);
    }
    let mut yaml = String::from("upstreams:\n");
    for (i, u) in ups.iter().enumerate() {
        yaml.push_str(&format!(
            "  u{i}: {{ backends: [{{ address: \"{}\" }}] }}\n",
            u.addr
        ));
    }
    yaml.push_str(
        r#"routes:
  - { name: catch_all, upstream: u0 }
  - { name: api_prefix, upstream: u1, match: { path_prefix: /api } }
  - { name: api_v2_prefix, upstream: u2, match: { path_prefix: /api/v2 }, strip_prefix: true }
  - { name: api_exact, upstream: u3, match: { path: /api/status } }
  - { name: users_regex, upstream: u4, match: { path_regex: "^/api/users/[0-9]+$" },
      rewrite: { regex: "^/api/users/([0-9]+)$", replace: "/people/$1" } }
  - { name: exact_host, upstream: u5, match: { hosts: [shop.example.com], methods: [GET, HEAD] },
      upstream_host: shop.internal }
  - { name: wildcard_host, upstream: u6, match: { hosts: ["*.example.com"], path_prefix: /api } }
  - { name: static_dash, upstream: u0, match: { path_regex: "^/static-" },
      rewrite: { regex: "^/static-(.*)$", replace: "/static/$1" } }
"#,
    );
    let gw = TestGateway::start(&yaml);
    Fixture { gw, ups }
}

impl Fixture {
    /// GET with an optional Host; which upstream got it, and the path it saw.
    async fn hit(
        &self,
        method: &str,
        host: Option<&str>,
        path: &str,
    ) -> (Option<usize>, String, u16) {
        let before: Vec<usize> = self.ups.iter().map(|u| u.count()).collect();
        let mut req = client().request(method.parse().unwrap(), self.gw.url(path));
        if let Some(h) = host {
            req = req.header("host", h);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        resp.bytes().await.unwrap();
        let hit = self
            .ups
            .iter()
            .enumerate()
            .position(|(i, u)| u.count() > before[i]);
        let path = hit.map(|i| self.ups[i].last().path).unwrap_or_default();
        (hit, path, status)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn most_specific_path_wins() {
    let f = fixture().await;
    assert_eq!(f.hit("GET", None, "/").await.0, Some(0));
    assert_eq!(f.hit("GET", None, "/other").await.0, Some(0));
    assert_eq!(f.hit("GET", None, "/api").await.0, Some(1));
    assert_eq!(f.hit("GET", None, "/api/x").await.0, Some(1));
    // Prefixes match on segment boundaries.
    assert_eq!(f.hit("GET", None, "/apix").await.0, Some(0));
    // Longest prefix wins, and strip_prefix removes it.
    assert_eq!(
        f.hit("GET", None, "/api/v2/items?a=1").await,
        (Some(2), "/items?a=1".into(), 200)
    );
    assert_eq!(
        f.hit("GET", None, "/api/v2").await,
        (Some(2), "/".into(), 200)
    );
    // Exact beats every prefix; regex beats prefixes.
    assert_eq!(f.hit("GET", None, "/api/status").await.0, Some(3));
    assert_eq!(f.hit("GET", None, "/api/status/more").await.0, Some(1));
    assert_eq!(
        f.hit("GET", None, "/api/users/42?x=y").await,
        (Some(4), "/people/42?x=y".into(), 200)
    );
    assert_eq!(f.hit("GET", None, "/api/users/abc").await.0, Some(1));
    // A rewrite that builds a dot segment out of the client's path is refused: the backend
    // would resolve `/static/../admin` to `/admin`.
    assert_eq!(
        f.hit("GET", None, "/static-css/a.css").await,
        (Some(0), "/static/css/a.css".into(), 200)
    );
    for path in [
        "/static-%2e%2e/admin",
        "/static-../admin",
        "/static-%2E/x",
        "/static-..;/admin",
    ] {
        assert_eq!(
            f.hit("GET", None, path).await,
            (None, String::new(), 400),
            "{path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_exact_then_wildcard_then_any() {
    let f = fixture().await;
    // Exact host dominates path specificity of host-less routes.
    assert_eq!(
        f.hit("GET", Some("shop.example.com"), "/api/status")
            .await
            .0,
        Some(5)
    );
    // Case, port and trailing dot do not matter.
    assert_eq!(
        f.hit("GET", Some("SHOP.Example.com.:8080"), "/").await.0,
        Some(5)
    );
    // Wildcards match any depth below the suffix, but not the bare domain.
    assert_eq!(
        f.hit("GET", Some("a.example.com"), "/api/x").await.0,
        Some(6)
    );
    assert_eq!(
        f.hit("GET", Some("a.b.example.com"), "/api/x").await.0,
        Some(6)
    );
    assert_eq!(f.hit("GET", Some("example.com"), "/api/x").await.0, Some(1));
    // A wildcard route whose path does not match falls through to host-less routes.
    assert_eq!(
        f.hit("GET", Some("a.example.com"), "/other").await.0,
        Some(0)
    );
    // The Host header is preserved by default and overridden per route.
    f.hit("GET", Some("a.example.com"), "/api/x").await;
    assert_eq!(f.ups[6].last().header("host"), Some("a.example.com"));
    f.hit("GET", Some("shop.example.com"), "/").await;
    assert_eq!(f.ups[5].last().header("host"), Some("shop.internal"));
    assert_eq!(
        f.ups[5].last().header("x-forwarded-host"),
        Some("shop.example.com")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_narrow_a_route_and_405_lists_allowed() {
    let f = fixture().await;
    assert_eq!(
        f.hit("HEAD", Some("shop.example.com"), "/").await.0,
        Some(5)
    );
    // POST to the GET/HEAD-only host route falls through to the catch-all...
    assert_eq!(
        f.hit("POST", Some("shop.example.com"), "/").await.0,
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_is_404_json_and_wrong_method_is_405() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&format!(
        "upstreams: {{ u: {{ backends: [{{ address: \"{}\" }}] }} }}\nroutes:\n  - {{ name: only, upstream: u, match: {{ path_prefix: /only, methods: [GET] }} }}\n",
        up.addr
    ));
    let resp = client().get(gw.url("/elsewhere")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let body = error_json(&resp.text().await.unwrap());
    assert_eq!(body["error"], "no route matches this request");
    assert_eq!(body["request_id"], id.as_str());

    let resp = client().delete(gw.url("/only/x")).send().await.unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "GET");
    assert_eq!(
        error_json(&resp.text().await.unwrap())["error"],
        "method not allowed on this route"
    );
    assert_eq!(up.count(), 0, "nothing may reach the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_target_must_agree_with_host_and_is_forwarded_origin_form() {
    let f = fixture().await;
    let t = std::time::Duration::from_secs(5);
    let raw = common::raw_exchange(
        f.gw.addr,
        b"GET http://shop.example.com/x?q=1 HTTP/1.1\r\nHost: shop.example.com\r\nConnection: close\r\n\r\n",
        t,
    );
    assert!(
        raw.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    assert_eq!(f.ups[5].count(), 1);
    assert_eq!(
        f.ups[5].last().path,
        "/x?q=1",
        "the upstream gets origin-form"
    );
    // A target naming another host than Host is ambiguous: refused, nothing forwarded.
    let raw = common::raw_exchange(
        f.gw.addr,
        b"GET http://shop.example.com/x HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n",
        t,
    );
    assert!(
        raw.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    let total: usize = f.ups.iter().map(|u| u.count()).sum();
    assert_eq!(total, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_normalised_before_routing_and_cannot_escape_a_stripped_prefix() {
    let f = fixture().await;
    // `/api/v2/../../x` is `/x`: the catch-all, not the /api/v2 route with `/../../x` forwarded.
    assert_eq!(
        f.hit("GET", None, "/api/v2/%2e%2e/%2E%2E/x").await,
        (Some(0), "/x".into(), 200)
    );
    assert_eq!(
        f.hit("GET", None, "/api/v2/../status").await,
        (Some(3), "/api/status".into(), 200)
    );
    assert_eq!(
        f.hit("GET", None, "//api//v2//items/./a").await,
        (Some(2), "/items/a".into(), 200)
    );
    for bad in ["/api/a%2fb", "/api/a%5cb", "/api/%00", "/api/%zz"] {
        let raw = common::raw_exchange(
            f.gw.addr,
            format!("GET {bad} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
            std::time::Duration::from_secs(5),
        );
        let text = String::from_utf8_lossy(&raw);
        assert!(text.starts_with("HTTP/1.1 400"), "{bad}: {text}");
        assert!(text.contains("\"request_id\""), "{text}");
    }
    let total: usize = f.ups.iter().map(|u| u.count()).sum();
    assert_eq!(total, 3, "refused paths never reach an upstream");
}

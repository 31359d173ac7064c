//! Built-in filters and a custom one, through the real gateway.

mod common;

use std::time::Duration;

use common::{GatewayConfig, TestGateway, Upstream, client, error_json, raw_exchange};

fn with_filters(up: &Upstream, route_filters: &str, global: &str) -> TestGateway {
    TestGateway::start(&format!(
        "{global}upstreams: {{ u: {{ backends: [{{ address: \"{}\" }}] }} }}\nroutes:\n  - name: api\n    upstream: u\n    filters:\n{route_filters}",
        up.addr
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_simple_requests_and_vary() {
    let up = Upstream::start().await;
    let gw = with_filters(
        &up,
        "      - { kind: cors, allow_origins: [\"https://app.example.com\", \"https://*.example.org\"], allow_methods: [GET, PUT], allow_headers: [Authorization], allow_credentials: true, max_age: 5m }\n",
        "",
    );
    let c = client();
    let pre = c
        .request(reqwest::Method::OPTIONS, gw.url("/x"))
        .header("origin", "https://a.example.org")
        .header("access-control-request-method", "PUT")
        .send()
        .await
        .unwrap();
    assert_eq!(pre.status(), 204);
    let h = pre.headers();
    assert_eq!(h["access-control-allow-origin"], "https://a.example.org");
    assert_eq!(h["access-control-allow-methods"], "GET, PUT");
    assert_eq!(h["access-control-allow-headers"], "Authorization");
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["access-control-max-age"], "300");
    assert_eq!(h["vary"], "Origin");
    assert_eq!(up.count(), 0, "the gateway answers preflights itself");

    let bad = c
        .request(reqwest::Method::OPTIONS, gw.url("/x"))
        .header("origin", "https://evil.test")
        .header("access-control-request-method", "PUT")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 403);

    let ok = c
        .get(gw.url("/x"))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(ok.headers()["vary"], "Origin");
    let other = c
        .get(gw.url("/x"))
        .header("origin", "https://evil.test")
        .send()
        .await
        .unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
    assert_eq!(other.headers()["vary"], "Origin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_cors_policy_replaces_the_upstreams() {
    // A backend that allows every origin, with credentials, behind a route that allows one.
    let up = Upstream::with(common::Behavior {
        headers: vec![
            "Access-Control-Allow-Origin: *".into(),
            "Access-Control-Allow-Credentials: true".into(),
            "Access-Control-Expose-Headers: X-Secret".into(),
        ],
        ..Default::default()
    })
    .await;
    let gw = with_filters(
        &up,
        "      - { kind: cors, allow_origins: [\"https://app.example.com\"] }\n",
        "",
    );
    let c = client();
    for origin in [Some("https://evil.test"), None] {
        let mut r = c.get(gw.url("/x"));
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        let h = r.send().await.unwrap().headers().clone();
        for f in [
            "access-control-allow-origin",
            "access-control-allow-credentials",
            "access-control-expose-headers",
        ] {
            assert!(
                h.get(f).is_none(),
                "{origin:?}: the upstream's {f} passed: {h:?}"
            );
        }
    }
    let h = c
        .get(gw.url("/x"))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap()
        .headers()
        .clone();
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    assert!(h.get("access-control-allow-credentials").is_none(), "{h:?}");
    assert!(h.get("access-control-expose-headers").is_none(), "{h:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_headers_defaults_and_overrides() {
    let up = Upstream::start().await;
    let gw = with_filters(
        &up,
        "      - { kind: security_headers, frame_options: SAMEORIGIN, referrer_policy: \"\", content_security_policy: \"default-src 'self'\" }\n",
        "",
    );
    let r = client().get(gw.url("/")).send().await.unwrap();
    let h = r.headers();
    assert_eq!(
        h["strict-transport-security"],
        "max-age=31536000; includeSubDomains"
    );
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["x-frame-options"], "SAMEORIGIN");
    assert!(
        h.get("referrer-policy").is_none(),
        "an empty value turns a header off"
    );
    assert_eq!(h["content-security-policy"], "default-src 'self'");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_with_substitutions() {
    let up = Upstream::start().await;
    let gw = with_filters(
        &up,
        "      - kind: headers\n        request: { set: { X-Client: \"${client_ip}\", X-Trace: \"${request_id}/${route}\" }, add: { X-Tag: two }, remove: [X-Debug] }\n        response: { set: { X-Route: \"${route}\", X-Served-By: tollgate }, remove: [Server] }\n",
        "",
    );
    let r = client()
        .get(gw.url("/p"))
        .header("x-debug", "1")
        .header("x-tag", "one")
        .send()
        .await
        .unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(r.headers()["x-route"], "api");
    assert_eq!(r.headers()["x-served-by"], "tollgate");
    let seen = up.last();
    assert_eq!(seen.header("x-client"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-trace"), Some(format!("{id}/api").as_str()));
    assert_eq!(seen.header_all("x-tag"), ["one", "two"]);
    assert_eq!(seen.header("x-debug"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_answer_413_431_405_403() {
    let up = Upstream::start().await;
    let gw = with_filters(
        &up,
        "      - { kind: limits, max_body_size: 1KiB, max_header_count: 20, methods: [GET, POST] }\n",
        "",
    );
    let c = client();
    // Content-Length says too much: refused before anything is sent upstream.
    let r = c
        .post(gw.url("/"))
        .body(vec![0u8; 2000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(
        error_json(&r.text().await.unwrap())["error"],
        "request body too large"
    );
    assert_eq!(up.count(), 0);
    // A chunked body is stopped once the running total passes the limit.
    let chunks =
        futures_util::stream::iter((0..4).map(|_| Ok::<_, std::io::Error>(vec![b'x'; 600])));
    let r = c
        .post(gw.url("/"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let r = c
        .post(gw.url("/"))
        .body(vec![0u8; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut many = String::from("GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n");
    for i in 0..25 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let raw = raw_exchange(gw.addr, many.as_bytes(), Duration::from_secs(5));
    assert!(
        raw.starts_with(b"HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    let r = c.delete(gw.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "GET, POST");

    let deny = with_filters(
        &up,
        "      - { kind: limits, deny_cidrs: [127.0.0.0/8] }\n",
        "",
    );
    assert_eq!(c.get(deny.url("/")).send().await.unwrap().status(), 403);
    let allow = with_filters(
        &up,
        "      - { kind: limits, allow_cidrs: [10.0.0.0/8] }\n",
        "",
    );
    assert_eq!(c.get(allow.url("/")).send().await.unwrap().status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_redirect_applies_to_every_request() {
    let up = Upstream::start().await;
    let gw = with_filters(
        &up,
        "      - { kind: security_headers }\n",
        "filters:\n  - { kind: redirect, to: \"https://${host}${path}\", status: 301 }\n",
    );
    let c = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for path in ["/a/b?c=1", "/no/route/needed"] {
        let r = c
            .get(gw.url(path))
            .header("host", "shop.example.com:8080")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 301);
        assert_eq!(
            r.headers()["location"],
            format!("https://shop.example.com{path}").as_str()
        );
    }
    assert_eq!(up.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracing_propagates_or_creates_traceparent() {
    let up = Upstream::start().await;
    let gw = with_filters(&up, "      - { kind: tracing, echo: true }\n", "");
    let c = client();
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = c
        .get(gw.url("/"))
        .header("traceparent", tp)
        .header("tracestate", "k=v")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["traceparent"], tp);
    assert_eq!(up.last().header("traceparent"), Some(tp));
    assert_eq!(up.last().header("tracestate"), Some("k=v"));
    let r = c
        .get(gw.url("/"))
        .header("traceparent", "junk")
        .header("tracestate", "k=v")
        .send()
        .await
        .unwrap();
    let created = r.headers()["traceparent"].to_str().unwrap().to_string();
    assert!(
        created.starts_with("00-") && created.len() == 55,
        "{created}"
    );
    assert_eq!(up.last().header("traceparent"), Some(created.as_str()));
    assert_eq!(
        up.last().header("tracestate"),
        None,
        "tracestate without a valid parent is dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_filter_registered_by_a_library_user() {
    let up = Upstream::start().await;
    let gw = GatewayConfig::new(format!(
        "upstreams: {{ u: {{ backends: [{{ address: \"{}\" }}] }} }}\nroutes:\n  - name: shop\n    upstream: u\n    filters:\n      - {{ kind: ab_split, user_header: X-User, percent_b: 50 }}\n",
        up.addr
    ))
    .program(common::example("custom_filter"))
    .start();
    let c = client();
    let mut seen = std::collections::HashMap::new();
    for user in 0..40 {
        let mut first = None;
        for _ in 0..2 {
            let r = c
                .get(gw.url("/"))
                .header("x-user", format!("user-{user}"))
                .send()
                .await
                .unwrap();
            let v = r.headers()["x-variant"].to_str().unwrap().to_string();
            assert_eq!(up.last().header("x-variant"), Some(v.as_str()));
            assert!(
                first.is_none() || first.as_deref() == Some(v.as_str()),
                "variant not sticky"
            );
            first = Some(v);
        }
        *seen.entry(first.unwrap()).or_insert(0) += 1;
    }
    assert!(
        seen.get("a").is_some_and(|&n| n > 5) && seen.get("b").is_some_and(|&n| n > 5),
        "{seen:?}"
    );
    let r = c.get(gw.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 400);
    // The stock binary does not know the kind: a located configuration error.
    let (code, _, err) = common::check_config(&gw.config_path());
    assert_eq!(code, 64);
    assert!(
        err.contains("routes[0].filters[0] (ab_split): unknown filter kind \"ab_split\""),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_answers_429_with_retry_after_and_counts_it() {
    let up = Upstream::start().await;
    let gw = with_filters(
        &up,
        "      - { kind: rate_limit, key: \"header:X-User\", rate: 2/s, burst: 2 }\n",
        "",
    );
    let c = client();
    let send = |user: &'static str| c.get(gw.url("/")).header("x-user", user).send();
    for remaining in [2, 1, 0] {
        let r = send("alice").await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["ratelimit-policy"], "\"default\";q=3;w=1");
        assert_eq!(
            r.headers()["ratelimit"],
            format!("\"default\";r={remaining};t=1").as_str()
        );
    }
    let r = send("alice").await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(r.headers()["ratelimit"], "\"default\";r=0;t=1");
    assert_eq!(
        error_json(&r.text().await.unwrap())["error"],
        "too many requests"
    );
    assert_eq!(
        send("bob").await.unwrap().status(),
        200,
        "keys are independent"
    );
    assert_eq!(up.count(), 4);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        send("alice").await.unwrap().status(),
        200,
        "the rate refills"
    );
    let m = gw.metrics().await;
    assert_eq!(
        common::metric(&m, "tollgate_rate_limited_total{route=\"api\"}"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_answers_503_and_frees_slots() {
    let up = Upstream::with(common::Behavior {
        delay: Duration::from_millis(600),
        ..Default::default()
    })
    .await;
    let gw = with_filters(&up, "      - { kind: concurrency, max: 1 }\n", "");
    let s = common::statuses(&gw.url("/"), 3, 3).await;
    assert_eq!(s.iter().filter(|&&x| x == 200).count(), 1, "{s:?}");
    assert_eq!(s.iter().filter(|&&x| x == 503).count(), 2, "{s:?}");
    assert_eq!(
        client().get(gw.url("/")).send().await.unwrap().status(),
        200,
        "the slot was released"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_in_header_or_query_never_reach_the_upstream() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "# team keys\nfile-key-0001\n\n").unwrap();
    let gw = with_filters(
        &up,
        &format!(
            "      - {{ kind: auth, api_keys: [conf-key-0001], api_keys_file: \"{}\", query: api_key }}\n",
            keys.display()
        ),
        "",
    );
    let c = client();
    let r = c.get(gw.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "ApiKey realm=\"tollgate\"");
    assert_eq!(
        c.get(gw.url("/"))
            .header("x-api-key", "wrong-key-01")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(up.count(), 0);
    assert_eq!(
        c.get(gw.url("/"))
            .header("x-api-key", "conf-key-0001")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        up.last().header("x-api-key"),
        None,
        "the credential was forwarded"
    );
    assert_eq!(
        c.get(gw.url("/p?a=1&api_key=file-key-0001&b=2"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        up.last().path,
        "/p?a=1&b=2",
        "the query credential was forwarded"
    );
    // Also when the header carried the key checked, and `?api_key` without a value.
    let r = c
        .get(gw.url("/p?api_key=other&b=2&api_key"))
        .header("x-api-key", "conf-key-0001")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        up.last().path,
        "/p?b=2",
        "the query credential was forwarded"
    );
    // And on a route that rewrites the path (the query sent is the one the filter left).
    let strip = TestGateway::start(&format!(
        "upstreams: {{ u: {{ backends: [{{ address: \"{}\" }}] }} }}\nroutes:\n  - name: api\n    match: {{ path_prefix: /api }}\n    strip_prefix: true\n    upstream: u\n    filters:\n      - {{ kind: auth, api_keys: [conf-key-0001], query: api_key }}\n",
        up.addr
    ));
    let r = c
        .get(strip.url("/api/p?a=1&api_key=conf-key-0001&b=2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", strip.log());
    assert_eq!(
        up.last().path,
        "/p?a=1&b=2",
        "the query credential was forwarded past strip_prefix"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_cors_filter_does_not_act_on_a_global_filters_approval() {
    let up = Upstream::start().await;
    let gw = with_filters(
        &up,
        "      - { kind: cors, allow_origins: [\"https://app.example.com\"], allow_credentials: true }\n",
        "filters:\n  - { kind: cors, allow_origins: [\"https://partner.test\"] }\n",
    );
    let r = client()
        .get(gw.url("/"))
        .header("origin", "https://partner.test")
        .send()
        .await
        .unwrap();
    // Only the global filter allowed it: its answer, without the route filter's credentials.
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://partner.test"
    );
    assert!(
        r.headers()
            .get("access-control-allow-credentials")
            .is_none(),
        "{:?}",
        r.headers()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_by_type_size_and_accept_encoding() {
    use std::io::Read;
    let text: Vec<u8> = "tollgate compresses text. ".repeat(200).into_bytes();
    let up = Upstream::with(common::Behavior {
        body: text.clone(),
        headers: vec!["Content-Type: text/plain; charset=utf-8".into()],
        ..Default::default()
    })
    .await;
    let gw = with_filters(
        &up,
        "      - { kind: compression, algorithms: [gzip, br], min_size: 1KiB }\n",
        "",
    );
    let c = client();
    let r = c
        .get(gw.url("/"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-encoding"], "gzip");
    assert!(
        r.headers()["vary"]
            .to_str()
            .unwrap()
            .to_ascii_lowercase()
            .contains("accept-encoding")
    );
    let compressed = r.bytes().await.unwrap();
    assert!(
        compressed.len() < text.len() / 4,
        "{} bytes",
        compressed.len()
    );
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(&compressed[..])
        .read_to_end(&mut plain)
        .unwrap();
    assert_eq!(plain, text, "the decompressed body differs");
    let r = c
        .get(gw.url("/"))
        .header("accept-encoding", "br")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-encoding"], "br");
    let mut plain = Vec::new();
    let brbody = r.bytes().await.unwrap();
    brotli::Decompressor::new(&brbody[..], 4096)
        .read_to_end(&mut plain)
        .unwrap();
    assert_eq!(plain, text, "the brotli body differs");
    let r = c
        .get(gw.url("/"))
        .header("accept-encoding", "zstd")
        .send()
        .await
        .unwrap();
    assert!(
        r.headers().get("content-encoding").is_none(),
        "zstd is not in this route's list"
    );
    assert_eq!(r.bytes().await.unwrap(), text);
    // The whole list is negotiated, with q-values, not just its first entry.
    for (accept, want) in [
        ("zstd, br;q=0.9, gzip;q=0.8", Some("br")),
        ("gzip;q=0, br", Some("br")),
        ("gzip;q=0, zstd", None),
        ("identity", None),
    ] {
        let r = c
            .get(gw.url("/"))
            .header("accept-encoding", accept)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.headers()
                .get("content-encoding")
                .map(|v| v.to_str().unwrap()),
            want,
            "{accept}"
        );
    }
    let zstd_gw = with_filters(
        &up,
        "      - { kind: compression, algorithms: [zstd] }\n",
        "",
    );
    let r = c
        .get(zstd_gw.url("/"))
        .header("accept-encoding", "gzip, deflate, br, zstd")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-encoding"], "zstd");
    let compressed = r.bytes().await.unwrap();
    assert!(compressed.len() < text.len() / 4);
    assert_eq!(
        zstd::decode_all(&compressed[..]).unwrap(),
        text,
        "the zstd body differs"
    );
    let r = c.get(gw.url("/")).send().await.unwrap();
    assert!(
        r.headers().get("content-encoding").is_none(),
        "no Accept-Encoding, no compression"
    );

    // Too small, or not a listed type: passed through untouched.
    up.set(common::Behavior {
        body: b"short text".to_vec(),
        headers: vec!["Content-Type: text/plain".into()],
        ..Default::default()
    });
    let r = c
        .get(gw.url("/"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("content-encoding").is_none());
    up.set(common::Behavior {
        body: vec![7u8; 5000],
        headers: vec!["Content-Type: image/png".into()],
        ..Default::default()
    });
    let r = c
        .get(gw.url("/"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("content-encoding").is_none());
    assert_eq!(r.bytes().await.unwrap().len(), 5000);
    // A part of a body (206), a response that forbids transforms, and an error page other
    // than 403/404: passed through untouched, as nginx does (a compressed part would not
    // fit its Content-Range).
    let long_text = "tollgate compresses text. ".repeat(200).into_bytes();
    let gzip_get = || c.get(gw.url("/")).header("accept-encoding", "gzip").send();
    for (status, extra, what) in [
        (206, "Content-Range: bytes 0-5199/10400", "a 206 part"),
        (200, "Cache-Control: public, no-transform", "no-transform"),
        (500, "X-Other: 1", "a 500"),
    ] {
        up.set(common::Behavior {
            status,
            body: long_text.clone(),
            headers: vec!["Content-Type: text/plain".into(), extra.into()],
            ..Default::default()
        });
        let r = gzip_get().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{what}");
        assert!(
            r.headers().get("content-encoding").is_none(),
            "{what} was compressed"
        );
        assert_eq!(r.bytes().await.unwrap(), long_text, "{what}");
    }
    up.set(common::Behavior {
        status: 404,
        body: long_text.clone(),
        headers: vec!["Content-Type: text/html".into()],
        ..Default::default()
    });
    let r = gzip_get().await.unwrap();
    assert_eq!(r.headers()["content-encoding"], "gzip", "a 404 page");
    // Already encoded by the backend: never compressed twice.
    let pre: Vec<u8> = vec![
        31, 139, 8, 0, 0, 0, 0, 0, 0, 3, 1, 0, 0, 255, 255, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    up.set(common::Behavior {
        body: [pre.clone(), vec![b' '; 2000]].concat(),
        headers: vec![
            "Content-Type: text/plain".into(),
            "Content-Encoding: gzip".into(),
        ],
        ..Default::default()
    });
    let r = c
        .get(gw.url("/"))
        .header("accept-encoding", "gzip, br")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers().get_all("content-encoding").iter().count(), 1);
    assert_eq!(r.headers()["content-encoding"], "gzip");
    assert_eq!(
        r.bytes().await.unwrap().len(),
        pre.len() + 2000,
        "the body was re-encoded"
    );
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_hs256_claims_expiry_issuer_and_spoofing() {
    let up = Upstream::start().await;
    let secret = "a-shared-secret-of-at-least-32-bytes!";
    let gw = with_filters(
        &up,
        &format!(
            "      - {{ kind: auth, jwt: {{ secret: \"{secret}\", issuer: https://idp.test, audience: [api], claims_to_headers: {{ sub: X-User, scope: X-Scope }} }} }}\n"
        ),
        "",
    );
    let token = |claims: serde_json::Value, key: &str| hs256(key, claims);
    let now = unix_now();
    let good = serde_json::json!({"sub": "alice", "scope": ["read", "write"], "iss": "https://idp.test", "aud": "api", "exp": now + 300});
    let c = client();
    let call = |t: Option<String>| {
        let mut r = c.get(gw.url("/")).header("x-user", "mallory");
        if let Some(t) = t {
            r = r.header("authorization", format!("Bearer {t}"));
        }
        r.send()
    };
    let r = call(Some(token(good.clone(), secret))).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        up.last().header_all("x-user"),
        ["alice"],
        "a client-sent X-User must not survive"
    );
    assert_eq!(up.last().header("x-scope"), Some("read write"));

    let mut expired = good.clone();
    expired["exp"] = serde_json::json!(now - 120);
    let mut other_iss = good.clone();
    other_iss["iss"] = serde_json::json!("https://evil.test");
    let mut other_aud = good.clone();
    other_aud["aud"] = serde_json::json!("billing");
    let mut no_exp = good.clone();
    no_exp.as_object_mut().unwrap().remove("exp");
    // A configured issuer and audience are required, not only checked where present.
    let mut no_iss = good.clone();
    no_iss.as_object_mut().unwrap().remove("iss");
    let mut no_aud = good.clone();
    no_aud.as_object_mut().unwrap().remove("aud");
    let mut iss_not_a_string = good.clone();
    iss_not_a_string["iss"] = serde_json::json!(5);
    let none_alg = {
        let b64 = |v: &serde_json::Value| {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
        };
        format!(
            "{}.{}.",
            b64(&serde_json::json!({"alg": "none", "typ": "JWT"})),
            b64(&good)
        )
    };
    for (what, t) in [
        ("no token", None),
        ("expired", Some(token(expired, secret))),
        (
            "wrong secret",
            Some(token(good.clone(), "another-secret-of-at-least-32-bytes!!")),
        ),
        ("wrong issuer", Some(token(other_iss, secret))),
        ("wrong audience", Some(token(other_aud, secret))),
        ("no exp", Some(token(no_exp, secret))),
        ("no issuer", Some(token(no_iss, secret))),
        ("no audience", Some(token(no_aud, secret))),
        ("issuer not a string", Some(token(iss_not_a_string, secret))),
        ("alg none", Some(none_alg.clone())),
        ("garbage", Some("a.b.c".to_string())),
    ] {
        let r = call(t).await.unwrap();
        assert_eq!(r.status(), 401, "{what}");
        assert_eq!(
            r.headers()["www-authenticate"],
            "Bearer realm=\"tollgate\", error=\"invalid_token\""
        );
    }
    assert_eq!(up.count(), 1);

    // A verified token followed by another that nobody verified: a backend reading the last
    // one would act on the forgery. Two Authorization fields are refused outright.
    let r = c
        .get(gw.url("/"))
        .header(
            "authorization",
            format!("Bearer {}", token(good.clone(), secret)),
        )
        .header("authorization", format!("Bearer {none_alg}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(up.count(), 1, "nothing reaches the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_es256_from_a_jwks_file_by_kid() {
    use base64::Engine;
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    use p256::ecdsa::SigningKey;
    use p256::pkcs8::{EncodePrivateKey, LineEnding};
    let up = Upstream::start().await;
    let sk = SigningKey::from_slice(&rand::random::<[u8; 32]>()).unwrap();
    let point = sk.verifying_key().to_encoded_point(false);
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256", "use": "sig",
        "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap())}]});
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks.to_string()).unwrap();
    let gw = with_filters(
        &up,
        &format!(
            "      - {{ kind: auth, jwt: {{ jwks_file: \"{}\" }} }}\n",
            path.display()
        ),
        "",
    );
    let key =
        EncodingKey::from_ec_pem(sk.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes()).unwrap();
    let claims = serde_json::json!({"sub": "svc", "exp": unix_now() + 300});
    let signed = |kid: &str| {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(kid.to_string());
        encode(&h, &claims, &key).unwrap()
    };
    let c = client();
    let status = |t: String| c.get(gw.url("/")).bearer_auth(t).send();
    assert_eq!(status(signed("k1")).await.unwrap().status(), 200);
    assert_eq!(status(signed("unknown")).await.unwrap().status(), 401);
    // An HS256 token "signed" with the public key's bytes (algorithm confusion) is refused.
    let confused = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(jwks.to_string().as_bytes()),
    )
    .unwrap();
    assert_eq!(status(confused).await.unwrap().status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_rate_limit_is_shared_by_every_gateway_and_fails_open() {
    let mut redis = common::redis::Redis::start();
    let up = Upstream::start().await;
    let limit = |extra: &str| {
        format!(
            "      - {{ kind: rate_limit, key: \"header:X-User\", rate: 3/m, burst: 2, backend: {{ kind: redis, url: \"{}\", timeout: 200ms{extra} }} }}\n",
            redis.url()
        )
    };
    let one = with_filters(&up, &limit(""), "");
    let two = with_filters(&up, &limit(""), "");
    let closed = with_filters(&up, &limit(", fail_open: false"), "");
    let c = client();
    let mut statuses = Vec::new();
    for gw in [&one, &two, &one, &two] {
        statuses.push(
            c.get(gw.url("/"))
                .header("x-user", "carol")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    // burst 2 = 3 requests, shared: the fourth is refused whichever gateway it reaches.
    assert_eq!(statuses, [200, 200, 200, 429]);
    let r = c
        .get(two.url("/"))
        .header("x-user", "carol")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&wait), "Retry-After {wait} for 3/m");
    assert_eq!(
        c.get(one.url("/"))
            .header("x-user", "dave")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    redis.stop();
    // Fail open: requests pass while Redis is down, and the failures are counted.
    for _ in 0..3 {
        assert_eq!(
            c.get(one.url("/"))
                .header("x-user", "carol")
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    let m = one.metrics().await;
    assert!(common::metric(&m, "tollgate_rate_limit_backend_errors_total") >= 1.0);
    // Fail closed: 503.
    let r = c
        .get(closed.url("/"))
        .header("x-user", "erin")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        error_json(&r.text().await.unwrap())["error"],
        "rate limit backend unavailable"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_runs_global_then_route_in_order_and_responses_in_reverse() {
    let up = Upstream::start().await;
    let step = |name: &str| {
        format!(
            "{{ kind: headers, request: {{ add: {{ X-Order: {name} }} }}, response: {{ add: {{ X-Order: {name} }} }} }}"
        )
    };
    let gw = with_filters(
        &up,
        &format!("      - {}\n      - {}\n", step("first"), step("second")),
        &format!("filters:\n  - {}\n", step("global")),
    );
    let r = client().get(gw.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        up.last().header_all("x-order"),
        ["global", "first", "second"],
        "request hooks: global filters first, then the route's in the order listed"
    );
    let seen: Vec<_> = r
        .headers()
        .get_all("x-order")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert_eq!(
        seen,
        ["second", "first", "global"],
        "response hooks run in reverse, like unwinding middleware"
    );

    // A filter that answers stops the chain: later filters and the upstream never see it.
    let up = Upstream::start().await;
    let gw = with_filters(
        &up,
        &format!(
            "      - {{ kind: limits, methods: [GET] }}\n      - {}\n",
            step("route")
        ),
        &format!("filters:\n  - {}\n", step("global")),
    );
    let r = client().delete(gw.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(up.count(), 0);
}

fn hs256(secret: &str, claims: serde_json::Value) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_keyed_by_a_verified_jwt_claim() {
    let up = Upstream::start().await;
    let secret = "a-shared-secret-of-at-least-32-bytes!";
    let gw = with_filters(
        &up,
        &format!(
            "      - {{ kind: auth, jwt: {{ secret: \"{secret}\" }} }}\n      - {{ kind: rate_limit, key: \"claim:sub\", rate: 1/m, burst: 1 }}\n"
        ),
        "",
    );
    let exp = unix_now() + 300;
    let alice = hs256(secret, serde_json::json!({"sub": "alice", "exp": exp}));
    // Another token for the same subject (a new jti) shares alice's allowance.
    let alice_again = hs256(
        secret,
        serde_json::json!({"sub": "alice", "jti": "2", "exp": exp}),
    );
    let bob = hs256(secret, serde_json::json!({"sub": "bob", "exp": exp}));
    let c = client();
    let status = |t: &str| {
        let req = c.get(gw.url("/")).bearer_auth(t);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status(&alice).await, 200);
    assert_eq!(status(&alice_again).await, 200);
    assert_eq!(
        status(&alice).await,
        429,
        "burst 1 = two requests per subject"
    );
    assert_eq!(status(&alice_again).await, 429);
    assert_eq!(
        status(&bob).await,
        200,
        "another subject has its own allowance"
    );
    // The limit is keyed on the verified claim, after auth: a forged token never reaches it.
    assert_eq!(
        status(&hs256(
            "not-the-secret-but-32-bytes-long!!!!",
            serde_json::json!({"sub": "carol", "exp": exp})
        ))
        .await,
        401
    );
    assert_eq!(up.count(), 3);
}

/// Hammer `urls` (round robin over them) from `workers` tasks for `secs` seconds with one
/// rate-limit key, bounded to `cap` requests; returns (admitted, refused, elapsed seconds).
async fn admitted_under_load(
    urls: &[String],
    workers: usize,
    secs: f64,
    cap: usize,
) -> (usize, usize, f64) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let sent = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let start = std::time::Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (sent, ok, refused) = (sent.clone(), ok.clone(), refused.clone());
        let urls = urls.to_vec();
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut i = w;
            while std::time::Instant::now() < deadline && sent.fetch_add(1, Ordering::Relaxed) < cap
            {
                let s = c
                    .get(&urls[i % urls.len()])
                    .header("x-user", "load")
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16();
                match s {
                    200 => ok.fetch_add(1, Ordering::Relaxed),
                    429 => refused.fetch_add(1, Ordering::Relaxed),
                    other => panic!("unexpected status {other}"),
                };
                i += 1;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    (
        ok.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        elapsed,
    )
}

/// GCRA admits the burst plus `rate` per second; under load the count must land within 5%.
fn assert_within_5_percent(
    what: &str,
    admitted: usize,
    refused: usize,
    elapsed: f64,
    rate: f64,
    burst: f64,
) {
    let expected = burst + 1.0 + rate * elapsed;
    let off = (admitted as f64 - expected).abs() / expected;
    eprintln!(
        "{what}: {admitted} admitted, {refused} refused in {elapsed:.2}s; expected {expected:.1}"
    );
    assert!(
        refused > admitted,
        "{what}: the load must exceed the limit to test it ({admitted} admitted, {refused} refused)"
    );
    assert!(
        off <= 0.05,
        "{what}: {admitted} admitted in {elapsed:.2}s, expected {expected:.0} (off by {:.1}%)",
        off * 100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_hold_within_5_percent_under_load_locally_and_across_gateways() {
    let up = Upstream::start().await;
    let local = with_filters(
        &up,
        "      - { kind: rate_limit, key: \"header:X-User\", rate: 50/s, burst: 10 }\n",
        "",
    );
    let (ok, refused, secs) = admitted_under_load(&[local.url("/")], 4, 2.0, 20_000).await;
    assert_within_5_percent("local", ok, refused, secs, 50.0, 10.0);

    let redis = common::redis::Redis::start();
    let shared = format!(
        "      - {{ kind: rate_limit, key: \"header:X-User\", rate: 50/s, burst: 10, backend: {{ kind: redis, url: \"{}\", fail_open: false }} }}\n",
        redis.url()
    );
    let one = with_filters(&up, &shared, "");
    let two = with_filters(&up, &shared, "");
    let (ok, refused, secs) =
        admitted_under_load(&[one.url("/"), two.url("/")], 4, 2.0, 20_000).await;
    assert_within_5_percent("two gateways, one Redis", ok, refused, secs, 50.0, 10.0);
}

/// Send `request` with a 5-byte body, then `next` on the same connection; all that came back
/// until the gateway closed.
async fn body_then_next(addr: std::net::SocketAddr, request: &str, next: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let first = format!("{request} HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello");
    s.write_all(first.as_bytes()).await.unwrap();
    s.write_all(next.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
        .await
        .expect("no end of stream")
        .unwrap();
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_reply_before_the_body_reads_on_briefly_never_the_whole_body() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start().await;
    let gw = with_filters(&up, "      - { kind: auth, api_keys: [key-0001] }\n", "");
    // A small body is read past: the connection stays open for the next request.
    let text = body_then_next(
        gw.addr,
        "POST /a",
        "GET /b HTTP/1.1\r\nHost: a\r\nX-API-Key: key-0001\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    assert_eq!(text.matches("HTTP/1.1 ").count(), 2, "{text}");
    assert!(text.contains("HTTP/1.1 200"), "{text}");
    assert_eq!(up.count(), 1);

    // A huge body that keeps coming: answered, read on for at most a second, then closed,
    // not read to its announced end (10 GB here).
    let s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 10000000000\r\n\r\n")
            .await
            .unwrap();
        let chunk = vec![b'x'; 64 << 10];
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if w.write_all(&chunk).await.is_err() {
                return true;
            }
        }
        false
    });
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(10), r.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    let waited = started.elapsed();
    assert!(ended, "the connection stayed open for 10 s");
    assert!(
        String::from_utf8_lossy(&got).starts_with("HTTP/1.1 401"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    assert!(waited < Duration::from_secs(5), "closed after {waited:?}");
    assert!(writer.await.unwrap(), "the body was taken for 10 s");
    assert_eq!(up.count(), 1);

    // The gateway's own refusals (here a 404: no route) read past a small body the same way.
    let routed = TestGateway::start(&format!(
        "upstreams: {{ u: {{ backends: [{{ address: \"{}\" }}] }} }}\nroutes:\n  - {{ name: api, upstream: u, match: {{ path_prefix: /api }} }}\n",
        up.addr
    ));
    let text = body_then_next(
        routed.addr,
        "POST /nope",
        "GET /api/b HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 404"), "{text}");
    assert!(text.contains("HTTP/1.1 200"), "{text}");
    assert_eq!(up.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preflight_to_a_method_restricted_route_is_answered_by_its_cors_filter() {
    let up = Upstream::start().await;
    let cors = "{ kind: cors, allow_origins: [\"https://app.example.com\"], allow_methods: [GET, POST], allow_headers: [Authorization] }";
    let gw = TestGateway::start(&format!(
        "upstreams: {{ u: {{ backends: [{{ address: \"{}\" }}] }} }}\nroutes:\n  - name: api\n    match: {{ path_prefix: /api, methods: [GET, POST] }}\n    upstream: u\n    filters:\n      - {cors}\n  - name: limited\n    match: {{ path_prefix: /limited }}\n    upstream: u\n    filters:\n      - {cors}\n      - {{ kind: limits, methods: [GET, POST] }}\n  - name: no-cors\n    match: {{ path_prefix: /plain }}\n    upstream: u\n    filters:\n      - {{ kind: limits, methods: [GET, POST] }}\n",
        up.addr
    ));
    let c = client();
    let preflight = |path: &str, method: &str| {
        c.request(reqwest::Method::OPTIONS, gw.url(path))
            .header("origin", "https://app.example.com")
            .header("access-control-request-method", method)
            .header("access-control-request-headers", "authorization")
            .send()
    };
    for path in ["/api/x", "/limited/x"] {
        let r = preflight(path, "POST").await.unwrap();
        assert_eq!(r.status(), 204, "{path}");
        assert_eq!(
            r.headers()["access-control-allow-origin"],
            "https://app.example.com",
            "{path}"
        );
    }
    // Asking about a method the route does not take: refused as before.
    assert_eq!(preflight("/api/x", "DELETE").await.unwrap().status(), 405);
    // Without a cors filter, a preflight is an OPTIONS like any other: `limits` refuses it.
    assert_eq!(preflight("/plain/x", "GET").await.unwrap().status(), 405);
    // A plain OPTIONS is still not a method these routes take.
    for path in ["/api/x", "/limited/x", "/plain/x"] {
        let r = c
            .request(reqwest::Method::OPTIONS, gw.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405, "{path}");
    }
    assert_eq!(up.count(), 0);
}

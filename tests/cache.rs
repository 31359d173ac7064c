//! The response cache through the real gateway, against an upstream that counts its requests.

mod common;

use std::time::{Duration, Instant};

use common::{Behavior, TestGateway, Upstream, client, metric};

fn cached(up: &Upstream, route_cache: &str, top: &str) -> TestGateway {
    TestGateway::start(&format!(
        "{top}upstreams: {{ u: {{ backends: [{{ address: \"{}\" }}], retries: {{ attempts: 0 }} }} }}\nroutes:\n  - name: api\n    upstream: u\n    cache: {route_cache}\n",
        up.addr
    ))
}

/// One caching route on `up`, with `server` lines under the harness' `server:`.
fn cached_with_server(up: &Upstream, server: &str) -> TestGateway {
    common::GatewayConfig::new(format!(
        "upstreams: {{ u: {{ backends: [{{ address: \"{}\" }}] }} }}\nroutes:\n  - {{ name: api, upstream: u, cache: {{}} }}\n",
        up.addr
    ))
    .server(server)
    .start()
}

fn answering(body: &str, headers: &[&str]) -> Behavior {
    Behavior {
        body: body.as_bytes().to_vec(),
        headers: headers.iter().map(|h| h.to_string()).collect(),
        ..Default::default()
    }
}

/// (status, X-Cache-Status, body) of a GET with extra headers.
async fn get(gw: &TestGateway, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    let mut r = client().get(gw.url(path));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let cache = r
        .headers()
        .get("x-cache-status")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, cache, r.text().await.unwrap())
}

async fn cache_status(gw: &TestGateway, path: &str) -> String {
    get(gw, path, &[]).await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_misses_hosts_and_head() {
    let up = Upstream::with(answering("hello", &["Cache-Control: max-age=60"])).await;
    let gw = cached(&up, "{}", "");
    assert_eq!(
        get(&gw, "/a", &[]).await,
        (200, "MISS".into(), "hello".into())
    );
    let r = client().get(gw.url("/a")).send().await.unwrap();
    assert_eq!(r.headers()["x-cache-status"], "HIT");
    assert!(
        r.headers().contains_key("age"),
        "a stored response carries Age"
    );
    assert!(
        r.headers().contains_key("x-request-id"),
        "per-request headers are not stored"
    );
    assert_eq!(r.text().await.unwrap(), "hello");
    assert_eq!(up.count(), 1);
    // HEAD after GET: from the cache.
    let r = client().head(gw.url("/a")).send().await.unwrap();
    assert_eq!(r.headers()["x-cache-status"], "HIT");
    assert_eq!(up.count(), 1);
    // Another host, another query: other entries.
    assert_eq!(get(&gw, "/a", &[("host", "other.example")]).await.1, "MISS");
    assert_eq!(get(&gw, "/a", &[("host", "other.example")]).await.1, "HIT");
    assert_eq!(get(&gw, "/a?x=1", &[]).await.1, "MISS");
    assert_eq!(up.count(), 3);
    // Normalised: the same path, spelt differently, is the same entry.
    assert_eq!(get(&gw, "/b/../a", &[]).await.1, "HIT");
    // The logging phase records a request after its response reached the client: wait (bounded)
    // for the last one's.
    let hits = |m: &str| {
        metric(
            m,
            r#"tollgate_cache_lookups_total{result="hit",route="api"}"#,
        )
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut m = gw.metrics().await;
    while hits(&m) < 4.0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        m = gw.metrics().await;
    }
    assert!(hits(&m) >= 4.0, "{} hits counted", hits(&m));
    assert_eq!(
        metric(
            &m,
            r#"tollgate_cache_lookups_total{result="miss",route="api"}"#
        ),
        3.0
    );
    assert_eq!(metric(&m, "tollgate_cache_entries"), 3.0);
    assert!(metric(&m, "tollgate_cache_bytes") > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_control_cookies_authorization_and_vary() {
    let up = Upstream::start().await;
    let gw = cached(&up, "{ ttl: 60s }", "");
    // Each case: the response headers, then whether a second request is a hit.
    let cases: &[(&str, &[&str], bool)] = &[
        ("/default", &[], true),
        ("/max-age", &["Cache-Control: max-age=60"], true),
        ("/no-store", &["Cache-Control: no-store"], false),
        ("/private", &["Cache-Control: private, max-age=60"], false),
        (
            "/cookie",
            &["Cache-Control: max-age=60", "Set-Cookie: s=1"],
            false,
        ),
        (
            "/vary-star",
            &["Cache-Control: max-age=60", "Vary: *"],
            false,
        ),
    ];
    for (path, headers, stored) in cases {
        up.set(answering("x", headers));
        let before = up.count();
        get(&gw, path, &[]).await;
        let second = cache_status(&gw, path).await;
        assert_eq!(second == "HIT", *stored, "{path}: second request {second}");
        assert_eq!(up.count() - before, if *stored { 1 } else { 2 }, "{path}");
    }
    // Authorization: only with public / s-maxage / must-revalidate.
    let auth = [("authorization", "Bearer t")];
    up.set(answering("x", &["Cache-Control: max-age=60"]));
    get(&gw, "/auth", &auth).await;
    assert_ne!(get(&gw, "/auth", &auth).await.1, "HIT");
    up.set(answering("x", &["Cache-Control: public, max-age=60"]));
    get(&gw, "/auth-public", &auth).await;
    assert_eq!(get(&gw, "/auth-public", &auth).await.1, "HIT");
    // no-cache: stored, but every use goes back to the origin.
    up.set(answering("x", &["Cache-Control: no-cache", "ETag: \"1\""]));
    get(&gw, "/no-cache", &[]).await;
    let before = up.count();
    assert_ne!(cache_status(&gw, "/no-cache").await, "HIT");
    assert_eq!(up.count(), before + 1);
    // TTL expiry.
    up.set(answering("x", &["Cache-Control: max-age=1"]));
    get(&gw, "/short", &[]).await;
    assert_eq!(cache_status(&gw, "/short").await, "HIT");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(cache_status(&gw, "/short").await, "EXPIRED");
    // Vary: Accept-Encoding, normalised.
    up.set(answering(
        "x",
        &["Cache-Control: max-age=60", "Vary: Accept-Encoding"],
    ));
    let ae = |v: &'static str| [("accept-encoding", v)];
    assert_eq!(get(&gw, "/vary", &ae("gzip")).await.1, "MISS");
    assert_eq!(get(&gw, "/vary", &ae("gzip")).await.1, "HIT");
    assert_eq!(get(&gw, "/vary", &ae("br")).await.1, "MISS");
    assert_eq!(get(&gw, "/vary", &ae("gzip, deflate")).await.1, "HIT");
    assert_eq!(get(&gw, "/vary", &ae("br;q=1.0")).await.1, "HIT");
    // The origin is asked only for the codings the variance tells apart: a client's `*` or
    // `deflate` shares the plain variant, so an origin answering it with an encoded body
    // would serve that body to clients that cannot decode it.
    for (i, (sent, forwarded)) in [
        ("*", Some("identity")),
        ("deflate, compress", Some("identity")),
        ("gzip;q=0, deflate", Some("identity")),
        ("deflate, gzip, br", Some("br,gzip")),
        ("x-gzip", Some("gzip")),
    ]
    .into_iter()
    .enumerate()
    {
        let path = format!("/vary-forwarded-{i}");
        assert_eq!(
            get(&gw, &path, &[("accept-encoding", sent)]).await.1,
            "MISS"
        );
        assert_eq!(
            up.last().header("accept-encoding"),
            forwarded,
            "{sent:?} forwarded as"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_send_one_request_upstream() {
    let up = Upstream::with(Behavior {
        delay: Duration::from_millis(300),
        ..answering("coalesced", &["Cache-Control: max-age=60"])
    })
    .await;
    let gw = cached(&up, "{}", "");
    let url = gw.url("/hot");
    let c = client();
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move {
                let r = c.get(url).send().await.unwrap();
                (r.status().as_u16(), r.text().await.unwrap())
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), (200, "coalesced".to_string()));
    }
    assert_eq!(up.count(), 1, "100 concurrent misses, one upstream request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_and_stale_while_revalidate() {
    let up = Upstream::with(answering(
        "v1",
        &["Cache-Control: max-age=1, stale-if-error=60"],
    ))
    .await;
    let gw = cached(&up, "{}", "");
    assert_eq!(get(&gw, "/s", &[]).await.1, "MISS");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    up.set(Behavior {
        close_without_answer: true,
        ..Default::default()
    });
    assert_eq!(
        get(&gw, "/s", &[]).await,
        (200, "STALE".into(), "v1".into()),
        "the upstream fails: the stale copy instead of a 502"
    );
    up.set(Behavior {
        status: 503,
        ..Default::default()
    });
    assert_eq!(
        get(&gw, "/s", &[]).await,
        (200, "STALE".into(), "v1".into())
    );

    // stale-while-revalidate: the stale copy at once, refreshed in the background.
    up.set(answering(
        "w1",
        &["Cache-Control: max-age=1, stale-while-revalidate=60"],
    ));
    assert_eq!(get(&gw, "/w", &[]).await.2, "w1");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    up.set(Behavior {
        delay: Duration::from_millis(800),
        ..answering("w2", &["Cache-Control: max-age=60"])
    });
    let before = up.count();
    let t = Instant::now();
    assert_eq!(
        get(&gw, "/w", &[]).await,
        (200, "STALE".into(), "w1".into())
    );
    assert!(
        t.elapsed() < Duration::from_millis(600),
        "served without waiting for the origin ({:?})",
        t.elapsed()
    );
    assert!(
        common::eventually(Duration::from_secs(5), || up.count() > before).await,
        "the background refresh reached the origin"
    );
    let mut fresh = String::new();
    for _ in 0..50 {
        fresh = get(&gw, "/w", &[]).await.2;
        if fresh == "w2" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(fresh, "w2", "the refreshed copy replaced the stale one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_requests_and_revalidation() {
    let up = Upstream::with(answering(
        "tagged",
        &["Cache-Control: max-age=1", "ETag: \"v1\""],
    ))
    .await;
    let gw = cached(&up, "{}", "");
    get(&gw, "/e", &[]).await;
    let r = client()
        .get(gw.url("/e"))
        .header("if-none-match", "\"v1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304, "answered from the cache");
    assert_eq!(up.count(), 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Expired: revalidated with the origin, whose 304 refreshes the entry.
    up.set(Behavior {
        status: 304,
        headers: vec!["Cache-Control: max-age=60".into(), "ETag: \"v1\"".into()],
        ..Default::default()
    });
    assert_eq!(
        get(&gw, "/e", &[]).await,
        (200, "REVALIDATED".into(), "tagged".into())
    );
    assert_eq!(up.last().header("if-none-match"), Some("\"v1\""));
    assert_eq!(get(&gw, "/e", &[]).await.1, "HIT", "the 304 refreshed it");
    assert_eq!(up.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_and_unsafe_methods_invalidate() {
    let up = Upstream::with(answering("p", &["Cache-Control: max-age=60"])).await;
    let gw = cached(&up, "{}", "");
    get(&gw, "/p?q=1", &[]).await;
    assert_eq!(cache_status(&gw, "/p?q=1").await, "HIT");
    let purge = |url: String| {
        client()
            .post(format!("http://{}/cache/purge", gw.admin))
            .body(serde_json::json!({ "url": url }).to_string())
            .send()
    };
    let r = purge(gw.url("/p?q=1")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&r.text().await.unwrap()).unwrap()["purged"],
        1
    );
    assert_eq!(cache_status(&gw, "/p?q=1").await, "MISS");
    let r = purge(gw.url("/never-cached")).await.unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&r.text().await.unwrap()).unwrap()["purged"],
        0
    );
    let r = client()
        .post(format!("http://{}/cache/purge", gw.admin))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // A successful POST invalidates the URL; a failed one does not.
    assert_eq!(cache_status(&gw, "/p?q=1").await, "HIT");
    up.set(Behavior {
        status: 500,
        ..Default::default()
    });
    client().post(gw.url("/p?q=1")).send().await.unwrap();
    up.set(answering("p", &["Cache-Control: max-age=60"]));
    assert_eq!(cache_status(&gw, "/p?q=1").await, "HIT");
    let r = client().post(gw.url("/p?q=1")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(cache_status(&gw, "/p?q=1").await, "MISS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filling_ten_times_the_limit_stays_within_it() {
    const MAX: usize = 8 << 20;
    let body = vec![b'x'; 200_000];
    let up = Upstream::with(Behavior {
        body: body.clone(),
        headers: vec!["Cache-Control: max-age=600".into()],
        ..Default::default()
    })
    .await;
    let gw = cached(
        &up,
        "{ max_object_size: 256KiB }",
        "cache: { max_size: 8MiB }\n",
    );
    let baseline = gw.rss_kib();
    let c = client();
    // 10 × max_size through the cache, each object distinct.
    let objects = 10 * MAX / body.len();
    for i in 0..objects {
        let r = c.get(gw.url(&format!("/o/{i}"))).send().await.unwrap();
        assert_eq!(r.bytes().await.unwrap().len(), body.len());
    }
    let m = gw.metrics().await;
    let bytes = metric(&m, "tollgate_cache_bytes");
    assert!(bytes <= MAX as f64, "{bytes} bytes stored, limit {MAX}");
    assert!(bytes > (MAX / 2) as f64, "the cache is used: {bytes}");
    assert!(metric(&m, "tollgate_cache_evictions_total") > 0.0);
    let grown_mib = (gw.rss_kib().saturating_sub(baseline)) as f64 / 1024.0;
    eprintln!("stored {bytes} bytes; RSS grew {grown_mib:.1} MiB after {objects} objects");
    assert!(
        grown_mib < 8.0 + 24.0,
        "RSS grew {grown_mib:.1} MiB with an 8 MiB cache"
    );
    // Larger than max_object_size: served, not stored.
    up.set(Behavior {
        body: vec![b'y'; 300_000],
        headers: vec!["Cache-Control: max-age=600".into()],
        ..Default::default()
    });
    let before = up.count();
    for _ in 0..2 {
        let r = c.get(gw.url("/big")).send().await.unwrap();
        assert_eq!(r.bytes().await.unwrap().len(), 300_000);
    }
    assert_eq!(up.count(), before + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_on_a_cached_url_never_becomes_a_second_request() {
    // The CVE-2025-4366 class: a cache hit that leaves the request body unread would parse that
    // body as the next request on the connection. A request with a body is not looked up (the
    // application may answer by its body), so it goes to the origin, body and all.
    let up = Upstream::with(answering("cached", &["Cache-Control: max-age=60"])).await;
    let gw = cached(&up, "{}", "");
    get(&gw, "/hit", &[]).await;
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let request = format!(
        "GET /hit HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n\r\n{smuggled}",
        gw.addr,
        smuggled.len()
    );
    let out = tokio::task::spawn_blocking({
        let addr = gw.addr;
        move || common::raw_exchange(addr, request.as_bytes(), Duration::from_secs(2))
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("x-cache-status: BYPASS"), "{text}");
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "one response: {text}");
    assert!(up.received().iter().all(|r| r.path != "/smuggled"));
    assert_eq!(up.count(), 2);
    let last = up.last();
    assert_eq!(
        (last.path.as_str(), last.body_len),
        ("/hit", smuggled.len() as u64)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_get_body_without_a_length_is_neither_looked_up_nor_stored() {
    let up = Upstream::with(answering("cached", &["Cache-Control: max-age=60"])).await;
    let gw = common::GatewayConfig::new(format!(
        "upstreams: {{ u: {{ backends: [{{ address: \"{}\" }}] }} }}\nroutes:\n  - {{ name: api, upstream: u, cache: {{}} }}\n",
        up.addr
    ))
    .listener("h2c: true")
    .start();
    let h2 = common::h2c_client();
    let send = |path: &str, body: Option<&'static [u8]>| {
        let mut r = h2.get(gw.url(path));
        if let Some(b) = body {
            // Streamed: HTTP/2 DATA frames with no Content-Length.
            let chunks = futures_util::stream::iter([Ok::<_, std::io::Error>(b)]);
            r = r.body(reqwest::Body::wrap_stream(chunks));
        }
        async move {
            let r = r.send().await.unwrap();
            assert_eq!(r.version(), reqwest::Version::HTTP_2);
            let cache = r.headers()["x-cache-status"].to_str().unwrap().to_string();
            (cache, r.text().await.unwrap())
        }
    };
    assert_eq!(send("/hit", None).await.0, "MISS");
    assert_eq!(send("/hit", None).await.0, "HIT");
    // A stored answer does not stand in for a request with a body: it goes to the origin.
    assert_eq!(send("/hit", Some(b"q=1")).await.0, "BYPASS");
    assert_eq!(up.count(), 2);
    assert_eq!(up.last().body_len, 3);
    // Nor is the answer to one stored for the plain URL.
    assert_eq!(send("/fresh", Some(b"q=2")).await.0, "BYPASS");
    assert_eq!(send("/fresh", None).await.0, "MISS");
    assert_eq!(up.count(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_covers_an_open_breaker() {
    let up = Upstream::with(answering(
        "kept",
        &["Cache-Control: max-age=1, stale-if-error=60"],
    ))
    .await;
    let gw = TestGateway::start(&format!(
        "upstreams: {{ u: {{ backends: [{{ address: \"{}\" }}], retries: {{ attempts: 0 }}, circuit_breaker: {{ consecutive_failures: 1, open_for: 60s }} }} }}\nroutes:\n  - name: api\n    upstream: u\n    cache: {{}}\n",
        up.addr
    ));
    assert_eq!(get(&gw, "/b", &[]).await.1, "MISS");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    up.set(Behavior {
        close_without_answer: true,
        ..Default::default()
    });
    // The failure opens the breaker (and is answered stale).
    assert_eq!(
        get(&gw, "/b", &[]).await,
        (200, "STALE".into(), "kept".into())
    );
    let before = up.count();
    // Now no backend may be tried at all: still the stale copy, not a 503.
    assert_eq!(
        get(&gw, "/b", &[]).await,
        (200, "STALE".into(), "kept".into())
    );
    assert_eq!(
        up.count(),
        before,
        "the open breaker kept the request off the backend"
    );
    let m = gw.metrics().await;
    assert!(
        metric(
            &m,
            r#"tollgate_upstream_rejected_total{reason="breaker_open",upstream="u"}"#
        ) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_answered_stale_still_counts_for_the_breaker() {
    let up = Upstream::with(answering(
        "kept",
        &["Cache-Control: max-age=1, stale-if-error=60"],
    ))
    .await;
    let gw = TestGateway::start(&format!(
        "upstreams: {{ u: {{ backends: [{{ address: \"{}\" }}], retries: {{ attempts: 0 }}, circuit_breaker: {{ consecutive_failures: 2, open_for: 60s }} }} }}\nroutes:\n  - name: api\n    upstream: u\n    cache: {{}}\n",
        up.addr
    ));
    assert_eq!(get(&gw, "/b", &[]).await.1, "MISS");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    up.set(Behavior {
        status: 503,
        ..Default::default()
    });
    // Two 503s, each answered from the stale copy: the breaker counts both and opens.
    for _ in 0..2 {
        assert_eq!(
            get(&gw, "/b", &[]).await,
            (200, "STALE".into(), "kept".into())
        );
    }
    let before = up.count();
    assert_eq!(
        get(&gw, "/b", &[]).await,
        (200, "STALE".into(), "kept".into())
    );
    assert_eq!(
        up.count(),
        before,
        "the breaker opened on the stale-answered 503s"
    );
    let m = gw.metrics().await;
    let backend = up.addr;
    assert_eq!(
        metric(
            &m,
            &format!(
                r#"tollgate_backend_breaker_state{{backend="{backend}",state="open",upstream="u"}}"#
            )
        ),
        1.0,
        "{m}"
    );
}

/// A hit's head comes from the cache: its names go out lower-case by default like a proxied
/// head's, or as stored with `preserve_header_case: true`; it gains `X-Cache-Status` and its own
/// `X-Request-Id` either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_follows_the_header_case_mode() {
    let up = Upstream::with(answering(
        "hello",
        &["Cache-Control: max-age=60", "X-Upstream-Said: 1"],
    ))
    .await;
    for (server, name) in [
        ("", "x-upstream-said: 1"),
        ("preserve_header_case: true", "X-Upstream-Said: 1"),
    ] {
        let gw = cached_with_server(&up, server);
        let request = b"GET /case HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n";
        let mut ids = Vec::new();
        for expected in ["miss", "hit"] {
            let raw = common::raw_exchange(gw.addr, request, Duration::from_secs(5));
            let text = String::from_utf8_lossy(&raw).into_owned();
            assert!(text.starts_with("HTTP/1.1 200"), "{text}");
            assert!(
                text.contains(&format!("\r\n{name}\r\n")),
                "{server:?} {expected}:\n{text}"
            );
            let lower = text.to_ascii_lowercase();
            assert!(
                lower.contains(&format!("x-cache-status: {expected}\r\n")),
                "{text}"
            );
            let id = lower
                .lines()
                .find_map(|l| l.strip_prefix("x-request-id: ").map(str::to_owned))
                .unwrap_or_else(|| panic!("no x-request-id:\n{text}"));
            ids.push(id);
        }
        assert_ne!(ids[0], ids[1], "each answer has its own request id");
    }
}

/// Hits answer ranges from the stored body (single, multiple, unsatisfiable, `If-Range`), and
/// say `Accept-Ranges: bytes` when sent whole, in both header-case modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_answers_ranges() {
    let up = Upstream::with(answering(
        "hello world",
        &["Cache-Control: max-age=60", "ETag: \"v1\""],
    ))
    .await;
    for top in ["", "preserve_header_case: true"] {
        let gw = cached_with_server(&up, top);
        let before = up.count();
        let send = |range: Option<&str>, if_range: Option<&str>| {
            let mut r = client().get(gw.url("/r"));
            if let Some(v) = range {
                r = r.header("range", v);
            }
            if let Some(v) = if_range {
                r = r.header("if-range", v);
            }
            async move {
                let r = r.send().await.unwrap();
                let h = |name: &str| {
                    r.headers()
                        .get(name)
                        .map(|v| v.to_str().unwrap().to_string())
                };
                let head = (
                    r.status().as_u16(),
                    h("x-cache-status"),
                    h("accept-ranges"),
                    h("content-range"),
                    h("content-type"),
                );
                (head, r.bytes().await.unwrap())
            }
        };
        // The miss stores the whole body; then every answer comes from the cache.
        let (head, body) = send(None, None).await;
        assert_eq!((head.0, head.1.as_deref()), (200, Some("MISS")), "{top}");
        assert_eq!(&body[..], b"hello world");
        let (head, body) = send(None, None).await;
        assert_eq!(
            (head.0, head.1.as_deref(), head.2.as_deref(), head.3),
            (200, Some("HIT"), Some("bytes"), None),
            "{top}"
        );
        assert_eq!(&body[..], b"hello world");
        // A HEAD hit says it too; a 304 hit says nothing of ranges (as Pingora's own filter).
        let r = client().head(gw.url("/r")).send().await.unwrap();
        assert_eq!(r.headers()["x-cache-status"], "HIT", "{top}");
        assert_eq!(r.headers()["accept-ranges"], "bytes", "{top}");
        let r = client()
            .get(gw.url("/r"))
            .header("if-none-match", "\"v1\"")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 304, "{top}");
        assert!(!r.headers().contains_key("accept-ranges"), "{top}");
        let (head, body) = send(Some("bytes=0-4"), None).await;
        assert_eq!(
            (head.0, head.2, head.3.as_deref()),
            (206, None, Some("bytes 0-4/11")),
            "{top}"
        );
        assert_eq!(&body[..], b"hello");
        let (head, body) = send(Some("bytes=-5"), Some("\"v1\"")).await;
        assert_eq!(
            (head.0, head.3.as_deref()),
            (206, Some("bytes 6-10/11")),
            "{top}"
        );
        assert_eq!(&body[..], b"world");
        // An If-Range that no longer matches: the whole, current body.
        let (head, body) = send(Some("bytes=0-4"), Some("\"v0\"")).await;
        assert_eq!((head.0, head.2.as_deref()), (200, Some("bytes")), "{top}");
        assert_eq!(&body[..], b"hello world");
        let (head, body) = send(Some("bytes=20-30"), None).await;
        assert_eq!(
            (head.0, head.3.as_deref()),
            (416, Some("bytes */11")),
            "{top}"
        );
        assert!(body.is_empty());
        let (head, body) = send(Some("bytes=0-1,6-7"), None).await;
        assert_eq!(head.0, 206, "{top}");
        let boundary = head
            .4
            .as_deref()
            .and_then(|t| t.strip_prefix("multipart/byteranges; boundary="))
            .unwrap_or_else(|| panic!("{top}: {:?}", head.4))
            .to_string();
        let text = String::from_utf8_lossy(&body);
        assert_eq!(text.matches(&format!("--{boundary}")).count(), 3, "{text}");
        assert!(text.contains("bytes 0-1/11\r\n\r\nhe\r\n"), "{text}");
        assert!(text.contains("bytes 6-7/11\r\n\r\nwo\r\n"), "{text}");
        assert_eq!(up.count(), before + 1, "{top}: one request upstream");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxys_scheme_is_part_of_the_key() {
    // Behind a TLS-terminating load balancer, the origin sees its X-Forwarded-Proto and may
    // answer `http` with a redirect to `https`: that answer must not reach `https` clients.
    let up = Upstream::with(answering("x", &["Cache-Control: max-age=60"])).await;
    let gw = cached(&up, "{}", "trusted_proxies: [127.0.0.0/8]\n");
    let proto = |v: &'static str| [("x-forwarded-proto", v)];
    assert_eq!(get(&gw, "/p", &proto("http")).await.1, "MISS");
    assert_eq!(get(&gw, "/p", &proto("https")).await.1, "MISS");
    assert_eq!(up.last().header("x-forwarded-proto"), Some("https"));
    assert_eq!(get(&gw, "/p", &proto("http")).await.1, "HIT");
    assert_eq!(get(&gw, "/p", &proto("HTTPS")).await.1, "HIT");
    // A chain of proxies: the first one's word, as origins read it.
    assert_eq!(get(&gw, "/p", &proto(" https , http")).await.1, "HIT");
    assert_eq!(get(&gw, "/p", &proto("http, https")).await.1, "HIT");
    // Without it, the socket's scheme (plain here): the `http` copy.
    assert_eq!(get(&gw, "/p", &[]).await.1, "HIT");
    assert_eq!(up.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_to_inputs_outside_the_key_are_never_stored() {
    let up = Upstream::with(answering("x", &["Cache-Control: max-age=60"])).await;
    let gw = cached(&up, "{}", "trusted_proxies: [127.0.0.0/8]\n");
    let c = client();
    // Each: a request the application may answer differently from the plain URL; the plain
    // request after it must not get that answer from the cache.
    let stored_after = async |path: &str, first: reqwest::RequestBuilder| {
        let r = first.send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        r.bytes().await.unwrap();
        let before = up.count();
        let status = cache_status(&gw, path).await;
        (status, up.count() - before)
    };
    let with_body = c.get(gw.url("/body")).body("q=secret");
    assert_eq!(stored_after("/body", with_body).await, ("MISS".into(), 1));
    for (i, name) in ["x-original-url", "x-rewrite-url"].into_iter().enumerate() {
        let path = format!("/override-{i}");
        let first = c.get(gw.url(&path)).header(name, "/admin");
        assert_eq!(
            stored_after(&path, first).await,
            ("MISS".into(), 1),
            "{name}"
        );
    }
    let other_host = c
        .get(gw.url("/fwd-host"))
        .header("x-forwarded-host", "evil.test");
    assert_eq!(
        stored_after("/fwd-host", other_host).await,
        ("MISS".into(), 1)
    );
    // The same host forwarded is no other input: stored.
    let host = gw.addr.to_string();
    let same_host = c.get(gw.url("/fwd-same")).header("x-forwarded-host", host);
    assert_eq!(
        stored_after("/fwd-same", same_host).await,
        ("HIT".into(), 0)
    );
    // A method override is not even looked up: a stored GET answer must not stand in for it.
    get(&gw, "/m", &[]).await;
    assert_eq!(cache_status(&gw, "/m").await, "HIT");
    let before = up.count();
    let (_, status, _) = get(&gw, "/m", &[("x-http-method-override", "DELETE")]).await;
    assert_eq!(status, "BYPASS");
    assert_eq!(up.count(), before + 1);
    assert_eq!(up.last().header("x-http-method-override"), Some("DELETE"));
    let (_, status, _) = get(&gw, "/m", &[("x-http-method", "PUT")]).await;
    assert_eq!(status, "BYPASS");
    // A GET body is not looked up either (a search query, say), so a stored answer to the plain
    // URL does not stand in for it.
    assert_eq!(cache_status(&gw, "/m").await, "HIT");
    let before = up.count();
    let r = c
        .get(gw.url("/m"))
        .body("{\"query\":1}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-cache-status"], "BYPASS");
    assert_eq!(up.count(), before + 1);
    // A POST with a method override is still an unsafe request: it invalidates.
    let r = c
        .post(gw.url("/m"))
        .header("x-http-method-override", "DELETE")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-cache-status").is_none());
    assert_eq!(cache_status(&gw, "/m").await, "MISS");
}

/// An origin answering every request with a chunked (no `Content-Length`) cacheable body of
/// `len` bytes, then closing; it counts requests and the `Range` fields it was sent.
async fn chunked_origin(
    len: usize,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<Option<String>>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = std::sync::Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let log = std::sync::Arc::clone(&log);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let range = head
                    .lines()
                    .find_map(|l| l.strip_prefix("range:"))
                    .map(|v| v.trim().to_string());
                log.lock().unwrap().push(range);
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n")
                    .await;
                let chunk = vec![b'z'; 64 << 10];
                let mut left = len;
                while left > 0 {
                    let n = left.min(chunk.len());
                    let framed = [format!("{n:x}\r\n").as_bytes(), &chunk[..n], b"\r\n"].concat();
                    if s.write_all(&framed).await.is_err() {
                        return;
                    }
                    left -= n;
                }
                let _ = s.write_all(b"0\r\n\r\n").await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_whose_chunked_body_was_too_large_is_no_longer_looked_up() {
    let len = 3 << 20;
    let (origin, seen) = chunked_origin(len).await;
    let gw = TestGateway::start(&format!(
        "upstreams: {{ u: {{ backends: [{{ address: \"{origin}\" }}], retries: {{ attempts: 0 }} }} }}\nroutes:\n  - {{ name: api, upstream: u, cache: {{ max_object_size: 1MiB }} }}\n"
    ));
    // The first answer streams from the object being stored: past the limit, Pingora gives the
    // request up (docs/cache.md). What it shows the client is not checked here.
    let first = client().get(gw.url("/big")).send().await;
    if let Ok(r) = first {
        let _ = r.bytes().await;
    }
    // From then on the URL is not looked up: the whole body, straight from the origin.
    for _ in 0..2 {
        let r = client().get(gw.url("/big")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap().len(), len, "{}", gw.log());
    }
    // And a range request reaches the origin with its `Range` (a lookup strips it).
    let r = client()
        .get(gw.url("/big"))
        .header("range", "bytes=0-9")
        .send()
        .await
        .unwrap();
    let _ = r.bytes().await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert_eq!(seen[3].as_deref(), Some("bytes=0-9"), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_a_route_that_does_not_cache_invalidates_the_url() {
    let up = Upstream::with(answering("v1", &["Cache-Control: max-age=60"])).await;
    let gw = TestGateway::start(&format!(
        "upstreams: {{ u: {{ backends: [{{ address: \"{}\" }}] }} }}\nroutes:\n  - {{ name: reads, upstream: u, match: {{ methods: [GET, HEAD] }}, cache: {{}} }}\n  - {{ name: writes, upstream: u, match: {{ methods: [PUT, POST, DELETE] }} }}\n",
        up.addr
    ));
    get(&gw, "/items/1", &[]).await;
    assert_eq!(cache_status(&gw, "/items/1").await, "HIT");
    let r = client()
        .put(gw.url("/items/1"))
        .body("v2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(cache_status(&gw, "/items/1").await, "MISS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_refresh_of_an_api_key_route_reaches_the_origin() {
    let up = Upstream::with(answering(
        "k1",
        &["Cache-Control: max-age=1, stale-while-revalidate=60"],
    ))
    .await;
    let gw = TestGateway::start(&format!(
        "upstreams: {{ u: {{ backends: [{{ address: \"{}\" }}] }} }}\nroutes:\n  - {{ name: api, upstream: u, cache: {{}}, filters: [{{ kind: auth, api_keys: [key-0123456789] }}] }}\n",
        up.addr
    ));
    let key = [("x-api-key", "key-0123456789")];
    assert_eq!(
        get(&gw, "/k", &key).await,
        (200, "MISS".into(), "k1".into())
    );
    assert_eq!(
        get(&gw, "/k", &[]).await.0,
        401,
        "a hit still needs the key"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    up.set(answering("k2", &["Cache-Control: max-age=60"]));
    let before = up.count();
    assert_eq!(
        get(&gw, "/k", &key).await,
        (200, "STALE".into(), "k1".into())
    );
    // The refresh is rebuilt from the head as the client sent it (HTTP/1): the filters run on
    // it again, and pass.
    assert!(
        common::eventually(Duration::from_secs(5), || up.count() > before).await,
        "the background refresh never reached the origin\n{}",
        gw.log()
    );
    let mut fresh = String::new();
    for _ in 0..50 {
        fresh = get(&gw, "/k", &key).await.2;
        if fresh == "k2" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(fresh, "k2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_for_a_forwarded_prefix_is_not_served_without_it() {
    let up = Upstream::with(answering("x", &["Cache-Control: max-age=60"])).await;
    let gw = cached(&up, "{}", "trusted_proxies: [127.0.0.0/8]\n");
    let shop = [("x-forwarded-prefix", "/shop")];
    assert_eq!(get(&gw, "/f", &shop).await.1, "MISS");
    // The first copy sits in the URL's first slot: a request without the field must not take it.
    assert_eq!(get(&gw, "/f", &[]).await.1, "MISS");
    assert_eq!(get(&gw, "/f", &[]).await.1, "HIT");
    assert_eq!(get(&gw, "/f", &shop).await.1, "HIT");
    // The client in `Forwarded` is not part of the variant.
    let fwd = |v: &'static str| [("forwarded", v)];
    assert_eq!(
        get(&gw, "/g", &fwd("for=192.0.2.1;proto=https")).await.1,
        "MISS"
    );
    assert_eq!(
        get(&gw, "/g", &fwd("for=192.0.2.2;proto=https")).await.1,
        "HIT"
    );
    assert_eq!(up.count(), 3);
}

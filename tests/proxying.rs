//! Proxying through the real gateway: header hygiene checked on the bytes the upstream
//! received, forwarding headers, request ids, streamed bodies with checksums and bounded memory,
//! WebSocket tunnelling, error bodies and connection reuse.

mod common;

use std::time::{Duration, Instant};

use common::{
    Behavior, GatewayConfig, TestGateway, Upstream, WsUpstream, client, error_json, pattern,
    raw_exchange,
};
use sha2::{Digest, Sha256};

fn one_route(up: &std::net::SocketAddr, upstream_extra: &str, top_extra: &str) -> String {
    format!(
        "{top_extra}upstreams:\n  u:\n    backends: [{{ address: \"{up}\" }}]\n{upstream_extra}routes:\n  - {{ name: all, upstream: u }}\n"
    )
}

fn head_text(r: &common::Received) -> String {
    String::from_utf8_lossy(&r.head).to_ascii_lowercase()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_request_headers_never_reach_the_upstream() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&one_route(&up.addr, "", ""));
    let raw = raw_exchange(
        gw.addr,
        b"GET /p HTTP/1.1\r\nHost: a.test\r\n\
          Connection: keep-alive, X-Secret, X-Forwarded-For\r\n\
          Connection: X-Other\r\n\
          X-Secret: s\r\nX-Other: o\r\nKeep-Alive: timeout=5\r\nTE: trailers, gzip\r\n\
          Proxy-Connection: keep-alive\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\
          X-Kept: yes\r\n\r\n",
        Duration::from_millis(500),
    );
    assert!(
        raw.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    let seen = up.last();
    let head = head_text(&seen);
    for gone in [
        "x-secret",
        "x-other",
        "keep-alive",
        "\r\nte:",
        "proxy-connection",
        "upgrade",
        "connection",
    ] {
        assert!(
            !head.contains(gone),
            "{gone:?} reached the upstream:\n{head}"
        );
    }
    assert!(head.contains("x-kept: yes"));
    // Naming X-Forwarded-For in Connection cannot remove the gateway's own.
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    // HTTP2-Settings is only meaningful with Upgrade: h2c, which is dropped; it is harmless but
    // must not be interpreted: the upstream got a plain HTTP/1.1 request.
    assert!(seen.head.starts_with(b"GET /p HTTP/1.1\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_response_headers_never_reach_the_client() {
    let up = Upstream::with(Behavior {
        headers: vec![
            "Connection: X-Hop".into(),
            "X-Hop: 1".into(),
            "Keep-Alive: timeout=5".into(),
            "Upgrade: foo".into(),
            "Proxy-Connection: keep-alive".into(),
            "X-End: kept".into(),
        ],
        ..Behavior::default()
    })
    .await;
    let gw = TestGateway::start(&one_route(&up.addr, "", ""));
    let raw = raw_exchange(
        gw.addr,
        b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    for gone in ["x-hop", "keep-alive:", "upgrade", "proxy-connection"] {
        assert!(!text.contains(gone), "{gone:?} reached the client:\n{text}");
    }
    assert!(text.contains("x-end: kept"));
    // The client asked to close: the gateway says so and closes (raw_exchange returned on EOF).
    assert!(text.contains("connection: close"), "{text}");
}

/// `server.preserve_header_case`: by default HTTP/1 names go out lower-case both ways, but
/// for the dozen Pingora title-cases; with it on, each peer's own case comes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_names_are_lower_cased_unless_their_case_is_preserved() {
    let up = Upstream::with(Behavior {
        headers: vec![
            "X-Upstream-Said: 1".into(),
            "Content-Type: text/plain".into(),
        ],
        ..Behavior::default()
    })
    .await;
    let request = b"GET /p?q=1 HTTP/1.1\r\nHost: a.test\r\nX-Client-Said: 1\r\n\
                    User-Agent: t\r\nConnection: close\r\n\r\n";
    for (server, client_name, upstream_name) in [
        ("", "x-client-said: 1", "x-upstream-said: 1"),
        (
            "preserve_header_case: true",
            "X-Client-Said: 1",
            "X-Upstream-Said: 1",
        ),
    ] {
        let gw = GatewayConfig::new(one_route(&up.addr, "", ""))
            .server(server)
            .start();
        let raw = raw_exchange(gw.addr, request, Duration::from_secs(5));
        let text = String::from_utf8_lossy(&raw).into_owned();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(
            text.contains(&format!("\r\n{upstream_name}\r\n")),
            "{server:?}:\n{text}"
        );
        // Pingora's own names, title-cased either way.
        assert!(text.contains("\r\nContent-Type: text/plain\r\n"), "{text}");
        assert!(text.contains("\r\nConnection: close\r\n"), "{text}");
        let seen = up.last();
        let head = String::from_utf8_lossy(&seen.head).into_owned();
        assert!(head.starts_with("GET /p?q=1 HTTP/1.1\r\n"), "{head}");
        assert!(
            head.contains(&format!("\r\n{client_name}\r\n")),
            "{server:?}:\n{head}"
        );
        assert!(head.contains("\r\nHost: a.test\r\n"), "{head}");
        // The gateway's own fields are there, whatever the case mode.
        assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
        assert_eq!(seen.header("x-forwarded-host"), Some("a.test"));
        assert!(seen.header("x-request-id").is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_from_untrusted_clients_are_replaced() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&one_route(&up.addr, "", "trusted_proxies: [10.0.0.0/8]\n"));
    let resp = client()
        .get(gw.url("/"))
        .header("host", "site.test")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "evil.test")
        .header("forwarded", "for=6.6.6.6;proto=https")
        .header("x-real-ip", "6.6.6.6")
        .header("x-request-id", "spoofed-id")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let returned_id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let seen = up.last();
    assert_eq!(seen.header_all("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-forwarded-host"), Some("site.test"));
    assert_eq!(seen.header("forwarded"), None);
    assert_eq!(seen.header("x-real-ip"), None);
    // The untrusted id is replaced by a generated one, the same the client gets back.
    assert_ne!(returned_id, "spoofed-id");
    assert_eq!(returned_id.len(), 32);
    assert_eq!(seen.header("x-request-id"), Some(returned_id.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_proxies_are_appended_to_and_their_ids_kept() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&one_route(&up.addr, "", "trusted_proxies: [127.0.0.0/8]\n"));
    let resp = client()
        .get(gw.url("/"))
        .header("host", "site.test")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-forwarded-for", "10.1.1.1")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "public.test")
        .header("x-request-id", "edge-1234")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "edge-1234");
    let seen = up.last();
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("203.0.113.9, 10.1.1.1, 127.0.0.1")
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.header("x-forwarded-host"), Some("public.test"));
    assert_eq!(seen.header("x-request-id"), Some("edge-1234"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways_with_bounded_memory() {
    // 128 MiB by default; TOLLGATE_BIG_BODY_MIB=1024 moves 1 GiB each way (see performance.md).
    let size_mib: u64 = std::env::var("TOLLGATE_BIG_BODY_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128);
    let size: u64 = size_mib * 1024 * 1024;
    let up = Upstream::start().await;
    let gw = TestGateway::start(&one_route(&up.addr, "", ""));
    let c = client();
    // Baseline after a small request (threads, pools and buffers exist), then go big.
    c.get(gw.url("/warm"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let baseline = gw.peak_rss_kib();
    up.set(Behavior {
        generated_len: Some(size),
        ..Behavior::default()
    });

    // Upload: a chunked body generated on the fly, hashed on both sides.
    let mut expected = Sha256::new();
    let chunks: Vec<u64> = (0..size / (256 * 1024)).collect();
    for &i in &chunks {
        expected.update(pattern(i * 256 * 1024, 256 * 1024));
    }
    let expected = expected.finalize().to_vec();
    let stream = futures_util::stream::iter(
        chunks
            .into_iter()
            .map(|i| Ok::<_, std::io::Error>(pattern(i * 256 * 1024, 256 * 1024))),
    );
    let resp = c
        .post(gw.url("/upload"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
    let seen = up.last();
    assert_eq!(seen.body_len, size);
    assert_eq!(seen.body_sha256, expected, "upload corrupted in transit");

    // Download: the upstream streams the same pattern; hash as it arrives.
    let mut resp = c.get(gw.url("/download")).send().await.unwrap();
    assert_eq!(resp.content_length(), Some(size));
    let mut got = Sha256::new();
    let mut n = 0u64;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        n += chunk.len() as u64;
        got.update(&chunk);
    }
    assert_eq!(n, size);
    assert_eq!(
        got.finalize().to_vec(),
        expected,
        "download corrupted in transit"
    );

    let grown_mib = (gw.peak_rss_kib().saturating_sub(baseline)) / 1024;
    eprintln!(
        "moved 2 x {size_mib} MiB; gateway peak RSS {} MiB, grew by {grown_mib} MiB",
        gw.peak_rss_kib() / 1024
    );
    assert!(
        grown_mib < 48,
        "gateway peak RSS grew by {grown_mib} MiB moving 2 × {size_mib} MiB: bodies are being buffered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_read_buffer_still_carries_large_heads_and_bodies() {
    // The smallest listeners[].read_buffer (1 KiB): a head of ~12 KiB and a 1 MiB body arrive
    // whole, in many reads, and requests that follow on the connection stay apart.
    let up = Upstream::start().await;
    let gw = GatewayConfig::new(one_route(&up.addr, "", ""))
        .listener("read_buffer: 1KiB")
        .start();
    let big_header = "v".repeat(12 * 1024);
    let body = pattern(0, 1 << 20);
    let resp = client()
        .post(gw.url("/big"))
        .header("X-Big", &big_header)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = up.last();
    assert!(head_text(&seen).contains(&format!("x-big: {big_header}")));
    assert_eq!(seen.body_len, 1 << 20);
    assert_eq!(seen.body_sha256, Sha256::digest(&body).to_vec());
    let mut conn = std::net::TcpStream::connect(gw.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for path in ["/one", "/two", "/three"] {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: a\r\nX-Big: {big_header}\r\nContent-Length: 5000\r\n\r\n{}",
            "b".repeat(5000)
        );
        std::io::Write::write_all(&mut conn, req.as_bytes()).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.ends_with(b"ok") {
            let n = std::io::Read::read(&mut conn, &mut buf).unwrap();
            assert!(
                n > 0,
                "connection closed after {:?}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
        assert!(
            got.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&got)
        );
        let seen = up.last();
        assert!(head_text(&seen).starts_with(&format!("post {path} ")));
        assert_eq!(seen.body_len, 5000);
    }
    let (status, cfg) = common::get(&format!("http://{}/config", gw.admin)).await;
    assert_eq!(status, 200);
    let cfg: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    assert_eq!(cfg["listeners"][0]["read_buffer"], 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_is_tunnelled_after_101() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let ws = WsUpstream::start().await;
    let gw = TestGateway::start(&one_route(&ws.addr, "", ""));
    let (mut socket, resp) = tokio_tungstenite::connect_async(format!("ws://{}/chat", gw.addr))
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    for i in 0..20 {
        let text = format!("hello {i}");
        socket.send(Message::Text(text.clone())).await.unwrap();
        let echo = socket.next().await.unwrap();
        assert_eq!(
            echo.unwrap_or_else(|e| panic!("message {i}: {e}\n{}", gw.log())),
            Message::Text(text)
        );
    }
    let blob: Vec<u8> = pattern(0, 300_000);
    socket.send(Message::Binary(blob.clone())).await.unwrap();
    assert_eq!(socket.next().await.unwrap().unwrap(), Message::Binary(blob));
    socket.close(None).await.unwrap();
    let hs = ws.handshakes.lock().unwrap().clone();
    assert_eq!(hs.len(), 1);
    let get = |k: &str| hs[0].iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(get("upgrade").as_deref(), Some("websocket"));
    assert_eq!(get("x-forwarded-for").as_deref(), Some("127.0.0.1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_refusing_connections_is_502_json() {
    let dead = format!("127.0.0.1:{}", common::reserve_port())
        .parse()
        .unwrap();
    let gw = TestGateway::start(&one_route(&dead, "", ""));
    let resp = client().get(gw.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let body = error_json(&resp.text().await.unwrap());
    assert_eq!(body["error"], "upstream unavailable");
    assert_eq!(body["request_id"], id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_is_504_json_after_the_read_timeout() {
    let up = Upstream::with(Behavior {
        delay: Duration::from_secs(3),
        ..Behavior::default()
    })
    .await;
    let gw = TestGateway::start(&one_route(&up.addr, "    timeouts: { read: 300ms }\n", ""));
    let started = Instant::now();
    let resp = client().get(gw.url("/")).send().await.unwrap();
    assert_eq!(resp.status(), 504);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(
        error_json(&resp.text().await.unwrap())["error"],
        "upstream timed out"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_retries_are_bounded_by_attempts() {
    let live = Upstream::start().await;
    let dead: std::net::SocketAddr = format!("127.0.0.1:{}", common::reserve_port())
        .parse()
        .unwrap();
    let yaml = format!(
        "upstreams:\n  u:\n    backends: [{{ address: \"{dead}\" }}, {{ address: \"{}\" }}]\n    retries: {{ attempts: 0 }}\nroutes:\n  - {{ name: all, upstream: u }}\n",
        live.addr
    );
    let gw = TestGateway::start(&yaml);
    let c = client();
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(c.get(gw.url("/")).send().await.unwrap().status().as_u16());
    }
    statuses.sort();
    // Round robin alternates: with no retries the dead backend's turns fail.
    assert_eq!(statuses, [200, 200, 502, 502]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_pooled_unless_pool_size_is_zero() {
    let pooled = Upstream::start().await;
    let gw = TestGateway::start(&one_route(&pooled.addr, "", ""));
    let c = client();
    for _ in 0..20 {
        c.get(gw.url("/"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
    }
    assert_eq!(pooled.count(), 20);
    assert!(
        pooled.connections() <= 2,
        "{} connections for 20 sequential requests",
        pooled.connections()
    );
    drop(gw);

    let unpooled = Upstream::start().await;
    let gw = TestGateway::start(&one_route(
        &unpooled.addr,
        "    keepalive: { pool_size: 0 }\n",
        "",
    ));
    for _ in 0..5 {
        c.get(gw.url("/"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
    }
    assert_eq!(unpooled.connections(), 5);
    assert_eq!(unpooled.last().header("connection"), Some("close"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_pooled_connection_is_retried_on_the_same_backend() {
    // The only backend drops every request that arrives on a reused connection, unanswered.
    // Pingora retries a GET that failed on a reused connection; that retry must be allowed to
    // use the same backend again (on a fresh connection) rather than fail with 502.
    let up = Upstream::with(Behavior {
        drop_reused: true,
        ..Behavior::default()
    })
    .await;
    // With strip_prefix, so the retry must forward the rewritten path too.
    let gw = TestGateway::start(&format!(
        "upstreams: {{ u: {{ backends: [{{ address: \"{}\" }}] }} }}\nroutes: [{{ name: api, upstream: u, match: {{ path_prefix: /api }}, strip_prefix: true }}]\n",
        up.addr
    ));
    let c = client();
    for i in 0..20 {
        let r = c.get(gw.url("/api/orders?page=2")).send().await.unwrap();
        assert_eq!(r.status(), 200, "request {i}: {}", r.text().await.unwrap());
        r.bytes().await.unwrap();
    }
    // Every request after the first found the pooled connection dead and was retried.
    assert_eq!(up.count(), 39);
    assert_eq!(up.connections(), 20);
    assert!(
        up.received().iter().all(|r| r.path == "/orders?page=2"),
        "a retry lost the rewrite"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_works_without_connection_reuse() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let ws = WsUpstream::start().await;
    let gw = TestGateway::start(&one_route(
        &ws.addr,
        "    keepalive: { pool_size: 0 }\n",
        "",
    ));
    let (mut socket, resp) = tokio_tungstenite::connect_async(format!("ws://{}/", gw.addr))
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    socket.send(Message::Text("ping".into())).await.unwrap();
    let echo = socket.next().await.unwrap();
    assert_eq!(
        echo.unwrap_or_else(|e| panic!("{e}\n{}", gw.log())),
        Message::Text("ping".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underscore_headers_are_dropped_kept_or_refused_as_configured() {
    let up = Upstream::start().await;
    let send = |gw: &TestGateway| {
        let url = gw.url("/u");
        async move {
            client()
                .get(url)
                .header("x_user", "mallory")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let drop = TestGateway::start(&one_route(&up.addr, "", ""));
    assert_eq!(send(&drop).await, 200);
    assert!(
        !head_text(&up.last()).contains("x_user"),
        "dropped by default"
    );
    let keep = GatewayConfig::new(one_route(&up.addr, "", ""))
        .server("underscore_headers: keep")
        .start();
    assert_eq!(send(&keep).await, 200);
    assert!(head_text(&up.last()).contains("x_user: mallory"));
    let before = up.count();
    let reject = GatewayConfig::new(one_route(&up.addr, "", ""))
        .server("underscore_headers: reject")
        .start();
    assert_eq!(send(&reject).await, 400);
    assert_eq!(
        up.count(),
        before,
        "a refused request never reaches the upstream"
    );
}

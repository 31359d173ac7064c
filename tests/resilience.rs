//! Resilience through the real gateway: circuit breakers (consecutive, rate, slow calls,
//! half-open recovery, all-open 503), health checks, retries and their budget, the in-flight
//! cap, and DNS / ZooKeeper discovery against real servers on loopback.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::dns::DnsServer;
use common::zookeeper::ZooKeeper;
use common::{Behavior, TestGateway, Upstream, client, error_json, eventually, statuses};

fn backends(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| format!("{{ address: \"{a}\" }}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn gateway(addrs: &[SocketAddr], extra: &str) -> TestGateway {
    TestGateway::start(&format!(
        "upstreams:\n  u:\n    backends: [{}]\n{extra}routes: [{{ name: all, upstream: u }}]\n",
        backends(addrs)
    ))
}

fn count(s: &[u16], status: u16) -> usize {
    s.iter().filter(|&&x| x == status).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backend_is_ejected_and_rejoins_through_half_open() {
    let (a, b, victim) = (
        Upstream::start().await,
        Upstream::start().await,
        Upstream::start().await,
    );
    let victim_addr = victim.addr;
    let gw = gateway(
        &[a.addr, b.addr, victim_addr],
        "    circuit_breaker: { consecutive_failures: 3, open_for: 1s, max_open_for: 1s, half_open_requests: 1 }\n",
    );
    let url = gw.url("/");
    assert_eq!(count(&statuses(&url, 30, 1).await, 200), 30);
    assert_eq!(victim.count(), 10);

    drop(victim); // refuses connections from now on
    let during = statuses(&url, 300, 4).await;
    // A refused connect is retried on another backend: clients see no error at all.
    assert_eq!(count(&during, 200), 300, "{during:?}");
    let opened = format!("backend {victim_addr}: circuit breaker closed -> open");
    assert!(gw.log().contains(&opened), "{}", gw.log());
    // Once open, the dead backend is not even tried: Pingora logs each failed attempt, and
    // there are a handful (the 3 that opened it, racing workers, a probe), not a third of 300.
    let attempts = gw.log().matches(&format!("addr: {victim_addr}")).count();
    assert!(
        (3..=12).contains(&attempts),
        "{attempts} attempts at the dead backend"
    );

    let revived = Upstream::with_on(victim_addr, Behavior::default()).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(count(&statuses(&url, 60, 1).await, 200), 60);
    assert!(
        revived.count() >= 10,
        "the revived backend got {} requests",
        revived.count()
    );
    let log = gw.log();
    assert!(
        log.contains(&format!(
            "backend {victim_addr}: circuit breaker open -> half_open"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "backend {victim_addr}: circuit breaker half_open -> closed"
        )),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_60_percent_5xx_backend_trips_the_rate_rule() {
    let good = Upstream::start().await;
    let bad = Upstream::with(Behavior {
        status_cycle: vec![503, 503, 503, 200, 200],
        ..Behavior::default()
    })
    .await;
    let gw = gateway(
        &[good.addr, bad.addr],
        "    circuit_breaker: { consecutive_failures: 0, failure_rate: 50, min_requests: 10, window: 10s, open_for: 30s }\n",
    );
    let first = statuses(&gw.url("/"), 40, 1).await;
    // The rate rule needs 10 requests, then trips at the next failure (60% ≥ 50%).
    assert_eq!(bad.count(), 11, "{first:?}");
    assert!(gw.log().contains(&format!(
        "backend {}: circuit breaker closed -> open",
        bad.addr
    )));
    let after = statuses(&gw.url("/"), 40, 2).await;
    assert_eq!(count(&after, 200), 40);
    assert_eq!(bad.count(), 11, "an open backend got traffic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_calls_trip_the_breaker() {
    let slow = Upstream::with(Behavior {
        delay: Duration::from_millis(300),
        ..Behavior::default()
    })
    .await;
    let fast = Upstream::start().await;
    let gw = gateway(
        &[slow.addr, fast.addr],
        "    circuit_breaker: { slow_call: 100ms, consecutive_failures: 3, open_for: 30s }\n",
    );
    let s = statuses(&gw.url("/"), 20, 1).await;
    assert_eq!(
        count(&s, 200),
        20,
        "slow calls still succeed for the client"
    );
    assert_eq!(slow.count(), 3, "three slow calls open the breaker");
    assert_eq!(fast.count(), 17);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_is_not_a_slow_call() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start().await;
    let gw = gateway(
        &[up.addr],
        "    circuit_breaker: { slow_call: 200ms, consecutive_failures: 2, open_for: 30s }\n",
    );
    // Three uploads, each taking ~600 ms to send its body to a backend that answers at once.
    for i in 0..3 {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(
            b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 9\r\nConnection: close\r\n\r\nabc",
        )
        .await
        .unwrap();
        for part in [&b"def"[..], b"ghi"] {
            tokio::time::sleep(Duration::from_millis(300)).await;
            s.write_all(part).await.unwrap();
        }
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
            .await
            .expect("no answer")
            .unwrap();
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "upload {i}: {text}");
    }
    assert_eq!(up.count(), 3);
    assert!(
        !gw.log().contains("circuit breaker closed -> open"),
        "slow uploads opened the breaker\n{}",
        gw.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_breaker_is_open_the_answer_is_an_immediate_503() {
    let bad = Upstream::with(Behavior {
        status: 502,
        ..Behavior::default()
    })
    .await;
    let gw = gateway(
        &[bad.addr],
        "    circuit_breaker: { consecutive_failures: 2, open_for: 30s }\n",
    );
    let c = client();
    for _ in 0..2 {
        assert_eq!(
            c.get(gw.url("/")).send().await.unwrap().status(),
            502,
            "the upstream's own 502"
        );
    }
    let started = Instant::now();
    let r = c.get(gw.url("/")).send().await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(r.status(), 503);
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (25..=30).contains(&retry_after),
        "Retry-After {retry_after}"
    );
    assert_eq!(
        error_json(&r.text().await.unwrap())["error"],
        "circuit breaker open for every backend"
    );
    assert_eq!(
        bad.count(),
        2,
        "the open breaker answered without touching the network"
    );
}

const HEALTH: &str = "    health_check: { kind: http, path: /healthz, host: health.internal, interval: 100ms, timeout: 500ms, healthy: 2, unhealthy: 2 }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_take_a_backend_out_and_bring_it_back() {
    let a = Upstream::start().await;
    let b = Upstream::start().await;
    let gw = gateway(&[a.addr, b.addr], HEALTH);
    assert!(
        eventually(Duration::from_secs(5), || b.count() > b.traffic()).await,
        "no health checks"
    );
    let check = b
        .received()
        .into_iter()
        .find(|r| r.path == "/healthz")
        .unwrap();
    assert_eq!(check.header("host"), Some("health.internal"));

    b.set(Behavior {
        status: 503,
        ..Behavior::default()
    });
    let down = format!("upstream u backend {} is unhealthy", b.addr);
    assert!(
        eventually(Duration::from_secs(5), || gw.log().contains(&down)).await,
        "{}",
        gw.log()
    );
    let before = b.traffic();
    assert_eq!(count(&statuses(&gw.url("/"), 40, 2).await, 200), 40);
    assert_eq!(b.traffic(), before, "an unhealthy backend got traffic");

    b.set(Behavior::default());
    let up = format!("upstream u backend {} is healthy again", b.addr);
    assert!(
        eventually(Duration::from_secs(5), || gw.log().contains(&up)).await,
        "{}",
        gw.log()
    );
    statuses(&gw.url("/"), 40, 2).await;
    assert!(
        b.traffic() >= before + 15,
        "the recovered backend got {} requests",
        b.traffic() - before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_unhealthy_is_503_unless_failing_open() {
    let a = Upstream::with(Behavior {
        status: 500,
        ..Behavior::default()
    })
    .await;
    let closed = gateway(&[a.addr], HEALTH);
    let open = gateway(
        &[a.addr],
        &HEALTH.replace("unhealthy: 2 }", "unhealthy: 2, fail_open: true }"),
    );
    let down = format!("backend {} is unhealthy", a.addr);
    for gw in [&closed, &open] {
        assert!(eventually(Duration::from_secs(5), || gw.log().contains(&down)).await);
    }
    let r = client().get(closed.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(
        error_json(&r.text().await.unwrap())["error"],
        "no healthy backend"
    );
    let before = a.traffic();
    // Failing open, the request reaches the (unhealthy) backend and its answer passes through.
    assert_eq!(
        client().get(open.url("/")).send().await.unwrap().status(),
        500
    );
    assert_eq!(a.traffic(), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_health_check_marks_a_dead_backend_down() {
    let live = Upstream::start().await;
    let dead: SocketAddr = format!("127.0.0.1:{}", common::reserve_port())
        .parse()
        .unwrap();
    let gw = gateway(
        &[live.addr, dead],
        "    health_check: { kind: tcp, interval: 100ms, timeout: 200ms, unhealthy: 1 }\n    retries: { attempts: 0 }\n",
    );
    let down = format!("backend {dead} is unhealthy");
    assert!(
        eventually(Duration::from_secs(5), || gw.log().contains(&down)).await,
        "{}",
        gw.log()
    );
    // With no retries at all, only health keeps requests away from the dead backend.
    assert_eq!(count(&statuses(&gw.url("/"), 20, 1).await, 200), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_retries_are_bounded_by_the_budget() {
    let a = Upstream::with(Behavior {
        status: 503,
        ..Behavior::default()
    })
    .await;
    let b = Upstream::start().await;
    let gw = gateway(
        &[a.addr, b.addr],
        "    circuit_breaker: { enabled: false }\n    retries: { attempts: 1, statuses: [503], budget_percent: 20, backoff: 1ms }\n",
    );
    let n = 100;
    let s = statuses(&gw.url("/"), n, 1).await;
    let retries = a.count() + b.count() - n;
    // At most 20% of the 100 requests are retried (the floor of 3 per window is inside that).
    // Round robin gives each retry the next slot, so first attempts keep landing on `a` and the
    // budget, not the balancer, is what stops the retries.
    assert!((15..=20).contains(&retries), "{retries} retries");
    // Retries never go back to `a`: every 200 came from `b`, every first try at `a` that was
    // not retried passed `a`'s 503 through.
    assert_eq!(count(&s, 200), b.count());
    assert_eq!(count(&s, 503), a.count() - retries);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_are_retried_for_idempotent_requests_only() {
    let slow = Upstream::with(Behavior {
        delay: Duration::from_secs(3),
        ..Behavior::default()
    })
    .await;
    let fast = Upstream::start().await;
    let gw = gateway(
        &[slow.addr, fast.addr],
        // A budget of 100% keeps the budget's floor (3 per window) out of this test.
        "    circuit_breaker: { enabled: false }\n    timeouts: { read: 300ms }\n    retries: { on: [timeout], backoff: 1ms, budget_percent: 100 }\n",
    );
    let c = client();
    for _ in 0..4 {
        assert_eq!(
            c.get(gw.url("/")).send().await.unwrap().status(),
            200,
            "{}",
            gw.log()
        );
    }
    let mut posts = Vec::new();
    for _ in 0..4 {
        posts.push(
            c.post(gw.url("/"))
                .body("x")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    posts.sort();
    assert_eq!(
        posts,
        [200, 200, 504, 504],
        "a POST that timed out was retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_outgrew_the_replay_buffer_is_never_resent() {
    let crashing = Upstream::with(Behavior {
        close_without_answer: true,
        ..Behavior::default()
    })
    .await;
    let ok = Upstream::start().await;
    let gw = gateway(
        &[crashing.addr, ok.addr],
        "    circuit_breaker: { enabled: false }\n    retries: { methods: all, on: [reset], budget_percent: 100, backoff: 1ms }\n",
    );
    let c = client();
    // A small POST (fits the 64 KiB replay buffer) is resent to the other backend...
    let r = c
        .post(gw.url("/"))
        .body(vec![b'a'; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(ok.last().body_len, 1000, "the retry carried the whole body");
    // ...a 1 MiB POST that already streamed past it is not: the first try's failure stands.
    let r = c
        .post(gw.url("/"))
        .body(vec![b'b'; 1 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(ok.count(), 1, "a truncated body was resent");
    assert_eq!(crashing.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_flight_cap_answers_503() {
    let slow = Upstream::with(Behavior {
        delay: Duration::from_millis(800),
        ..Behavior::default()
    })
    .await;
    let gw = gateway(&[slow.addr], "    circuit_breaker: { max_in_flight: 2 }\n");
    let s = statuses(&gw.url("/"), 6, 6).await;
    assert_eq!(count(&s, 200), 2, "{s:?}");
    assert_eq!(count(&s, 503), 4, "{s:?}");
    assert_eq!(slow.count(), 2);
    let r = client().get(gw.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200, "capacity is back once requests finish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_discovery_follows_the_records_and_keeps_the_last_good_set() {
    // Discovered backends share the configured port, so they listen on 127.0.0.2 and .3.
    let port = common::reserve_port();
    let ip2 = Ipv4Addr::new(127, 0, 0, 2);
    let ip3 = Ipv4Addr::new(127, 0, 0, 3);
    let up2 = Upstream::with_on(SocketAddr::from((ip2, port)), Behavior::default()).await;
    let up3 = Upstream::with_on(SocketAddr::from((ip3, port)), Behavior::default()).await;
    let dns = DnsServer::start(&[ip2]).await;
    let gw = TestGateway::start(&format!(
        "upstreams:\n  svc:\n    discovery: {{ kind: dns, name: api.svc.test, port: {port}, refresh: 200ms, nameservers: [\"{}\"] }}\nroutes: [{{ name: all, upstream: svc }}]\n",
        dns.addr
    ));
    let url = gw.url("/");
    let c = client();
    let first = Instant::now();
    while c.get(&url).send().await.unwrap().status() != 200 {
        assert!(
            first.elapsed() < Duration::from_secs(5),
            "discovery found nothing: {}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    statuses(&url, 10, 1).await;
    assert_eq!(up3.count(), 0);

    // Removing a backend does not disturb a request already sent to it.
    up2.set(Behavior {
        delay: Duration::from_millis(800),
        ..Behavior::default()
    });
    let slow = tokio::spawn(client().get(url.clone()).send());
    assert!(eventually(Duration::from_secs(5), || up2.active() == 1).await);
    dns.set(Some(&[ip3]));
    let removed = format!("removed [{ip2}:{port}]");
    assert!(eventually(Duration::from_secs(5), || gw.log().contains(&removed)).await);
    assert_eq!(
        slow.await.unwrap().unwrap().status(),
        200,
        "the in-flight request was cut"
    );
    up2.set(Behavior::default());
    let before = up2.count();
    assert_eq!(count(&statuses(&url, 10, 1).await, 200), 10);
    assert_eq!(up2.count(), before, "a removed backend got traffic");
    // Its latency series went with it (under discovery, every rollout brings new addresses).
    let m = gw.metrics().await;
    let series = |ip: Ipv4Addr| {
        format!(
            "tollgate_upstream_duration_seconds_count{{backend=\"{ip}:{port}\",upstream=\"svc\"}}"
        )
    };
    assert!(m.contains(&series(ip3)), "{m}");
    assert!(
        !m.contains(&series(ip2)),
        "a removed backend's series is still exported"
    );

    dns.set(Some(&[ip2, ip3]));
    let added = format!("added [{ip2}:{port}]");
    assert!(
        eventually(Duration::from_secs(5), || gw.log().matches(&added).count()
            == 2)
        .await
    );
    assert_eq!(count(&statuses(&url, 20, 1).await, 200), 20);
    assert!(
        up2.count() >= before + 5,
        "the re-added backend got {} requests",
        up2.count() - before
    );

    dns.set(None); // the resolver fails from now on
    let queries = dns.queries();
    assert!(eventually(Duration::from_secs(5), || dns.queries() > queries + 2).await);
    assert_eq!(
        count(&statuses(&url, 20, 1).await, 200),
        20,
        "the last good set keeps serving"
    );
    assert!(gw.log().contains("keeping the last good backend set"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zookeeper_discovery_watches_children_and_survives_a_restart() {
    use zookeeper_client::{Acls, Client, CreateMode};
    let mut zk = ZooKeeper::start();
    let up1 = Upstream::start().await;
    let up2 = Upstream::start().await;
    let zkc = Client::connect(&zk.connect_string()).await.unwrap();
    let opts = CreateMode::Persistent.with_acls(Acls::anyone_all());
    zkc.create("/services", b"", &opts).await.unwrap();
    zkc.create("/services/api", b"", &opts).await.unwrap();
    zkc.create(&format!("/services/api/{}", up1.addr), b"", &opts)
        .await
        .unwrap();
    // A child not named IP:port carries the address as data.
    let gw = TestGateway::start(&format!(
        "upstreams:\n  api:\n    discovery: {{ kind: zookeeper, servers: [\"{}\"], path: /services/api, session_timeout: 4s }}\nroutes: [{{ name: all, upstream: api }}]\n",
        zk.connect_string()
    ));
    let url = gw.url("/");
    assert!(
        eventually(Duration::from_secs(10), || gw
            .log()
            .contains(&format!("added [{}]", up1.addr)))
        .await,
        "{}",
        gw.log()
    );
    assert_eq!(count(&statuses(&url, 10, 1).await, 200), 10);
    assert_eq!(up1.count(), 10);

    zkc.create(
        "/services/api/node-2",
        up2.addr.to_string().as_bytes(),
        &opts,
    )
    .await
    .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || gw
            .log()
            .contains(&format!("added [{}]", up2.addr)))
        .await
    );
    statuses(&url, 20, 1).await;
    assert!(up2.count() >= 5);

    zkc.delete(&format!("/services/api/{}", up1.addr), None)
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || gw
            .log()
            .contains(&format!("removed [{}]", up1.addr)))
        .await
    );
    let before = up1.count();
    statuses(&url, 10, 1).await;
    assert_eq!(up1.count(), before);
    drop(zkc);

    // ZooKeeper goes away: the last good set keeps serving.
    zk.stop();
    assert_eq!(count(&statuses(&url, 10, 1).await, 200), 10);
    zk.restart();
    // The watch is back (same session resumed, or a new one): a new child is seen.
    let zkc = Client::connect(&zk.connect_string()).await.unwrap();
    zkc.create(&format!("/services/api/{}", up1.addr), b"", &opts)
        .await
        .unwrap();
    let added_again = format!("added [{}]", up1.addr);
    assert!(
        eventually(Duration::from_secs(20), || gw
            .log()
            .matches(&added_again)
            .count()
            >= 2)
        .await,
        "{}",
        gw.log()
    );
    let before = up1.count();
    statuses(&url, 20, 1).await;
    assert!(up1.count() > before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_cut_after_its_head_is_never_retried_into_another() {
    let dying = Upstream::with(Behavior {
        body: vec![b'a'; 100],
        truncate_body: Some(10),
        ..Behavior::default()
    })
    .await;
    let ok = Upstream::with(Behavior {
        body: vec![b'b'; 100],
        ..Behavior::default()
    })
    .await;
    let gw = gateway(
        &[dying.addr, ok.addr],
        "    circuit_breaker: { enabled: false }\n    retries: { on: [reset, timeout] }\n",
    );
    let r = client().get(gw.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200, "the head was already sent");
    // The body must fail to complete: never 10 bytes of one backend and 90 of another.
    match r.bytes().await {
        Err(_) => {}
        Ok(body) => panic!(
            "got a complete body of {} bytes: {:?}",
            body.len(),
            String::from_utf8_lossy(&body)
        ),
    }
    assert_eq!(
        ok.count(),
        0,
        "the request was retried after its response had started"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_limit_is_not_tripped_by_a_replayed_body() {
    // Every request after the first finds its pooled connection dead and is replayed by
    // Pingora: the 40 KiB body goes through the body filters twice.
    let up = Upstream::with(Behavior {
        drop_reused: true,
        ..Behavior::default()
    })
    .await;
    let gw = TestGateway::start(&format!(
        "upstreams: {{ u: {{ backends: [{{ address: \"{}\" }}] }} }}\nroutes:\n  - name: all\n    upstream: u\n    filters: [{{ kind: limits, max_body_size: 64KiB }}]\n",
        up.addr
    ));
    let c = client();
    for i in 0..5 {
        let chunks =
            futures_util::stream::iter((0..10).map(|_| Ok::<_, std::io::Error>(vec![b'x'; 4096])));
        let r = c
            .put(gw.url("/"))
            .body(reqwest::Body::wrap_stream(chunks))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "PUT {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interim_100_is_not_the_attempts_outcome() {
    // A backend that answers `100 Continue`, takes the body, then fails with 503: the
    // breaker must see the 503, not the 100.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 1024];
                loop {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                    if got.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let _ = s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
                while !got.ends_with(b"hello") {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                let _ = s
                    .write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
                    .await;
            });
        }
    });
    let gw = gateway(
        &[addr],
        "    circuit_breaker: { consecutive_failures: 2, open_for: 30s }\n",
    );
    for i in 0..2 {
        let got = tokio::task::spawn_blocking({
            let gw_addr = gw.addr;
            move || {
                common::raw_exchange(
                    gw_addr,
                    b"POST /up HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
                    Duration::from_secs(5),
                )
            }
        })
        .await
        .unwrap();
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.contains("HTTP/1.1 503"),
            "request {i}: {text}\n{}",
            gw.log()
        );
    }
    let opened = format!("backend {addr}: circuit breaker closed -> open");
    assert!(
        eventually(Duration::from_secs(2), || gw.log().contains(&opened)).await,
        "two 503s after a 100 did not open the breaker\n{}",
        gw.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_that_found_nothing_yet_is_no_backend_even_with_a_health_check() {
    let dns = DnsServer::start(&[]).await;
    let port = common::reserve_port();
    let gw = TestGateway::start(&format!(
        "upstreams:\n  svc:\n    discovery: {{ kind: dns, name: api.svc.test, port: {port}, refresh: 200ms, nameservers: [\"{}\"] }}\n{HEALTH}routes: [{{ name: all, upstream: svc }}]\n",
        dns.addr
    ));
    let r = client().get(gw.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        error_json(&r.text().await.unwrap())["error"],
        "no backend available",
        "{}",
        gw.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_is_ready_once_its_discovery_has_answered() {
    let port = common::reserve_port();
    let ip = Ipv4Addr::new(127, 0, 0, 2);
    let _up = Upstream::with_on(SocketAddr::from((ip, port)), Behavior::default()).await;
    let dns = DnsServer::start(&[ip]).await;
    dns.set(None);
    let gw = TestGateway::start(&format!(
        "upstreams:\n  svc:\n    discovery: {{ kind: dns, name: api.svc.test, port: {port}, refresh: 200ms, nameservers: [\"{}\"] }}\nroutes: [{{ name: all, upstream: svc }}]\n",
        dns.addr
    ));
    let ready = format!("http://{}/health/ready", gw.admin);
    let (status, body) = common::get(&ready).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("upstream svc: discovery has not answered yet"),
        "{body}"
    );
    dns.set(Some(&[ip]));
    assert!(
        eventually(Duration::from_secs(5), || gw
            .log()
            .contains("discovery added"))
        .await,
        "{}",
        gw.log()
    );
    assert_eq!(common::get(&ready).await.0, 200);
    // Once it has answered, a failing discovery keeps the last set and the process ready.
    dns.set(None);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(common::get(&ready).await.0, 200);
}

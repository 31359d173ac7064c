//! Observability and zero-downtime operations through the real process: metrics (checked by
//! promtool), the admin API, the access log, hot reload under load (SIGHUP and POST /reload),
//! readiness during shutdown, and repeated binary upgrades under load.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Behavior, GatewayConfig, TestGateway, Upstream, client, eventually, get};
use nix::sys::signal::Signal;

fn metric(exposition: &str, name_and_labels: &str) -> Option<f64> {
    exposition
        .lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn promtool_check(exposition: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed by `make test` (Debian package prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_count_known_traffic() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&format!(
        "upstreams: {{ api: {{ backends: [{{ address: \"{}\" }}] }} }}\nroutes: [{{ name: api, upstream: api, match: {{ path_prefix: /api }} }}]\n",
        up.addr
    ));
    for _ in 0..5 {
        assert_eq!(get(&gw.url("/api/x")).await.0, 200);
    }
    for _ in 0..2 {
        assert_eq!(get(&gw.url("/nowhere")).await.0, 404);
    }
    let resp = client()
        .post(gw.url("/api/x"))
        .body(vec![0u8; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
    let (status, m) = get(&format!("http://{}/metrics", gw.admin)).await;
    assert_eq!(status, 200);
    promtool_check(&m);
    let v = |s: &str| metric(&m, s).unwrap_or_else(|| panic!("{s} missing:\n{m}"));
    assert_eq!(
        v(r#"tollgate_requests_total{method="GET",route="api",status_class="2xx"}"#),
        5.0
    );
    assert_eq!(
        v(r#"tollgate_requests_total{method="POST",route="api",status_class="2xx"}"#),
        1.0
    );
    assert_eq!(
        v(r#"tollgate_requests_total{method="GET",route="none",status_class="4xx"}"#),
        2.0
    );
    assert_eq!(
        v(r#"tollgate_request_duration_seconds_count{route="api"}"#),
        6.0
    );
    assert_eq!(v(r#"tollgate_request_bytes_total{route="api"}"#), 1000.0);
    assert_eq!(v(r#"tollgate_response_bytes_total{route="api"}"#), 12.0);
    let backend = up.addr.to_string();
    assert_eq!(
        v(&format!(
            r#"tollgate_upstream_duration_seconds_count{{backend="{backend}",upstream="api"}}"#
        )),
        6.0
    );
    assert_eq!(
        v(&format!(
            r#"tollgate_backend_healthy{{backend="{backend}",upstream="api"}}"#
        )),
        1.0
    );
    assert_eq!(
        v(&format!(
            r#"tollgate_backend_breaker_state{{backend="{backend}",state="closed",upstream="api"}}"#
        )),
        1.0
    );
    assert!(v("tollgate_downstream_connections_total") >= 1.0);
    assert_eq!(
        v(r#"tollgate_build_info{pingora="0.9.1",version="0.1.0"}"#),
        1.0
    );
    assert_eq!(
        v(r#"tollgate_config_reloads_total{outcome="success"}"#),
        0.0
    );
    assert_eq!(
        v("tollgate_requests_in_flight"),
        0.0,
        "in-flight must return to 0"
    );
    // The process metrics the dashboard's CPU and memory panels read: this process's own.
    let rss = v("process_resident_memory_bytes");
    assert!(rss > 1e6 && rss < 4e9, "implausible RSS {rss}");
    assert!(v("process_open_fds") >= 3.0);
    let started = v("process_start_time_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        now - started >= 0.0 && now - started < 600.0,
        "start time {started}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_upstreams_config_and_token() {
    let up = Upstream::start().await;
    let token = "s3cret-token-0123456789";
    let gw = GatewayConfig::new(format!(
        "filters: [{{ kind: tracing }}]\nupstreams: {{ api: {{ backends: [{{ address: \"{}\" }}] }} }}\nroutes: [{{ name: api, upstream: api, filters: [{{ kind: auth, api_keys: [key-one-1234] }}, {{ kind: auth, jwt: {{ secret: jwt-secret-0123456789-0123456789-abc }} }}, {{ kind: rate_limit, rate: 5/s, backend: {{ kind: redis, url: \"redis://:redis-pw-0123@127.0.0.1:1/0\" }} }}] }}]\n",
        up.addr
    ))
    .admin(&format!("token: {token}"))
    .start();
    let admin = |p: &str| format!("http://{}{p}", gw.admin);
    // Health checks stay open; everything else needs the token.
    assert_eq!(get(&admin("/health")).await.0, 200);
    assert_eq!(get(&admin("/health/ready")).await.0, 200);
    for p in ["/metrics", "/upstreams", "/config"] {
        assert_eq!(get(&admin(p)).await.0, 401, "{p}");
    }
    let wrong = client()
        .get(admin("/config"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let auth = |p: &str| client().get(admin(p)).bearer_auth(token).send();
    let ups: serde_json::Value =
        serde_json::from_str(&auth("/upstreams").await.unwrap().text().await.unwrap()).unwrap();
    let b = &ups["upstreams"][0]["backends"][0];
    assert_eq!(b["address"], up.addr.to_string());
    assert_eq!(b["healthy"], true);
    assert_eq!(b["breaker"], "closed");
    let cfg_text = auth("/config").await.unwrap().text().await.unwrap();
    for secret in [
        token,
        "key-one-1234",
        "jwt-secret-0123456789-0123456789-abc",
        "redis-pw-0123",
    ] {
        assert!(
            !cfg_text.contains(secret),
            "{secret} leaked through /config: {cfg_text}"
        );
    }
    let cfg: serde_json::Value = serde_json::from_str(&cfg_text).unwrap();
    assert_eq!(cfg["admin"]["token"], "<redacted>");
    assert_eq!(cfg["routes"][0]["upstream"], "api");
    assert_eq!(cfg["filters"][0]["kind"], "tracing");
    let route_filters = &cfg["routes"][0]["filters"];
    assert_eq!(route_filters[0]["kind"], "auth");
    assert_eq!(route_filters[0]["api_keys"], "<redacted>");
    assert_eq!(route_filters[1]["jwt"]["secret"], "<redacted>");
    assert_eq!(route_filters[2]["rate"], "5/s");
    assert_eq!(
        route_filters[2]["backend"]["url"],
        "redis://:<redacted>@127.0.0.1:1/0"
    );
    let r = client()
        .get(admin("/reload"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405, "reload is POST only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_has_one_json_line_per_request() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let gw = TestGateway::start(&format!(
        "access_log: {{ format: json, path: \"{}\" }}\nupstreams: {{ api: {{ backends: [{{ address: \"{}\" }}] }} }}\nroutes: [{{ name: api, upstream: api, match: {{ path_prefix: /api }} }}]\n",
        path.display(),
        up.addr
    ));
    let r = client()
        .get(gw.url("/api/a?b=1"))
        .header("host", "shop.test")
        .send()
        .await
        .unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    r.bytes().await.unwrap();
    assert_eq!(get(&gw.url("/missing")).await.0, 404);
    let lines = || std::fs::read_to_string(&path).unwrap_or_default();
    assert!(eventually(Duration::from_secs(5), || lines().lines().count() >= 2).await);
    let entries: Vec<serde_json::Value> = lines()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ok = entries
        .iter()
        .find(|e| e["request_id"] == id.as_str())
        .expect("line for the request");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["method"], "GET");
    assert_eq!(ok["host"], "shop.test");
    assert_eq!(ok["path"], "/api/a?b=1");
    assert_eq!(ok["route"], "api");
    assert_eq!(ok["upstream"], "api");
    assert_eq!(ok["backend"], up.addr.to_string());
    assert_eq!(ok["client"], "127.0.0.1");
    assert_eq!(ok["bytes_out"], 2);
    assert_eq!(ok["attempts"], 1);
    assert!(ok["upstream_ms"].as_f64().unwrap() >= 0.0);
    assert!(ok["total_ms"].as_f64().unwrap() >= ok["upstream_ms"].as_f64().unwrap());
    assert!(ok["time"].as_str().unwrap().ends_with('Z'));
    let missing = entries.iter().find(|e| e["status"] == 404).unwrap();
    assert_eq!(missing["route"], "");
    assert_eq!(missing["attempts"], 0);
}

fn routes_to(a: SocketAddr) -> String {
    format!(
        "upstreams:\n  u:\n    backends: [{{ address: \"{a}\" }}]\nroutes: [{{ name: all, upstream: u }}]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_under_load_lose_nothing_and_a_bad_one_changes_nothing() {
    let one = Upstream::start().await;
    let two = Upstream::start().await;
    let gw = TestGateway::start(&routes_to(one.addr));
    let conf = gw.config_path();
    let base = std::fs::read_to_string(&conf).unwrap();
    let with_route = |a: SocketAddr| base.replace(&one.addr.to_string(), &a.to_string());

    // Continuous bounded load from 4 clients while reloading.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (stop, failures, sent, url) =
            (stop.clone(), failures.clone(), sent.clone(), gw.url("/"));
        workers.push(tokio::spawn(async move {
            let c = client();
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match c.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.bytes().await;
                    }
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for i in 0..20 {
        let target = if i % 2 == 0 { two.addr } else { one.addr };
        std::fs::write(&conf, with_route(target)).unwrap();
        let reloaded = i + 1;
        gw.signal(Signal::SIGHUP);
        assert!(
            eventually(Duration::from_secs(5), || gw
                .log()
                .matches("configuration reloaded")
                .count()
                >= reloaded)
            .await,
            "reload {reloaded} not applied:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "requests failed during reloads"
    );
    assert!(sent.load(Ordering::Relaxed) > 100);
    // The last reload (i = 19) routes to `one`: new traffic follows it.
    let before = (one.count(), two.count());
    for _ in 0..10 {
        assert_eq!(get(&gw.url("/")).await.0, 200);
    }
    assert_eq!((one.count() - before.0, two.count() - before.1), (10, 0));
    // The backend the reload dropped took its latency series with it.
    let (_, m) = get(&format!("http://{}/metrics", gw.admin)).await;
    let series = |a: std::net::SocketAddr| {
        format!(r#"tollgate_upstream_duration_seconds_count{{backend="{a}",upstream="u"}}"#)
    };
    assert!(metric(&m, &series(one.addr)).is_some(), "{m}");
    assert_eq!(metric(&m, &series(two.addr)), None, "{m}");

    // A broken configuration is refused: the old one keeps serving, the failure is counted.
    std::fs::write(
        &conf,
        with_route(two.addr).replace("upstream: u }", "upstream: nope }"),
    )
    .unwrap();
    let r = client()
        .post(format!("http://{}/reload", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body = r.text().await.unwrap();
    assert!(body.contains("no upstream named"), "{body}");
    gw.signal(Signal::SIGHUP);
    assert!(
        eventually(Duration::from_secs(5), || gw
            .log()
            .matches("configuration reload failed")
            .count()
            >= 2)
        .await
    );
    let before = one.count();
    assert_eq!(get(&gw.url("/")).await.0, 200);
    assert_eq!(
        one.count(),
        before + 1,
        "the old configuration must keep serving"
    );
    let (_, m) = get(&format!("http://{}/metrics", gw.admin)).await;
    assert_eq!(
        metric(&m, r#"tollgate_config_reloads_total{outcome="failure"}"#),
        Some(2.0)
    );
    assert_eq!(
        metric(&m, r#"tollgate_config_reloads_total{outcome="success"}"#),
        Some(20.0)
    );
    assert_eq!(metric(&m, "tollgate_config_last_reload_success"), Some(0.0));

    // Listeners cannot change on reload: refused with a clear message.
    std::fs::write(
        &conf,
        with_route(one.addr).replace(&gw.addr.to_string(), "127.0.0.1:1"),
    )
    .unwrap();
    let r = client()
        .post(format!("http://{}/reload", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("listeners cannot change on reload")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_state_survives_a_reload_of_an_unchanged_upstream() {
    let bad = Upstream::with(Behavior {
        status: 502,
        ..Behavior::default()
    })
    .await;
    let other = Upstream::start().await;
    let gw = TestGateway::start(&format!(
        "upstreams:\n  bad:\n    backends: [{{ address: \"{}\" }}]\n    circuit_breaker: {{ consecutive_failures: 2, open_for: 60s }}\n  other:\n    backends: [{{ address: \"{}\" }}]\nroutes:\n  - {{ name: bad, upstream: bad, match: {{ path_prefix: /bad }} }}\n  - {{ name: other, upstream: other }}\n",
        bad.addr, other.addr
    ));
    for _ in 0..2 {
        assert_eq!(get(&gw.url("/bad")).await.0, 502);
    }
    assert_eq!(get(&gw.url("/bad")).await.0, 503, "breaker open");
    // Reload with a change elsewhere: the `bad` upstream is unchanged and keeps its open breaker.
    let conf = gw.config_path();
    let text = std::fs::read_to_string(&conf).unwrap().replace(
        "name: other, upstream: other",
        "name: other2, upstream: other",
    );
    std::fs::write(&conf, text).unwrap();
    let r = client()
        .post(format!("http://{}/reload", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        get(&gw.url("/bad")).await.0,
        503,
        "breaker state was lost on reload"
    );
    assert_eq!(bad.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_an_upstream_and_rotates_the_admin_token() {
    let a = Upstream::start().await;
    let b = Upstream::start().await;
    let (old_token, new_token) = ("first-token-0123456789", "second-token-0123456789");
    let gw = GatewayConfig::new(routes_to(a.addr))
        .admin(&format!("token: {old_token}"))
        .start();
    let admin = |p: &str| format!("http://{}{p}", gw.admin);
    let config = |token: &str| client().get(admin("/config")).bearer_auth(token).send();
    let pool = |c: &serde_json::Value| c["server"]["upstream_keepalive_pool_size"].clone();
    let before: serde_json::Value =
        serde_json::from_str(&config(old_token).await.unwrap().text().await.unwrap()).unwrap();
    // A second upstream (its default pool raises the derived total) and a new token.
    let conf = gw.config_path();
    let text = std::fs::read_to_string(&conf)
        .unwrap()
        .replace(old_token, new_token)
        .replace(
            "routes: [",
            &format!(
                "  v:\n    backends: [{{ address: \"{}\" }}]\nroutes: [{{ name: v, upstream: v, match: {{ path_prefix: /v }} }}, ",
                b.addr
            ),
        );
    std::fs::write(&conf, text).unwrap();
    let r = client()
        .post(admin("/reload"))
        .bearer_auth(old_token)
        .send()
        .await
        .unwrap();
    let status = r.status();
    assert_eq!(status, 200, "{}\n{}", r.text().await.unwrap(), gw.log());
    assert_eq!(get(&gw.url("/v/x")).await.0, 200);
    assert_eq!(b.count(), 1, "the new upstream serves its route");
    assert_eq!(config(old_token).await.unwrap().status(), 401);
    let after = config(new_token).await.unwrap();
    assert_eq!(after.status(), 200);
    let after: serde_json::Value = serde_json::from_str(&after.text().await.unwrap()).unwrap();
    assert_eq!(
        pool(&after),
        pool(&before),
        "/config shows the pool the process runs with"
    );
    // The scheme is case-insensitive.
    let lower = client()
        .get(admin("/upstreams"))
        .header("authorization", format!("bearer {new_token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(lower.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_on_change_picks_up_an_edited_file_once_and_skips_a_broken_one() {
    let one = Upstream::start().await;
    let two = Upstream::start().await;
    let gw = GatewayConfig::new(routes_to(one.addr))
        .server("reload_on_change: 200ms")
        .start();
    assert_eq!(get(&gw.url("/x")).await.0, 200);
    assert_eq!(one.count(), 1);
    let reloads = |m: &str| metric(m, r#"tollgate_config_reloads_total{outcome="success"}"#);
    let failures = |m: &str| metric(m, r#"tollgate_config_reloads_total{outcome="failure"}"#);
    let metrics = || async { get(&format!("http://{}/metrics", gw.admin)).await.1 };
    // Nothing changed: no reload however long we wait.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(reloads(&metrics().await), Some(0.0));

    // Edit the file (no signal, no POST): the next check reloads it, once.
    let conf = gw.config_path();
    let text = std::fs::read_to_string(&conf).unwrap();
    // Replaced whole (as an editor or a ConfigMap update does): a check never sees it half
    // written.
    let replace = |content: &str| {
        let tmp = conf.with_extension("new");
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, &conf).unwrap();
    };
    replace(&text.replace(&one.addr.to_string(), &two.addr.to_string()));
    let start = Instant::now();
    while two.count() == 0 && start.elapsed() < Duration::from_secs(5) {
        let _ = get(&gw.url("/x")).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        two.count() > 0,
        "the edited file was not picked up:\n{}",
        gw.log()
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        reloads(&metrics().await),
        Some(1.0),
        "one change, one reload"
    );

    // A broken edit is refused once (counted), the old configuration keeps serving, and it is
    // not retried until the file changes again.
    replace("listeners: [oops\n");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let m = metrics().await;
    assert_eq!(failures(&m), Some(1.0), "{m}");
    assert_eq!(get(&gw.url("/y")).await.0, 200);
    assert_eq!(metric(&m, "tollgate_config_last_reload_success"), Some(0.0));
}

/// Send `GET /health/ready` on an open keep-alive connection; the status, or None if the
/// connection is gone.
fn ready_on(conn: &mut TcpStream) -> Option<u16> {
    conn.write_all(b"GET /health/ready HTTP/1.1\r\nHost: a\r\n\r\n")
        .ok()?;
    let mut buf = [0u8; 4096];
    let n = conn.read(&mut buf).ok()?;
    let head = String::from_utf8_lossy(&buf[..n]);
    head.get(9..12)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_readiness_off_first_then_drains() {
    let up = Upstream::with(Behavior {
        delay: Duration::from_millis(1500),
        ..Behavior::default()
    })
    .await;
    let mut gw = GatewayConfig::new(routes_to(up.addr))
        .server("grace_period: 2s\ngraceful_shutdown_timeout: 1s")
        .start();
    let mut conn = TcpStream::connect(gw.admin).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert_eq!(ready_on(&mut conn), Some(200));
    let url = gw.url("/");
    let in_flight =
        tokio::spawn(async move { client().get(url).send().await.map(|r| r.status().as_u16()) });
    assert!(eventually(Duration::from_secs(5), || up.active() == 1).await);
    let t0 = Instant::now();
    gw.signal(Signal::SIGTERM);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Readiness is never 200 again: 503 on the open connection, or no answer at all.
    let after = ready_on(&mut conn);
    assert_ne!(after, Some(200), "still ready after SIGTERM");
    if after.is_none() {
        assert!(
            TcpStream::connect(gw.admin).is_err(),
            "admin still accepting but not answering"
        );
    }
    assert_eq!(
        in_flight.await.unwrap().unwrap(),
        200,
        "the in-flight request was cut"
    );
    assert_eq!(gw.wait(Duration::from_secs(10)), Some(0));
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(6),
        "{took:?}"
    );
}

/// The inode of the socket listening on `port` (from /proc/net/tcp).
fn listen_inode(port: u16) -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let hex = format!(":{port:04X}");
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1)?.ends_with(&hex) && f.get(3)? == &"0A").then(|| f[9].to_string())
    })
}

/// Wait up to `timeout` for `child` to exit; its exit code.
fn wait_child(child: &mut std::process::Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s.code().unwrap_or(-1));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_binary_upgrades_under_load_refuse_nothing() {
    let up = Upstream::start().await;
    let slow = Upstream::with(Behavior {
        delay: Duration::from_secs(2),
        ..Behavior::default()
    })
    .await;
    let mut gw = GatewayConfig::new(format!(
        "upstreams:\n  u: {{ backends: [{{ address: \"{}\" }}] }}\n  slow: {{ backends: [{{ address: \"{}\" }}] }}\nroutes:\n  - {{ name: slow, upstream: slow, match: {{ path: /slow }} }}\n  - {{ name: all, upstream: u }}\n",
        up.addr, slow.addr
    ))
    .server("grace_period: 1s\ngraceful_shutdown_timeout: 2s")
    .start();
    let (addr, conf) = (gw.addr, gw.config_path());
    let inode = listen_inode(addr.port()).expect("listening socket in /proc/net/tcp");

    // Load on fresh connections (Connection: close): every one must be accepted and answered.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (stop, failures, sent) = (stop.clone(), failures.clone(), sent.clone());
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(90);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let raw = common::raw_exchange(
                        addr,
                        b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
                        Duration::from_secs(5),
                    );
                    if !raw.starts_with(b"HTTP/1.1 200") {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        })
        .collect();

    let mut current = gw.pid();
    let mut procs: Vec<std::process::Child> = Vec::new();
    for round in 0..3 {
        // A slow request in flight on the old process must complete there.
        let url = format!("http://{addr}/slow");
        let slow_req =
            tokio::spawn(
                async move { client().get(url).send().await.map(|r| r.status().as_u16()) },
            );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let log =
            std::fs::File::create(conf.with_file_name(format!("upgrade-{round}.log"))).unwrap();
        let next = Command::new(common::binary())
            .args(["-u", "-c"])
            .arg(&conf)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        nix::sys::signal::kill(current, Signal::SIGQUIT).unwrap();
        assert_eq!(
            slow_req.await.unwrap().unwrap(),
            200,
            "round {round}: in-flight request cut"
        );
        let exited = match procs.last_mut() {
            None => gw.wait(Duration::from_secs(20)),
            Some(old) => wait_child(old, Duration::from_secs(20)),
        };
        assert_eq!(
            exited,
            Some(0),
            "round {round}: the old process did not exit cleanly"
        );
        current = nix::unistd::Pid::from_raw(next.id() as i32);
        procs.push(next);
        assert_eq!(
            listen_inode(addr.port()).as_ref(),
            Some(&inode),
            "round {round}: a new socket was bound"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "requests refused or failed during upgrades"
    );
    assert!(
        sent.load(Ordering::Relaxed) > 100,
        "too little load: {}",
        sent.load(Ordering::Relaxed)
    );
    let last = procs.last_mut().unwrap();
    nix::sys::signal::kill(current, Signal::SIGINT).unwrap();
    assert!(wait_child(last, Duration::from_secs(10)).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_health_check_on_reload_brings_unhealthy_backends_back() {
    let up = Upstream::with(Behavior {
        status: 500,
        ..Behavior::default()
    })
    .await;
    let gw = TestGateway::start(&format!(
        "upstreams:\n  u:\n    backends: [{{ address: \"{}\" }}]\n    health_check: {{ kind: http, interval: 100ms, unhealthy: 1 }}\nroutes: [{{ name: all, upstream: u }}]\n",
        up.addr
    ));
    assert!(eventually(Duration::from_secs(5), || gw.log().contains("is unhealthy")).await);
    assert_eq!(get(&gw.url("/")).await.0, 503);
    let conf = gw.config_path();
    let text = std::fs::read_to_string(&conf).unwrap();
    let without: String = text
        .lines()
        .filter(|l| !l.contains("health_check"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&conf, without).unwrap();
    assert_eq!(
        client()
            .post(format!("http://{}/reload", gw.admin))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // No checker would ever mark it healthy again: it must not stay out.
    assert_eq!(
        get(&gw.url("/")).await.0,
        500,
        "the backend's own answer, not the gateway's 503"
    );
}

/// The pid in `path`, once it names a live process other than `not`.
fn pid_in(path: &std::path::Path, not: Option<i32>, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(pid) = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            && Some(pid) != not
            && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
        {
            return Some(pid);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upgrade_script_replaces_a_daemon_whose_access_log_keeps_writing() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let [port, admin] = common::reserve_ports::<2>();
    let conf = dir.path().join("tollgate.yaml");
    std::fs::write(
        &conf,
        format!(
            "server:\n  threads: 1\n  grace_period: 0s\n  graceful_shutdown_timeout: 1s\n  pid_file: {d}/tollgate.pid\n  upgrade_sock: {d}/upgrade.sock\nlisteners: [{{ address: \"127.0.0.1:{port}\" }}]\nadmin: {{ address: \"127.0.0.1:{admin}\" }}\naccess_log: {{ format: json, path: {d}/access.log }}\n{}",
            routes_to(up.addr)
        ),
    )
    .unwrap();
    let pid_file = dir.path().join("tollgate.pid");
    let log = dir.path().join("access.log");
    let lines = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let url = format!("http://127.0.0.1:{port}/x");
    // `-d` from a relative path, as an operator would start it from the config's directory.
    let started = Command::new(common::binary())
        .current_dir(dir.path())
        .args(["-d", "-c", "tollgate.yaml"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(started.success());
    let old = pid_in(&pid_file, None, Duration::from_secs(10)).expect("the daemon's pid");
    let _old = Daemon(old);
    assert!(
        eventually(Duration::from_secs(10), || std::net::TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_ok())
        .await
    );
    assert_eq!(get(&url).await.0, 200);
    // The daemon's access log is written (its writer thread did not stay behind in the parent).
    assert!(
        eventually(Duration::from_secs(5), || lines() == 1).await,
        "the daemon wrote no access log line"
    );
    // A reload after the fork still finds the file given by a relative path.
    let r = client()
        .post(format!("http://127.0.0.1:{admin}/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/upgrade.sh");
    // To a file: the new daemon keeps the script's stdout and stderr open.
    let out_path = dir.path().join("upgrade.out");
    let out_file = std::fs::File::create(&out_path).unwrap();
    let status = tokio::task::spawn_blocking({
        let conf = conf.clone();
        move || {
            Command::new("bash")
                .arg(script)
                .arg(common::binary())
                .arg(&conf)
                .stdout(out_file.try_clone().unwrap())
                .stderr(out_file)
                .status()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let new = pid_in(&pid_file, Some(old), Duration::from_secs(5));
    let _new = new.map(Daemon);
    assert!(
        status.success(),
        "upgrade.sh failed: {}",
        std::fs::read_to_string(&out_path).unwrap_or_default()
    );
    assert!(new.is_some(), "no new daemon's pid");
    assert!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(old), None).is_err(),
        "the old process is still running"
    );
    assert_eq!(get(&url).await.0, 200);
    assert!(
        eventually(Duration::from_secs(5), || lines() == 2).await,
        "the upgraded daemon wrote no access log line"
    );
}

/// A daemon started by a test: stopped (SIGTERM) when the test ends, whatever happens.
struct Daemon(i32);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0), Signal::SIGTERM);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_upstreams_only_when_asked() {
    let down = Upstream::with(Behavior {
        status: 500,
        ..Behavior::default()
    })
    .await;
    let body = format!(
        "upstreams:\n  u:\n    backends: [{{ address: \"{}\" }}]\n    health_check: {{ kind: http, path: /healthz, interval: 100ms, timeout: 500ms, healthy: 2, unhealthy: 2 }}\nroutes: [{{ name: all, upstream: u }}]\n",
        down.addr
    );
    let process = TestGateway::start(&body);
    let upstreams = GatewayConfig::new(body)
        .admin("readiness: upstreams")
        .start();
    let ready = |gw: &TestGateway| {
        let url = format!("http://{}/health/ready", gw.admin);
        async move { get(&url).await }
    };
    let unhealthy = format!("backend {} is unhealthy", down.addr);
    for gw in [&process, &upstreams] {
        assert!(eventually(Duration::from_secs(5), || gw.log().contains(&unhealthy)).await);
    }
    // By default one failed upstream does not take the replica out of its load balancer.
    assert_eq!(ready(&process).await.0, 200);
    let (status, body) = ready(&upstreams).await;
    assert_eq!(status, 503);
    assert!(body.contains("upstream u has no healthy backend"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_file_is_picked_up_by_reload_on_change() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("admin-token");
    std::fs::write(&file, "first-token-0123456789\n").unwrap();
    let gw = GatewayConfig::new(routes_to(up.addr))
        .admin(&format!("token_file: {}", file.display()))
        .server("reload_on_change: 100ms")
        .start();
    let status = |token: &'static str| {
        let url = format!("http://{}/upstreams", gw.admin);
        async move {
            client()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(status("first-token-0123456789").await, 200);
    // As a Kubernetes Secret is updated: the file is replaced, the configuration is not.
    let tmp = dir.path().join("admin-token.new");
    std::fs::write(&tmp, "second-token-0123456789\n").unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while status("second-token-0123456789").await != 200 {
        assert!(
            Instant::now() < deadline,
            "the new token was not applied\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status("first-token-0123456789").await, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_serves_at_most_64_requests_at_once() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&routes_to(up.addr));
    let health = || {
        let mut c = TcpStream::connect(gw.admin).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"GET /health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        out
    };
    // Connections that never send a request hold admin slots: add them until a request is
    // refused (another client's kept-alive connection may hold a slot too).
    let mut idle = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while health().starts_with("HTTP/1.1 200") {
        assert!(
            Instant::now() < deadline,
            "never refused, {} idle",
            idle.len()
        );
        if idle.len() < 64 {
            idle.push(TcpStream::connect(gw.admin).unwrap());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        (60..=64).contains(&idle.len()),
        "refused with {} idle connections",
        idle.len()
    );
    // Freed, the slots serve again.
    idle.clear();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !health().starts_with("HTTP/1.1 200") {
        assert!(
            Instant::now() < deadline,
            "no request answered once slots were free"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

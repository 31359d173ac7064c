//! The process: `tollgate demo` answering, SIGTERM draining in-flight requests within the
//! configured grace period, and the admin health endpoint.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Behavior, GatewayConfig, TestGateway, Upstream, client, error_json};
use nix::sys::signal::Signal;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_starts_its_upstreams_and_answers() {
    // The shipped demo config, moved onto free ports and private pid/socket paths.
    let dir = tempfile::tempdir().unwrap();
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/demo.yaml")).unwrap();
    let [gw_port, admin_port, d1, d2, d3] = common::reserve_ports::<5>();
    let mut yaml = shipped
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{gw_port}"))
        .replace("127.0.0.1:9901", &format!("127.0.0.1:{admin_port}"))
        .replace(
            "/tmp/tollgate-demo.pid",
            &dir.path().join("pid").display().to_string(),
        )
        .replace(
            "/tmp/tollgate-demo-upgrade.sock",
            &dir.path().join("sock").display().to_string(),
        );
    for (demo, port) in [
        ("127.0.0.1:9701", d1),
        ("127.0.0.1:9702", d2),
        ("127.0.0.1:9703", d3),
    ] {
        yaml = yaml.replace(demo, &format!("127.0.0.1:{port}"));
    }
    let conf = dir.path().join("demo.yaml");
    std::fs::write(&conf, yaml).unwrap();
    let mut child = Command::new(common::binary())
        .arg("demo")
        .arg("-c")
        .arg(&conf)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut banner = String::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    while !banner.contains("Ctrl-C") {
        assert!(
            out.read_line(&mut banner).unwrap() > 0,
            "demo exited: {banner}"
        );
    }
    assert!(
        banner.contains(&format!("http://127.0.0.1:{gw_port}")),
        "{banner}"
    );
    assert!(banner.contains("curl"), "{banner}");

    let c = client();
    let deadline = Instant::now() + Duration::from_secs(15);
    let body = loop {
        match c
            .get(format!("http://127.0.0.1:{gw_port}/hello"))
            .send()
            .await
        {
            Ok(r) if r.status() == 200 => break r.text().await.unwrap(),
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("demo did not answer: {other:?}"),
        }
    };
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        json["backend"].as_str().unwrap().starts_with("demo-"),
        "{json}"
    );
    assert_eq!(json["path"], "/hello");
    // The api route strips /api and balances over two demo backends.
    let mut backends = std::collections::HashSet::new();
    for _ in 0..8 {
        let text = c
            .get(format!("http://127.0.0.1:{gw_port}/api/items"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let j: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(j["path"], "/items");
        backends.insert(j["backend"].as_str().unwrap().to_string());
    }
    assert_eq!(backends.len(), 2, "{backends:?}");
    let health = c
        .get(format!("http://127.0.0.1:{admin_port}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGINT,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "demo did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_then_exits() {
    let up = Upstream::with(Behavior {
        delay: Duration::from_millis(800),
        ..Behavior::default()
    })
    .await;
    let mut gw = GatewayConfig::new(format!(
        "upstreams: {{ u: {{ backends: [{{ address: \"{}\" }}] }} }}\nroutes: [{{ name: all, upstream: u }}]\n",
        up.addr
    ))
    // One thread: the single-threaded runtime, the default for `threads: 1`.
    .server("threads: 1\ngrace_period: 2s\ngraceful_shutdown_timeout: 1s")
    .start();
    let url = gw.url("/slow");
    let in_flight =
        tokio::spawn(async move { client().get(url).send().await.map(|r| r.status().as_u16()) });
    // Wait until the upstream holds the request, then ask the gateway to stop.
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.active() == 0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stopped_at = Instant::now();
    gw.signal(Signal::SIGTERM);
    assert_eq!(
        in_flight.await.unwrap().unwrap(),
        200,
        "in-flight request was cut off"
    );
    // Listeners close at once: new connections are refused while the process drains.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        std::net::TcpStream::connect(gw.addr).is_err(),
        "still accepting after SIGTERM"
    );
    let code = gw
        .wait(Duration::from_secs(10))
        .expect("did not exit after grace + timeout");
    assert_eq!(code, 0);
    let took = stopped_at.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "exited before the grace period: {took:?}"
    );
    assert!(
        took < Duration::from_secs(6),
        "grace 2s + timeout 1s took {took:?}"
    );
}

/// Idle connections (between requests, or before the first) wait for their next request in
/// the connection guard, not in Pingora: shutting down must still close them at once, as
/// Pingora closes the idle connections it waits on, while a request in flight is finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_idle_connections_at_once_and_finishes_busy_ones() {
    use std::io::{Read, Write};
    let up = Upstream::with(Behavior {
        delay: Duration::from_millis(1500),
        ..Behavior::default()
    })
    .await;
    let mut gw = GatewayConfig::new(format!(
        "upstreams: {{ u: {{ backends: [{{ address: \"{}\" }}] }} }}\nroutes: [{{ name: all, upstream: u }}]\n",
        up.addr
    ))
    .server("grace_period: 3s\ngraceful_shutdown_timeout: 1s\ndownstream_keepalive_timeout: 60s\nrequest_head_timeout: 30s")
    .start();
    let addr = gw.addr;
    // One connection kept alive after an answered request, one that never sent anything.
    let mut kept = std::net::TcpStream::connect(addr).unwrap();
    kept.write_all(b"GET /one HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .unwrap();
    let answered = common::read_response(&mut kept);
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
    let mut silent = std::net::TcpStream::connect(addr).unwrap();
    // A request in flight when the signal comes.
    let url = gw.url("/busy");
    let busy =
        tokio::spawn(async move { client().get(url).send().await.map(|r| r.status().as_u16()) });
    // Until the upstream holds it (the first request may still count as active a moment).
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.received().len() < 2 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let t = Instant::now();
    gw.signal(Signal::SIGTERM);
    let closed = tokio::task::spawn_blocking(move || {
        [&mut kept, &mut silent].map(|s| {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut rest = Vec::new();
            // A reset is a close too; a timeout is not.
            let timed_out = matches!(&s.read_to_end(&mut rest), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut);
            (t.elapsed(), timed_out, rest)
        })
    })
    .await
    .unwrap();
    for (which, (after, timed_out, rest)) in ["kept-alive", "silent"].iter().zip(&closed) {
        assert!(!timed_out, "the {which} connection stayed open");
        assert!(
            *after < Duration::from_millis(1000),
            "the {which} connection closed {after:?} after SIGTERM (grace 3 s)"
        );
        assert!(rest.is_empty(), "the {which} connection was sent {rest:?}");
    }
    let busy = busy.await.unwrap();
    assert_eq!(
        busy.as_ref().ok(),
        Some(&200),
        "the busy request was cut off: {busy:?}; the gateway's log: {}",
        gw.log()
    );
    assert_eq!(gw.wait(Duration::from_secs(10)), Some(0));
}

/// A listening address already taken ends the start with a clear error (exit 69), instead of
/// Pingora retrying the bind for 30 s and then running on without its proxy, admin answering
/// ready.
#[test]
fn a_taken_listening_address_fails_the_start_at_once() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let [admin] = common::reserve_ports::<1>();
    let conf = dir.path().join("tollgate.yaml");
    std::fs::write(
        &conf,
        format!(
            "server: {{ pid_file: {d}/pid, upgrade_sock: {d}/sock }}\nlisteners: [{{ address: \"127.0.0.1:{port}\" }}]\nadmin: {{ address: \"127.0.0.1:{admin}\" }}\nupstreams: {{ u: {{ backends: [{{ address: \"127.0.0.1:9\" }}] }} }}\n",
            d = dir.path().display()
        ),
    )
    .unwrap();
    let started = Instant::now();
    let out = Command::new(common::binary())
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "listeners[0].address: cannot listen on 127.0.0.1:{port}: "
        )),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", admin)).is_err(),
        "the admin listener was started"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_health_answers() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&format!(
        "upstreams: {{ u: {{ backends: [{{ address: \"{}\" }}] }} }}\n",
        up.addr
    ));
    let r = client()
        .get(format!("http://{}/health", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(error_json(&r.text().await.unwrap())["status"], "ok");
    let r = client()
        .get(format!("http://{}/nope", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_upgrade_hands_the_listener_to_a_new_process() {
    let up = Upstream::start().await;
    let old = GatewayConfig::new(format!(
        "upstreams: {{ u: {{ backends: [{{ address: \"{}\" }}] }} }}\nroutes: [{{ name: all, upstream: u }}]\n",
        up.addr
    ))
    // One thread: the single-threaded runtime (the default for `threads: 1`) in both processes.
    .server("threads: 1\ngrace_period: 1s\ngraceful_shutdown_timeout: 1s")
    .start();
    let c = client();
    assert_eq!(c.get(old.url("/")).send().await.unwrap().status(), 200);

    // The new process takes the sockets over the shared upgrade socket (-u), then the old one
    // is told to hand them over (SIGQUIT). Start the new one first, as Pingora requires.
    let log = std::fs::File::create(old.dir.path().join("new.log")).unwrap();
    let mut new = Command::new(common::binary())
        .arg("-u")
        .arg("-c")
        .arg(old.config_path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    old.signal(Signal::SIGQUIT);

    // Keep sending requests through the hand-over: none may be refused.
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut served = 0;
    while Instant::now() < deadline {
        let r = c.get(old.url("/")).send().await;
        assert_eq!(
            r.expect("a request failed during the upgrade").status(),
            200
        );
        served += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served > 50);
    let mut old = old;
    assert_eq!(
        old.wait(Duration::from_secs(10)),
        Some(0),
        "the old process did not exit"
    );
    // The listener is now the new process's.
    let r = client().get(old.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(new.try_wait().unwrap().is_none(), "the new process died");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(new.id() as i32), Signal::SIGINT).unwrap();
    let _ = new.wait();
}

/// CPU ticks (user + system) of each of the process's threads named exactly `name`, by thread
/// id. (Names are cut to 15 bytes: "tollgate proxy (h2c)" would read "tollgate proxy ".)
fn thread_ticks(pid: nix::unistd::Pid, name: &str) -> std::collections::BTreeMap<u32, u64> {
    let mut ticks = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.strip_suffix('\n') != Some(name) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
            continue;
        };
        let tid = dir.file_name().unwrap().to_str().unwrap().parse().unwrap();
        // Fields after the parenthesised command: state is the 3rd, utime the 14th, stime the 15th.
        let rest: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        ticks.insert(
            tid,
            rest[11].parse::<u64>().unwrap() + rest[12].parse::<u64>().unwrap(),
        );
    }
    ticks
}

/// `server.work_stealing: false` with two threads: Pingora's single-threaded runtimes, one per
/// thread, each accepted connection handed to one of them at random. Every request is answered
/// and both threads serve. (That the key selects the runtime is `server::tests`'; Pingora's
/// upstream-pool watchers also land on random threads, so which thread served a given
/// connection cannot be told from outside.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_work_stealing_connections_spread_over_the_threads() {
    let up = Upstream::start().await;
    let gw = GatewayConfig::new(format!(
        "upstreams: {{ u: {{ backends: [{{ address: \"{}\" }}] }} }}\nroutes: [{{ name: all, upstream: u }}]\n",
        up.addr
    ))
    .server("work_stealing: false")
    .start();
    let (status, config) = common::get(&format!("http://{}/config", gw.admin)).await;
    assert_eq!(status, 200);
    let config = error_json(&config);
    assert_eq!(config["server"]["work_stealing"], false);
    assert_eq!(config["server"]["threads"], 2);
    let before = thread_ticks(gw.pid(), "tollgate proxy");
    assert_eq!(before.len(), 2, "the proxy's worker threads: {before:?}");
    // Each of the 32 connections lands on one of the two threads, at random.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut answered = 0;
    loop {
        let statuses = common::statuses(&gw.url("/spread"), 1000, 32).await;
        assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
        answered += statuses.len();
        let after = thread_ticks(gw.pid(), "tollgate proxy");
        let busy = before
            .iter()
            .filter(|(tid, b)| after.get(tid).is_some_and(|a| a > b))
            .count();
        if busy == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after {answered} requests, only {busy} of the threads worked: {before:?} -> {after:?}"
        );
    }
}

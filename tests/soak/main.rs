//! Soak and chaos: mixed traffic (small and 1 MiB GETs, hashed uploads, a cached route,
//! WebSockets) from ten clients through the real gateway while one of three round-robin
//! backends is killed and restarted every few seconds and the configuration reloads every two.
//! It fails on any corrupted 2xx body, any error a kill cannot explain, too many of those it
//! can, a reload not seen taking effect, fds or threads that do not return to the post-warm-up
//! baseline once keep-alives idle out, RSS growth past the bound, a panic, or an unclean
//! SIGTERM exit.
//!
//! `TOLLGATE_SOAK_SECS` is the measured chaos phase in seconds; unset, 15 s (about 45 s in all)
//! so that `cargo test` includes it. `make soak` runs 600 s with `--nocapture` (the summary).

#[path = "../common/mod.rs"]
mod common;
mod traffic;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{GatewayConfig, TestGateway, Upstream, WsUpstream, metric};
use nix::sys::signal::Signal;
use traffic::{KINDS, SMALL_BODY, Stats, backend, soak_client, start_traffic};

/// The configuration body for reload generation `generation`: the `app` route's response
/// header carries it, and the `app` upstream's retry backoff alternates so every other reload
/// rebuilds the upstream (health and breaker state handed over) instead of reusing it.
fn config(backends: &[SocketAddr], ws: SocketAddr, generation: u64) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|a| format!("{{ address: \"{a}\" }}"))
        .collect();
    let backoff = if generation.is_multiple_of(2) {
        "10ms"
    } else {
        "20ms"
    };
    format!(
        r#"cache:
  max_size: 4MiB
upstreams:
  app:
    balance: round_robin
    backends: [{list}]
    timeouts: {{ connect: 500ms, read: 5s, idle: 1s }}
    health_check: {{ kind: http, path: /healthz, interval: 200ms, timeout: 500ms, healthy: 1, unhealthy: 1 }}
    circuit_breaker: {{ consecutive_failures: 3, open_for: 1s, max_open_for: 2s, half_open_requests: 1 }}
    retries: {{ backoff: {backoff} }}
  ws:
    backends: [{{ address: "{ws}" }}]
    timeouts: {{ idle: 1s }}
routes:
  - {{ name: ws, upstream: ws, match: {{ path_prefix: /ws }} }}
  - {{ name: cached, upstream: app, match: {{ path_prefix: /cached }}, cache: {{ ttl: 1s }} }}
  - name: app
    upstream: app
    filters:
      - {{ kind: headers, response: {{ set: {{ x-soak-generation: "{generation}" }} }} }}
"#,
        list = list.join(", ")
    )
}

/// Open file descriptors of the gateway.
fn fds(gw: &TestGateway) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", gw.pid()))
        .unwrap()
        .count()
}

/// `VmRSS` of process `pid`, in KiB.
fn rss_kib(pid: nix::unistd::Pid) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// The median of each quarter of `samples`.
fn quarter_medians(samples: &[u64]) -> [u64; 4] {
    std::array::from_fn(|q| {
        let n = samples.len();
        let mut part = samples[n * q / 4..n * (q + 1) / 4].to_vec();
        part.sort_unstable();
        part[part.len() / 2]
    })
}

/// Threads of the gateway.
fn threads(gw: &TestGateway) -> usize {
    std::fs::read_dir(format!("/proc/{}/task", gw.pid()))
        .unwrap()
        .count()
}

/// Wait until no client is connected and idle connections have timed out (the fd count is
/// unchanged for 1.5 s) and, given a thread count, until the gateway is back to it: tokio's
/// blocking-pool threads (reloads use them) exit after 10 s idle, and each holds its own
/// allocator heap, a few MiB of RSS that would otherwise count as growth. At most 20 s.
/// The settled (fds, threads).
async fn settle(gw: &TestGateway, threads_at_most: Option<usize>) -> (usize, usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut last, mut since) = (fds(gw), Instant::now());
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = fds(gw);
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= Duration::from_millis(1500)
            && threads_at_most.is_none_or(|t| threads(gw) <= t)
        {
            break;
        }
    }
    (last, threads(gw))
}

/// The generation the gateway answers with now (a small GET's header), if it answers.
async fn generation(c: &reqwest::Client, gw: &TestGateway) -> Option<u64> {
    let r = c.get(gw.url("/small/generation")).send().await.ok()?;
    let g = r
        .headers()
        .get("x-soak-generation")?
        .to_str()
        .ok()?
        .parse()
        .ok();
    let _ = r.bytes().await;
    g
}

/// The chaos side: the backends it kills and restarts, the configuration it rewrites, and
/// what it counted.
struct Chaos {
    ups: Vec<Option<Upstream>>,
    addrs: Vec<SocketAddr>,
    ws: SocketAddr,
    conf: PathBuf,
    /// The harness' `server`/`listeners`/`admin` part of the file, kept on every rewrite.
    prefix: String,
    kills: u64,
    /// Reloads done so far, which is also the current generation.
    reloads: u64,
    /// Reloads seen taking effect.
    seen: u64,
    fd_peak: usize,
}

impl Chaos {
    /// Traffic for `length` while a backend is killed every 3 s (and restarted 1.5 s later,
    /// one after another) and the configuration reloads every 2 s.
    async fn run(&mut self, gw: &TestGateway, stats: &Arc<Stats>, length: Duration) {
        let until = Instant::now() + length;
        let workers = start_traffic(gw, until, stats);
        let mut ups = std::mem::take(&mut self.ups);
        let addrs = self.addrs.clone();
        let killer = tokio::spawn(async move {
            let (mut victim, mut kills) = (0, 0);
            while Instant::now() + Duration::from_secs(3) < until {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                drop(ups[victim].take()); // stops listening, cuts its live connections
                kills += 1;
                tokio::time::sleep(Duration::from_millis(1500)).await;
                ups[victim] = Some(Upstream::with_on(addrs[victim], backend()).await);
                victim = (victim + 1) % ups.len();
            }
            (ups, kills)
        });
        let c = soak_client();
        while Instant::now() + Duration::from_secs(2) < until {
            tokio::time::sleep(Duration::from_secs(2)).await;
            self.reload(gw, &c).await;
            self.fd_peak = self.fd_peak.max(fds(gw));
        }
        for w in workers {
            w.await.unwrap();
        }
        let (ups, kills) = killer.await.unwrap();
        assert!(ups.iter().all(Option::is_some));
        self.ups = ups;
        self.kills += kills;
    }

    /// The next generation, by SIGHUP or `POST /reload` in turn; counted as seen once a new
    /// response carries it (within 3 s).
    async fn reload(&mut self, gw: &TestGateway, c: &reqwest::Client) {
        self.reloads += 1;
        let g = self.reloads;
        let text = format!("{}{}", self.prefix, config(&self.addrs, self.ws, g));
        std::fs::write(&self.conf, text).unwrap();
        if g.is_multiple_of(2) {
            gw.signal(Signal::SIGHUP);
        } else {
            let r = c
                .post(format!("http://{}/reload", gw.admin))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "reload {g}: {}", r.text().await.unwrap());
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if generation(c, gw).await == Some(g) {
                self.seen += 1;
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The summary line: requests and expected errors by kind, cache hits, chaos, fds, RSS.
fn summary(
    stats: &Stats,
    chaos: &Chaos,
    phases: &str,
    fds: &str,
    quiet: (u64, u64),
    loaded: [u64; 4],
) -> String {
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let ok = stats.total(&stats.ok);
    let expected = stats.total(&stats.expected_errors);
    let mut line = format!(
        "soak: {phases}; {} requests; ok {ok}",
        ok + expected + load(&stats.unexpected_count)
    );
    for k in KINDS {
        write!(line, " {k:?}={}", load(&stats.ok[k as usize])).unwrap();
    }
    write!(
        line,
        " ({} MiB checked, {} cache hits); expected errors {expected}",
        load(&stats.bytes) >> 20,
        load(&stats.cache_hits)
    )
    .unwrap();
    for k in KINDS {
        write!(line, " {k:?}={}", load(&stats.expected_errors[k as usize])).unwrap();
    }
    let growth = |a: u64, b: u64| (b as f64 / a as f64 - 1.0) * 100.0;
    write!(
        line,
        " {:?}; unexpected {}; corrupted {}; kills {}; reloads {} (seen {}); {fds}; RSS KiB quiet after warm-up {} at the end {} ({:+.1}%), under load (median of each quarter) {loaded:?} ({:+.1}% last over first)",
        stats.causes.lock().unwrap(),
        load(&stats.unexpected_count),
        load(&stats.corrupted_count),
        chaos.kills,
        chaos.reloads,
        chaos.seen,
        quiet.0,
        quiet.1,
        growth(quiet.0, quiet.1),
        growth(loaded[0], loaded[3]),
    )
    .unwrap();
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_mixed_traffic_with_backend_kills_and_reloads() {
    let env_secs = std::env::var("TOLLGATE_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok());
    let length = Duration::from_secs(env_secs.unwrap_or(15));
    let warm_up = Duration::from_secs((length.as_secs() / 20).max(6));
    // Memory is judged on RSS sampled every 250 ms under the same load: the median of the
    // measured phase's last quarter over that of its first, which starts right after the
    // warm-up. A single quiet reading is too noisy for 5%: with no leak it moved by -8..+10%
    // between runs here (which freed pages mimalloc still holds depends on the last moments of
    // traffic), so the quiet readings after the warm-up and at the end only bound gross growth
    // (30%). Under load the bound is 5% for a real soak (5 minutes or more) and 20% for the
    // short CI run, whose quarters are 4 s of ~15 samples; 20% of ~65 MiB still catches a
    // leaked body buffer per large response or a few KiB per request.
    let loaded_bound = if length >= Duration::from_secs(300) {
        5.0
    } else {
        20.0
    };
    let quiet_bound = 30.0;

    let mut ups: Vec<Option<Upstream>> = Vec::new();
    for _ in 0..3 {
        ups.push(Some(Upstream::with(backend()).await));
    }
    let addrs: Vec<SocketAddr> = ups.iter().map(|u| u.as_ref().unwrap().addr).collect();
    let ws = WsUpstream::start().await;
    let mut gw = GatewayConfig::new(config(&addrs, ws.addr, 0))
        .server("downstream_keepalive_timeout: 1s")
        .start();
    let conf = gw.config_path();
    let text = std::fs::read_to_string(&conf).unwrap();
    let prefix = text[..text.find("cache:\n").unwrap()].to_string();
    let mut chaos = Chaos {
        ups,
        addrs,
        ws: ws.addr,
        conf,
        prefix,
        kills: 0,
        reloads: 0,
        seen: 0,
        fd_peak: 0,
    };

    // Every kind of traffic without chaos: no error at all.
    let clean = Arc::new(Stats::default());
    for w in start_traffic(&gw, Instant::now() + Duration::from_secs(3), &clean) {
        w.await.unwrap();
    }
    assert_eq!(
        clean.corrupted_count.load(Ordering::Relaxed),
        0,
        "corrupted responses without chaos: {:?}",
        clean.corrupted.lock().unwrap()
    );
    assert_eq!(
        clean.total(&clean.expected_errors) + clean.unexpected_count.load(Ordering::Relaxed),
        0,
        "errors without chaos: {:?}",
        clean.unexpected.lock().unwrap()
    );
    assert!(clean.total(&clean.ok) > 50, "too little traffic");
    // Before any reload: the thread count to come back to (see `settle`).
    let (_, threads_start) = settle(&gw, None).await;

    // Warm-up, with chaos, so that what runs only under chaos (reloads, error paths) has
    // allocated its share before the baseline; then quiet until keep-alives idle out.
    let stats = Arc::new(Stats::default());
    chaos.run(&gw, &stats, warm_up).await;
    let (fd_base, threads_base) = settle(&gw, Some(threads_start)).await;
    let rss_warm = gw.rss_kib();

    let started = Instant::now();
    let pid = gw.pid();
    let sampler = tokio::spawn(async move {
        let mut samples = Vec::new();
        while started.elapsed() < length {
            samples.push(rss_kib(pid));
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        samples
    });
    chaos.run(&gw, &stats, length).await;
    let elapsed = started.elapsed();
    let loaded = quarter_medians(&sampler.await.unwrap());

    // After the storm every backend serves again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let traffic = |chaos: &Chaos| -> Vec<usize> {
        chaos
            .ups
            .iter()
            .map(|u| u.as_ref().unwrap().traffic())
            .collect()
    };
    let before = traffic(&chaos);
    let c = soak_client();
    for _ in 0..30 {
        let r = c.get(gw.url("/small/after")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap().as_ref(), SMALL_BODY);
    }
    drop(c);
    for (now, then) in traffic(&chaos).iter().zip(&before) {
        assert!(now > then, "a restarted backend gets no traffic");
    }

    let (fd_end, threads_end) = settle(&gw, Some(threads_start)).await;
    let rss_end = gw.rss_kib();
    let m = gw.metrics().await;
    let line = summary(
        &stats,
        &chaos,
        &format!(
            "{}s of chaos after {}s of chaos warm-up",
            elapsed.as_secs(),
            warm_up.as_secs()
        ),
        &format!(
            "fds base {fd_base} peak {} end {fd_end}; threads start {threads_start} base {threads_base} end {threads_end}",
            chaos.fd_peak
        ),
        (rss_warm, rss_end),
        loaded,
    );
    println!("{line}");

    let ok = stats.total(&stats.ok);
    let expected = stats.total(&stats.expected_errors);
    assert_eq!(
        stats.corrupted_count.load(Ordering::Relaxed),
        0,
        "corrupted responses: {:?}\n{line}",
        stats.corrupted.lock().unwrap()
    );
    assert_eq!(
        stats.unexpected_count.load(Ordering::Relaxed),
        0,
        "unexpected errors: {:?}\n{line}",
        stats.unexpected.lock().unwrap()
    );
    // A kill costs the requests in flight on that backend and the few that reach it before
    // the health check or breaker takes it out; 2% of all requests is far above that.
    assert!(
        expected * 50 <= ok + expected,
        "{expected} errors out of {} requests: {line}",
        ok + expected
    );
    assert!(ok > 200, "too little traffic: {line}");
    assert!(
        stats.cache_hits.load(Ordering::Relaxed) > 0,
        "the cached route never hit: {line}"
    );
    assert!(chaos.kills >= 3, "{line}");
    assert!(chaos.reloads >= 5, "{line}");
    assert_eq!(
        chaos.seen, chaos.reloads,
        "a reload did not take effect: {line}"
    );
    assert_eq!(
        metric(&m, r#"tollgate_config_reloads_total{outcome="success"}"#),
        chaos.reloads as f64
    );
    assert!(
        fd_end <= fd_base + 4,
        "file descriptors leaked: {fd_base} after warm-up, {fd_end} at the end\n{line}"
    );
    assert!(
        threads_base <= threads_start && threads_end <= threads_start,
        "threads did not go back to {threads_start} within 20 s: {line}"
    );
    assert!(
        (loaded[3] as f64) < loaded[0] as f64 * (1.0 + loaded_bound / 100.0),
        "RSS under load grew more than {loaded_bound}%: {line}"
    );
    assert!(
        (rss_end as f64) < rss_warm as f64 * (1.0 + quiet_bound / 100.0),
        "quiet RSS grew more than {quiet_bound}%: {line}"
    );
    assert!(
        !gw.log().contains("panicked"),
        "the gateway panicked:\n{}",
        gw.log()
    );

    // Still alive, and exits cleanly on SIGTERM.
    assert!(
        gw.wait(Duration::from_millis(100)).is_none(),
        "the gateway died"
    );
    gw.signal(Signal::SIGTERM);
    assert_eq!(gw.wait(Duration::from_secs(15)), Some(0), "{}", gw.log());
}

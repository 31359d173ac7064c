//! Every balancer through the real gateway: distributions over many requests, stickiness and
//! remapping of consistent hashing, least-connections under a slow backend, and connect failover.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Behavior, TestGateway, Upstream, client, upstream_yaml};

async fn upstreams(n: usize) -> Vec<Upstream> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(Upstream::start().await);
    }
    v
}

fn gateway(balance: &str, ups: &[(SocketAddr, u32)], extra: &str) -> TestGateway {
    TestGateway::start(&format!(
        "upstreams:\n{}routes:\n  - {{ name: all, upstream: pool }}\n",
        upstream_yaml("pool", balance, ups, extra)
    ))
}

/// Send `n` GETs from `concurrency` workers; every one must succeed.
async fn load(gw: &TestGateway, n: usize, concurrency: usize) {
    let s = common::statuses(&gw.url("/x"), n, concurrency).await;
    assert!(s.iter().all(|&x| x == 200), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_evenly() {
    let ups = upstreams(3).await;
    let gw = gateway(
        "round_robin",
        &ups.iter().map(|u| (u.addr, 1)).collect::<Vec<_>>(),
        "",
    );
    load(&gw, 3000, 8).await;
    for u in &ups {
        assert_eq!(u.count(), 1000, "round robin is exact over whole rounds");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_ratio_holds_over_10000_requests_and_interleaves() {
    let ups = upstreams(3).await;
    let weights = [5, 3, 2];
    let gw = gateway(
        "weighted",
        &ups.iter()
            .zip(weights)
            .map(|(u, w)| (u.addr, w))
            .collect::<Vec<_>>(),
        "",
    );
    // Sequentially first: the order must interleave (smooth WRR), not repeat runs.
    let c = client();
    for _ in 0..10 {
        c.get(gw.url("/seq"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
    }
    let counts: Vec<usize> = ups.iter().map(|u| u.count()).collect();
    assert_eq!(counts, [5, 3, 2], "one whole cycle of weights 5:3:2");

    load(&gw, 10_000, 8).await;
    let total: usize = ups.iter().map(|u| u.count()).sum();
    assert_eq!(total, 10_010);
    for (u, w) in ups.iter().zip(weights) {
        let share = u.count() as f64 / total as f64;
        let expected = w as f64 / 10.0;
        assert!(
            (share - expected).abs() < 0.02,
            "share {share:.3} vs weight share {expected:.3}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_sequence_is_smooth() {
    // Weights 3:1 must give A A B A per cycle, never A A A B.
    let ups = upstreams(2).await;
    let gw = gateway("weighted", &[(ups[0].addr, 3), (ups[1].addr, 1)], "");
    let c = client();
    let mut seq = Vec::new();
    for _ in 0..8 {
        let before = ups[1].count();
        c.get(gw.url("/"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        seq.push(if ups[1].count() > before { 'B' } else { 'A' });
    }
    assert_eq!(seq.iter().collect::<String>(), "AABAAABA");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_follows_weights() {
    let ups = upstreams(2).await;
    let gw = gateway("random", &[(ups[0].addr, 1), (ups[1].addr, 3)], "");
    load(&gw, 4000, 8).await;
    let share = ups[1].count() as f64 / 4000.0;
    assert!((0.70..0.80).contains(&share), "share {share}");
}

/// Which upstream each of `keys` lands on, through `gw`, hashing on header X-User.
async fn placement(gw: &TestGateway, ups: &[Upstream], keys: usize) -> Vec<SocketAddr> {
    let c = client();
    let mut out = Vec::new();
    for k in 0..keys {
        let before: Vec<usize> = ups.iter().map(|u| u.count()).collect();
        c.get(gw.url("/"))
            .header("x-user", format!("user-{k}"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let i = ups
            .iter()
            .enumerate()
            .position(|(i, u)| u.count() > before[i])
            .unwrap();
        out.push(ups[i].addr);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_is_sticky_and_removal_remaps_about_one_nth() {
    let ups = upstreams(5).await;
    let all: Vec<(SocketAddr, u32)> = ups.iter().map(|u| (u.addr, 1)).collect();
    let extra = "    hash_key: header:X-User\n";
    let five = gateway("consistent_hash", &all, extra);
    let first = placement(&five, &ups, 400).await;
    let again = placement(&five, &ups, 400).await;
    assert_eq!(first, again, "the same key must reach the same backend");
    let used: std::collections::HashSet<_> = first.iter().collect();
    assert_eq!(used.len(), 5, "keys spread over every backend");
    drop(five);

    let four = gateway("consistent_hash", &all[..4], extra);
    let after = placement(&four, &ups, 400).await;
    let removed = ups[4].addr;
    let mut moved = 0;
    for (b, a) in first.iter().zip(&after) {
        if b != a {
            moved += 1;
            assert_eq!(*b, removed, "only keys of the removed backend may move");
        }
    }
    let owned = first.iter().filter(|&&a| a == removed).count();
    assert_eq!(moved, owned);
    let share = moved as f64 / 400.0;
    assert!(
        (0.10..0.32).contains(&share),
        "moved share {share} should be about 1/5"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_on_cookie_and_query() {
    let ups = upstreams(3).await;
    let all: Vec<(SocketAddr, u32)> = ups.iter().map(|u| (u.addr, 1)).collect();
    type Send = fn(usize) -> (String, String, String);
    let cases: [(&str, Send); 3] = [
        ("cookie:session", |k: usize| {
            (
                "cookie".to_string(),
                format!("a=1; session=s{k}"),
                "/".to_string(),
            )
        }),
        ("query:uid", |k: usize| {
            (
                "x-ignored".to_string(),
                "1".to_string(),
                format!("/p?x=1&uid={k}"),
            )
        }),
        ("path", |k: usize| {
            (
                "x-ignored".to_string(),
                "1".to_string(),
                format!("/item/{k}"),
            )
        }),
    ];
    for (key, send) in cases {
        let gw = gateway(
            "consistent_hash",
            &all,
            &format!("    hash_key: \"{key}\"\n"),
        );
        let c = client();
        let mut spread = std::collections::HashSet::new();
        for k in 0..60 {
            let (h, v, path) = send(k);
            let mut seen = None;
            for _ in 0..3 {
                let before: Vec<usize> = ups.iter().map(|u| u.count()).collect();
                c.get(gw.url(&path))
                    .header(h.as_str(), v.as_str())
                    .send()
                    .await
                    .unwrap()
                    .bytes()
                    .await
                    .unwrap();
                let i = ups
                    .iter()
                    .enumerate()
                    .position(|(i, u)| u.count() > before[i])
                    .unwrap();
                assert!(seen.is_none() || seen == Some(i), "{key}: key {k} moved");
                seen = Some(i);
            }
            spread.insert(seen.unwrap());
        }
        assert!(spread.len() >= 2, "{key}: all keys on one backend");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_prefers_the_idle_backend() {
    let slow = Upstream::with(Behavior {
        delay: Duration::from_millis(400),
        ..Behavior::default()
    })
    .await;
    let fast = Upstream::start().await;
    let gw = gateway("least_connections", &[(slow.addr, 1), (fast.addr, 1)], "");
    // 80 requests from 8 workers: while the slow backend holds requests, new ones go to the
    // fast one (round robin would split them 40/40).
    load(&gw, 80, 8).await;
    assert_eq!(slow.count() + fast.count(), 80);
    assert!(
        slow.count() <= 16 && fast.count() >= 64,
        "slow got {}, fast got {}\n{}",
        slow.count(),
        fast.count(),
        gw.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_connect_is_retried_on_another_backend() {
    let live = Upstream::start().await;
    let dead = common::reserve_port();
    let dead: SocketAddr = format!("127.0.0.1:{dead}").parse().unwrap();
    let gw = gateway("round_robin", &[(dead, 1), (live.addr, 1)], "");
    let c = client();
    for _ in 0..10 {
        // POST too: nothing was sent to the dead backend, so even non-idempotent requests move.
        let r = c.post(gw.url("/")).body("hello").send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(live.count(), 10);
    assert!(live.received().iter().all(|r| r.body_len == 5));
}

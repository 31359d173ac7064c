//! Balancer selection: each algorithm alone (`select/…`, the figure comparable with the Go
//! gateway's) and through `Upstream::pick` (`pick/…`), which adds what a real request pays:
//! the member-set snapshot, health, the circuit breaker's admission and the in-flight cap.
//!
//! `cargo bench --bench balancers`; allocations per operation are printed before each timing.

mod support;

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};
use tollgate::Config;
use tollgate::config::Balance;
use tollgate::upstream::Upstream;
use tollgate::upstream::select::{self, Select};

const SIZES: [usize; 2] = [3, 100];

const ALGORITHMS: [(&str, Balance); 5] = [
    ("round_robin", Balance::RoundRobin),
    ("weighted", Balance::Weighted),
    ("consistent_hash", Balance::ConsistentHash),
    ("random", Balance::Random),
    ("least_connections", Balance::LeastConnections),
];

fn addrs(n: usize) -> Vec<SocketAddr> {
    (0..n)
        .map(|i| SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8 + 1], 8080)))
        .collect()
}

/// Weights 1..=5, so `weighted` and `random` take their weighted paths.
fn weights(n: usize) -> Vec<u32> {
    (0..n).map(|i| (i % 5) as u32 + 1).collect()
}

/// Consistent-hash keys as the gateway hashes them: client addresses, as text.
fn keys() -> Vec<Vec<u8>> {
    (0..1024u32)
        .map(|i| format!("198.51.{}.{}", i / 250, i % 250 + 1).into_bytes())
        .collect()
}

fn selectors(c: &mut Criterion) {
    let keys = keys();
    for n in SIZES {
        let load: Vec<AtomicUsize> = (0..n).map(|i| AtomicUsize::new(i % 7)).collect();
        let load = |i: usize| load[i].load(Ordering::Relaxed);
        for (name, balance) in ALGORITHMS {
            let s: Box<dyn Select> = select::build(balance, &weights(n), &addrs(n));
            let mut k = 0;
            support::bench(c, &format!("select/{name}/{n}"), || {
                k = (k + 1) & 1023;
                s.select(black_box(&keys[k]), &load, &|_| true)
            });
        }
    }
}

/// An upstream as a production configuration has it: health checks and a circuit breaker on.
fn upstream(balance: &str, n: usize) -> Upstream {
    // Round robin refuses weights (they would have no effect).
    let weighted = balance != "round_robin";
    let backends: String = addrs(n)
        .iter()
        .zip(weights(n))
        .map(|(a, w)| match weighted {
            true => format!("      - {{ address: \"{a}\", weight: {w} }}\n"),
            false => format!("      - {{ address: \"{a}\" }}\n"),
        })
        .collect();
    let hash_key = match balance {
        "consistent_hash" => "    hash_key: client_ip\n",
        _ => "",
    };
    let yaml = format!(
        "listeners: [{{address: 127.0.0.1:1}}]\n\
         upstreams:\n  pool:\n    balance: {balance}\n{hash_key}\
         \x20   health_check: {{ kind: http, path: /healthz, interval: 2s }}\n\
         \x20   circuit_breaker: {{ failure_rate: 50, min_requests: 20, window: 10s, \
         consecutive_failures: 5, open_for: 10s }}\n\
         \x20   backends:\n{backends}\
         routes: [{{name: all, upstream: pool}}]\n"
    );
    let cfg = Config::from_yaml(&yaml, "bench").unwrap_or_else(|e| panic!("{e}"));
    Upstream::new(&cfg.upstreams[0])
}

fn picks(c: &mut Criterion) {
    let keys = keys();
    for n in SIZES {
        for (name, _) in ALGORITHMS {
            let up = upstream(name, n);
            let mut k = 0;
            support::bench(c, &format!("pick/{name}/{n}"), || {
                k = (k + 1) & 1023;
                up.pick(black_box(&keys[k]), &[])
                    .map(|p| p.backend.addr)
                    .ok()
            });
        }
    }
}

criterion_group!(benches, selectors, picks);
criterion_main!(benches);

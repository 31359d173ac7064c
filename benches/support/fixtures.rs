//! Upstreams as the balancer benchmarks and `tests/allocations.rs` both build them (that test
//! includes this file by path).

use std::net::SocketAddr;

use tollgate::Config;
use tollgate::config::Balance;
use tollgate::upstream::Upstream;

/// Every balancer, by its configuration name.
pub const ALGORITHMS: [(&str, Balance); 5] = [
    ("round_robin", Balance::RoundRobin),
    ("weighted", Balance::Weighted),
    ("consistent_hash", Balance::ConsistentHash),
    ("random", Balance::Random),
    ("least_connections", Balance::LeastConnections),
];

/// `n` distinct backend addresses.
pub fn addrs(n: usize) -> Vec<SocketAddr> {
    (0..n)
        .map(|i| SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8 + 1], 8080)))
        .collect()
}

/// Weights 1..=5, so `weighted` and `random` take their weighted paths.
pub fn weights(n: usize) -> Vec<u32> {
    (0..n).map(|i| (i % 5) as u32 + 1).collect()
}

/// An upstream as a production configuration has it: health checks and a circuit breaker on.
pub fn upstream(balance: &str, n: usize) -> Upstream {
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
    let cfg = Config::from_yaml(&yaml, "fixture").unwrap_or_else(|e| panic!("{e}"));
    Upstream::new(&cfg.upstreams[0])
}

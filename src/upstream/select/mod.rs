//! Backend selection algorithms, one per file, behind one small trait.
//!
//! Each selector is built once per configuration from the backends' weights and addresses and
//! is lock-free on the request path. `accept` lets the caller veto a candidate (a backend that
//! already failed this request; later also unhealthy or breaker-open ones): a selector then
//! offers others until every backend was offered once.

mod consistent;
mod least_conn;
mod random;
mod round_robin;
mod weighted;

use crate::config::Balance;
pub use consistent::Consistent;
pub use least_conn::LeastConnections;
pub use random::Random;
pub use round_robin::RoundRobin;
use std::fmt::Debug;
use std::net::SocketAddr;
pub use weighted::Weighted;

/// A backend selection algorithm.
pub trait Select: Send + Sync + Debug {
    /// Pick a backend index for a request with hash `key`; `load(i)` is backend `i`'s in-flight
    /// count.
    /// Returns `None` when `accept` refused every backend.
    fn select(
        &self,
        key: &[u8],
        load: &dyn Fn(usize) -> usize,
        accept: &dyn Fn(usize) -> bool,
    ) -> Option<usize>;
}

/// Build the selector for `balance` over backends with these weights and addresses.
pub fn build(balance: Balance, weights: &[u32], addrs: &[SocketAddr]) -> Box<dyn Select> {
    match balance {
        Balance::RoundRobin => Box::new(RoundRobin::new(weights.len())),
        Balance::Weighted => Box::new(Weighted::new(weights)),
        Balance::ConsistentHash => Box::new(Consistent::new(weights, addrs)),
        Balance::Random => Box::new(Random::new(weights)),
        Balance::LeastConnections => Box::new(LeastConnections::new(weights)),
    }
}

/// Offer every backend once, starting at `start`.
pub(crate) fn probe_from(start: usize, n: usize, accept: &dyn Fn(usize) -> bool) -> Option<usize> {
    (0..n).map(|i| (start + i) % n).find(|&i| accept(i))
}

/// The first of up to `n` picks by `draw` that `accept` takes, else every backend in turn from
/// the last one drawn. Drawing again spreads a refused backend's share over the others in
/// their own proportions; stepping to the next index instead would hand the whole share to
/// the refused backend's neighbour (round robin over A, B, C with B down: A 1/3, C 2/3).
pub(crate) fn pick_accepted(
    n: usize,
    mut draw: impl FnMut() -> usize,
    accept: &dyn Fn(usize) -> bool,
) -> Option<usize> {
    let mut last = 0;
    for _ in 0..n {
        last = draw();
        if accept(last) {
            return Some(last);
        }
    }
    probe_from(last, n, accept)
}

/// Reduce weights by their gcd, then, if their sum still exceeds `max_total`, scale them down
/// proportionally (each stays ≥ 1). Ratios are kept exactly when the sum fits.
pub(crate) fn scale_weights(weights: &[u32], max_total: u64) -> Vec<u64> {
    fn gcd(a: u64, b: u64) -> u64 {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    let g = weights
        .iter()
        .fold(0u64, |g, &w| gcd(g, u64::from(w)))
        .max(1);
    let reduced: Vec<u64> = weights.iter().map(|&w| (u64::from(w) / g).max(1)).collect();
    cap_weights(&reduced, max_total)
}

/// Scale weights down proportionally (each stays ≥ 1) only if their sum exceeds `max_total`;
/// otherwise keep them as they are. For the hash ring, where a weight is a number of points:
/// reducing by the set's own gcd would change the others' points whenever one backend leaves
/// (weights 2, 2, 3 without the 3 would become 1, 1) and move keys between backends that stayed.
pub(crate) fn cap_weights(weights: &[u64], max_total: u64) -> Vec<u64> {
    let total: u64 = weights.iter().sum();
    if total <= max_total {
        return weights.to_vec();
    }
    weights
        .iter()
        .map(|&w| (w * max_total / total).max(1))
        .collect()
}

#[cfg(test)]
pub(crate) mod testing {
    use std::sync::atomic::AtomicUsize;

    use super::Select;

    /// Count picks over `rounds` selections with keys `key(i)` and nothing refused.
    pub fn distribution(
        s: &dyn Select,
        n: usize,
        rounds: usize,
        key: impl Fn(usize) -> Vec<u8>,
    ) -> Vec<usize> {
        let load: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        let mut counts = vec![0; n];
        for i in 0..rounds {
            counts[s.select(&key(i), &as_load(&load), &|_| true).unwrap()] += 1;
        }
        counts
    }

    pub fn as_load(v: &[AtomicUsize]) -> impl Fn(usize) -> usize + '_ {
        |i| v[i].load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn idle(n: usize) -> Vec<AtomicUsize> {
        (0..n).map(|_| AtomicUsize::new(0)).collect()
    }

    /// Count picks over `rounds` selections with backend `down` refused.
    pub fn distribution_without(
        s: &dyn Select,
        n: usize,
        rounds: usize,
        down: usize,
    ) -> Vec<usize> {
        let load = idle(n);
        let mut counts = vec![0; n];
        for _ in 0..rounds {
            counts[s.select(b"", &as_load(&load), &|i| i != down).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn a_refused_backends_share_is_spread_over_the_others() {
        use super::{Random, RoundRobin, Weighted};
        let selectors: [(&str, Box<dyn Select>); 3] = [
            ("round_robin", Box::new(RoundRobin::new(4))),
            ("weighted", Box::new(Weighted::new(&[1, 1, 1, 1]))),
            ("random", Box::new(Random::new(&[1, 1, 1, 1]))),
        ];
        for (name, s) in selectors {
            let counts = distribution_without(s.as_ref(), 4, 3000, 1);
            assert_eq!(counts[1], 0, "{name}");
            for i in [0, 2, 3] {
                assert!(
                    (850..=1150).contains(&counts[i]),
                    "{name}: {counts:?} (each of three should take ~1000)"
                );
            }
        }
    }

    #[test]
    fn scale_weights_keeps_ratios_and_bounds_the_total() {
        use super::scale_weights;
        assert_eq!(scale_weights(&[300, 100, 200], 1000), [3, 1, 2]);
        assert_eq!(scale_weights(&[10_000, 5_000, 1], 100), [66, 33, 1]);
    }
}

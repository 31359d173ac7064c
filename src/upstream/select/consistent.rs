//! `consistent_hash`: a Ketama ring (pingora-ketama, nginx/memcached compatible points).
//!
//! Each backend owns `160 × weight` points on a 32-bit ring; a key goes to the first point at or
//! after its CRC32. Removing one of N backends only moves the keys that backend owned (~1/N).
//! A refused backend hands the key to the next distinct backend on the ring.

use std::collections::HashMap;
use std::net::SocketAddr;

use pingora_ketama::{Bucket, Continuum};

use super::{Select, scale_weights};

/// Most ring points per unit of weight total: weights are scaled so the ring stays ≤ 1,000 × 160
/// points (~1.3 MB) whatever the configured weights.
const MAX_TOTAL_WEIGHT: u64 = 1000;

/// Ketama consistent hashing.
pub struct Consistent {
    n: usize,
    /// Points on the ring: a walk longer than this has seen every backend.
    points: usize,
    ring: Continuum,
    index: HashMap<SocketAddr, usize>,
}

impl std::fmt::Debug for Consistent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consistent")
            .field("backends", &self.n)
            .finish()
    }
}

impl Consistent {
    /// Build the ring for backends with these weights and (distinct) addresses.
    pub fn new(weights: &[u32], addrs: &[SocketAddr]) -> Self {
        let weights = scale_weights(weights, MAX_TOTAL_WEIGHT);
        let buckets: Vec<Bucket> = addrs
            .iter()
            .zip(&weights)
            .map(|(&a, &w)| Bucket::new(a, w as u32))
            .collect();
        Consistent {
            n: addrs.len(),
            points: weights.iter().map(|&w| w as usize * 160).sum(),
            ring: Continuum::new(&buckets),
            index: addrs.iter().enumerate().map(|(i, &a)| (a, i)).collect(),
        }
    }
}

impl Select for Consistent {
    fn select(
        &self,
        key: &[u8],
        _load: &dyn Fn(usize) -> usize,
        accept: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        let first = self
            .ring
            .node(key)
            .and_then(|a| self.index.get(&a).copied())?;
        if accept(first) {
            return Some(first);
        }
        // Walk the ring for the next distinct backends; at most every point once.
        let mut offered = vec![false; self.n];
        offered[first] = true;
        let mut left = self.n - 1;
        for addr in self.ring.node_iter(key).take(self.points) {
            let i = self.index[addr];
            if offered[i] {
                continue;
            }
            if accept(i) {
                return Some(i);
            }
            offered[i] = true;
            left -= 1;
            if left == 0 {
                break;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{as_load, idle};
    use super::*;

    fn addrs(n: usize) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| format!("127.0.0.{}:80", i + 1).parse().unwrap())
            .collect()
    }

    fn pick(c: &Consistent, key: &str) -> SocketAddr {
        let load = idle(c.n);
        addrs(c.n)[c
            .select(key.as_bytes(), &as_load(&load), &|_| true)
            .unwrap()]
    }

    #[test]
    fn same_key_same_backend() {
        let c = Consistent::new(&[1; 4], &addrs(4));
        for k in 0..200 {
            let key = format!("user-{k}");
            assert_eq!(pick(&c, &key), pick(&c, &key));
        }
    }

    #[test]
    fn removing_one_of_five_moves_about_a_fifth() {
        let all = addrs(5);
        let five = Consistent::new(&[1; 5], &all);
        let four = Consistent::new(&[1; 4], &all[..4]);
        let load = idle(5);
        let keys = 10_000;
        let mut moved = 0;
        let mut owned_by_removed = 0;
        for k in 0..keys {
            let key = format!("key-{k}");
            let before = all[five
                .select(key.as_bytes(), &as_load(&load), &|_| true)
                .unwrap()];
            let after = all[four
                .select(key.as_bytes(), &as_load(&load), &|_| true)
                .unwrap()];
            if before == all[4] {
                owned_by_removed += 1;
            }
            if before != after {
                moved += 1;
                assert_eq!(
                    before, all[4],
                    "a key moved that the removed backend did not own"
                );
            }
        }
        assert_eq!(moved, owned_by_removed);
        let share = moved as f64 / keys as f64;
        assert!((0.12..0.28).contains(&share), "moved share {share}");
    }

    #[test]
    fn refused_backend_fails_over_to_a_consistent_neighbour() {
        let all = addrs(3);
        let c = Consistent::new(&[1; 3], &all);
        let load = idle(3);
        for k in 0..100 {
            let key = format!("k{k}");
            let first = c
                .select(key.as_bytes(), &as_load(&load), &|_| true)
                .unwrap();
            let next = c
                .select(key.as_bytes(), &as_load(&load), &|i| i != first)
                .unwrap();
            assert_ne!(next, first);
            assert_eq!(
                next,
                c.select(key.as_bytes(), &as_load(&load), &|i| i != first)
                    .unwrap()
            );
        }
        assert_eq!(c.select(b"x", &as_load(&load), &|_| false), None);
    }
}

//! `consistent_hash`: a Ketama ring (pingora-ketama, nginx/memcached compatible points).
//!
//! Each backend owns `160 × weight` points on a 32-bit ring; a key goes to the first point at or
//! after its CRC32. Removing one of N backends only moves the keys that backend owned (~1/N).
//! A refused backend hands the key to the next distinct backend on the ring.

use std::net::SocketAddr;

use pingora_ketama::{Bucket, Continuum};

use super::{Select, cap_weights};

/// Most ring points per unit of weight total: weights are scaled so the ring stays ≤ 1,000 × 160
/// points (~1.3 MB) whatever the configured weights.
const MAX_TOTAL_WEIGHT: u64 = 1000;

/// Backends a failover walk tracks on the stack; larger upstreams use a heap bitmap then.
const STACK_BACKENDS: usize = 256;

/// Ketama consistent hashing.
pub struct Consistent {
    n: usize,
    ring: Continuum,
    /// The backend index of each ring point (Pingora's ring answers with addresses; looking
    /// those up per request cost a hash of the address).
    owner: Box<[u32]>,
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
        let weights: Vec<u64> = weights.iter().map(|&w| u64::from(w)).collect();
        let weights = cap_weights(&weights, MAX_TOTAL_WEIGHT);
        let buckets: Vec<Bucket> = addrs
            .iter()
            .zip(&weights)
            .map(|(&a, &w)| Bucket::new(a, w as u32))
            .collect();
        let ring = Continuum::new(&buckets);
        let index: std::collections::HashMap<SocketAddr, u32> = addrs
            .iter()
            .enumerate()
            .map(|(i, &a)| (a, i as u32))
            .collect();
        let points = weights.iter().map(|&w| w as usize * 160).sum::<usize>();
        // Pingora dedups colliding points, so the ring may be shorter than `points`; a walk
        // from point 0 visits each once, then wraps.
        let mut owner = Vec::with_capacity(points);
        let mut idx = 0;
        while let Some(a) = ring.get_addr(&mut idx) {
            owner.push(index[a]);
            if idx == 0 {
                break;
            }
        }
        Consistent {
            n: addrs.len(),
            ring,
            owner: owner.into(),
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
        if self.owner.is_empty() {
            return None;
        }
        let start = self.ring.node_idx(key);
        let first = self.owner[start] as usize;
        if accept(first) {
            return Some(first);
        }
        // Walk the ring for the next distinct backends; at most every point once.
        let mut stack = [0u64; STACK_BACKENDS / 64];
        let mut heap = Vec::new();
        let offered: &mut [u64] = if self.n <= STACK_BACKENDS {
            &mut stack
        } else {
            heap.resize(self.n.div_ceil(64), 0u64);
            &mut heap
        };
        offered[first / 64] |= 1 << (first % 64);
        let mut left = self.n - 1;
        let len = self.owner.len();
        for step in 1..len {
            let i = self.owner[(start + step) % len] as usize;
            let bit = 1 << (i % 64);
            if offered[i / 64] & bit != 0 {
                continue;
            }
            if accept(i) {
                return Some(i);
            }
            offered[i / 64] |= bit;
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
            .map(|i| {
                format!("127.0.{}.{}:80", i / 250, i % 250 + 1)
                    .parse()
                    .unwrap()
            })
            .collect()
    }

    fn pick(c: &Consistent, key: &str) -> SocketAddr {
        let load = idle(c.n);
        addrs(c.n)[c
            .select(key.as_bytes(), &as_load(&load), &|_| true)
            .unwrap()]
    }

    #[test]
    fn picks_what_pingoras_ring_answers() {
        for n in [1, 3, 100, 300] {
            let all = addrs(n);
            let weights: Vec<u32> = (0..n).map(|i| i as u32 % 4 + 1).collect();
            let c = Consistent::new(&weights, &all);
            let load = idle(n);
            for k in 0..2000 {
                let key = format!("198.51.100.{k}");
                let i = c
                    .select(key.as_bytes(), &as_load(&load), &|_| true)
                    .unwrap();
                assert_eq!(
                    Some(all[i]),
                    c.ring.node(key.as_bytes()),
                    "{n} backends, {key}"
                );
            }
            // Failover goes to the next distinct backend on Pingora's ring, on the heap
            // bitmap too (more than 256 backends).
            let key = b"user-42";
            let first = c.select(key, &as_load(&load), &|_| true).unwrap();
            let next: Vec<usize> = c
                .ring
                .node_iter(key)
                .take(c.owner.len())
                .map(|a| all.iter().position(|x| x == a).unwrap())
                .collect();
            let want = next.iter().copied().find(|&i| i != first);
            assert_eq!(c.select(key, &as_load(&load), &|i| i != first), want);
            let last = next.into_iter().fold(Vec::new(), |mut seen, i| {
                if !seen.contains(&i) {
                    seen.push(i);
                }
                seen
            });
            let only = *last.last().unwrap();
            assert_eq!(c.select(key, &as_load(&load), &|i| i == only), Some(only));
        }
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
    fn removing_a_weighted_backend_moves_only_its_keys() {
        // Weights 2, 2, 3: without the 3, the others keep their 320 points each (a gcd
        // reduction would halve them to 160 and move keys between the two that stayed).
        let all = addrs(3);
        let three = Consistent::new(&[2, 2, 3], &all);
        let two = Consistent::new(&[2, 2], &all[..2]);
        let load = idle(3);
        for k in 0..5_000 {
            let key = format!("key-{k}");
            let before = all[three
                .select(key.as_bytes(), &as_load(&load), &|_| true)
                .unwrap()];
            let after = all[two
                .select(key.as_bytes(), &as_load(&load), &|_| true)
                .unwrap()];
            assert!(
                before == after || before == all[2],
                "{key} moved from {before} to {after}, a backend that stayed"
            );
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

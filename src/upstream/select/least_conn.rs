//! `least_connections`: the backend with the fewest in-flight requests per unit of weight.
//!
//! Pingora has no such selector. Counts come from the upstream's per-backend in-flight
//! counters (incremented when a request is sent to a backend, decremented when it finishes).
//! Ties rotate, so idle backends share traffic evenly.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::Select;

/// Least in-flight requests, weighted.
#[derive(Debug)]
pub struct LeastConnections {
    weights: Box<[u64]>,
    rotate: AtomicUsize,
}

impl LeastConnections {
    /// Least-connections over backends with these weights.
    pub fn new(weights: &[u32]) -> Self {
        LeastConnections {
            weights: weights.iter().map(|&w| u64::from(w.max(1))).collect(),
            rotate: AtomicUsize::new(0),
        }
    }
}

impl Select for LeastConnections {
    fn select(
        &self,
        _key: &[u8],
        load: &dyn Fn(usize) -> usize,
        accept: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = self.weights.len();
        if n == 0 {
            return None;
        }
        let start = self.rotate.fetch_add(1, Ordering::Relaxed) % n;
        let mut best: Option<(usize, u64)> = None;
        for i in (0..n).map(|k| (start + k) % n) {
            if !accept(i) {
                continue;
            }
            let active = load(i) as u64;
            // Compare active_i / w_i < active_b / w_b without division.
            let better = match best {
                None => true,
                Some((b, active_b)) => active * self.weights[b] < active_b * self.weights[i],
            };
            if better {
                best = Some((i, active));
            }
        }
        best.map(|(i, _)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{as_load, idle};
    use super::*;

    #[test]
    fn prefers_the_idle_backend() {
        let lc = LeastConnections::new(&[1, 1, 1]);
        let load = idle(3);
        load[0].store(5, Ordering::Relaxed);
        load[2].store(1, Ordering::Relaxed);
        for _ in 0..10 {
            assert_eq!(lc.select(b"", &as_load(&load), &|_| true), Some(1));
        }
    }

    #[test]
    fn weight_scales_capacity_and_ties_rotate() {
        let lc = LeastConnections::new(&[2, 1]);
        let load = idle(2);
        load[0].store(3, Ordering::Relaxed); // 3/2 = 1.5
        load[1].store(2, Ordering::Relaxed); // 2/1 = 2
        assert_eq!(lc.select(b"", &as_load(&load), &|_| true), Some(0));
        let lc = LeastConnections::new(&[1, 1, 1]);
        let load = idle(3);
        let mut seen = [0; 3];
        for _ in 0..30 {
            seen[lc.select(b"", &as_load(&load), &|_| true).unwrap()] += 1;
        }
        assert_eq!(seen, [10, 10, 10]);
        assert_eq!(lc.select(b"", &as_load(&load), &|i| i == 2), Some(2));
        assert_eq!(lc.select(b"", &as_load(&load), &|_| false), None);
    }
}

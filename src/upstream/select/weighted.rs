//! `weighted`: smooth weighted round robin (the nginx algorithm), precomputed.
//!
//! Pingora's weighted selectors repeat each backend `weight` times in a row, so weights 3:1 give
//! `A A A B`. Smooth WRR interleaves them (`A A B A`), which spreads load and keeps a slow
//! backend from taking bursts. The whole cycle is computed once at build time, so a pick is one
//! atomic increment and one array read.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Select, pick_accepted, scale_weights};

/// Longest precomputed cycle; larger weight sums are scaled down to fit.
const MAX_CYCLE: u64 = 1 << 16;

/// Smooth weighted round robin.
#[derive(Debug)]
pub struct Weighted {
    n: usize,
    cycle: Box<[u32]>,
    next: AtomicUsize,
}

impl Weighted {
    /// Build the cycle for these weights (each ≥ 1).
    pub fn new(weights: &[u32]) -> Self {
        let weights = scale_weights(weights, MAX_CYCLE);
        Weighted {
            n: weights.len(),
            cycle: smooth_cycle(&weights).into_boxed_slice(),
            next: AtomicUsize::new(0),
        }
    }
}

impl Select for Weighted {
    fn select(
        &self,
        _key: &[u8],
        _load: &dyn Fn(usize) -> usize,
        accept: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        if self.cycle.is_empty() {
            return None;
        }
        let draw = || {
            let slot = self.next.fetch_add(1, Ordering::Relaxed) % self.cycle.len();
            self.cycle[slot] as usize
        };
        pick_accepted(self.n, draw, accept)
    }
}

/// nginx's smooth WRR: each step add every weight to its current value, pick the largest,
/// subtract the total from it. One full cycle has each backend exactly `weight` times.
fn smooth_cycle(weights: &[u64]) -> Vec<u32> {
    let total: i64 = weights.iter().map(|&w| w as i64).sum();
    let mut current = vec![0i64; weights.len()];
    let mut cycle = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, &w) in weights.iter().enumerate() {
            current[i] += w as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        cycle.push(best as u32);
    }
    cycle
}

#[cfg(test)]
mod tests {
    use super::super::testing::{as_load, distribution, idle};
    use super::*;

    #[test]
    fn interleaves_instead_of_runs() {
        let w = Weighted::new(&[3, 1]);
        let load = idle(2);
        let picks: Vec<usize> = (0..8)
            .map(|_| w.select(b"", &as_load(&load), &|_| true).unwrap())
            .collect();
        assert_eq!(picks, [0, 0, 1, 0, 0, 0, 1, 0]);
        let w = Weighted::new(&[5, 1, 1]);
        let picks: Vec<usize> = (0..7)
            .map(|_| w.select(b"", &as_load(&load), &|_| true).unwrap())
            .collect();
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn exact_ratio_over_whole_cycles() {
        let w = Weighted::new(&[3, 2, 1]);
        assert_eq!(distribution(&w, 3, 6000, |_| vec![]), [3000, 2000, 1000]);
    }

    #[test]
    fn huge_weights_are_scaled_not_refused() {
        let weights: Vec<u32> = (0..20).map(|i| 10_000 - i).collect();
        let w = Weighted::new(&weights);
        assert!(w.cycle.len() as u64 <= MAX_CYCLE + 20);
        let counts = distribution(&w, 20, w.cycle.len(), |_| vec![]);
        assert!(counts.iter().all(|&c| c > 0));
    }

    #[test]
    fn refused_backend_is_skipped() {
        let w = Weighted::new(&[3, 1]);
        let load = idle(2);
        assert!((0..8).all(|_| w.select(b"", &as_load(&load), &|i| i == 1) == Some(1)));
    }
}

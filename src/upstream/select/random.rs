//! `random`: a uniformly random pick, in proportion to the weights.
//!
//! The numbers come from a per-thread wyrand generator seeded once from the OS-seeded
//! `rand::random`: a pick needs spread, not unpredictability, and `rand`'s ChaCha-based
//! `thread_rng` cost more than the whole pick is allowed to.

use std::cell::Cell;

use super::{Select, pick_accepted};

thread_local! {
    static STATE: Cell<u64> = Cell::new(rand::random::<u64>() | 1);
}

/// A uniformly distributed integer in `0..n` (`n > 0`): wyrand, reduced by multiply-shift
/// (Lemire), whose bias is below 2^-32 for any realistic `n`.
fn below(n: u64) -> u64 {
    let r = STATE.with(|s| {
        let x = s.get().wrapping_add(0xa076_1d64_78bd_642f);
        s.set(x);
        let t = u128::from(x) * u128::from(x ^ 0xe703_7ed1_a0b4_28db);
        (t as u64) ^ ((t >> 64) as u64)
    });
    ((u128::from(r) * u128::from(n)) >> 64) as u64
}

/// Weighted random selection.
#[derive(Debug)]
pub struct Random {
    /// Running sums of the weights; empty when all weights are equal.
    cumulative: Box<[u64]>,
    n: usize,
}

impl Random {
    /// Random selection over backends with these weights.
    pub fn new(weights: &[u32]) -> Self {
        let uniform = weights.windows(2).all(|w| w[0] == w[1]);
        let cumulative = if uniform {
            Vec::new()
        } else {
            weights
                .iter()
                .scan(0u64, |sum, &w| {
                    *sum += u64::from(w);
                    Some(*sum)
                })
                .collect()
        };
        Random {
            cumulative: cumulative.into_boxed_slice(),
            n: weights.len(),
        }
    }
}

impl Select for Random {
    fn select(
        &self,
        _key: &[u8],
        _load: &dyn Fn(usize) -> usize,
        accept: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        if self.n == 0 {
            return None;
        }
        let draw = || match self.cumulative.last() {
            None => below(self.n as u64) as usize,
            Some(&total) => {
                let point = below(total);
                self.cumulative.partition_point(|&c| c <= point)
            }
        };
        pick_accepted(self.n, draw, accept)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::distribution;
    use super::*;

    #[test]
    fn follows_weights() {
        let r = Random::new(&[1, 3]);
        let c = distribution(&r, 2, 20_000, |_| vec![]);
        let share = c[1] as f64 / 20_000.0;
        assert!((0.72..0.78).contains(&share), "share {share}");
    }

    #[test]
    fn uniform_covers_all() {
        let r = Random::new(&[1, 1, 1, 1]);
        let c = distribution(&r, 4, 8_000, |_| vec![]);
        assert!(c.iter().all(|&x| (1700..2300).contains(&x)), "{c:?}");
    }
}

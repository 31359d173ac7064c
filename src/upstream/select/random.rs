//! `random`: a uniformly random pick, in proportion to the weights.

use rand::Rng;

use super::{Select, probe_from};

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
        let mut rng = rand::thread_rng();
        let first = match self.cumulative.last() {
            None => rng.gen_range(0..self.n),
            Some(&total) => {
                let point = rng.gen_range(0..total);
                self.cumulative.partition_point(|&c| c <= point)
            }
        };
        probe_from(first, self.n, accept)
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

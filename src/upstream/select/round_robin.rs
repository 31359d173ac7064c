//! `round_robin`: each backend in turn, weights ignored.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Select, pick_accepted};

/// Plain round robin over `n` backends.
#[derive(Debug)]
pub struct RoundRobin {
    n: usize,
    next: AtomicUsize,
}

impl RoundRobin {
    /// Round robin over `n` backends.
    pub fn new(n: usize) -> Self {
        RoundRobin {
            n,
            next: AtomicUsize::new(0),
        }
    }
}

impl Select for RoundRobin {
    fn select(
        &self,
        _key: &[u8],
        _load: &dyn Fn(usize) -> usize,
        accept: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = self.n.max(1);
        pick_accepted(
            self.n,
            || self.next.fetch_add(1, Ordering::Relaxed) % n,
            accept,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{as_load, distribution, idle};
    use super::*;

    #[test]
    fn takes_turns() {
        let rr = RoundRobin::new(3);
        let load = idle(3);
        let picks: Vec<usize> = (0..6)
            .map(|_| rr.select(b"", &as_load(&load), &|_| true).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        assert_eq!(distribution(&rr, 3, 300, |_| vec![]), [100, 100, 100]);
    }

    #[test]
    fn skips_refused_and_gives_up_when_all_refused() {
        let rr = RoundRobin::new(3);
        let load = idle(3);
        for _ in 0..6 {
            assert_ne!(rr.select(b"", &as_load(&load), &|i| i != 1), Some(1));
        }
        assert_eq!(rr.select(b"", &as_load(&load), &|_| false), None);
    }
}

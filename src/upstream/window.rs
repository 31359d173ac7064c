//! A time-bucketed sliding window of (total, flagged) counts: ten buckets over the window,
//! the Hystrix geometry. Pure: the caller passes the time.

use std::time::{Duration, Instant};

const BUCKETS: usize = 10;

/// Counts over the last `window`, at a resolution of `window / 10`.
#[derive(Debug, Clone)]
pub struct Window {
    epoch: Instant,
    width: Duration,
    /// (bucket number since epoch, total, flagged)
    buckets: [(u64, u32, u32); BUCKETS],
}

impl Window {
    /// An empty window of length `window` (at least 10 ms) starting at `now`.
    pub fn new(window: Duration, now: Instant) -> Window {
        Window {
            epoch: now,
            width: (window / BUCKETS as u32).max(Duration::from_millis(1)),
            buckets: [(u64::MAX, 0, 0); BUCKETS],
        }
    }

    fn bucket_no(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.epoch).as_nanos() / self.width.as_nanos()) as u64
    }

    /// Count one event at `now`; `flagged` marks it (a failure, a retry).
    pub fn record(&mut self, now: Instant, flagged: bool) {
        let n = self.bucket_no(now);
        let b = &mut self.buckets[(n % BUCKETS as u64) as usize];
        if b.0 != n {
            *b = (n, 0, 0);
        }
        b.1 = b.1.saturating_add(1);
        b.2 = b.2.saturating_add(u32::from(flagged));
    }

    /// (total, flagged) over the window ending at `now`.
    pub fn counts(&self, now: Instant) -> (u32, u32) {
        let n = self.bucket_no(now);
        self.buckets
            .iter()
            .filter(|b| b.0 != u64::MAX && b.0 <= n && n - b.0 < BUCKETS as u64)
            .fold((0, 0), |(t, f), b| (t + b.1, f + b.2))
    }

    /// Forget everything.
    pub fn clear(&mut self) {
        self.buckets = [(u64::MAX, 0, 0); BUCKETS];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_buckets_fall_out() {
        let t0 = Instant::now();
        let mut w = Window::new(Duration::from_secs(10), t0);
        w.record(t0, true);
        w.record(t0 + Duration::from_secs(5), false);
        assert_eq!(w.counts(t0 + Duration::from_secs(5)), (2, 1));
        assert_eq!(w.counts(t0 + Duration::from_millis(10_500)), (1, 0));
        assert_eq!(w.counts(t0 + Duration::from_secs(16)), (0, 0));
        w.record(t0 + Duration::from_secs(30), true);
        assert_eq!(w.counts(t0 + Duration::from_secs(30)), (1, 1));
        w.clear();
        assert_eq!(w.counts(t0 + Duration::from_secs(30)), (0, 0));
    }
}

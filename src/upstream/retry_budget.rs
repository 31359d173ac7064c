//! The retry budget: retries may be at most `percent`% of the requests of the last 10 s (and
//! at least [`MIN_RETRIES`] per window, so a quiet upstream can still retry), so retries never
//! multiply the load on a failing upstream. Pure: the caller passes the time.

use std::time::{Duration, Instant};

use super::window::Window;

/// The budget's window.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Retries always allowed per window.
pub const MIN_RETRIES: u32 = 3;

/// One upstream's budget.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    percent: u8,
    /// Total = requests + retries; flagged = retries.
    window: Window,
}

impl RetryBudget {
    /// A budget of `percent`% of requests.
    pub fn new(percent: u8, now: Instant) -> RetryBudget {
        RetryBudget {
            percent,
            window: Window::new(WINDOW, now),
        }
    }

    /// Count a first attempt.
    pub fn request(&mut self, now: Instant) {
        self.window.record(now, false);
    }

    /// May one more retry go out now? Counts it if so.
    pub fn try_retry(&mut self, now: Instant) -> bool {
        let (total, retries) = self.window.counts(now);
        let requests = total - retries;
        let allowed =
            (u64::from(requests) * u64::from(self.percent) / 100).max(u64::from(MIN_RETRIES));
        if u64::from(retries) < allowed {
            self.window.record(now, true);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::{Instant as TokioInstant, advance};

    fn now() -> Instant {
        TokioInstant::now().into_std()
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_capped_at_a_share_of_requests() {
        let mut b = RetryBudget::new(20, now());
        for _ in 0..100 {
            b.request(now());
        }
        let granted = (0..100).filter(|_| b.try_retry(now())).count();
        assert_eq!(granted, 20);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_upstream_still_gets_the_minimum() {
        let mut b = RetryBudget::new(20, now());
        b.request(now());
        let granted = (0..10).filter(|_| b.try_retry(now())).count();
        assert_eq!(granted, MIN_RETRIES as usize);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_refills_as_the_window_moves() {
        let mut b = RetryBudget::new(0, now());
        assert_eq!((0..10).filter(|_| b.try_retry(now())).count(), 3);
        advance(Duration::from_secs(5)).await;
        assert!(!b.try_retry(now()), "still inside the window");
        advance(Duration::from_secs(6)).await;
        assert!(b.try_retry(now()), "old retries left the window");
    }
}

//! Counters of one upstream's resilience events (breaker transitions are counted per backend), in one place for the metrics and admin code
//! to read. Gauges (in-flight, health, breaker state) are read from the backends themselves.

use std::sync::atomic::{AtomicU64, Ordering};

/// Monotonic counters; all `Relaxed`, read as a snapshot by [`UpstreamStats::snapshot`].
#[derive(Debug, Default)]
pub struct UpstreamStats {
    /// Retries sent to another backend.
    pub retries: AtomicU64,
    /// Retries the budget refused.
    pub retries_refused_by_budget: AtomicU64,
    /// Requests answered 503 because every breaker was open.
    pub rejected_breaker_open: AtomicU64,
    /// Requests answered 503 because no backend was healthy.
    pub rejected_unhealthy: AtomicU64,
    /// Requests answered 503 because of the in-flight cap.
    pub rejected_in_flight: AtomicU64,
    /// Health-check flips to unhealthy.
    pub health_down: AtomicU64,
    /// Health-check flips to healthy.
    pub health_up: AtomicU64,
    /// Failed discovery rounds (the last good set was kept).
    pub discovery_failures: AtomicU64,
}

impl UpstreamStats {
    /// Add one to `counter`.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Every counter by name, for exposition.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("retries", r(&self.retries)),
            (
                "retries_refused_by_budget",
                r(&self.retries_refused_by_budget),
            ),
            ("rejected_breaker_open", r(&self.rejected_breaker_open)),
            ("rejected_unhealthy", r(&self.rejected_unhealthy)),
            ("rejected_in_flight", r(&self.rejected_in_flight)),
            ("health_down", r(&self.health_down)),
            ("health_up", r(&self.health_up)),
            ("discovery_failures", r(&self.discovery_failures)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_names_every_counter() {
        let s = UpstreamStats::default();
        UpstreamStats::inc(&s.retries);
        UpstreamStats::inc(&s.retries);
        let snap: std::collections::HashMap<_, _> = s.snapshot().into_iter().collect();
        assert_eq!(snap["retries"], 2);
        assert_eq!(snap["discovery_failures"], 0);
        assert_eq!(snap.len(), 8);
    }
}

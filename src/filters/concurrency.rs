//! `concurrency`: at most `max` requests of the route in flight at once; beyond, 503 with
//! `Retry-After: 1`. The slot is released when the request ends, however it ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use pingora::http::RequestHeader;
use serde::Deserialize;

use super::{Filter, FilterCtx, Outcome, Reply};

/// `kind: concurrency`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencyConfig {
    /// Requests in flight at most.
    max: usize,
}

/// The built filter.
#[derive(Debug)]
pub struct Concurrency {
    max: usize,
    active: Arc<AtomicUsize>,
}

/// Held in the request's filter state; releases the slot when the request ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Concurrency {
    /// Build from configuration.
    pub fn new(c: ConcurrencyConfig) -> Result<Concurrency, String> {
        if c.max == 0 {
            return Err("max: at least 1".into());
        }
        Ok(Concurrency {
            max: c.max,
            active: Arc::new(AtomicUsize::new(0)),
        })
    }
}

#[async_trait]
impl Filter for Concurrency {
    async fn on_request(&self, _req: &mut RequestHeader, cx: &mut FilterCtx<'_>) -> Outcome {
        let before = self.active.fetch_add(1, Ordering::AcqRel);
        let slot = Slot(Arc::clone(&self.active));
        if before >= self.max {
            drop(slot);
            return Outcome::Respond(Reply::error(503, "route at its concurrency limit").header(
                http::header::RETRY_AFTER,
                http::HeaderValue::from_static("1"),
            ));
        }
        // Keyed by this filter, so several limits on one route each hold their own slot.
        let mut slots = cx.state.remove::<Slots>().unwrap_or_default();
        slots.0.push(Arc::new(slot));
        cx.state.insert(slots);
        Outcome::Continue
    }
}

#[derive(Clone, Default)]
struct Slots(Vec<Arc<Slot>>);

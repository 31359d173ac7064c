//! One attempt of a request at one backend: holds its in-flight count and records exactly one
//! outcome in the backend's breaker — when the proxy learns it, or as `Ignored` when the
//! attempt is dropped unrecorded (client gone, retried elsewhere first), which also frees a
//! half-open probe slot.

use std::sync::Arc;
use std::time::Instant;

use pingora::{ErrorSource, ErrorType};

use crate::config::FailureKind;
use crate::upstream::breaker::Outcome;
use crate::upstream::{Backend, InFlight, Upstream};

/// An attempt in progress.
#[derive(Debug)]
pub struct Attempt {
    upstream: Arc<Upstream>,
    in_flight: InFlight,
    probe: Option<u32>,
    /// When the attempt started (for the slow-call rule).
    pub started: Instant,
    recorded: bool,
}

impl Attempt {
    /// Start an attempt at `backend`, `now`.
    pub fn start(
        upstream: Arc<Upstream>,
        backend: Arc<Backend>,
        probe: Option<u32>,
        now: Instant,
    ) -> Attempt {
        Attempt {
            in_flight: InFlight::start(Arc::clone(&upstream), backend),
            upstream,
            probe,
            started: now,
            recorded: false,
        }
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<Backend> {
        self.in_flight.backend()
    }

    /// Whether an outcome was recorded already.
    pub fn is_recorded(&self) -> bool {
        self.recorded
    }

    /// Record the outcome (only the first call counts) and log a breaker transition.
    pub fn finish(&mut self, outcome: Outcome) {
        if !self.recorded {
            self.finish_at(Instant::now(), outcome);
        }
    }

    /// [`Attempt::finish`], learnt `now`.
    pub fn finish_at(&mut self, now: Instant, outcome: Outcome) {
        if self.recorded {
            return;
        }
        self.recorded = true;
        if let Some(t) = self.backend().record(now, self.probe, outcome) {
            log_transition(&self.upstream, self.backend(), t);
        }
    }

    /// Record an error's outcome per the upstream's failure policy.
    pub fn finish_error(&mut self, kind: Option<FailureKind>) {
        let counts = kind.is_some_and(|k| self.upstream.config.failure.on.contains(&k));
        self.finish(if counts {
            Outcome::Failure
        } else {
            Outcome::Ignored
        });
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.finish(Outcome::Ignored);
    }
}

/// Log a breaker state change of `backend`.
pub fn log_transition(
    upstream: &Upstream,
    backend: &Backend,
    t: crate::upstream::breaker::Transition,
) {
    backend.count_transition(t);
    log::warn!(
        "upstream {} backend {}: circuit breaker {} -> {}",
        upstream.name,
        backend.addr,
        t.from.as_str(),
        t.to.as_str()
    );
}

/// What kind of upstream failure an error after connecting is, if it is one.
pub fn classify(e: &pingora::Error) -> Option<FailureKind> {
    if e.esource() != &ErrorSource::Upstream {
        return None;
    }
    Some(match e.etype() {
        ErrorType::ConnectTimedout
        | ErrorType::ConnectRefused
        | ErrorType::ConnectNoRoute
        | ErrorType::ConnectError
        | ErrorType::BindError
        | ErrorType::SocketError
        | ErrorType::TLSHandshakeFailure
        | ErrorType::TLSHandshakeTimedout => FailureKind::ConnectError,
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => FailureKind::Timeout,
        ErrorType::HTTPStatus(_) => return None,
        _ => FailureKind::Reset,
    })
}

//! The per-backend circuit breaker: a pure state machine; the caller passes the time.
//!
//! ```text
//!            N consecutive failures, or failure rate ≥ X% over the window (≥ min requests)
//!   CLOSED ───────────────────────────────────────────────────────────────► OPEN
//!     ▲                                                                    │  open_for × 2^(trips-1),
//!     │ half_open_requests probes succeeded                                │  capped at max_open_for
//!     │                                                                    ▼
//!     └──────────────────────────── HALF-OPEN ◄──────────────────── time passes
//!                                      │ a probe fails
//!                                      └──────────────────────────► OPEN (longer)
//! ```
//!
//! While open every request is refused at once (the caller answers 503 with `Retry-After`
//! when no other backend is available). Half-open admits at most `half_open_requests`
//! concurrent probes. Outcomes classed `Ignored` (4xx, client aborts) change nothing.

use std::time::{Duration, Instant};

use super::window::Window;

/// Breaker thresholds (from `circuit_breaker:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Open after this many failures in a row; 0 disables the rule.
    pub consecutive_failures: u32,
    /// Open when failures reach this percentage of the window; 0 disables the rule.
    pub failure_rate: u8,
    /// The rate rule needs at least this many requests in the window.
    pub min_requests: u32,
    /// Length of the sliding window.
    pub window: Duration,
    /// First open period.
    pub open_for: Duration,
    /// Cap for the doubling open period.
    pub max_open_for: Duration,
    /// Probes admitted (and needed to succeed) in half-open.
    pub half_open_requests: u32,
}

/// How a finished request went, for the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Counts as healthy.
    Success,
    /// Counts against the backend.
    Failure,
    /// Neither (client error, client gone).
    Ignored,
}

/// The answer to "may a request go to this backend now?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed: go.
    Allowed,
    /// Half-open: go, as one of the probes of this half-open round. Report its outcome with
    /// `Some(round)`.
    Probe(u32),
    /// Open, or half-open with every probe slot taken.
    Refused {
        /// When the breaker will admit again (at least 1 s).
        retry_after: Duration,
    },
}

/// The observable state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Traffic flows.
    Closed = 0,
    /// Traffic is refused.
    Open = 1,
    /// Probes decide.
    HalfOpen = 2,
}

impl BreakerState {
    /// Lower-case name for logs, metrics and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// A state change, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// From.
    pub from: BreakerState,
    /// To.
    pub to: BreakerState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { in_flight: u32, succeeded: u32 },
}

impl Breaker {
    /// A copy for a reloaded configuration: same state, but a half-open round starts afresh
    /// (its probes report to the old breaker).
    pub fn carried_over(&self) -> Breaker {
        let mut b = self.clone();
        if let State::HalfOpen { .. } = b.state {
            b.state = State::HalfOpen {
                in_flight: 0,
                succeeded: 0,
            };
            b.round = b.round.wrapping_add(1);
        }
        b
    }
}

/// One backend's breaker.
#[derive(Debug, Clone)]
pub struct Breaker {
    cfg: BreakerSettings,
    state: State,
    consecutive: u32,
    window: Window,
    /// Opens since the last close: the open period doubles with each.
    trips: u32,
    /// Half-open rounds so far: a probe admitted in an earlier round does not count in this one.
    round: u32,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(cfg: BreakerSettings, now: Instant) -> Breaker {
        Breaker {
            cfg,
            state: State::Closed,
            consecutive: 0,
            window: Window::new(cfg.window, now),
            trips: 0,
            round: 0,
        }
    }

    /// The thresholds it runs with.
    pub fn settings(&self) -> BreakerSettings {
        self.cfg
    }

    /// The state at `now` (an expired open period reads as half-open).
    pub fn state(&self, now: Instant) -> BreakerState {
        match self.state {
            State::Closed => BreakerState::Closed,
            State::Open { until } if now < until => BreakerState::Open,
            State::Open { .. } | State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Would [`Self::admit`] let a request through now? Does not take a probe slot.
    pub fn available(&self, now: Instant) -> bool {
        match self.state {
            State::Closed => true,
            State::Open { until } => now >= until,
            State::HalfOpen { in_flight, .. } => in_flight < self.cfg.half_open_requests,
        }
    }

    /// Ask to send a request; a `Probe` takes a half-open slot until its outcome is recorded.
    pub fn admit(&mut self, now: Instant) -> (Admission, Option<Transition>) {
        let mut transition = None;
        if let State::Open { until } = self.state
            && now >= until
        {
            self.state = State::HalfOpen {
                in_flight: 0,
                succeeded: 0,
            };
            self.round = self.round.wrapping_add(1);
            transition = Some(Transition {
                from: BreakerState::Open,
                to: BreakerState::HalfOpen,
            });
        }
        let admission = match &mut self.state {
            State::Closed => Admission::Allowed,
            State::Open { until } => Admission::Refused {
                retry_after: (*until - now).max(Duration::from_secs(1)),
            },
            State::HalfOpen { in_flight, .. } if *in_flight < self.cfg.half_open_requests => {
                *in_flight += 1;
                Admission::Probe(self.round)
            }
            State::HalfOpen { .. } => Admission::Refused {
                retry_after: Duration::from_secs(1),
            },
        };
        (admission, transition)
    }

    /// Record how an admitted request went; `probe` is the round it was admitted as a probe in.
    pub fn record(
        &mut self,
        now: Instant,
        probe: Option<u32>,
        outcome: Outcome,
    ) -> Option<Transition> {
        if let State::HalfOpen {
            in_flight,
            succeeded,
        } = &mut self.state
        {
            if probe != Some(self.round) {
                // Admitted before this half-open round (while closed, or as an earlier round's
                // probe): only this round's probes decide, and only they hold its slots.
                return None;
            }
            *in_flight = in_flight.saturating_sub(1);
            return match outcome {
                Outcome::Ignored => None,
                Outcome::Success => {
                    *succeeded += 1;
                    (*succeeded >= self.cfg.half_open_requests).then(|| self.close(now))
                }
                Outcome::Failure => Some(self.open(now, BreakerState::HalfOpen)),
            };
        }
        if outcome == Outcome::Ignored {
            return None;
        }
        let failed = outcome == Outcome::Failure;
        self.window.record(now, failed);
        self.consecutive = if failed { self.consecutive + 1 } else { 0 };
        if self.state != State::Closed || !failed {
            return None;
        }
        let by_streak =
            self.cfg.consecutive_failures > 0 && self.consecutive >= self.cfg.consecutive_failures;
        let (total, failures) = self.window.counts(now);
        let by_rate = self.cfg.failure_rate > 0
            && total >= self.cfg.min_requests.max(1)
            && u64::from(failures) * 100 >= u64::from(self.cfg.failure_rate) * u64::from(total);
        (by_streak || by_rate).then(|| self.open(now, BreakerState::Closed))
    }

    /// How long until [`Self::available`] may turn true: zero when it already is.
    pub fn retry_after(&self, now: Instant) -> Duration {
        match self.state {
            _ if self.available(now) => Duration::ZERO,
            State::Open { until } => (until - now).max(Duration::from_secs(1)),
            _ => Duration::from_secs(1),
        }
    }

    /// How long the breaker stays open when it opens next.
    pub fn next_open_period(&self) -> Duration {
        let factor = 1u32.checked_shl(self.trips.min(16)).unwrap_or(u32::MAX);
        self.cfg
            .open_for
            .saturating_mul(factor)
            .min(self.cfg.max_open_for.max(self.cfg.open_for))
    }

    fn open(&mut self, now: Instant, from: BreakerState) -> Transition {
        let until = now + self.next_open_period();
        self.trips = self.trips.saturating_add(1);
        self.state = State::Open { until };
        Transition {
            from,
            to: BreakerState::Open,
        }
    }

    fn close(&mut self, _now: Instant) -> Transition {
        self.state = State::Closed;
        self.trips = 0;
        self.consecutive = 0;
        self.window.clear();
        Transition {
            from: BreakerState::HalfOpen,
            to: BreakerState::Closed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::{Instant as TokioInstant, advance};

    fn cfg() -> BreakerSettings {
        BreakerSettings {
            consecutive_failures: 3,
            failure_rate: 50,
            min_requests: 10,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(5),
            max_open_for: Duration::from_secs(18),
            half_open_requests: 2,
        }
    }

    fn now() -> Instant {
        TokioInstant::now().into_std()
    }

    fn run(b: &mut Breaker, outcome: Outcome) -> Option<Transition> {
        let (admission, _) = b.admit(now());
        assert!(
            !matches!(admission, Admission::Refused { .. }),
            "refused: {b:?}"
        );
        let probe = match admission {
            Admission::Probe(r) => Some(r),
            _ => None,
        };
        b.record(now(), probe, outcome)
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_open_exactly_at_the_threshold() {
        let mut b = Breaker::new(cfg(), now());
        assert_eq!(run(&mut b, Outcome::Failure), None);
        assert_eq!(run(&mut b, Outcome::Failure), None);
        let t = run(&mut b, Outcome::Failure).unwrap();
        assert_eq!((t.from, t.to), (BreakerState::Closed, BreakerState::Open));
        assert_eq!(b.state(now()), BreakerState::Open);
        assert!(!b.available(now()));
        match b.admit(now()).0 {
            Admission::Refused { retry_after } => assert_eq!(retry_after, Duration::from_secs(5)),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_streak_and_ignored_outcomes_do_not_count() {
        let mut b = Breaker::new(cfg(), now());
        run(&mut b, Outcome::Failure);
        run(&mut b, Outcome::Failure);
        run(&mut b, Outcome::Success);
        run(&mut b, Outcome::Failure);
        run(&mut b, Outcome::Ignored);
        run(&mut b, Outcome::Failure);
        assert_eq!(b.state(now()), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn failure_rate_needs_the_minimum_volume() {
        let mut cfg = cfg();
        cfg.consecutive_failures = 0;
        let mut b = Breaker::new(cfg, now());
        // 60% failures, interleaved so no streak matters: F S F S F ... below 10 requests: closed.
        let pattern = [true, false, true, true, false, true, false, true, false];
        for f in pattern {
            let o = if f {
                Outcome::Failure
            } else {
                Outcome::Success
            };
            assert_eq!(run(&mut b, o), None);
        }
        // The 10th request (a failure) makes 6/10 = 60% ≥ 50%.
        let t = run(&mut b, Outcome::Failure).unwrap();
        assert_eq!(t.to, BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn old_failures_leave_the_window() {
        let mut cfg = cfg();
        cfg.consecutive_failures = 0;
        let mut b = Breaker::new(cfg, now());
        for _ in 0..9 {
            run(&mut b, Outcome::Failure);
        }
        advance(Duration::from_secs(11)).await;
        // The nine failures are out of the window: one more is 1/1 but below min volume.
        assert_eq!(run(&mut b, Outcome::Failure), None);
        assert_eq!(b.state(now()), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_n_probes_and_closes_when_they_succeed() {
        let mut b = Breaker::new(cfg(), now());
        for _ in 0..3 {
            run(&mut b, Outcome::Failure);
        }
        advance(Duration::from_secs(5)).await;
        assert_eq!(b.state(now()), BreakerState::HalfOpen);
        let (a1, t) = b.admit(now());
        assert_eq!(a1, Admission::Probe(1));
        assert_eq!(t.unwrap().to, BreakerState::HalfOpen);
        assert_eq!(b.admit(now()).0, Admission::Probe(1));
        assert!(
            matches!(b.admit(now()).0, Admission::Refused { .. }),
            "only two probes"
        );
        assert!(!b.available(now()));
        // A request admitted before the trip finishing now changes nothing.
        assert_eq!(b.record(now(), None, Outcome::Failure), None);
        assert_eq!(b.record(now(), Some(1), Outcome::Success), None);
        let t = b.record(now(), Some(1), Outcome::Success).unwrap();
        assert_eq!(
            (t.from, t.to),
            (BreakerState::HalfOpen, BreakerState::Closed)
        );
        assert_eq!(
            b.next_open_period(),
            Duration::from_secs(5),
            "trips reset on close"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_longer_up_to_the_cap() {
        let mut b = Breaker::new(cfg(), now());
        for _ in 0..3 {
            run(&mut b, Outcome::Failure);
        }
        let mut periods = Vec::new();
        for _ in 0..4 {
            // Wait out the open period, measuring it.
            let start = now();
            while !b.available(now()) {
                advance(Duration::from_secs(1)).await;
            }
            periods.push((now() - start).as_secs());
            let (a, _) = b.admit(now());
            let Admission::Probe(round) = a else {
                panic!("{a:?}")
            };
            let t = b.record(now(), Some(round), Outcome::Failure).unwrap();
            assert_eq!((t.from, t.to), (BreakerState::HalfOpen, BreakerState::Open));
        }
        assert_eq!(periods, [5, 10, 18, 18], "5s, doubled, then capped at 18s");
    }

    #[tokio::test(start_paused = true)]
    async fn ignored_probe_frees_its_slot() {
        let mut b = Breaker::new(cfg(), now());
        for _ in 0..3 {
            run(&mut b, Outcome::Failure);
        }
        advance(Duration::from_secs(5)).await;
        b.admit(now());
        b.admit(now());
        assert!(!b.available(now()));
        b.record(now(), Some(1), Outcome::Ignored);
        assert!(b.available(now()));
        assert_eq!(b.state(now()), BreakerState::HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_from_an_earlier_round_frees_no_slot_of_this_one() {
        let mut cfg = cfg();
        cfg.half_open_requests = 1;
        let mut b = Breaker::new(cfg, now());
        for _ in 0..3 {
            run(&mut b, Outcome::Failure);
        }
        advance(Duration::from_secs(5)).await;
        assert_eq!(b.admit(now()).0, Admission::Probe(1)); // slow probe of round 1
        let (a, _) = b.admit(now());
        assert!(matches!(a, Admission::Refused { .. }));
        // A carried-over breaker (reload) starts round 2 with its slot free.
        let mut carried = b.carried_over();
        assert_eq!(carried.admit(now()).0, Admission::Probe(2));
        // The round-1 probe finishing late neither frees round 2's slot nor decides it.
        assert_eq!(carried.record(now(), Some(1), Outcome::Success), None);
        assert!(!carried.available(now()), "a stale probe freed a slot");
        let t = carried.record(now(), Some(2), Outcome::Success).unwrap();
        assert_eq!(t.to, BreakerState::Closed);
    }
}

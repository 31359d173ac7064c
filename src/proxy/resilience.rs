//! The resilience decisions of one request, called from the `ProxyHttp` phases: which backend
//! (health- and breaker-aware), when to fail fast with 503, which failures count against a
//! backend, and whether to retry elsewhere (policy, attempts, budget, backoff).
//!
//! | failure                         | breaker (`failure_on`/`failure_statuses`) | retried elsewhere when                   |
//! |---------------------------------|-------------------------------------------|------------------------------------------|
//! | connect refused / timed out     | `connect_error`                           | in `retries.on` (any method; no budget)  |
//! | read/write timeout              | `timeout`                                 | in `retries.on`, method allowed, budget  |
//! | reset / closed / bad response   | `reset`                                   | in `retries.on`, method allowed, budget  |
//! | response status                 | in `failure_statuses`                     | in `retries.statuses`, allowed, budget   |
//! | response head slower than `slow_call` | yes                                 | no                                       |
//!
//! A method is allowed when it is idempotent (or `retries.methods: all`) and the request body
//! fit Pingora's 64 KiB replay buffer. Pingora's own retry of a stale pooled connection may
//! reuse the same backend and is not counted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::upstreams::peer::HttpPeer;
use rand::Rng;

use super::RequestCtx;
use super::attempt::{Attempt, classify, log_transition};
use crate::config::FailureKind;
use crate::upstream::breaker::Outcome;
use crate::upstream::stats::UpstreamStats;
use crate::upstream::{Unavailable, Upstream};

/// Longest backoff before a retry.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// `upstream_peer`: pick a backend for `ctx`'s upstream, or fail with the right status.
pub async fn choose(
    upstream: &Arc<Upstream>,
    key: &[u8],
    ctx: &mut RequestCtx,
) -> Result<Box<HttpPeer>> {
    if std::mem::take(&mut ctx.backoff_due) {
        tokio::time::sleep(backoff(upstream.config.retry.backoff, ctx.retries)).await;
    }
    // One clock read for the budget, the breakers and the attempt's start.
    let now = Instant::now();
    if ctx.attempts == 0 {
        upstream.budget_request(now);
    }
    // The previous attempt (if any) is finished: drop it before counting the new one.
    ctx.attempt = None;
    if ctx.attempts > 0 {
        // A retry sends the (replayed) body again from its first byte.
        crate::filters::reset_body_counts(&mut ctx.filter_state);
    }
    match upstream.pick(key, &ctx.excluded, now) {
        Ok(pick) => {
            if let Some(t) = pick.transition {
                log_transition(upstream, &pick.backend, t);
            }
            ctx.attempts += 1;
            log::debug!(
                "{}: upstream {} backend {} (attempt {}, in flight {})",
                ctx.request_id,
                upstream.name,
                pick.backend.addr,
                ctx.attempts,
                pick.backend.in_flight()
            );
            ctx.last_backend = Some(Arc::clone(&pick.backend));
            let peer = upstream.peer(&pick.backend);
            ctx.attempt = Some(Attempt::start(
                Arc::clone(upstream),
                pick.backend,
                pick.probe,
                now,
            ));
            Ok(peer)
        }
        Err(why) => {
            let s = &upstream.stats;
            match why {
                Unavailable::AllOpen { .. } => UpstreamStats::inc(&s.rejected_breaker_open),
                Unavailable::AllUnhealthy { .. } => UpstreamStats::inc(&s.rejected_unhealthy),
                Unavailable::Overloaded => UpstreamStats::inc(&s.rejected_in_flight),
                Unavailable::NoneLeft => {}
            }
            ctx.unavailable = Some(why);
            // Every backend failed this request already: that is a gateway failure (502);
            // otherwise nothing can serve it right now (503).
            let status = if why == Unavailable::NoneLeft && ctx.attempts > 0 {
                502
            } else {
                503
            };
            Error::e_explain(ErrorType::HTTPStatus(status), format!("{why:?}"))
        }
    }
}

/// `fail_to_connect`: count the failure, exclude the backend, retry elsewhere if allowed.
/// Nothing was sent, so any method may be retried and the budget is not charged.
pub fn connect_failed(ctx: &mut RequestCtx, mut e: Box<Error>) -> Box<Error> {
    let Some(upstream) = ctx.upstream.clone() else {
        return e;
    };
    if let Some(mut attempt) = ctx.attempt.take() {
        attempt.finish_error(Some(FailureKind::ConnectError));
        ctx.excluded.push(attempt.backend().addr);
    }
    let policy = &upstream.config.retry;
    if policy.on.contains(&FailureKind::ConnectError)
        && ctx.retries < policy.attempts
        && upstream.has_alternative(&ctx.excluded)
    {
        UpstreamStats::inc(&upstream.stats.retries);
        ctx.retries += 1;
        e.set_retry(true);
    }
    e
}

/// `error_while_proxy`: an error after connecting.
pub fn proxy_failed(
    session: &Session,
    ctx: &mut RequestCtx,
    mut e: Box<Error>,
    client_reused: bool,
) -> Box<Error> {
    if std::mem::take(&mut ctx.status_retry) {
        return e; // our own status retry, decided and recorded in `response_received`
    }
    let kind = classify(&e);
    let addr = ctx.attempt.as_ref().map(|a| a.backend().addr);
    let Some(upstream) = ctx.upstream.clone() else {
        e.set_retry(false);
        return e;
    };
    // Once the response head reached the client, another attempt would splice a second
    // response into the first: never retry then (nor let Pingora's stale-connection retry).
    let resend = may_resend(session, &upstream) && session.response_written().is_none();
    // What Pingora would retry says nothing about the backend's health, whether or not this
    // request may be sent again: a pooled connection the backend had already closed, or an
    // HTTP/2 stream it refused, or a GOAWAY of its graceful shutdown (`Decided(true)`).
    let stale_connection = match e.retry {
        pingora::RetryType::ReusedOnly => client_reused,
        pingora::RetryType::Decided(retry) => retry,
    };
    if resend {
        // Pingora retries a failure on a reused (pooled) connection: the backend may be fine.
        e.retry.decide_reuse(client_reused);
    } else {
        e.set_retry(false);
    }
    if let Some(attempt) = ctx.attempt.as_mut() {
        attempt.finish_error(if stale_connection { None } else { kind });
    }
    if e.retry() || !resend {
        return e;
    }
    let policy = &upstream.config.retry;
    let mut excluded = ctx.excluded.clone();
    excluded.extend(addr);
    if kind.is_some_and(|k| policy.on.contains(&k))
        && ctx.retries < policy.attempts
        && upstream.has_alternative(&excluded)
        && upstream.budget_retry()
    {
        ctx.retries += 1;
        ctx.backoff_due = true;
        ctx.excluded = excluded;
        e.set_retry(true);
    }
    e
}

/// `upstream_response_filter`: classify the response for the breaker; turn a retryable status
/// into a retry while nothing has been sent to the client.
pub fn response_received(
    session: &Session,
    ctx: &mut RequestCtx,
    resp: &ResponseHeader,
) -> Result<()> {
    let status = resp.status.as_u16();
    // An interim head (`100 Continue`, `103 Early Hints`) is not the attempt's answer: the
    // final status, and the time to it, are yet to come.
    if is_interim(status) {
        return Ok(());
    }
    record_status(ctx, status);
    let (Some(upstream), Some(attempt)) = (ctx.upstream.clone(), ctx.attempt.as_ref()) else {
        return Ok(());
    };
    let policy = &upstream.config.retry;
    // The common case (a status not to retry) allocates nothing.
    if !policy.statuses.contains(&status) || ctx.retries >= policy.attempts {
        return Ok(());
    }
    let mut excluded = ctx.excluded.clone();
    excluded.push(attempt.backend().addr);
    if may_resend(session, &upstream)
        && upstream.has_alternative(&excluded)
        && upstream.budget_retry()
    {
        ctx.retries += 1;
        ctx.backoff_due = true;
        ctx.status_retry = true;
        ctx.excluded = excluded;
        let mut e = Error::explain(ErrorType::HTTPStatus(status), "retrying a retryable status");
        e.esource = pingora::ErrorSource::Upstream;
        e.set_retry(true);
        return Err(e);
    }
    Ok(())
}

/// A `1xx` head other than `101`: more heads follow, the last one final.
pub fn is_interim(status: u16) -> bool {
    (100..200).contains(&status) && status != 101
}

/// The attempt's outcome from the backend's status (and how long it took), for the breaker;
/// also the request's upstream time. Recorded once per attempt.
pub fn record_status(ctx: &mut RequestCtx, status: u16) {
    let body_done_at = ctx.body_done_at;
    let (Some(upstream), Some(attempt)) = (ctx.upstream.as_ref(), ctx.attempt.as_mut()) else {
        return;
    };
    let f = &upstream.config.failure;
    let now = Instant::now();
    let took = now.saturating_duration_since(attempt.started);
    ctx.upstream_time = Some(took);
    // A slow call is the backend's time: while the client was still sending the body (a slow
    // upload), the backend was waiting for it.
    let answering = body_done_at.map_or(attempt.started, |t| t.max(attempt.started));
    let slow = f
        .slow_call
        .is_some_and(|t| now.saturating_duration_since(answering) > t);
    let outcome = if f.statuses.contains(&status) || slow {
        Outcome::Failure
    } else {
        Outcome::Success
    };
    attempt.finish_at(now, outcome);
}

/// May this request be sent again? Idempotent (or all methods allowed), and the body fit the
/// replay buffer.
fn may_resend(session: &Session, upstream: &Upstream) -> bool {
    (upstream.config.retry.all_methods || session.req_header().method.is_idempotent())
        && !session.as_ref().retry_buffer_truncated()
}

/// Full-jitter exponential backoff: uniform in [0, base × 2^(n-1)], at most [`MAX_BACKOFF`].
fn backoff(base: Duration, retry: usize) -> Duration {
    let cap = base
        .saturating_mul(1u32 << (retry.saturating_sub(1)).min(16))
        .min(MAX_BACKOFF);
    if cap.is_zero() {
        return cap;
    }
    rand::thread_rng().gen_range(Duration::ZERO..=cap)
}

/// The 503/502 message for why no backend was available.
pub fn unavailable_message(why: Unavailable) -> &'static str {
    match why {
        Unavailable::AllUnhealthy { .. } => "no healthy backend",
        Unavailable::AllOpen { .. } => "circuit breaker open for every backend",
        Unavailable::Overloaded => "upstream at its in-flight limit",
        Unavailable::NoneLeft => "no backend available",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_and_grows() {
        let base = Duration::from_millis(25);
        for _ in 0..100 {
            assert!(backoff(base, 1) <= base);
            assert!(backoff(base, 3) <= base * 4);
            assert!(backoff(base, 30) <= MAX_BACKOFF);
        }
        assert_eq!(backoff(Duration::ZERO, 5), Duration::ZERO);
    }
}

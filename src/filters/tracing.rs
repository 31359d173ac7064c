//! `tracing`: W3C Trace Context. A valid incoming `traceparent` is kept (and `tracestate` with
//! it); otherwise a new one is created (version 00, random trace and parent ids, sampled). The
//! upstream receives it alongside `X-Request-Id`; `echo: true` also returns it to the client.

use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use serde::Deserialize;

use super::{Filter, FilterCtx, Outcome};

/// `kind: tracing`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// Return `traceparent` on the response. Default false.
    #[serde(default)]
    echo: bool,
}

/// The built filter.
#[derive(Debug)]
pub struct Tracing {
    echo: bool,
}

#[derive(Clone)]
struct TraceParent(http::HeaderValue);

impl Tracing {
    /// Build from configuration.
    pub fn new(c: TracingConfig) -> Result<Tracing, String> {
        Ok(Tracing { echo: c.echo })
    }
}

/// `00-<32 hex trace id, not all zero>-<16 hex parent id, not all zero>-<2 hex flags>`.
pub fn valid_traceparent(v: &[u8]) -> bool {
    let Ok(s) = std::str::from_utf8(v) else {
        return false;
    };
    let p: Vec<&str> = s.split('-').collect();
    let hex = |x: &str, n: usize| {
        x.len() == n
            && x.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    p.len() == 4
        && p[0] == "00"
        && hex(p[1], 32)
        && p[1].bytes().any(|b| b != b'0')
        && hex(p[2], 16)
        && p[2].bytes().any(|b| b != b'0')
        && hex(p[3], 2)
}

fn new_traceparent() -> String {
    let trace: u128 = rand::random::<u128>().max(1);
    let parent: u64 = rand::random::<u64>().max(1);
    format!("00-{trace:032x}-{parent:016x}-01")
}

#[async_trait]
impl Filter for Tracing {
    async fn on_request(&self, req: &mut RequestHeader, cx: &mut FilterCtx<'_>) -> Outcome {
        let incoming = req
            .headers
            .get("traceparent")
            .filter(|v| valid_traceparent(v.as_bytes()))
            .cloned();
        let tp = match incoming {
            Some(v) => v,
            None => {
                req.remove_header("tracestate");
                http::HeaderValue::from_str(&new_traceparent())
                    .expect("hex is a valid header value")
            }
        };
        let _ = req.insert_header("traceparent", tp.clone());
        cx.state.insert(TraceParent(tp));
        Outcome::Continue
    }

    fn on_response(&self, resp: &mut ResponseHeader, cx: &mut FilterCtx<'_>) {
        if self.echo
            && let Some(TraceParent(tp)) = cx.state.get::<TraceParent>().cloned()
        {
            let _ = resp.insert_header("traceparent", tp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_validation() {
        assert!(valid_traceparent(
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent(
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent(
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent(
            b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent(b"garbage"));
        assert!(valid_traceparent(new_traceparent().as_bytes()));
    }
}

//! `limits`: request size and shape limits, and access by client address.
//!
//! | limit | answer |
//! |---|---|
//! | `allow_cidrs` / `deny_cidrs` on the client address (after trusted-proxy resolution) | 403 |
//! | `methods` allowlist | 405 with `Allow` |
//! | `max_header_count`, `max_header_size` (sum of names and values) | 431 |
//! | `max_body_size`: by `Content-Length` before anything is sent upstream | 413 |
//! | `max_body_size`: a chunked body, as soon as the running total passes it (never buffered) | 413 |

use async_trait::async_trait;
use bytes::Bytes;
use ipnet::IpNet;
use pingora::http::RequestHeader;
use serde::Deserialize;

use super::{Filter, FilterCtx, Outcome, Reply, de};

/// `kind: limits`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest request body (`10MiB`, or bytes). Default: none.
    #[serde(default, deserialize_with = "de::opt_size")]
    max_body_size: Option<u64>,
    /// Most header lines. Default: none.
    #[serde(default)]
    max_header_count: Option<usize>,
    /// Largest header section (names + values, bytes). Default: none.
    #[serde(default, deserialize_with = "de::opt_size")]
    max_header_size: Option<u64>,
    /// Allowed methods. Default: any.
    #[serde(default)]
    methods: Vec<String>,
    /// Only these client networks. Default: any.
    #[serde(default)]
    allow_cidrs: Vec<String>,
    /// Never these client networks (checked first). Default: none.
    #[serde(default)]
    deny_cidrs: Vec<String>,
}

/// The built filter.
#[derive(Debug)]
pub struct Limits {
    max_body: Option<u64>,
    max_header_count: Option<usize>,
    max_header_size: Option<u64>,
    methods: Vec<http::Method>,
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    allow_header: Option<http::HeaderValue>,
}

/// Body bytes seen so far, per `limits` filter.
#[derive(Clone, Copy, Default)]
struct BodySeen(u64);

/// Forget the body bytes counted so far: a retry replays the body from the start.
pub fn reset_body_counts(state: &mut http::Extensions) {
    state.remove::<std::collections::HashMap<usize, BodySeen>>();
}

fn cidrs(list: &[String], key: &str) -> Result<Vec<IpNet>, String> {
    list.iter()
        .map(|c| {
            c.parse::<IpNet>()
                .or_else(|_| c.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| format!("{key}: invalid CIDR {c:?}"))
        })
        .collect()
}

impl Limits {
    /// Build from configuration.
    pub fn new(c: LimitsConfig) -> Result<Limits, String> {
        let methods = c
            .methods
            .iter()
            .map(|m| {
                http::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                    .map_err(|_| format!("methods: invalid method {m:?}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let allow_header = (!methods.is_empty())
            .then(|| {
                http::HeaderValue::from_str(
                    &methods
                        .iter()
                        .map(|m| m.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                )
            })
            .transpose()
            .map_err(|e| e.to_string())?;
        Ok(Limits {
            max_body: c.max_body_size,
            max_header_count: c.max_header_count,
            max_header_size: c.max_header_size,
            methods,
            allow: cidrs(&c.allow_cidrs, "allow_cidrs")?,
            deny: cidrs(&c.deny_cidrs, "deny_cidrs")?,
            allow_header,
        })
    }
}

#[async_trait]
impl Filter for Limits {
    async fn on_request(&self, req: &mut RequestHeader, cx: &mut FilterCtx<'_>) -> Outcome {
        let ip = crate::runtime::canonical(cx.client_ip);
        if self.deny.iter().any(|n| n.contains(&ip))
            || (!self.allow.is_empty() && !self.allow.iter().any(|n| n.contains(&ip)))
        {
            return Outcome::Respond(Reply::error(403, "client address not allowed"));
        }
        if !self.methods.is_empty() && !self.methods.contains(&req.method) {
            let mut r = Reply::error(405, "method not allowed on this route");
            if let Some(a) = &self.allow_header {
                r = r.header(http::header::ALLOW, a.clone());
            }
            return Outcome::Respond(r);
        }
        if let Some(max) = self.max_header_count
            && req.headers.len() > max
        {
            return Outcome::Respond(Reply::error(431, "too many request headers"));
        }
        if let Some(max) = self.max_header_size {
            let size: usize = req
                .headers
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len())
                .sum();
            if size as u64 > max {
                return Outcome::Respond(Reply::error(431, "request headers too large"));
            }
        }
        if let Some(max) = self.max_body
            && let Some(len) = req.headers.get(http::header::CONTENT_LENGTH)
            && len
                .to_str()
                .ok()
                .and_then(|l| l.trim().parse::<u64>().ok())
                .is_some_and(|l| l > max)
        {
            return Outcome::Respond(Reply::error(413, "request body too large"));
        }
        Outcome::Continue
    }

    fn on_request_body(
        &self,
        chunk: Option<&Bytes>,
        _end: bool,
        cx: &mut FilterCtx<'_>,
    ) -> Outcome {
        let (Some(max), Some(chunk)) = (self.max_body, chunk) else {
            return Outcome::Continue;
        };
        let key = self as *const Limits as usize;
        let seen = cx
            .state
            .get_or_insert_default::<std::collections::HashMap<usize, BodySeen>>();
        let total = seen.entry(key).or_default();
        total.0 += chunk.len() as u64;
        if total.0 > max {
            return Outcome::Respond(Reply::error(413, "request body too large"));
        }
        Outcome::Continue
    }
}

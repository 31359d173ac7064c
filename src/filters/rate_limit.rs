//! `rate_limit`: GCRA (the generic cell rate algorithm) per key, in this process.
//!
//! Each key keeps one number, its theoretical arrival time: a request is allowed when it comes
//! no earlier than `TAT - burst × interval`, and pushes TAT on by one interval. That allows
//! `rate` on average with bursts of `burst + 1`, needs no background refill, and gives an exact
//! `Retry-After`. Keys are bounded (`max_keys`, default 100,000): expired entries are dropped
//! first, then the oldest. Over the limit: 429 with `Retry-After`, `RateLimit-Policy` and
//! `RateLimit` (draft-ietf-httpapi-ratelimit-headers); allowed responses carry `RateLimit` too.
//!
//! With `backend: { kind: redis, url }` the same GCRA runs as a Lua script in Redis (one round
//! trip per request, Redis's clock), so every replica shares the limit. If Redis fails or is
//! slower than `timeout`, the request is let through (`fail_open: true`, the default) or answered
//! 503, and the failure is counted in `tollgate_rate_limit_backend_errors_total`; after a
//! failure Redis is left alone for a second so a dead Redis costs no latency per request.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use http::HeaderValue;
use pingora::http::{RequestHeader, ResponseHeader};
use serde::Deserialize;

use super::{Filter, FilterCtx, Outcome, Reply, header_name};
use crate::metrics::metrics;

const SHARDS: usize = 16;

/// `kind: rate_limit`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// `client_ip` (default), `header:NAME` or `claim:NAME` (a verified JWT claim, from an
    /// earlier `auth` filter; missing → client address), `route`, or `global`.
    #[serde(default = "default_key")]
    key: String,
    /// `N/s`, `N/m`, `N/h` or `N/d`.
    rate: String,
    /// Extra requests allowed at once above the steady rate. Default 0.
    #[serde(default)]
    burst: u32,
    /// Most keys remembered. Default 100,000.
    #[serde(default = "default_max_keys")]
    max_keys: usize,
    /// Where the state lives. Default: this process.
    #[serde(default)]
    backend: Option<BackendConfig>,
}

/// `backend:` of `kind: rate_limit`.
#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum BackendConfig {
    /// This process (the default).
    Local,
    /// A Redis shared by every replica.
    Redis {
        /// `redis://host:port[/db]`.
        url: String,
        /// Longest wait for Redis per request. Default 100ms.
        #[serde(
            default = "default_redis_timeout",
            deserialize_with = "super::de::duration"
        )]
        timeout: Duration,
        /// Let requests through when Redis fails (else 503). Default true.
        #[serde(default = "default_true")]
        fail_open: bool,
        /// Key prefix. Default `tollgate:rl:`. Redis keys are
        /// `PREFIX KEY-SPEC|RATE|BURST|VALUE`: limiters configured alike share counters across
        /// routes and replicas; a different prefix separates them.
        #[serde(default = "default_prefix")]
        prefix: String,
    },
}

fn default_redis_timeout() -> Duration {
    Duration::from_millis(100)
}
fn default_true() -> bool {
    true
}
fn default_prefix() -> String {
    "tollgate:rl:".into()
}

/// GCRA in Redis: KEYS[1] the key; ARGV[1] the interval and ARGV[2] the burst tolerance, in
/// microseconds. Returns {1, remaining} or {0, wait in microseconds}.
const GCRA_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allow_at = tat - tau
if now < allow_at then return {0, allow_at - now} end
local new_tat = tat + interval
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {1, math.floor((now + tau + interval - new_tat) / interval)}
"#;

/// The Redis side of a limiter.
struct RedisBackend {
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<redis::aio::ConnectionManager>>,
    script: redis::Script,
    timeout: Duration,
    fail_open: bool,
    /// `prefix` plus this limiter's key spec, rate and burst.
    namespace: String,
    /// When Redis last failed; it is not tried again for a second.
    failed_at: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl RedisBackend {
    async fn check(
        &self,
        key: &[u8],
        interval: Duration,
        tau: Duration,
    ) -> Result<Result<u64, Duration>, String> {
        if self
            .failed_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return Err("Redis failed less than a second ago".into());
        }
        let attempt = async {
            let mut guard = self.conn.lock().await;
            if guard.is_none() {
                let cfg = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(self.timeout)
                    .set_response_timeout(self.timeout)
                    .set_number_of_retries(1);
                *guard = Some(
                    redis::aio::ConnectionManager::new_with_config(self.client.clone(), cfg)
                        .await
                        .map_err(|e| e.to_string())?,
                );
            }
            let mut conn = guard.clone().expect("set above");
            drop(guard);
            let mut full = self.namespace.as_bytes().to_vec();
            full.extend_from_slice(key);
            let (allowed, value): (i64, i64) = self
                .script
                .key(full)
                .arg(interval.as_micros() as u64)
                .arg(tau.as_micros() as u64)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(if allowed == 1 {
                Ok(value.max(0) as u64)
            } else {
                Err(Duration::from_micros(value.max(0) as u64))
            })
        };
        let result = tokio::time::timeout(self.timeout, attempt)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {:?}", self.timeout)));
        if let Err(e) = &result {
            // About once a second: for a second after a failure Redis is not asked (requests
            // already waiting on it when it failed each warn).
            log::warn!(
                "rate_limit: Redis unavailable ({e}); failing {} for a second",
                if self.fail_open { "open" } else { "closed" }
            );
            *self.failed_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
        result
    }
}

fn default_key() -> String {
    "client_ip".into()
}
fn default_max_keys() -> usize {
    100_000
}

#[derive(Debug)]
enum Key {
    ClientIp,
    Header(http::HeaderName),
    Claim(String),
    Route,
    Global,
}

/// The built filter.
#[derive(Debug)]
pub struct RateLimit {
    key: Key,
    interval: Duration,
    burst: u32,
    shard_cap: usize,
    epoch: Instant,
    /// TAT in nanoseconds since `epoch`, per key.
    shards: Vec<Mutex<HashMap<Vec<u8>, u64>>>,
    policy: HeaderValue,
    quota: u64,
    window: u64,
    redis: Option<RedisBackend>,
}

/// Remaining requests and seconds to reset, for the response's `RateLimit` header.
#[derive(Clone, Copy)]
struct Verdict {
    remaining: u64,
    reset_secs: u64,
}

/// Parse `N/s` etc. into (requests, period).
pub fn parse_rate(s: &str) -> Result<(u64, Duration), String> {
    let (n, unit) = s
        .trim()
        .split_once('/')
        .ok_or_else(|| format!("rate {s:?}: write N/s, N/m, N/h or N/d"))?;
    let n: u64 = n
        .trim()
        .parse()
        .map_err(|_| format!("rate {s:?}: {n:?} is not a whole number"))?;
    let period = match unit.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        "d" | "day" => Duration::from_secs(86_400),
        u => return Err(format!("rate {s:?}: unknown unit {u:?}; use s, m, h or d")),
    };
    if n == 0 {
        return Err(format!("rate {s:?}: must allow at least 1 request"));
    }
    // One request per nanosecond is the finest interval the limiter keeps.
    if u128::from(n) > period.as_nanos() {
        return Err(format!(
            "rate {s:?}: at most 1000000000/s (one request per nanosecond)"
        ));
    }
    Ok((n, period))
}

impl RateLimit {
    /// Build from configuration.
    pub fn new(c: RateLimitConfig) -> Result<RateLimit, String> {
        let (n, period) = parse_rate(&c.rate)?;
        let key = match c.key.as_str() {
            "client_ip" => Key::ClientIp,
            "route" => Key::Route,
            "global" => Key::Global,
            k => match (k.strip_prefix("header:"), k.strip_prefix("claim:")) {
                (Some(name), _) => Key::Header(header_name(name)?),
                (_, Some(claim)) if !claim.is_empty() => Key::Claim(claim.to_string()),
                _ => {
                    return Err(format!(
                        "key {k:?}: use client_ip, header:NAME, claim:NAME, route or global"
                    ));
                }
            },
        };
        if c.max_keys < SHARDS {
            return Err(format!("max_keys: at least {SHARDS}"));
        }
        let redis = match c.backend {
            None | Some(BackendConfig::Local) => None,
            Some(BackendConfig::Redis {
                url,
                timeout,
                fail_open,
                prefix,
            }) => Some(RedisBackend {
                client: redis::Client::open(url.as_str())
                    .map_err(|e| format!("backend.url: {e}"))?,
                conn: tokio::sync::Mutex::new(None),
                script: redis::Script::new(GCRA_LUA),
                timeout,
                fail_open,
                namespace: format!("{prefix}{}|{}|{}|", c.key, c.rate.trim(), c.burst),
                failed_at: Mutex::new(None),
            }),
        };
        let interval = Duration::from_nanos((period.as_nanos() / u128::from(n)) as u64);
        // The Redis script counts microseconds: a finer interval would round to 0 (no limit).
        if redis.is_some() && interval < Duration::from_micros(1) {
            return Err(format!(
                "rate {:?}: at most 1000000/s with the redis backend (it counts microseconds)",
                c.rate
            ));
        }
        let quota = u64::from(c.burst) + 1;
        let window = period.as_secs().max(1);
        Ok(RateLimit {
            key,
            interval,
            burst: c.burst,
            shard_cap: c.max_keys / SHARDS,
            epoch: Instant::now(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            policy: HeaderValue::from_str(&format!("\"default\";q={quota};w={window}"))
                .map_err(|e| e.to_string())?,
            quota,
            window,
            redis,
        })
    }

    /// GCRA decision for `key` at `now` (nanoseconds since epoch): `Ok(remaining)` or
    /// `Err(wait)`.
    fn check(&self, key: &[u8], now: u64) -> Result<u64, Duration> {
        let t = self.interval.as_nanos() as u64;
        let tau = t * u64::from(self.burst);
        let shard = &self.shards[shard_of(key)];
        let mut map = shard.lock().unwrap_or_else(|p| p.into_inner());
        let tat = map.get(key).copied().unwrap_or(now).max(now);
        let allow_at = tat.saturating_sub(tau);
        if now < allow_at {
            return Err(Duration::from_nanos(allow_at - now));
        }
        let new_tat = tat + t;
        if let Some(known) = map.get_mut(key) {
            // The usual case: a key seen before is updated in place, without copying it.
            *known = new_tat;
            return Ok((now + tau + t).saturating_sub(new_tat) / t.max(1));
        }
        if map.len() >= self.shard_cap {
            // Expired entries are as good as absent; if none, forget the oldest half.
            map.retain(|_, v| *v > now);
            if map.len() >= self.shard_cap {
                let mut tats: Vec<u64> = map.values().copied().collect();
                tats.sort_unstable();
                let cut = tats[tats.len() / 2];
                map.retain(|_, v| *v > cut);
            }
        }
        map.insert(key.to_vec(), new_tat);
        Ok((now + tau + t).saturating_sub(new_tat) / t.max(1))
    }

    fn key_bytes<'a>(&self, req: &RequestHeader, cx: &FilterCtx<'a>) -> KeyBytes<'a> {
        match &self.key {
            Key::ClientIp => KeyBytes::ip("", cx.client_ip),
            // Tagged, so a client cannot name another client's address as its header value
            // and drain that address's allowance.
            Key::Header(h) => req.headers.get(h).map_or_else(
                || KeyBytes::ip("ip:", cx.client_ip),
                |v| KeyBytes::value("h:", v.as_bytes()),
            ),
            Key::Claim(c) => cx
                .state
                .get::<super::JwtClaims>()
                .and_then(|claims| claims.get(c))
                .map_or_else(
                    || KeyBytes::ip("ip:", cx.client_ip),
                    |v| KeyBytes::value("claim:", v.as_bytes()),
                ),
            Key::Route => KeyBytes::Borrowed(cx.route.as_bytes()),
            Key::Global => KeyBytes::Borrowed(b""),
        }
    }
}

/// The longest header or claim value kept as it is in a rate-limit key; longer ones are hashed.
const MAX_RAW_VALUE: usize = 64;

/// A rate-limit key: client addresses are formatted on the stack and route names borrowed, so
/// the common keys cost no allocation per request.
enum KeyBytes<'a> {
    Borrowed(&'a [u8]),
    /// `tag` then an IP address: at most 3 + 39 bytes.
    Inline([u8; 48], usize),
    Owned(Vec<u8>),
}

impl KeyBytes<'_> {
    /// A client-chosen value (a header, a claim): kept as it is when short, else as its
    /// SHA-256, so the key table's memory is bounded by `max_keys`, not by what clients send
    /// (a 64 KiB header value per key). A digest key starts with `#`, which no kept value's key
    /// (starting with its tag) does, so the two never meet.
    fn value(tag: &str, v: &[u8]) -> KeyBytes<'static> {
        if v.len() <= MAX_RAW_VALUE {
            return KeyBytes::Owned([tag.as_bytes(), v].concat());
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, v);
        KeyBytes::Owned([b"#", tag.as_bytes(), digest.as_ref()].concat())
    }

    /// An IPv6 client counts by its /64, as for `max_connections_per_ip`: one host or
    /// subscriber line is usually given a whole /64, and rotating addresses inside it must not
    /// multiply the allowance.
    fn ip(tag: &str, ip: std::net::IpAddr) -> KeyBytes<'static> {
        let ip = crate::wire::admission::address_key(ip);
        use std::io::Write;
        let mut buf = [0u8; 48];
        let mut rest = &mut buf[..];
        match write!(rest, "{tag}{ip}") {
            Ok(()) => {
                let len = 48 - rest.len();
                KeyBytes::Inline(buf, len)
            }
            Err(_) => KeyBytes::Owned(format!("{tag}{ip}").into_bytes()),
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            KeyBytes::Borrowed(b) => b,
            KeyBytes::Inline(buf, len) => &buf[..*len],
            KeyBytes::Owned(v) => v,
        }
    }
}

fn shard_of(key: &[u8]) -> usize {
    // FNV-1a: cheap and good enough to spread keys over the shards.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
    }
    (h as usize) % SHARDS
}

#[async_trait]
impl Filter for RateLimit {
    async fn on_request(&self, req: &mut RequestHeader, cx: &mut FilterCtx<'_>) -> Outcome {
        let key = self.key_bytes(req, cx);
        let key = key.as_bytes();
        let decision = match &self.redis {
            None => self.check(key, self.epoch.elapsed().as_nanos() as u64),
            Some(r) => match r
                .check(key, self.interval, self.interval * self.burst)
                .await
            {
                Ok(d) => d,
                Err(e) => {
                    metrics().rate_limit_backend_errors.inc();
                    log::debug!("rate_limit: Redis unavailable ({e})");
                    if r.fail_open {
                        return Outcome::Continue;
                    }
                    return Outcome::Respond(
                        Reply::error(503, "rate limit backend unavailable")
                            .header(http::header::RETRY_AFTER, HeaderValue::from_static("1")),
                    );
                }
            },
        };
        match decision {
            Ok(remaining) => {
                cx.state.insert(Verdict {
                    remaining,
                    reset_secs: self.interval.as_secs().max(1),
                });
                Outcome::Continue
            }
            Err(wait) => {
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                metrics()
                    .rate_limited
                    .with_label_values(&[if cx.route.is_empty() {
                        "none"
                    } else {
                        cx.route
                    }])
                    .inc();
                let limit =
                    HeaderValue::from_str(&format!("\"default\";r=0;t={secs}")).expect("ascii");
                Outcome::Respond(
                    Reply::error(429, "too many requests")
                        .header(http::header::RETRY_AFTER, HeaderValue::from(secs))
                        .header(
                            http::HeaderName::from_static("ratelimit-policy"),
                            self.policy.clone(),
                        )
                        .header(http::HeaderName::from_static("ratelimit"), limit),
                )
            }
        }
    }

    fn on_response(&self, resp: &mut ResponseHeader, cx: &mut FilterCtx<'_>) {
        if let Some(v) = cx.state.get::<Verdict>().copied() {
            let _ = resp.insert_header("ratelimit-policy", self.policy.clone());
            let value = format!(
                "\"default\";r={};t={}",
                v.remaining.min(self.quota),
                v.reset_secs.min(self.window)
            );
            let _ = resp.insert_header("ratelimit", value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rate: &str, burst: u32) -> RateLimit {
        RateLimit::new(RateLimitConfig {
            key: "global".into(),
            rate: rate.into(),
            burst,
            max_keys: 1000,
            backend: None,
        })
        .unwrap()
    }

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn rates_beyond_a_nanosecond_are_refused_and_large_counts_keep_their_interval() {
        let redis = |rate: &str| {
            RateLimit::new(RateLimitConfig {
                key: "global".into(),
                rate: rate.into(),
                burst: 0,
                max_keys: 1000,
                backend: Some(BackendConfig::Redis {
                    url: "redis://127.0.0.1:1".into(),
                    timeout: Duration::from_millis(100),
                    fail_open: true,
                    prefix: "t:".into(),
                }),
            })
        };
        assert!(redis("1000000/s").is_ok());
        let e = redis("2000000/s").err().unwrap();
        assert!(
            e.contains("at most 1000000/s with the redis backend"),
            "{e}"
        );
        assert!(parse_rate("1000000000/s").is_ok());
        let e = parse_rate("4294967296/s").err().unwrap();
        assert!(e.contains("at most 1000000000/s"), "{e}");
        // More than u32::MAX per day is still only ~58k/s: its interval is exact.
        let l = limiter("5000000000/d", 0);
        assert_eq!(l.interval, Duration::from_nanos(17_280));
    }

    #[test]
    fn ipv6_clients_count_by_their_64_and_long_values_by_their_digest() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let k = |s: &str| KeyBytes::ip("", ip(s)).as_bytes().to_vec();
        assert_eq!(k("2001:db8:1:2::1"), k("2001:db8:1:2:ffff:1:2:3"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
        assert_ne!(k("192.0.2.1"), k("192.0.2.2"));
        let short = KeyBytes::value("h:", b"key-0001");
        assert_eq!(short.as_bytes(), b"h:key-0001");
        // A short value shaped like a digest key is still a kept value's key.
        let shaped = [&b"#h:"[..], &[0u8; 32]].concat();
        assert!(KeyBytes::value("h:", &shaped).as_bytes().starts_with(b"h:"));
        let long = vec![b'a'; 64 * 1024];
        let hashed = KeyBytes::value("h:", &long);
        assert_eq!(hashed.as_bytes().len(), 3 + 32);
        let mut other = long.clone();
        other[40_000] = b'b';
        assert_ne!(hashed.as_bytes(), KeyBytes::value("h:", &other).as_bytes());
    }

    #[test]
    fn steady_rate_and_burst() {
        let l = limiter("10/s", 4);
        // A burst of burst + 1 at once, then refused.
        for i in 0..5 {
            assert!(l.check(b"k", 0).is_ok(), "request {i}");
        }
        let wait = l.check(b"k", 0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        // One more every 100 ms.
        assert!(l.check(b"k", SEC / 10).is_ok());
        assert!(l.check(b"k", SEC / 10).is_err());
        // Other keys are independent.
        assert!(l.check(b"other", 0).is_ok());
    }

    #[test]
    fn remaining_counts_down() {
        let l = limiter("1/s", 2);
        assert_eq!(l.check(b"k", 0), Ok(2));
        assert_eq!(l.check(b"k", 0), Ok(1));
        assert_eq!(l.check(b"k", 0), Ok(0));
        assert!(l.check(b"k", 0).is_err());
        assert_eq!(
            l.check(b"k", 3 * SEC),
            Ok(2),
            "a quiet key recovers its burst"
        );
    }

    #[test]
    fn keys_are_bounded() {
        let l = RateLimit::new(RateLimitConfig {
            key: "client_ip".into(),
            rate: "1/s".into(),
            burst: 0,
            max_keys: 160,
            backend: None,
        })
        .unwrap();
        for i in 0..10_000u32 {
            let _ = l.check(&i.to_be_bytes(), u64::from(i));
        }
        let total: usize = l.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(total <= 160, "{total} keys kept");
    }

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("100/s").unwrap(), (100, Duration::from_secs(1)));
        assert_eq!(parse_rate("5/m").unwrap(), (5, Duration::from_secs(60)));
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("10/fortnight").is_err());
        assert!(parse_rate("ten").is_err());
    }
}

//! The programmable filter chain.
//!
//! A [`Filter`] has three hooks, each with a default that does nothing:
//!
//! | hook | Pingora phase | may |
//! |---|---|---|
//! | [`Filter::on_request`] | `request_filter`, after routing | edit the request; answer it ([`Outcome::Respond`]) |
//! | [`Filter::on_request_body`] | `request_body_filter`, per chunk | stop the request with a status (the head already went upstream) |
//! | [`Filter::on_response`] | `response_filter` | edit the response head |
//!
//! Global filters (top-level `filters:`) run first on every request, then the route's, in the
//! order listed; response hooks run in reverse (route's, then global). Filters are built once
//! from typed configuration when the configuration loads; per-request state goes in
//! [`FilterCtx::state`].
//!
//! Operators compose built-in kinds in YAML (`kind: cors`, …); Rust users add kinds with
//! [`FilterRegistry::register`] and run the gateway with [`crate::cli::main_with`] — see
//! `examples/custom_filter.rs` and `docs/filters.md`.

mod auth;
mod compression;
mod concurrency;
mod cors;
mod headers;
mod limits;
pub use auth::JwtClaims;
pub use compression::Compression;
pub use cors::preflight_method;
pub use limits::reset_body_counts;
mod rate_limit;
mod redirect;
mod security_headers;
pub mod template;
mod tracing;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use serde::de::DeserializeOwned;

/// What a filter decided.
#[derive(Debug)]
pub enum Outcome {
    /// Go on with the next filter, then the upstream.
    Continue,
    /// Answer the client now; nothing is sent upstream.
    Respond(Reply),
}

/// A response a filter sends instead of the upstream's.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Headers (`Content-Length` and `X-Request-Id` are added).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Body; `None` with [`Reply::error`] means the standard JSON error body.
    pub body: Option<Bytes>,
    /// For the standard JSON error body: the message.
    pub error: Option<String>,
}

impl Reply {
    /// An empty response with `status`.
    pub fn new(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: None,
            error: None,
        }
    }

    /// The gateway's JSON error response: `{"error": message, "request_id": …}`.
    pub fn error(status: u16, message: impl Into<String>) -> Reply {
        Reply {
            error: Some(message.into()),
            ..Reply::new(status)
        }
    }

    /// Add a header.
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Reply {
        self.headers.push((name, value));
        self
    }

    /// Set the body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Reply {
        self.body = Some(body.into());
        self
    }
}

/// What a filter can see of the request beyond its head.
pub struct FilterCtx<'a> {
    /// The client address (after trusted-proxy resolution).
    pub client_ip: IpAddr,
    /// The request id.
    pub request_id: &'a str,
    /// The request arrived over TLS.
    pub tls: bool,
    /// The matched route's name; empty when no route matched.
    pub route: &'a str,
    /// Per-request state shared between a filter's hooks (keyed by type).
    pub state: &'a mut http::Extensions,
}

/// A request/response filter. See the module documentation for when each hook runs.
#[async_trait]
pub trait Filter: Send + Sync + fmt::Debug {
    /// Inspect or edit the request head; answer it instead of the upstream if need be.
    async fn on_request(&self, _req: &mut RequestHeader, _cx: &mut FilterCtx<'_>) -> Outcome {
        Outcome::Continue
    }

    /// See each request body chunk (`None` at the end). `Respond` stops the request with that
    /// status (as a JSON error): the head was already sent upstream, so no other reply is
    /// possible.
    fn on_request_body(
        &self,
        _chunk: Option<&Bytes>,
        _end: bool,
        _cx: &mut FilterCtx<'_>,
    ) -> Outcome {
        Outcome::Continue
    }

    /// Inspect or edit the response head (from the upstream).
    fn on_response(&self, _resp: &mut ResponseHeader, _cx: &mut FilterCtx<'_>) {}

    /// Response compression settings, for the `compression` kind (applied by the proxy to
    /// Pingora's compression module). Other filters keep the default `None`.
    fn compression(&self) -> Option<&Compression> {
        None
    }
}

/// Builds a filter from its configuration (the YAML mapping, `kind` removed).
pub type Factory = Arc<dyn Fn(serde_json::Value) -> Result<Arc<dyn Filter>, String> + Send + Sync>;

/// The filter kinds a configuration may use: the built-ins plus registered ones.
#[derive(Clone, Default)]
pub struct FilterRegistry {
    custom: BTreeMap<String, Factory>,
}

impl fmt::Debug for FilterRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FilterRegistry")
            .field("custom", &self.custom.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The built-in kinds.
pub const BUILTIN: &[&str] = &[
    "auth",
    "compression",
    "concurrency",
    "cors",
    "headers",
    "limits",
    "rate_limit",
    "redirect",
    "security_headers",
    "tracing",
];

impl FilterRegistry {
    /// The built-in kinds only.
    pub fn new() -> FilterRegistry {
        FilterRegistry::default()
    }

    /// Register a kind whose configuration deserializes into `C` (reject unknown keys with
    /// `#[serde(deny_unknown_fields)]`) and `build` turns into a filter. A built-in kind name
    /// cannot be taken.
    pub fn register<C, F>(
        &mut self,
        kind: &str,
        build: impl Fn(C) -> Result<F, String> + Send + Sync + 'static,
    ) where
        C: DeserializeOwned,
        F: Filter + 'static,
    {
        assert!(!BUILTIN.contains(&kind), "{kind} is a built-in filter kind");
        let factory: Factory = Arc::new(move |v| {
            let cfg: C = serde_json::from_value(v).map_err(|e| e.to_string())?;
            Ok(Arc::new(build(cfg)?) as Arc<dyn Filter>)
        });
        self.custom.insert(kind.to_string(), factory);
    }

    /// Build one filter from its YAML mapping (with `kind`).
    pub fn build(&self, spec: &serde_json::Value) -> Result<Arc<dyn Filter>, String> {
        let mut map = spec
            .as_object()
            .cloned()
            .ok_or("a filter is a mapping with a kind, e.g. { kind: cors, ... }")?;
        let kind = match map.remove("kind") {
            Some(serde_json::Value::String(k)) => k,
            _ => return Err("a filter needs kind: NAME".into()),
        };
        let cfg = serde_json::Value::Object(map);
        fn typed<C: DeserializeOwned, F: Filter + 'static>(
            cfg: serde_json::Value,
            build: impl Fn(C) -> Result<F, String>,
        ) -> Result<Arc<dyn Filter>, String> {
            let c: C = serde_json::from_value(cfg).map_err(|e| e.to_string())?;
            Ok(Arc::new(build(c)?))
        }
        match kind.as_str() {
            "auth" => typed(cfg, auth::Auth::new),
            "compression" => typed(cfg, compression::Compression::new),
            "concurrency" => typed(cfg, concurrency::Concurrency::new),
            "cors" => typed(cfg, cors::Cors::new),
            "headers" => typed(cfg, headers::Headers::new),
            "limits" => typed(cfg, limits::Limits::new),
            "rate_limit" => typed(cfg, rate_limit::RateLimit::new),
            "redirect" => typed(cfg, redirect::Redirect::new),
            "security_headers" => typed(cfg, security_headers::SecurityHeaders::new),
            "tracing" => typed(cfg, tracing::Tracing::new),
            other => match self.custom.get(other) {
                Some(factory) => factory(cfg),
                None => Err(format!(
                    "unknown filter kind {other:?}; built-in kinds: {}{}",
                    BUILTIN.join(", "),
                    if self.custom.is_empty() {
                        String::new()
                    } else {
                        format!(
                            "; registered: {}",
                            self.custom.keys().cloned().collect::<Vec<_>>().join(", ")
                        )
                    }
                )),
            },
        }
    }
}

/// Serde helpers for filter configurations.
pub mod de {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    /// A human duration (`10m`).
    pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        crate::config::file::parse_duration(&s).map_err(serde::de::Error::custom)
    }

    /// An optional human size (`10MiB`, or a number of bytes).
    pub fn opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Size {
            Bytes(u64),
            Human(String),
        }
        match Option::<Size>::deserialize(d)? {
            None => Ok(None),
            Some(Size::Bytes(n)) => Ok(Some(n)),
            Some(Size::Human(s)) => crate::config::file::parse_size(&s)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// Parse a header value from configuration, refusing CR, LF and NUL.
pub fn header_value(v: &str) -> Result<HeaderValue, String> {
    if v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
        return Err(format!("header value {v:?} contains CR, LF or NUL"));
    }
    HeaderValue::from_str(v).map_err(|_| format!("invalid header value {v:?}"))
}

/// Parse a header name from configuration.
pub fn header_name(n: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(n.as_bytes()).map_err(|_| format!("invalid header name {n:?}"))
}

/// Words that make a configuration key (or a header name, `-` read as `_`) name a secret, in
/// any filter (built-in or custom): a key containing one (`client_secret`, `api_token`,
/// `db_password`), or ending in one of [`SECRET_SUFFIXES`] (`private_key`, `x-api-key`).
const SECRET_WORDS: &[&str] = &[
    "secret",
    "password",
    "passwd",
    "passphrase",
    "token",
    "credential",
    "api_keys",
];

/// Endings that make a key name a secret.
const SECRET_SUFFIXES: &[&str] = &["api_key", "apikey", "private_key", "access_key"];

/// Whole names of credential-bearing headers (a `headers` filter's
/// `set: {authorization: "Bearer …"}`).
const SECRET_NAMES: &[&str] = &["authorization", "proxy_authorization", "cookie"];

/// URL query parameters whose values are secrets (`redis://host/0?pass=…`).
const SECRET_PARAMS: &[&str] = &["pass", "password", "passwd", "secret", "token"];

fn secret_name(k: &str) -> bool {
    let k = k.to_ascii_lowercase().replace('-', "_");
    SECRET_WORDS.iter().any(|w| k.contains(w))
        || SECRET_SUFFIXES.iter().any(|s| k.ends_with(s))
        || SECRET_NAMES.contains(&k.as_str())
}

/// A filter's configuration with secrets replaced by `"<redacted>"`: values of secret-named keys
/// (and header names), and the password of any URL (`redis://:pw@host` →
/// `redis://:<redacted>@host`, `?pass=pw` → `?pass=<redacted>`).
pub fn redacted(spec: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match spec {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    // A flag or a number names no secret (`allow_credentials: true`).
                    let v = if secret_name(k) && (v.is_string() || v.is_array() || v.is_object()) {
                        Value::String("<redacted>".into())
                    } else {
                        redacted(v)
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(redacted).collect()),
        Value::String(s) => Value::String(redact_url_query(&redact_url_password(s))),
        other => other.clone(),
    }
}

/// `scheme://user:password@host…` with the password redacted; anything else unchanged.
fn redact_url_password(s: &str) -> String {
    let Some((scheme, rest)) = s.split_once("://") else {
        return s.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return s.to_string();
    };
    match rest[..at].split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:<redacted>{}", &rest[at..]),
        None => s.to_string(),
    }
}

/// A URL's secret query parameters ([`SECRET_PARAMS`]) redacted; anything else unchanged.
fn redact_url_query(s: &str) -> String {
    let Some((base, query)) = s.contains("://").then(|| s.split_once('?')).flatten() else {
        return s.to_string();
    };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let params: Vec<String> = query
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((name, _)) if SECRET_PARAMS.contains(&name.to_ascii_lowercase().as_str()) => {
                format!("{name}=<redacted>")
            }
            _ => p.to_string(),
        })
        .collect();
    let mut out = format!("{base}?{}", params.join("&"));
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

#[cfg(test)]
mod redaction_tests {
    use super::redacted;
    use serde_json::json;

    #[test]
    fn secrets_and_url_passwords_are_redacted() {
        let spec = json!({
            "kind": "auth",
            "api_keys": ["k1", "k2"],
            "jwt": {"secret": "s3cret", "issuer": "https://idp", "client_secret": "x"},
            "backend": {"url": "redis://:pw@127.0.0.1:6379/0", "timeout": "100ms"},
            "other": "redis://user@host",
            "key": "client_ip",
        });
        assert_eq!(
            redacted(&spec),
            json!({
                "kind": "auth",
                "api_keys": "<redacted>",
                "jwt": {"secret": "<redacted>", "issuer": "https://idp", "client_secret": "<redacted>"},
                "backend": {"url": "redis://:<redacted>@127.0.0.1:6379/0", "timeout": "100ms"},
                "other": "redis://user@host",
                "key": "client_ip",
            })
        );
    }

    #[test]
    fn credential_headers_query_passwords_and_key_like_names_are_redacted() {
        let spec = json!({
            "kind": "headers",
            "request": {
                "set": {"Authorization": "Bearer upstream-key", "X-Api-Key": "k", "x-upstream-token": "t", "x-tenant": "blue"},
                "add": {"cookie": "session=1"},
                "remove": ["authorization"],
            },
            "backend": {"url": "redis+unix:///run/redis.sock?db=2&pass=pw#x"},
            "private_key": "-----BEGIN",
            "passphrase": "p",
            "hash_key": "header:x-user",
            "allow_credentials": true,
        });
        assert_eq!(
            redacted(&spec),
            json!({
                "kind": "headers",
                "request": {
                    "set": {"Authorization": "<redacted>", "X-Api-Key": "<redacted>", "x-upstream-token": "<redacted>", "x-tenant": "blue"},
                    "add": {"cookie": "<redacted>"},
                    "remove": ["authorization"],
                },
                "backend": {"url": "redis+unix:///run/redis.sock?db=2&pass=<redacted>#x"},
                "private_key": "<redacted>",
                "passphrase": "<redacted>",
                "hash_key": "header:x-user",
                "allow_credentials": true,
            })
        );
    }
}

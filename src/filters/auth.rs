//! `auth`: API keys from a header (default `X-API-Key`) or a query parameter, compared in
//! constant time against every configured key; the credential is removed before the request
//! goes upstream. Missing or wrong key: 401 with `WWW-Authenticate`.
//! (JWT verification is planned; see docs/filters.md.)

use async_trait::async_trait;
use http::HeaderValue;
use pingora::http::RequestHeader;
use serde::Deserialize;

use super::{Filter, FilterCtx, Outcome, Reply, header_name};

/// `kind: auth`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Accepted keys.
    #[serde(default)]
    api_keys: Vec<String>,
    /// A file with one key per line (blank lines and `#` comments ignored).
    #[serde(default)]
    api_keys_file: Option<String>,
    /// Header carrying the key. Default `X-API-Key`.
    #[serde(default = "default_header")]
    header: String,
    /// Query parameter carrying the key, if allowed. Default: none.
    #[serde(default)]
    query: Option<String>,
}

fn default_header() -> String {
    "x-api-key".into()
}

/// The built filter.
pub struct Auth {
    keys: Vec<Vec<u8>>,
    header: http::HeaderName,
    query: Option<String>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the keys.
        f.debug_struct("Auth")
            .field("keys", &self.keys.len())
            .field("header", &self.header)
            .finish()
    }
}

impl Auth {
    /// Build from configuration.
    pub fn new(c: AuthConfig) -> Result<Auth, String> {
        let mut keys: Vec<Vec<u8>> = c.api_keys.iter().map(|k| k.as_bytes().to_vec()).collect();
        if let Some(path) = &c.api_keys_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("api_keys_file: cannot read {path:?}: {e}"))?;
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(|l| l.as_bytes().to_vec()),
            );
        }
        if keys.is_empty() {
            return Err("api_keys: list at least one key (or api_keys_file)".into());
        }
        if keys.iter().any(|k| k.len() < 8) {
            return Err("api_keys: every key must be at least 8 characters".into());
        }
        Ok(Auth {
            keys,
            header: header_name(&c.header)?,
            query: c.query,
        })
    }

    fn valid(&self, given: &[u8]) -> bool {
        // Compare against every key, whatever matches, so timing says nothing about which.
        self.keys
            .iter()
            .fold(false, |ok, k| ok | constant_time_eq(k, given))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let len_ok = a.len() == b.len();
    let diff = a
        .iter()
        .zip(b.iter().chain(std::iter::repeat(&0)))
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    len_ok && diff == 0
}

/// The query value of `name`, and the query without it.
fn take_query(query: &str, name: &str) -> (Option<String>, String) {
    let mut found = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|kv| match kv.split_once('=') {
            Some((k, v)) if k == name => {
                found.get_or_insert_with(|| v.to_string());
                false
            }
            _ => true,
        })
        .collect();
    (found, rest.join("&"))
}

#[async_trait]
impl Filter for Auth {
    async fn on_request(&self, req: &mut RequestHeader, _cx: &mut FilterCtx<'_>) -> Outcome {
        let mut given = req.headers.get(&self.header).map(|v| v.as_bytes().to_vec());
        if given.is_none()
            && let Some(q) = &self.query
            && let Some(query) = req.uri.query()
        {
            let (value, rest) = take_query(query, q);
            if let Some(v) = value {
                given = Some(v.into_bytes());
                let pq = if rest.is_empty() {
                    req.uri.path().to_string()
                } else {
                    format!("{}?{rest}", req.uri.path())
                };
                if let Ok(uri) = http::Uri::try_from(pq) {
                    req.set_uri(uri);
                }
            }
        }
        req.remove_header(&self.header);
        match given {
            Some(k) if self.valid(&k) => Outcome::Continue,
            _ => Outcome::Respond(Reply::error(401, "missing or invalid API key").header(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("ApiKey realm=\"tollgate\""),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_query_extraction() {
        let a = Auth::new(AuthConfig {
            api_keys: vec!["k-123456789".into(), "other-key-1".into()],
            api_keys_file: None,
            header: "x-api-key".into(),
            query: None,
        })
        .unwrap();
        assert!(a.valid(b"k-123456789"));
        assert!(a.valid(b"other-key-1"));
        assert!(!a.valid(b"k-12345678"));
        assert!(!a.valid(b"k-1234567890"));
        assert!(!a.valid(b""));
        assert_eq!(
            take_query("a=1&api_key=s&b=2", "api_key"),
            (Some("s".into()), "a=1&b=2".into())
        );
        assert_eq!(take_query("a=1", "api_key"), (None, "a=1".into()));
    }
}

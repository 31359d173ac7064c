//! `auth`: API keys or JWTs.
//!
//! - **API keys** from a header (default `X-API-Key`) or a query parameter, compared in constant
//!   time against every configured key; the credential is removed before the request goes
//!   upstream.
//! - **JWT** (`jwt:`) from `Authorization: Bearer`: HS256/384/512 with a secret, RS256/ES256
//!   (and kin) with a public key PEM or a JWKS file (key chosen by `kid`); `exp` required, `nbf`,
//!   `iss`, `aud` checked with a clock-skew `leeway`; selected claims forwarded as headers
//!   (client-sent copies of those headers are removed first).
//!
//! Failure: 401 with `WWW-Authenticate`.

use std::sync::Arc;

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
    /// Verify JSON Web Tokens instead of API keys.
    #[serde(default)]
    jwt: Option<JwtConfig>,
}

/// `jwt:` of `kind: auth`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Shared secret (HS256/384/512).
    #[serde(default)]
    secret: Option<String>,
    /// PEM public key file (RSA or EC).
    #[serde(default)]
    public_key_file: Option<String>,
    /// JWKS file (`{"keys": [...]}`); the token's `kid` picks the key.
    #[serde(default)]
    jwks_file: Option<String>,
    /// Accepted algorithms. Default: HS256 for a secret, RS256 and ES256 for keys.
    #[serde(default)]
    algorithms: Vec<String>,
    /// Required `iss`.
    #[serde(default)]
    issuer: Option<String>,
    /// Required `aud` (one of).
    #[serde(default)]
    audience: Vec<String>,
    /// Clock skew allowed on `exp`/`nbf`. Default 30s.
    #[serde(default = "default_leeway", deserialize_with = "super::de::duration")]
    leeway: std::time::Duration,
    /// Claims forwarded as request headers: `{ sub: X-User, scope: X-Scope }`.
    #[serde(default)]
    claims_to_headers: std::collections::BTreeMap<String, String>,
}

fn default_header() -> String {
    "x-api-key".into()
}

fn default_leeway() -> std::time::Duration {
    std::time::Duration::from_secs(30)
}

/// The verified claims of this request's JWT, for later filters.
#[derive(Clone, Debug)]
pub struct JwtClaims(pub Arc<serde_json::Map<String, serde_json::Value>>);

impl JwtClaims {
    /// A claim as a string (strings as they are, other values as JSON).
    pub fn get(&self, name: &str) -> Option<String> {
        self.0
            .get(name)
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
    }
}

/// JWT verification, built once.
struct Jwt {
    /// Keys by `kid` (`None`: the one key when not from a JWKS), each with a validation whose
    /// algorithms are the configured ones of the key's family (jsonwebtoken refuses others).
    keys: Vec<(
        Option<String>,
        jsonwebtoken::DecodingKey,
        jsonwebtoken::Validation,
    )>,
    claims: Vec<(String, http::HeaderName)>,
}

impl Jwt {
    fn new(c: JwtConfig) -> Result<Jwt, String> {
        use jsonwebtoken::{Algorithm, DecodingKey, Validation};
        let sources = [
            c.secret.is_some(),
            c.public_key_file.is_some(),
            c.jwks_file.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() != 1 {
            return Err("jwt: set exactly one of secret, public_key_file, jwks_file".into());
        }
        use jsonwebtoken::AlgorithmFamily as Family;
        use jsonwebtoken::jwk::AlgorithmParameters;
        let read =
            |path: &str| std::fs::read(path).map_err(|e| format!("jwt: cannot read {path:?}: {e}"));
        let keys: Vec<(Option<String>, DecodingKey, Family)> = if let Some(secret) = &c.secret {
            if secret.len() < 32 {
                return Err("jwt.secret: use at least 32 characters".into());
            }
            vec![(
                None,
                DecodingKey::from_secret(secret.as_bytes()),
                Family::Hmac,
            )]
        } else if let Some(path) = &c.public_key_file {
            let pem = read(path)?;
            let (key, family) = DecodingKey::from_rsa_pem(&pem)
                .map(|k| (k, Family::Rsa))
                .or_else(|_| DecodingKey::from_ec_pem(&pem).map(|k| (k, Family::Ec)))
                .map_err(|e| {
                    format!("jwt.public_key_file: not an RSA or EC public key PEM: {e}")
                })?;
            vec![(None, key, family)]
        } else {
            let path = c.jwks_file.as_deref().unwrap_or_default();
            let set: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(&read(path)?)
                .map_err(|e| format!("jwt.jwks_file: not a JWKS document: {e}"))?;
            set.keys
                .iter()
                .filter_map(|k| {
                    let family = match &k.algorithm {
                        AlgorithmParameters::RSA(_) => Family::Rsa,
                        AlgorithmParameters::EllipticCurve(_) => Family::Ec,
                        AlgorithmParameters::OctetKeyPair(_) => Family::Ed,
                        // Symmetric keys do not belong in a public JWKS; other kinds are unknown.
                        _ => return None,
                    };
                    Some(
                        DecodingKey::from_jwk(k)
                            .map(|key| (k.common.key_id.clone(), key, family))
                            .map_err(|e| format!("jwt.jwks_file: {e}")),
                    )
                })
                .collect::<Result<Vec<_>, String>>()?
        };
        if keys.is_empty() {
            return Err("jwt.jwks_file: no usable public keys".into());
        }
        let configured = c
            .algorithms
            .iter()
            .map(|a| {
                a.parse::<Algorithm>()
                    .map_err(|_| format!("jwt.algorithms: unknown {a:?}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut base = Validation::new(Algorithm::HS256);
        base.leeway = c.leeway.as_secs();
        base.validate_nbf = true;
        // A configured issuer or audience is required, not only checked where present:
        // jsonwebtoken passes a token without the claim (or with one of the wrong type).
        let mut required = vec!["exp"];
        if let Some(iss) = &c.issuer {
            base.set_issuer(&[iss]);
            required.push("iss");
        }
        if c.audience.is_empty() {
            base.validate_aud = false;
        } else {
            base.set_audience(&c.audience);
            required.push("aud");
        }
        base.set_required_spec_claims(&required);
        let keys = keys
            .into_iter()
            .map(|(kid, key, family)| {
                let default = match family {
                    Family::Hmac => Algorithm::HS256,
                    Family::Rsa => Algorithm::RS256,
                    Family::Ec => Algorithm::ES256,
                    Family::Ed => Algorithm::EdDSA,
                };
                let algorithms: Vec<Algorithm> = if configured.is_empty() {
                    vec![default]
                } else {
                    configured
                        .iter()
                        .copied()
                        .filter(|a| a.family() == family)
                        .collect()
                };
                if algorithms.is_empty() {
                    return Err(format!("jwt.algorithms: none fits a {family:?} key"));
                }
                let mut v = base.clone();
                v.algorithms = algorithms;
                Ok((kid, key, v))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let claims = c
            .claims_to_headers
            .iter()
            .map(|(claim, h)| Ok((claim.clone(), header_name(h)?)))
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Jwt { keys, claims })
    }

    /// The token's claims if it verifies.
    fn verify(&self, token: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
        let header = jsonwebtoken::decode_header(token).ok()?;
        let (_, key, validation) = match (&header.kid, self.keys.as_slice()) {
            (_, [only @ (None, _, _)]) => only,
            (Some(kid), keys) => keys
                .iter()
                .find(|(id, _, _)| id.as_deref() == Some(kid.as_str()))?,
            (None, [only]) => only,
            (None, _) => return None,
        };
        jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, key, validation)
            .ok()
            .map(|d| d.claims)
    }
}

/// The built filter.
pub struct Auth {
    keys: Vec<Vec<u8>>,
    header: http::HeaderName,
    query: Option<String>,
    jwt: Option<Jwt>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the keys.
        f.debug_struct("Auth")
            .field("keys", &self.keys.len())
            .field("header", &self.header)
            .field("jwt", &self.jwt.is_some())
            .finish()
    }
}

impl Auth {
    /// Build from configuration.
    pub fn new(c: AuthConfig) -> Result<Auth, String> {
        if let Some(jwt) = c.jwt {
            if !c.api_keys.is_empty() || c.api_keys_file.is_some() || c.query.is_some() {
                return Err("jwt: use a separate auth filter for API keys".into());
            }
            return Ok(Auth {
                keys: Vec::new(),
                header: http::header::AUTHORIZATION,
                query: None,
                jwt: Some(Jwt::new(jwt)?),
            });
        }
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
            jwt: None,
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
            // `?api_key` alone: no key, but not forwarded either.
            None if *kv == name => {
                found.get_or_insert_with(String::new);
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
        if let Some(jwt) = &self.jwt {
            // Headers the claims will fill must not be supplied by the client.
            for (_, h) in &jwt.claims {
                req.remove_header(h);
            }
            // One token, the one checked: with two, a backend reading the other one (the
            // last, say, without verifying it) would act on a token nobody verified.
            if req
                .headers
                .get_all(http::header::AUTHORIZATION)
                .iter()
                .nth(1)
                .is_some()
            {
                return Outcome::Respond(Reply::error(400, "more than one Authorization header"));
            }
            let token = req
                .headers
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    v.strip_prefix("Bearer ")
                        .or_else(|| v.strip_prefix("bearer "))
                })
                .map(str::trim);
            let Some(claims) = token.and_then(|t| jwt.verify(t)) else {
                return Outcome::Respond(Reply::error(401, "missing or invalid token").header(
                    http::header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"tollgate\", error=\"invalid_token\""),
                ));
            };
            for (claim, h) in &jwt.claims {
                let value = match claims.get(claim) {
                    Some(serde_json::Value::String(s)) => s.clone(),
                    Some(serde_json::Value::Array(a)) => a
                        .iter()
                        .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                        .collect::<Vec<_>>()
                        .join(" "),
                    Some(v) => v.to_string(),
                    None => continue,
                };
                if let Ok(v) = HeaderValue::from_str(&value) {
                    let _ = req.insert_header(h.clone(), v);
                }
            }
            // Later filters (e.g. rate_limit with key claim:NAME) may use the verified claims.
            _cx.state.insert(JwtClaims(Arc::new(claims)));
            return Outcome::Continue;
        }
        let mut given = req.headers.get(&self.header).map(|v| v.as_bytes().to_vec());
        // The query's key never goes upstream, even when the header carried the one checked.
        if let Some(q) = &self.query
            && let Some(query) = req.uri.query()
        {
            let (value, rest) = take_query(query, q);
            if let Some(v) = value {
                given.get_or_insert(v.into_bytes());
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
            jwt: None,
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

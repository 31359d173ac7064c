//! `cors`: Cross-Origin Resource Sharing. Preflight requests (`OPTIONS` with
//! `Access-Control-Request-Method`) are answered by the gateway; other requests from an allowed
//! origin get the `Access-Control-Allow-*` headers on the response. `Vary: Origin` is always
//! added. `*` is refused together with credentials.

use std::time::Duration;

use async_trait::async_trait;
use http::header::{self, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use serde::Deserialize;

use super::{Filter, FilterCtx, Outcome, Reply, de, header_name};

/// `kind: cors`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Exact origins (`https://app.example.com`), patterns (`https://*.example.com`) or `*`.
    allow_origins: Vec<String>,
    /// Default GET, HEAD, POST.
    #[serde(default = "default_methods")]
    allow_methods: Vec<String>,
    /// Request headers a preflight may ask for. Default none.
    #[serde(default)]
    allow_headers: Vec<String>,
    /// Response headers the browser may read. Default none.
    #[serde(default)]
    expose_headers: Vec<String>,
    /// Default false.
    #[serde(default)]
    allow_credentials: bool,
    /// Preflight cache time. Default 10m.
    #[serde(default = "default_max_age", deserialize_with = "de::duration")]
    max_age: Duration,
}

fn default_methods() -> Vec<String> {
    vec!["GET".into(), "HEAD".into(), "POST".into()]
}

fn default_max_age() -> Duration {
    Duration::from_secs(600)
}

#[derive(Debug)]
enum OriginRule {
    Any,
    Exact(String),
    /// `https://*.example.com` → ("https://", ".example.com")
    Wildcard(String, String),
}

/// The built filter.
#[derive(Debug)]
pub struct Cors {
    origins: Vec<OriginRule>,
    methods: HeaderValue,
    headers: Option<HeaderValue>,
    expose: Option<HeaderValue>,
    credentials: bool,
    max_age: HeaderValue,
}

/// Origins this request was allowed by, per `cors` filter (a global and a route filter must not
/// act on each other's approval).
#[derive(Clone, Default)]
struct AllowedOrigins(std::collections::HashMap<usize, HeaderValue>);

/// The upstream's own CORS response fields were removed: the first `cors` filter to see the
/// response does it, so the gateway's policy is the only one the browser sees.
#[derive(Clone)]
struct UpstreamCorsRemoved;

/// CORS response fields an upstream may send that would widen the gateway's policy.
const CORS_RESPONSE_FIELDS: [header::HeaderName; 6] = [
    header::ACCESS_CONTROL_ALLOW_ORIGIN,
    header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
    header::ACCESS_CONTROL_EXPOSE_HEADERS,
    header::ACCESS_CONTROL_ALLOW_METHODS,
    header::ACCESS_CONTROL_ALLOW_HEADERS,
    header::ACCESS_CONTROL_MAX_AGE,
];

impl Cors {
    fn id(&self) -> usize {
        self as *const Cors as usize
    }
}

impl Cors {
    /// Build from configuration.
    pub fn new(c: CorsConfig) -> Result<Cors, String> {
        if c.allow_origins.is_empty() {
            return Err("allow_origins: list at least one origin".into());
        }
        let mut origins = Vec::new();
        for o in &c.allow_origins {
            let o = o.trim().trim_end_matches('/').to_ascii_lowercase();
            if o == "*" {
                if c.allow_credentials {
                    return Err("allow_origins: \"*\" cannot be combined with allow_credentials: true; list the origins".into());
                }
                origins.push(OriginRule::Any);
            } else if let Some((scheme, host)) = o.split_once("://*.") {
                origins.push(OriginRule::Wildcard(
                    format!("{scheme}://"),
                    format!(".{host}"),
                ));
            } else if o.starts_with("http://") || o.starts_with("https://") {
                origins.push(OriginRule::Exact(o));
            } else {
                return Err(format!(
                    "allow_origins: {o:?} is not an origin (scheme://host[:port])"
                ));
            }
        }
        let join = |v: &[String], what: &str| -> Result<Option<HeaderValue>, String> {
            if v.is_empty() {
                return Ok(None);
            }
            for n in v {
                header_name(n).map_err(|e| format!("{what}: {e}"))?;
            }
            HeaderValue::from_str(&v.join(", "))
                .map(Some)
                .map_err(|e| e.to_string())
        };
        for m in &c.allow_methods {
            http::Method::from_bytes(m.as_bytes())
                .map_err(|_| format!("allow_methods: invalid method {m:?}"))?;
        }
        Ok(Cors {
            origins,
            methods: HeaderValue::from_str(&c.allow_methods.join(", "))
                .map_err(|e| e.to_string())?,
            headers: join(&c.allow_headers, "allow_headers")?,
            expose: join(&c.expose_headers, "expose_headers")?,
            credentials: c.allow_credentials,
            max_age: HeaderValue::from(c.max_age.as_secs()),
        })
    }

    fn allows(&self, origin: &str) -> bool {
        let origin = origin.to_ascii_lowercase();
        self.origins.iter().any(|r| match r {
            OriginRule::Any => true,
            OriginRule::Exact(o) => *o == origin,
            OriginRule::Wildcard(scheme, suffix) => {
                origin.strip_prefix(scheme.as_str()).is_some_and(|host| {
                    let host = host.split(':').next().unwrap_or("");
                    host.len() > suffix.len() && host.ends_with(suffix.as_str())
                })
            }
        })
    }

    fn allow_origin_value(&self, origin: &HeaderValue) -> HeaderValue {
        if !self.credentials && self.origins.iter().any(|r| matches!(r, OriginRule::Any)) {
            HeaderValue::from_static("*")
        } else {
            origin.clone()
        }
    }
}

/// The method a CORS preflight asks about: `OPTIONS` with `Origin` and a valid
/// `Access-Control-Request-Method`; `None` for any other request.
pub fn preflight_method(req: &RequestHeader) -> Option<http::Method> {
    if req.method != http::Method::OPTIONS || !req.headers.contains_key(header::ORIGIN) {
        return None;
    }
    let m = req.headers.get(header::ACCESS_CONTROL_REQUEST_METHOD)?;
    http::Method::from_bytes(m.as_bytes()).ok()
}

#[async_trait]
impl Filter for Cors {
    async fn on_request(&self, req: &mut RequestHeader, cx: &mut FilterCtx<'_>) -> Outcome {
        let Some(origin) = req.headers.get(header::ORIGIN).cloned() else {
            return Outcome::Continue;
        };
        let allowed = origin.to_str().is_ok_and(|o| self.allows(o));
        let preflight = req.method == http::Method::OPTIONS
            && req
                .headers
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
        if preflight {
            if !allowed {
                return Outcome::Respond(Reply::error(403, "CORS origin not allowed"));
            }
            let mut r = Reply::new(204)
                .header(
                    header::ACCESS_CONTROL_ALLOW_ORIGIN,
                    self.allow_origin_value(&origin),
                )
                .header(header::ACCESS_CONTROL_ALLOW_METHODS, self.methods.clone())
                .header(header::ACCESS_CONTROL_MAX_AGE, self.max_age.clone())
                .header(header::VARY, HeaderValue::from_static("Origin"));
            if let Some(h) = &self.headers {
                r = r.header(header::ACCESS_CONTROL_ALLOW_HEADERS, h.clone());
            }
            if self.credentials {
                r = r.header(
                    header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                    HeaderValue::from_static("true"),
                );
            }
            return Outcome::Respond(r);
        }
        if allowed {
            let mut all = cx.state.remove::<AllowedOrigins>().unwrap_or_default();
            all.0.insert(self.id(), origin);
            cx.state.insert(all);
        }
        Outcome::Continue
    }

    fn on_response(&self, resp: &mut ResponseHeader, cx: &mut FilterCtx<'_>) {
        // An upstream answering `Access-Control-Allow-Origin: *` (or echoing any origin) would
        // otherwise open what the route's policy keeps closed.
        if cx.state.get::<UpstreamCorsRemoved>().is_none() {
            for f in &CORS_RESPONSE_FIELDS {
                resp.remove_header(f);
            }
            cx.state.insert(UpstreamCorsRemoved);
        }
        let _ = resp.append_header(header::VARY, "Origin");
        let Some(origin) = cx
            .state
            .get::<AllowedOrigins>()
            .and_then(|a| a.0.get(&self.id()).cloned())
        else {
            return;
        };
        let _ = resp.insert_header(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            self.allow_origin_value(&origin),
        );
        if self.credentials {
            let _ = resp.insert_header(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true");
        }
        if let Some(e) = &self.expose {
            let _ = resp.insert_header(header::ACCESS_CONTROL_EXPOSE_HEADERS, e.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(json: serde_json::Value) -> Result<Cors, String> {
        Cors::new(serde_json::from_value(json).map_err(|e| e.to_string())?)
    }

    #[test]
    fn origin_patterns() {
        let c = cors(serde_json::json!({"allow_origins": ["https://app.example.com", "https://*.example.org"]})).unwrap();
        assert!(c.allows("https://app.example.com"));
        assert!(c.allows("HTTPS://APP.EXAMPLE.COM"));
        assert!(!c.allows("http://app.example.com"));
        assert!(c.allows("https://a.example.org"));
        assert!(c.allows("https://a.b.example.org:8443"));
        assert!(!c.allows("https://example.org"));
        assert!(!c.allows("https://evilexample.org"));
        assert!(!c.allows("https://a.example.org.evil.com"));
    }

    #[test]
    fn star_with_credentials_is_refused() {
        let e = cors(serde_json::json!({"allow_origins": ["*"], "allow_credentials": true}))
            .unwrap_err();
        assert!(e.contains("cannot be combined"), "{e}");
        assert!(cors(serde_json::json!({"allow_origins": ["app.example.com"]})).is_err());
    }
}

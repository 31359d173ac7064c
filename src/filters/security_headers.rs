//! `security_headers`: HSTS, `X-Content-Type-Options`, `X-Frame-Options`, `Referrer-Policy`,
//! and optionally `Content-Security-Policy` and `Permissions-Policy`, set on every response.
//! Each has a default; an empty string turns one off.

use async_trait::async_trait;
use http::HeaderValue;
use pingora::http::ResponseHeader;
use serde::Deserialize;

use super::{Filter, FilterCtx, header_value};

/// `kind: security_headers`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityHeadersConfig {
    /// `Strict-Transport-Security`. Default `max-age=31536000; includeSubDomains`.
    #[serde(default = "d_hsts")]
    hsts: String,
    /// `X-Content-Type-Options`. Default `nosniff`.
    #[serde(default = "d_nosniff")]
    content_type_options: String,
    /// `X-Frame-Options`. Default `DENY`.
    #[serde(default = "d_frame")]
    frame_options: String,
    /// `Referrer-Policy`. Default `strict-origin-when-cross-origin`.
    #[serde(default = "d_referrer")]
    referrer_policy: String,
    /// `Content-Security-Policy`. Default: not set.
    #[serde(default)]
    content_security_policy: String,
    /// `Permissions-Policy`. Default: not set.
    #[serde(default)]
    permissions_policy: String,
}

fn d_hsts() -> String {
    "max-age=31536000; includeSubDomains".into()
}
fn d_nosniff() -> String {
    "nosniff".into()
}
fn d_frame() -> String {
    "DENY".into()
}
fn d_referrer() -> String {
    "strict-origin-when-cross-origin".into()
}

/// The built filter.
#[derive(Debug)]
pub struct SecurityHeaders {
    headers: Vec<(&'static str, HeaderValue)>,
}

impl SecurityHeaders {
    /// Build from configuration.
    pub fn new(c: SecurityHeadersConfig) -> Result<SecurityHeaders, String> {
        let mut headers = Vec::new();
        for (name, v) in [
            ("strict-transport-security", c.hsts),
            ("x-content-type-options", c.content_type_options),
            ("x-frame-options", c.frame_options),
            ("referrer-policy", c.referrer_policy),
            ("content-security-policy", c.content_security_policy),
            ("permissions-policy", c.permissions_policy),
        ] {
            if !v.is_empty() {
                headers.push((name, header_value(&v)?));
            }
        }
        Ok(SecurityHeaders { headers })
    }
}

#[async_trait]
impl Filter for SecurityHeaders {
    fn on_response(&self, resp: &mut ResponseHeader, _cx: &mut FilterCtx<'_>) {
        for (name, v) in &self.headers {
            let _ = resp.insert_header(*name, v.clone());
        }
    }
}

//! `redirect`: answer with a redirect built from a template, e.g. http→https:
//! `{ kind: redirect, to: "https://${host}${path}", status: 308, plain_only: true }`.

use async_trait::async_trait;
use pingora::http::RequestHeader;
use serde::Deserialize;

use super::template::Template;
use super::{Filter, FilterCtx, Outcome, Reply};

/// `kind: redirect`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectConfig {
    /// Target template (`${host}`, `${path}` = path and query, `${scheme}`, …).
    to: String,
    /// 301, 302, 307 or 308. Default 308.
    #[serde(default = "default_status")]
    status: u16,
    /// Redirect only requests that arrived without TLS (an http→https redirect on a route
    /// that both kinds of listener serve). Default false.
    #[serde(default)]
    plain_only: bool,
}

fn default_status() -> u16 {
    308
}

/// The built filter.
#[derive(Debug)]
pub struct Redirect {
    to: Template,
    status: u16,
    plain_only: bool,
}

impl Redirect {
    /// Build from configuration.
    pub fn new(c: RedirectConfig) -> Result<Redirect, String> {
        if ![301, 302, 303, 307, 308].contains(&c.status) {
            return Err(format!(
                "status: {} is not a redirect status (301, 302, 303, 307, 308)",
                c.status
            ));
        }
        if c.to.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(format!(
                "to: {:?} contains a space or control character",
                c.to
            ));
        }
        Ok(Redirect {
            to: Template::parse(&c.to).map_err(|e| format!("to: {e}"))?,
            status: c.status,
            plain_only: c.plain_only,
        })
    }
}

#[async_trait]
impl Filter for Redirect {
    async fn on_request(&self, req: &mut RequestHeader, cx: &mut FilterCtx<'_>) -> Outcome {
        if self.plain_only && cx.tls {
            return Outcome::Continue;
        }
        let location = self.to.render(req, cx);
        match http::HeaderValue::from_str(&location) {
            Ok(v) => Outcome::Respond(Reply::new(self.status).header(http::header::LOCATION, v)),
            Err(_) => Outcome::Respond(Reply::error(400, "cannot build the redirect target")),
        }
    }
}

//! A gateway with a custom filter kind, registered through the library: `ab_split` assigns each
//! user (by a header) to variant `a` or `b`, stickily, tells the backend in a request header and
//! the client in a response header.
//!
//! ```yaml
//! routes:
//!   - name: shop
//!     upstream: shop
//!     filters:
//!       - { kind: ab_split, user_header: X-User, percent_b: 30 }
//! ```
//!
//! Run it like the `tollgate` binary: `cargo run --example custom_filter -- -c conf.yaml`.

use std::hash::{Hash, Hasher};
use std::process::ExitCode;

use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use serde::Deserialize;
use tollgate::filters::{Filter, FilterCtx, FilterRegistry, Outcome, Reply};

/// The filter's configuration: its YAML keys (unknown keys are errors).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AbSplitConfig {
    /// Header that identifies the user.
    user_header: String,
    /// Share of users in variant `b`, 0–100.
    percent_b: u8,
    /// Header carrying the variant. Default `X-Variant`.
    #[serde(default = "default_variant_header")]
    variant_header: String,
}

fn default_variant_header() -> String {
    "x-variant".into()
}

#[derive(Debug)]
struct AbSplit {
    user_header: http::HeaderName,
    variant_header: http::HeaderName,
    percent_b: u8,
}

/// The variant chosen for this request, kept between the hooks.
#[derive(Clone, Copy)]
struct Variant(&'static str);

impl AbSplit {
    fn new(c: AbSplitConfig) -> Result<AbSplit, String> {
        if c.percent_b > 100 {
            return Err(format!("percent_b: {} is not a percentage", c.percent_b));
        }
        let name = |n: &str| {
            http::HeaderName::from_bytes(n.as_bytes())
                .map_err(|_| format!("invalid header name {n:?}"))
        };
        Ok(AbSplit {
            user_header: name(&c.user_header)?,
            variant_header: name(&c.variant_header)?,
            percent_b: c.percent_b,
        })
    }
}

#[async_trait]
impl Filter for AbSplit {
    async fn on_request(&self, req: &mut RequestHeader, cx: &mut FilterCtx<'_>) -> Outcome {
        let Some(user) = req.headers.get(&self.user_header).cloned() else {
            return Outcome::Respond(Reply::error(400, "missing user header"));
        };
        // Stable across requests and processes: the same user always gets the same variant.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        user.as_bytes().hash(&mut h);
        let variant = if h.finish() % 100 < u64::from(self.percent_b) {
            "b"
        } else {
            "a"
        };
        let _ = req.insert_header(self.variant_header.clone(), variant);
        cx.state.insert(Variant(variant));
        Outcome::Continue
    }

    fn on_response(&self, resp: &mut ResponseHeader, cx: &mut FilterCtx<'_>) {
        if let Some(Variant(v)) = cx.state.get::<Variant>().copied() {
            let _ = resp.insert_header(self.variant_header.clone(), v);
        }
    }
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let mut filters = FilterRegistry::new();
    filters.register("ab_split", AbSplit::new);
    tollgate::cli::main_with(filters)
}

//! # tollgate
//!
//! A programmable HTTP reverse proxy and API gateway built on Cloudflare's
//! [Pingora](https://github.com/cloudflare/pingora).
//!
//! One [`proxy::Gateway`] (`ProxyHttp`) drives every request through these phases:
//!
//! ```text
//! downstream ─► early_request_filter   snapshot, client address (trusted proxies), request id,
//!                                      hop-by-hop stripping, forwarding-header hygiene
//!            ─► request_filter         route match (host → path → method); 404/405 JSON
//!            ─► upstream_peer          balancer picks a backend (skipping ones that refused to connect)
//!            ─► upstream_request_filter X-Forwarded-*, X-Request-Id, strip/rewrite, Host
//!            ─► response filters       hop-by-hop stripping, X-Request-Id
//!            ─► fail_to_proxy          502 / 504 / … as small JSON bodies
//! ```
//!
//! Configuration is loaded in two layers ([`config`]): a serde schema that rejects unknown keys,
//! then validation into a runtime model with located errors. [`runtime::RuntimeState`] compiles
//! it for the request path and is swapped whole on reload.
//!
//! Bodies stream in both directions; nothing buffers a whole body.

pub mod access_log;
pub mod cache;
pub mod cli;
pub mod config;
pub mod filters;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod proxy;
pub mod routing;
pub mod runtime;
pub mod server;
pub mod tls;
pub mod upstream;
pub mod wire;

pub use config::Config;
pub use proxy::Gateway;
pub use runtime::RuntimeState;

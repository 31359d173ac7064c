//! The bare Pingora proxy: round robin over `UPSTREAMS` (comma-separated `IP:port`), listening
//! on `LISTEN`, and nothing else. It is the ceiling any Pingora-based proxy can reach, and the
//! baseline tollgate is measured against (`make bench`, docs/performance.md).
//!
//! ```text
//! UPSTREAMS=127.0.0.1:9001 LISTEN=127.0.0.1:9100 cargo run --release --example bare_proxy -- -c pingora.yaml
//! ```

use std::sync::Arc;

use async_trait::async_trait;
use pingora::lb::LoadBalancer;
use pingora::lb::selection::RoundRobin;
use pingora::prelude::*;
use pingora::upstreams::peer::HttpPeer;

struct Bare(Arc<LoadBalancer<RoundRobin>>);

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let backend = self
            .0
            .select(b"", 256)
            .ok_or_else(|| Error::explain(ErrorType::ConnectNoRoute, "no backend"))?;
        Ok(Box::new(HttpPeer::new(backend, false, String::new())))
    }
}

/// Runs the proxy until it is told to stop (also the `main` of `bare_proxy_mimalloc`).
pub fn main() {
    let upstreams = std::env::var("UPSTREAMS").unwrap_or_else(|_| "127.0.0.1:9001".into());
    let listen = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:9100".into());
    let mut server = Server::new(Some(Opt::parse_args())).expect("server");
    server.bootstrap();
    let lb = LoadBalancer::try_from_iter(upstreams.split(',')).expect("UPSTREAMS: IP:port list");
    let mut proxy = pingora::proxy::http_proxy_service(&server.configuration, Bare(Arc::new(lb)));
    proxy.add_tcp(&listen);
    server.add_service(proxy);
    server.run_forever();
}

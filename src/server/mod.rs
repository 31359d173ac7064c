//! Process bootstrap: turn a validated [`Config`] into a Pingora [`Server`] with the proxy
//! service on every listener (and the admin service), then run it until a signal stops it.
//!
//! Signals are Pingora's: SIGTERM stops accepting, serves in-flight requests for
//! `server.grace_period`, then waits up to `server.graceful_shutdown_timeout`; SIGQUIT hands the
//! listening sockets to a new process started with `--upgrade`; SIGINT stops at once.

pub mod admin;
pub mod background;
pub mod demo;

use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora::prelude::*;
use pingora::server::RunArgs;
use pingora::server::configuration::{Opt, ServerConf};

use crate::config::Config;
use crate::config::MAX_RETRIES;
use crate::proxy::Gateway;
use crate::runtime::RuntimeState;

/// Process-level switches that come from the command line, not the file.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessOptions {
    /// Take the listening sockets over from a running instance (`-u`).
    pub upgrade: bool,
    /// Detach into the background (`-d`).
    pub daemon: bool,
}

/// Pingora's [`ServerConf`] from our `server:` section.
pub fn server_conf(config: &Config) -> ServerConf {
    let s = &config.server;
    ServerConf {
        threads: s.threads,
        pid_file: s.pid_file.clone(),
        upgrade_sock: s.upgrade_sock.clone(),
        grace_period_seconds: Some(ceil_secs(s.grace_period)),
        graceful_shutdown_timeout_seconds: Some(ceil_secs(s.graceful_shutdown_timeout)),
        upstream_keepalive_pool_size: s.upstream_keepalive_pool_size,
        // One first attempt plus the most retries validation allows.
        max_retries: MAX_RETRIES + 1,
        ..ServerConf::default()
    }
}

fn ceil_secs(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Build the server with every service, ready to run. `extra` services (the demo upstreams)
/// run in the same process.
pub fn build(config: Config, opts: ProcessOptions) -> Server {
    let conf = server_conf(&config);
    let opt = Opt {
        upgrade: opts.upgrade,
        daemon: opts.daemon,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let listeners = config.listeners.clone();
    let admin = config.admin;
    let runtime = RuntimeState::new(config);
    if let Some(bg) = background::Background::new(&runtime.upstreams) {
        server.add_service(pingora::services::background::background_service(
            "health checks and discovery",
            bg,
        ));
    }
    let state = Arc::new(ArcSwap::from_pointee(runtime));
    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        Gateway::new(state),
        "tollgate proxy",
    );
    for addr in &listeners {
        proxy.add_tcp(&addr.to_string());
    }
    server.add_service(proxy);
    if let Some(addr) = admin {
        server.add_service(admin::service(addr));
    }
    server
}

/// Build and run until shut down by a signal.
pub fn run(config: Config, opts: ProcessOptions) {
    build(config, opts).run(RunArgs::default());
}

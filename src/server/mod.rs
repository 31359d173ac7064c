//! Process bootstrap: turn a validated [`Config`] into a Pingora [`Server`] with the proxy
//! service on every listener (and the admin service), then run it until a signal stops it.
//!
//! Signals are Pingora's: SIGTERM stops accepting, serves in-flight requests for
//! `server.grace_period`, then waits up to `server.graceful_shutdown_timeout`; SIGQUIT hands the
//! listening sockets to a new process started with `--upgrade`; SIGINT stops at once.

pub mod admin;
pub mod background;
pub mod control;
pub mod demo;
pub mod reload;

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora::listeners::{DEFAULT_L4_WRITE_BUFFER_SIZE, L4BufferSettings, ListenerConfig};
use pingora::prelude::*;
use pingora::server::RunArgs;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::services::background::background_service;

use crate::config::Config;
use crate::config::MAX_RETRIES;
use crate::filters::FilterRegistry;
use crate::proxy::Gateway;
use crate::runtime::RuntimeState;
use admin::Admin;
use background::Background;
use control::{Control, Lifecycle};
use reload::Reloader;

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

/// Build the server with every service, ready to run. `path` is the configuration file,
/// read again on reload with the same filter kinds (`filters`).
pub fn build(
    config: Config,
    path: &Path,
    filters: FilterRegistry,
    opts: ProcessOptions,
) -> Result<Server, String> {
    let conf = server_conf(&config);
    let opt = Opt {
        upgrade: opts.upgrade,
        daemon: opts.daemon,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let listeners = config.listeners.clone();
    let admin = config.admin.clone();
    crate::cache::init(&config.cache);
    let runtime = RuntimeState::build(config, None)?;
    let state = Arc::new(ArcSwap::from_pointee(runtime));
    let (reloader, states) = Reloader::new(path.to_path_buf(), filters, Arc::clone(&state));
    let reloader = Arc::new(reloader);
    let lifecycle = Arc::new(Lifecycle::default());

    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        Gateway::new(Arc::clone(&state)),
        "tollgate proxy",
    );
    for l in &listeners {
        proxy.add_listener(ListenerConfig::tcp(l.address.to_string()).l4_buffer(
            L4BufferSettings::new(l.read_buffer, DEFAULT_L4_WRITE_BUFFER_SIZE),
        ));
    }
    server.add_service(proxy);
    if let Some(a) = admin {
        let app = Admin::new(
            Arc::clone(&state),
            Arc::clone(&reloader),
            Arc::clone(&lifecycle),
            a.token,
        );
        server.add_service(admin::service(a.address, app));
    }
    server.add_service(background_service(
        "health checks and discovery",
        Background::new(states),
    ));
    let phases = server.watch_execution_phase();
    server.add_service(background_service(
        "control",
        Control::new(reloader, lifecycle, phases),
    ));
    Ok(server)
}

/// Build and run until shut down by a signal.
pub fn run(
    config: Config,
    path: &Path,
    filters: FilterRegistry,
    opts: ProcessOptions,
) -> Result<(), String> {
    build(config, path, filters, opts)?.run(RunArgs::default());
    Ok(())
}

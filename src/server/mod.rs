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
use pingora::apps::HttpServerOptions;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::{DEFAULT_L4_WRITE_BUFFER_SIZE, L4BufferSettings, ListenerConfig};
use pingora::prelude::*;
use pingora::protocols::http::v2::server::{H2Options, default_h2_options};
use pingora::proxy::HttpProxy;
use pingora::server::RunArgs;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use pingora::tls::ResolvesServerCert;

use crate::config::MAX_RETRIES;
use crate::config::{Config, Http2Settings};
use crate::filters::FilterRegistry;
use crate::proxy::Gateway;
use crate::runtime::RuntimeState;
use crate::wire::{Admission, Guarded};
use admin::Admin;
use background::Background;
use control::{Control, Lifecycle};
use reload::Reloader;

use crate::tls::SniResolver;

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
        work_stealing: s.work_stealing,
        ..ServerConf::default()
    }
}

fn ceil_secs(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Whether every listening address can be bound now: `Err` names each one that cannot.
///
/// Pingora binds the listeners when its services start and, when an address is taken, retries
/// for 30 s and then panics in that service's thread, leaving the process up (the admin
/// listener answering ready) without the proxy. Checking first makes a taken address a clear
/// error at start. Not for a binary upgrade (`-u`): the running instance holds the sockets
/// and hands them over.
pub fn check_addresses(config: &Config) -> Result<(), String> {
    let admin = config
        .admin
        .as_ref()
        .map(|a| ("admin.address".to_string(), a.address));
    let taken: Vec<String> = config
        .listeners
        .iter()
        .enumerate()
        .map(|(i, l)| (format!("listeners[{i}].address"), l.address))
        .chain(admin)
        .filter_map(|(key, addr)| {
            std::net::TcpListener::bind(addr)
                .err()
                .map(|e| format!("{key}: cannot listen on {addr}: {e}"))
        })
        .collect();
    if taken.is_empty() {
        Ok(())
    } else {
        Err(taken.join("\n"))
    }
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
    let http2 = config.server.http2.clone();
    let admin = config.admin.clone();
    crate::cache::init(&config.cache);
    let runtime = RuntimeState::build(config, None)?;
    let state = Arc::new(ArcSwap::from_pointee(runtime));
    let resolvers: Vec<Option<Arc<SniResolver>>> = listeners
        .iter()
        .map(|l| {
            l.tls
                .as_ref()
                .map(|t| Arc::new(SniResolver::new(Arc::clone(&t.store))))
        })
        .collect();
    let (reloader, states) = Reloader::new(
        path.to_path_buf(),
        filters,
        Arc::clone(&state),
        resolvers.clone(),
    );
    let reloader = Arc::new(reloader);
    let lifecycle = Arc::new(Lifecycle::default());

    // h2c is a setting of the whole proxy service in Pingora, so h2c listeners get a service
    // of their own (with its own upstream connection pool) when there are any. Both count
    // against the same connection caps.
    let admission = Arc::new(Admission::default());
    let auto_max = crate::wire::admission::fd_budget();
    for h2c in [false, true] {
        let mine: Vec<_> = listeners
            .iter()
            .zip(&resolvers)
            .filter(|(l, _)| l.h2c == h2c)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let name = if h2c {
            "tollgate proxy (h2c)"
        } else {
            "tollgate proxy"
        };
        let mut app = HttpProxy::new(
            Gateway::new(Arc::clone(&state)),
            Arc::clone(&server.configuration),
        );
        app.handle_init_modules();
        app.server_options = Some(server_options(&http2, h2c));
        app.h2_options = Some(h2_options(&http2));
        let guarded = Guarded::new(
            app,
            Arc::clone(&state),
            Arc::clone(&admission),
            auto_max,
            h2c,
        );
        let mut proxy = Service::new(name.to_string(), guarded);
        for (l, resolver) in mine {
            proxy.add_listener(listener_endpoint(l, resolver.as_ref()));
        }
        server.add_service(proxy);
    }
    if let Some(a) = admin {
        let app = Admin::new(
            Arc::clone(&state),
            Arc::clone(&reloader),
            Arc::clone(&lifecycle),
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

/// One listening endpoint: its socket, read buffer and, for TLS, the certificate resolver.
fn listener_endpoint(
    l: &crate::config::ListenerConfig,
    resolver: Option<&Arc<SniResolver>>,
) -> ListenerConfig {
    let mut endpoint = ListenerConfig::tcp(l.address.to_string()).l4_buffer(L4BufferSettings::new(
        l.read_buffer,
        DEFAULT_L4_WRITE_BUFFER_SIZE,
    ));
    if let (Some(tls), Some(resolver)) = (&l.tls, resolver) {
        // The paths are never read: with a resolver Pingora takes every certificate from it.
        let mut settings =
            TlsSettings::intermediate("", "").expect("building TLS settings reads no file");
        settings.set_cert_resolver(Arc::clone(resolver) as Arc<dyn ResolvesServerCert>);
        if tls.http2 {
            settings.enable_h2();
        }
        endpoint = endpoint.tls(settings);
    }
    endpoint
}

/// Pingora's per-service HTTP options: h2c, and how long an idle h2 connection is kept.
fn server_options(h: &Http2Settings, h2c: bool) -> HttpServerOptions {
    let mut o = HttpServerOptions::default();
    o.h2c = h2c;
    o.h2_idle_timeout = Some(h.idle_timeout);
    o
}

/// The HTTP/2 server settings, from Pingora's bounded defaults (which a `Some` replaces).
fn h2_options(h: &Http2Settings) -> H2Options {
    let mut o = default_h2_options();
    o.max_concurrent_streams(h.max_concurrent_streams)
        .max_header_list_size(h.max_header_list_size)
        .max_pending_accept_reset_streams(h.max_pending_reset_streams)
        .max_local_error_reset_streams(Some(h.max_local_error_reset_streams))
        .initial_window_size(h.initial_window_size)
        .initial_connection_window_size(h.initial_window_size.saturating_mul(4).min((1 << 31) - 1));
    o
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

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(server: &str) -> ServerConf {
        let yaml = format!(
            "server: {{ {server} }}\nlisteners: [{{address: 127.0.0.1:1}}]\nupstreams: {{u: {{backends: [{{address: 127.0.0.1:2}}]}}}}\n"
        );
        server_conf(&Config::from_yaml(&yaml, "test").unwrap())
    }

    /// Work stealing is off with one thread (nothing to steal from, and the single-threaded
    /// runtime is cheaper) and on with more, unless the file says otherwise.
    #[test]
    fn work_stealing_follows_the_thread_count_unless_set() {
        assert!(!conf("threads: 1").work_stealing);
        assert!(conf("threads: 2").work_stealing);
        assert!(!conf("threads: 4, work_stealing: false").work_stealing);
        assert!(conf("threads: 1, work_stealing: true").work_stealing);
        assert_eq!(conf("threads: 3").threads, 3);
    }
}

//! Command line: `tollgate [-c FILE] [-t] [-u] [-d]` and `tollgate demo [-c FILE]`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::filters::FilterRegistry;
use crate::server::{self, ProcessOptions};

/// Exit status for a configuration that fails validation (EX_USAGE).
pub const EXIT_BAD_CONFIG: u8 = 64;
/// Exit status when a listening address is taken or not permitted (EX_UNAVAILABLE).
pub const EXIT_CANNOT_LISTEN: u8 = 69;

/// tollgate: a programmable HTTP reverse proxy and API gateway built on Pingora.
///
/// Exit status: 0, 64 for an invalid configuration, 69 when a listening address is taken.
///
/// Signals: SIGTERM drains gracefully (server.grace_period, then
/// server.graceful_shutdown_timeout); SIGQUIT hands the listening sockets to a new process
/// started with --upgrade; SIGINT stops at once.
#[derive(Debug, Parser)]
#[command(name = "tollgate", version, about, long_about)]
pub struct Cli {
    /// Configuration file (YAML). Default: /etc/tollgate/tollgate.yaml, or conf/demo.yaml for
    /// `demo`.
    #[arg(short = 'c', long = "conf", value_name = "FILE", global = true)]
    pub conf: Option<PathBuf>,
    /// Validate the configuration, print every problem, and exit: 0 if valid, 64 if not.
    #[arg(short = 't', long = "test")]
    pub test: bool,
    /// Take over the listening sockets of a running instance (binary upgrade), then SIGQUIT it.
    #[arg(short = 'u', long = "upgrade")]
    pub upgrade: bool,
    /// Run in the background as a daemon.
    #[arg(short = 'd', long = "daemon")]
    pub daemon: bool,
    /// What to run instead of the gateway.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start built-in demo upstreams on loopback and the gateway in front of them
    /// (configuration: conf/demo.yaml unless -c is given).
    Demo,
}

/// Parse the command line and run with the built-in filter kinds. Returns the exit status.
pub fn main() -> ExitCode {
    main_with(FilterRegistry::new())
}

/// [`main`] with extra filter kinds: a binary that embeds tollgate registers its own filters
/// and calls this (see `examples/custom_filter.rs`).
pub fn main_with(filters: FilterRegistry) -> ExitCode {
    let cli = Cli::parse();
    let demo = matches!(cli.command, Some(Command::Demo));
    let path = cli.conf.clone().unwrap_or_else(|| {
        PathBuf::from(if demo {
            "conf/demo.yaml"
        } else {
            "/etc/tollgate/tollgate.yaml"
        })
    });
    // Absolute, so that a reload still finds the file once `-d` has moved the process to `/`.
    let path = std::path::absolute(&path).unwrap_or(path);
    let config = match Config::load_with(&path, &filters) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!(
                "{}: {} error(s); configuration not loaded",
                path.display(),
                errors.errors.len()
            );
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    init_logging(&config.server.log_level);
    if cli.test
        && let Some(a) = &config.access_log
        && let Err(why) = crate::config::writable_log(&a.path)
    {
        let errors = crate::config::ConfigErrors {
            source: path.display().to_string(),
            errors: vec![crate::config::ConfigError::new("access_log.path", why)],
        };
        eprintln!("{errors}");
        eprintln!("{}: 1 error(s); configuration not loaded", path.display());
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    if cli.test {
        println!(
            "{}: configuration OK ({} listener(s), {} upstream(s), {} route(s))",
            path.display(),
            config.listeners.len(),
            config.upstreams.len(),
            config.routes.len()
        );
        return ExitCode::SUCCESS;
    }
    if !cli.upgrade
        && let Err(e) = server::check_addresses(&config)
    {
        eprintln!("{e}");
        eprintln!("{}: not started", path.display());
        return ExitCode::from(EXIT_CANNOT_LISTEN);
    }
    let opts = ProcessOptions {
        upgrade: cli.upgrade,
        daemon: cli.daemon,
    };
    let result = if demo {
        print!("{}", server::demo::banner(&config));
        let demos = server::demo::services(&config);
        server::build(config, &path, filters, opts).map(|mut srv| {
            for d in demos {
                srv.add_service(d);
            }
            srv.run(pingora::server::RunArgs::default());
        })
    } else {
        server::run(config, &path, filters, opts)
    };
    if let Err(e) = result {
        eprintln!("{e}");
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    ExitCode::SUCCESS
}

/// `RUST_LOG` if set, else the configured `server.log_level` (info before a configuration loads).
///
/// Without `RUST_LOG` the logger's own filter lets everything through and `log`'s global
/// maximum does the filtering, so that a reload can raise the level as well as lower it.
fn init_logging(level: &str) {
    let from_env = std::env::var_os("RUST_LOG").is_some();
    let env = env_logger::Env::default().default_filter_or(if from_env { level } else { "trace" });
    let _ = env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .try_init();
    if !from_env && let Ok(level) = level.parse() {
        log::set_max_level(level);
    }
}

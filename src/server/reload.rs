//! Configuration hot reload (SIGHUP and `POST /reload`): read, validate, build a new runtime
//! snapshot carrying live state over, swap it atomically. In-flight requests finish on the
//! snapshot they started with. A configuration that fails is never applied: the old one keeps
//! serving, and the failure is logged and counted.
//!
//! Listeners, the admin listener, the process settings under `server:` (other than
//! `log_level`, the request-head limits, `underscore_headers`, `preserve_header_case` and the
//! connection caps and timeouts, which are read per connection or request) and the top-level
//! `cache:` (the storage) belong to the running process: a
//! reload that changes them is refused with a message saying so; apply them with a restart or
//! a binary upgrade (`tollgate -u`). Routes' own `cache:` policies reload like the rest, and so
//! do listener certificates: every certificate and key file is read again and the new set is
//! swapped into the listener's resolver (new handshakes use it; open connections keep theirs).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::config::{Config, ServerSettings};
use crate::filters::FilterRegistry;
use crate::metrics::metrics;
use crate::runtime::RuntimeState;
use crate::tls::SniResolver;

/// Reloads the configuration file into the shared runtime state.
#[derive(Debug)]
pub struct Reloader {
    path: PathBuf,
    filters: FilterRegistry,
    state: Arc<ArcSwap<RuntimeState>>,
    changed: watch::Sender<Arc<RuntimeState>>,
    lock: Mutex<()>,
    /// Each listener's certificate resolver (`None` for plain listeners), in listener order.
    resolvers: Vec<Option<Arc<SniResolver>>>,
    /// [`Reloader::files_fingerprint`] after the last load or reload attempt.
    seen: AtomicU64,
}

impl Reloader {
    /// A reloader for `path` (parsed with `filters`) over `state`; the receiver sees every new
    /// snapshot.
    pub fn new(
        path: PathBuf,
        filters: FilterRegistry,
        state: Arc<ArcSwap<RuntimeState>>,
        resolvers: Vec<Option<Arc<SniResolver>>>,
    ) -> (Reloader, watch::Receiver<Arc<RuntimeState>>) {
        let (changed, rx) = watch::channel(state.load_full());
        let m = metrics();
        m.last_reload.set(unix_now());
        m.last_reload_success.set(1);
        let reloader = Reloader {
            path,
            filters,
            state,
            changed,
            lock: Mutex::new(()),
            resolvers,
            seen: AtomicU64::new(0),
        };
        reloader
            .seen
            .store(reloader.files_fingerprint(), Ordering::Relaxed);
        (reloader, rx)
    }

    /// The configuration file.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// How often to look for changed files (`server.reload_on_change`), if at all.
    pub fn watch_interval(&self) -> Option<std::time::Duration> {
        self.state.load().config.server.reload_on_change
    }

    /// A hash of the contents of the configuration file and of every TLS file it names (each
    /// read through its path, so a Kubernetes ConfigMap/Secret update, a symlink swap, counts).
    pub fn files_fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let state = self.state.load();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        let config = self.path.to_string_lossy();
        for path in std::iter::once(config.as_ref()).chain(state.config.watched_files()) {
            path.hash(&mut h);
            match std::fs::read(path) {
                Ok(bytes) => bytes.hash(&mut h),
                Err(e) => e.kind().hash(&mut h),
            }
        }
        h.finish()
    }

    /// Have the files changed since the last load or reload attempt?
    pub fn files_changed(&self) -> bool {
        self.files_fingerprint() != self.seen.load(Ordering::Relaxed)
    }

    /// Reload now. `Err` carries every problem, one per line; the old configuration stays.
    pub fn reload(&self) -> Result<(), String> {
        let _one_at_a_time = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let m = metrics();
        // Taken before the attempt, so a file that changes while it runs is a change for the
        // next check (a new configuration naming other files costs one more, idle, reload).
        // After a failure a bad file is reported once and retried when the files change again.
        let before = self.files_fingerprint();
        let outcome = self.try_reload();
        self.seen.store(before, Ordering::Relaxed);
        match outcome {
            Ok(()) => {
                m.reloads.with_label_values(&["success"]).inc();
                m.last_reload.set(unix_now());
                m.last_reload_success.set(1);
                log::warn!("configuration reloaded from {}", self.path.display());
                Ok(())
            }
            Err(e) => {
                m.reloads.with_label_values(&["failure"]).inc();
                m.last_reload_success.set(0);
                log::error!("configuration reload failed; the previous configuration stays:\n{e}");
                Err(e)
            }
        }
    }

    fn try_reload(&self) -> Result<(), String> {
        let mut config = Config::load_with(&self.path, &self.filters).map_err(|e| e.to_string())?;
        let old = self.state.load_full();
        let fixed = restart_only_changes(&old.config, &config);
        if !fixed.is_empty() {
            return Err(format!(
                "{}: {} cannot change on reload; restart or upgrade the binary (tollgate -u) to apply",
                self.path.display(),
                fixed.join(", ")
            ));
        }
        keep_derived(&old.config.server, &mut config.server);
        let new = Arc::new(RuntimeState::build(config, Some(&old))?);
        // Listeners are unchanged (checked above), so the resolvers line up with them.
        for (resolver, l) in self.resolvers.iter().zip(&new.config.listeners) {
            if let (Some(r), Some(tls)) = (resolver, &l.tls) {
                r.swap(Arc::clone(&tls.store));
            }
        }
        self.state.store(Arc::clone(&new));
        // Only once nothing can fail: a refused reload leaves the level as it was.
        if new.config.server.log_level != old.config.server.log_level
            && std::env::var_os("RUST_LOG").is_none()
            && let Ok(level) = new.config.server.log_level.parse()
        {
            log::set_max_level(level);
        }
        crate::upstream::forget_removed(&old.upstreams, &new.upstreams);
        let _ = self.changed.send(new);
        Ok(())
    }
}

/// Settings a reload cannot apply.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    let sockets = |c: &Config| {
        c.listeners
            .iter()
            .map(|l| l.socket_settings())
            .collect::<Vec<_>>()
    };
    if sockets(old) != sockets(new) {
        out.push("listeners");
    }
    // The token is read per request: a rotated one applies.
    let address = |c: &Config| c.admin.as_ref().map(|a| a.address);
    if address(old) != address(new) {
        out.push("admin");
    }
    // Settings read per request (or by the logger) reload like the rest. Those with a derived
    // default compare as written: the derived value may move with the upstreams or the CPUs,
    // and the running process keeps its own (`keep_derived`).
    let comparable = |s: &ServerSettings| ServerSettings {
        log_level: String::new(),
        threads: 0,
        work_stealing: false,
        upstream_keepalive_pool_size: 0,
        head: new.server.head,
        underscore_headers: new.server.underscore_headers,
        preserve_header_case: new.server.preserve_header_case,
        // Read at each accept and each request.
        connections: new.server.connections,
        ..s.clone()
    };
    if comparable(&old.server) != comparable(&new.server) {
        out.push("server");
    }
    if old.cache != new.cache {
        out.push("cache");
    }
    out
}

/// The process keeps the derived settings it started with (and `/config` shows those): each
/// one the reloaded configuration would change (as written the same, or not at all) is put back,
/// with a warning naming the value it takes at the next restart or upgrade.
fn keep_derived(running: &ServerSettings, new: &mut ServerSettings) {
    fn keep<T: PartialEq + std::fmt::Display + Copy>(what: &str, running: T, new: &mut T) {
        if *new != running {
            log::warn!(
                "{what} is {running}; the reloaded configuration makes it {new} from the next restart or upgrade"
            );
            *new = running;
        }
    }
    keep("server.threads", running.threads, &mut new.threads);
    keep(
        "server.work_stealing",
        running.work_stealing,
        &mut new.work_stealing,
    );
    keep(
        "server.upstream_keepalive_pool_size",
        running.upstream_keepalive_pool_size,
        &mut new.upstream_keepalive_pool_size,
    );
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

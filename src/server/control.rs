//! Process control: SIGHUP reloads the configuration, and Pingora's execution phases tell
//! readiness when shutdown (SIGTERM) or a binary upgrade (SIGQUIT) has begun.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use pingora::server::{ExecutionPhase, ShutdownWatch};
use pingora::services::background::BackgroundService;
use tokio::sync::broadcast;

use super::reload::Reloader;

/// What readiness needs to know about the process.
#[derive(Debug, Default)]
pub struct Lifecycle {
    stopping: AtomicBool,
}

impl Lifecycle {
    /// Has a graceful shutdown or upgrade begun?
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Mark that shutdown has begun.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }
}

/// The control background service.
pub struct Control {
    reloader: Arc<Reloader>,
    lifecycle: Arc<Lifecycle>,
    phases: std::sync::Mutex<Option<broadcast::Receiver<ExecutionPhase>>>,
}

impl Control {
    /// Control for a server whose phases arrive on `phases`.
    pub fn new(
        reloader: Arc<Reloader>,
        lifecycle: Arc<Lifecycle>,
        phases: broadcast::Receiver<ExecutionPhase>,
    ) -> Control {
        Control {
            reloader,
            lifecycle,
            phases: std::sync::Mutex::new(Some(phases)),
        }
    }
}

#[async_trait]
impl BackgroundService for Control {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(s) => s,
            Err(e) => {
                log::error!("cannot listen for SIGHUP ({e}); reload with POST /reload only");
                return;
            }
        };
        let mut phases = self.phases.lock().ok().and_then(|mut p| p.take());
        // server.reload_on_change: poll the files; a change reloads (once per change: a bad
        // file is reported once and retried only when the files change again).
        let mut watch = self.reloader.watch_interval().map(|d| {
            let mut t = tokio::time::interval(d);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        loop {
            tokio::select! {
                _ = async { watch.as_mut()?.tick().await; Some(()) }, if watch.is_some() => {
                    let r = Arc::clone(&self.reloader);
                    let _ = tokio::task::spawn_blocking(move || {
                        if r.files_changed() {
                            log::warn!("configuration files changed: reloading {}", r.path().display());
                            let _ = r.reload();
                        }
                    })
                    .await;
                }
                _ = hangup.recv() => {
                    log::warn!("SIGHUP: reloading {}", self.reloader.path().display());
                    let r = Arc::clone(&self.reloader);
                    // Reading and compiling the file is blocking work.
                    let _ = tokio::task::spawn_blocking(move || r.reload()).await;
                }
                phase = async { phases.as_mut()?.recv().await.ok() }, if phases.is_some() => {
                    match phase {
                        Some(ExecutionPhase::GracefulTerminate
                            | ExecutionPhase::GracefulUpgradeTransferringFds
                            | ExecutionPhase::ShutdownStarted) => self.lifecycle.stop(),
                        Some(_) => {}
                        None => phases = None,
                    }
                }
                _ = shutdown.changed() => {
                    self.lifecycle.stop();
                    return;
                }
            }
        }
    }
}

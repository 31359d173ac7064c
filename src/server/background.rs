//! The background service: active health checks and service discovery for every upstream
//! that configures them. It follows reloads: tasks of upstreams that a new snapshot replaced are
//! stopped, tasks for new or changed upstreams are started, unchanged upstreams keep theirs.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::runtime::RuntimeState;
use crate::upstream::{discovery, health};

/// Health checking and discovery, following the current runtime snapshot.
#[derive(Debug)]
pub struct Background {
    states: watch::Receiver<Arc<RuntimeState>>,
}

impl Background {
    /// Background work for the snapshots `states` announces.
    pub fn new(states: watch::Receiver<Arc<RuntimeState>>) -> Background {
        Background { states }
    }
}

/// Tasks per upstream object (keyed by its address: a reused upstream keeps its tasks).
type Tasks = HashMap<usize, Vec<AbortHandle>>;

fn resync(state: &RuntimeState, tasks: &mut Tasks) {
    let live: Vec<usize> = state
        .upstreams
        .iter()
        .map(|u| Arc::as_ptr(u) as usize)
        .collect();
    tasks.retain(|key, handles| {
        let keep = live.contains(key);
        if !keep {
            handles.iter().for_each(AbortHandle::abort);
        }
        keep
    });
    for u in &state.upstreams {
        tasks.entry(Arc::as_ptr(u) as usize).or_insert_with(|| {
            let mut handles = Vec::new();
            if let Some(hc) = u.config.health.clone() {
                handles.push(tokio::spawn(health::run(Arc::clone(u), hc)).abort_handle());
            }
            if let Some(d) = u.config.discovery.clone() {
                handles.push(tokio::spawn(discovery::run(Arc::clone(u), d)).abort_handle());
            }
            handles
        });
    }
}

#[async_trait]
impl BackgroundService for Background {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut states = self.states.clone();
        let mut tasks = Tasks::new();
        resync(&states.borrow_and_update(), &mut tasks);
        loop {
            tokio::select! {
                changed = states.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let state = Arc::clone(&states.borrow_and_update());
                    resync(&state, &mut tasks);
                }
                _ = shutdown.changed() => break,
            }
        }
        tasks.values().flatten().for_each(AbortHandle::abort);
    }
}

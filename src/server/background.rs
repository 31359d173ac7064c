//! The background service: active health checks and service discovery for every upstream
//! that configures them, on Pingora's background runtime, stopped at shutdown.

use std::sync::Arc;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::upstream::{Upstream, discovery, health};

/// Health checking and discovery for a set of upstreams.
#[derive(Debug)]
pub struct Background {
    upstreams: Vec<Arc<Upstream>>,
}

impl Background {
    /// Background work for `upstreams`; `None` when none needs any.
    pub fn new(upstreams: &[Arc<Upstream>]) -> Option<Background> {
        let upstreams: Vec<Arc<Upstream>> = upstreams
            .iter()
            .filter(|u| u.config.health.is_some() || u.config.discovery.is_some())
            .cloned()
            .collect();
        (!upstreams.is_empty()).then_some(Background { upstreams })
    }
}

#[async_trait]
impl BackgroundService for Background {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tasks = tokio::task::JoinSet::new();
        for u in &self.upstreams {
            if let Some(hc) = u.config.health.clone() {
                tasks.spawn(health::run(Arc::clone(u), hc));
            }
            if let Some(d) = u.config.discovery.clone() {
                tasks.spawn(discovery::run(Arc::clone(u), d));
            }
        }
        let _ = shutdown.changed().await;
        tasks.abort_all();
    }
}

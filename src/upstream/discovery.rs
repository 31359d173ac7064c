//! Service discovery: where an upstream's dynamic backends come from.
//!
//! - **DNS**: the A/AAAA records of a name, re-resolved every `refresh` (Kubernetes headless
//!   Services). A failed or empty resolution keeps the last good set; it is logged and counted.
//! - **ZooKeeper**: the children of a znode, each named `IP:port` (or holding `IP:port` as its
//!   data), watched. While disconnected the last good set stays; after a session expiry a new
//!   session is opened and the watch re-registered.
//!
//! Each source calls [`Upstream::set_discovered`], which keeps the state of backends that remain.
//! Runs as part of the background service (`server::background`).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::Upstream;
use super::stats::UpstreamStats;
use crate::config::Discovery;

/// A resolver asking `nameservers` (or the system's), with its cache off: every refresh asks.
fn resolver(
    nameservers: &[SocketAddr],
    refresh: Duration,
) -> Result<hickory_resolver::TokioResolver, String> {
    use hickory_resolver::Resolver;
    use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
    use hickory_resolver::net::runtime::TokioRuntimeProvider;

    let mut builder = if nameservers.is_empty() {
        Resolver::builder_tokio().map_err(|e| e.to_string())?
    } else {
        let servers = nameservers
            .iter()
            .map(|a| {
                let (mut udp, mut tcp) = (ConnectionConfig::udp(), ConnectionConfig::tcp());
                udp.port = a.port();
                tcp.port = a.port();
                NameServerConfig::new(a.ip(), true, vec![udp, tcp])
            })
            .collect();
        Resolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        )
    };
    builder.options_mut().cache_size = 0;
    builder.options_mut().timeout = refresh.min(Duration::from_secs(5));
    builder.build().map_err(|e| e.to_string())
}

/// Run the discovery of `upstream` forever.
pub async fn run(upstream: Arc<Upstream>, discovery: Discovery) {
    match discovery {
        Discovery::Dns {
            name,
            port,
            refresh,
            nameservers,
        } => dns(upstream, &name, port, refresh, &nameservers).await,
        Discovery::Zookeeper {
            servers,
            path,
            session_timeout,
        } => zookeeper(upstream, &servers, &path, session_timeout).await,
    }
}

fn apply(upstream: &Upstream, source: &str, found: BTreeSet<SocketAddr>) {
    let (added, removed) = upstream.set_discovered(found);
    if !added.is_empty() || !removed.is_empty() {
        log::info!(
            "upstream {}: {source} discovery added {added:?}, removed {removed:?}",
            upstream.name
        );
    }
}

fn failed(upstream: &Upstream, source: &str, why: impl std::fmt::Display) {
    UpstreamStats::inc(&upstream.stats.discovery_failures);
    log::warn!(
        "upstream {}: {source} discovery failed ({why}); keeping the last good backend set",
        upstream.name
    );
}

async fn dns(
    upstream: Arc<Upstream>,
    name: &str,
    port: u16,
    refresh: Duration,
    nameservers: &[SocketAddr],
) {
    let resolver = loop {
        match resolver(nameservers, refresh) {
            Ok(r) => break r,
            Err(e) => {
                // E.g. an unreadable /etc/resolv.conf: try again at the next refresh.
                failed(&upstream, "DNS", format!("no resolver: {e}"));
                tokio::time::sleep(refresh).await;
            }
        }
    };
    // A fully qualified name is not expanded with the search list.
    let fqdn = format!("{}.", name.trim_end_matches('.'));
    let mut tick = tokio::time::interval(refresh);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match resolver.lookup_ip(fqdn.as_str()).await {
            Ok(lookup) => {
                let found: BTreeSet<SocketAddr> =
                    lookup.iter().map(|ip| SocketAddr::new(ip, port)).collect();
                if found.is_empty() {
                    failed(&upstream, "DNS", format!("{name} has no addresses"));
                } else {
                    apply(&upstream, "DNS", found);
                }
            }
            Err(e) => failed(&upstream, "DNS", format!("{name}: {e}")),
        }
    }
}

async fn zookeeper(upstream: Arc<Upstream>, servers: &str, path: &str, session_timeout: Duration) {
    use zookeeper_client::{Client, Error};

    let retry = Duration::from_secs(1);
    loop {
        let client = match Client::connector()
            .with_session_timeout(session_timeout)
            .connect(servers)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                failed(&upstream, "ZooKeeper", format!("connect to {servers}: {e}"));
                tokio::time::sleep(retry).await;
                continue;
            }
        };
        log::info!(
            "upstream {}: ZooKeeper session to {servers} established",
            upstream.name
        );
        loop {
            match client.list_and_watch_children(path).await {
                Ok((children, watcher)) => {
                    let mut found = BTreeSet::new();
                    for child in &children {
                        match child_address(&client, path, child).await {
                            Some(a) => {
                                found.insert(a);
                            }
                            None => log::warn!(
                                "upstream {}: ZooKeeper child {path}/{child} is not IP:port; ignored",
                                upstream.name
                            ),
                        }
                    }
                    if found.is_empty() && !children.is_empty() {
                        failed(
                            &upstream,
                            "ZooKeeper",
                            format!("no usable child under {path}"),
                        );
                    } else {
                        apply(&upstream, "ZooKeeper", found);
                    }
                    let event = watcher.changed().await;
                    if event.session_state.is_terminated() {
                        failed(
                            &upstream,
                            "ZooKeeper",
                            format!("session {:?}", event.session_state),
                        );
                        break; // open a new session
                    }
                }
                Err(Error::NoNode) => {
                    failed(&upstream, "ZooKeeper", format!("{path} does not exist"));
                    tokio::time::sleep(retry).await;
                }
                Err(e) => {
                    failed(&upstream, "ZooKeeper", e);
                    if client.state().is_terminated() {
                        break;
                    }
                    tokio::time::sleep(retry).await;
                }
            }
        }
    }
}

/// A child's backend address: its name, or else its data, as `IP:port`.
async fn child_address(
    client: &zookeeper_client::Client,
    parent: &str,
    child: &str,
) -> Option<SocketAddr> {
    if let Ok(a) = child.parse() {
        return Some(a);
    }
    let full = format!("{}/{child}", parent.trim_end_matches('/'));
    let (data, _) = client.get_data(&full).await.ok()?;
    std::str::from_utf8(&data).ok()?.trim().parse().ok()
}

//! Active health checks: every `interval`, each backend of an upstream gets a TCP connect or an
//! HTTP `GET` (over TLS, verified like traffic, when the upstream has `tls:`) within `timeout`. `unhealthy` failures in a row take a backend out of selection;
//! `healthy` passes in a row bring it back. Backends start healthy. Runs as part of the
//! background service (`server::background`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Upstream;
use super::stats::UpstreamStats;
use crate::config::{HealthCheck, HealthCheckKind};

/// Check every backend of `upstream` forever, every `hc.interval`.
pub async fn run(upstream: Arc<Upstream>, hc: HealthCheck) {
    let mut tick = tokio::time::interval(hc.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let members = upstream.members();
        let checks = members.backends.iter().map(|b| {
            let hc = &hc;
            let tls = upstream.config.tls.as_ref().map(|t| {
                (
                    Arc::clone(&t.client_config),
                    super::tls_server_name(&upstream.config, b.addr),
                )
            });
            async move { (b, check(b.addr, hc, tls).await) }
        });
        for (backend, result) in futures_util::future::join_all(checks).await {
            let passed = result.is_ok();
            if let Some(now_healthy) = backend.health_report(passed, hc.healthy, hc.unhealthy) {
                UpstreamStats::inc(if now_healthy {
                    &upstream.stats.health_up
                } else {
                    &upstream.stats.health_down
                });
                if now_healthy {
                    log::warn!(
                        "upstream {} backend {} is healthy again",
                        upstream.name,
                        backend.addr
                    );
                } else {
                    log::warn!(
                        "upstream {} backend {} is unhealthy: {}",
                        upstream.name,
                        backend.addr,
                        result.err().unwrap_or_default()
                    );
                }
            }
        }
    }
}

/// TLS for a check: the upstream's client configuration and the server name to verify.
pub type CheckTls = Option<(Arc<rustls::ClientConfig>, String)>;

/// One check of one backend: `Ok` if it passes, else why not.
pub async fn check(addr: SocketAddr, hc: &HealthCheck, tls: CheckTls) -> Result<(), String> {
    tokio::time::timeout(hc.timeout, check_inner(addr, hc, tls))
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {:?}", hc.timeout)))
}

async fn check_inner(addr: SocketAddr, hc: &HealthCheck, tls: CheckTls) -> Result<(), String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    if hc.kind == HealthCheckKind::Tcp {
        return Ok(());
    }
    match tls {
        None => http_check(stream, addr, hc).await,
        Some((config, name)) => {
            let name = rustls_pki_types::ServerName::try_from(name)
                .map_err(|e| format!("server name: {e}"))?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            http_check(stream, addr, hc).await
        }
    }
}

async fn http_check<S>(mut stream: S, addr: SocketAddr, hc: &HealthCheck) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let host = hc.host.clone().unwrap_or_else(|| addr.to_string());
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tollgate-health-check\r\nConnection: close\r\n\r\n",
        hc.path
    );
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    // The status line is all we need: `HTTP/1.1 200 ...`.
    let mut buf = [0u8; 64];
    let mut len = 0;
    while len < 12 {
        let n = stream
            .read(&mut buf[len..])
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        len += n;
    }
    let status = parse_status(&buf[..len]).ok_or("not an HTTP response")?;
    let passed = if hc.statuses.is_empty() {
        (200..400).contains(&status)
    } else {
        hc.statuses.contains(&status)
    };
    if passed {
        Ok(())
    } else {
        Err(format!("status {status}"))
    }
}

fn parse_status(head: &[u8]) -> Option<u16> {
    let rest = head.strip_prefix(b"HTTP/1.")?.get(2..5)?;
    std::str::from_utf8(rest).ok()?.parse().ok()
}

/// Interval until a backend marked unhealthy can be healthy again (for `Retry-After`).
pub fn recovery_time(hc: &HealthCheck) -> Duration {
    hc.interval * hc.healthy
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line() {
        assert_eq!(parse_status(b"HTTP/1.1 204 No Content\r\n"), Some(204));
        assert_eq!(parse_status(b"HTTP/1.0 503 X"), Some(503));
        assert_eq!(parse_status(b"SSH-2.0"), None);
        assert_eq!(parse_status(b"HTTP/1.1 2"), None);
    }
}

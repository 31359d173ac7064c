//! `tollgate demo`: small built-in upstreams on loopback, so the gateway can be tried with no
//! other server. Every loopback backend address in the demo configuration gets one; each answers
//! with JSON naming itself and echoing what it received.

use std::net::SocketAddr;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora::services::listening::Service;

use crate::config::Config;

/// One demo upstream.
#[derive(Debug)]
pub struct DemoUpstream {
    name: String,
    addr: SocketAddr,
}

#[async_trait]
impl ServeHttp for DemoUpstream {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let mut received = 0usize;
        while let Ok(Some(chunk)) = session.read_request_body().await {
            received += chunk.len();
        }
        let req = session.req_header();
        let mut headers = String::new();
        for (k, v) in req.headers.iter() {
            if !headers.is_empty() {
                headers.push(',');
            }
            headers.push_str(&format!(
                "{:?}:{:?}",
                k.as_str(),
                String::from_utf8_lossy(v.as_bytes())
            ));
        }
        let body = format!(
            "{{\"backend\":{:?},\"address\":\"{}\",\"method\":{:?},\"path\":{:?},\"body_bytes\":{received},\"headers\":{{{headers}}}}}\n",
            self.name,
            self.addr,
            req.method.as_str(),
            req.uri.to_string(),
        );
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .header("content-length", body.len())
            .body(body.into_bytes())
            .expect("valid response parts")
    }
}

/// Demo services for every loopback backend of `config`, named `demo-1`, `demo-2`, ….
pub fn services(config: &Config) -> Vec<Service<DemoUpstream>> {
    let mut addrs: Vec<SocketAddr> = config
        .upstreams
        .iter()
        .flat_map(|u| u.backends.iter().map(|b| b.addr))
        .filter(|a| a.ip().is_loopback())
        .collect();
    addrs.sort();
    addrs.dedup();
    addrs
        .into_iter()
        .enumerate()
        .map(|(i, addr)| {
            let name = format!("demo-{}", i + 1);
            let mut svc = Service::new(name.clone(), DemoUpstream { name, addr });
            svc.add_tcp(&addr.to_string());
            svc
        })
        .collect()
}

/// What to print so a newcomer knows what to try.
pub fn banner(config: &Config) -> String {
    let listener = config
        .listeners
        .first()
        .map(|l| l.address.to_string())
        .unwrap_or_default();
    let mut s = format!("tollgate demo: gateway on http://{listener}\n\nTry:\n");
    for r in &config.routes {
        let path = match &r.path {
            crate::config::PathMatch::Exact(p) | crate::config::PathMatch::Prefix(p) => p.clone(),
            _ => "/".to_string(),
        };
        let host = match r.hosts.first() {
            Some(crate::config::HostPattern::Exact(h)) => format!(" -H 'Host: {h}'"),
            Some(crate::config::HostPattern::Suffix(h)) => format!(" -H 'Host: demo{h}'"),
            None => String::new(),
        };
        s.push_str(&format!(
            "  curl -s{host} http://{listener}{path}    # route {:?} → upstream {:?}\n",
            r.name, config.upstreams[r.upstream].name
        ));
    }
    if let Some(admin) = &config.admin {
        let a = admin.address;
        s.push_str(&format!(
            "  curl -s http://{a}/metrics    # admin API: also /upstreams, /config\n"
        ));
    }
    s.push_str("\nStop with Ctrl-C.\n");
    s
}

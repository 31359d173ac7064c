//! The admin listener. For now it answers `GET /health` (the process is alive); readiness,
//! metrics, upstream state and reload arrive with the observability work.

use std::net::SocketAddr;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora::services::listening::Service;

/// The admin HTTP application.
#[derive(Debug, Default)]
pub struct Admin;

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let (status, body): (u16, &[u8]) = match session.req_header().uri.path() {
            "/health" => (200, b"{\"status\":\"ok\"}"),
            _ => (404, b"{\"error\":\"not found\"}"),
        };
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .header("content-length", body.len())
            .body(body.to_vec())
            .expect("static response parts are valid")
    }
}

/// The admin service bound to `addr`.
pub fn service(addr: SocketAddr) -> Service<Admin> {
    let mut svc = Service::new("tollgate admin".to_string(), Admin);
    svc.add_tcp(&addr.to_string());
    svc
}

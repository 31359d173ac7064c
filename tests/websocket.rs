//! WebSockets through the real gateway once they leave Pingora's proxy loop (`wire::splice`):
//! the tunnel carries both directions (early bytes included), keeps the connection and the
//! request counted until it closes, logs it at the end, and closes a stalled one.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{TestGateway, Upstream, WsUpstream, client, eventually, metric};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

fn config(up: &SocketAddr, upstream_extra: &str, top_extra: &str) -> String {
    format!(
        "{top_extra}upstreams:\n  u:\n    backends: [{{ address: \"{up}\" }}]\n{upstream_extra}routes:\n  - {{ name: ws, upstream: u }}\n"
    )
}

fn log_entries(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A gateway writing its access log to a file (returned with the directory that holds it).
fn logging_gateway(
    up: &SocketAddr,
    upstream_extra: &str,
) -> (TestGateway, std::path::PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let top = format!(
        "access_log: {{ format: json, path: \"{}\" }}\n",
        log.display()
    );
    (
        TestGateway::start(&config(up, upstream_extra, &top)),
        log,
        dir,
    )
}

async fn gauges(gw: &TestGateway) -> [f64; 3] {
    let m = gw.metrics().await;
    [
        metric(&m, "tollgate_tunnels_open"),
        metric(&m, "tollgate_requests_in_flight"),
        metric(&m, "tollgate_downstream_connections"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_is_tunnelled_counted_while_open_and_logged_when_closed() {
    let ws = WsUpstream::start().await;
    let (gw, log, _dir) = logging_gateway(&ws.addr, "");
    gw.settled().await;
    let (mut socket, resp) = tokio_tungstenite::connect_async(format!("ws://{}/chat", gw.addr))
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    for i in 0..10 {
        let text = format!("hello {i}");
        socket.send(Message::Text(text.clone())).await.unwrap();
        let echo = socket.next().await.unwrap();
        assert_eq!(
            echo.unwrap_or_else(|e| panic!("message {i}: {e}\n{}", gw.log())),
            Message::Text(text)
        );
    }
    // While open: one tunnel, one request in flight, one client connection.
    assert_eq!(gauges(&gw).await, [1.0, 1.0, 1.0], "{}", gw.log());
    let blob: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    socket.send(Message::Binary(blob.clone())).await.unwrap();
    assert_eq!(socket.next().await.unwrap().unwrap(), Message::Binary(blob));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        log_entries(&log)
            .iter()
            .all(|e| e["request_id"] != id.as_str()),
        "logged before the WebSocket closed"
    );
    socket.close(None).await.unwrap();
    drop(socket);
    assert!(
        eventually(Duration::from_secs(5), || {
            log_entries(&log)
                .iter()
                .any(|e| e["request_id"] == id.as_str())
        })
        .await,
        "no access log line\n{}",
        gw.log()
    );
    let entries = log_entries(&log);
    let e = entries
        .iter()
        .find(|e| e["request_id"] == id.as_str())
        .unwrap();
    assert_eq!(e["status"], 101);
    assert_eq!(e["path"], "/chat");
    assert_eq!(e["route"], "ws");
    assert_eq!(e["backend"], ws.addr.to_string());
    // Ten masked text frames and the binary one from the client; their echoes unmasked.
    let (bytes_in, bytes_out) = (
        e["bytes_in"].as_u64().unwrap(),
        e["bytes_out"].as_u64().unwrap(),
    );
    assert!(bytes_in > 100_000 + 10 * 13, "bytes_in {bytes_in}");
    assert!(bytes_out > 100_000 + 10 * 9, "bytes_out {bytes_out}");
    assert!(
        bytes_in < 101_000 && bytes_out < 101_000,
        "{bytes_in} {bytes_out}"
    );
    assert!(e["total_ms"].as_f64().unwrap() >= 300.0, "{e}");
    let mut settled = false;
    for _ in 0..100 {
        if gauges(&gw).await == [0.0, 0.0, 0.0] {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(settled, "gauges after close: {:?}", gauges(&gw).await);
}

/// A request head, read a byte at a time so that nothing after it is taken; `None` at an
/// end of stream first.
async fn read_head(s: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await.unwrap_or(0) == 0 {
            return None;
        }
        head.push(b[0]);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// A backend that answers the upgrade at once, with bytes of the tunnel in the same write as
/// its `101` head, and then sends back `got:` and what it received.
async fn eager_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                if read_head(&mut s).await.is_none() {
                    return;
                }
                let answer = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nFROM-BACKEND;";
                if s.write_all(answer).await.is_err() {
                    return;
                }
                let mut got = [0u8; 12];
                if s.read_exact(&mut got).await.is_err() {
                    return;
                }
                let _ = s.write_all(&[b"got:", &got[..]].concat()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_bytes_on_both_sides_cross_the_splice_even_with_an_instant_101() {
    let backend = eager_backend().await;
    let gw = TestGateway::start(&config(&backend, "", ""));
    for i in 0..30 {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        // The client's first tunnel bytes in the same write as the upgrade request.
        s.write_all(
            b"GET /x HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nFROM-CLIENT;",
        )
        .await
        .unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
        assert!(read.is_ok(), "session {i}: no end of stream");
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 101"), "session {i}: {text}");
        let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
        assert_eq!(
            body,
            "FROM-BACKEND;got:FROM-CLIENT;",
            "session {i}\n{}",
            gw.log()
        );
    }
    assert_eq!(metric(&gw.metrics().await, "tollgate_tunnels_open"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_on_which_nothing_moves_is_closed_after_the_read_timeout() {
    let ws = WsUpstream::start().await;
    let (gw, log, _dir) = logging_gateway(&ws.addr, "    timeouts: { read: 1s }\n");
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{}/idle", gw.addr))
        .await
        .unwrap();
    socket.send(Message::Text("one".into())).await.unwrap();
    assert_eq!(
        socket.next().await.unwrap().unwrap(),
        Message::Text("one".into())
    );
    let started = Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(10), socket.next()).await;
    let waited = started.elapsed();
    assert!(
        matches!(end, Ok(None | Some(Err(_)))),
        "still open: {end:?}"
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );
    assert!(
        eventually(Duration::from_secs(5), || {
            log_entries(&log).iter().any(|e| e["status"] == 101)
        })
        .await
    );
    let entries = log_entries(&log);
    let e = entries.iter().find(|e| e["status"] == 101).unwrap();
    let error = e["error"].as_str().unwrap_or_default();
    assert!(error.contains("nothing moved either way for 1s"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_the_backend_answers_with_200_is_an_ordinary_response() {
    let up = Upstream::start().await;
    let gw = TestGateway::start(&config(&up.addr, "", ""));
    let resp = client()
        .get(gw.url("/plain"))
        .header("upgrade", "websocket")
        .header("connection", "upgrade")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.unwrap();
    assert!(!body.is_empty());
    assert_eq!(up.count(), 1);
    // An ordinary request still goes through.
    let resp = client().get(gw.url("/after")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(up.count(), 2);
    assert_eq!(metric(&gw.metrics().await, "tollgate_tunnels_open"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_to_a_backend_that_answers_at_once_stay_open() {
    // cloudflare/pingora#946: relaying an upgrade itself, Pingora 0.9.1 can take the end of
    // the request's empty body, read after an instant 101, for the client closing the tunnel.
    // A spliced tunnel is not Pingora's to close.
    let ws = WsUpstream::answering_after(Duration::ZERO).await;
    let gw = TestGateway::start(&config(&ws.addr, "", ""));
    for i in 0..50 {
        let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{}/now", gw.addr))
            .await
            .unwrap();
        for j in 0..3 {
            let text = format!("{i}.{j}");
            socket.send(Message::Text(text.clone())).await.unwrap();
            let echo = tokio::time::timeout(Duration::from_secs(5), socket.next()).await;
            assert!(
                matches!(&echo, Ok(Some(Ok(m))) if *m == Message::Text(text.clone())),
                "session {i} message {j}: {echo:?}\n{}",
                gw.log()
            );
        }
        socket.close(None).await.unwrap();
    }
}

/// Reads an upgrade request's head (and the body its `Content-Length` announces), answers
/// `101`, then sends `body:` and the body, and echoes what it reads after. With `flood`, it
/// writes for as long as the connection takes bytes instead.
async fn raw_ws_backend(flood: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Some(head) = read_head(&mut s).await else {
                    return;
                };
                let head = head.to_ascii_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                let mut body = vec![0u8; len];
                if s.read_exact(&mut body).await.is_err() {
                    return;
                }
                let answer = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";
                if s.write_all(answer).await.is_err() {
                    return;
                }
                if flood {
                    let chunk = vec![b'x'; 64 * 1024];
                    while s.write_all(&chunk).await.is_ok() {}
                    return;
                }
                if s.write_all(&[b"body:", &body[..], b";"].concat())
                    .await
                    .is_err()
                {
                    return;
                }
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

const UPGRADE: &str = "GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

/// Read from `s` until `want` has arrived (or fail after 5 s), returning all that was read.
async fn read_until(s: &mut TcpStream, want: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    while !String::from_utf8_lossy(&got).contains(want) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            other => panic!(
                "waiting for {want:?}: {other:?} after {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_with_a_body_is_relayed_by_pingora_body_first() {
    let backend = raw_ws_backend(false).await;
    let gw = TestGateway::start(&config(&backend, "", ""));
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(format!("{UPGRADE}Content-Length: 3\r\n\r\nabc").as_bytes())
        .await
        .unwrap();
    let got = read_until(&mut s, "body:abc;").await;
    assert!(got.starts_with("HTTP/1.1 101"), "{got}");
    s.write_all(b"ping").await.unwrap();
    read_until(&mut s, "ping").await;
    // Open, and not one of the gateway's own tunnels: Pingora relays it.
    assert_eq!(
        metric(&gw.metrics().await, "tollgate_tunnels_open"),
        0.0,
        "{}",
        gw.log()
    );
    // Without a body, the same backend's handshake leaves Pingora.
    let mut s2 = TcpStream::connect(gw.addr).await.unwrap();
    s2.write_all(format!("{UPGRADE}\r\n").as_bytes())
        .await
        .unwrap();
    read_until(&mut s2, "body:;").await;
    assert_eq!(metric(&gw.metrics().await, "tollgate_tunnels_open"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spliced_tunnel_whose_client_stops_reading_ends_after_the_send_timeout() {
    let backend = raw_ws_backend(true).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let top = format!(
        "access_log: {{ format: json, path: \"{}\" }}\n",
        log.display()
    );
    let extra = "    timeouts: { read: 30s, write: 30s }\n";
    let gw = common::GatewayConfig::new(config(&backend, extra, &top))
        .server("send_timeout: 1s")
        .start();
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(format!("{UPGRADE}\r\n").as_bytes())
        .await
        .unwrap();
    read_until(&mut s, "\r\n\r\n").await;
    // The client reads nothing more; the backend writes until the tunnel takes no more.
    let started = Instant::now();
    assert!(
        eventually(Duration::from_secs(10), || {
            log_entries(&log).iter().any(|e| e["status"] == 101)
        })
        .await,
        "tunnel still open after 10 s\n{}",
        gw.log()
    );
    let waited = started.elapsed();
    let entries = log_entries(&log);
    let e = entries.iter().find(|e| e["status"] == 101).unwrap();
    let error = e["error"].as_str().unwrap_or_default();
    assert!(error.contains("the client took nothing for 1s"), "{e}");
    assert!(waited >= Duration::from_secs(1), "{waited:?}");
    drop(s);
}

//! The connection guard through the real gateway: the head deadline (slowloris → 408), the body
//! idle timeout, the connection caps, and what must keep working behind it (keep-alive idling,
//! WebSockets).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{GatewayConfig, Upstream, read_response};

fn one_route(up: SocketAddr) -> String {
    format!(
        "upstreams: {{ u: {{ backends: [{{ address: \"{up}\" }}] }} }}\nroutes: [{{ name: r, upstream: u }}]\n"
    )
}

/// Everything the gateway sends on `s` until it closes (or `limit` passes: then `None`).
fn read_to_close(s: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Some(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some(out),
            Err(_) => return None,
        }
    }
}

/// `n` connections, each with one answered request and kept open; their status lines.
fn kept_open(addr: SocketAddr, n: usize) -> (Vec<TcpStream>, Vec<String>) {
    let mut open: Vec<TcpStream> = (0..n)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
                .unwrap();
            s
        })
        .collect();
    let statuses = open
        .iter_mut()
        .map(|s| read_response(s)[..12].to_string())
        .collect();
    (open, statuses)
}

fn status(response: &[u8]) -> &str {
    std::str::from_utf8(&response[..response.len().min(12)]).unwrap_or("?")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_head_is_answered_408_and_closed() {
    let up = Upstream::start().await;
    let gw = GatewayConfig::new(one_route(up.addr))
        .server("request_head_timeout: 1s")
        .start();
    let addr = gw.addr;
    let (trickled, silent) = tokio::task::spawn_blocking(move || {
        // Slowloris: a byte every 150 ms never completes the head.
        let mut s = TcpStream::connect(addr).unwrap();
        let t = Instant::now();
        s.write_all(b"GET /slow HTTP/1.1\r\nHost: a.test\r\nX-Slow: ")
            .unwrap();
        s.set_read_timeout(Some(Duration::from_millis(150)))
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while t.elapsed() < Duration::from_secs(5) {
            if s.write_all(b"x").is_err() {
                break;
            }
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => break,
            }
        }
        let trickled = (got, t.elapsed());
        // A connection that sends nothing at all.
        let mut s = TcpStream::connect(addr).unwrap();
        let t = Instant::now();
        let silent = (read_to_close(&mut s, Duration::from_secs(5)), t.elapsed());
        (trickled, silent)
    })
    .await
    .unwrap();

    let (got, took) = trickled;
    assert_eq!(
        status(&got),
        "HTTP/1.1 408",
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(String::from_utf8_lossy(&got).contains("connection: close"));
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // Nothing of a request came: closed quietly (as nginx does), at the deadline.
    let (got, took) = silent;
    assert_eq!(got.as_deref(), Some(&b""[..]));
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(up.received().is_empty(), "the origin saw a request");
    let m = gw.metrics().await;
    assert_eq!(
        common::metric(&m, "tollgate_protocol_refusals_total{status=\"408\"}"),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_keep_alive_connection_is_not_a_slow_head() {
    let up = Upstream::start().await;
    let gw = GatewayConfig::new(one_route(up.addr))
        .server("request_head_timeout: 500ms\ndownstream_keepalive_timeout: 10s")
        .start();
    let addr = gw.addr;
    let (first, second) = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /one HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .unwrap();
        let first = read_response(&mut s);
        // Idle past the head deadline; an empty line between requests is not a head either.
        std::thread::sleep(Duration::from_millis(700));
        s.write_all(b"\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(700));
        s.write_all(b"GET /two HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .unwrap();
        (first, read_response(&mut s))
    })
    .await
    .unwrap();
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    assert_eq!(up.received().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_slower_than_min_body_rate_is_answered_408() {
    let up = Upstream::start().await;
    let gw = GatewayConfig::new(one_route(up.addr))
        .server("body_idle_timeout: 1s\nmin_body_rate: 1KiB")
        .start();
    let addr = gw.addr;
    let (got, took) = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"POST /up HTTP/1.1\r\nHost: a.test\r\nContent-Length: 100000\r\n\r\n")
            .unwrap();
        let t = Instant::now();
        let mut writer = s.try_clone().unwrap();
        // 10 bytes every 300 ms: never silent for body_idle_timeout, but ~33 bytes a second.
        std::thread::spawn(move || {
            for _ in 0..100 {
                std::thread::sleep(Duration::from_millis(300));
                if writer.write_all(&[b'b'; 10]).is_err() {
                    break;
                }
            }
        });
        (read_to_close(&mut s, Duration::from_secs(10)), t.elapsed())
    })
    .await
    .unwrap();
    let got = got.expect("still open after 10 s");
    assert_eq!(
        status(&got),
        "HTTP/1.1 408",
        "{}",
        String::from_utf8_lossy(&got)
    );
    // The waits may add up to body_idle_timeout, plus a second per KiB sent (~1.1 s here).
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(up.received().iter().all(|r| r.body_len < 100_000));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_body_ends_the_request() {
    let up = Upstream::start().await;
    let gw = GatewayConfig::new(one_route(up.addr))
        .server("body_idle_timeout: 1s")
        .start();
    let addr = gw.addr;
    let (got, took) = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"POST /up HTTP/1.1\r\nHost: a.test\r\nContent-Length: 100\r\n\r\nab")
            .unwrap();
        let t = Instant::now();
        (read_to_close(&mut s, Duration::from_secs(10)), t.elapsed())
    })
    .await
    .unwrap();
    assert!(got.is_some(), "still open after 10 s");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // Whatever the origin saw, it never saw a complete body.
    assert!(up.received().iter().all(|r| r.body_len < 100));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_is_cut_off_after_the_send_timeout() {
    const BODY: u64 = 256 << 20;
    let up = Upstream::with(common::Behavior {
        generated_len: Some(BODY),
        ..Default::default()
    })
    .await;
    let gw = GatewayConfig::new(one_route(up.addr))
        .server("send_timeout: 1s")
        .start();
    let addr = gw.addr;
    let got = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /big HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .unwrap();
        // Read nothing while the socket buffers fill and the gateway's write stalls.
        std::thread::sleep(Duration::from_secs(3));
        read_to_close(&mut s, Duration::from_secs(5))
    })
    .await
    .unwrap();
    // Without a send timeout the whole body would follow and the connection stay open.
    let got = got.expect("the connection was not closed");
    assert!(got.starts_with(b"HTTP/1.1 200"));
    assert!((got.len() as u64) < BODY, "{} bytes arrived", got.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_requests_are_each_answered_in_order() {
    let up = Upstream::start().await;
    let gw = GatewayConfig::new(one_route(up.addr)).start();
    const REQUESTS: usize = 300;
    let addr = gw.addr;
    let answers = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        // ~12 KiB of requests in one write: more than one read of the gateway's, so later ones
        // arrive while earlier ones are answered.
        let all: Vec<u8> = (0..REQUESTS)
            .flat_map(|i| format!("GET /{i} HTTP/1.1\r\nHost: a.test\r\n\r\n").into_bytes())
            .collect();
        s.write_all(&all).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 16384];
        let count = |got: &[u8]| got.windows(9).filter(|w| w == b"HTTP/1.1 ").count();
        while count(&got) < REQUESTS {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        got
    })
    .await
    .unwrap();
    let ok = answers.windows(12).filter(|w| w == b"HTTP/1.1 200").count();
    assert_eq!(
        ok,
        REQUESTS,
        "{}",
        String::from_utf8_lossy(&answers[..answers.len().min(400)])
    );
    let paths: Vec<String> = up.received().iter().map(|r| r.path.clone()).collect();
    let sent: Vec<String> = (0..REQUESTS).map(|i| format!("/{i}")).collect();
    assert_eq!(paths, sent);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_heads_is_cut_off_after_the_send_timeout() {
    // Answers without a body: all the gateway writes are heads, which Pingora writes untimed
    // (its write timeout covers body writes only).
    let up = Upstream::with(common::Behavior {
        status: 204,
        body: Vec::new(),
        headers: vec![format!("x-pad: {}", "p".repeat(7000))],
        ..Default::default()
    })
    .await;
    let gw = GatewayConfig::new(one_route(up.addr))
        .server("send_timeout: 1s")
        .start();
    const REQUESTS: usize = 8000;
    let addr = gw.addr;
    let got = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let mut writer = s.try_clone().unwrap();
        // Pipelined, ~56 MB of answers: more than the socket buffers hold. Written from a
        // thread of its own: the gateway stops reading once its writes stall.
        std::thread::spawn(move || {
            let one = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n";
            let _ = writer.write_all(&one.repeat(REQUESTS));
        });
        std::thread::sleep(Duration::from_secs(3));
        read_to_close(&mut s, Duration::from_secs(5))
    })
    .await
    .unwrap();
    let got = got.expect("the connection was not closed");
    let answers = got.windows(12).filter(|w| w == b"HTTP/1.1 204").count();
    assert!(
        answers > 0,
        "{}",
        String::from_utf8_lossy(&got[..got.len().min(300)])
    );
    assert!(answers < REQUESTS, "all {answers} answers arrived");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_applies_new_connection_caps() {
    let up = Upstream::start().await;
    let gw = GatewayConfig::new(one_route(up.addr))
        .server("max_connections_per_ip: 3")
        .start();
    gw.settled().await;
    let conf = gw.config_path();
    let text = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(
        &conf,
        text.replace("max_connections_per_ip: 3", "max_connections_per_ip: 1"),
    )
    .unwrap();
    let r = common::client()
        .post(format!("http://{}/reload", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let (_, shown) = common::get(&format!("http://{}/config", gw.admin)).await;
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["server"]["max_connections_per_ip"], 1);
    assert_eq!(shown["server"]["send_timeout"], "2m");
    assert_eq!(shown["server"]["min_body_rate"], 500);
    let addr = gw.addr;
    let (statuses, second) = tokio::task::spawn_blocking(move || {
        let (_open, statuses) = kept_open(addr, 1);
        let mut second = TcpStream::connect(addr).unwrap();
        (
            statuses,
            read_to_close(&mut second, Duration::from_secs(5)).expect("closed"),
        )
    })
    .await
    .unwrap();
    assert_eq!(statuses, vec!["HTTP/1.1 200"]);
    let text = String::from_utf8_lossy(&second);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_over_the_per_address_cap_get_503() {
    let up = Upstream::start().await;
    let gw = GatewayConfig::new(one_route(up.addr))
        .server("max_connections_per_ip: 3")
        .start();
    gw.settled().await;
    let addr = gw.addr;
    let (statuses, refused, after, retries_refused) = tokio::task::spawn_blocking(move || {
        let (mut open, statuses) = kept_open(addr, 3);
        let mut fourth = TcpStream::connect(addr).unwrap();
        let refused = read_to_close(&mut fourth, Duration::from_secs(5)).expect("closed");
        // A freed place is taken again.
        drop(open.pop());
        // (The gateway notices the close a moment later: until then, 503 again.)
        let t = Instant::now();
        let mut retries_refused = 0;
        let after = loop {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
                .unwrap();
            let r = read_to_close(&mut s, Duration::from_secs(5)).unwrap_or_default();
            if status(&r) == "HTTP/1.1 200" || t.elapsed() > Duration::from_secs(5) {
                break r;
            }
            retries_refused += 1;
            std::thread::sleep(Duration::from_millis(50));
        };
        (statuses, refused, after, retries_refused)
    })
    .await
    .unwrap();
    assert_eq!(statuses, vec!["HTTP/1.1 200"; 3]);
    let text = String::from_utf8_lossy(&refused);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(
        text.contains("retry-after: 1") && text.contains("too many connections from this address"),
        "{text}"
    );
    assert_eq!(status(&after), "HTTP/1.1 200");
    let m = gw.metrics().await;
    assert_eq!(
        common::metric(&m, "tollgate_connections_refused_total{limit=\"per_ip\"}"),
        1.0 + f64::from(retries_refused)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn trusted_proxies_are_exempt_from_the_address_cap_not_the_global_one() {
    let up = Upstream::start().await;
    let body = format!(
        "trusted_proxies: [\"127.0.0.1/32\"]\n{}",
        one_route(up.addr)
    );
    let gw = GatewayConfig::new(body)
        .server("max_connections_per_ip: 1\nmax_connections: 2")
        .start();
    gw.settled().await;
    let addr = gw.addr;
    let (statuses, refused) = tokio::task::spawn_blocking(move || {
        let (_open, statuses) = kept_open(addr, 2);
        let mut third = TcpStream::connect(addr).unwrap();
        (
            statuses,
            read_to_close(&mut third, Duration::from_secs(5)).expect("closed"),
        )
    })
    .await
    .unwrap();
    assert_eq!(statuses, vec!["HTTP/1.1 200"; 2]);
    let text = String::from_utf8_lossy(&refused);
    assert!(
        text.starts_with("HTTP/1.1 503") && text.contains("\"too many connections\""),
        "{text}"
    );
    let m = gw.metrics().await;
    assert_eq!(
        common::metric(&m, "tollgate_connections_refused_total{limit=\"global\"}"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_head_never_reaches_pingora_or_the_origin() {
    // One refusal per class the guard owns; each is answered by the guard itself and closed.
    let up = Upstream::start().await;
    let gw = GatewayConfig::new(one_route(up.addr)).start();
    let addr = gw.addr;
    let cases: Vec<(&[u8], &str)> = vec![
        (b"GET  /f HTTP/1.1\r\nHost: a.test\r\n\r\n", "HTTP/1.1 400"),
        (b"GET /f HTTP/2.0\r\nHost: a.test\r\n\r\n", "HTTP/1.1 505"),
        (b"POST /f HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n5;a\x00\r\nhello\r\n0\r\n\r\n", "HTTP/1.1 400"),
    ];
    let results = tokio::task::spawn_blocking(move || {
        cases
            .into_iter()
            .map(|(req, want)| {
                let mut s = TcpStream::connect(addr).unwrap();
                s.write_all(req).unwrap();
                (
                    read_to_close(&mut s, Duration::from_secs(5)).expect("closed"),
                    want,
                )
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for (got, want) in results {
        let text = String::from_utf8_lossy(&got);
        assert_eq!(status(&got), want, "{text}");
        let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
        let json = common::error_json(body);
        assert!(
            json["error"].is_string()
                && json["request_id"].as_str().is_some_and(|id| id.len() == 32),
            "{body}"
        );
    }
    assert!(up.received().iter().all(|r| r.body_len == 0));
    let m = gw.metrics().await;
    assert!(common::metric(&m, "tollgate_protocol_refusals_total{status=\"400\"}") >= 2.0);
    assert_eq!(
        common::metric(&m, "tollgate_protocol_refusals_total{status=\"505\"}"),
        1.0
    );
}

/// Send `bytes` on a new connection; what comes back until the close.
fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(bytes).unwrap();
    String::from_utf8_lossy(&read_to_close(&mut s, Duration::from_secs(5)).expect("closed"))
        .into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn no_header_value_switches_the_guard_off() {
    // Values Pingora and hygiene accept must be framed by the guard too, so the next request
    // on the connection is still judged (a raw `#` is refused).
    let up = Upstream::start().await;
    let gw = GatewayConfig::new(one_route(up.addr)).start();
    let addr = gw.addr;
    let pad = " ".repeat(45);
    let firsts = [
        "POST /one HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0000000000000000000003\r\n\r\nabc"
            .to_string(),
        format!("POST /one HTTP/1.1\r\nHost: a.test\r\nContent-Length:{pad}3\r\n\r\nabc"),
        format!(
            "POST /one HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding:{pad}chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        ),
    ];
    let answers = tokio::task::spawn_blocking(move || {
        firsts
            .iter()
            .map(|first| {
                let mut s = TcpStream::connect(addr).unwrap();
                s.write_all(first.as_bytes()).unwrap();
                let one = read_response(&mut s);
                s.write_all(b"GET /a#b HTTP/1.1\r\nHost: a.test\r\n\r\n")
                    .unwrap();
                let two = read_to_close(&mut s, Duration::from_secs(5)).expect("closed");
                (one, String::from_utf8_lossy(&two).into_owned())
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for (one, two) in answers {
        assert!(one.starts_with("HTTP/1.1 200"), "{one}");
        assert!(
            two.starts_with("HTTP/1.1 400") && two.contains("fragment"),
            "{two}"
        );
    }
    let seen = up.received();
    assert!(
        seen.iter().all(|r| r.path == "/one" && r.body_len == 3),
        "{:?}",
        seen.iter().map(|r| &r.path).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_valid_request_before_a_malformed_one_is_still_answered() {
    let up = Upstream::start().await;
    let gw = GatewayConfig::new(one_route(up.addr)).start();
    let addr = gw.addr;
    let replies = tokio::task::spawn_blocking(move || {
        [
            &b"GET /one HTTP/1.1\r\nHost: a.test\r\n\r\nGET /a#b HTTP/1.1\r\nHost: a.test\r\n\r\n"[..],
            b"GET /one HTTP/1.1\r\nHost: a.test\r\n\r\nPOST /two HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n\r\nhello\r\n0\r\n\r\n",
        ]
        .map(|bytes| exchange(addr, bytes))
    })
    .await
    .unwrap();
    for r in replies {
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
    assert!(up.received().iter().all(|r| r.path == "/one"));
}

#[tokio::test(flavor = "multi_thread")]
async fn h2c_listeners_keep_the_head_deadline() {
    let up = Upstream::start().await;
    let gw = GatewayConfig::new(one_route(up.addr))
        .server("request_head_timeout: 1s")
        .listener("h2c: true")
        .start();
    let addr = gw.addr;
    let (silent, partial, short) = tokio::task::spawn_blocking(move || {
        let timed = |bytes: &[u8]| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(bytes).unwrap();
            let t = Instant::now();
            (read_to_close(&mut s, Duration::from_secs(5)), t.elapsed())
        };
        (
            timed(b""),
            timed(b"GET / HTTP/1.1\r\n"),
            // Shorter than the preface, complete, and answered at once.
            timed(b"GET / HTTP/1.0\r\n\r\n"),
        )
    })
    .await
    .unwrap();
    assert_eq!(silent.0.as_deref(), Some(&b""[..]));
    assert!(silent.1 < Duration::from_secs(3), "{:?}", silent.1);
    let partial_answer = partial.0.expect("closed");
    assert_eq!(status(&partial_answer), "HTTP/1.1 408");
    assert!(partial.1 < Duration::from_secs(3), "{:?}", partial.1);
    let short_answer = short.0.expect("closed");
    assert!(
        status(&short_answer).ends_with(" 200"),
        "{}",
        String::from_utf8_lossy(&short_answer)
    );
    assert!(short.1 < Duration::from_millis(900), "{:?}", short.1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_head_that_starts_near_the_keep_alive_timeout_completes() {
    let up = Upstream::start().await;
    let gw = GatewayConfig::new(one_route(up.addr))
        .server("downstream_keepalive_timeout: 2s\nrequest_head_timeout: 5s")
        .start();
    let addr = gw.addr;
    let (second, idle) = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /one HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .unwrap();
        read_response(&mut s);
        // Idle 1.5 s, then a head trickled over 1 s: past the keep-alive timeout in all.
        std::thread::sleep(Duration::from_millis(1500));
        for chunk in [&b"GET /two HTTP/1.1\r\n"[..], b"Host: a.test\r\n", b"\r\n"] {
            s.write_all(chunk).unwrap();
            std::thread::sleep(Duration::from_millis(500));
        }
        let second = read_response(&mut s);
        // Idle past the keep-alive timeout: closed quietly.
        let t = Instant::now();
        let idle = (read_to_close(&mut s, Duration::from_secs(6)), t.elapsed());
        (second, idle)
    })
    .await
    .unwrap();
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    assert_eq!(idle.0.as_deref(), Some(&b""[..]));
    assert!(
        idle.1 > Duration::from_millis(1000) && idle.1 < Duration::from_secs(4),
        "{:?}",
        idle.1
    );
}

/// `tollgate_downstream_connections` until it reads `want` (the gateway sees a close a moment
/// after the client makes it), or 5 s.
async fn open_connections_reach(gw: &common::TestGateway, want: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = common::metric(&gw.metrics().await, "tollgate_downstream_connections");
        if now == want || Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_connection_gauge_counts_connections_not_requests() {
    let up = Upstream::start().await;
    let gw = GatewayConfig::new(one_route(up.addr))
        .listener("h2c: true")
        .start();
    // The harness's readiness probes have been admitted and closed.
    gw.settled().await;
    let total =
        || async { common::metric(&gw.metrics().await, "tollgate_downstream_connections_total") };
    let before = total().await;
    // Two HTTP/1 connections with three requests each (keep-alive) ...
    let addr = gw.addr;
    let h1 = tokio::task::spawn_blocking(move || {
        (0..2)
            .map(|_| {
                let mut s = TcpStream::connect(addr).unwrap();
                for _ in 0..3 {
                    s.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
                        .unwrap();
                    let r = read_response(&mut s);
                    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
                }
                s
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    // ... and one HTTP/2 connection with three streams.
    let mut h2 = common::tls::h2c(addr).await.unwrap();
    for _ in 0..3 {
        let req = http::Request::get("http://a.test/").body(()).unwrap();
        let (resp, _) = h2.send_request(req, true).unwrap();
        assert_eq!(resp.await.unwrap().status(), 200);
    }
    assert_eq!(open_connections_reach(&gw, 3.0).await, 3.0);
    assert_eq!(total().await - before, 3.0);
    drop(h1);
    drop(h2);
    assert_eq!(open_connections_reach(&gw, 0.0).await, 0.0);
}

//! HTTP/2 abuse limits through the real gateway, with hand-built frames on an h2c listener (a
//! well-behaved client such as the `h2` crate never breaks the server's limits, so it cannot
//! test them): streams beyond `max_concurrent_streams` are refused, a Rapid Reset flood
//! (CVE-2023-44487) ends in GOAWAY with few requests reaching the upstream, and an oversized
//! header list is refused before anything is forwarded.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Behavior, GatewayConfig, TestGateway, Upstream};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const SETTINGS: u8 = 0x4;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const REFUSED_STREAM: u32 = 0x7;
const CANCEL: u32 = 0x8;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK integer with an `n`-bit prefix whose high bits are `first`.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u8, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// A literal header field without indexing, new name (no Huffman coding).
fn literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    hpack_int(out, 0, 7, name.len());
    out.extend_from_slice(name);
    hpack_int(out, 0, 7, value.len());
    out.extend_from_slice(value);
}

/// `GET /path` with `:authority: a.test`, and any extra headers.
fn request_block(path: &str, extra: &[(&[u8], &[u8])]) -> Vec<u8> {
    // Static table: 2 = :method GET, 6 = :scheme http; :path and :authority as literals with
    // indexed names (4 and 1), without indexing.
    let mut b = vec![0x82, 0x86];
    b.push(0x04);
    hpack_int(&mut b, 0, 7, path.len());
    b.extend_from_slice(path.as_bytes());
    b.push(0x01);
    hpack_int(&mut b, 0, 7, 6);
    b.extend_from_slice(b"a.test");
    for (n, v) in extra {
        literal(&mut b, n, v);
    }
    b
}

/// A raw h2c connection: preface, empty SETTINGS, and an ACK of the server's.
fn connect(gw: &TestGateway) -> TcpStream {
    let mut s = TcpStream::connect(gw.addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(PREFACE).unwrap();
    s.write_all(&frame(SETTINGS, 0, 0, &[])).unwrap();
    s.write_all(&frame(SETTINGS, ACK, 0, &[])).unwrap();
    s
}

/// One received frame: (type, flags, stream, payload).
type Frame = (u8, u8, u32, Vec<u8>);

/// Frames the server sent within `wait`, and whether it closed the connection.
fn read_frames(s: &mut TcpStream, wait: Duration) -> (Vec<Frame>, bool) {
    let deadline = Instant::now() + wait;
    let mut buf = Vec::new();
    let mut closed = false;
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    while Instant::now() < deadline {
        let mut chunk = [0u8; 65536];
        match s.read(&mut chunk) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    let mut frames = Vec::new();
    let mut i = 0;
    while i + 9 <= buf.len() {
        let len =
            (usize::from(buf[i]) << 16) | (usize::from(buf[i + 1]) << 8) | usize::from(buf[i + 2]);
        if i + 9 + len > buf.len() {
            break;
        }
        let stream = u32::from_be_bytes(buf[i + 5..i + 9].try_into().unwrap()) & 0x7fff_ffff;
        frames.push((
            buf[i + 3],
            buf[i + 4],
            stream,
            buf[i + 9..i + 9 + len].to_vec(),
        ));
        i += 9 + len;
    }
    (frames, closed)
}

fn code(payload: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(payload[at..at + 4].try_into().unwrap())
}

fn gateway(up: &Upstream, http2: &str) -> TestGateway {
    GatewayConfig::new(format!(
        "upstreams: {{ u: {{ backends: [{{ address: \"{}\" }}] }} }}\nroutes: [{{ name: r, upstream: u }}]\n",
        up.addr
    ))
    .server(&format!("http2: {{ {http2} }}"))
    .listener("h2c: true")
    .start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_max_concurrent_streams_are_refused() {
    let up = Upstream::start().await;
    up.set(Behavior {
        delay: Duration::from_millis(1500),
        ..Behavior::default()
    });
    let gw = gateway(&up, "max_concurrent_streams: 5");
    let mut s = connect(&gw);
    // 20 requests at once on one connection, ignoring the advertised limit of 5.
    let mut out = Vec::new();
    for i in 0..20u32 {
        out.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            1 + 2 * i,
            &request_block(&format!("/s{i}"), &[]),
        ));
    }
    s.write_all(&out).unwrap();
    let (frames, _) = read_frames(&mut s, Duration::from_millis(1000));
    let refused: Vec<u32> = frames
        .iter()
        .filter(|f| f.0 == RST_STREAM && code(&f.3, 0) == REFUSED_STREAM)
        .map(|f| f.2)
        .collect();
    let settings = frames.iter().find(|f| f.0 == SETTINGS && f.1 & ACK == 0);
    let advertised = settings.and_then(|f| {
        f.3.chunks(6)
            .find(|c| c.len() == 6 && u16::from_be_bytes([c[0], c[1]]) == 0x3)
            .map(|c| u32::from_be_bytes(c[2..6].try_into().unwrap()))
    });
    assert_eq!(advertised, Some(5), "SETTINGS_MAX_CONCURRENT_STREAMS");
    assert_eq!(
        refused.len(),
        15,
        "streams past the limit get RST_STREAM(REFUSED_STREAM); got {refused:?}"
    );
    // The upstream saw at most the 5 admitted streams.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(up.count() <= 5, "upstream saw {} requests", up.count());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rapid_reset_flood_ends_in_goaway() {
    let up = Upstream::start().await;
    let gw = gateway(&up, "max_pending_reset_streams: 20");
    let mut s = connect(&gw);
    // 1,000 streams opened and cancelled at once, as in CVE-2023-44487.
    let mut out = Vec::new();
    for i in 0..1000u32 {
        let id = 1 + 2 * i;
        out.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            id,
            &request_block("/flood", &[]),
        ));
        out.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
    }
    // The server may close mid-write: that is a pass too.
    let _ = s.write_all(&out);
    let (frames, closed) = read_frames(&mut s, Duration::from_millis(2000));
    let goaway = frames.iter().find(|f| f.0 == GOAWAY);
    assert!(
        goaway.is_some() || closed,
        "neither GOAWAY nor close after a reset flood; frames: {:?}",
        frames.iter().map(|f| (f.0, f.2)).collect::<Vec<_>>()
    );
    if let Some(g) = goaway {
        // ENHANCE_YOUR_CALM (0xb) is h2's answer to too many resets.
        assert_eq!(code(&g.3, 4), 0xb, "GOAWAY error code");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        up.count() < 200,
        "{} of 1,000 reset streams reached the upstream",
        up.count()
    );
    // The gateway still serves new connections.
    let mut fresh = connect(&gw);
    fresh
        .write_all(&frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            1,
            &request_block("/after", &[]),
        ))
        .unwrap();
    let (frames, _) = read_frames(&mut fresh, Duration::from_millis(1500));
    assert!(
        frames.iter().any(|f| f.0 == HEADERS && f.2 == 1),
        "no response on a new connection after the flood"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_header_list_never_reaches_the_upstream() {
    let up = Upstream::start().await;
    let gw = gateway(&up, "max_header_list_size: 4KiB");
    let mut s = connect(&gw);
    let big = vec![b'v'; 16 * 1024];
    s.write_all(&frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &request_block("/big", &[(b"x-big", &big)]),
    ))
    .unwrap();
    // A small request on the same connection still works, if the connection survived.
    let _ = s.write_all(&frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        3,
        &request_block("/small", &[]),
    ));
    let (frames, closed) = read_frames(&mut s, Duration::from_millis(1500));
    // Stream 1: refused as a 431 response, a stream reset, or the connection ended.
    let on_1: Vec<_> = frames.iter().filter(|f| f.2 == 1).collect();
    // (`:status: 200` is HPACK static entry 8, the single byte 0x88.)
    let answered_200 = on_1
        .iter()
        .any(|f| f.0 == HEADERS && f.3.first() == Some(&0x88));
    let refused = !answered_200
        && (closed
            || frames.iter().any(|f| f.0 == GOAWAY)
            || on_1.iter().any(|f| f.0 == RST_STREAM || f.0 == HEADERS));
    assert!(
        refused,
        "oversized header list was not refused: {on_1:?}, closed {closed}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen: Vec<String> = up
        .received()
        .iter()
        .map(|r| {
            String::from_utf8_lossy(&r.head)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert!(
        !seen.iter().any(|l| l.contains("/big")),
        "the oversized request reached the upstream: {seen:?}"
    );
}

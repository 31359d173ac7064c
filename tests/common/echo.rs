//! A raw HTTP/1.1 origin for hostile-input tests ([`RawOrigin`]): it logs every byte each
//! connection delivers, in arrival order, and frames requests strictly (CRLF CRLF head end,
//! digits-only `Content-Length`, exactly `Transfer-Encoding: chunked`, CRLF after every chunk),
//! the way a strict backend behind the gateway would. Unlike [`super::Upstream`] it never
//! panics on what it receives: a head it cannot parse or frame, or bytes left over at EOF,
//! become [`Event::Error`], so a test sees exactly what crossed the gateway, including a
//! smuggled second request (a second [`Event::Request`] on one connection).
//!
//! Blocking std threads, no runtime: usable from plain `#[test]` functions.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request as the origin framed it.
#[derive(Clone, Debug)]
pub struct OriginRequest {
    /// The connection it arrived on (0, 1, … in accept order).
    pub conn: usize,
    /// The request head exactly as received, through the blank line.
    pub head: Vec<u8>,
    pub method: String,
    pub target: String,
    pub version: u8,
    /// Field names as sent, values as raw bytes.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The decoded body (de-chunked for chunked requests).
    pub body: Vec<u8>,
    /// False when the connection ended, or framing failed, before the body was complete.
    pub complete: bool,
}

impl OriginRequest {
    /// Every value of `name` (case-insensitive).
    pub fn header_all(&self, name: &str) -> Vec<&[u8]> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
            .collect()
    }

    /// The first value of `name`, lossily as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.header_all(name)
            .first()
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

/// What happened at the origin, in order.
#[derive(Clone, Debug)]
pub enum Event {
    Connected {
        conn: usize,
    },
    /// Bytes read from a connection.
    Bytes {
        conn: usize,
        data: Vec<u8>,
    },
    /// A request head was framed (complete, or cut off: see [`OriginRequest::complete`]).
    Request(OriginRequest),
    /// The origin could not parse or frame what it received; it closed the connection.
    Error {
        conn: usize,
        message: String,
    },
    Closed {
        conn: usize,
    },
}

/// A position in the event log, from [`RawOrigin::mark`].
#[derive(Clone, Copy, Debug)]
pub struct Mark(usize);

/// A running raw origin on 127.0.0.1:0; answers `200` with body `ok` to every request it can
/// frame, keeps connections alive, stops (and cuts every connection) when dropped.
pub struct RawOrigin {
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<Event>>>,
    stop: Arc<AtomicBool>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
}

impl RawOrigin {
    pub fn start() -> RawOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let log: Arc<Mutex<Vec<Event>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let streams: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (l, s, st) = (Arc::clone(&log), Arc::clone(&stop), Arc::clone(&streams));
        std::thread::spawn(move || {
            let mut next = 0usize;
            for stream in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let _ = stream.set_nodelay(true);
                if let Ok(c) = stream.try_clone() {
                    st.lock().unwrap().push(c);
                }
                let conn = next;
                next += 1;
                l.lock().unwrap().push(Event::Connected { conn });
                let l = Arc::clone(&l);
                std::thread::spawn(move || serve(conn, stream, l));
            }
        });
        RawOrigin {
            addr,
            log,
            stop,
            streams,
        }
    }

    /// The current end of the event log.
    pub fn mark(&self) -> Mark {
        Mark(self.log.lock().unwrap().len())
    }

    /// Every event since `mark`.
    pub fn since(&self, mark: Mark) -> Vec<Event> {
        self.log.lock().unwrap()[mark.0..].to_vec()
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<Event> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for RawOrigin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        for s in self.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn serve(conn: usize, mut stream: TcpStream, log: Arc<Mutex<Vec<Event>>>) {
    let push = |e: Event| log.lock().unwrap().push(e);
    let mut buf: Vec<u8> = Vec::new();
    let mut tmp = vec![0u8; 64 * 1024];
    loop {
        // Frame every complete request already buffered.
        loop {
            match frame(&buf) {
                Framed::Complete(req, used) => {
                    let close = req
                        .header("connection")
                        .is_some_and(|v| v.eq_ignore_ascii_case("close"));
                    let method = req.method.clone();
                    push(Event::Request(OriginRequest {
                        conn,
                        complete: true,
                        ..req
                    }));
                    buf.drain(..used);
                    let body: &[u8] = if method == "HEAD" { b"" } else { b"ok" };
                    let mut resp = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n".to_vec();
                    if close {
                        resp.extend_from_slice(b"connection: close\r\n");
                    }
                    resp.extend_from_slice(b"\r\n");
                    resp.extend_from_slice(body);
                    if stream.write_all(&resp).is_err() {
                        push(Event::Closed { conn });
                        return;
                    }
                    if close {
                        // Keep reading: anything sent after a `Connection: close` request is
                        // still recorded (and reported as left over at EOF).
                        let _ = stream.shutdown(Shutdown::Write);
                    }
                }
                Framed::NeedMore(_) => break,
                Framed::Invalid(partial, message) => {
                    if let Some(req) = partial {
                        push(Event::Request(OriginRequest { conn, ..req }));
                    }
                    push(Event::Error { conn, message });
                    let _ = stream.shutdown(Shutdown::Both);
                    push(Event::Closed { conn });
                    return;
                }
            }
        }
        match stream.read(&mut tmp) {
            Ok(0) | Err(_) => {
                if !buf.is_empty() {
                    match frame(&buf) {
                        Framed::NeedMore(Some(req)) => {
                            push(Event::Request(OriginRequest { conn, ..req }))
                        }
                        _ => push(Event::Error {
                            conn,
                            message: format!(
                                "{} byte(s) left over at EOF that are no request head: {}",
                                buf.len(),
                                show(&buf, 200)
                            ),
                        }),
                    }
                }
                push(Event::Closed { conn });
                return;
            }
            Ok(n) => {
                buf.extend_from_slice(&tmp[..n]);
                push(Event::Bytes {
                    conn,
                    data: tmp[..n].to_vec(),
                });
            }
        }
    }
}

enum Framed {
    /// A whole request and the bytes it used.
    Complete(OriginRequest, usize),
    /// Not enough bytes yet; the head, once it is complete.
    NeedMore(Option<OriginRequest>),
    /// Unframeable; the head if it parsed.
    Invalid(Option<OriginRequest>, String),
}

/// Frame the request at the start of `buf`, strictly.
fn frame(buf: &[u8]) -> Framed {
    let crlf = find(buf, b"\r\n\r\n");
    let lf = find(buf, b"\n\n");
    let head_end = match (crlf, lf) {
        (Some(c), Some(l)) if l < c + 1 => {
            return Framed::Invalid(None, "head ends with a bare LF blank line".into());
        }
        (Some(c), _) => c + 4,
        (None, Some(_)) => {
            return Framed::Invalid(None, "head ends with a bare LF blank line".into());
        }
        (None, None) => return Framed::NeedMore(None),
    };
    let head = &buf[..head_end];
    let mut headers = vec![httparse::EMPTY_HEADER; 4096];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Framed::Invalid(None, "httparse: partial head after CRLF CRLF".into());
        }
        Err(e) => {
            return Framed::Invalid(None, format!("httparse: {e} in head {}", show(head, 300)));
        }
    }
    let mut req = OriginRequest {
        conn: 0,
        head: head.to_vec(),
        method: parsed.method.unwrap_or("").to_string(),
        target: parsed.path.unwrap_or("").to_string(),
        version: parsed.version.unwrap_or(1),
        headers: parsed
            .headers
            .iter()
            .map(|h| (h.name.to_string(), h.value.to_vec()))
            .collect(),
        body: Vec::new(),
        complete: false,
    };
    let te = req.header_all("transfer-encoding").len();
    let cl: Vec<Vec<u8>> = req
        .header_all("content-length")
        .iter()
        .map(|v| v.to_vec())
        .collect();
    let rest = &buf[head_end..];
    if te > 0 {
        if te > 1 || !cl.is_empty() {
            return Framed::Invalid(
                Some(req),
                "more than one framing header (Transfer-Encoding with another TE or a CL)".into(),
            );
        }
        let v = req.header_all("transfer-encoding")[0].to_vec();
        if !v.eq_ignore_ascii_case(b"chunked") {
            return Framed::Invalid(
                Some(req),
                format!(
                    "Transfer-Encoding is not exactly `chunked`: {}",
                    show(&v, 80)
                ),
            );
        }
        match dechunk(rest) {
            Ok(Some((body, used))) => {
                req.body = body;
                Framed::Complete(req, head_end + used)
            }
            Ok(None) => Framed::NeedMore(Some(req)),
            Err(m) => Framed::Invalid(Some(req), m),
        }
    } else if let Some(v) = cl.first() {
        if cl.len() > 1 {
            return Framed::Invalid(Some(req), "more than one Content-Length".into());
        }
        if v.is_empty() || !v.iter().all(u8::is_ascii_digit) || v.len() > 12 {
            return Framed::Invalid(
                Some(req),
                format!("Content-Length is not 1*DIGIT: {}", show(v, 40)),
            );
        }
        let n: usize = std::str::from_utf8(v).unwrap().parse().unwrap();
        if rest.len() < n {
            req.body = rest.to_vec();
            return Framed::NeedMore(Some(req));
        }
        req.body = rest[..n].to_vec();
        Framed::Complete(req, head_end + n)
    } else {
        Framed::Complete(req, head_end)
    }
}

/// Strict chunked decoding: hex size, optional `;ext`, CRLF, data, CRLF …, `0` CRLF,
/// trailer fields, CRLF. `Ok(None)`: need more bytes.
fn dechunk(mut b: &[u8]) -> Result<Option<(Vec<u8>, usize)>, String> {
    let total = b.len();
    let mut body = Vec::new();
    loop {
        let Some(eol) = find(b, b"\r\n") else {
            return if b.contains(&b'\n') {
                Err(format!("bare LF in chunk-size line: {}", show(b, 60)))
            } else {
                Ok(None)
            };
        };
        let line = &b[..eol];
        let size_part = line.split(|&c| c == b';').next().unwrap();
        if size_part.is_empty()
            || size_part.len() > 15
            || !size_part.iter().all(u8::is_ascii_hexdigit)
        {
            return Err(format!("invalid chunk-size line: {}", show(line, 60)));
        }
        if line.iter().any(|&c| c == b'\r' || c == b'\n' || c == 0) {
            return Err(format!("CR/LF/NUL in chunk line: {}", show(line, 60)));
        }
        let size = usize::from_str_radix(std::str::from_utf8(size_part).unwrap(), 16).unwrap();
        b = &b[eol + 2..];
        if size == 0 {
            // Trailer section.
            loop {
                let Some(eol) = find(b, b"\r\n") else {
                    return Ok(None);
                };
                let line = &b[..eol];
                b = &b[eol + 2..];
                if line.is_empty() {
                    return Ok(Some((body, total - b.len())));
                }
            }
        }
        if b.len() < size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&b[..size]);
        if &b[size..size + 2] != b"\r\n" {
            return Err(format!(
                "chunk data not followed by CRLF: {}",
                show(&b[size..], 40)
            ));
        }
        b = &b[size + 2..];
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// Escaped, truncated rendering of bytes for messages.
pub fn show(b: &[u8], max: usize) -> String {
    let s = b[..b.len().min(max)].escape_ascii().to_string();
    if b.len() > max {
        format!("\"{s}\"… ({} bytes)", b.len())
    } else {
        format!("\"{s}\"")
    }
}

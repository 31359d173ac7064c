//! HTTP/1.1 request framing, judged on the bytes as they arrive and before Pingora parses them.
//!
//! Pingora's parser (httparse plus its own body readers) is lenient where a gateway must not
//! be (tests/conformance.rs lists what it lets through): an empty chunk-size line ends the
//! body, chunk extensions may carry bare LF or NUL, a 64 KiB request line or 257 header fields
//! get a plain 400, `GET  /` and a raw `#` are accepted. [`Framing`] is a strict RFC 9112
//! reader of the request byte stream that runs ahead of Pingora: it finds each message's end
//! (Content-Length, chunked, or none), rejects what is malformed with the status a client
//! should see, and stops judging where the connection stops being HTTP/1 (a `101` upgrade, the
//! h2c preface). It never rewrites bytes: what it accepts reaches Pingora unchanged.
//!
//! It is a pure state machine (no I/O, no clock): [`super::stream`] feeds it and acts on what
//! it says, so every rule here is unit-tested byte by byte and fuzzed.
//!
//! Decisions that need the parsed head (`Content-Length` lists, other transfer codings, Host)
//! stay with `proxy::hygiene`, which answers them with the right status and closes; for those
//! requests this reader goes [`Phase::Opaque`]: the head is handed on, nothing after it ever
//! is, so a disagreement between the two can only stall that request, never let bytes through
//! unjudged.

/// What the reader enforces; from `server:` (see docs/configuration.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Request line bytes (method, target, version, two spaces), 414 above.
    pub max_request_line: usize,
    /// Header section bytes (each field line with its CRLF), 431 above; also the trailer limit.
    pub max_header_size: usize,
    /// Header fields, 431 above; also the trailer limit.
    pub max_header_count: usize,
    /// Whether the h2c prior-knowledge preface switches the connection to HTTP/2.
    pub h2c: bool,
}

/// Longest chunk-size line with its extensions; nothing legitimate comes near it.
pub const MAX_CHUNK_LINE: usize = 4096;

/// Leading empty lines accepted before a request line (RFC 9112 §2.2 robustness).
const MAX_LEADING_EMPTY_LINES: u8 = 4;

/// A request the gateway refuses before Pingora sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    /// The status to answer (when an answer can still be written).
    pub status: u16,
    /// What was wrong: the error message and the metric's `reason` label.
    pub reason: &'static str,
}

const fn bad(reason: &'static str) -> Violation {
    Violation {
        status: 400,
        reason,
    }
}

/// Where the reader is in the request stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading a request head (possibly none of it yet).
    Head,
    /// Reading a request body.
    Body,
    /// An upgrade request is complete; until the response status is known, later bytes may
    /// be a tunnel or the next request, so they are judged by neither.
    AwaitUpgrade,
    /// No longer HTTP/1 (a `101` answer or the h2c preface): bytes pass unjudged.
    Tunnel,
    /// A request whose framing hygiene refuses (and closes after): its head is handed on, and
    /// nothing after it ever is (fail closed: if hygiene let it through, its body never comes).
    Opaque,
}

/// How far one [`Framing::feed`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fed {
    /// Bytes consumed.
    pub used: usize,
    /// A request message (head and body) ended at `used`.
    pub complete: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    LineStart,
    LeadingCr,
    Method,
    Target,
    Version,
    LineCr,
    FieldStart,
    Name,
    Value,
    FieldCr,
    HeadCr,
    Fixed,
    ChunkSize,
    ChunkSizeWs,
    ChunkExt,
    ChunkLineCr,
    ChunkData,
    ChunkDataCr,
    ChunkDataLf,
    TrailerStart,
    TrailerName,
    TrailerValue,
    TrailerCr,
    TrailerEndCr,
    AwaitUpgrade,
    Tunnel,
    Opaque,
}

/// The transfer coding a head asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coding {
    None,
    Chunked,
    /// Anything else, or `Transfer-Encoding` twice: hygiene's to refuse.
    Other,
}

/// A header field whose value decides framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Other,
    ContentLength,
    TransferEncoding,
    Upgrade,
}

const NAME_CAP: usize = 17; // "transfer-encoding"
const VALUE_CAP: usize = 40;

/// The strict HTTP/1 request reader; one per connection.
#[derive(Debug, Clone)]
pub struct Framing {
    limits: Limits,
    state: State,
    /// Bytes of the current line (request line, field line, chunk line).
    line: usize,
    /// Header (or trailer) section bytes and fields so far.
    section: usize,
    fields: usize,
    leading: u8,
    /// Whether this is the connection's first request (only it may be the h2c preface).
    first: bool,
    /// Bytes of the current head so far (0: waiting for a request).
    head: usize,
    method: [u8; 8],
    method_len: usize,
    target_star: bool,
    target_len: usize,
    version: [u8; 8],
    version_len: usize,
    name: [u8; NAME_CAP],
    name_len: usize,
    name_long: bool,
    field: Field,
    value: [u8; VALUE_CAP],
    value_len: usize,
    value_long: bool,
    length: Option<u64>,
    length_bad: bool,
    coding: Coding,
    upgrade: bool,
    /// Body bytes left (fixed length or the current chunk).
    remaining: u64,
    digits: usize,
}

impl Framing {
    /// A reader at the start of a connection.
    pub fn new(limits: Limits) -> Framing {
        Framing {
            limits,
            state: State::LineStart,
            line: 0,
            section: 0,
            fields: 0,
            leading: 0,
            first: true,
            head: 0,
            method: [0; 8],
            method_len: 0,
            target_star: false,
            target_len: 0,
            version: [0; 8],
            version_len: 0,
            name: [0; NAME_CAP],
            name_len: 0,
            name_long: false,
            field: Field::Other,
            value: [0; VALUE_CAP],
            value_len: 0,
            value_long: false,
            length: None,
            length_bad: false,
            coding: Coding::None,
            upgrade: false,
            remaining: 0,
            digits: 0,
        }
    }

    /// Where the reader is.
    pub fn phase(&self) -> Phase {
        match self.state {
            State::LineStart
            | State::LeadingCr
            | State::Method
            | State::Target
            | State::Version
            | State::LineCr
            | State::FieldStart
            | State::Name
            | State::Value
            | State::FieldCr
            | State::HeadCr => Phase::Head,
            State::AwaitUpgrade => Phase::AwaitUpgrade,
            State::Tunnel => Phase::Tunnel,
            State::Opaque => Phase::Opaque,
            _ => Phase::Body,
        }
    }

    /// Whether part of a request head has arrived (the head deadline runs).
    pub fn head_started(&self) -> bool {
        self.phase() == Phase::Head && self.head > 0
    }

    /// Whether the answer to an upgrade request is awaited (its body may still be coming:
    /// Pingora tunnels from a `101` on, read or not).
    pub fn awaiting_answer(&self) -> bool {
        self.upgrade && matches!(self.phase(), Phase::Body | Phase::AwaitUpgrade)
    }

    /// The response to an upgrade request was `101`: the connection is a tunnel from here
    /// (what is left of its body included, as Pingora reads it).
    pub fn upgraded(&mut self) {
        if self.awaiting_answer() {
            self.state = State::Tunnel;
        }
    }

    /// The response to an upgrade request was not `101`: the next request follows its body.
    pub fn upgrade_refused(&mut self) {
        if self.state == State::AwaitUpgrade {
            self.state = State::LineStart;
        }
        self.upgrade = false;
    }

    /// Consume bytes of the request stream. Stops right after a head and after a message ends
    /// (so the caller sees the boundaries); consumes nothing in [`Phase::AwaitUpgrade`] and
    /// [`Phase::Opaque`]. An error leaves [`Framing::phase`] where it was found (a head or a
    /// body).
    pub fn feed(&mut self, data: &[u8]) -> Result<Fed, Violation> {
        let mut i = 0;
        while i < data.len() {
            match self.state {
                State::AwaitUpgrade | State::Opaque => {
                    return Ok(Fed {
                        used: i,
                        complete: false,
                    });
                }
                State::Tunnel => {
                    return Ok(Fed {
                        used: data.len(),
                        complete: false,
                    });
                }
                State::Fixed => {
                    let n =
                        (data.len() - i).min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                    i += n;
                    self.remaining -= n as u64;
                    if self.remaining == 0 {
                        return Ok(Fed {
                            used: i,
                            complete: self.finish(),
                        });
                    }
                }
                State::ChunkData => {
                    let n =
                        (data.len() - i).min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                    i += n;
                    self.remaining -= n as u64;
                    if self.remaining == 0 {
                        self.state = State::ChunkDataCr;
                    }
                }
                _ => {
                    let run = self.plain_run(&data[i..])?;
                    if run > 0 {
                        i += run;
                        continue;
                    }
                    let b = data[i];
                    i += 1;
                    let was_head = self.phase() == Phase::Head;
                    if was_head {
                        self.head += 1;
                    }
                    if self.byte(b)? {
                        return Ok(Fed {
                            used: i,
                            complete: self.finish(),
                        });
                    }
                    if was_head && self.phase() != Phase::Head {
                        // The head ended: stop, so the caller sees where its body starts.
                        return Ok(Fed {
                            used: i,
                            complete: false,
                        });
                    }
                }
            }
        }
        Ok(Fed {
            used: i,
            complete: false,
        })
    }

    /// The fast path: a run of plain bytes in a target or in a value that decides nothing,
    /// taken at once. Returns how many (0: judge the next byte alone).
    fn plain_run(&mut self, data: &[u8]) -> Result<usize, Violation> {
        let run = match self.state {
            State::Target if self.target_len > 0 || data[0] != b'*' => {
                let run = run_of(data, TARGET);
                if run == 0 {
                    return Ok(0);
                }
                self.line += run;
                if self.line > self.limits.max_request_line {
                    return Err(Violation {
                        status: 414,
                        reason: "request line too long",
                    });
                }
                self.target_len += run;
                self.target_star = false;
                run
            }
            State::Value if self.field == Field::Other => {
                let run = run_of(data, FIELD);
                self.grow_section(run)?;
                run
            }
            _ => 0,
        };
        self.head += run;
        Ok(run)
    }

    /// One byte of a head, a chunk line or a trailer; `true` when the message ended with it.
    fn byte(&mut self, b: u8) -> Result<bool, Violation> {
        match self.state {
            State::LineStart => {
                if b == b'\r' {
                    self.state = State::LeadingCr;
                } else if is_tchar(b) {
                    self.start_line();
                    self.method[0] = b;
                    self.method_len = 1;
                    self.line = 1;
                    self.state = State::Method;
                } else {
                    return Err(bad(if b == b'\n' {
                        "bare LF in the request head"
                    } else {
                        "invalid request line"
                    }));
                }
            }
            State::LeadingCr => {
                if b != b'\n' {
                    return Err(bad("bare CR in the request head"));
                }
                self.leading += 1;
                if self.leading > MAX_LEADING_EMPTY_LINES {
                    return Err(bad("empty lines before the request line"));
                }
                self.head = 0;
                self.state = State::LineStart;
            }
            State::Method => {
                self.grow_line()?;
                if b == b' ' {
                    self.state = State::Target;
                } else if is_tchar(b) {
                    if self.method_len < self.method.len() {
                        self.method[self.method_len] = b;
                    }
                    self.method_len += 1;
                } else {
                    return Err(bad("invalid method"));
                }
            }
            State::Target => {
                self.grow_line()?;
                match b {
                    b' ' if self.target_len == 0 => {
                        return Err(bad("more than one space in the request line"));
                    }
                    b' ' => {
                        self.state = State::Version;
                        self.version_len = 0;
                    }
                    b'#' => return Err(bad("fragment in the request target")),
                    b'\r' => return Err(bad("request line without an HTTP version")),
                    0x21..=0x7e => {
                        self.target_star = self.target_len == 0 && b == b'*';
                        self.target_len += 1;
                    }
                    _ => return Err(bad("invalid byte in the request target")),
                }
            }
            State::Version => {
                if b == b'\r' {
                    self.state = State::LineCr;
                    return Ok(false);
                }
                self.grow_line()?;
                if self.version_len == self.version.len() {
                    return Err(bad("invalid HTTP version"));
                }
                self.version[self.version_len] = b;
                self.version_len += 1;
            }
            State::LineCr => {
                if b != b'\n' {
                    return Err(bad("bare CR in the request head"));
                }
                self.check_version()?;
                self.state = State::FieldStart;
            }
            State::FieldStart | State::TrailerStart => {
                let trailer = self.state == State::TrailerStart;
                match b {
                    b'\r' => {
                        self.state = if trailer {
                            State::TrailerEndCr
                        } else {
                            State::HeadCr
                        };
                    }
                    b' ' | b'\t' => return Err(bad("folded or indented header line")),
                    b'\n' => return Err(bad("bare LF in the request head")),
                    _ if is_tchar(b) => {
                        self.fields += 1;
                        if self.fields > self.limits.max_header_count {
                            return Err(Violation {
                                status: 431,
                                reason: "too many header fields",
                            });
                        }
                        self.name_len = 0;
                        self.name_long = false;
                        self.value_len = 0;
                        self.value_long = false;
                        self.push_name(b);
                        self.grow_section(1)?;
                        self.state = if trailer {
                            State::TrailerName
                        } else {
                            State::Name
                        };
                    }
                    _ => return Err(bad("invalid header field name")),
                }
            }
            State::Name | State::TrailerName => {
                self.grow_section(1)?;
                if b == b':' {
                    self.field = self.classify();
                    self.state = if self.state == State::Name {
                        State::Value
                    } else {
                        State::TrailerValue
                    };
                } else if is_tchar(b) {
                    self.push_name(b);
                } else {
                    return Err(bad("invalid header field name"));
                }
            }
            State::Value | State::TrailerValue => {
                if b == b'\r' {
                    self.state = if self.state == State::Value {
                        State::FieldCr
                    } else {
                        State::TrailerCr
                    };
                    return Ok(false);
                }
                self.grow_section(1)?;
                if !is_field_byte(b) {
                    return Err(bad(if b == b'\n' {
                        "bare LF in the request head"
                    } else {
                        "invalid byte in a header field value"
                    }));
                }
                let ows = b == b' ' || b == b'\t';
                if self.state == State::Value
                    && self.field != Field::Other
                    && !(ows && self.value_len == 0)
                {
                    if self.value_len < VALUE_CAP {
                        self.value[self.value_len] = b;
                        self.value_len += 1;
                    } else if !ows {
                        self.value_long = true;
                    }
                }
            }
            State::FieldCr | State::TrailerCr => {
                if b != b'\n' {
                    return Err(bad("bare CR in the request head"));
                }
                self.grow_section(2)?;
                if self.state == State::FieldCr {
                    self.end_field();
                    self.state = State::FieldStart;
                } else {
                    self.state = State::TrailerStart;
                }
            }
            State::HeadCr => {
                if b != b'\n' {
                    return Err(bad("bare CR in the request head"));
                }
                return Ok(self.end_head());
            }
            State::TrailerEndCr => {
                if b != b'\n' {
                    return Err(bad("bare CR in the chunked trailer section"));
                }
                return Ok(true);
            }
            State::ChunkSize => match hex(b) {
                Some(d) => {
                    self.digits += 1;
                    if self.digits > 15 {
                        return Err(bad("chunk size too large"));
                    }
                    self.remaining = self.remaining << 4 | u64::from(d);
                    self.line += 1;
                }
                None if self.digits == 0 => return Err(bad("invalid chunk size")),
                None => match b {
                    b'\r' => self.state = State::ChunkLineCr,
                    b';' => self.chunk_ext_start()?,
                    b' ' | b'\t' => {
                        self.line += 1;
                        self.state = State::ChunkSizeWs;
                    }
                    _ => return Err(bad("invalid chunk size")),
                },
            },
            State::ChunkSizeWs => match b {
                b' ' | b'\t' => self.grow_chunk_line()?,
                b';' => self.chunk_ext_start()?,
                _ => return Err(bad("invalid chunk size")),
            },
            State::ChunkExt => {
                if b == b'\r' {
                    self.state = State::ChunkLineCr;
                } else if is_field_byte(b) {
                    self.grow_chunk_line()?;
                } else {
                    return Err(bad("invalid byte in a chunk extension"));
                }
            }
            State::ChunkLineCr => {
                if b != b'\n' {
                    return Err(bad("chunk line without CRLF"));
                }
                if self.remaining == 0 {
                    self.section = 0;
                    self.fields = 0;
                    self.state = State::TrailerStart;
                } else {
                    self.state = State::ChunkData;
                }
            }
            State::ChunkDataCr => {
                if b != b'\r' {
                    return Err(bad("chunk data without CRLF"));
                }
                self.state = State::ChunkDataLf;
            }
            State::ChunkDataLf => {
                if b != b'\n' {
                    return Err(bad("chunk data without CRLF"));
                }
                self.chunk_start();
            }
            State::Fixed
            | State::ChunkData
            | State::AwaitUpgrade
            | State::Tunnel
            | State::Opaque => unreachable!("handled by feed"),
        }
        Ok(false)
    }

    fn start_line(&mut self) {
        self.line = 0;
        self.section = 0;
        self.fields = 0;
        self.method_len = 0;
        self.target_star = false;
        self.target_len = 0;
        self.length = None;
        self.length_bad = false;
        self.coding = Coding::None;
        self.upgrade = false;
    }

    fn grow_line(&mut self) -> Result<(), Violation> {
        self.line += 1;
        if self.line > self.limits.max_request_line {
            return Err(Violation {
                status: 414,
                reason: "request line too long",
            });
        }
        Ok(())
    }

    fn grow_section(&mut self, n: usize) -> Result<(), Violation> {
        self.section += n;
        if self.section > self.limits.max_header_size {
            return Err(Violation {
                status: 431,
                reason: "header section too large",
            });
        }
        Ok(())
    }

    fn grow_chunk_line(&mut self) -> Result<(), Violation> {
        self.line += 1;
        if self.line > MAX_CHUNK_LINE {
            return Err(bad("chunk extension too long"));
        }
        Ok(())
    }

    fn chunk_ext_start(&mut self) -> Result<(), Violation> {
        self.state = State::ChunkExt;
        self.grow_chunk_line()
    }

    fn chunk_start(&mut self) {
        self.state = State::ChunkSize;
        self.remaining = 0;
        self.digits = 0;
        self.line = 0;
    }

    fn check_version(&self) -> Result<(), Violation> {
        let v = &self.version[..self.version_len];
        if v == b"HTTP/1.1" || v == b"HTTP/1.0" {
            return Ok(());
        }
        // `HTTP/2.0` over an HTTP/1 connection is well formed but not ours to serve; the h2c
        // preface is handled at the end of the head.
        if self.h2c_preface() {
            return Ok(());
        }
        if v.len() == 8
            && v.starts_with(b"HTTP/")
            && v[5].is_ascii_digit()
            && v[6] == b'.'
            && v[7].is_ascii_digit()
        {
            return Err(Violation {
                status: 505,
                reason: "HTTP version not supported",
            });
        }
        Err(bad("invalid HTTP version"))
    }

    fn h2c_preface(&self) -> bool {
        self.limits.h2c
            && self.first
            && &self.method[..self.method_len.min(8)] == b"PRI"
            && self.method_len == 3
            && self.target_star
            && &self.version[..self.version_len] == b"HTTP/2.0"
    }

    fn push_name(&mut self, b: u8) {
        if self.name_len < NAME_CAP {
            self.name[self.name_len] = b.to_ascii_lowercase();
            self.name_len += 1;
        } else {
            self.name_long = true;
        }
    }

    fn classify(&self) -> Field {
        if self.name_long {
            return Field::Other;
        }
        match &self.name[..self.name_len] {
            b"content-length" => Field::ContentLength,
            b"transfer-encoding" => Field::TransferEncoding,
            b"upgrade" => Field::Upgrade,
            _ => Field::Other,
        }
    }

    /// A header field line ended: note what decides framing.
    fn end_field(&mut self) {
        let value = trim(&self.value[..self.value_len]);
        match self.field {
            Field::Other => {}
            // Pingora's test (`is_upgrade_req`): an `Upgrade` field on HTTP/1.1.
            Field::Upgrade => self.upgrade = &self.version[..self.version_len] == b"HTTP/1.1",
            Field::TransferEncoding => {
                self.coding = if self.coding == Coding::None
                    && !self.value_long
                    && value.eq_ignore_ascii_case(b"chunked")
                {
                    Coding::Chunked
                } else {
                    Coding::Other
                };
            }
            Field::ContentLength => {
                let parsed = if self.value_long {
                    None
                } else {
                    content_length(value)
                };
                match (parsed, self.length) {
                    (Some(n), None) => self.length = Some(n),
                    (Some(n), Some(m)) if n == m => {}
                    _ => self.length_bad = true,
                }
            }
        }
        self.field = Field::Other;
    }

    /// The empty line after the fields: choose the body framing. `true` if the message ended.
    fn end_head(&mut self) -> bool {
        if self.h2c_preface() {
            self.state = State::Tunnel;
            return false;
        }
        match self.coding {
            Coding::Chunked => {
                self.chunk_start();
                false
            }
            Coding::Other => {
                self.state = State::Opaque;
                false
            }
            Coding::None if self.length_bad => {
                self.state = State::Opaque;
                false
            }
            Coding::None => match self.length {
                Some(n) if n > 0 => {
                    self.remaining = n;
                    self.state = State::Fixed;
                    false
                }
                _ => true,
            },
        }
    }

    /// A message ended: wait for the next request, or for the answer to an upgrade.
    fn finish(&mut self) -> bool {
        self.first = false;
        self.head = 0;
        self.leading = 0;
        self.state = if self.upgrade {
            State::AwaitUpgrade
        } else {
            State::LineStart
        };
        true
    }
}

/// Byte classes, looked up per byte of a head.
const TCHAR: u8 = 1;
const FIELD: u8 = 2;
const TARGET: u8 = 4;

const CLASSES: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        let mut class = 0;
        if c.is_ascii_alphanumeric() {
            class |= TCHAR;
        }
        let mut i = 0;
        let specials = b"!#$%&'*+-.^_`|~";
        while i < specials.len() {
            if specials[i] == c {
                class |= TCHAR;
            }
            i += 1;
        }
        // field-vchar, SP and HTAB (obs-text allowed, no CTL, no DEL).
        if c == b'\t' || (c >= 0x20 && c <= 0x7e) || c >= 0x80 {
            class |= FIELD;
        }
        // What a request target may hold as is: visible ASCII but `#`.
        if c >= 0x21 && c <= 0x7e && c != b'#' {
            class |= TARGET;
        }
        t[b] = class;
        b += 1;
    }
    t
};

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    CLASSES[usize::from(b)] & TCHAR != 0
}

/// `field-vchar`, SP and HTAB (obs-text allowed, no CTL, no DEL).
fn is_field_byte(b: u8) -> bool {
    CLASSES[usize::from(b)] & FIELD != 0
}

/// The length of the run at the start of `data` whose bytes are all of `class`.
fn run_of(data: &[u8], class: u8) -> usize {
    data.iter()
        .position(|&b| CLASSES[usize::from(b)] & class == 0)
        .unwrap_or(data.len())
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |e| e + 1);
    &v[start..end]
}

/// Digits only, leading zeros allowed (as Pingora and hygiene read them), at most 18
/// significant; anything else is hygiene's to refuse.
fn content_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let significant = &v[v.iter().position(|&d| d != b'0').unwrap_or(v.len())..];
    if significant.len() > 18 {
        return None;
    }
    Some(
        significant
            .iter()
            .fold(0u64, |n, d| n * 10 + u64::from(d - b'0')),
    )
}

#[cfg(test)]
mod tests;

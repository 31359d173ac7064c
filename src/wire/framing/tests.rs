use super::*;

const LIMITS: Limits = Limits {
    max_request_line: 64,
    max_header_size: 256,
    max_header_count: 4,
    h2c: false,
};

/// Feed `input` in pieces of `step` bytes; the offsets where messages ended, or the violation.
fn boundaries(limits: Limits, input: &[u8], step: usize) -> (Result<Vec<usize>, Violation>, Phase) {
    let mut f = Framing::new(limits);
    let mut ends = Vec::new();
    let mut pos = 0;
    while pos < input.len() {
        let piece = &input[pos..(pos + step).min(input.len())];
        let mut off = 0;
        while off < piece.len() {
            match f.feed(&piece[off..]) {
                Err(v) => return (Err(v), f.phase()),
                Ok(fed) => {
                    off += fed.used;
                    if fed.complete {
                        ends.push(pos + off);
                    } else if fed.used == 0 {
                        // AwaitUpgrade: nothing more is judged.
                        return (Ok(ends), f.phase());
                    }
                }
            }
        }
        pos += piece.len();
    }
    (Ok(ends), f.phase())
}

/// The same answer whether the bytes come all at once or one by one.
fn judge(limits: Limits, input: &[u8]) -> (Result<Vec<usize>, Violation>, Phase) {
    let whole = boundaries(limits, input, input.len().max(1));
    for step in [1, 2, 7] {
        assert_eq!(
            boundaries(limits, input, step),
            whole,
            "step {step} differs for {input:?}"
        );
    }
    whole
}

fn ok(input: &[u8]) -> Vec<usize> {
    judge(LIMITS, input)
        .0
        .unwrap_or_else(|v| panic!("{v:?} for {:?}", String::from_utf8_lossy(input)))
}

fn refused(input: &[u8]) -> Violation {
    match judge(LIMITS, input).0 {
        Err(v) => v,
        Ok(ends) => panic!("accepted ({ends:?}): {:?}", String::from_utf8_lossy(input)),
    }
}

#[test]
fn requests_without_a_body_end_at_the_empty_line() {
    let one = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n";
    assert_eq!(ok(one), vec![one.len()]);
    let two = [&one[..], b"HEAD / HTTP/1.0\r\n\r\n"].concat();
    assert_eq!(ok(&two), vec![one.len(), two.len()]);
}

#[test]
fn content_length_bodies_are_counted() {
    let req = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n";
    assert_eq!(ok(req), vec![req.len() - 18, req.len()]);
    // An identical repeat is one length (hygiene decides whether to accept it).
    let dup = b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length:  2 \r\n\r\nhi";
    assert_eq!(ok(dup), vec![dup.len()]);
    let zero = b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n";
    assert_eq!(ok(zero), vec![zero.len()]);
}

#[test]
fn chunked_bodies_with_extensions_and_trailers() {
    let req = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b\r\nhello\r\nA \t;x=\"q r\"\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\n";
    assert_eq!(ok(req), vec![req.len()]);
    let upper = b"POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\nfF\r\n";
    let (r, phase) = judge(LIMITS, upper);
    assert_eq!((r, phase), (Ok(vec![]), Phase::Body));
}

#[test]
fn malformed_chunk_lines_are_refused() {
    let te = |body: &[u8]| {
        [
            &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            body,
        ]
        .concat()
    };
    for (body, why) in [
        (&b"\r\nhello\r\n0\r\n\r\n"[..], "invalid chunk size"),
        (
            b"5;a\nb\r\nhello\r\n0\r\n\r\n",
            "invalid byte in a chunk extension",
        ),
        (
            b"5;a\0\r\nhello\r\n0\r\n\r\n",
            "invalid byte in a chunk extension",
        ),
        (b"5;a\rb\r\nhello\r\n0\r\n\r\n", "chunk line without CRLF"),
        (b"5\nhello\r\n0\r\n\r\n", "invalid chunk size"),
        (b" 5\r\nhello\r\n0\r\n\r\n", "invalid chunk size"),
        (b"+5\r\nhello\r\n0\r\n\r\n", "invalid chunk size"),
        (b"0x5\r\nhello\r\n0\r\n\r\n", "invalid chunk size"),
        (b"5 \r\nhello\r\n0\r\n\r\n", "invalid chunk size"),
        (b"FFFFFFFFFFFFFFFFF\r\n", "chunk size too large"),
        (b"5\r\nhelloXX0\r\n\r\n", "chunk data without CRLF"),
        (b"5\r\nhello\n0\r\n\r\n", "chunk data without CRLF"),
        (b"5\r\nhello\r\n0\n\r\n", "invalid chunk size"),
        (
            b"5\r\nhello\r\n0\r\nGET / HTTP/1.1\r\n\r\n",
            "invalid header field name",
        ),
        (
            b"5\r\nhello\r\n0\r\nX: a\x01\r\n\r\n",
            "invalid byte in a header field value",
        ),
    ] {
        let v = refused(&te(body));
        assert_eq!(
            (v.status, v.reason),
            (400, why),
            "{:?}",
            String::from_utf8_lossy(body)
        );
    }
    let long_ext = [&b"5;"[..], &[b'a'; MAX_CHUNK_LINE]].concat();
    assert_eq!(refused(&te(&long_ext)).reason, "chunk extension too long");
}

#[test]
fn request_line_rules() {
    for (req, status, why) in [
        (
            &b"GET  /f HTTP/1.1\r\n\r\n"[..],
            400,
            "more than one space in the request line",
        ),
        (b"GET /f  HTTP/1.1\r\n\r\n", 400, "invalid HTTP version"),
        (
            b"GET /f#x HTTP/1.1\r\n\r\n",
            400,
            "fragment in the request target",
        ),
        (
            b"GET /f\0 HTTP/1.1\r\n\r\n",
            400,
            "invalid byte in the request target",
        ),
        (
            b"GET /f\r HTTP/1.1\r\n\r\n",
            400,
            "request line without an HTTP version",
        ),
        (b"G(T /f HTTP/1.1\r\n\r\n", 400, "invalid method"),
        (b"GET /f http/1.1\r\n\r\n", 400, "invalid HTTP version"),
        (b"GET /f HTTP/1.10\r\n\r\n", 400, "invalid HTTP version"),
        (
            b"GET /f HTTP/2.0\r\n\r\n",
            505,
            "HTTP version not supported",
        ),
        (
            b"GET /f\r\n\r\n",
            400,
            "request line without an HTTP version",
        ),
        (b"GET /f HTTP/1.1\nHost: a\n\n", 400, "invalid HTTP version"),
        (
            b"\nGET / HTTP/1.1\r\n\r\n",
            400,
            "bare LF in the request head",
        ),
        (b" GET / HTTP/1.1\r\n\r\n", 400, "invalid request line"),
        (
            b"\r\n\r\n\r\n\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            400,
            "empty lines before the request line",
        ),
    ] {
        let v = refused(req);
        assert_eq!(
            (v.status, v.reason),
            (status, why),
            "{:?}",
            String::from_utf8_lossy(req)
        );
    }
    assert_eq!(ok(b"\r\nGET / HTTP/1.1\r\n\r\n"), vec![20]);
    assert_eq!(ok(b"OPTIONS * HTTP/1.1\r\n\r\n").len(), 1);
}

#[test]
fn header_rules() {
    for (fields, why) in [
        (&b"X-A: a\r\n\tb\r\n"[..], "folded or indented header line"),
        (b" X-A: a\r\n", "folded or indented header line"),
        (b"X-A : b\r\n", "invalid header field name"),
        (b"X A: b\r\n", "invalid header field name"),
        (b": b\r\n", "invalid header field name"),
        (b"NoColon\r\n", "invalid header field name"),
        (b"X-\xc3\xa9: b\r\n", "invalid header field name"),
        (b"X-A: a\x01b\r\n", "invalid byte in a header field value"),
        (b"X-A: a\0b\r\n", "invalid byte in a header field value"),
        (b"X-A: a\x7fb\r\n", "invalid byte in a header field value"),
        (b"X-A: a\nHost: b\r\n", "bare LF in the request head"),
        (b"X-A: a\rb\r\n", "bare CR in the request head"),
    ] {
        let req = [&b"GET / HTTP/1.1\r\n"[..], fields, b"\r\n"].concat();
        let v = refused(&req);
        assert_eq!(
            (v.status, v.reason),
            (400, why),
            "{:?}",
            String::from_utf8_lossy(fields)
        );
    }
    // obs-text and tabs are field bytes.
    ok(b"GET / HTTP/1.1\r\nX-A: caf\xc3\xa9\t!\r\n\r\n");
}

#[test]
fn head_limits_answer_414_and_431() {
    let line = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(64 - 14));
    ok(line.as_bytes());
    let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(64 - 13));
    assert_eq!(refused(long.as_bytes()).status, 414);
    // A target that never ends is refused as soon as it passes the limit.
    let endless = format!("GET /{}", "a".repeat(100));
    assert_eq!(refused(endless.as_bytes()).status, 414);

    let four = b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n";
    ok(four);
    let five = b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\nE: 5\r\n\r\n";
    assert_eq!(
        refused(five),
        Violation {
            status: 431,
            reason: "too many header fields"
        }
    );
    let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "v".repeat(252));
    assert_eq!(
        refused(big.as_bytes()),
        Violation {
            status: 431,
            reason: "header section too large"
        }
    );
    let fits = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "v".repeat(251));
    ok(fits.as_bytes());
}

#[test]
fn framing_hygiene_refuses_is_handed_through() {
    for head in [
        &b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n",
    ] {
        let input = [head, b"\x00anything\r\n"].concat();
        assert_eq!(judge(LIMITS, &input), (Ok(vec![]), Phase::Opaque));
    }
    // Chunked wins over Content-Length (hygiene then refuses or normalises and closes).
    let both =
        b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    assert_eq!(ok(both), vec![both.len()]);
}

#[test]
fn upgrades_wait_for_the_answer() {
    let req = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";
    let frames = b"\x81\x05hello";
    let input = [&req[..], frames].concat();
    assert_eq!(
        judge(LIMITS, &input),
        (Ok(vec![req.len()]), Phase::AwaitUpgrade)
    );

    let mut f = Framing::new(LIMITS);
    assert!(f.feed(req).unwrap().complete);
    assert_eq!(f.feed(frames).unwrap().used, 0);
    f.upgraded();
    assert_eq!(f.phase(), Phase::Tunnel);
    assert_eq!(f.feed(b"\x00\xff GET  #").unwrap().used, 9);

    let mut f = Framing::new(LIMITS);
    f.feed(req).unwrap();
    f.upgrade_refused();
    assert_eq!(f.phase(), Phase::Head);
    let next = b"GET / HTTP/1.1\r\n\r\n";
    assert_eq!(
        f.feed(next).unwrap(),
        Fed {
            used: next.len(),
            complete: true
        }
    );
    assert_eq!(
        f.feed(b"GET  /").unwrap_err().reason,
        "more than one space in the request line"
    );
}

#[test]
fn the_h2c_preface_is_a_tunnel_only_where_h2c_is_on() {
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04";
    let h2c = Limits {
        h2c: true,
        ..LIMITS
    };
    assert_eq!(judge(h2c, preface), (Ok(vec![]), Phase::Tunnel));
    assert_eq!(refused(preface).status, 505);
    // Only as the connection's first bytes.
    let later = [&b"GET / HTTP/1.1\r\n\r\n"[..], preface].concat();
    assert_eq!(judge(h2c, &later).0.unwrap_err().status, 505);
}

#[test]
fn head_started_tracks_a_partial_head() {
    let mut f = Framing::new(LIMITS);
    assert!(!f.head_started());
    f.feed(b"\r\n").unwrap();
    assert!(
        !f.head_started(),
        "an empty line between requests is not a head"
    );
    f.feed(b"GE").unwrap();
    assert!(f.head_started());
    f.feed(b"T / HTTP/1.1\r\nContent-Length: 2\r\n\r\n")
        .unwrap();
    assert_eq!(f.phase(), Phase::Body);
    assert!(!f.head_started());
    assert!(f.feed(b"ok").unwrap().complete);
    assert!(!f.head_started());
}

#[test]
fn framing_values_are_read_as_pingora_reads_them() {
    // Leading zeros and padding do not make a length unreadable (Pingora and hygiene accept
    // them, so the guard must frame them, not hand the connection through).
    let zeros = b"POST / HTTP/1.1\r\nContent-Length: 0000000000000000000003\r\n\r\nabcGET / HTTP/1.1\r\n\r\n";
    assert_eq!(ok(zeros), vec![zeros.len() - 18, zeros.len()]);
    let padded = format!(
        "POST / HTTP/1.1\r\nContent-Length:{}3{}\r\n\r\nabc",
        " ".repeat(45),
        "\t".repeat(45)
    );
    assert_eq!(ok(padded.as_bytes()), vec![padded.len()]);
    let te = format!(
        "POST / HTTP/1.1\r\nTransfer-Encoding:{}chunked{}\r\n\r\n0\r\n\r\n",
        " ".repeat(45),
        " ".repeat(45)
    );
    assert_eq!(ok(te.as_bytes()), vec![te.len()]);
    // An unreadable one hands the head on and nothing after it.
    let huge =
        b"POST / HTTP/1.1\r\nContent-Length: 1234567890123456789\r\n\r\nGET / HTTP/1.1\r\n\r\n";
    let mut f = Framing::new(LIMITS);
    let fed = f.feed(huge).unwrap();
    assert_eq!((fed.used, f.phase()), (huge.len() - 18, Phase::Opaque));
    assert_eq!(f.feed(b"GET / HTTP/1.1\r\n\r\n").unwrap().used, 0);
}

#[test]
fn only_http11_upgrades_wait_and_an_early_101_ends_the_body() {
    let old = b"GET / HTTP/1.0\r\nUpgrade: websocket\r\n\r\nGET / HTTP/1.0\r\n\r\n";
    assert_eq!(judge(LIMITS, old), (Ok(vec![38, old.len()]), Phase::Head));

    // Pingora tunnels from the 101 on, whether or not the body was read.
    let mut f = Framing::new(LIMITS);
    f.feed(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nContent-Length: 3\r\n\r\na")
        .unwrap();
    assert!(f.awaiting_answer());
    f.upgraded();
    assert_eq!(f.phase(), Phase::Tunnel);

    // A refusal during the body: the next request follows the body.
    let mut f = Framing::new(LIMITS);
    let head = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nContent-Length: 3\r\n\r\n";
    assert_eq!(f.feed(head).unwrap().used, head.len());
    assert_eq!(f.feed(b"a").unwrap().used, 1);
    f.upgrade_refused();
    assert!(f.feed(b"bc").unwrap().complete);
    assert_eq!((f.phase(), f.awaiting_answer()), (Phase::Head, false));
}

/// A bounded, seeded stand-in for the `framing` fuzz target inside `cargo test`: mutations of
/// valid request streams through the same checks (split-invariance, statuses, httparse).
#[test]
fn mutated_streams_keep_the_fuzz_properties() {
    use rand::{Rng, SeedableRng};
    let seeds: [&[u8]; 4] = [
        b"GET /a?b=c HTTP/1.1\r\nHost: a.test\r\nX-A: 1\r\n\r\nGET / HTTP/1.0\r\n\r\n",
        b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nT: v\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x81\x05hello",
    ];
    let alphabet = b" \t\r\n:;0aF#\x00\x7f\xc3/*-";
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7011_6a7e);
    for i in 0..3000 {
        let mut data = seeds[i % seeds.len()].to_vec();
        for _ in 0..rng.gen_range(1..4) {
            let at = rng.gen_range(0..=data.len());
            let b = alphabet[rng.gen_range(0..alphabet.len())];
            match rng.gen_range(0..3) {
                0 => data.insert(at, b),
                1 if at < data.len() => {
                    data.remove(at);
                }
                _ if at < data.len() => data[at] = b,
                _ => data.push(b),
            }
        }
        crate::fuzzing::framing(&data);
    }
}

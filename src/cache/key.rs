//! Cache keys: which requests share a stored response.
//!
//! The primary key is `scheme, host:port, path, query`, each length-prefixed so no two
//! different tuples frame to the same bytes (`/a` + `?b` never equals `/a?` + `b`). The host is
//! lower-cased, a trailing dot dropped and the scheme's default port made explicit, so
//! `Example.com` and `example.com:80` share entries while two hosts never do. GET and HEAD share
//! a key (a HEAD is answered from a stored GET).
//!
//! The variance (a secondary key) holds what may differ between copies of one URL: the values of
//! the route's `key_headers` and of the request headers the origin's `Vary` names.
//! `Accept-Encoding` is normalised to the codings tollgate knows, in a fixed order, so the many
//! spellings browsers send make a handful of variants, not thousands. A purge by URL removes
//! every variant.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;

use http::HeaderName;
use pingora::cache::key::HashBinary;
use pingora::cache::{CacheKey, VarianceBuilder};
use pingora::http::RequestHeader;

/// The primary key bytes: each part length-prefixed; the authority normalised.
pub fn primary(scheme: &str, host: &str, path: &str, query: Option<&str>) -> Vec<u8> {
    let default_port = if scheme == "https" { 443 } else { 80 };
    let (name, port) = split_authority(host, default_port);
    let mut port_text = itoa::Buffer::new();
    let port = port_text.format(port).as_bytes();
    let query = query.map_or(&b"\xff"[..], str::as_bytes); // no query ≠ empty query
    let mut out =
        Vec::with_capacity(20 + scheme.len() + name.len() + port.len() + path.len() + query.len());
    let frame = |out: &mut Vec<u8>, len: usize| out.extend_from_slice(&(len as u32).to_be_bytes());
    frame(&mut out, scheme.len());
    out.extend_from_slice(scheme.as_bytes());
    // `name:port`, lower-cased as it is copied (no intermediate strings).
    frame(&mut out, name.len() + 1 + port.len());
    out.extend(name.bytes().map(|b| b.to_ascii_lowercase()));
    out.push(b':');
    out.extend_from_slice(port);
    frame(&mut out, path.len());
    out.extend_from_slice(path.as_bytes());
    frame(&mut out, query.len());
    out.extend_from_slice(query);
    out
}

/// `host[:port]` split, the trailing dot of the name dropped, the port defaulted.
fn split_authority(host: &str, default_port: u16) -> (&str, u16) {
    let host = host.trim();
    let (name, port) = match host.rsplit_once(':') {
        // An IPv6 literal without a port has colons but ends with `]`.
        Some((n, p)) if !p.contains(']') && p.bytes().all(|b| b.is_ascii_digit()) => {
            (n, p.parse::<u16>().unwrap_or(default_port))
        }
        _ => (host, default_port),
    };
    (name.trim_end_matches('.'), port)
}

/// A cache key whose primary hash is computed once, here.
///
/// pingora-cache would hash the primary bytes with Blake2b on every `primary_bin` call (a hit
/// makes several: storage, LRU, lock), ~2% of a hit's CPU. The hash is only ever compared within
/// this process (the storage is in memory, purges build their keys here too), so it need not be
/// stable across restarts, only collision-free under attack: a client able to make two URLs
/// collide could have one URL's response served for the other. It is SipHash-1-3 with a random
/// per-process key (std's `RandomState`), computed twice with different domain bytes: 128 bits
/// that no client can aim at without the key.
fn keyed(primary: Vec<u8>) -> CacheKey {
    static KEY: OnceLock<RandomState> = OnceLock::new();
    let state = KEY.get_or_init(RandomState::new);
    let half = |domain: u8| {
        let mut h = state.build_hasher();
        h.write_u8(domain);
        h.write(&primary);
        h.finish().to_le_bytes()
    };
    let mut hash: HashBinary = [0; 16];
    hash[..8].copy_from_slice(&half(0));
    hash[8..].copy_from_slice(&half(1));
    let mut key = CacheKey::new(primary, String::new());
    key.set_primary_bin_override(hash);
    key
}

/// The key for a request on a caching route; `host` is the client's Host (or target authority).
pub fn for_request(req: &RequestHeader, host: &str, tls: bool) -> CacheKey {
    let scheme = if tls { "https" } else { "http" };
    keyed(primary(scheme, host, req.uri.path(), req.uri.query()))
}

/// The keys of one URL under both schemes (purge and invalidation remove both).
pub fn both_schemes(host: &str, path: &str, query: Option<&str>) -> [CacheKey; 2] {
    ["http", "https"].map(|scheme| keyed(primary(scheme, host, path, query)))
}

/// The variance of a request: a trusted proxy's forwarding inputs, the route's key headers,
/// and the headers `vary` names.
///
/// Never `None`: the forwarding inputs are always one value (empty without them), so that a
/// request without them never takes the copy stored for one with them (Pingora serves a URL's
/// primary slot as it is to a request without a variance).
pub fn variance(
    req: &RequestHeader,
    key_headers: &[HeaderName],
    vary: &[HeaderName],
    trusted: bool,
) -> Option<HashBinary> {
    // A trusted proxy's forwarding fields reach the origin as they are, and frameworks build
    // absolute URLs (redirects, links) from them: each value is its own variant. Others' are
    // removed before the origin sees them, and count as none.
    let mut forwarded = Vec::new();
    if trusted {
        for name in &FORWARDED_INPUTS {
            for value in req.headers.get_all(name) {
                forwarded.extend_from_slice(name.as_str().as_bytes());
                forwarded.push(b':');
                if name == http::header::FORWARDED {
                    forwarded_url_parts(value.as_bytes(), &mut forwarded);
                } else {
                    forwarded.extend_from_slice(value.as_bytes());
                }
                forwarded.push(b'\n');
            }
        }
    }
    let mut b = VarianceBuilder::new();
    b.add_value("forwarded-inputs", &forwarded);
    for name in key_headers.iter().chain(vary) {
        let values: Vec<u8> = if name == http::header::ACCEPT_ENCODING {
            accepted_codings(req).into_bytes()
        } else {
            let mut v = Vec::new();
            for value in req.headers.get_all(name) {
                v.extend_from_slice(value.as_bytes());
                v.push(b'\n');
            }
            v
        };
        b.add_owned_name_value(name.as_str().to_string(), values);
    }
    b.finalize()
}

/// Forwarding fields a trusted proxy sends that the origin may build URLs from, besides
/// `X-Forwarded-Proto` (in the key's scheme) and `X-Forwarded-Host` (answers to one other than
/// `Host` are not stored).
const FORWARDED_INPUTS: [HeaderName; 5] = [
    http::header::FORWARDED,
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-forwarded-scheme"),
    HeaderName::from_static("x-forwarded-ssl"),
];

/// The `host=` and `proto=` pairs of a `Forwarded` value (RFC 7239), element by element: the
/// parts a URL is built from. `for=` and `by=` name the client and the proxy, and would make a
/// variant per client.
fn forwarded_url_parts(value: &[u8], out: &mut Vec<u8>) {
    for element in value.split(|&b| b == b',') {
        for pair in element.split(|&b| b == b';') {
            let pair = pair.trim_ascii();
            let key = pair.split(|&b| b == b'=').next().unwrap_or(b"");
            if key.eq_ignore_ascii_case(b"host") || key.eq_ignore_ascii_case(b"proto") {
                out.extend_from_slice(&pair.to_ascii_lowercase());
                out.push(b';');
            }
        }
        out.push(b',');
    }
}

/// `Accept-Encoding` reduced to the codings that matter, in a fixed order (`br,gzip,zstd`).
///
/// This is what a caching route sends its upstream instead of the client's value (empty:
/// `identity`), so that every coding an origin may answer with is one the variance
/// tells apart: a client's `*`, `deflate` or `compress` would otherwise share the plain
/// variant's key and could store an encoded body that clients without it cannot read.
pub fn accepted_codings(req: &RequestHeader) -> String {
    let mut seen = [false; 3];
    for v in req.headers.get_all(http::header::ACCEPT_ENCODING) {
        for item in v.to_str().unwrap_or("").split(',') {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let refused = parts.any(|p| {
                let p = p.trim().to_ascii_lowercase();
                p.strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            if refused {
                continue;
            }
            match coding.as_str() {
                "br" => seen[0] = true,
                "gzip" | "x-gzip" => seen[1] = true,
                "zstd" => seen[2] = true,
                _ => {}
            }
        }
    }
    ["br", "gzip", "zstd"]
        .iter()
        .zip(seen)
        .filter(|(_, s)| *s)
        .map(|(c, _)| *c)
        .collect::<Vec<_>>()
        .join(",")
}

/// The header names a response's `Vary` lists; `None` for `Vary: *` (never stored).
pub fn vary_names(headers: &http::HeaderMap) -> Option<Vec<HeaderName>> {
    let mut names = Vec::new();
    for v in headers.get_all(http::header::VARY) {
        for name in v.to_str().unwrap_or("").split(',') {
            let name = name.trim();
            if name == "*" {
                return None;
            }
            if let Ok(n) = HeaderName::from_bytes(name.as_bytes())
                && !names.contains(&n)
            {
                names.push(n);
            }
        }
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    Some(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::cache::key::CacheHashKey;

    /// The key bytes as they were built before `primary` wrote the authority in place: the
    /// same bytes, so the same URLs share entries.
    fn reference_primary(scheme: &str, host: &str, path: &str, query: Option<&str>) -> Vec<u8> {
        let default_port = if scheme == "https" { 443 } else { 80 };
        let host = host.trim();
        let (name, port) = match host.rsplit_once(':') {
            Some((n, p)) if !p.contains(']') && p.bytes().all(|b| b.is_ascii_digit()) => {
                (n, p.parse::<u16>().unwrap_or(default_port))
            }
            _ => (host, default_port),
        };
        let authority = format!("{}:{port}", name.trim_end_matches('.').to_ascii_lowercase());
        let mut out = Vec::new();
        for part in [
            scheme.as_bytes(),
            authority.as_bytes(),
            path.as_bytes(),
            query.map_or(&b"\xff"[..], str::as_bytes),
        ] {
            out.extend_from_slice(&(part.len() as u32).to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    #[test]
    fn primary_keys_are_the_reference_bytes() {
        let hosts = [
            "Example.COM",
            "example.com:8080",
            "example.com.",
            "EXAMPLE.com.:443",
            " spaced.test ",
            "[::1]",
            "[::1]:8443",
            "caf\u{e9}.test",
            "h:99999",
            "h:",
            "",
        ];
        for scheme in ["http", "https"] {
            for host in hosts {
                for (path, query) in [("/", None), ("/a/b", Some("")), ("/x", Some("q=1&r"))] {
                    assert_eq!(
                        primary(scheme, host, path, query),
                        reference_primary(scheme, host, path, query),
                        "{scheme} {host:?} {path} {query:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn primary_hashes_are_per_key_and_stable_within_the_process() {
        let req = |p: &[u8]| RequestHeader::build("GET", p, None).unwrap();
        let a = for_request(&req(b"/a"), "h", false).primary_bin();
        assert_eq!(a, for_request(&req(b"/a"), "H:80", false).primary_bin());
        let mut seen = std::collections::HashSet::new();
        for i in 0..10_000 {
            let path = format!("/p/{i}");
            let h = for_request(&req(path.as_bytes()), "h", false).primary_bin();
            // Both halves carry the key: neither is constant or equal to the other.
            assert_ne!(h[..8], h[8..]);
            assert!(seen.insert(h), "collision at {path}");
        }
    }

    #[test]
    fn primary_keys_frame_their_parts_and_normalise_the_host() {
        let k = |h, p, q| primary("http", h, p, q);
        assert_eq!(
            k("Example.COM", "/a", None),
            k("example.com:80", "/a", None)
        );
        assert_eq!(k("example.com.", "/a", None), k("example.com", "/a", None));
        assert_ne!(k("example.com", "/a", None), k("example.org", "/a", None));
        assert_ne!(
            k("example.com:8080", "/a", None),
            k("example.com", "/a", None)
        );
        assert_ne!(k("h", "/a", Some("b")), k("h", "/a?", Some("b")));
        assert_ne!(k("h", "/a", Some("")), k("h", "/a", None));
        assert_eq!(k("[::1]", "/", None), k("[::1]:80", "/", None));
    }

    #[test]
    fn plain_and_tls_requests_never_share_a_key() {
        // A backend may answer http with a redirect to https: that must not be served on TLS.
        let req = RequestHeader::build("GET", b"/p?q=1", None).unwrap();
        let plain = for_request(&req, "a.test", false);
        let tls = for_request(&req, "a.test", true);
        assert_ne!(plain.primary_bin(), tls.primary_bin());
        // Default ports follow the scheme: https://a.test is https://a.test:443.
        assert_eq!(
            tls.primary_bin(),
            for_request(&req, "a.test:443", true).primary_bin()
        );
        let both = both_schemes("a.test", "/p", Some("q=1"));
        assert_eq!(both[0].primary_bin(), plain.primary_bin());
        assert_eq!(both[1].primary_bin(), tls.primary_bin());
    }

    #[test]
    fn a_trusted_proxys_forwarding_fields_are_variants_and_their_absence_is_the_plain_one() {
        let req = |fields: &[(&str, &str)]| {
            let mut r = RequestHeader::build("GET", b"/", None).unwrap();
            for (k, v) in fields {
                r.append_header(k.to_string(), *v).unwrap();
            }
            r
        };
        let v = |fields: &[(&str, &str)], trusted| variance(&req(fields), &[], &[], trusted);
        let plain = v(&[], false);
        // Always a variance, so that a plain request never takes a forwarded one's copy.
        assert!(plain.is_some());
        assert_eq!(v(&[], true), plain);
        assert_ne!(v(&[("x-forwarded-prefix", "/shop")], true), plain);
        assert_ne!(
            v(&[("x-forwarded-prefix", "/shop")], true),
            v(&[("x-forwarded-prefix", "/blog")], true)
        );
        assert_ne!(v(&[("x-forwarded-port", "8443")], true), plain);
        // `Forwarded`: the host and proto, not the client.
        let fwd = |value| v(&[("forwarded", value)], true);
        assert_ne!(fwd("host=a.test;proto=https"), plain);
        assert_eq!(
            fwd("for=192.0.2.1;host=a.test;proto=https"),
            fwd("for=198.51.100.7;Host=a.test;proto=https;by=10.0.0.1")
        );
        assert_ne!(fwd("host=a.test"), fwd("host=b.test"));
        assert_eq!(fwd("for=192.0.2.1"), fwd("for=198.51.100.7"));
        // Not from an untrusted peer (whose fields never reach the origin).
        assert_eq!(v(&[("x-forwarded-prefix", "/shop")], false), plain);
    }

    #[test]
    fn accept_encoding_variants_are_normalised() {
        let req = |ae: &str| {
            let mut r = RequestHeader::build("GET", b"/", None).unwrap();
            r.insert_header("accept-encoding", ae).unwrap();
            r
        };
        let ae = [http::header::ACCEPT_ENCODING];
        let v = |s: &str| variance(&req(s), &[], &ae, false);
        assert_eq!(v("gzip, deflate, br"), v("br;q=0.9, gzip"));
        assert_ne!(v("gzip"), v("br"));
        assert_eq!(v("gzip, br;q=0"), v("gzip"));
        assert_eq!(v("identity"), v("deflate"));
    }

    #[test]
    fn vary_star_is_refused() {
        let mut h = http::HeaderMap::new();
        h.insert("vary", "Accept-Encoding, *".parse().unwrap());
        assert!(vary_names(&h).is_none());
        h.insert("vary", "accept-encoding, Origin".parse().unwrap());
        assert_eq!(vary_names(&h).unwrap(), ["accept-encoding", "origin"]);
    }
}

//! `X-Request-Id`: kept from trusted proxies when well-formed, otherwise generated.

use bytes::Bytes;
use http::HeaderValue;
use pingora::http::RequestHeader;

/// The header name.
pub const HEADER: &str = "x-request-id";

/// A request id: text that is also a header value, so the upstream request and the response
/// get it without a copy (a clone shares the bytes). Reads as `&str` (`Deref`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(HeaderValue);

impl Default for RequestId {
    fn default() -> RequestId {
        RequestId(HeaderValue::from_static(""))
    }
}

impl RequestId {
    /// The id as a header value.
    pub fn header_value(&self) -> HeaderValue {
        self.0.clone()
    }
}

impl std::ops::Deref for RequestId {
    type Target = str;

    fn deref(&self) -> &str {
        // Built only from well-formed (ASCII) ids.
        self.0.to_str().unwrap_or("")
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self)
    }
}

/// The id for this request: the incoming one if `trusted` and well-formed, else a new one.
pub fn pick(req: &RequestHeader, trusted: bool) -> RequestId {
    if trusted
        && let Some(v) = req.headers.get(HEADER)
        && is_well_formed(v.as_bytes())
    {
        // Shares the bytes of the request head.
        return RequestId(v.clone());
    }
    generate()
}

/// 128 random bits as 32 lowercase hex digits: formatted on the stack, one allocation (the
/// shared owner of the bytes) however often the id is copied into headers.
pub fn generate() -> RequestId {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = rand::random::<u128>();
    let mut digits = [0u8; 32];
    for d in digits.iter_mut().rev() {
        *d = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
    let value = HeaderValue::from_maybe_shared(Bytes::from_owner(digits))
        .expect("hex digits are a valid header value");
    RequestId(value)
}

/// 1–128 characters from `[A-Za-z0-9._:-]`: safe in headers, logs and JSON.
pub fn is_well_formed(v: &[u8]) -> bool {
    (1..=128).contains(&v.len())
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_trusted_well_formed_ids() {
        let mut r = RequestHeader::build("GET", b"/", None).unwrap();
        r.insert_header(HEADER, "abc-123").unwrap();
        assert_eq!(&*pick(&r, true), "abc-123");
        assert_ne!(&*pick(&r, false), "abc-123");
        r.insert_header(HEADER, "bad id\"").unwrap();
        assert_eq!(pick(&r, true).len(), 32);
        assert_ne!(generate(), generate());
        let id = generate();
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
            "{id}"
        );
        assert_eq!(id.header_value().as_bytes(), id.as_bytes());
        assert_eq!(&*RequestId::default(), "");
    }
}

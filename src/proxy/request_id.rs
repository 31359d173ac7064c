//! `X-Request-Id`: kept from trusted proxies when well-formed, otherwise generated.

use pingora::http::RequestHeader;

/// The header name.
pub const HEADER: &str = "x-request-id";

/// The id for this request: the incoming one if `trusted` and well-formed, else a new one.
pub fn pick(req: &RequestHeader, trusted: bool) -> String {
    if trusted
        && let Some(v) = req.headers.get(HEADER)
        && is_well_formed(v.as_bytes())
    {
        // Well-formed ids are ASCII, so this cannot fail.
        return String::from_utf8_lossy(v.as_bytes()).into_owned();
    }
    generate()
}

/// 128 random bits as 32 lowercase hex digits.
pub fn generate() -> String {
    format!("{:032x}", rand::random::<u128>())
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
        assert_eq!(pick(&r, true), "abc-123");
        assert_ne!(pick(&r, false), "abc-123");
        r.insert_header(HEADER, "bad id\"").unwrap();
        assert_eq!(pick(&r, true).len(), 32);
        assert_ne!(generate(), generate());
    }
}

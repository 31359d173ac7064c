//! Request-path normalisation before routing (RFC 3986 §6.2.2, §5.2.4): routing, `strip_prefix`,
//! `rewrite` and the upstream all see the same bytes, so `/api/../admin` cannot match `/api`
//! and then reach `/admin`.
//!
//! - `%XX` escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded, so `%2e%2e` is
//!   `..`; other escapes are kept (hex upper-cased).
//! - Escapes of `/`, `\`, `#`, NUL and other control characters are refused: they mean a
//!   different path to different servers. A raw `\` is refused too. Malformed escapes are refused.
//! - Dot segments are removed and repeated slashes merged; a trailing slash is kept.
//! - A dot segment with a path parameter (`/..;/`, `/.;x/`) is refused: Tomcat, Jetty and other
//!   servlet containers drop the parameter and resolve the `..`, so `/public/..;/admin` would
//!   match `/public` here and reach `/admin` there.

use std::borrow::Cow;

/// Why a path was refused (answered 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// `%2F`, `%5C`, `%23`, `%00`–`%1F`, `%7F`.
    ForbiddenEscape,
    /// `%` not followed by two hex digits.
    BadEscape,
    /// A raw `\` or control byte.
    ForbiddenByte,
    /// Not starting with `/`.
    NotAbsolute,
    /// `.;…` or `..;…` as a segment.
    DotParameter,
}

impl PathError {
    /// Text for the error response.
    pub fn as_str(self) -> &'static str {
        match self {
            PathError::ForbiddenEscape => "encoded '/', '\\', '#' or control character in path",
            PathError::BadEscape => "malformed percent-escape in path",
            PathError::ForbiddenByte => "backslash or control character in path",
            PathError::NotAbsolute => "path must start with '/'",
            PathError::DotParameter => "dot segment with a ';' parameter in path",
        }
    }
}

/// Normalise `path` (no query). Borrowed when already normal — the common case costs one scan.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, PathError> {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        // `*` (OPTIONS *) is left to the caller; anything else is not a path.
        return if path == "*" {
            Ok(Cow::Borrowed(path))
        } else {
            Err(PathError::NotAbsolute)
        };
    }
    if !needs_work(b)? {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    // After decoding: `%2e%2e;` is `..;`.
    if decoded
        .split('/')
        .any(|s| s.contains(';') && is_dot_segment(s))
    {
        return Err(PathError::DotParameter);
    }
    Ok(Cow::Owned(remove_dot_segments(&decoded)))
}

/// Is `seg` a dot segment to some backend: `.` or `..`, a dot also written `%2e` (many
/// backends decode before resolving), and any `;` path parameter dropped (as servlet
/// containers do: `..;x` is `..`)? No allocation: it runs on every rewritten path.
pub fn is_dot_segment(seg: &str) -> bool {
    let b = seg.split(';').next().unwrap_or(seg).as_bytes();
    let (mut dots, mut i) = (0, 0);
    while i < b.len() {
        if b[i] == b'.' {
            i += 1;
        } else if b.len() - i >= 3 && b[i] == b'%' && b[i + 1] == b'2' && b[i + 2] | 0x20 == b'e' {
            i += 3;
        } else {
            return false;
        }
        dots += 1;
        if dots > 2 {
            return false;
        }
    }
    dots > 0
}

/// Validate bytes; true when something must change (an escape, `//`, or a dot segment).
fn needs_work(b: &[u8]) -> Result<bool, PathError> {
    let mut work = false;
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'\\' => return Err(PathError::ForbiddenByte),
            c if c.is_ascii_control() => return Err(PathError::ForbiddenByte),
            b'%' => work = true,
            b'/' if b.get(i + 1) == Some(&b'/') => work = true,
            b'.' if b[i - 1] == b'/' => {
                let rest = &b[i + 1..];
                let seg_end = rest.first().is_none_or(|&n| n == b'/')
                    || (rest[0] == b'.' && rest.get(1).is_none_or(|&n| n == b'/'));
                work |= seg_end;
                // `.;` or `..;`: refused once escapes are judged (`normalize_path`).
                let after = if rest.first() == Some(&b'.') {
                    &rest[1..]
                } else {
                    rest
                };
                work |= after.first() == Some(&b';');
            }
            _ => {}
        }
    }
    Ok(work)
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let b = path.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            // Copy up to the next escape as it is (`%` is ASCII, so a char boundary): a
            // non-ASCII path stays the same UTF-8, not one char per byte.
            let end = b[i..]
                .iter()
                .position(|&c| c == b'%')
                .map_or(b.len(), |n| i + n);
            out.push_str(&path[i..end]);
            i = end;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            b.get(i + 1).and_then(|&c| hex(c)),
            b.get(i + 2).and_then(|&c| hex(c)),
        ) else {
            return Err(PathError::BadEscape);
        };
        let byte = hi << 4 | lo;
        match byte {
            b'/' | b'\\' | b'#' => return Err(PathError::ForbiddenEscape),
            c if c.is_ascii_control() => return Err(PathError::ForbiddenEscape),
            c if c.is_ascii_alphanumeric() || b"-._~".contains(&c) => out.push(c as char),
            _ => {
                out.push('%');
                out.push(char::from(b[i + 1].to_ascii_uppercase()));
                out.push(char::from(b[i + 2].to_ascii_uppercase()));
            }
        }
        i += 3;
    }
    Ok(out)
}

fn remove_dot_segments(path: &str) -> String {
    let mut stack: Vec<&str> = Vec::new();
    let mut trailing = path.ends_with('/');
    for seg in path.split('/') {
        match seg {
            "" => {}
            "." => trailing = true,
            ".." => {
                stack.pop();
                trailing = true;
            }
            s => {
                stack.push(s);
                trailing = false;
            }
        }
    }
    // The last segment decides: `/a/b/` and `/a/..` end with a slash; `/a/b` does not.
    if path.ends_with('/') {
        trailing = true;
    }
    let mut out = String::with_capacity(path.len());
    for s in &stack {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || trailing {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, PathError> {
        normalize_path(p).map(|c| c.into_owned())
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in [
            "/",
            "/a/b",
            "/a/b/",
            "/a.b/c.d",
            "/.well-known/x",
            "/a..b",
            "/a/.hidden",
        ] {
            assert!(matches!(normalize_path(p), Ok(Cow::Borrowed(_))), "{p}");
        }
    }

    #[test]
    fn dot_segments_and_slashes() {
        assert_eq!(n("/api/../admin").unwrap(), "/admin");
        assert_eq!(n("/api/./x").unwrap(), "/api/x");
        assert_eq!(n("/../../etc/passwd").unwrap(), "/etc/passwd");
        assert_eq!(n("//api///x//").unwrap(), "/api/x/");
        assert_eq!(n("/a/b/..").unwrap(), "/a/");
        assert_eq!(n("/a/.").unwrap(), "/a/");
        assert_eq!(n("/..").unwrap(), "/");
    }

    #[test]
    fn unreserved_escapes_are_decoded_first() {
        assert_eq!(n("/api/%2e%2e/admin").unwrap(), "/admin");
        assert_eq!(n("/api/%2E./admin").unwrap(), "/admin");
        assert_eq!(n("/%41pi/x%7e").unwrap(), "/Api/x~");
        assert_eq!(n("/a%20b/%c3%a9").unwrap(), "/a%20b/%C3%A9");
    }

    #[test]
    fn non_ascii_paths_keep_their_bytes() {
        // Found by the normalize_path fuzz target: bytes were copied as one char each, so
        // `/café/./x` was routed and forwarded as `/cafÃ©/x` (fuzz/regressions/).
        assert_eq!(n("/café/./x").unwrap(), "/café/x");
        assert_eq!(n("/\u{1F600}/.").unwrap(), "/\u{1F600}/");
        assert_eq!(n("/é%41//ü").unwrap(), "/éA/ü");
        assert_eq!(n("/é%c3%a9").unwrap(), "/é%C3%A9");
    }

    #[test]
    fn dangerous_input_is_refused() {
        assert_eq!(n("/a%2Fb"), Err(PathError::ForbiddenEscape));
        assert_eq!(n("/a%2fb"), Err(PathError::ForbiddenEscape));
        assert_eq!(n("/a%5cb"), Err(PathError::ForbiddenEscape));
        assert_eq!(n("/a%00"), Err(PathError::ForbiddenEscape));
        assert_eq!(n("/a%23b"), Err(PathError::ForbiddenEscape));
        assert_eq!(n("/a%0d%0a"), Err(PathError::ForbiddenEscape));
        assert_eq!(n("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(n("/a%2"), Err(PathError::BadEscape));
        assert_eq!(n("/a\\b"), Err(PathError::ForbiddenByte));
        assert_eq!(n("a/b"), Err(PathError::NotAbsolute));
        assert_eq!(n("*").unwrap(), "*");
    }

    #[test]
    fn dot_segments_with_parameters_are_refused() {
        for p in [
            "/public/..;/admin",
            "/public/..;x=1/admin",
            "/a/.;/b",
            "/..;",
            "/public/%2e%2e;/admin",
            "/public/.%2E;/admin",
            "/a//..;/b",
        ] {
            assert_eq!(n(p), Err(PathError::DotParameter), "{p}");
        }
        // `;` elsewhere is an ordinary byte of its segment.
        assert_eq!(n("/api;x=y/../admin").unwrap(), "/admin");
        assert_eq!(n("/a..;/b").unwrap(), "/a..;/b");
        assert_eq!(n("/a/...;/b").unwrap(), "/a/...;/b");
        assert_eq!(n("/a/;/b").unwrap(), "/a/;/b");
    }

    #[test]
    fn dot_segments_as_backends_read_them() {
        for s in [
            ".",
            "..",
            "%2e",
            "%2E.",
            ".%2e",
            "..;",
            ".;x=1",
            "%2e%2e;a;b",
        ] {
            assert!(is_dot_segment(s), "{s}");
        }
        for s in [
            "",
            "...",
            "a",
            "..a",
            ".a;",
            ";..",
            "%2f",
            "%2e%2e%2e",
            "%2",
            "%2x",
            ".%",
        ] {
            assert!(!is_dot_segment(s), "{s}");
        }
    }
}

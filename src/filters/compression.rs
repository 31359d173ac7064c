//! `compression`: gzip, brotli and zstd response compression through Pingora's compression
//! module, negotiated from `Accept-Encoding`. Only `200`, `403` and `404` responses of a listed
//! content type, at least `min_size` long (when the length is known), not already encoded, not
//! a part (`Content-Range`) and not marked `no-transform` are compressed; the
//! module adds `Vary: Accept-Encoding`. The hooks are in the proxy (the module must be armed
//! before routing): this filter only carries the settings.

use async_trait::async_trait;
use pingora::http::ResponseHeader;
use pingora::protocols::http::compression::Algorithm;
use serde::Deserialize;

use super::{Filter, de};

/// `kind: compression`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionConfig {
    /// Default `[gzip, br, zstd]`.
    #[serde(default = "default_algorithms")]
    algorithms: Vec<String>,
    /// 1–9 (zstd and brotli scale it). Default 6.
    #[serde(default = "default_level")]
    level: u32,
    /// Smallest body worth compressing, when its length is known. Default 1KiB.
    #[serde(default = "default_min_size", deserialize_with = "de::opt_size")]
    min_size: Option<u64>,
    /// Content types compressed (prefix match; `text/` matches every text type).
    #[serde(default = "default_types")]
    content_types: Vec<String>,
}

fn default_algorithms() -> Vec<String> {
    vec!["gzip".into(), "br".into(), "zstd".into()]
}
fn default_level() -> u32 {
    6
}
fn default_min_size() -> Option<u64> {
    Some(1024)
}
fn default_types() -> Vec<String> {
    [
        "text/",
        "application/json",
        "application/javascript",
        "application/xml",
        "application/xhtml+xml",
        "image/svg+xml",
        "application/wasm",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The built filter: settings the proxy applies to Pingora's compression module.
#[derive(Debug)]
pub struct Compression {
    algorithms: Vec<Algorithm>,
    level: u32,
    min_size: u64,
    content_types: Vec<String>,
}

impl Compression {
    /// Build from configuration.
    pub fn new(c: CompressionConfig) -> Result<Compression, String> {
        if !(1..=9).contains(&c.level) {
            return Err(format!("level: {} is not 1-9", c.level));
        }
        let algorithms = c
            .algorithms
            .iter()
            .map(|a| match a.as_str() {
                "gzip" => Ok(Algorithm::Gzip),
                "br" | "brotli" => Ok(Algorithm::Brotli),
                "zstd" => Ok(Algorithm::Zstd),
                other => Err(format!("algorithms: unknown {other:?}; use gzip, br, zstd")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if algorithms.is_empty() {
            return Err("algorithms: list at least one".into());
        }
        Ok(Compression {
            algorithms,
            level: c.level,
            min_size: c.min_size.unwrap_or(0),
            content_types: c
                .content_types
                .iter()
                .map(|t| t.to_ascii_lowercase())
                .collect(),
        })
    }

    /// The (algorithm, level) pairs to apply to `resp`: empty when it should not be compressed.
    pub fn levels_for(&self, resp: &ResponseHeader) -> Vec<(Algorithm, u32)> {
        // As nginx's gzip: whole bodies of 200 and of the two error pages worth it. A `206`
        // part (or any `Content-Range`) compressed would no longer be the range it names.
        if !matches!(resp.status.as_u16(), 200 | 403 | 404) {
            return Vec::new();
        }
        let h = &resp.headers;
        if h.contains_key(http::header::CONTENT_ENCODING)
            || h.contains_key(http::header::CONTENT_RANGE)
        {
            return Vec::new(); // never double-compress, nor a part
        }
        // RFC 9111 §5.2.2.6: a proxy must not transform such a response.
        let no_transform = h.get_all(http::header::CACHE_CONTROL).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|d| d.trim().eq_ignore_ascii_case("no-transform"))
            })
        });
        if no_transform {
            return Vec::new();
        }
        let ctype = h
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
            .unwrap_or_default();
        if !self
            .content_types
            .iter()
            .any(|t| ctype.starts_with(t.as_str()))
        {
            return Vec::new();
        }
        let small = h
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .is_some_and(|len| len < self.min_size);
        if small {
            return Vec::new();
        }
        self.algorithms.iter().map(|a| (*a, self.level)).collect()
    }
}

#[async_trait]
impl Filter for Compression {
    fn compression(&self) -> Option<&Compression> {
        Some(self)
    }
}

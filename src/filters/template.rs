//! Templates with `${variable}` substitution, parsed once at load time.
//!
//! Variables: `${client_ip}`, `${request_id}`, `${route}`, `${host}` (Host without port),
//! `${path}` (path and query), `${scheme}`.

use pingora::http::RequestHeader;

use super::FilterCtx;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    ClientIp,
    RequestId,
    Route,
    Host,
    Path,
    Scheme,
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    /// Parse; unknown variables and unclosed `${` are errors.
    pub fn parse(s: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(start) = rest.find("${") {
            if start > 0 {
                parts.push(Part::Lit(rest[..start].to_string()));
            }
            let end = rest[start..]
                .find('}')
                .ok_or_else(|| format!("unclosed ${{ in {s:?}"))?;
            let var = &rest[start + 2..start + end];
            parts.push(match var {
                "client_ip" => Part::ClientIp,
                "request_id" => Part::RequestId,
                "route" => Part::Route,
                "host" => Part::Host,
                "path" => Part::Path,
                "scheme" => Part::Scheme,
                other => {
                    return Err(format!(
                        "unknown variable ${{{other}}} in {s:?}; use client_ip, request_id, route, host, path or scheme"
                    ));
                }
            });
            rest = &rest[start + end + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_string()));
        }
        Ok(Template { parts })
    }

    /// The literal text, when the template has no variables.
    pub fn literal(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [] => Some(""),
            [Part::Lit(s)] => Some(s),
            _ => None,
        }
    }

    /// Render for a request.
    pub fn render(&self, req: &RequestHeader, cx: &FilterCtx<'_>) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::ClientIp => out.push_str(&cx.client_ip.to_string()),
                Part::RequestId => out.push_str(cx.request_id),
                Part::Route => out.push_str(cx.route),
                Part::Host => {
                    let h = req
                        .headers
                        .get(http::header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or("");
                    out.push_str(&crate::routing::normalize_host(h));
                }
                Part::Path => out.push_str(req.uri.path_and_query().map_or("/", |p| p.as_str())),
                Part::Scheme => out.push_str(if cx.tls { "https" } else { "http" }),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_render() {
        let t = Template::parse("https://${host}${path}").unwrap();
        let mut req = RequestHeader::build("GET", b"/a?b=1", None).unwrap();
        req.insert_header("host", "Example.com:8080").unwrap();
        let mut ext = http::Extensions::new();
        let cx = FilterCtx {
            client_ip: "10.0.0.1".parse().unwrap(),
            request_id: "rid",
            tls: false,
            route: "r1",
            state: &mut ext,
        };
        assert_eq!(t.render(&req, &cx), "https://example.com/a?b=1");
        assert_eq!(
            Template::parse("${route}-${request_id}-${client_ip}")
                .unwrap()
                .render(&req, &cx),
            "r1-rid-10.0.0.1"
        );
        assert_eq!(Template::parse("plain").unwrap().literal(), Some("plain"));
        assert!(
            Template::parse("${nope}")
                .unwrap_err()
                .contains("unknown variable")
        );
        assert!(Template::parse("${host").unwrap_err().contains("unclosed"));
    }
}

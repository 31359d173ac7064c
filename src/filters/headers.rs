//! `headers`: set, add or remove request and response headers. Values may use `${client_ip}`,
//! `${request_id}`, `${route}`, `${host}`, `${path}`, `${scheme}` (see [`super::template`]);
//! CR, LF and NUL are refused at load time.

use std::collections::BTreeMap;

use async_trait::async_trait;
use http::{HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use serde::Deserialize;

use super::template::Template;
use super::{Filter, FilterCtx, Outcome, header_name, header_value};

/// Edits of one side.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Edits {
    /// Replace (or create) these headers.
    #[serde(default)]
    set: BTreeMap<String, String>,
    /// Add these values (keeping existing ones).
    #[serde(default)]
    add: BTreeMap<String, String>,
    /// Remove these headers.
    #[serde(default)]
    remove: Vec<String>,
}

/// `kind: headers`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadersConfig {
    /// Edits of the request sent upstream.
    #[serde(default)]
    request: Edits,
    /// Edits of the response sent to the client.
    #[serde(default)]
    response: Edits,
}

#[derive(Debug)]
enum Value {
    Fixed(HeaderValue),
    Template(Template),
}

#[derive(Debug, Default)]
struct Compiled {
    set: Vec<(HeaderName, Value)>,
    add: Vec<(HeaderName, Value)>,
    remove: Vec<HeaderName>,
}

/// A name the filter may edit: not a framing field (the gateway frames messages itself, and
/// a request's framing is fixed by what the client sent).
fn editable(n: &str) -> Result<HeaderName, String> {
    let name = header_name(n)?;
    if name == http::header::CONTENT_LENGTH || name == http::header::TRANSFER_ENCODING {
        return Err(format!(
            "{name} is the gateway's to set (message framing), not a filter's"
        ));
    }
    Ok(name)
}

fn compile(e: &Edits, side: &str) -> Result<Compiled, String> {
    let values =
        |m: &BTreeMap<String, String>, op: &str| -> Result<Vec<(HeaderName, Value)>, String> {
            m.iter()
                .map(|(n, v)| {
                    let name = editable(n).map_err(|e| format!("{side}.{op}: {e}"))?;
                    let t = Template::parse(v).map_err(|e| format!("{side}.{op}.{n}: {e}"))?;
                    let value = match t.literal() {
                        Some(lit) => Value::Fixed(
                            header_value(lit).map_err(|e| format!("{side}.{op}.{n}: {e}"))?,
                        ),
                        None => {
                            header_value(v).map_err(|e| format!("{side}.{op}.{n}: {e}"))?;
                            Value::Template(t)
                        }
                    };
                    Ok((name, value))
                })
                .collect()
        };
    Ok(Compiled {
        set: values(&e.set, "set")?,
        add: values(&e.add, "add")?,
        remove: e
            .remove
            .iter()
            .map(|n| editable(n).map_err(|e| format!("{side}.remove: {e}")))
            .collect::<Result<_, _>>()?,
    })
}

/// The built filter.
#[derive(Debug)]
pub struct Headers {
    request: Compiled,
    response: Compiled,
}

impl Headers {
    /// Build from configuration.
    pub fn new(c: HeadersConfig) -> Result<Headers, String> {
        Ok(Headers {
            request: compile(&c.request, "request")?,
            response: compile(&c.response, "response")?,
        })
    }
}

fn render(v: &Value, req: &RequestHeader, cx: &FilterCtx<'_>) -> Option<HeaderValue> {
    match v {
        Value::Fixed(h) => Some(h.clone()),
        // Substituted values come from the request (already valid header bytes) or the gateway.
        Value::Template(t) => HeaderValue::from_str(&t.render(req, cx)).ok(),
    }
}

#[async_trait]
impl Filter for Headers {
    async fn on_request(&self, req: &mut RequestHeader, cx: &mut FilterCtx<'_>) -> Outcome {
        for n in &self.request.remove {
            req.remove_header(n);
        }
        for (n, v) in &self.request.set {
            if let Some(v) = render(v, req, cx) {
                let _ = req.insert_header(n.clone(), v);
            }
        }
        for (n, v) in &self.request.add {
            if let Some(v) = render(v, req, cx) {
                let _ = req.append_header(n.clone(), v);
            }
        }
        // Response templates may use request values: render them now, apply them later.
        if self
            .response
            .set
            .iter()
            .chain(&self.response.add)
            .any(|(_, v)| matches!(v, Value::Template(_)))
        {
            let rendered: Vec<Option<HeaderValue>> = self
                .response
                .set
                .iter()
                .chain(&self.response.add)
                .map(|(_, v)| render(v, req, cx))
                .collect();
            let mut all = cx.state.remove::<RenderedResponse>().unwrap_or_default();
            all.0.insert(self.id(), rendered);
            cx.state.insert(all);
        }
        Outcome::Continue
    }

    fn on_response(&self, resp: &mut ResponseHeader, cx: &mut FilterCtx<'_>) {
        let rendered = cx
            .state
            .get::<RenderedResponse>()
            .and_then(|r| r.0.get(&self.id()).cloned());
        let value = |i: usize, v: &Value| match (&rendered, v) {
            (_, Value::Fixed(h)) => Some(h.clone()),
            (Some(r), Value::Template(_)) => r.get(i).cloned().flatten(),
            (None, Value::Template(_)) => None,
        };
        for n in &self.response.remove {
            resp.remove_header(n);
        }
        let sets = self.response.set.len();
        for (i, (n, v)) in self.response.set.iter().enumerate() {
            if let Some(v) = value(i, v) {
                let _ = resp.insert_header(n.clone(), v);
            }
        }
        for (i, (n, v)) in self.response.add.iter().enumerate() {
            if let Some(v) = value(sets + i, v) {
                let _ = resp.append_header(n.clone(), v);
            }
        }
    }
}

/// Response values rendered at request time, per `headers` filter (a route may have several).
#[derive(Clone, Default)]
struct RenderedResponse(std::collections::HashMap<usize, Vec<Option<HeaderValue>>>);

impl Headers {
    fn id(&self) -> usize {
        self as *const Headers as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edits(side: &str, op: &str, name: &str) -> HeadersConfig {
        let one = |n: &str| Edits {
            set: if op == "set" {
                [(n.to_string(), "1".to_string())].into()
            } else {
                BTreeMap::new()
            },
            add: if op == "add" {
                [(n.to_string(), "1".to_string())].into()
            } else {
                BTreeMap::new()
            },
            remove: if op == "remove" {
                vec![n.to_string()]
            } else {
                Vec::new()
            },
        };
        HeadersConfig {
            request: if side == "request" {
                one(name)
            } else {
                Edits::default()
            },
            response: if side == "response" {
                one(name)
            } else {
                Edits::default()
            },
        }
    }

    #[test]
    fn framing_fields_are_not_a_filters_to_edit() {
        // A request filter changing them would make Pingora frame the body differently from
        // what the client sent (and the connection guard judged): smuggling.
        for side in ["request", "response"] {
            for op in ["set", "add", "remove"] {
                for name in ["content-length", "Transfer-Encoding"] {
                    let e = Headers::new(edits(side, op, name)).unwrap_err();
                    assert!(
                        e.starts_with(&format!("{side}.{op}: ")) && e.contains("message framing"),
                        "{e}"
                    );
                }
            }
        }
        assert!(Headers::new(edits("request", "set", "x-ok")).is_ok());
    }
}

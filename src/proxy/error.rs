//! Error responses: one mapping from a Pingora error to a status, and one writer for the small
//! JSON body every error carries: `{"error":"...","request_id":"..."}`.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::{ErrorSource, ErrorType};

/// The status for an error that ended a request; `0` means no response can be sent
/// (the client went away).
pub fn status_for(e: &Error) -> u16 {
    match e.etype() {
        ErrorType::HTTPStatus(code) => *code,
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
            if e.esource() == &ErrorSource::Upstream =>
        {
            504
        }
        _ => match e.esource() {
            ErrorSource::Upstream => 502,
            ErrorSource::Downstream => match e.etype() {
                ErrorType::ReadTimedout => 408,
                // The connection guard's floor on a body's pace (`server.min_body_rate`).
                ErrorType::ReadError if body_too_slow(e) => 408,
                ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed => 0,
                _ => 400,
            },
            ErrorSource::Internal | ErrorSource::Unset => 500,
        },
    }
}

/// A body read failed for being slower than `server.min_body_rate`.
fn body_too_slow(e: &Error) -> bool {
    e.root_cause()
        .downcast_ref::<std::io::Error>()
        .is_some_and(|io| {
            io.kind() == std::io::ErrorKind::TimedOut
                && io.to_string() == crate::wire::stream::BODY_TOO_SLOW
        })
}

/// The human message for a status.
pub fn message_for(status: u16) -> &'static str {
    match status {
        400 => "bad request",
        404 => "no route matches this request",
        405 => "method not allowed on this route",
        408 => "request timed out",
        413 => "request body too large",
        429 => "too many requests",
        502 => "upstream unavailable",
        503 => "no upstream backend available",
        504 => "upstream timed out",
        _ => "request failed",
    }
}

/// The JSON error body.
pub fn json_body(message: &str, request_id: &str) -> Bytes {
    let mut s = String::with_capacity(40 + message.len() + request_id.len());
    s.push_str("{\"error\":");
    push_json_str(&mut s, message);
    s.push_str(",\"request_id\":");
    push_json_str(&mut s, request_id);
    s.push('}');
    Bytes::from(s)
}

fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Write a complete JSON error response with the status's standard message. `extra` headers
/// (e.g. `Allow`) are added.
pub async fn respond(
    session: &mut Session,
    status: u16,
    request_id: &str,
    extra: &[(&'static str, &str)],
) -> Result<()> {
    respond_with(session, status, message_for(status), request_id, extra).await
}

/// Before answering a request whose body is not read yet (a refusal, a filter's reply):
/// Pingora would close at once, and a close with the client's bytes unread resets the
/// connection, which can destroy the answer before the client reads it. Read past the rest
/// instead, for a bounded time, as nginx's lingering close does: a small body is read past and
/// the connection kept; one still coming after [`LINGER`](crate::wire::stream::LINGER) (a
/// 10 GB upload refused with 401) ends it. No effect once keep-alive is off.
pub fn linger_past_body(session: &mut Session) {
    if !session.is_body_done() {
        let downstream = session.as_downstream_mut();
        downstream.set_close_on_response_before_downstream_finish(false);
        downstream.set_total_drain_timeout(Some(crate::wire::stream::LINGER));
    }
}

/// [`respond`] with a specific message.
pub async fn respond_with(
    session: &mut Session,
    status: u16,
    message: &str,
    request_id: &str,
    extra: &[(&'static str, &str)],
) -> Result<()> {
    linger_past_body(session);
    let body = json_body(message, request_id);
    let mut h = ResponseHeader::build(status, Some(4 + extra.len()))?;
    h.insert_header(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    )?;
    h.insert_header("content-length", body.len().to_string())?;
    h.insert_header("x-request-id", request_id)?;
    for (k, v) in extra {
        h.insert_header(*k, *v)?;
    }
    session.write_response_header(Box::new(h), false).await?;
    session.write_response_body(Some(body), true).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_errors_to_statuses() {
        let up = |t| {
            let mut e = Error::new(t);
            e.esource = ErrorSource::Upstream;
            e
        };
        assert_eq!(status_for(&up(ErrorType::ConnectRefused)), 502);
        assert_eq!(status_for(&up(ErrorType::ConnectTimedout)), 504);
        assert_eq!(status_for(&up(ErrorType::ReadTimedout)), 504);
        assert_eq!(status_for(&Error::new(ErrorType::HTTPStatus(413))), 413);
        let mut down = Error::new(ErrorType::ConnectionClosed);
        down.esource = ErrorSource::Downstream;
        assert_eq!(status_for(&down), 0);
        let mut slow = Error::new(ErrorType::ReadTimedout);
        slow.esource = ErrorSource::Downstream;
        assert_eq!(status_for(&slow), 408);
    }

    #[test]
    fn body_is_escaped_json() {
        assert_eq!(
            json_body("a \"b\"\n", "id\\1"),
            r#"{"error":"a \"b\"\u000a","request_id":"id\\1"}"#
        );
    }
}

//! Running filters from the `ProxyHttp` phases: global filters first, then the route's; response
//! hooks in reverse. A filter's [`Reply`] is written here.

use std::sync::Arc;

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;

use super::{RequestCtx, error};
use crate::filters::{Filter, FilterCtx, Outcome, Reply};
use crate::runtime::RuntimeState;

/// The filters that apply to a request on `route` of `state`: global, then the route's.
/// Borrowed from the snapshot (not from the request context, which the filters then get
/// mutably), so running them collects nothing per request or per body chunk.
fn chain(
    state: &RuntimeState,
    route: Option<usize>,
) -> impl DoubleEndedIterator<Item = &Arc<dyn Filter>> {
    let route = route.map_or(&[][..], |i| state.router.route(i).filters.as_slice());
    state.config.filters.iter().chain(route)
}

fn cx<'a>(ctx: &'a mut RequestCtx, route: &'a str) -> FilterCtx<'a> {
    FilterCtx {
        client_ip: ctx
            .client
            .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |c| c.client_ip),
        request_id: &ctx.request_id,
        tls: ctx.tls,
        route,
        state: &mut ctx.filter_state,
    }
}

/// Run `filters` (a slice of the chain) on the request head. `Ok(true)`: a filter answered.
pub async fn request(
    filters: &[Arc<dyn Filter>],
    session: &mut Session,
    ctx: &mut RequestCtx,
    route: &str,
) -> Result<bool> {
    for f in filters {
        let outcome = {
            let mut fcx = cx(ctx, route);
            f.on_request(session.req_header_mut(), &mut fcx).await
        };
        if let Outcome::Respond(reply) = outcome {
            super::error::linger_past_body(session);
            write(session, reply, &ctx.request_id).await?;
            return Ok(true);
        }
    }
    Ok(false)
}

/// Run the body hooks of the whole chain on one chunk; a `Respond` ends the request with its
/// status (the head already went upstream).
pub fn body(
    session_route: &str,
    ctx: &mut RequestCtx,
    chunk: Option<&Bytes>,
    end: bool,
) -> Result<()> {
    let Some(state) = ctx.state.clone() else {
        return Ok(());
    };
    for f in chain(&state, ctx.route) {
        let mut fcx = cx(ctx, session_route);
        if let Outcome::Respond(reply) = f.on_request_body(chunk, end, &mut fcx) {
            return Error::e_explain(
                ErrorType::HTTPStatus(reply.status),
                reply.error.unwrap_or_else(|| "stopped by a filter".into()),
            );
        }
    }
    Ok(())
}

/// Run the response hooks of the whole chain, last filter first.
pub fn response(resp: &mut ResponseHeader, ctx: &mut RequestCtx, route: &str) {
    let Some(state) = ctx.state.clone() else {
        return;
    };
    for f in chain(&state, ctx.route).rev() {
        let mut fcx = cx(ctx, route);
        f.on_response(resp, &mut fcx);
    }
}

/// Write a filter's reply (keep-alive preserved).
pub async fn write(session: &mut Session, reply: Reply, request_id: &str) -> Result<()> {
    if let Some(msg) = &reply.error {
        let mut h = ResponseHeader::build(reply.status, Some(4 + reply.headers.len()))?;
        let body = error::json_body(msg, request_id);
        h.insert_header("content-type", "application/json")?;
        h.insert_header("content-length", body.len().to_string())?;
        h.insert_header(super::request_id::HEADER, request_id)?;
        for (k, v) in reply.headers {
            h.append_header(k, v)?;
        }
        session.write_response_header(Box::new(h), false).await?;
        return session.write_response_body(Some(body), true).await;
    }
    let body = reply.body.unwrap_or_default();
    let mut h = ResponseHeader::build(reply.status, Some(3 + reply.headers.len()))?;
    for (k, v) in reply.headers {
        h.append_header(k, v)?;
    }
    h.insert_header("content-length", body.len().to_string())?;
    h.insert_header(super::request_id::HEADER, request_id)?;
    session
        .write_response_header(Box::new(h), body.is_empty())
        .await?;
    if !body.is_empty() {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// The compression settings that apply to this request: the route's `compression` filter, or
/// else a global one.
pub fn compression(ctx: &RequestCtx) -> Option<&crate::filters::Compression> {
    let state = ctx.state.as_ref()?;
    let route = ctx.route.map(|i| state.router.route(i));
    route
        .into_iter()
        .flat_map(|r| r.filters.iter())
        .chain(state.config.filters.iter())
        .find_map(|f| f.compression())
}

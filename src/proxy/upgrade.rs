//! WebSocket upgrades leave Pingora once the handshake is done (`wire::splice`): which
//! attempts are armed for it, and the request's record deferred to the tunnel's end.

use pingora::proxy::Session;
use pingora::upstreams::peer::{HttpPeer, Scheme};

use super::RequestCtx;
use super::observe;
use crate::config::UpstreamProtocol;
use crate::upstream::Upstream;
use crate::wire::GuardedStream;
use crate::wire::tunnel::{Deferred, Outcome, Timeouts};

/// `upstream_peer`: arm the splice for a WebSocket upgrade from an HTTP/1 client to a
/// plain-HTTP/1 backend. Any other request (and a TLS backend, whose bytes are Pingora's TLS
/// session's) is relayed by Pingora as before.
pub fn arm(session: &Session, upstream: &Upstream, peer: &mut HttpPeer, ctx: &mut RequestCtx) {
    if peer.scheme != Scheme::HTTP
        || peer.proxy.is_some()
        || upstream.config.protocol == UpstreamProtocol::Http2
        || !super::headers::is_websocket_upgrade(session.req_header())
        // A handshake with a body (allowed, never seen in practice) is left to Pingora: the
        // body could still be on its way to the backend when the `101` arrives.
        || ctx.body
    {
        return;
    }
    if let Some(guard) = session.as_downstream().stream().and_then(GuardedStream::of) {
        guard.splice().arm_peer(peer);
        ctx.splice_armed = true;
    }
}

/// `logging`: if the connection was spliced, hand the request's context to the tunnel, which
/// records it (metrics, access log) and releases its in-flight counts when it ends.
pub fn defer(session: &Session, ctx: &mut RequestCtx) -> bool {
    if !ctx.splice_armed {
        return false;
    }
    let Some(guard) = session.as_downstream().stream().and_then(GuardedStream::of) else {
        return false;
    };
    let splice = guard.splice();
    if !splice.settle() {
        return false;
    }
    // A spliced request always chose a backend on a snapshot; the fallback is Pingora's own
    // per-read default.
    let fallback = std::time::Duration::from_secs(60);
    let (read, write) = ctx.upstream.as_ref().map_or((fallback, fallback), |u| {
        (u.config.read_timeout, u.config.write_timeout)
    });
    let (body_idle, send) = ctx.state.as_ref().map_or((fallback, fallback), |s| {
        let c = &s.config.server.connections;
        (c.body_idle_timeout, c.send_timeout)
    });
    let timeouts = Timeouts {
        idle: read.min(body_idle),
        to_client: send,
        to_backend: write,
    };
    let status = session
        .response_written()
        .map_or(101, |r| r.status.as_u16());
    let req = Box::new(session.req_header().clone());
    let ctx = std::mem::take(ctx);
    splice.defer(Deferred {
        timeouts,
        record: Box::new(move |o: &Outcome| {
            let bytes = (o.bytes_in as usize, o.bytes_out as usize);
            let e = o.error.as_ref().map(|e| e as _);
            observe::record(&req, status, bytes, e, &ctx);
        }),
    });
    true
}

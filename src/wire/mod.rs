//! The client connection below HTTP: who may connect, and what reaches Pingora's parser.
//!
//! Every accepted connection passes [`admission`] (the global and per-client-address caps);
//! every HTTP/1 connection is then read through a [`stream::GuardedStream`], which judges the
//! request byte stream with the strict [`framing::Framing`] reader, holds heads back until they
//! are valid, and enforces the head deadline. HTTP/2 (ALPN `h2`) goes to Pingora directly: its
//! framing is the h2 crate's, and its limits are `server.http2`. Between requests an HTTP/1
//! connection waits in its guard rather than in Pingora's parser ([`idle`]), so an idle
//! connection holds none of Pingora's per-request state.
//!
//! An HTTP/1 connection upgraded to a WebSocket on a plain-HTTP backend leaves Pingora once
//! the handshake is done: [`splice`] joins the two sockets, and [`tunnel`] relays them.

pub mod admission;
pub mod framing;
pub mod idle;
pub mod splice;
pub mod stream;
pub mod tunnel;

pub use admission::{Admission, Guarded};
pub use stream::GuardedStream;

//! The bare Pingora proxy (`bare_proxy.rs`, unchanged) with mimalloc as its allocator, as
//! tollgate has: the baseline with the allocator held equal, so that a comparison with tollgate
//! shows what tollgate's own work costs (`make bench`, docs/performance.md).
//!
//! ```text
//! UPSTREAMS=127.0.0.1:9001 LISTEN=127.0.0.1:9100 cargo run --release --example bare_proxy_mimalloc -- -c pingora.yaml
//! ```

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "bare_proxy.rs"]
mod bare;

fn main() {
    bare::main();
}

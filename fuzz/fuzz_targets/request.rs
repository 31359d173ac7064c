//! Raw bytes as an HTTP/1 request (optionally followed by `RESPONSE_MARKER` and an upstream
//! response head) through Pingora's parser and the gateway's phases and filter chain
//! (`tollgate::fuzzing::request`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tollgate::fuzzing::request(data));

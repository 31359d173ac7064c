//! Request byte streams through the connection guard's HTTP/1 reader: the same verdict however
//! the bytes are split, and heads it accepts are heads httparse accepts
//! (`tollgate::fuzzing::framing`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tollgate::fuzzing::framing(data));

//! Request paths through `routing::normalize_path`, checked against a byte-level model and
//! for absolute, idempotent output without empty or dot segments
//! (`tollgate::fuzzing::normalize_path`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tollgate::fuzzing::normalize_path(data));

//! Arbitrary bytes as a configuration file, through what `tollgate -t` runs: `Ok`, or errors
//! that each name a key path or a line, never a panic (`tollgate::fuzzing::config`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tollgate::fuzzing::config(data));

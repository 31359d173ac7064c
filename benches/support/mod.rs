//! Shared by the micro-benchmarks: an allocation-counting global allocator and a helper that
//! prints allocations per operation next to criterion's time per operation.
//!
//! The crate forbids `unsafe`, so the counting allocator is `stats_alloc`'s instrumented
//! `System` (glibc) allocator, where the gateway binary uses mimalloc: allocation *counts* do
//! not depend on the allocator, but the timings of paths that allocate are glibc's.
//!
//! Each bench binary uses only some of these helpers.
#![allow(dead_code)]

pub mod fixtures;

use std::alloc::System;

use criterion::Criterion;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Operations averaged over when counting allocations.
const COUNTED_OPS: usize = 10_000;

/// Allocations per call of `op`, averaged over `COUNTED_OPS` calls after one warm-up call.
pub fn allocations_per_op<R>(mut op: impl FnMut() -> R) -> f64 {
    drop(op());
    let region = Region::new(GLOBAL);
    for _ in 0..COUNTED_OPS {
        drop(std::hint::black_box(op()));
    }
    region.change().allocations as f64 / COUNTED_OPS as f64
}

/// Allocations per call of `op` on an input made by `setup` (whose own allocations are not
/// counted).
pub fn allocations_per_op_with<I, R>(
    mut setup: impl FnMut() -> I,
    mut op: impl FnMut(I) -> R,
) -> f64 {
    drop(op(setup()));
    let mut total = 0;
    for _ in 0..COUNTED_OPS {
        let input = setup();
        let region = Region::new(GLOBAL);
        let out = std::hint::black_box(op(input));
        total += region.change().allocations;
        drop(out);
    }
    total as f64 / COUNTED_OPS as f64
}

/// Print the allocation count of `op`, then benchmark it as `name`.
pub fn bench<R>(c: &mut Criterion, name: &str, mut op: impl FnMut() -> R) {
    let allocs = allocations_per_op(&mut op);
    println!("{name:<48} allocations/op: {allocs:.2}");
    c.bench_function(name, |b| b.iter(&mut op));
}

/// [`bench`] for an operation that consumes a fresh input from `setup` on every call.
pub fn bench_with<I, R>(
    c: &mut Criterion,
    name: &str,
    mut setup: impl FnMut() -> I,
    mut op: impl FnMut(I) -> R,
) {
    let allocs = allocations_per_op_with(&mut setup, &mut op);
    println!("{name:<48} allocations/op: {allocs:.2}");
    c.bench_function(name, |b| {
        b.iter_batched(&mut setup, &mut op, criterion::BatchSize::SmallInput)
    });
}

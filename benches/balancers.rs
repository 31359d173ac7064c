//! Balancer selection: each algorithm alone (`select/…`, the figure comparable with the Go
//! gateway's) and through `Upstream::pick` (`pick/…`), which adds what a real request pays:
//! the member-set snapshot, health, the circuit breaker's admission and the in-flight cap.
//!
//! `cargo bench --bench balancers`; allocations per operation are printed before each timing.

mod support;

use support::fixtures::{ALGORITHMS, addrs, upstream, weights};

use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use tollgate::upstream::select::{self, Select};

const SIZES: [usize; 2] = [3, 100];

/// Consistent-hash keys as the gateway hashes them: client addresses, as text.
fn keys() -> Vec<Vec<u8>> {
    (0..1024u32)
        .map(|i| format!("198.51.{}.{}", i / 250, i % 250 + 1).into_bytes())
        .collect()
}

fn selectors(c: &mut Criterion) {
    let keys = keys();
    for n in SIZES {
        let load: Vec<AtomicUsize> = (0..n).map(|i| AtomicUsize::new(i % 7)).collect();
        let load = |i: usize| load[i].load(Ordering::Relaxed);
        for (name, balance) in ALGORITHMS {
            let s: Box<dyn Select> = select::build(balance, &weights(n), &addrs(n));
            let mut k = 0;
            support::bench(c, &format!("select/{name}/{n}"), || {
                k = (k + 1) & 1023;
                s.select(black_box(&keys[k]), &load, &|_| true)
            });
        }
    }
}

fn picks(c: &mut Criterion) {
    let keys = keys();
    for n in SIZES {
        for (name, _) in ALGORITHMS {
            let up = upstream(name, n);
            let mut k = 0;
            support::bench(c, &format!("pick/{name}/{n}"), || {
                k = (k + 1) & 1023;
                up.pick(black_box(&keys[k]), &[], Instant::now())
                    .map(|p| p.backend.addr)
                    .ok()
            });
        }
    }
}

criterion_group!(benches, selectors, picks);
criterion_main!(benches);

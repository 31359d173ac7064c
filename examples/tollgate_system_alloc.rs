//! `tollgate` on the system allocator (glibc malloc) instead of mimalloc, for heap profilers
//! that intercept malloc (`heaptrack`; docs/performance.md has how it was used).

fn main() -> std::process::ExitCode {
    tollgate::cli::main()
}

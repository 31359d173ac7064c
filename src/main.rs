//! The `tollgate` binary: parse the command line, load the configuration, run.
//! Everything else lives in the library.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // mimalloc commits its arenas eagerly; where transparent huge pages are `always` (Debian's
    // default), each first touch then faults in 2 MiB, and 10,000 WebSockets took 2 GB of RSS
    // instead of ~0.7 (docs/performance.md). Before any thread starts, so it covers them all.
    let _ = nix::sys::prctl::set_thp_disable(true);
    tollgate::cli::main()
}

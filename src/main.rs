//! The `tollgate` binary: parse the command line, load the configuration, run.
//! Everything else lives in the library.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // mimalloc commits its arenas eagerly and they end up on transparent huge pages (with THP
    // `madvise`, as here, as well as `always`): a sparsely used 2 MiB page is resident whole,
    // and 10,000 WebSockets took 2 GB of RSS instead of 0.7 (docs/performance.md). The flag
    // is the process's and is set before any thread starts.
    let _ = nix::sys::prctl::set_thp_disable(true);
    tollgate::cli::main()
}

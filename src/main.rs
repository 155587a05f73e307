use std::process::ExitCode;

use clap::Parser;

// Folding millions of events allocates and frees small strings by the million; glibc's
// allocator spent a third of a replay in its free lists (seen with perf), mimalloc does not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match contimg::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return contimg::cli::usage_error(e),
    };
    contimg::cli::run(cli)
}

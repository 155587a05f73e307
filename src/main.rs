use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = contimg::cli::Cli::parse();
    contimg::cli::run(cli)
}

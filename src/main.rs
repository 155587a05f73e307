use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = match contimg::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return contimg::cli::usage_error(e),
    };
    contimg::cli::run(cli)
}

//! The `trialmatch` binary: parses arguments and hands over to [`trialmatch::cli`].

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = trialmatch::cli::Cli::parse();
    trialmatch::cli::main(args)
}

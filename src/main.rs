use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "mcpbox", version, about = "Run stdio MCP servers in a Linux sandbox and serve them over HTTP")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Hidden: the single-threaded sandbox builder, started by mcpbox itself.
    #[command(hide = true)]
    SandboxInit {
        #[arg(long)]
        spec_fd: i32,
        #[arg(long)]
        report_fd: i32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::SandboxInit { .. } => ExitCode::FAILURE,
    }
}

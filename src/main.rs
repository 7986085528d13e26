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
    /// Serve the servers of a config file over SSE and Streamable HTTP.
    Serve(mcpbox::serve::ServeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::SandboxInit { .. } => ExitCode::FAILURE,
        // The tokio runtime is built inside: sandbox-init above must run before any thread.
        Cmd::Serve(args) => mcpbox::serve::main(args),
    }
}

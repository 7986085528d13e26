use std::process::ExitCode;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "mcpbox", version, about = "Run stdio MCP servers in a Linux sandbox and serve them over HTTP")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Work with policies.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Hidden: the single-threaded sandbox builder, started by mcpbox itself.
    #[command(hide = true)]
    SandboxInit {
        #[arg(long)]
        spec_fd: i32,
        #[arg(long)]
        report_fd: i32,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Validate a policy (file or shipped name) and print the effective policy.
    Check {
        /// Policy file (a path) or shipped/user policy name.
        file: String,
        /// What ${DATA} expands to (default: a placeholder; paths under it are not checked if it does not exist).
        #[arg(long)]
        data: Option<PathBuf>,
        /// What ${CACHE} expands to (default: a placeholder, as for --data).
        #[arg(long)]
        cache: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::SandboxInit { .. } => ExitCode::FAILURE,
        Cmd::Policy { cmd: PolicyCmd::Check { file, data, cache } } => {
            match mcpbox::policy::check(&file, data.as_deref(), cache.as_deref()) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("mcpbox: policy check {file}: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

#![deny(clippy::undocumented_unsafe_blocks)]
//! mcpbox: run stdio MCP servers in a native Linux sandbox and serve them over HTTP.

// The sandbox is Linux's (namespaces, Landlock, cgroups) and its seccomp filter is written for
// the x86_64 syscall table and audit architecture: nothing else would be confined as designed.
#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
compile_error!(
    "mcpbox supports x86_64 Linux only (Linux namespaces, Landlock and a seccomp filter written for the x86_64 \
     syscall table); build it for x86_64-unknown-linux-gnu"
);

pub mod bridge;
pub mod budget;
pub mod cli_doctor;
pub mod cli_learn;
pub mod cli_policy;
pub mod cli_run;
pub mod config;
pub mod denials;
pub mod http;
pub mod learn;
pub mod netproxy;
pub mod plan;
pub mod policy;
pub mod sandbox;
pub mod serve;
pub mod supervisor;
pub mod urlbridge;

/// The one tokio runtime set-up of mcpbox's modes: multi-threaded for `serve`, one thread for
/// `prepare` and `url-bridge`. Called after `main` has let the hidden sandbox-init mode run
/// (it must start before any thread exists). On failure it says so on stderr and returns the
/// exit code to leave with.
pub fn runtime(mode: &str, multi_thread: bool) -> Result<tokio::runtime::Runtime, std::process::ExitCode> {
    let mut b = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    b.enable_all().build().map_err(|e| {
        eprintln!("mcpbox {mode}: cannot start the tokio runtime: {e}");
        std::process::ExitCode::FAILURE
    })
}

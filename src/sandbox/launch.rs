//! Starting `sandbox-init` from the supervisor side. No privileged work happens here: this file
//! builds a `Command` for our own binary in its hidden mode, hands it the spec on an inherited
//! memfd, and reads back the start report (or the setup error) from a close-on-exec pipe.

use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::SandboxSpec;
use crate::policy::Level;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot start sandbox-init: {0}")]
    Spawn(#[source] std::io::Error),
    /// Setup failed inside sandbox-init; the message names the layer and the fix.
    #[error("sandbox setup failed: {0}")]
    Setup(String),
    #[error("sandbox-init exited before the server started (status {0})")]
    Died(String),
    #[error("the sandbox spawner thread is gone")]
    SpawnerGone,
}

/// What sandbox-init reports once the server is about to `execve`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartReport {
    pub level: Level,
    /// Landlock ABI actually enforced (0: none).
    pub landlock_abi: u8,
    /// Every weakening, one sentence each; logged by the caller at every start.
    pub warnings: Vec<String>,
    /// How limits are enforced: "cgroup v2", "cgroup v1", "rlimit".
    pub limits: String,
    /// cgroup directories to remove after the sandbox exits.
    pub cgroups: Vec<std::path::PathBuf>,
    /// Host uid the server runs as.
    pub host_uid: u32,
    #[serde(skip)]
    pub start_latency: Duration,
}

/// A running sandbox started by [`Spawner`].
pub struct Sandboxed {
    /// stdin/stdout/stderr are piped.
    pub child: tokio::process::Child,
    pub report: StartReport,
    /// For network mode `proxy`: the listening socket inside the sandbox's network namespace,
    /// on which the caller serves the egress proxy.
    pub proxy_listener: Option<std::net::TcpListener>,
}

/// Starts sandboxes from one long-lived thread, so that PDEATHSIG (which fires when the parent
/// *thread* exits) only fires when mcpbox itself goes away.
#[derive(Clone)]
pub struct Spawner {}

impl Spawner {
    /// Must be called inside a tokio runtime.
    pub fn new() -> Self {
        todo!()
    }

    pub async fn spawn(&self, spec: SandboxSpec) -> Result<Sandboxed, SandboxError> {
        let _ = spec;
        todo!()
    }
}

/// For `mcpbox run`: spawn from the calling (main) thread with the given stdio.
pub fn spawn_blocking_std(
    spec: &SandboxSpec,
    stdin: Stdio,
    stdout: Stdio,
    stderr: Stdio,
) -> Result<(std::process::Child, StartReport, Option<std::net::TcpListener>), SandboxError> {
    let _ = (spec, stdin, stdout, stderr);
    todo!()
}

/// Remove what a sandbox leaves on the host after it exited (its cgroup directories).
pub fn cleanup(report: &StartReport) {
    for dir in &report.cgroups {
        let _ = std::fs::remove_dir(dir);
    }
}

//! The only module with `unsafe`: the sandbox-init sequence, namespaces, mounts, credentials,
//! Landlock, seccomp, limits, and the host probe behind `mcpbox doctor`.

mod init;
mod landlock;
mod limits;
mod mounts;
pub mod probe;
pub mod seccomp;
mod sys;
pub mod spec;

pub use spec::{Access, Grant, Link, SandboxSpec};

mod launch;
pub use launch::{cleanup, spawn_blocking_std, SandboxError, Sandboxed, Spawner, StartReport};
pub use init::{main as sandbox_init_main, Msg, PROXY_PORT};

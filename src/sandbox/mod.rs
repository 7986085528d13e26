//! The only module with `unsafe`: the sandbox-init sequence, namespaces, mounts, credentials,
//! Landlock, seccomp, limits, and the host probe behind `mcpbox doctor`.

pub mod seccomp;
pub mod spec;

pub use spec::{Access, Grant, Link, SandboxSpec};

mod launch;
pub use launch::{spawn_blocking_std, SandboxError, Sandboxed, Spawner, StartReport};

//! The only module with `unsafe`: the sandbox-init sequence, namespaces, mounts, credentials,
//! Landlock, seccomp, limits, and the host probe behind `mcpbox doctor`.

pub mod audit;
mod disk;
mod init;
mod landlock;
mod limits;
mod mounts;
mod notify;
pub mod probe;
pub mod seccomp;
pub mod spec;
mod sys;

pub use limits::Layout as CgroupLayout;
pub use limits::{memory_own, set_cpu_weight};
pub use spec::{Access, DiskImage, Grant, Link, Msg, OuterSpec, SandboxSpec, StartReport};

/// The host's cgroup layout (read once per process), for [`SandboxSpec::cgroup_layout`].
pub fn cgroup_layout() -> CgroupLayout {
    limits::layout()
}

mod launch;
pub use init::{forwarded as forwarded_signals, main as sandbox_init_main, PROXY_PORT};
pub use launch::{spawn_blocking_std, InitProcess, Pending, SandboxError, Sandboxed, Spawner};
pub use sys::{keep_on_fatal_signal, process_start, remove_files_on_fatal_signals, remove_on_fatal_signal};

/// Clean up cgroups of sandboxes whose supervisor died without cleaning up (root only; a no-op
/// otherwise). Called when `serve` starts.
pub fn sweep_stale_cgroups() -> usize {
    if !nix::unistd::geteuid().is_root() {
        return 0;
    }
    limits::sweep_stale("mcpbox")
}

/// Beside a running sandbox (`run`, once its server is up): remove the free extra slots of its
/// own server, without listing the cgroup parent or reading the mount table. Directories of
/// other servers and of older versions are left to `serve`'s [`sweep_stale_cgroups`].
pub fn sweep_extra_slots_beside(report: &StartReport) -> usize {
    limits::sweep_extra_slots(&report.cgroups)
}

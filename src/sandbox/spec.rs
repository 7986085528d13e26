//! What `sandbox-init` receives on its inherited fd: everything it needs, decided before the fork.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::policy::{Level, Limits, Network};

/// A mount/Landlock grant, after symlinks were resolved by the supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Canonical path on the host (symlinks resolved).
    pub path: PathBuf,
    pub access: Access,
    /// Directory (true) or file.
    pub dir: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// List directories only (the sandbox's own root at full level).
    List,
    Read,
    Exec,
    Write,
}

/// A symlink recreated inside the sandbox root (e.g. `/lib64 -> usr/lib64` on merged-/usr hosts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub path: PathBuf,
    pub target: PathBuf,
}

/// The complete, self-contained description of one sandboxed process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// Server name (hostname inside, cgroup name, logs).
    pub name: String,
    /// argv[0] must be an absolute path inside the sandbox.
    pub argv: Vec<String>,
    /// The whole environment of the server; nothing else is passed.
    pub env: BTreeMap<String, String>,
    pub cwd: PathBuf,
    /// A private host directory used as TMPDIR at container level (at full level /tmp is a
    /// private tmpfs).
    pub tmp_dir: PathBuf,
    pub grants: Vec<Grant>,
    pub links: Vec<Link>,
    pub network: Network,
    pub limits: Limits,
    /// Syscall names denied on top of the default allow-list.
    pub seccomp_extra_deny: Vec<String>,
    pub seccomp_extra_allow: Vec<String>,
    pub min_level: Level,
    pub landlock_min_abi: u8,
    /// Host uid/gid the server runs as when mcpbox is root (None when rootless: the caller's own).
    pub host_ids: Option<(u32, u32)>,
    /// uid/gid the server sees inside its user namespace.
    pub inner_uid: u32,
    pub inner_gid: u32,
    /// pid of the process that spawned sandbox-init (PDEATHSIG race check).
    pub parent_pid: i32,
    /// cgroup v1/v2 parent under which the sandbox's cgroups are (root only).
    pub cgroup_parent: String,
    /// Where the host mounts its cgroup controllers, as mcpbox found them (root only; read by
    /// sandbox-init itself when absent).
    #[serde(default)]
    pub cgroup_layout: Option<super::CgroupLayout>,
}

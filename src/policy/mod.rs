//! Policy types, TOML parsing, `extends`, validation, and the grammars a policy is written in:
//! `[network] allow` entries and `host[:port]` (`allow.rs`), `${VAR}` (`vars.rs`), syscall
//! names (`syscalls.rs`, a table kept as data).
//!
//! The lowest layer: it imports nothing else of mcpbox and no kernel crate (no Landlock, no
//! seccomp). It turns TOML written by people into a validated [`Policy`]; `crate::sandbox`
//! translates that into kernel objects, and everything that judges a policy (`policy check`,
//! `serve --check`, `/readyz`, a launch) refuses what this module refuses.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

mod allow;
mod diff;
mod error;
mod load;
mod raw;
mod reference;
mod render;
mod size;
pub mod syscalls;
#[cfg(test)]
mod tests;
mod vars;

pub use allow::{parse_host, split_host_port, AllowEntry, AllowEntryError, AuthorityError, Host, HostPattern};
pub use diff::{diff, path_covered, render_diff, Grant, PolicyDiff};
pub use error::{Loc, PolicyError};
pub use load::{
    load, load_detailed, load_inline, load_inline_detailed, load_inline_with_notes, load_with_notes, search_dirs,
    shipped_names, LazyVars, LoadContext, Loaded, DEFAULT_LANDLOCK_MIN_ABI, DEFAULT_LEVEL, DEFAULT_LIMITS,
    DEFAULT_NETWORK_MODE, SHIPPED,
};
pub use reference::PolicyRef;
pub use render::{check, check_with, render};
pub use size::{format_cpu, format_size, parse_cpu, parse_size};
pub use vars::{expand_vars, ExpandError};

/// A validated, fully resolved policy: `extends` merged, `${…}` expanded, paths absolute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Where the policy came from (shipped name or file path), for messages.
    pub source: String,
    pub filesystem: Filesystem,
    pub network: Network,
    pub env: Env,
    pub limits: Limits,
    pub seccomp: Seccomp,
    pub sandbox: SandboxReq,
    #[serde(default)]
    pub runtime: RuntimeFlags,
}

/// `[runtime]`: how the server's interpreter is started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeFlags {
    /// Put on node's command line, before the script, when the server's command is node (V8
    /// flags that `NODE_OPTIONS` does not take, such as `--lite-mode`). Names of
    /// [`NODE_FLAGS`] only.
    pub node_flags: Vec<String>,
}

/// The flags `[runtime] node_flags` may hold: memory and compiler settings of V8 and Node, none
/// that loads code or opens anything (`--require`, `--import`, `--inspect` and the like are not
/// here). `true`: takes a value, `--NAME=DIGITS`.
pub const NODE_FLAGS: &[(&str, bool)] = &[
    ("lite-mode", false),
    ("optimize-for-size", false),
    ("jitless", false),
    ("max-lazy", false),
    ("lazy-feedback-allocation", false),
    ("no-opt", false),
    ("no-sparkplug", false),
    ("no-maglev", false),
    ("single-threaded", false),
    ("single-threaded-gc", false),
    ("v8-pool-size", true),
    ("max-semi-space-size", true),
    ("min-semi-space-size", true),
    ("max-old-space-size", true),
];

/// Why `flag` cannot be one of `[runtime] node_flags`, if it cannot.
pub fn check_node_flag(flag: &str) -> Result<(), String> {
    let known = || NODE_FLAGS.iter().map(|(n, v)| format!("--{n}{}", if *v { "=N" } else { "" })).collect::<Vec<_>>();
    let (name, value) =
        match flag.strip_prefix("--").map(|f| f.split_once('=').map_or((f, None), |(n, v)| (n, Some(v)))) {
            Some(nv) => nv,
            None => return Err(format!("[runtime] node_flags: `{flag}` is not a flag (--NAME or --NAME=N)")),
        };
    match (NODE_FLAGS.iter().find(|(n, _)| *n == name), value) {
        (None, _) => Err(format!(
            "[runtime] node_flags: `{flag}` is not one mcpbox passes (only memory and compiler settings: {})",
            known().join(", ")
        )),
        (Some((_, false)), None) => Ok(()),
        (Some((_, true)), Some(v)) if !v.is_empty() && v.len() <= 9 && v.bytes().all(|b| b.is_ascii_digit()) => Ok(()),
        (Some((_, true)), _) => Err(format!("[runtime] node_flags: `{flag}` needs a number: --{name}=N")),
        (Some((_, false)), Some(_)) => Err(format!("[runtime] node_flags: `--{name}` takes no value")),
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filesystem {
    /// Read files and list directories.
    pub read: Vec<PathRule>,
    /// Read, write, create, delete.
    pub write: Vec<PathRule>,
    /// Read and execute.
    pub exec: Vec<PathRule>,
}

/// An absolute path granted by a policy. A non-optional path that does not exist is an error at
/// load time; an optional one that does not exist is dropped (and reported).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathRule {
    pub path: PathBuf,
    pub optional: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Network {
    /// A fresh network namespace with only loopback.
    None,
    /// The host's network; optionally narrowed by Landlock (ABI 4+) to these TCP ports.
    Host { connect_ports: Option<Vec<u16>>, bind_ports: Option<Vec<u16>> },
    /// A fresh network namespace whose only way out is mcpbox's HTTP proxy with this allow-list
    /// of `host:port` patterns (`*.example.com:443`; grammar in `allow.rs`).
    Proxy { allow: Vec<AllowEntry> },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Env {
    /// Names taken from the server's configured env (or, for `mcpbox run`, mcpbox's own env).
    pub pass: Vec<String>,
    /// Values set explicitly (already `${…}`-expanded).
    pub set: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Bytes.
    pub memory: Option<u64>,
    pub pids: Option<u64>,
    pub open_files: Option<u64>,
    /// Size of the private /tmp, bytes.
    pub tmp: Option<u64>,
    /// Largest file the server may write, bytes.
    pub file_size: Option<u64>,
    /// CPU time, in thousandths of a core (1000 = one core's worth): cgroup `cpu.max`.
    #[serde(default)]
    pub cpu: Option<u32>,
    /// What the server can write to its data dir, bytes: a size-capped filesystem (root only).
    #[serde(default)]
    pub disk: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seccomp {
    /// Syscall names denied on top of the default allow-list (names of [`syscalls::X86_64`]).
    pub extra_deny: Vec<String>,
    /// Syscall names allowed beyond the default allow-list (never [`syscalls::NEVER_ALLOWED`]).
    pub extra_allow: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// uid drop + Landlock + seccomp + rlimits, no namespaces (a default Docker container).
    Container,
    /// Namespaces + mounts + Landlock + seccomp + uid drop + limits.
    Full,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxReq {
    /// The lowest confinement level this policy accepts. Default `full`.
    pub level: Level,
    /// The lowest Landlock ABI this policy accepts; 0 means Landlock may be missing (logged).
    /// Default 1.
    pub landlock_min_abi: u8,
    /// Limits this policy accepts unenforced where the host cannot enforce them (logged at
    /// every start and shown by `mcpbox doctor`); any other limit that cannot be enforced
    /// refuses the start.
    #[serde(default)]
    pub relax: Relax,
}

/// `[sandbox] relax = ["cpu", "disk"]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relax {
    /// `[limits] cpu` may go unenforced (no cgroup cpu controller: rootless, or no delegation).
    pub cpu: bool,
    /// `[limits] disk` may go unenforced (no loop devices: rootless, or container level).
    pub disk: bool,
}

/// The directories every sandbox provides itself: no grant may be one of them, inside
/// `/proc` or `/dev`, or above any of them (a grant of `/` would bring the host's back over
/// the sandbox's own). Paths under `/tmp` may be granted: they are bound inside the private
/// /tmp.
pub const SANDBOX_OWN: &[&str] = &["/proc", "/dev", "/tmp"];

/// Why `path` (absolute, normalised) cannot be granted, if it cannot: it is one of
/// [`SANDBOX_OWN`], lies inside `/proc` or `/dev`, or contains one of them.
pub fn reserved_conflict(path: &std::path::Path) -> Option<String> {
    for own in SANDBOX_OWN {
        let own = std::path::Path::new(own);
        if path == own || (own != std::path::Path::new("/tmp") && path.starts_with(own)) {
            return Some(format!(
                "{} cannot be granted: /proc, /dev and /tmp are provided by the sandbox itself",
                path.display()
            ));
        }
        if own.starts_with(path) {
            return Some(format!(
                "{} cannot be granted: it contains {}, which the sandbox provides itself (granting it would bring \
                 back the host's); grant the directories you need below it instead",
                path.display(),
                own.display()
            ));
        }
    }
    None
}

//! The seam between configuration and sandbox: a server's command, env and policy, plus the
//! state directory, become a [`SandboxSpec`]. Shared by `mcpbox run` and `mcpbox serve`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::policy::Policy;
use crate::sandbox::SandboxSpec;

/// Which policy a server uses.
#[derive(Debug, Clone)]
pub enum PolicyRef {
    /// A shipped policy name (`default`, `node`, …) or a path to a TOML file.
    Named(String),
    /// An inline policy (from `mcpbox.json`), in the TOML data model; relative `extends` are
    /// resolved against `base_dir`.
    Inline { value: toml::Table, base_dir: PathBuf },
}

/// One server to launch.
#[derive(Debug, Clone)]
pub struct ServerLaunch {
    pub name: String,
    /// As configured: a bare name (resolved against the sandbox's PATH) or an absolute path.
    pub command: String,
    pub args: Vec<String>,
    /// The server's configured environment; only names the policy passes reach the server.
    pub env: BTreeMap<String, String>,
    pub policy: PolicyRef,
}

/// `--state-dir`: per server `NAME/data` (its `${DATA}`) and `NAME/cache`.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub root: PathBuf,
    /// First host uid of the range servers run under when mcpbox is root.
    pub uid_base: u32,
    pub uid_count: u32,
}

/// Everything needed to start the server, decided once (before any fork).
#[derive(Debug, Clone)]
pub struct Planned {
    pub spec: SandboxSpec,
    pub policy: Policy,
    /// Weakenings and notes found while planning (e.g. optional paths that do not exist).
    pub notes: Vec<String>,
}

pub fn plan(state: &StateDir, launch: &ServerLaunch) -> anyhow::Result<Planned> {
    let _ = (state, launch);
    todo!()
}

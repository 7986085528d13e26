//! Planning: the one path from a configured server — a `mcpbox run` command line or a server
//! of `mcpbox.json` — to a [`SandboxSpec`](crate::sandbox::SandboxSpec). `run`, `serve`,
//! `prepare` and `doctor` all go through here:
//!
//! 1. [`effective`]: the launch as it will run under its policy (npx/uvx without a named policy
//!    get the shipped policy of their package, else their runtime base, and the log says which);
//!    a `url` upstream becomes mcpbox's own url-bridge.
//! 2. [`check`]: everything that can refuse the server (its name, its policy, what the policy
//!    asks of the kernel and the egress proxy), before any package is prepared; it creates
//!    nothing, so `serve --check` uses it too.
//! 3. [`prepare`]: npx/uvx packages installed in their own sandbox (by `run` on demand, by
//!    `serve` and `prepare` ahead of time).
//! 4. [`plan_begin`]: state dirs, host uid, the policy loaded again for real; the minimum
//!    confinement level is decided here and nowhere else. [`prepare::for_run`]: the command
//!    rewritten to the prepared entry point.
//! 5. [`Begun::finish`]: grants, environment, command: the whole spec.
//!
//! The runtime bases' variables (`${NODE_EXE}`, `${PYTHON_STDLIB}`, …) are filled in while the
//! policy loads (steps 2 and 4) by [`runtime`], from the interpreter the command runs on.
//!
//! May import: `policy`, `config`, `sandbox`, `netproxy`, `urlbridge` (its wire names). Never
//! the supervisor, the HTTP side or the CLI.

pub mod prepare;
pub mod runtime;
pub mod spec;

use std::collections::BTreeMap;

use anyhow::Context;

use crate::config::{ServerConfig, ServerKind};
pub use crate::policy::PolicyRef;
pub use spec::{
    allocate_uid, check, check_name, check_policy, plan, plan_begin, plan_begin_checked, plan_with, resolve,
    resolve_command, Begun, Extra, Planned, ServerDirs, ServerLaunch, StateDir, DEFAULT_PATH,
};

/// [`check`], and what it cannot see in the policy alone, for a server run by its command line:
/// a package command line mcpbox cannot take, the program the server will execute (for npx/uvx
/// the runtime that will run the package's entry point) missing or not executable under the
/// policy, and limits that a rootless mcpbox can never enforce and the policy does not relax.
/// All of it before a package is prepared: an install runs the package's own scripts, which a
/// server the policy refuses must never get to run.
pub fn check_launch(state: &StateDir, launch: &ServerLaunch) -> anyhow::Result<spec::Checked> {
    let package = match prepare::parse(&launch.command, &launch.args) {
        Some(Err(e)) => return Err(e),
        Some(Ok(p)) => Some(p),
        None => None,
    };
    let checked = check(state, launch)?;
    let policy = &checked.policy;
    match &package {
        Some(pkg) => {
            let runtime = prepare::runtime_of(pkg)?;
            let what = format!(", which runs the package of `{}`", launch.command);
            checked.may_execute(&runtime, &what)?;
        }
        None => {
            let path_var = policy.env.set.get("PATH").map(String::as_str).unwrap_or(DEFAULT_PATH);
            let exe = resolve_command(&launch.command, path_var)?;
            checked.may_execute(&exe, "")?;
        }
    }
    if !nix::unistd::geteuid().is_root() {
        // sandbox-init refuses these rootless whatever the host has (no cgroup of its own to
        // hold CPU time in, no loop device to cap a filesystem with); said here, nothing is
        // prepared or made for a server that cannot start.
        if let (Some(cpu), false) = (policy.limits.cpu, policy.sandbox.relax.cpu) {
            anyhow::bail!(
                "policy {}: [limits] cpu = \"{}\" cannot be enforced: mcpbox runs rootless and has no cgroup to hold CPU time in. Run mcpbox as root, or accept it unenforced with `[sandbox] relax = [\"cpu\"]` in the policy",
                policy.source,
                crate::policy::format_cpu(cpu)
            );
        }
        if let (Some(size), false) = (policy.limits.disk, policy.sandbox.relax.disk) {
            anyhow::bail!(
                "policy {}: [limits] disk = \"{}\" cannot be enforced: mcpbox runs rootless and cannot mount a size-capped filesystem (loop devices need root). Run mcpbox as root, or accept it unenforced with `[sandbox] relax = [\"disk\"]` in the policy",
                policy.source,
                crate::policy::format_size(size)
            );
        }
    }
    Ok(checked)
}

/// Shipped policies written for one package each: a server running that package with no policy
/// named gets this one. Matched on the whole package name (scope included), never on a suffix.
pub const PACKAGE_POLICIES: &[(prepare::Manager, &str, &str)] = &[
    (prepare::Manager::Npm, "@modelcontextprotocol/server-everything", "server-everything"),
    (prepare::Manager::Npm, "@modelcontextprotocol/server-filesystem", "server-filesystem"),
    (prepare::Manager::Npm, "@modelcontextprotocol/server-memory", "server-memory"),
    (prepare::Manager::Npm, "@modelcontextprotocol/server-sequential-thinking", "server-sequential-thinking"),
    (prepare::Manager::Uv, "mcp-server-fetch", "mcp-server-fetch"),
    (prepare::Manager::Uv, "mcp-server-git", "mcp-server-git"),
    (prepare::Manager::Uv, "mcp-server-time", "mcp-server-time"),
];

/// The package name of an npm spec (`@scope/name@1.2`) or a Python requirement (`name==1.2`,
/// `name[extra]>=1`), lower-cased for Python as its index compares them.
pub fn package_name(manager: prepare::Manager, spec: &str) -> String {
    match manager {
        prepare::Manager::Npm => match spec.rfind('@') {
            Some(i) if i > 0 => spec[..i].to_string(),
            _ => spec.to_string(),
        },
        prepare::Manager::Uv => {
            let end = spec.find(|c: char| "=<>!~[;@ ".contains(c)).unwrap_or(spec.len());
            spec[..end].trim().to_ascii_lowercase().replace('_', "-")
        }
    }
}

/// How the policy of a launch was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyChoice {
    /// Named by the operator (`--policy`, or `policy` in the config).
    Given,
    /// None named; the shipped policy written for this package (the message says which).
    ForPackage(String),
    /// None named and none known: `default` plus the runtime base (the message says so).
    RuntimeBase(String),
    /// None named, not a package: `default`.
    Default,
}

/// The launch as it will run: for an npx/uvx command without a named policy, the policy written
/// for its package if mcpbox ships one, else the runtime base (`node` or `python`); the choice
/// says which, for the log. Other launches are unchanged.
pub fn effective(mut launch: ServerLaunch, policy_given: bool) -> (ServerLaunch, PolicyChoice) {
    if policy_given {
        return (launch, PolicyChoice::Given);
    }
    let Some(Ok(pkg)) = prepare::parse(&launch.command, &launch.args) else { return (launch, PolicyChoice::Default) };
    // A local project installs nothing: its command names it.
    let name =
        pkg.install.first().map(|s| package_name(pkg.manager, s)).or_else(|| pkg.bin.clone()).unwrap_or_default();
    if let Some((_, _, policy)) = PACKAGE_POLICIES.iter().find(|(m, p, _)| *m == pkg.manager && *p == name) {
        launch.policy = PolicyRef::Named((*policy).into());
        let msg = format!(
            "no policy named: using the shipped policy `{policy}`, written for {name}; name another to override it"
        );
        return (launch, PolicyChoice::ForPackage(msg));
    }
    let base = pkg.manager.runtime_policy();
    launch.policy = PolicyRef::Named(base.into());
    let msg = format!(
        "no policy named and none shipped for {name}: using `default` plus the {base} runtime base (`{base}`); write one (see policies/ and docs) to say what it may reach"
    );
    (launch, PolicyChoice::RuntimeBase(msg))
}

impl PolicyChoice {
    /// The line to log, if any.
    pub fn message(&self) -> Option<&str> {
        match self {
            PolicyChoice::ForPackage(m) | PolicyChoice::RuntimeBase(m) => Some(m),
            PolicyChoice::Given | PolicyChoice::Default => None,
        }
    }
}

/// The policy of a `url` upstream's bridge: mcpbox's own code talking HTTP(S) to one remote
/// server. It needs the network and the CA store; nothing of the host's files beyond them.
const URL_BRIDGE_POLICY: &str = r#"
extends = "default"
[filesystem]
read = [
    { path = "/etc/ssl/certs", optional = true },
    { path = "/usr/share/ca-certificates", optional = true },
    { path = "/etc/resolv.conf", optional = true },
    { path = "/etc/hosts", optional = true },
    { path = "/etc/nsswitch.conf", optional = true },
    { path = "/etc/gai.conf", optional = true },
]
[network]
mode = "host"
"#;

/// Plans the servers of a config: what `serve` (through the supervisor's launcher) and
/// `/readyz` ask.
pub struct Planner {
    pub state: StateDir,
    /// Servers refused at start (their policy, or a failed prepare), with the reason.
    pub cannot_start: BTreeMap<String, String>,
    /// `mcpbox.maxLineBytes`: also the most a url upstream's bridge holds of one line or
    /// message from the upstream.
    pub max_line: usize,
}

impl Planner {
    pub fn new(state: StateDir, cfg: &crate::config::Config) -> Self {
        Planner { state, cannot_start: BTreeMap::new(), max_line: cfg.max_line_bytes }
    }

    /// Step 1 for a configured server: its launch (and what mcpbox adds on top of its policy).
    /// `stage`: copy mcpbox's binary where server uids can run it if needed (a url upstream's
    /// bridge); false for checks, which create nothing.
    pub fn launch_of(&self, server: &ServerConfig, stage: bool) -> anyhow::Result<(ServerLaunch, Extra, PolicyChoice)> {
        match &server.kind {
            ServerKind::Stdio { command, args, env } => {
                let launch = ServerLaunch {
                    name: server.name.clone(),
                    command: command.clone(),
                    args: args.clone(),
                    env: env.clone(),
                    policy: server.policy.clone(),
                };
                let (launch, choice) = effective(launch, server.policy_given);
                Ok((launch, Extra::default(), choice))
            }
            ServerKind::Url { url, headers, transport_type } => {
                // mcpbox's own `url-bridge` mode stands in for the server, sandboxed like one
                // (network `host`, the CA store, nothing else), with the upstream's URL and
                // headers in its environment rather than on its command line (readable by all).
                let transport = crate::urlbridge::Transport::pick(transport_type.as_deref(), url)?;
                let exe = std::env::current_exe().context("locating the mcpbox binary")?;
                let exe = if stage { prepare::stage_for_others(&self.state, &exe)? } else { exe };
                // Set by mcpbox whatever the policy passes: the bridge cannot work without them.
                let mut bridge_env = BTreeMap::new();
                bridge_env.insert(crate::urlbridge::URL_ENV.to_string(), url.clone());
                bridge_env.insert(crate::urlbridge::HEADERS_ENV.to_string(), serde_json::to_string(headers)?);
                let policy = if server.policy_given {
                    server.policy.clone()
                } else {
                    let table: toml::Table =
                        toml::from_str(URL_BRIDGE_POLICY).expect("the built-in url-bridge policy parses");
                    PolicyRef::Inline { value: table, base_dir: "/".into() }
                };
                let launch = ServerLaunch {
                    name: server.name.clone(),
                    command: exe.to_string_lossy().into_owned(),
                    args: vec![
                        "url-bridge".into(),
                        "--transport".into(),
                        transport.as_str().into(),
                        "--max-line-bytes".into(),
                        self.max_line.to_string(),
                    ],
                    env: BTreeMap::new(),
                    policy,
                };
                let extra = Extra { grants: vec![(exe, crate::sandbox::Access::Exec)], env: bridge_env, notes: vec![] };
                Ok((launch, extra, PolicyChoice::Given))
            }
        }
    }

    /// Steps 1-2: everything that can refuse the server before a package is prepared; the
    /// policy it would run under.
    pub fn check(&self, server: &ServerConfig) -> anyhow::Result<spec::Checked> {
        let (launch, _, _) = self.launch_of(server, false)?;
        match &server.kind {
            ServerKind::Stdio { .. } => check_launch(&self.state, &launch),
            // mcpbox's own url-bridge, granted by the plan whatever the policy says.
            ServerKind::Url { .. } => check(&self.state, &launch),
        }
    }

    /// [`Planner::check`] for every enabled server of `cfg`: the ones refused, with the reason
    /// (logged). Run before anything is prepared, so a bad policy costs no install.
    pub fn refusals(&self, cfg: &crate::config::Config) -> BTreeMap<String, String> {
        let mut refused = BTreeMap::new();
        for (name, server) in cfg.servers.iter().filter(|(_, s)| !s.disabled) {
            if let Err(e) = self.check(server) {
                tracing::error!(server = %name, "refused: {e:#}");
                refused.insert(name.clone(), format!("{e:#}"));
            }
        }
        refused
    }

    /// Steps 1, 2, 4, 5: the whole spec of a server whose package (if any) is prepared.
    pub fn plan(&self, server: &ServerConfig) -> anyhow::Result<Planned> {
        if let Some(e) = self.cannot_start.get(&server.name) {
            anyhow::bail!("{e}");
        }
        let (launch, extra, choice) = self.launch_of(server, true)?;
        let begun = plan_begin(&self.state, &launch)?;
        let (run, mut extra) = match prepare::for_run(&self.state, &launch) {
            Some(r) => {
                let (run, mut more) = r?;
                more.grants.extend(extra.grants);
                more.env.extend(extra.env);
                more.notes.extend(extra.notes);
                (run, more)
            }
            None => (launch, extra),
        };
        extra.notes.extend(choice.message().map(str::to_owned));
        begun.finish(&run, &extra)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(command: &str, args: &[&str]) -> ServerLaunch {
        ServerLaunch {
            name: "s".into(),
            command: command.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::new(),
            policy: PolicyRef::Named("default".into()),
        }
    }

    fn policy_of(l: &ServerLaunch) -> &str {
        match &l.policy {
            PolicyRef::Named(n) => n,
            PolicyRef::Inline { .. } => "inline",
        }
    }

    #[test]
    fn a_known_package_gets_its_shipped_policy_and_an_unknown_one_its_runtime_base() {
        let (l, c) = effective(launch("npx", &["-y", "@modelcontextprotocol/server-memory"]), false);
        assert_eq!(policy_of(&l), "server-memory");
        assert!(matches!(&c, PolicyChoice::ForPackage(m) if m.contains("server-memory")), "{c:?}");
        let (l, _) = effective(launch("npx", &["-y", "@modelcontextprotocol/server-memory@2025.1.1"]), false);
        assert_eq!(policy_of(&l), "server-memory");
        let (l, _) = effective(launch("/usr/bin/uvx", &["mcp-server-time@0.6.2", "--local-timezone", "UTC"]), false);
        assert_eq!(policy_of(&l), "mcp-server-time");
        let (l, _) =
            effective(launch("uvx", &["--from", "mcp-server-git", "mcp-server-git", "--repository", "/r"]), false);
        assert_eq!(policy_of(&l), "mcp-server-git");
        // Another scope's package of the same base name is not the package the policy is for.
        let (l, c) = effective(launch("npx", &["-y", "@evil/server-memory"]), false);
        assert_eq!(policy_of(&l), "node");
        assert!(matches!(&c, PolicyChoice::RuntimeBase(m) if m.contains("@evil/server-memory")), "{c:?}");
        let (l, _) = effective(launch("uvx", &["some-unknown-server"]), false);
        assert_eq!(policy_of(&l), "python");
        // A named policy is never replaced; a plain command keeps `default`.
        let (l, c) = effective(launch("npx", &["-y", "@modelcontextprotocol/server-memory"]), true);
        assert_eq!((policy_of(&l), c), ("default", PolicyChoice::Given));
        let (l, c) = effective(launch("node", &["x.js"]), false);
        assert_eq!((policy_of(&l), c), ("default", PolicyChoice::Default));
    }

    #[test]
    fn every_package_policy_is_shipped() {
        let shipped = crate::policy::shipped_names();
        for (_, pkg, policy) in PACKAGE_POLICIES {
            assert!(shipped.contains(policy), "{pkg} names {policy}, which is not shipped");
        }
    }

    #[test]
    fn package_names() {
        use prepare::Manager::{Npm, Uv};
        assert_eq!(package_name(Npm, "@a/b@1.2"), "@a/b");
        assert_eq!(package_name(Npm, "@a/b"), "@a/b");
        assert_eq!(package_name(Npm, "b@latest"), "b");
        assert_eq!(package_name(Uv, "Mcp_Server-Time==1"), "mcp-server-time");
        assert_eq!(package_name(Uv, "x[extra]>=2"), "x");
        assert_eq!(package_name(Uv, "x @ file:///p"), "x");
    }
}

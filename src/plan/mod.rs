//! Planning: the one path from a configured server — a `mcpbox run` command line or a server
//! of `mcpbox.json` — to a [`SandboxSpec`](crate::sandbox::SandboxSpec). `run`, `serve`,
//! `prepare` and `doctor` all go through here:
//!
//! 1. [`effective`]: the launch as it will run under its policy (npx/uvx without a named policy
//!    get their runtime base, with a note); a `url` upstream becomes mcpbox's own url-bridge.
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
//! May import: `policy`, `config`, `sandbox`, `netproxy`, `urlbridge` (its wire names). Never
//! the supervisor, the HTTP side or the CLI.

pub mod prepare;
pub mod spec;

use std::collections::BTreeMap;

use anyhow::Context;

use crate::config::{ServerConfig, ServerKind};
pub use crate::policy::PolicyRef;
pub use spec::{
    allocate_uid, check, check_name, plan, plan_begin, plan_with, resolve, resolve_command, Begun, Extra, Planned, ServerDirs,
    ServerLaunch, StateDir, DEFAULT_PATH,
};

/// The launch as it will run: for an npx/uvx command without a named policy, the policy is the
/// runtime base (`node` or `python`) and a note says so. Other launches are unchanged.
pub fn effective(mut launch: ServerLaunch, policy_given: bool) -> (ServerLaunch, Option<String>) {
    if policy_given {
        return (launch, None);
    }
    let Some(Ok(pkg)) = prepare::parse(&launch.command, &launch.args) else { return (launch, None) };
    let base = pkg.manager.runtime_policy();
    launch.policy = PolicyRef::Named(base.into());
    let note = format!(
        "no policy named for this server: using `default` plus the {base} runtime base (`{base}`); write one (see policies/) to say what it may reach"
    );
    (launch, Some(note))
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
[env]
pass = ["MCPBOX_UPSTREAM_HEADERS"]
"#;

/// Plans the servers of a config: what `serve` (through the supervisor's launcher) and
/// `/readyz` ask.
pub struct Planner {
    pub state: StateDir,
    /// Servers refused at start (their policy, or a failed prepare), with the reason.
    pub cannot_start: BTreeMap<String, String>,
}

impl Planner {
    pub fn new(state: StateDir) -> Self {
        Planner { state, cannot_start: BTreeMap::new() }
    }

    /// Step 1 for a configured server: its launch (and what mcpbox adds on top of its policy).
    /// `stage`: copy mcpbox's binary where server uids can run it if needed (a url upstream's
    /// bridge); false for checks, which create nothing.
    pub fn launch_of(&self, server: &ServerConfig, stage: bool) -> anyhow::Result<(ServerLaunch, Extra, Option<String>)> {
        match &server.kind {
            ServerKind::Stdio { command, args, env } => {
                let launch = ServerLaunch {
                    name: server.name.clone(),
                    command: command.clone(),
                    args: args.clone(),
                    env: env.clone(),
                    policy: server.policy.clone(),
                };
                let (launch, note) = effective(launch, server.policy_given);
                Ok((launch, Extra::default(), note))
            }
            ServerKind::Url { url, headers, transport_type } => {
                // mcpbox's own `url-bridge` mode stands in for the server, sandboxed like one
                // (network `host`, the CA store, nothing else), with the upstream's headers in
                // its environment rather than on its command line.
                let transport = crate::urlbridge::Transport::pick(transport_type.as_deref(), url)?;
                let exe = std::env::current_exe().context("locating the mcpbox binary")?;
                let exe = if stage { prepare::stage_for_others(&self.state, &exe)? } else { exe };
                let mut env = BTreeMap::new();
                env.insert(crate::urlbridge::HEADERS_ENV.to_string(), serde_json::to_string(headers)?);
                let policy = if server.policy_given {
                    server.policy.clone()
                } else {
                    let table: toml::Table = toml::from_str(URL_BRIDGE_POLICY).expect("the built-in url-bridge policy parses");
                    PolicyRef::Inline { value: table, base_dir: "/".into() }
                };
                let launch = ServerLaunch {
                    name: server.name.clone(),
                    command: exe.to_string_lossy().into_owned(),
                    args: vec!["url-bridge".into(), "--url".into(), url.clone(), "--transport".into(), transport.as_str().into()],
                    env,
                    policy,
                };
                let extra = Extra { grants: vec![(exe, crate::sandbox::Access::Exec)], env: BTreeMap::new(), notes: vec![] };
                Ok((launch, extra, None))
            }
        }
    }

    /// Steps 1-2: everything that can refuse the server before a package is prepared.
    pub fn check(&self, server: &ServerConfig) -> anyhow::Result<()> {
        let (launch, _, _) = self.launch_of(server, false)?;
        check(&self.state, &launch).map(|_| ())
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
        let (launch, extra, note) = self.launch_of(server, true)?;
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
        extra.notes.extend(note);
        begun.finish(&run, &extra)
    }
}

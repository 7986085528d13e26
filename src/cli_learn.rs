//! `mcpbox policy learn`: run one server as `mcpbox run` does (stdio straight through, the same
//! plan, prepare and sandbox), but in the learn view (`crate::learn`), with its path syscalls
//! observed through the seccomp listener and its connections through the egress proxy in
//! record mode; when it exits, write the policy that covers what it used.
//!
//! Design: the view is granted up front (system directories and `/etc` minus its secrets), so
//! that the server finds what it needs and keeps going; what it actually touched is then the
//! policy. Nothing observed is a security decision: the server runs under the view's mount
//! namespace, Landlock and seccomp like any other (same level, its own uid); writes outside DATA
//! and /tmp fail (EROFS) and are written commented out.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::plan::{self, plan_begin, Extra, PolicyRef, ServerLaunch, StateDir};
use crate::policy::{Level, Network};

pub struct LearnArgs {
    /// The base policy (name or file); default: the runtime base of the command.
    pub policy: Option<String>,
    pub out: Option<PathBuf>,
    pub name: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub min_level: Level,
    /// `--config FILE --server NAME` instead of a command.
    pub config: Option<PathBuf>,
    pub server: Option<String>,
    pub command: Vec<String>,
}

const EXIT_SETUP: u8 = crate::cli_run::EXIT_SETUP;

/// The runtime base a command runs on: node for npx and node, python for uvx and python, else
/// `default`.
pub fn runtime_base(command: &str, args: &[String]) -> &'static str {
    if let Some(Ok(pkg)) = plan::prepare::parse(command, args) {
        return pkg.manager.runtime_policy();
    }
    let base = command.rsplit('/').next().unwrap_or(command);
    if base == "node" || base.starts_with("node") && base[4..].chars().all(|c| c.is_ascii_digit()) {
        "node"
    } else if base.starts_with("python") {
        "python"
    } else {
        "default"
    }
}

/// Writes `text` to `path` through a new file renamed over it: whatever `path` was (a symlink
/// another user planted in a shared directory, pointing at a file of root's) is replaced, never
/// written through. The file is the invoking user's, mode 0644 as a policy is read by others.
fn write_replacing(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(text.as_bytes())?;
    tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644))?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// `extends` as the learned file will say it: a shipped or user name as is, a file as its
/// absolute path (the learned file may be written elsewhere).
fn extends_value(base: &str) -> String {
    let p = Path::new(base);
    if base.contains('/') || base.ends_with(".toml") {
        return std::fs::canonicalize(p).map(|c| c.to_string_lossy().into_owned()).unwrap_or_else(|_| base.into());
    }
    base.to_string()
}

struct Setup {
    state: StateDir,
    launch: ServerLaunch,
    base: String,
    env_names: Vec<String>,
    hidden: Vec<PathBuf>,
}

fn setup(args: &LearnArgs) -> anyhow::Result<Setup> {
    let mut hidden = vec![];
    let (state, launch, base, env_names) = match (&args.config, &args.server) {
        (Some(config), Some(server)) => {
            let cfg = crate::config::load(config).map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))?;
            let state = StateDir::for_config(&cfg, config, args.state_dir.clone(), args.min_level);
            let sc =
                cfg.servers.get(server).ok_or_else(|| anyhow::anyhow!("{}: no server `{server}`", config.display()))?;
            let crate::config::ServerKind::Stdio { command, args: cargs, env } = &sc.kind else {
                anyhow::bail!("server `{server}` is a url upstream: there is no local server to learn");
            };
            let base = match (&args.policy, &sc.policy, sc.policy_given) {
                (Some(p), _, _) => p.clone(),
                (None, PolicyRef::Named(p), true) => p.clone(),
                (None, PolicyRef::Inline { .. }, true) => {
                    anyhow::bail!("server `{server}` has an inline policy: name a base with --policy")
                }
                (None, _, false) => runtime_base(command, cargs).to_string(),
            };
            let dir = config.canonicalize().unwrap_or_else(|_| config.clone());
            if let Some(d) = dir.parent() {
                hidden.push(d.to_path_buf());
            }
            let launch = ServerLaunch {
                name: server.clone(),
                command: command.clone(),
                args: cargs.clone(),
                env: env.clone(),
                policy: PolicyRef::Named(base.clone()),
            };
            (state, launch, base, env.keys().cloned().collect())
        }
        (None, None) if !args.command.is_empty() => {
            let mut state = StateDir::new(args.state_dir.clone().unwrap_or_else(StateDir::default_root));
            state.min_level = args.min_level;
            let c = &args.command;
            let base = args.policy.clone().unwrap_or_else(|| runtime_base(&c[0], &c[1..]).to_string());
            let launch = ServerLaunch {
                name: args.name.clone().unwrap_or_else(|| crate::cli_run::default_name(c)),
                command: c[0].clone(),
                args: c[1..].to_vec(),
                env: std::env::vars().collect(),
                policy: PolicyRef::Named(base.clone()),
            };
            (state, launch, base, vec![])
        }
        _ => anyhow::bail!("give either `-- COMMAND ARGS…` or `--config FILE --server NAME`"),
    };
    hidden.push(state.root.clone());
    hidden.extend(state.policy_dirs.iter().cloned());
    Ok(Setup { state, launch, base, env_names, hidden })
}

pub fn learn(args: LearnArgs) -> ExitCode {
    let s = match setup(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mcpbox: policy learn: {e:#}");
            return ExitCode::from(EXIT_SETUP);
        }
    };
    let name = s.launch.name.clone();
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from(format!("{name}.learned.toml")));
    match run_learning(&s, &out) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mcpbox: policy learn: {name}: {e:#}");
            ExitCode::from(EXIT_SETUP)
        }
    }
}

fn run_learning(s: &Setup, out: &Path) -> anyhow::Result<ExitCode> {
    let name = &s.launch.name;
    let state = &s.state;
    let mut pending = crate::sandbox::Pending::start(Stdio::inherit(), Stdio::inherit(), Stdio::inherit())?;
    let base_policy = plan::check(state, &s.launch)?.policy;
    // npx/uvx: prepared first, through the same path `run` and `serve` take.
    let (launch_now, mut extra) = match plan::prepare::parse(&s.launch.command, &s.launch.args) {
        None => (s.launch.clone(), Extra::default()),
        Some(pkg) => {
            let pkg = pkg?;
            plan::prepare::remove_credentials_on_signal();
            plan::prepare::prepare_blocking(state, name, &pkg, false).map_err(|e| anyhow::anyhow!("prepare: {e:#}"))?;
            plan::prepare::for_run(state, &s.launch).expect("an npx/uvx command")?
        }
    };
    // What every launch of this server gets beyond its policy (never written) and its state.
    let mut launch_grants: Vec<PathBuf> = extra.grants.iter().map(|(p, _)| p.clone()).collect();
    launch_grants.push(state.root.clone());
    let view = crate::learn::learn_view(&s.hidden);
    extra.grants.extend(view.grants.iter().cloned());
    // DATA is writable while learning, whatever the base says (the policy grants it if used).
    let dirs = crate::plan::ServerDirs::at(state, name);
    extra.grants.push((dirs.data.clone(), crate::sandbox::Access::Write));
    // The server sees the variables it was configured with, as it will under the learned policy.
    if !s.env_names.is_empty() {
        for n in &s.env_names {
            if let Some(v) = s.launch.env.get(n) {
                extra.env.insert(n.clone(), v.clone());
            }
        }
    }
    let mut begun = plan_begin(state, &launch_now)?;
    // Connections go through the proxy in record mode (the base's own list still applies as
    // written); a base with the host's network is left as it is, and nothing is recorded.
    let learn_net = match &base_policy.network {
        Network::Host { .. } => {
            tracing::warn!(server = %name, "the base policy uses the host's network: connections are not recorded");
            None
        }
        Network::None => Some(Vec::new()),
        Network::Proxy { allow } => Some(allow.clone()),
    };
    if let Some(allow) = &learn_net {
        begun.set_network(Network::Proxy { allow: allow.clone() });
    }
    pending.send_outer(begun.outer())?;
    let mut planned = begun.finish(&launch_now, &extra)?;
    planned.spec.observe = true;
    for n in &planned.notes {
        tracing::info!(server = %name, "{n}");
    }
    let obs = crate::learn::start_learning();
    // Only what this filter allows continues when notified; the rest is a denial (EPERM).
    let filter = crate::sandbox::seccomp::FilterOptions {
        extra_deny: planned.spec.seccomp_extra_deny.clone(),
        extra_allow: planned.spec.seccomp_extra_allow.clone(),
        ..Default::default()
    };
    obs.set_allowed(crate::sandbox::seccomp::allowed(&filter)?.plain);

    let mask = crate::sandbox::forwarded_signals();
    mask.thread_block()?;
    let denials = crate::denials::registry().server(name, Some(crate::denials::file_for(&state.root, name)));
    denials.set_policy(&planned.policy.source);
    crate::denials::flush_in_background();
    let (mut child, report, proxy_listener) = pending.send(&planned.spec)?;
    if let Some(allow) = &learn_net {
        let started = proxy_listener
            .ok_or_else(|| anyhow::anyhow!("the sandbox did not hand over its proxy socket"))
            .and_then(|l| {
                let list = crate::netproxy::AllowList::new(allow);
                let mut cfg = crate::netproxy::ProxyConfig::new(list, s.base.clone(), name.clone());
                cfg.denials = Some(denials.clone());
                cfg.record = Some(obs.clone());
                Ok(crate::netproxy::ProxyThread::start(l, cfg)?)
            });
        match started {
            Ok(proxy) => std::mem::forget(proxy),
            Err(e) => {
                let _ = child.kill();
                return Err(e.context("cannot serve the egress proxy"));
            }
        }
    }
    for w in &report.warnings {
        tracing::warn!(server = %name, "{w}");
    }
    eprintln!(
        "mcpbox: learning a policy for {name} (base `{}`): drive the server, then end it (close its stdin); the policy goes to {}",
        s.base,
        out.display()
    );
    let pid = Pid::from_raw(child.id() as i32);
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        match mask.wait() {
            Ok(Signal::SIGCHLD) | Err(_) => {}
            Ok(sig) => {
                let _ = kill(pid, sig);
            }
        }
    };
    if !obs.is_listening() {
        anyhow::bail!("the seccomp listener never arrived: nothing was observed, no policy written");
    }
    let base_loaded = base_policy;
    let learned = crate::learn::Learned {
        extends: extends_value(&s.base),
        base: &base_loaded,
        launch_grants: &launch_grants,
        view: &view,
        command: std::iter::once(s.launch.command.clone())
            .chain(s.launch.args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" "),
        env_names: s.env_names.clone(),
        executable: planned.spec.argv.first().map(PathBuf::from),
        data: Some(dirs.data.clone()),
    };
    // The command itself was executed, observed or not (rootless, the first execve's memory is
    // still the launcher's, which mcpbox may not read).
    if let Some(exe) = planned.spec.argv.first() {
        obs.path(crate::learn::Use::Exec, PathBuf::from(exe), "execve");
    }
    crate::denials::registry().flush_all();
    let snapshot = obs.snapshot();
    let text = crate::learn::write_policy(&learned, &snapshot);
    write_replacing(out, &text).map_err(|e| anyhow::anyhow!("writing {}: {e}", out.display()))?;
    // The learned file must pass the same check any policy does.
    let abs = std::fs::canonicalize(out).unwrap_or_else(|_| out.to_path_buf());
    // Its `extends` is looked up as the server's policy was (a config's policies/ first).
    let checked = crate::plan::check_policy(
        state,
        &abs.to_string_lossy(),
        Some(&dirs.data),
        Some(&dirs.cache),
        Some(&launch_now.command),
    );
    if let Err(e) = checked {
        anyhow::bail!("the learned policy {} does not pass `mcpbox policy check`: {e:#}", out.display());
    }
    use std::os::unix::process::ExitStatusExt;
    let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    eprintln!(
        "mcpbox: {name} exited ({code}) after {} path syscalls ({} distinct paths) and {} connection(s); learned policy written to {} — review it, then `mcpbox policy diff {} {}`",
        snapshot.observed,
        snapshot.paths.len(),
        snapshot.connects.values().sum::<u64>(),
        out.display(),
        s.base,
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

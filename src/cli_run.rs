//! `mcpbox run`: one server, stdio passed straight through.

use std::path::PathBuf;
use std::process::{ExitCode, Stdio};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::plan::{self, Extra, PolicyRef, ServerLaunch, StateDir};
use crate::policy::Level;

pub struct RunArgs {
    /// None: for npx/uvx the shipped policy of the package, else `default` plus the node/python
    /// runtime base; `default` for anything else (the log says which).
    pub policy: Option<String>,
    /// `--config FILE`: policy names, state dir and uid base as `serve --config FILE` has them.
    pub config: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub name: Option<String>,
    pub min_level: Level,
    /// `--enable-audit`: turn the kernel's audit subsystem on for Landlock denials (see `serve`).
    pub enable_audit: bool,
    /// `--memory-merge`: the sandbox asks for KSM merging.
    pub memory_merge: bool,
    pub command: Vec<String>,
}

/// Exit code when mcpbox itself could not start the server (as `env` and container runtimes do).
pub const EXIT_SETUP: u8 = 125;

/// The name a server gets when `--name` is not given: its state dir, uid, hostname and cgroup.
/// For npx/uvx the package (not `npx`, which every such server would share), else the command.
pub fn default_name(command: &[String]) -> String {
    let from_pkg = plan::prepare::parse(&command[0], &command[1..]).and_then(|p| p.ok()).and_then(|p| {
        let spec = p.bin.clone().or_else(|| p.install.first().cloned())?;
        let spec = spec.rsplit('/').next().unwrap_or(&spec).to_string();
        let spec = spec.split(['@', '=', '<', '>', '~', '!', '[', ' ']).find(|s| !s.is_empty())?.to_string();
        Some(spec)
    });
    let base = from_pkg.unwrap_or_else(|| command[0].rsplit('/').next().unwrap_or("server").to_string());
    let n: String = base
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' })
        .take(64)
        .collect();
    let n = n.trim_start_matches('-');
    if n.is_empty() {
        "server".into()
    } else {
        n.to_string()
    }
}

/// `early`: the sandbox-init that `main` started before parsing the command line, if it did.
pub fn run(args: RunArgs, early: Option<Result<crate::sandbox::Pending, crate::sandbox::SandboxError>>) -> ExitCode {
    let name = args.name.clone().unwrap_or_else(|| default_name(&args.command));
    let policy_given = args.policy.is_some();
    let mut state = match StateDir::for_command(args.config.as_deref(), args.state_dir.clone(), args.min_level) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mcpbox: {e:#}");
            return ExitCode::from(EXIT_SETUP);
        }
    };
    state.memory_merge |= args.memory_merge;
    let launch = ServerLaunch {
        name: name.clone(),
        command: args.command[0].clone(),
        args: args.command[1..].to_vec(),
        env: std::env::vars().collect(),
        policy: PolicyRef::Named(args.policy.clone().unwrap_or_else(|| "default".into())),
    };
    // sandbox-init loads and waits for its spec while we plan (a sandbox starts sooner on two
    // cores); if planning fails, dropping it makes it exit unused.
    let early =
        early.unwrap_or_else(|| crate::sandbox::Pending::start(Stdio::inherit(), Stdio::inherit(), Stdio::inherit()));
    let mut pending = match early {
        Ok(p) => p,
        Err(e) => {
            eprintln!("mcpbox: {name}: {e}");
            return ExitCode::from(EXIT_SETUP);
        }
    };
    // The plan's steps (see `plan`): everything that can refuse the server does so before a
    // package is prepared.
    let (launch, choice) = plan::effective(launch, policy_given);
    let checked = match plan::check_launch(&state, &launch) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mcpbox: {e:#}");
            return ExitCode::from(EXIT_SETUP);
        }
    };
    // npx/uvx: prepare into the cache if needed (its own sandbox), then run the entry point.
    let package = plan::prepare::parse(&launch.command, &launch.args);
    // Nothing is prepared for a plain command: the checked policy is the one to plan with.
    let checked = package.is_none().then_some(checked);
    let run = match package {
        None => Ok((launch.clone(), Extra::default())),
        Some(pkg) => pkg
            .and_then(|pkg| {
                plan::prepare::remove_credentials_on_signal();
                plan::prepare::prepare_blocking(&state, &name, &pkg, false)
            })
            .and_then(|_| plan::prepare::for_run(&state, &launch).expect("an npx/uvx command"))
            .map_err(|e| anyhow::anyhow!("prepare: {e:#}")),
    };
    let (launch_now, extra) = match run {
        Ok(x) => x,
        Err(e) => {
            eprintln!("mcpbox: {name}: {e:#}");
            return ExitCode::from(EXIT_SETUP);
        }
    };
    let begun = match plan::plan_begin_checked(&state, &launch_now, checked) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("mcpbox: {e:#}");
            return ExitCode::from(EXIT_SETUP);
        }
    };
    // sandbox-init makes the namespaces while the grants are resolved.
    if let Err(e) = pending.send_outer(begun.outer()) {
        eprintln!("mcpbox: {name}: {e}");
        return ExitCode::from(EXIT_SETUP);
    }
    let planned = match begun.finish(&launch_now, &extra) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("mcpbox: {e:#}");
            return ExitCode::from(EXIT_SETUP);
        }
    };
    for n in &planned.notes {
        tracing::info!(server = %name, "{n}");
    }
    if args.memory_merge {
        if let (false, why) = crate::sandbox::probe::ksm() {
            tracing::warn!(server = %name, "--memory-merge: {why}");
        }
    }
    match choice {
        plan::PolicyChoice::Given => {}
        plan::PolicyChoice::Default => tracing::warn!(
            server = %name,
            "no --policy given: running under `default`; write a policy to say what this server may reach"
        ),
        plan::PolicyChoice::ForPackage(m) | plan::PolicyChoice::RuntimeBase(m) => tracing::warn!(server = %name, "{m}"),
    }

    // Signals are taken synchronously by this thread and passed on to the sandbox.
    let mask = crate::sandbox::forwarded_signals();
    if let Err(e) = mask.thread_block() {
        eprintln!("mcpbox: sigprocmask: {e}");
        return ExitCode::from(EXIT_SETUP);
    }
    // Denials (the proxy's, seccomp's, Landlock's) are recorded in the server's state dir for
    // `policy suggest`. The audit reader starts after the signal mask is set: its thread
    // inherits it, so the signals still come to `mask.wait` below.
    let denials = crate::denials::registry().server(&name, Some(crate::denials::file_for(&state.root, &name)));
    let audit =
        if args.enable_audit { crate::sandbox::audit::Enable::Yes } else { crate::sandbox::audit::Enable::IfOn };
    if let crate::sandbox::audit::Status::Unavailable(why) = crate::sandbox::audit::start(audit) {
        // Not a weakening of the sandbox, only of what is reported: at info level (`run` logs
        // warnings only by default; `mcpbox doctor` shows it too).
        tracing::info!("Landlock denials are not reported: {why}");
    }
    denials.set_policy(&planned.policy.source);
    crate::denials::flush_in_background();
    let (mut child, report, proxy_listener) = match pending.send(&planned.spec) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("mcpbox: {name}: {e}");
            return ExitCode::from(EXIT_SETUP);
        }
    };
    // Network mode `proxy`: the sandbox handed back its listening socket; the egress proxy runs
    // here, in the host's network, as it does under `serve`.
    if let crate::policy::Network::Proxy { allow } = &planned.policy.network {
        let started = proxy_listener
            .ok_or_else(|| anyhow::anyhow!("the sandbox did not hand over its proxy socket"))
            .and_then(|l| {
                let allow = crate::netproxy::AllowList::new(allow);
                let mut cfg = crate::netproxy::ProxyConfig::new(allow, planned.policy.source.clone(), name.clone());
                cfg.denials = Some(denials.clone());
                // One sandbox: its own cap is the whole budget, the one `serve` gives each
                // sandbox by default (`mcpbox.maxEgressConnections`).
                cfg.max_connections = crate::netproxy::DEFAULT_MAX_CONNECTIONS;
                Ok(crate::netproxy::ProxyThread::start(l, cfg)?)
            });
        match started {
            // Serves until mcpbox exits with the server's status (never dropped before that).
            Ok(proxy) => std::mem::forget(proxy),
            Err(e) => {
                eprintln!("mcpbox: {name}: cannot serve the egress proxy: {e:#}");
                let _ = child.kill();
                return ExitCode::from(EXIT_SETUP);
            }
        }
    }
    for w in &report.warnings {
        tracing::warn!(server = %name, "{w}");
    }
    tracing::info!(
        server = %name,
        pid = child.id(),
        level = ?report.level,
        landlock_abi = report.landlock_abi,
        limits = %report.limits,
        host_uid = report.host_uid,
        start_ms = report.start_latency.as_secs_f64() * 1e3,
        "sandbox ready"
    );
    // Housekeeping while the server runs: free extra cgroup slots of this server, made when
    // several of its sandboxes ran at once.
    let swept = crate::sandbox::sweep_extra_slots_beside(&report);
    if swept > 0 {
        tracing::info!("removed {swept} cgroup(s) left by earlier sandboxes");
    }
    let pid = Pid::from_raw(child.id() as i32);
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) => {}
            Err(e) => {
                eprintln!("mcpbox: waiting for {name}: {e}");
                return ExitCode::from(EXIT_SETUP);
            }
        }
        match mask.wait() {
            Ok(Signal::SIGCHLD) | Err(_) => {}
            Ok(sig) => {
                let _ = kill(pid, sig);
            }
        }
    };
    // The audit records of what Landlock refused the server last may still be on their way.
    let settle = std::time::Duration::from_millis(500);
    if !crate::sandbox::audit::settle(settle) {
        tracing::warn!(
            "the kernel's audit records did not all arrive within {} ms: Landlock denials of the server's last \
             moments may be missing",
            settle.as_millis()
        );
    }
    crate::denials::registry().flush_all();
    use std::os::unix::process::ExitStatusExt;
    let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    ExitCode::from(code.clamp(0, 255) as u8)
}

#[cfg(test)]
mod tests {
    use super::default_name;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn default_names_come_from_the_package_for_npx_and_uvx() {
        assert_eq!(default_name(&v(&["npx", "-y", "@modelcontextprotocol/server-memory@1.2.3"])), "server-memory");
        assert_eq!(default_name(&v(&["uvx", "mcp-server-fetch@2025.1"])), "mcp-server-fetch");
        assert_eq!(default_name(&v(&["uvx", "--from", "mcp-server-git==1.0", "mcp-server-git"])), "mcp-server-git");
        assert_eq!(default_name(&v(&["/usr/bin/node", "server.js"])), "node");
        assert_eq!(default_name(&v(&["./.hidden"])), "hidden");
        assert_eq!(default_name(&v(&["./..."])), "server");
    }
}

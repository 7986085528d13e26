//! A server's command, environment and policy, plus its state directory, become a
//! [`SandboxSpec`]: state dirs and host uids ([`StateDir`], [`ServerDirs`], [`allocate_uid`]),
//! the policy loaded and the minimum level decided ([`plan_begin`]), then grants, environment
//! and command resolved ([`Begun::finish`]).

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context};

use super::runtime::{self, Kind, Runtime};
use crate::policy::{self, Level, LoadContext, Network, Policy, PolicyRef};
use crate::sandbox::{Access, DiskImage, Grant, Link, OuterSpec, SandboxSpec};

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
    /// Process-wide lowest level accepted (`--min-level`); a policy may only lower it further
    /// for itself. `Full` unless the operator wrote otherwise.
    pub min_level: Level,
    /// User policy directories searched before the shipped policies.
    pub policy_dirs: Vec<PathBuf>,
    /// `mcpbox.memoryMerge` / `run --memory-merge`: sandboxes ask for KSM merging.
    pub memory_merge: bool,
}

/// Where servers' host uids start unless a config says otherwise (`mcpbox.uidBase`): above the
/// ranges `useradd` hands out in /etc/subuid (100000 up to 600100000 by default; the second
/// user's range already covered 200000, mcpbox's old base) and systemd's container ranges
/// (up to 1879048191), below 2^31. Each server's uid is also checked against the host's
/// accounts and subordinate ranges when it is first given (see [`allocate_uid`]).
pub const DEFAULT_UID_BASE: u32 = 2_000_000_000;

impl StateDir {
    /// The default location: `$MCPBOX_STATE_DIR`, else `/var/lib/mcpbox` as root,
    /// `$XDG_STATE_HOME/mcpbox` otherwise.
    pub fn default_root() -> PathBuf {
        if let Some(d) = std::env::var_os("MCPBOX_STATE_DIR").filter(|v| !v.is_empty()) {
            return PathBuf::from(d);
        }
        if nix::unistd::geteuid().is_root() {
            return PathBuf::from("/var/lib/mcpbox");
        }
        if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
            return PathBuf::from(x).join("mcpbox");
        }
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp"));
        home.join(".local/state/mcpbox")
    }

    /// `root` as given (`--state-dir`, `MCPBOX_STATE_DIR`, a config's `stateDir`: the
    /// operator's choice), made absolute and, where it exists, free of symlinks: the sandbox
    /// opens the server's directories under it component by component without following any.
    pub fn new(root: PathBuf) -> Self {
        let root =
            if root.is_absolute() { root } else { std::env::current_dir().map(|d| d.join(&root)).unwrap_or(root) };
        let root = fs::canonicalize(&root).unwrap_or(root);
        StateDir {
            root,
            uid_base: DEFAULT_UID_BASE,
            uid_count: 10_000,
            min_level: Level::Full,
            policy_dirs: Vec::new(),
            memory_merge: false,
        }
    }

    /// The state of `serve` and `prepare` for a config file: `--state-dir`, else the config's
    /// `stateDir`, else [`StateDir::default_root`]; the config's uid base; policy names looked
    /// up beside the config first (`policies/NAME.toml`, see [`crate::policy::search_dirs`]).
    pub fn for_config(
        cfg: &crate::config::Config,
        config_path: &Path,
        state_dir: Option<PathBuf>,
        min_level: Level,
    ) -> Self {
        let root = state_dir.or_else(|| cfg.state_dir.clone()).unwrap_or_else(StateDir::default_root);
        let mut state = StateDir::new(root);
        if let Some(b) = cfg.uid_base {
            state.uid_base = b;
        }
        state.min_level = min_level;
        state.memory_merge = cfg.memory_merge;
        state.policy_dirs = crate::policy::search_dirs(Some(config_path));
        state
    }

    /// The state of a command that takes `--config FILE` as an option (`run`, `policy check`,
    /// `policy diff`): with FILE, what `serve --config FILE` has (its state dir, uid base and
    /// policy lookup, [`StateDir::for_config`]); without, `--state-dir` or the default and the
    /// shipped policies only.
    pub fn for_command(config: Option<&Path>, state_dir: Option<PathBuf>, min_level: Level) -> anyhow::Result<Self> {
        let mut state = match config {
            Some(path) => {
                let cfg = crate::config::load(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                StateDir::for_config(&cfg, path, state_dir, min_level)
            }
            None => StateDir::new(state_dir.unwrap_or_else(StateDir::default_root)),
        };
        state.min_level = min_level;
        Ok(state)
    }
}

/// Everything needed to start the server, decided once (before any fork).
#[derive(Debug, Clone)]
pub struct Planned {
    pub spec: SandboxSpec,
    pub policy: Policy,
    /// Weakenings and notes found while planning (e.g. optional paths that do not exist).
    pub notes: Vec<String>,
}

/// The default PATH inside a sandbox (used to resolve bare command names, too).
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Server names become directory names, cgroup names and hostnames.
pub fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.');
    if !ok {
        bail!("server name `{name}` must be 1-64 characters of A-Z a-z 0-9 - _ . and not start with a dot");
    }
    // The state dir's own file beside the servers' directories.
    if name == "uids" {
        bail!("server name `uids` is taken: STATE/uids records the servers' host uids; choose another name");
    }
    Ok(())
}

/// What mcpbox itself adds to a server's policy when it plans a sandbox: grants and environment
/// that no policy file can know (the prepared package in the cache, the package manager's
/// binary, the registry its configuration names). Applied on top of the policy.
#[derive(Debug, Clone, Default)]
pub struct Extra {
    pub grants: Vec<(PathBuf, Access)>,
    pub env: BTreeMap<String, String>,
    pub notes: Vec<String>,
}

pub fn plan(state: &StateDir, launch: &ServerLaunch) -> anyhow::Result<Planned> {
    plan_with(state, launch, &Extra::default())
}

/// [`plan`] with what mcpbox adds on top of the policy (see [`Extra`]).
pub fn plan_with(state: &StateDir, launch: &ServerLaunch, extra: &Extra) -> anyhow::Result<Planned> {
    plan_begin(state, launch)?.finish(launch, extra)
}

/// The first half of planning: the server's directories and host uid, and its policy. Enough
/// for sandbox-init to start on the namespaces ([`Begun::outer`]) while [`Begun::finish`]
/// resolves the grants.
pub struct Begun {
    dirs: ServerDirs,
    policy: Policy,
    notes: Vec<String>,
    outer: OuterSpec,
    /// The runtimes the policy named (`${NODE_EXE}`, `${PYTHON_STDLIB}`, …), as they described
    /// themselves: their linked libraries are granted too, and the names they are called by.
    runtimes: RuntimesUsed,
}

struct RuntimesUsed {
    found: Vec<Runtime>,
    commands: Vec<PathBuf>,
}

pub fn plan_begin(state: &StateDir, launch: &ServerLaunch) -> anyhow::Result<Begun> {
    plan_begin_checked(state, launch, None)
}

/// [`plan_begin`] with the policy [`check`] loaded for the same launch just before (`mcpbox run`
/// of a command that is not a package: nothing is prepared in between), so that it is not read
/// and resolved a second time on the way to the sandbox. Loaded again anyway when the server's
/// directories did not exist yet at the check (it could not look under them then).
pub fn plan_begin_checked(state: &StateDir, launch: &ServerLaunch, checked: Option<Checked>) -> anyhow::Result<Begun> {
    check_name(&launch.name)?;
    let root = nix::unistd::geteuid().is_root();
    let dirs = ServerDirs::create(state, &launch.name)?;
    let ids = if root { Some(allocate_uid(state, &launch.name)?) } else { None };
    if let Some((uid, gid)) = ids {
        for d in [&dirs.data, &dirs.cache, &dirs.tmp] {
            chown_tree_if_needed(d, uid, gid)?;
        }
    }

    // The runtime variables are the interpreter this command runs on (found only if the
    // policy names one); a bare command is looked up on the sandbox's default PATH.
    let (policy, mut notes, runtimes) = match checked.filter(|c| c.whole) {
        Some(Checked { policy, notes, runtimes, .. }) => (policy, notes, runtimes),
        None => {
            let lazy = runtimes_for(state, launch);
            let ctx = LoadContext { lazy: Some(lazy.vars()), ..dirs.load_context(state) };
            let (policy, notes) = launch.policy.load(&ctx).map_err(|e| anyhow::anyhow!("{e}"))?;
            (policy, notes, RuntimesUsed { found: lazy.used(), commands: lazy.commands() })
        }
    };
    for r in &runtimes.found {
        notes.push(format!("runtime {}", r.describe()));
    }
    // `[limits] disk` as root: the data dir is an image of its own (rootless, sandbox-init
    // refuses or warns, as the policy says).
    let disk = match (policy.limits.disk, ids) {
        (Some(size), Some((uid, gid))) => {
            let image = dirs.data.with_extension("img");
            if let Some(note) = ensure_disk_image(&image, size, uid, gid, &dirs.data)? {
                notes.push(note);
            }
            Some(DiskImage { image, at: dirs.data.clone() })
        }
        _ => None,
    };
    let outer = OuterSpec {
        name: launch.name.clone(),
        network: policy.network.clone(),
        limits: policy.limits.clone(),
        min_level: state.min_level.min(policy.sandbox.level),
        host_ids: ids,
        inner_uid: if root { 1000 } else { nix::unistd::getuid().as_raw() },
        inner_gid: if root { 1000 } else { nix::unistd::getgid().as_raw() },
        parent_pid: std::process::id() as i32,
        cgroup_parent: "mcpbox".into(),
        // Filled in by whoever starts sandbox-init (a forked one finds it itself).
        cgroup_layout: None,
        // The kernel's default; the supervisor may start background sandboxes lower.
        cpu_weight: None,
        relax: policy.sandbox.relax,
        disk,
        memory_merge: state.memory_merge,
    };
    Ok(Begun { dirs, policy, notes, outer, runtimes })
}

/// `mcpbox policy check`: the effective policy with the runtime variables filled in for
/// `command` (as a server with that command would get them; None: node/python3 on the sandbox's
/// PATH), and a comment line per runtime saying what it resolved to.
pub fn check_policy(
    state: &StateDir,
    reference: &str,
    data: Option<&Path>,
    cache: Option<&Path>,
    command: Option<&str>,
) -> anyhow::Result<String> {
    let launch = ServerLaunch {
        name: "check".into(),
        command: command.unwrap_or("").into(),
        args: vec![],
        env: BTreeMap::new(),
        policy: PolicyRef::Named(reference.into()),
    };
    if let Some(c) = command {
        resolve_command(c, DEFAULT_PATH)?;
    }
    let lazy = runtimes_for(state, &launch);
    let text = policy::check_with(reference, data, cache, Some(lazy.vars()), state.policy_dirs.clone())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut runtimes: String = lazy.used().iter().map(|r| format!("# runtime {}\n", r.describe())).collect();
    for c in lazy.commands() {
        runtimes.push_str(&format!("# granted with the runtime (exec, the name it is called by): {}\n", c.display()));
    }
    if !runtimes.is_empty() {
        runtimes.push_str(
            "# a launch also grants read+exec on each library listed under `links` that the policy does not cover\n",
        );
    }
    // After the header comments, before the policy itself.
    Ok(match text.split_once("\n\n") {
        Some((head, rest)) => format!("{head}\n{runtimes}\n{rest}"),
        None => format!("{runtimes}{text}"),
    })
}

/// The runtimes a launch's policy may name: the interpreter its command resolves to (a
/// virtualenv's `bin/python` leads to the interpreter it was built on), else `node`/`python3`
/// on the sandbox's PATH. Nothing under the state dir is ever run to find them.
pub fn runtimes_for(state: &StateDir, launch: &ServerLaunch) -> runtime::Lazy {
    let command_real =
        resolve_command(&launch.command, DEFAULT_PATH).ok().and_then(|p| resolve(&p).ok()).map(|(r, _)| r);
    let uids = if nix::unistd::geteuid().is_root() {
        state.uid_base..state.uid_base.saturating_add(state.uid_count)
    } else {
        0..0
    };
    runtime::Lazy::new(command_real, DEFAULT_PATH, runtime::Untrusted { root: state.root.clone(), uids })
}

/// Everything that can refuse `launch` before anything is made for it: its name, its policy
/// (loaded as a launch loads it, but without requiring DATA and CACHE to exist yet) and what
/// the policy asks of the kernel and the egress proxy. Creates nothing; `mcpbox run` calls it
/// before preparing a package, `serve` before preparing and with `--check`.
pub fn check(state: &StateDir, launch: &ServerLaunch) -> anyhow::Result<Checked> {
    check_name(&launch.name)?;
    let dirs = ServerDirs::at(state, &launch.name);
    let whole = dirs.data.is_dir() && dirs.cache.is_dir();
    // Loading refuses what a launch would refuse of the policy itself: the egress allow-list's
    // grammar and syscall names are the policy module's (allow.rs, syscalls.rs).
    let lazy = runtimes_for(state, launch);
    let ctx = LoadContext { lazy: Some(lazy.vars()), ..dirs.load_context(state) };
    let loaded = launch
        .policy
        .load_detailed(&ctx, &[dirs.data.clone(), dirs.cache.clone()])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let runtimes = RuntimesUsed { found: lazy.used(), commands: lazy.commands() };
    Ok(Checked { policy: loaded.policy, notes: loaded.notes, runtimes, whole })
}

impl Checked {
    /// Refuses `exe` unless the policy lets it be executed, decided as [`Begun::finish`] decides
    /// it for the command (its real path under an `exec` or `write` grant, or a runtime the
    /// policy named), before anything is made or prepared for the server. `what` says what the
    /// program is to the server, for the message.
    pub fn may_execute(&self, exe: &Path, what: &str) -> anyhow::Result<()> {
        let (exe_real, _) = resolve(exe)?;
        let fsys = &self.policy.filesystem;
        let granted = fsys
            .exec
            .iter()
            .chain(&fsys.write)
            .map(|r| r.path.clone())
            .chain(self.runtimes.commands.iter().cloned())
            .chain(self.runtimes.found.iter().flat_map(|r| r.libs.iter().cloned()))
            .filter_map(|p| resolve(&p).ok().map(|(real, _)| real))
            .any(|g| exe_real.starts_with(&g));
        if granted {
            return Ok(());
        }
        bail!(
            "policy {} does not allow executing {}{}{what}: add it to [filesystem] exec (or extend a runtime policy such as `node` or `python`)",
            self.policy.source,
            exe.display(),
            if exe_real != exe { format!(" (which is {})", exe_real.display()) } else { String::new() },
        )
    }
}

/// A server's policy as [`check`] loaded it (see [`plan_begin_checked`]).
pub struct Checked {
    pub policy: Policy,
    notes: Vec<String>,
    runtimes: RuntimesUsed,
    /// The server's DATA and CACHE existed: nothing under them was left unchecked, so this is
    /// the policy a launch loads.
    whole: bool,
}

impl Begun {
    /// What the outer sandbox-init needs (see `sandbox::spec`).
    pub fn outer(&self) -> &OuterSpec {
        &self.outer
    }

    /// `mcpbox policy learn`: the sandbox gets `network` instead of the policy's (its proxy in
    /// record mode). Before [`Begun::outer`] is sent.
    pub fn set_network(&mut self, network: Network) {
        self.outer.network = network.clone();
        self.policy.network = network;
    }

    /// The second half of planning: grants, environment, command; the whole spec.
    pub fn finish(self, launch: &ServerLaunch, extra: &Extra) -> anyhow::Result<Planned> {
        let Begun { dirs, policy, mut notes, outer, runtimes } = self;
        notes.extend(extra.notes.iter().cloned());
        // Grants: symlinks resolved (links recreated inside), strongest access per path, and
        // nothing that a broader grant already covers with at least the same rights.
        let mut want: BTreeMap<PathBuf, (Access, bool)> = BTreeMap::new();
        let mut links: Vec<Link> = Vec::new();
        let fsys = &policy.filesystem;
        // A symlink the server could have planted is never followed: one inside its own writable
        // grants (real paths), or, as root, in a directory owned by its host uid (another of its
        // sandboxes, or its prepare phase, writes there).
        let writable: Vec<PathBuf> =
            fsys.write.iter().filter_map(|r| resolve(&r.path).ok().map(|(real, _)| real)).collect();
        let server_uid = outer.host_ids.map(|(uid, _)| uid);
        let untrusted = |what: &Path, links: &[Link]| -> anyhow::Result<()> {
            for l in links {
                let inside = writable.iter().find(|w| l.path != **w && l.path.starts_with(w)).cloned();
                let owned = || {
                    let dir = l.path.parent()?;
                    let m = fs::symlink_metadata(dir).ok()?;
                    (Some(m.uid()) == server_uid).then(|| dir.to_path_buf())
                };
                if let Some(dir) = inside.or_else(owned) {
                    bail!(
                        "policy {}: {}: refusing to follow the symlink {} -> {}: it lies in {}, which the server can write (it may have planted it); grant the real path instead",
                        policy.source,
                        what.display(),
                        l.path.display(),
                        l.target.display(),
                        dir.display()
                    );
                }
            }
            Ok(())
        };
        for (rules, access) in [(&fsys.read, Access::Read), (&fsys.exec, Access::Exec), (&fsys.write, Access::Write)] {
            for r in rules {
                let (real, mut l) =
                    resolve(&r.path).with_context(|| format!("policy {}: {}", policy.source, r.path.display()))?;
                untrusted(&r.path, &l)?;
                // Checked again on the real path: a symlink (`/srv/x -> /`) may lead to one.
                if let Some(why) = policy::reserved_conflict(&real) {
                    bail!("policy {}: {}{why}", policy.source, via(&r.path, &real));
                }
                let dir = fs::metadata(&real).map(|m| m.is_dir()).unwrap_or(false);
                let e = want.entry(real).or_insert((access, dir));
                e.0 = e.0.max(access);
                links.append(&mut l);
            }
        }
        // The libraries the runtimes mapped at start: each file, read and exec (most lie in the
        // system library directory the default policy grants, and are dropped below as covered).
        let runtime_libs = runtimes.found.iter().flat_map(|r| r.libs.iter().map(|l| (l.clone(), Access::Exec)));
        let runtime_libs = runtime_libs.chain(runtimes.commands.iter().map(|c| (c.clone(), Access::Exec)));
        for (path, access) in extra.grants.iter().cloned().chain(runtime_libs) {
            let (path, access) = (&path, &access);
            let (real, mut l) = resolve(path).with_context(|| format!("granting {}", path.display()))?;
            untrusted(path, &l)?;
            if let Some(why) = policy::reserved_conflict(&real) {
                bail!("granting {}{why}", via(path, &real));
            }
            let dir = fs::metadata(&real).map(|m| m.is_dir()).unwrap_or(false);
            let e = want.entry(real).or_insert((*access, dir));
            e.0 = e.0.max(*access);
            links.append(&mut l);
        }
        let mut grants: Vec<Grant> = Vec::new();
        for (path, (access, dir)) in &want {
            let covered = want.iter().any(|(p, (a, d))| *d && p != path && path.starts_with(p) && *a >= *access);
            if !covered {
                grants.push(Grant { path: path.clone(), access: *access, dir: *dir });
            }
        }

        // Environment: PATH/HOME/LANG defaults, then the policy's `set`, then what it passes.
        let mut env = BTreeMap::new();
        env.insert("PATH".to_string(), DEFAULT_PATH.to_string());
        env.insert("HOME".to_string(), dirs.data.to_string_lossy().into_owned());
        env.insert("LANG".to_string(), "C.UTF-8".to_string());
        for (k, v) in &policy.env.set {
            env.insert(k.clone(), v.clone());
        }
        for name in &policy.env.pass {
            match launch.env.get(name) {
                Some(v) => {
                    env.insert(name.clone(), v.clone());
                }
                None => {
                    notes.push(format!("env {name} is passed by the policy but not set; the server will not see it"))
                }
            }
        }
        for (k, v) in &extra.env {
            env.insert(k.clone(), v.clone());
        }
        if matches!(policy.network, Network::Proxy { .. }) {
            // Loopback must go through the proxy too: nothing else is reachable.
            for (k, v) in crate::netproxy::proxy_env(crate::sandbox::PROXY_PORT) {
                env.insert(k.to_string(), v);
            }
        }

        // The command: resolved on the host against the sandbox's PATH (the view is identical),
        // and it must be executable under the policy.
        let path_var = env.get("PATH").cloned().unwrap_or_else(|| DEFAULT_PATH.to_string());
        let exe = resolve_command(&launch.command, &path_var)?;
        // Its symlinks are followed whoever made them (a venv's bin/python, made by the prepare
        // phase): what they lead to must be executable under the grants anyway.
        let (exe_real, mut exe_links) = resolve(&exe)?;
        let executable = grants.iter().any(|g| g.access >= Access::Exec && exe_real.starts_with(&g.path));
        if !executable {
            bail!(
                "policy {} does not allow executing {}{}: add it to [filesystem] exec (or extend a runtime policy such as `node` or `python`)",
                policy.source,
                exe.display(),
                if exe_real != exe { format!(" (which is {})", exe_real.display()) } else { String::new() }
            );
        }
        links.append(&mut exe_links);
        links.sort_by(|a, b| a.path.cmp(&b.path));
        links.dedup();

        let cwd = if grants.iter().any(|g| dirs.data.starts_with(&g.path)) {
            dirs.data.clone()
        } else {
            PathBuf::from("/tmp")
        };
        let mut argv = vec![exe.to_string_lossy().into_owned()];
        // `[runtime] node_flags` go first, where node takes its own options (the server's
        // arguments, and any flag its command line gives node itself, come after and win).
        let is_node = exe_real.file_name().and_then(|n| n.to_str()).is_some_and(|n| Kind::Node.matches_name(n));
        if is_node {
            argv.extend(policy.runtime.node_flags.iter().cloned());
        } else if !policy.runtime.node_flags.is_empty() {
            notes.push(format!("[runtime] node_flags not applied: the command {} is not node", exe_real.display()));
        }
        argv.extend(launch.args.iter().cloned());
        let spec = SandboxSpec {
            outer,
            argv,
            env,
            cwd,
            tmp_dir: dirs.tmp.clone(),
            grants,
            links,
            seccomp_extra_deny: policy.seccomp.extra_deny.clone(),
            seccomp_extra_allow: policy.seccomp.extra_allow.clone(),
            landlock_min_abi: policy.sandbox.landlock_min_abi,
            observe: false,
        };
        Ok(Planned { spec, policy, notes })
    }
}

/// "PATH (which is REAL): " when a symlink led elsewhere, "" otherwise (the reason names it).
fn via(path: &Path, real: &Path) -> String {
    if path == real {
        String::new()
    } else {
        format!("{} (which is {}): ", path.display(), real.display())
    }
}

/// A server's directories under the state dir.
pub struct ServerDirs {
    pub data: PathBuf,
    pub cache: PathBuf,
    pub tmp: PathBuf,
}

impl ServerDirs {
    /// Where a server's directories are (nothing is created).
    pub fn at(state: &StateDir, name: &str) -> ServerDirs {
        let base = state.root.join(name);
        ServerDirs { data: base.join("data"), cache: base.join("cache"), tmp: base.join("tmp") }
    }

    /// What a policy of this server may say `${DATA}` and `${CACHE}` for, and where named
    /// policies are looked up.
    pub fn load_context(&self, state: &StateDir) -> LoadContext {
        let mut vars = BTreeMap::new();
        vars.insert("DATA".to_string(), self.data.to_string_lossy().into_owned());
        vars.insert("CACHE".to_string(), self.cache.to_string_lossy().into_owned());
        LoadContext { vars, search_dirs: state.policy_dirs.clone(), lazy: None }
    }

    pub fn create(state: &StateDir, name: &str) -> anyhow::Result<ServerDirs> {
        let base = state.root.join(name);
        let d = ServerDirs::at(state, name);
        for p in [&d.data, &d.cache, &d.tmp] {
            fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
        }
        // Servers (each under its own uid) may traverse but not list the state dir and each
        // other's directories.
        for p in [&state.root, &base] {
            fs::set_permissions(p, fs::Permissions::from_mode(0o711))
                .with_context(|| format!("chmod {}", p.display()))?;
        }
        for p in [&d.data, &d.cache, &d.tmp] {
            fs::set_permissions(p, fs::Permissions::from_mode(0o700))
                .with_context(|| format!("chmod {}", p.display()))?;
        }
        Ok(d)
    }
}

/// Give a server's directory tree to its host uid. The server writes in these trees, so
/// nothing in them is trusted: the walk goes by descriptor, opens each directory with
/// `O_NOFOLLOW` below the one it came from, and changes owners with `fchown`/`fchownat(...,
/// AT_SYMLINK_NOFOLLOW)`; a symlink is re-owned itself and never followed, and a directory
/// swapped for one mid-walk fails to open instead of leading elsewhere.
fn chown_tree_if_needed(dir: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    use nix::fcntl::{openat, AtFlags, OFlag};
    use nix::sys::stat::{fstat, fstatat, Mode, SFlag};
    use nix::unistd::{fchown, fchownat, Gid, Uid};
    let (u, g) = (Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)));
    let dir_flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let top = nix::fcntl::open(dir, dir_flags, Mode::empty()).with_context(|| format!("opening {}", dir.display()))?;
    let st = fstat(&top).with_context(|| format!("stat {}", dir.display()))?;
    if st.st_uid == uid && st.st_gid == gid {
        return Ok(());
    }
    let mut stack = vec![(top, dir.to_path_buf())];
    while let Some((fd, path)) = stack.pop() {
        fchown(&fd, u, g).with_context(|| format!("chown {}", path.display()))?;
        let mut entries =
            nix::dir::Dir::from_fd(fd.try_clone()?).with_context(|| format!("listing {}", path.display()))?;
        for e in entries.iter() {
            let e = e.with_context(|| format!("listing {}", path.display()))?;
            let name = e.file_name();
            if name.to_bytes() == b"." || name.to_bytes() == b".." {
                continue;
            }
            let shown = path.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
            let st = fstatat(&fd, name, AtFlags::AT_SYMLINK_NOFOLLOW)
                .with_context(|| format!("stat {}", shown.display()))?;
            if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFDIR {
                let sub = openat(&fd, name, dir_flags, Mode::empty())
                    .with_context(|| format!("opening {} (without following links)", shown.display()))?;
                stack.push((sub, shown));
            } else {
                fchownat(&fd, name, u, g, AtFlags::AT_SYMLINK_NOFOLLOW)
                    .with_context(|| format!("chown {}", shown.display()))?;
            }
        }
    }
    Ok(())
}

/// Images that starts killed while making them left beside `image` (`NAME.img.new-PID`, a copy
/// of the server's data, up to the policy's size): removed once the start that made each is
/// gone.
fn remove_abandoned_images(image: &Path) {
    let (Some(dir), Some(stem)) = (image.parent(), image.file_name().and_then(|n| n.to_str())) else { return };
    let prefix = format!("{stem}.new-");
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(&prefix)).and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let gone =
            pid <= 0 || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) == Err(nix::errno::Errno::ESRCH);
        if gone {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Make the ext4 image that holds a server's data dir (`[limits] disk`, root only), if there
/// is none yet: `size` bytes, sparse, root-owned and private, its root directory owned by the
/// server's uid, filled with what the data dir held before (so that turning the limit on keeps
/// the server's data). Made beside and then linked into place, so that starts racing here
/// agree on one image. An image of another size is kept as it is (noted): resize it with the
/// server stopped (`e2fsck -f` then `resize2fs`).
fn ensure_disk_image(image: &Path, size: u64, uid: u32, gid: u32, data: &Path) -> anyhow::Result<Option<String>> {
    use std::os::unix::fs::OpenOptionsExt;
    remove_abandoned_images(image);
    match fs::symlink_metadata(image) {
        Ok(m) if m.is_file() && m.uid() == 0 => {
            return Ok((m.len() != size).then(|| {
                format!("{} is {}, the policy's [limits] disk says {}: the image keeps its size until it is resized (e2fsck -f, resize2fs)", image.display(), policy::format_size(m.len()), policy::format_size(size))
            }));
        }
        Ok(_) => bail!(
            "{} is not a regular file owned by root: remove it (mcpbox makes the data dir's disk image there)",
            image.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("stat {}", image.display())),
    }
    let tmp = image.with_extension(format!("img.new-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.set_len(size).with_context(|| format!("sizing {}", tmp.display()))?;
    drop(f);
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0", "-E"])
        .arg(format!("root_owner={uid}:{gid},lazy_itable_init=1,lazy_journal_init=1"))
        .arg("-d")
        .arg(data)
        .arg(&tmp)
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .output();
    let made = match out {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(anyhow::anyhow!("mkfs.ext4 failed ({}): {}", o.status, String::from_utf8_lossy(&o.stderr).trim())),
        Err(e) => {
            Err(anyhow::anyhow!("running mkfs.ext4: {e} (install e2fsprogs, or remove [limits] disk from the policy)"))
        }
    };
    let placed = made.and_then(|()| match fs::hard_link(&tmp, image) {
        Ok(()) => Ok(()),
        // Another start made it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(anyhow::Error::from(e).context(format!("placing {}", image.display()))),
    });
    let _ = fs::remove_file(&tmp);
    placed.with_context(|| {
        format!("making the disk image {} ([limits] disk = {})", image.display(), policy::format_size(size))
    })?;
    Ok(None)
}

/// A stable host uid per server name, from the configured range, recorded in `STATE/uids`.
pub fn allocate_uid(state: &StateDir, name: &str) -> anyhow::Result<(u32, u32)> {
    let path = state.root.join("uids");
    let file = fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", path.display()))?;
    let mut used = Vec::new();
    for line in std::io::BufReader::new(&*lock).lines() {
        let line = line?;
        let mut it = line.split_whitespace();
        if let (Some(n), Some(u)) = (it.next(), it.next().and_then(|u| u.parse::<u32>().ok())) {
            if n == name {
                if host_ids().iter().any(|r| r.contains(&u)) {
                    tracing::warn!(
                        server = %name,
                        uid = u,
                        "this server's host uid is also an account's or in a user's /etc/subuid or /etc/subgid range (given before mcpbox checked): that user can become it and reach the server's data; remove its line from {} to give it a new uid",
                        path.display()
                    );
                }
                return Ok((u, u));
            }
            used.push(u);
        }
    }
    // Never one the host has given out: an account's uid or gid (the server's gid is its uid),
    // or one in a user's subordinate range (/etc/subuid, /etc/subgid), whose owner can become it
    // in a user namespace of their own and so reach the server's data and processes.
    let uid = pick_uid(state.uid_base, state.uid_count, &used, &host_ids()).with_context(|| {
            format!(
                "no free uid left in {}..+{} (the host's accounts and /etc/subuid and /etc/subgid ranges excluded): set mcpbox.uidBase in the config",
            state.uid_base, state.uid_count
        )
    })?;
    writeln!(&mut *lock, "{name} {uid}")?;
    Ok((uid, uid))
}

/// The first uid of `base..base+count` that is neither `used` nor in one of the `host` ranges.
fn pick_uid(base: u32, count: u32, used: &[u32], host: &[std::ops::Range<u32>]) -> Option<u32> {
    (base..base.saturating_add(count)).find(|u| *u != 0 && !used.contains(u) && !host.iter().any(|r| r.contains(u)))
}

/// The ids this host has given out: accounts' uids (/etc/passwd) and groups' gids (/etc/group),
/// and the subordinate ranges of /etc/subuid and /etc/subgid.
pub fn host_ids() -> Vec<std::ops::Range<u32>> {
    let mut out = Vec::new();
    for (file, field) in [("/etc/passwd", 2), ("/etc/group", 2)] {
        for line in fs::read_to_string(file).unwrap_or_default().lines() {
            if let Some(id) = line.split(':').nth(field).and_then(|v| v.parse::<u32>().ok()) {
                out.push(id..id.saturating_add(1));
            }
        }
    }
    for file in ["/etc/subuid", "/etc/subgid"] {
        for line in fs::read_to_string(file).unwrap_or_default().lines() {
            let mut f = line.split(':').skip(1).map(|v| v.trim().parse::<u32>().ok());
            if let (Some(Some(start)), Some(Some(count))) = (f.next(), f.next()) {
                out.push(start..start.saturating_add(count));
            }
        }
    }
    out
}

/// Find a bare command name on `path_var`, as execvp would (on the host view, which the
/// sandbox shares for granted paths).
pub fn resolve_command(command: &str, path_var: &str) -> anyhow::Result<PathBuf> {
    if command.contains('/') {
        let p = Path::new(command);
        let abs = if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir()?.join(p) };
        if !abs.is_file() {
            bail!("command {} does not exist", abs.display());
        }
        return Ok(normalize(&abs));
    }
    for dir in path_var.split(':').filter(|d| d.starts_with('/')) {
        let c = Path::new(dir).join(command);
        if let Ok(m) = fs::metadata(&c) {
            if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                return Ok(c);
            }
        }
    }
    bail!("command `{command}` not found on the sandbox's PATH ({path_var})")
}

fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

/// The names and `..` steps of `p`, last first (a stack to pop from the front of the path).
fn reversed_parts(p: &Path) -> Vec<std::ffi::OsString> {
    let mut parts: Vec<std::ffi::OsString> = p
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    parts.reverse();
    parts
}

/// Resolve every symlink in `p`, returning the real path and the links met on the way (each to
/// be recreated inside the sandbox so the path works there as it does on the host).
pub fn resolve(p: &Path) -> anyhow::Result<(PathBuf, Vec<Link>)> {
    let mut links = Vec::new();
    let mut cur = PathBuf::from("/");
    let mut rest = reversed_parts(p);
    let mut hops = 0;
    while let Some(c) = rest.pop() {
        if c == ".." {
            cur.pop();
            continue;
        }
        let next = cur.join(&c);
        let m = fs::symlink_metadata(&next).with_context(|| format!("{} does not exist", next.display()))?;
        if m.file_type().is_symlink() {
            hops += 1;
            if hops > 40 {
                bail!("too many symlinks resolving {}", p.display());
            }
            let target = fs::read_link(&next)?;
            links.push(Link { path: next.clone(), target: target.clone() });
            if target.is_absolute() {
                cur = PathBuf::from("/");
            }
            rest.extend(reversed_parts(&target));
        } else {
            cur = next;
        }
    }
    Ok((cur, links))
}

#[cfg(test)]
mod tests {
    #[test]
    fn images_left_by_killed_starts_are_removed_and_a_running_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        let image = d.path().join("data.img");
        // Beyond pid_max: no such process.
        let dead = d.path().join("data.img.new-2147483646");
        let live = d.path().join(format!("data.img.new-{}", std::process::id()));
        let other = d.path().join("data.img.new-x");
        for f in [&dead, &live, &other] {
            std::fs::write(f, "x").unwrap();
        }
        super::remove_abandoned_images(&image);
        assert!(!dead.exists());
        assert!(live.exists() && other.exists());
    }

    #[test]
    fn a_server_cannot_be_named_after_the_state_dirs_own_file() {
        assert!(super::check_name("uids").unwrap_err().to_string().contains("STATE/uids"));
        super::check_name("uids2").unwrap();
    }

    #[test]
    fn a_new_uid_is_never_an_account_or_in_a_subordinate_range() {
        let host = vec![200_000..200_003, 200_005..200_006];
        assert_eq!(super::pick_uid(200_000, 10, &[], &host), Some(200_003));
        assert_eq!(super::pick_uid(200_000, 10, &[200_003, 200_004], &host), Some(200_006));
        assert_eq!(super::pick_uid(200_000, 3, &[], &host), None);
        // What this host has given out is read as such (CI's test users have subuid ranges).
        let ids = super::host_ids();
        for line in std::fs::read_to_string("/etc/subuid").unwrap_or_default().lines() {
            let f: Vec<&str> = line.split(':').collect();
            let (start, count): (u32, u32) = (f[1].parse().unwrap(), f[2].parse().unwrap());
            assert!(ids.iter().any(|r| r.start == start && r.end == start + count), "{line}: {ids:?}");
        }
        assert!(ids.iter().any(|r| r.contains(&0)), "root's uid is an account's");
        assert!(!ids.iter().any(|r| r.contains(&super::DEFAULT_UID_BASE)), "{ids:?}");
    }

    use super::*;

    #[test]
    fn resolve_follows_relative_and_absolute_links() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real");
        fs::create_dir(&real).unwrap();
        fs::write(real.join("f"), "x").unwrap();
        std::os::unix::fs::symlink("real", d.path().join("rel")).unwrap();
        std::os::unix::fs::symlink(d.path().join("rel"), d.path().join("abs")).unwrap();
        let base = fs::canonicalize(d.path()).unwrap();
        let (p, links) = resolve(&base.join("abs/f")).unwrap();
        assert_eq!(p, base.join("real/f"));
        assert_eq!(links.len(), 2);
        assert_eq!(links[0].path, base.join("abs"));
        assert_eq!(links[1].target, PathBuf::from("real"));
    }

    /// The ownership walk changes what is in the tree, symlinks included (themselves), and
    /// nothing a symlink points at. As root it gives the tree to another uid; otherwise to our
    /// own (the same walk, owners unchanged).
    #[test]
    fn ownership_walk_never_follows_links() {
        use std::os::unix::fs::symlink;
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("tree");
        let outside = d.path().join("outside");
        fs::create_dir_all(tree.join("sub/deeper")).unwrap();
        fs::create_dir_all(outside.join("dir")).unwrap();
        fs::write(tree.join("sub/file"), "x").unwrap();
        fs::write(outside.join("secret"), "s").unwrap();
        fs::write(outside.join("dir/inner"), "i").unwrap();
        symlink(outside.join("secret"), tree.join("link-to-file")).unwrap();
        symlink(outside.join("dir"), tree.join("sub/link-to-dir")).unwrap();
        let me = (nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw());
        let (uid, gid) = if me.0 == 0 { (54321, 54321) } else { me };
        chown_tree_if_needed(&tree, uid, gid).unwrap();
        let owner = |p: &Path| fs::symlink_metadata(p).map(|m| (m.uid(), m.gid())).unwrap();
        for p in ["", "sub", "sub/deeper", "sub/file", "link-to-file", "sub/link-to-dir"] {
            assert_eq!(owner(&tree.join(p)), (uid, gid), "{p}");
        }
        for p in ["", "secret", "dir", "dir/inner"] {
            assert_eq!(owner(&outside.join(p)), me, "outside/{p} was changed through a link");
        }
        // A tree whose top is a symlink is refused outright.
        let top_link = d.path().join("top-link");
        symlink(&outside, &top_link).unwrap();
        let e = chown_tree_if_needed(&top_link, uid + 1, gid + 1).unwrap_err();
        // O_DIRECTORY | O_NOFOLLOW on a symlink: ENOTDIR (ELOOP without O_DIRECTORY).
        let msg = format!("{e:#}");
        assert!(msg.contains("top-link") && ["ENOTDIR", "ELOOP"].iter().any(|errno| msg.contains(errno)), "{msg}");
        assert_eq!(owner(&outside), me);
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("fetch").is_ok());
        assert!(check_name("../x").is_err());
        assert!(check_name("").is_err());
        assert!(check_name(".hidden").is_err());
    }

    #[test]
    fn bare_commands_resolve_on_path() {
        assert_eq!(resolve_command("true", DEFAULT_PATH).unwrap(), PathBuf::from("/usr/bin/true"));
        assert!(resolve_command("no-such-command-here", DEFAULT_PATH).is_err());
    }
}

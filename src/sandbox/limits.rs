//! Resource limits: cgroup v2 where the host gives us a writable hierarchy with the controller,
//! cgroup v1 where that is what the host mounts, rlimits otherwise (and always for open files,
//! file size and core dumps).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nix::sys::resource::{setrlimit, Resource};

use crate::policy::Limits;

#[derive(Debug, thiserror::Error)]
#[error("cgroup {path}: {source}")]
pub struct CgroupError {
    pub path: PathBuf,
    pub source: io::Error,
}

/// How each limit ended up enforced.
#[derive(Debug, Default, Clone)]
pub struct Applied {
    /// e.g. "pids: cgroup v1, memory: cgroup v1".
    pub summary: String,
    pub dirs: Vec<PathBuf>,
    pub pids_by_cgroup: bool,
    pub memory_by_cgroup: bool,
    /// `cpu.max` (v2) or the CFS quota (v1) holds the server to its `[limits] cpu`, and its
    /// weight is set: the CPU limit needs a cgroup, there is no rlimit for a rate.
    pub cpu_by_cgroup: bool,
    pub warnings: Vec<String>,
}

/// Where the controllers live on this host.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Layout {
    /// Mount point of the cgroup v2 hierarchy, if any, with its available controllers.
    pub v2: Option<(PathBuf, Vec<String>)>,
    /// v1 mount points by controller name.
    pub v1_pids: Option<PathBuf>,
    pub v1_memory: Option<PathBuf>,
    #[serde(default)]
    pub v1_cpu: Option<PathBuf>,
    /// mcpbox's own cgroups: the sandboxes' cgroups are made under them.
    #[serde(default)]
    pub own: Own,
}

/// mcpbox's own cgroup in each hierarchy, relative to its mount point (`/proc/self/cgroup`,
/// without a trailing [`SUPERVISOR_LEAF`]; empty where unknown: the hierarchy's root).
///
/// The sandboxes' cgroups go under it, not at the hierarchy's root, so that whatever confines
/// mcpbox confines them too: a systemd unit's `TasksMax`, `MemoryMax` and `KillMode`, a
/// container's limits, and the delegation that makes a subtree writable in the first place.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Own {
    pub v2: PathBuf,
    pub pids: PathBuf,
    pub memory: PathBuf,
    #[serde(default)]
    pub cpu: PathBuf,
}

/// The cgroup v2 leaf mcpbox moves itself into, inside its own cgroup, when it first makes a
/// sandbox's cgroup there: a non-root cgroup v2 that hands controllers to its children may hold
/// no process itself (the "no internal processes" rule), so mcpbox leaves its cgroup to the
/// sandboxes' parent (`mcpbox/`) and this leaf, side by side. A service manager may start it
/// there directly (systemd 254 and later: `DelegateSubgroup=mcpbox-supervisor`).
pub const SUPERVISOR_LEAF: &str = "mcpbox-supervisor";

impl Layout {
    /// The directory of mcpbox's own cgroup in the v2 hierarchy.
    pub fn own_v2(&self) -> Option<PathBuf> {
        self.v2.as_ref().map(|(root, _)| under(root, &self.own.v2))
    }
}

/// `rel` (a cgroup path as /proc shows it) under the mount point `root`.
fn under(root: &Path, rel: &Path) -> PathBuf {
    match rel.strip_prefix("/").unwrap_or(rel) {
        r if r.as_os_str().is_empty() => root.to_path_buf(),
        r => root.join(r),
    }
}

/// mcpbox's own cgroups, from `/proc/self/cgroup` (`ID:CONTROLLERS:PATH` lines; v2 is `0::PATH`).
fn read_own() -> Own {
    let mut own = Own::default();
    let text = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    for line in text.lines() {
        let mut it = line.splitn(3, ':');
        let (Some(id), Some(ctls), Some(path)) = (it.next(), it.next(), it.next()) else { continue };
        let mut path = PathBuf::from(path);
        // Already moved into the leaf (or started there): the cgroup we own is its parent.
        if path.file_name().is_some_and(|n| n == SUPERVISOR_LEAF) {
            path.pop();
        }
        if id == "0" && ctls.is_empty() {
            own.v2 = path;
        } else {
            for c in ctls.split(',') {
                match c {
                    "pids" => own.pids = path.clone(),
                    "memory" => own.memory = path.clone(),
                    "cpu" => own.cpu = path.clone(),
                    _ => {}
                }
            }
        }
    }
    own
}

/// The host's cgroup layout, read on first use: mounts do not move under a running mcpbox.
pub fn layout() -> Layout {
    static LAYOUT: std::sync::OnceLock<Layout> = std::sync::OnceLock::new();
    LAYOUT.get_or_init(read_layout).clone()
}

fn read_layout() -> Layout {
    let mut l = Layout { own: read_own(), ..Layout::default() };
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for line in mounts.lines() {
        let Some((pre, post)) = line.split_once(" - ") else { continue };
        let mount_point = pre.split_whitespace().nth(4).unwrap_or("");
        let mut post = post.split_whitespace();
        let fstype = post.next().unwrap_or("");
        let opts = post.nth(1).unwrap_or("");
        if fstype == "cgroup2" && l.v2.is_none() {
            let ctrl = fs::read_to_string(Path::new(mount_point).join("cgroup.controllers")).unwrap_or_default();
            l.v2 = Some((mount_point.into(), ctrl.split_whitespace().map(String::from).collect()));
        } else if fstype == "cgroup" {
            for o in opts.split(',') {
                match o {
                    "pids" => l.v1_pids = Some(mount_point.into()),
                    "memory" => l.v1_memory = Some(mount_point.into()),
                    "cpu" => l.v1_cpu = Some(mount_point.into()),
                    _ => {}
                }
            }
        }
    }
    l
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|source| CgroupError { path: path.to_path_buf(), source })
}

/// [`write`] for the CPU controller's files, skipped when the file already says `value`: a
/// reused slot usually does, and each write of a CFS quota or period walks the task group's
/// bandwidth state (`tg_set_bandwidth`: ~80 µs of every start here, on the path of `run`).
fn set_cpu_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    if fs::read_to_string(path).is_ok_and(|now| now.trim() == value) {
        return Ok(());
    }
    write(path, value)
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError { path: path.to_path_buf(), source }),
    }
}

/// The lock on a claimed cgroup slot (released when dropped or when the process exits).
pub type Slot = nix::fcntl::Flock<fs::File>;

/// A cgroup for one sandbox of server `name`: the first of `NAME.0`, `NAME.1`, … under `parent`
/// that no running sandbox holds. A sandbox holds its slot with an exclusive `flock` on the
/// directory, for as long as the returned file is open; its processes die with the sandbox, so
/// a free slot is empty (anything still inside was left by a sandbox whose supervisor was
/// killed, and is killed here). Slots are kept and reused: creating and removing a memory
/// cgroup per start costs ~0.2 ms, and removed memory cgroups linger in the kernel while pages
/// are still charged to them.
fn claim_slot(parent: &Path, name: &str, warnings: &mut Vec<String>) -> Result<(PathBuf, Slot), CgroupError> {
    use std::os::unix::fs::OpenOptionsExt;
    for k in 0..4096 {
        let dir = parent.join(format!("{name}.{k}"));
        mkdir(&dir)?;
        let f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(&dir)
            .map_err(|source| CgroupError { path: dir.clone(), source })?;
        match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            // A sweep may have removed the slot between our mkdir and the lock: take another.
            Ok(_) if !dir.exists() => continue,
            Ok(lock) => {
                let killed = kill_members(std::slice::from_ref(&dir));
                if killed > 0 {
                    warnings.push(format!(
                        "killed {killed} process(es) left in {} by a sandbox whose mcpbox was killed",
                        dir.display()
                    ));
                }
                return Ok((dir, lock));
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => continue,
            Err((_, e)) => return Err(CgroupError { path: dir, source: e.into() }),
        }
    }
    Err(CgroupError { path: parent.join(format!("{name}.*")), source: io::Error::other("every slot is in use") })
}

/// Claim this sandbox's cgroups (see [`claim_slot`]), set their limits and move the calling
/// process into them. Needs host root (it runs in sandbox-init before the uid is dropped).
/// Failures degrade to rlimits with a warning: rlimits are applied in any case by
/// [`apply_rlimits`]. The returned files hold the slots: keep them open while the sandbox runs.
///
/// `cpu_weight` is the sandbox's share of contended CPU against its siblings (cgroup v2
/// `cpu.weight`, 1-10000, 100 when None; v1 `cpu.shares` scaled to match): the supervisor can
/// start warm-pool and background sandboxes lower, so that they yield to live sessions.
pub fn join_cgroups(
    l: &Layout,
    limits: &Limits,
    cpu_weight: Option<u32>,
    parent: &str,
    name: &str,
    mcpbox: u32,
) -> (Applied, Vec<Slot>) {
    let mut a = Applied::default();
    let mut held = Vec::new();
    // Warnings from claiming slots (closures below cannot borrow `a` mutably as well).
    let mut left = Vec::new();
    let me = std::process::id().to_string();
    let mut parts = Vec::new();

    // cgroup v2 first: one directory carries both controllers.
    if let Some((root, ctrls)) = &l.v2 {
        let want: Vec<&str> = ["pids", "memory"].into_iter().filter(|c| ctrls.iter().any(|x| x == c)).collect();
        if !want.is_empty() {
            let mut attempt = |base: &Path| -> Result<(PathBuf, Slot, Result<(), CgroupError>), CgroupError> {
                let enable: String = want.iter().map(|c| format!("+{c} ")).collect();
                enable_below(base, enable.trim(), mcpbox)?;
                let p = base.join(parent);
                mkdir(&p)?;
                write(&p.join("cgroup.subtree_control"), enable.trim())?;
                // The cpu controller on its own: it may be refused (realtime tasks outside the
                // root cgroup) without costing the others.
                if ctrls.iter().any(|c| c == "cpu") {
                    let _ = enable_below(base, "+cpu", mcpbox);
                    let _ = write(&p.join("cgroup.subtree_control"), "+cpu");
                }
                let (dir, slot) = claim_slot(&p, name, &mut left)?;
                // Every value is written, "max" included: a reused slot keeps the previous
                // sandbox's.
                let or_max = |v: Option<u64>| v.map_or_else(|| "max".to_string(), |n| n.to_string());
                if want.contains(&"pids") {
                    write(&dir.join("pids.max"), &or_max(limits.pids))?;
                }
                if want.contains(&"memory") {
                    write(&dir.join("memory.max"), &or_max(limits.memory))?;
                    let _ = write(&dir.join("memory.swap.max"), if limits.memory.is_some() { "0" } else { "max" });
                }
                let cpu = set_cpu_v2(&dir, limits.cpu, cpu_weight);
                write(&dir.join("cgroup.procs"), &me)?;
                Ok((dir, slot, cpu))
            };
            // Under mcpbox's own cgroup; where that cannot be done, at the root as before.
            let own = under(root, &l.own.v2);
            let res = attempt(&own).or_else(|e| {
                if &own == root {
                    return Err(e);
                }
                a.warnings.push(outside_own(&own, &e));
                attempt(root)
            });
            match res {
                Ok((dir, slot, cpu)) => {
                    match cpu {
                        Ok(()) => {
                            a.cpu_by_cgroup = true;
                            parts.push("cpu: cgroup v2".into());
                        }
                        Err(e) if limits.cpu.is_some() || cpu_weight.is_some() => {
                            a.warnings.push(format!("cgroup v2 cpu controller not usable ({e})"))
                        }
                        Err(_) => {}
                    }
                    a.dirs.push(dir);
                    held.push(slot);
                    for c in &want {
                        parts.push(format!("{c}: cgroup v2"));
                        if *c == "pids" {
                            a.pids_by_cgroup = true
                        }
                        if *c == "memory" {
                            a.memory_by_cgroup = true
                        }
                    }
                }
                Err(e) => a.warnings.push(format!("cgroup v2 not usable ({e}); trying cgroup v1 / rlimits")),
            }
        }
    }
    // cgroup v1 for whatever v2 did not cover.
    let v1 = [
        ("pids", l.v1_pids.clone(), "pids.max", limits.pids),
        ("memory", l.v1_memory.clone(), "memory.limit_in_bytes", limits.memory),
    ];
    for (ctl, mount, file, value) in v1 {
        let covered = if ctl == "pids" { a.pids_by_cgroup } else { a.memory_by_cgroup };
        let (Some(mount), Some(value)) = (mount, value) else { continue };
        if covered {
            continue;
        }
        let own = under(&mount, if ctl == "pids" { &l.own.pids } else { &l.own.memory });
        let mut attempt = |base: &Path| -> Result<(PathBuf, Slot), CgroupError> {
            let p = base.join(parent);
            mkdir(&p)?;
            let (dir, slot) = claim_slot(&p, name, &mut left)?;
            if ctl == "memory" {
                // memory+swap may never be below memory alone: lift it first (a reused slot
                // keeps the previous sandbox's values). Without swap accounting these files are
                // absent; then there is no swap to limit.
                let _ = write(&dir.join("memory.memsw.limit_in_bytes"), "-1");
                write(&dir.join(file), &value.to_string())?;
                let _ = write(&dir.join("memory.memsw.limit_in_bytes"), &value.to_string());
            } else {
                write(&dir.join(file), &value.to_string())?;
            }
            // Move this (single-threaded) process by writing "0" to `tasks`: a thread moving
            // itself skips the global threadgroup lock, whose RCU grace period otherwise costs
            // milliseconds per start; for one thread it is the whole process.
            write(&dir.join("tasks"), "0")?;
            Ok((dir, slot))
        };
        let res = attempt(&own).or_else(|e| {
            if own == mount {
                return Err(e);
            }
            a.warnings.push(outside_own(&own, &e));
            attempt(&mount)
        });
        match res {
            Ok((dir, slot)) => {
                a.dirs.push(dir);
                held.push(slot);
                parts.push(format!("{ctl}: cgroup v1"));
                if ctl == "pids" {
                    a.pids_by_cgroup = true
                } else {
                    a.memory_by_cgroup = true
                }
            }
            Err(e) => a.warnings.push(format!("cgroup v1 {ctl} not usable ({e}); using rlimits")),
        }
    }
    if let (false, Some(mount)) = (a.cpu_by_cgroup, &l.v1_cpu) {
        let own = under(mount, &l.own.cpu);
        let mut attempt = |base: &Path| -> Result<(PathBuf, Slot), CgroupError> {
            let p = base.join(parent);
            mkdir(&p)?;
            let (dir, slot) = claim_slot(&p, name, &mut left)?;
            // Every value is written, "no limit" included: a reused slot keeps the previous
            // sandbox's.
            set_cpu_file(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
            set_cpu_file(
                &dir.join("cpu.cfs_quota_us"),
                &limits.cpu.map_or_else(|| "-1".to_string(), |m| quota_us(m).to_string()),
            )?;
            set_cpu_file(&dir.join("cpu.shares"), &(u64::from(weight(cpu_weight)) * 1024 / 100).max(2).to_string())?;
            write(&dir.join("tasks"), "0")?;
            Ok((dir, slot))
        };
        let res = attempt(&own).or_else(|e| {
            if &own == mount {
                return Err(e);
            }
            a.warnings.push(outside_own(&own, &e));
            attempt(mount)
        });
        match res {
            Ok((dir, slot)) => {
                a.dirs.push(dir);
                held.push(slot);
                parts.push("cpu: cgroup v1".into());
                a.cpu_by_cgroup = true;
            }
            Err(e) => a.warnings.push(format!("cgroup v1 cpu not usable ({e})")),
        }
    }
    if !a.pids_by_cgroup && limits.pids.is_some() {
        parts.push("pids: rlimit (RLIMIT_NPROC)".into());
    }
    if !a.memory_by_cgroup && limits.memory.is_some() {
        parts.push("memory: rlimit (RLIMIT_DATA, approximate)".into());
    }
    a.summary = parts.join(", ");
    a.warnings.append(&mut left);
    (a, held)
}

/// The warning for a sandbox whose cgroup could not go under mcpbox's own.
fn outside_own(own: &Path, e: &CgroupError) -> String {
    format!(
        "cannot make the sandbox's cgroup under mcpbox's own cgroup {} ({e}); made at the hierarchy's root instead, \
         where the limits and the stop of whatever runs mcpbox (a systemd unit's TasksMax/KillMode) do not reach it: \
         give mcpbox a delegated cgroup of its own (systemd: `Delegate=yes`, see docs/DEPLOY.md)",
        own.display()
    )
}

/// Let the children of `base` (cgroup v2) use the controllers in `enable` ("+pids +memory").
///
/// cgroup v2 allows no process in a non-root cgroup that hands controllers to its children. mcpbox
/// itself lives in `base` (its own cgroup) at first: then it is moved, with any child of it still
/// there (sandbox-inits, this one included), into the leaf [`SUPERVISOR_LEAF`], and the write is
/// tried again. Processes that are not mcpbox's keep it from working: an error that says so.
fn enable_below(base: &Path, enable: &str, mcpbox: u32) -> Result<(), CgroupError> {
    let file = base.join("cgroup.subtree_control");
    for _ in 0..5 {
        match write(&file, enable) {
            Err(e) if e.source.raw_os_error() == Some(libc::EBUSY) => {}
            done => return done,
        }
        let procs_file = base.join("cgroup.procs");
        let procs =
            fs::read_to_string(&procs_file).map_err(|source| CgroupError { path: procs_file.clone(), source })?;
        let parent_of = |pid: u32| -> Option<u32> {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
        };
        let pids: Vec<u32> = procs.lines().filter_map(|l| l.trim().parse().ok()).collect();
        let (ours, others): (Vec<u32>, Vec<u32>) =
            pids.iter().partition(|p| **p == mcpbox || parent_of(**p) == Some(mcpbox));
        // Moving mcpbox would not help then; it stays where it is.
        if !others.is_empty() || ours.is_empty() {
            return Err(CgroupError {
                path: base.to_path_buf(),
                source: io::Error::other(format!(
                    "processes other than mcpbox's live in it ({others:?}), and cgroup v2 lets no process stay in a cgroup that hands controllers to its children"
                )),
            });
        }
        let leaf = base.join(SUPERVISOR_LEAF);
        mkdir(&leaf)?;
        for pid in ours {
            match write(&leaf.join("cgroup.procs"), &pid.to_string()) {
                // Exited meanwhile.
                Err(e) if e.source.raw_os_error() == Some(libc::ESRCH) => {}
                r => r?,
            }
        }
    }
    write(&file, enable)
}

/// The CFS period every sandbox gets (the kernel's default): a quota is cores × this.
pub const CPU_PERIOD_US: u64 = 100_000;

/// Quota per period for `milli` thousandths of a core.
fn quota_us(milli: u32) -> u64 {
    u64::from(milli) * CPU_PERIOD_US / 1000
}

fn weight(w: Option<u32>) -> u32 {
    w.unwrap_or(100).clamp(1, 10_000)
}

/// What `cpu.max` gets for a limit of `milli` thousandths of a core ("max" for none).
pub fn cpu_max(milli: Option<u32>) -> String {
    match milli {
        Some(m) => format!("{} {CPU_PERIOD_US}", quota_us(m)),
        None => format!("max {CPU_PERIOD_US}"),
    }
}

/// Change the CPU weight of a running sandbox, in whichever of its cgroup directories carry
/// the cpu controller (v2 `cpu.weight`, v1 `cpu.shares` scaled as at start). Returns how many
/// directories were written; 0 where the sandbox has no cpu cgroup (rootless).
pub fn set_cpu_weight(dirs: &[PathBuf], w: u32) -> Result<usize, CgroupError> {
    let mut n = 0;
    for d in dirs {
        if d.join("cpu.weight").exists() {
            write(&d.join("cpu.weight"), &weight(Some(w)).to_string())?;
            n += 1;
        } else if d.join("cpu.shares").exists() {
            write(&d.join("cpu.shares"), &(u64::from(weight(Some(w))) * 1024 / 100).max(2).to_string())?;
            n += 1;
        }
    }
    Ok(n)
}

/// Memory a sandbox holds of its own now: what its memory cgroup charges for anonymous memory
/// and kernel objects (v2 `memory.stat` anon + kernel, v1 `rss`), without the page cache, which
/// the first sandbox to read a runtime's files is charged for and all others share.
pub fn memory_own(dirs: &[PathBuf]) -> Option<u64> {
    dirs.iter().find_map(|d| {
        let stat = std::fs::read_to_string(d.join("memory.stat")).ok()?;
        let mut n = None;
        for line in stat.lines() {
            let (k, v) = line.split_once(' ')?;
            if matches!(k, "anon" | "kernel" | "rss") {
                *n.get_or_insert(0) += v.trim().parse::<u64>().ok()?;
            }
        }
        n
    })
}

fn set_cpu_v2(dir: &Path, milli: Option<u32>, w: Option<u32>) -> Result<(), CgroupError> {
    set_cpu_file(&dir.join("cpu.max"), &cpu_max(milli))?;
    set_cpu_file(&dir.join("cpu.weight"), &weight(w).to_string())
}

/// What limits are enforced without cgroups (rootless).
pub fn rlimit_only(limits: &Limits) -> Applied {
    let mut parts = Vec::new();
    if limits.pids.is_some() {
        parts.push("pids: rlimit (RLIMIT_NPROC)".to_string());
    }
    if limits.memory.is_some() {
        parts.push("memory: rlimit (RLIMIT_DATA, approximate)".to_string());
    }
    Applied { summary: parts.join(", "), ..Default::default() }
}

/// rlimits for the server process itself (called last thing before the filters).
pub fn apply_rlimits(limits: &Limits, applied: &Applied) -> io::Result<()> {
    let set = |r: Resource, v: u64| setrlimit(r, v, v).map_err(io::Error::from);
    set(Resource::RLIMIT_CORE, 0)?;
    if let Some(n) = limits.open_files {
        set(Resource::RLIMIT_NOFILE, n)?;
    }
    if let Some(n) = limits.file_size {
        set(Resource::RLIMIT_FSIZE, n)?;
    }
    if !applied.pids_by_cgroup {
        if let Some(n) = limits.pids {
            set(Resource::RLIMIT_NPROC, n)?;
        }
    }
    if !applied.memory_by_cgroup {
        if let Some(n) = limits.memory {
            set(Resource::RLIMIT_DATA, n)?;
        }
    }
    Ok(())
}

/// Kill whatever is still in these cgroups (container level, after the server exits).
/// Returns how many processes were sent SIGKILL.
pub fn kill_members(dirs: &[PathBuf]) -> usize {
    let me = std::process::id();
    let mut killed = 0;
    for d in dirs {
        if let Ok(s) = fs::read_to_string(d.join("cgroup.procs")) {
            for pid in s.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                if pid as u32 != me
                    && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)
                        .is_ok()
                {
                    killed += 1;
                }
            }
        }
    }
    killed
}

/// Tidy the sandboxes' cgroup parent: remove directories left by older mcpbox versions
/// (`SERVER-PID`, one per sandbox) whose sandbox-init is gone, killing anything still inside, and
/// free extra slots (`SERVER.K`, K > 0, made when several sandboxes of one server ran at once)
/// that no sandbox holds. Each server's first slot stays for reuse. Returns how many were
/// removed.
pub fn sweep_stale(parent: &str) -> usize {
    let l = layout();
    // Under mcpbox's own cgroups, and at the roots (where older versions, and the fallback of
    // `join_cgroups`, make them).
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Some((p, _)) = &l.v2 {
        roots.push(under(p, &l.own.v2).join(parent));
        roots.push(p.join(parent));
    }
    for (mount, own) in [(&l.v1_pids, &l.own.pids), (&l.v1_memory, &l.own.memory), (&l.v1_cpu, &l.own.cpu)] {
        if let Some(m) = mount {
            roots.push(under(m, own).join(parent));
            roots.push(m.join(parent));
        }
    }
    roots.dedup();
    sweep_stale_in(roots)
}

/// [`sweep_stale`] over parent directories already known (those of a running sandbox's own
/// cgroups), without reading the mount table.
pub fn sweep_stale_in(roots: impl IntoIterator<Item = PathBuf>) -> usize {
    let mut removed = 0;
    for root in roots {
        let Ok(entries) = fs::read_dir(&root) else { continue };
        for e in entries.flatten() {
            // Most entries are the controller's own files: skip them by name and by the
            // directory entry's type, without a stat each.
            let name = e.file_name().to_string_lossy().into_owned();
            let legacy_pid = name.rsplit_once('-').and_then(|(_, p)| p.parse::<u32>().ok());
            let extra_slot = name.rsplit_once('.').and_then(|(_, k)| k.parse::<u32>().ok()).is_some_and(|k| k > 0);
            if legacy_pid.is_none() && !extra_slot {
                continue;
            }
            if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let path = e.path();
            if let Some(pid) = legacy_pid {
                let alive = fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| c.split(|b| *b == 0).any(|a| a == b"sandbox-init"))
                    .unwrap_or(false);
                if alive {
                    continue;
                }
                kill_members(std::slice::from_ref(&path));
                for _ in 0..20 {
                    if fs::remove_dir(&path).is_ok() {
                        removed += 1;
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            } else if remove_free_slot(&path) {
                removed += 1;
            }
        }
    }
    removed
}

/// Remove a slot directory if no sandbox holds it (true if it was removed). It is held locked
/// while it goes, so that nobody claims it half-way.
fn remove_free_slot(path: &Path) -> bool {
    let Ok(f) = fs::File::open(path) else { return false };
    let Ok(_held) = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) else { return false };
    kill_members(&[path.to_path_buf()]);
    fs::remove_dir(path).is_ok()
}

/// The extra slots of the server owning `dirs` (its running sandbox's own slot directories):
/// remove those no sandbox holds. Slots are claimed lowest first, so this looks at
/// `NAME.1`, `NAME.2`, … up to the first that does not exist: a few stats, where a full
/// [`sweep_stale_in`] lists the whole parent (every server's slots and the controller's files).
pub fn sweep_extra_slots(dirs: &[PathBuf]) -> usize {
    let mut removed = 0;
    for dir in dirs {
        let (Some(parent), Some(own)) = (dir.parent(), dir.file_name().and_then(|n| n.to_str())) else { continue };
        let Some((name, _)) = own.rsplit_once('.') else { continue };
        for k in 1.. {
            let slot = parent.join(format!("{name}.{k}"));
            if &slot == dir {
                continue;
            }
            if !slot.exists() {
                break;
            }
            if remove_free_slot(&slot) {
                removed += 1;
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// cgroup v2's "no internal processes" rule, for real (as root; the test suite runs unit
    /// tests as root): mcpbox (a shell here) and its child live in a cgroup that must hand a
    /// controller to its children; `enable_below` moves both into the supervisor leaf and
    /// enables it. With a process that is not mcpbox's in the cgroup, it refuses and moves nothing.
    #[test]
    fn enable_below_moves_mcpbox_and_its_children_into_the_leaf() {
        assert!(nix::unistd::geteuid().is_root(), "this test makes cgroups: run it as root (scripts/test.sh does)");
        let (root, ctrls) = read_layout().v2.expect("a cgroup v2 hierarchy");
        let ctl = ctrls
            .iter()
            .find(|c| *c == "pids")
            .or(ctrls.first())
            .expect("a controller in the cgroup v2 hierarchy")
            .clone();
        let root_ctl = root.join("cgroup.subtree_control");
        let had = fs::read_to_string(&root_ctl).unwrap().split_whitespace().any(|c| c == ctl);
        fs::write(&root_ctl, format!("+{ctl}")).unwrap();
        let base = root.join(format!("mcpbox-unit-{}", std::process::id()));
        let other_base = root.join(format!("mcpbox-unit-other-{}", std::process::id()));
        fs::create_dir(&base).unwrap();
        fs::create_dir(&other_base).unwrap();
        let mut mcpbox = std::process::Command::new("sh").args(["-c", "sleep 60 & wait"]).spawn().unwrap();
        let mut other = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        let children = || fs::read_to_string(format!("/proc/{0}/task/{0}/children", mcpbox.id())).unwrap_or_default();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while children().trim().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let child: u32 = children().trim().parse().unwrap();
        fs::write(base.join("cgroup.procs"), mcpbox.id().to_string()).unwrap();
        fs::write(base.join("cgroup.procs"), child.to_string()).unwrap();
        fs::write(other_base.join("cgroup.procs"), other.id().to_string()).unwrap();
        let enable = format!("+{ctl}");
        let direct = write(&base.join("cgroup.subtree_control"), &enable).map_err(|e| e.source.raw_os_error());
        let moved = enable_below(&base, &enable, mcpbox.id());
        let enabled = fs::read_to_string(base.join("cgroup.subtree_control")).unwrap_or_default();
        let leaf = fs::read_to_string(base.join(SUPERVISOR_LEAF).join("cgroup.procs")).unwrap_or_default();
        let refused = enable_below(&other_base, &enable, mcpbox.id());
        let other_left = fs::read_to_string(other_base.join("cgroup.procs")).unwrap_or_default();

        for pid in [mcpbox.id(), child, other.id()] {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
        let _ = (mcpbox.wait(), other.wait());
        std::thread::sleep(std::time::Duration::from_millis(100));
        for d in [base.join(SUPERVISOR_LEAF), base.clone(), other_base.clone()] {
            let _ = fs::remove_dir(&d);
        }
        if !had {
            let _ = fs::write(&root_ctl, format!("-{ctl}"));
        }

        assert_eq!(direct, Err(Some(libc::EBUSY)), "a cgroup v2 holding processes cannot hand {ctl} to children");
        assert!(moved.is_ok(), "{moved:?}");
        assert!(enabled.split_whitespace().any(|c| c == ctl), "{ctl} not enabled below the cgroup: {enabled:?}");
        let mut in_leaf: Vec<u32> = leaf.lines().filter_map(|l| l.parse().ok()).collect();
        in_leaf.sort();
        let mut want = vec![mcpbox.id(), child];
        want.sort();
        assert_eq!(in_leaf, want, "mcpbox and its child should be in the leaf");
        let e = refused.expect_err("a foreign process in the cgroup should refuse");
        assert!(e.to_string().contains("other than mcpbox's"), "{e}");
        assert_eq!(other_left.trim(), other.id().to_string(), "the foreign process must stay where it was");
        assert!(!other_base.join(SUPERVISOR_LEAF).exists());
    }

    #[test]
    fn own_cgroup_paths_go_under_the_mount() {
        assert_eq!(under(Path::new("/sys/fs/cgroup"), Path::new("/")), PathBuf::from("/sys/fs/cgroup"));
        assert_eq!(under(Path::new("/sys/fs/cgroup"), Path::new("")), PathBuf::from("/sys/fs/cgroup"));
        assert_eq!(
            under(Path::new("/sys/fs/cgroup"), Path::new("/system.slice/mcpbox.service")),
            PathBuf::from("/sys/fs/cgroup/system.slice/mcpbox.service")
        );
    }

    #[test]
    fn cpu_limits_become_quota_per_period_and_weights_are_clamped() {
        assert_eq!(cpu_max(Some(1000)), "100000 100000");
        assert_eq!(cpu_max(Some(500)), "50000 100000");
        assert_eq!(cpu_max(Some(2250)), "225000 100000");
        // The smallest policy value (0.01 core) is the kernel's smallest quota, 1 ms.
        assert_eq!(cpu_max(Some(10)), "1000 100000");
        assert_eq!(cpu_max(None), "max 100000");
        assert_eq!((weight(None), weight(Some(0)), weight(Some(20)), weight(Some(50_000))), (100, 1, 20, 10_000));
    }
}

//! What this host can give a sandbox: the facts behind `mcpbox doctor`.

use std::fmt::Write as _;
use std::fs;

use nix::sched::{unshare, CloneFlags};
use nix::sys::wait::{waitpid, WaitStatus};

use super::limits;
use super::sys::{self, Forked};

/// The outcome of one probe.
#[derive(Debug, Clone)]
pub struct Layer {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

fn read_trim(p: &str) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

/// Try `unshare(flags)` in a throw-away child, so this process stays as it was.
fn try_unshare(flags: CloneFlags) -> Result<(), String> {
    match sys::fork() {
        Ok(Forked::Child) => {
            let code = match unshare(flags) {
                Ok(()) => 0,
                Err(e) => e as i32,
            };
            sys::exit_now(code);
        }
        Ok(Forked::Parent(pid)) => match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, 0)) => Ok(()),
            Ok(WaitStatus::Exited(_, e)) => Err(nix::errno::Errno::from_raw(e).to_string()),
            other => Err(format!("probe child: {other:?}")),
        },
        Err(e) => Err(format!("fork: {e}")),
    }
}

pub fn layers() -> Vec<Layer> {
    let mut v = Vec::new();
    let user = CloneFlags::CLONE_NEWUSER;
    let r = try_unshare(user);
    let max = read_trim("/proc/sys/user/max_user_namespaces").unwrap_or_else(|| "?".into());
    v.push(Layer {
        name: "user namespace",
        ok: r.is_ok(),
        detail: match &r {
            Ok(()) => format!("yes (user.max_user_namespaces = {max})"),
            Err(e) => format!("no: unshare(CLONE_NEWUSER): {e} (user.max_user_namespaces = {max})"),
        },
    });
    for (name, flag) in [
        ("pid namespace", CloneFlags::CLONE_NEWPID),
        ("mount namespace", CloneFlags::CLONE_NEWNS),
        ("network namespace", CloneFlags::CLONE_NEWNET),
        ("ipc namespace", CloneFlags::CLONE_NEWIPC),
        ("uts namespace", CloneFlags::CLONE_NEWUTS),
        ("cgroup namespace", CloneFlags::CLONE_NEWCGROUP),
    ] {
        let r = try_unshare(user | flag);
        v.push(Layer {
            name,
            ok: r.is_ok(),
            detail: match r {
                Ok(()) => "yes".into(),
                Err(e) => format!("no: {e}"),
            },
        });
    }
    let mut restrictions = Vec::new();
    if let Some(x) = read_trim("/proc/sys/kernel/unprivileged_userns_clone") {
        restrictions.push(format!("kernel.unprivileged_userns_clone = {x}"));
    }
    if let Some(x) = read_trim("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") {
        restrictions.push(format!("kernel.apparmor_restrict_unprivileged_userns = {x}{}", if x == "1" { " (AppArmor restricts unprivileged user namespaces: run mcpbox as root, or allow it with an AppArmor profile granting `userns,`)" } else { "" }));
    }
    let apparmor = read_trim("/sys/module/apparmor/parameters/enabled").map(|e| e == "Y").unwrap_or(false);
    restrictions.push(format!("AppArmor {}", if apparmor { "enabled" } else { "not enabled" }));
    v.push(Layer { name: "userns restrictions", ok: true, detail: restrictions.join("; ") });

    let abi = sys::landlock_abi();
    v.push(Layer {
        name: "Landlock",
        ok: abi > 0,
        detail: if abi == 0 {
            "not available (kernel without CONFIG_SECURITY_LANDLOCK, or not in the lsm= list)".into()
        } else {
            let mut d = format!("ABI {abi}: filesystem rights");
            if abi >= 4 {
                d += ", TCP bind/connect ports"
            }
            if abi >= 6 {
                d += ", abstract unix socket and signal scoping"
            }
            d
        },
    });
    let status = read_trim("/proc/self/status").unwrap_or_default();
    let seccomp_mode =
        status.lines().find_map(|l| l.strip_prefix("Seccomp:")).map(|s| s.trim().to_string()).unwrap_or_default();
    v.push(Layer {
        name: "seccomp",
        ok: !seccomp_mode.is_empty(),
        detail: match seccomp_mode.as_str() {
            "" => "not available".into(),
            "0" => "filter mode available (mcpbox itself is not filtered)".into(),
            m => format!("filter mode available; mcpbox itself already runs under a filter (mode {m}: a container runtime's profile, which decides whether namespaces can be made)"),
        },
    });
    let l = limits::layout();
    let v2 = match &l.v2 {
        Some((p, c)) => format!(
            "cgroup v2 at {} (controllers: {})",
            p.display(),
            if c.is_empty() { "none".into() } else { c.join(" ") }
        ),
        None => "no cgroup v2".into(),
    };
    let v1: Vec<String> = [("pids", &l.v1_pids), ("memory", &l.v1_memory), ("cpu", &l.v1_cpu)]
        .iter()
        .filter_map(|(n, p)| p.as_ref().map(|p| format!("{n} at {}", p.display())))
        .collect();
    let root = nix::unistd::geteuid().is_root();
    let v2_has = |c: &str| l.v2.as_ref().is_some_and(|(_, cs)| cs.iter().any(|x| x == c));
    let how = |c: &str, v1p: &Option<std::path::PathBuf>| {
        if !root {
            "rlimit".to_string()
        } else if v2_has(c) {
            "cgroup v2".into()
        } else if v1p.is_some() {
            "cgroup v1".into()
        } else {
            "rlimit".into()
        }
    };
    // Where sandboxes' cgroups go: under mcpbox's own (see limits::Own).
    let own = |p: &std::path::Path| if p.as_os_str().is_empty() { "/".to_string() } else { p.display().to_string() };
    let mut placed = Vec::new();
    if l.v2.is_some() {
        placed.push(format!("v2 {}", own(&l.own.v2)));
    }
    if l.v1_pids.is_some() {
        placed.push(format!("pids {}", own(&l.own.pids)));
    }
    if l.v1_memory.is_some() {
        placed.push(format!("memory {}", own(&l.own.memory)));
    }
    v.push(Layer {
        name: "limits",
        ok: true,
        detail: format!(
            "pids: {}, memory: {}, cpu: {}; open files, file size, core dumps: rlimit. [{v2}; cgroup v1: {}]{}{}",
            how("pids", &l.v1_pids),
            how("memory", &l.v1_memory),
            if how("cpu", &l.v1_cpu) == "rlimit" {
                "not enforceable (no cgroup)".to_string()
            } else {
                how("cpu", &l.v1_cpu)
            },
            if v1.is_empty() { "none".into() } else { v1.join(", ") },
            if root && !placed.is_empty() {
                format!(" sandboxes' cgroups go under mcpbox's own: {}", placed.join(", "))
            } else {
                String::new()
            },
            if root { "" } else { " (cgroups need root or a delegated subtree; rootless mcpbox uses rlimits)" }
        ),
    });
    // `[limits] disk`: a loop-mounted ext4 image per server, which needs root, loop devices and
    // mkfs.ext4 (e2fsprogs).
    let loop_ok = std::path::Path::new("/dev/loop-control").exists();
    let mkfs = ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"].iter().any(|p| std::path::Path::new(p).exists());
    v.push(Layer {
        name: "disk limit",
        ok: root && loop_ok && mkfs,
        detail: match (root, loop_ok, mkfs) {
            (true, true, true) => "enforced: each server's data dir is an ext4 image of its own ([limits] disk), mounted inside its sandbox only".into(),
            (false, _, _) => "not enforceable rootless (mounting a disk image needs root): policies with [limits] disk are refused unless they say `[sandbox] relax = [\"disk\"]` (the shipped ones do; a warning at every start)".into(),
            (true, false, _) => "not enforceable: no /dev/loop-control (in a container: no loop devices); refused unless the policy relaxes it".into(),
            (true, true, false) => "not enforceable: mkfs.ext4 is missing (install e2fsprogs); refused unless the policy relaxes it".into(),
        },
    });
    v
}

/// The host's KSM (`/sys/kernel/mm/ksm/run`), for `mcpbox.memoryMerge`: whether ksmd merges
/// anything, and a line saying so.
pub fn ksm() -> (bool, String) {
    match read_trim("/sys/kernel/mm/ksm/run").as_deref() {
        Some("1") => (
            true,
            "ksmd runs (/sys/kernel/mm/ksm/run = 1): `mcpbox.memoryMerge: true` lets it merge the sandboxes' identical pages"
                .into(),
        ),
        Some(v) => (
            false,
            format!(
                "ksmd does not run (/sys/kernel/mm/ksm/run = {v}): `mcpbox.memoryMerge` would merge nothing; as root: echo 1 > /sys/kernel/mm/ksm/run"
            ),
        ),
        None => (false, "no KSM in this kernel (/sys/kernel/mm/ksm/run missing): `mcpbox.memoryMerge` merges nothing".into()),
    }
}

/// Render the layer table.
pub fn render(layers: &[Layer]) -> String {
    let mut s = String::new();
    for l in layers {
        let _ = writeln!(s, "  {:<20} {:<4} {}", l.name, if l.ok { "ok" } else { "NO" }, l.detail);
    }
    s
}

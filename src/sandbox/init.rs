//! `mcpbox sandbox-init`: builds the sandbox in one straight line and ends in `execve`.
//!
//! Three processes take part (full level), and a short-lived fourth:
//!
//! ```text
//! sandbox-init (outer)   host PID namespace; forwards signals to PID 1, exits with its status
//!  ├─ network helper: makes the network namespace, hands it over, exits
//!  └─ sandbox-init (PID 1 of the new PID namespace): mounts, hostname; reaps; forwards
//!      └─ the server: ids, fds, capabilities, NO_NEW_PRIVS, seccomp, Landlock, execve
//! ```
//!
//! The order, and why:
//!  1. Check we are single-threaded (so forking later is safe), then read the first part of the
//!     spec (`OuterSpec`: identities, limits, network mode) from the inherited pipe (never argv
//!     or env). mcpbox starts us before it has planned the sandbox, and sends that part as soon
//!     as it has loaded the policy: the namespaces are being made while it resolves the grants,
//!     and PID 1 reads the rest (the whole `SandboxSpec`) from the same pipe. An end of file
//!     instead of a message means mcpbox gave up (exit quietly).
//!  2. cgroups, while still host root: creating and joining them needs it (a CPU limit that no
//!     cgroup can hold refuses the start unless the policy relaxes it); then the data dir's
//!     disk image (`[limits] disk`), bound to a loop device and mounted *detached* (see
//!     `disk`): only root can, and PID 1 attaches it inside the sandbox in step 7.
//!  3. Drop the host identity to the server's own unprivileged uid (as root), *before* creating
//!     the user namespace: the namespace is then owned by that uid, the maps can only say
//!     "inside uid → that uid", and host uid 0 is never mapped anywhere. The permitted
//!     capabilities are kept across the change (PR_SET_KEEPCAPS, not dumpable meanwhile) only
//!     so that the bounding set can be dropped if step 5 fails; the new user namespace replaces
//!     them all.
//!  4. PDEATHSIG again (a credential change clears it) and the parent check that closes the race
//!     with our parent's death.
//!  5. unshare the user namespace; write setgroups/uid_map/gid_map (dumpable must be on for
//!     that after the uid change, and goes off right after); fork the network-namespace helper
//!     (see `NetHelper`: the network namespace, the costliest to make, is made while PID 1
//!     builds the mount view, and PID 1 and the server join it); unshare the other namespaces.
//!  6. fork: the child is PID 1 of the new PID namespace. When it exits the kernel kills every
//!     process left in the namespace, so nothing of the sandbox outlives it.
//!  7. PID 1 builds the mount view (see `mounts`: the data image from step 2 over the data dir,
//!     then every grant mounted from a handle opened without following symlinks), sets the
//!     hostname, joins the network namespace (loopback already up), and for network mode
//!     `proxy` binds the proxy port inside it and hands the socket to mcpbox.
//!  8. The server is forked by PID 1 *before* step 7, so that it prepares in parallel: it
//!     closes every fd above 2, drops every capability, sets NO_NEW_PRIVS and loads its seccomp
//!     filter (whose allow-list has what the remaining steps call; when the policy denies extra
//!     syscalls, the filter waits until last) with a notification listener that it hands to
//!     mcpbox at once (denied syscalls are answered EPERM by mcpbox, which records them; where
//!     the kernel refuses a listener, the filter answers EPERM itself and a warning says the
//!     denials go unrecorded), then waits until PID 1 says the view is built;
//!     then it applies Landlock, reports success and execs with the spec's explicit
//!     environment.
//!
//! At container level (no namespaces can be made), steps 5 and 7 are skipped: Landlock alone
//! shapes the filesystem view. In step 6, with no PID namespace to end the tree when PID 1
//! exits, the outer sandbox-init forks a *reaper* in PID 1's place (see `reaper`):
//!
//! ```text
//! sandbox-init (outer)    child subreaper; forwards signals to the reaper, exits with its status
//!  └─ sandbox-init (reaper): child subreaper; forwards signals; parent-death signal SIGPWR
//!      └─ the server (and whatever it starts: orphans are re-parented to the reaper)
//! ```
//!
//! When the server exits, or the outer sandbox-init is killed (mcpbox ends a session with
//! SIGKILL after its grace period; PDEATHSIG reaches the reaper), the reaper kills every
//! descendant it has (walking `/proc/PID/task/TID/children`) and reaps them until it has no
//! child left: setsid'd and double-forked daemons included, nothing of the server outlives it.
//! The outer one does the same for anything a killed reaper left, then kills what is left in
//! the server's cgroups.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use nix::errno::Errno;
use nix::sched::{sched_getaffinity, sched_setaffinity, unshare, CloneFlags, CpuSet};
use nix::sys::prctl;
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{getgid, getppid, getuid, setgroups, setresgid, setresuid, Gid, Pid, Uid};

use super::landlock::{self as ll, NetRules, Rule};
use super::limits::{self, Applied};
use super::mounts;
use super::seccomp::{build_program, FilterOptions};
use super::spec::{Msg, StartReport};
use super::spec::{OuterSpec, SandboxSpec};
use super::sys::{self, Forked};
use crate::policy::{Level, Network};

/// The port the egress proxy listens on inside the sandbox's network namespace.
pub const PROXY_PORT: u16 = 3128;

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("sandbox-init must be single-threaded (found {0} threads)")]
    Threads(usize),
    #[error("reading the sandbox spec: {0}")]
    Spec(String),
    /// mcpbox closed the spec pipe without writing: it failed before the sandbox was planned
    /// and reports that itself.
    #[error("no spec")]
    Cancelled,
    #[error("{call}: {errno}")]
    Sys { call: String, errno: Errno },
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Mount(#[from] mounts::MountError),
    #[error("{0}")]
    Landlock(#[from] ll::LandlockError),
    #[error("seccomp: {0}")]
    Seccomp(String),
}

fn sys_err(call: impl Into<String>) -> impl FnOnce(Errno) -> InitError {
    let call = call.into();
    move |errno| InitError::Sys { call, errno }
}

/// The report socket, by number: it moves to fd 3 in the server before the other fds close.
#[derive(Clone, Copy)]
pub struct Report(RawFd);

fn send(report: &Report, msg: &Msg) {
    if let Ok(bytes) = serde_json::to_vec(msg) {
        sys::write_fd(report.0, &bytes);
    }
}

/// The signals passed on down the tree: by `mcpbox run` and `policy learn` to sandbox-init, by
/// sandbox-init to its child (SIGCHLD: the child ended). Each process takes them with
/// `sigwait`, blocked in every one of its threads.
pub fn forwarded() -> SigSet {
    let mut s = SigSet::empty();
    for sig in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGCHLD,
    ] {
        s.add(sig);
    }
    s
}

/// Entry point of the hidden subcommand. Returns the process exit code.
pub fn main(spec_fd: RawFd, report_fd: RawFd) -> i32 {
    main_forked(spec_fd, report_fd, None)
}

/// [`main`] in a sandbox-init forked by `mcpbox run` (see `Pending::fork_here`): mcpbox may
/// have moved us off its CPU while it plans; `cpus` is the set to take back once it has.
pub(super) fn main_forked(spec_fd: RawFd, report_fd: RawFd, cpus: Option<CpuSet>) -> i32 {
    if let Err(e) = sys::set_cloexec(report_fd) {
        eprintln!("mcpbox sandbox-init: report fd {report_fd}: {e} (this mode is started by mcpbox itself)");
        return 125;
    }
    let report = Report(report_fd);
    match outer(spec_fd, &report, cpus) {
        Ok(code) => code,
        Err(InitError::Cancelled) => 125,
        Err(e) => {
            send(&report, &Msg::Error { message: e.to_string() });
            126
        }
    }
}

/// The next message of the spec stream (see `spec`); end of file first: mcpbox gave up.
fn read_spec<T: serde::de::DeserializeOwned>(input: &mut std::fs::File) -> Result<T, InitError> {
    match super::spec::read_frame(input) {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err(InitError::Cancelled),
        Err(e) => Err(InitError::Spec(e.to_string())),
    }
}

/// Everything decided in the outer process that the server reports at the end.
struct State {
    level: Level,
    warnings: Vec<String>,
    limits: Applied,
    host_uid: u32,
    /// The data dir's filesystem (`[limits] disk`), mounted detached; PID 1 attaches it.
    disk: Option<OwnedFd>,
}

fn outer(spec_fd: RawFd, report: &Report, cpus: Option<CpuSet>) -> Result<i32, InitError> {
    let threads = sys::thread_count();
    if threads != 1 {
        return Err(InitError::Threads(threads));
    }
    let root = getuid().is_root();
    // While mcpbox plans (in parallel when we were forked onto another CPU): the host's cgroup
    // mounts, unless the spec brings them.
    if root {
        let _ = limits::layout();
    }
    let mut input =
        std::fs::File::from(sys::adopt_fd(spec_fd).map_err(|e| InitError::Spec(format!("fd {spec_fd}: {e}")))?);
    let spec: OuterSpec = read_spec(&mut input)?;
    // Every CPU we were given is ours again (and our children's): mcpbox has little left to do.
    if let Some(cpus) = &cpus {
        let _ = sched_setaffinity(Pid::from_raw(0), cpus);
    }
    let layout = root.then(|| spec.cgroup_layout.clone().unwrap_or_else(limits::layout));
    let mut st = State {
        level: Level::Full,
        warnings: Vec::new(),
        limits: Applied::default(),
        host_uid: getuid().as_raw(),
        disk: None,
    };
    // KSM (`mcpbox.memoryMerge`): set on our own memory, it is inherited by every fork and kept
    // across execve, so the whole sandbox is mergeable. No privilege needed.
    if spec.memory_merge {
        if let Err(e) = sys::set_memory_merge() {
            st.warnings.push(format!(
                "memoryMerge: prctl(PR_SET_MEMORY_MERGE) failed ({e}): this sandbox's memory is not merged"
            ));
        }
    }

    // 2. cgroups, while still host root. `slots` holds them until we exit. A CPU limit needs
    //    one: without it, refused unless relaxed.
    let mut slots = Vec::new();
    if let Some(layout) = &layout {
        (st.limits, slots) = limits::join_cgroups(
            layout,
            &spec.limits,
            spec.cpu_weight,
            &spec.cgroup_parent,
            &spec.name,
            spec.parent_pid as u32,
        );
        st.warnings.append(&mut st.limits.warnings.clone());
    } else {
        st.limits = limits::rlimit_only(&spec.limits);
    }
    if let (Some(cpu), false) = (spec.limits.cpu, st.limits.cpu_by_cgroup) {
        let why = format!(
            "[limits] cpu = \"{}\" cannot be enforced: {}",
            crate::policy::format_cpu(cpu),
            if root {
                "no cgroup cpu controller is usable (see `mcpbox doctor`)"
            } else {
                "mcpbox runs rootless and has no cgroup to hold CPU time in"
            }
        );
        if !spec.relax.cpu {
            return Err(InitError::Refused(format!(
                "{why}. Run mcpbox as root, or accept it unenforced with `[sandbox] relax = [\"cpu\"]` in the policy"
            )));
        }
        st.warnings.push(format!("{why}; not enforced ([sandbox] relax)"));
    }
    // 2 (continued). The data dir's disk image, mounted detached while we are host root.
    if let Some(size) = spec.limits.disk {
        let got = match (&spec.disk, root) {
            (Some(img), true) => super::disk::mount_image(img).map_err(|e| e.to_string()),
            _ => Err(if root {
                "no disk image was prepared".to_string()
            } else {
                "mcpbox runs rootless and cannot mount a size-capped filesystem (loop devices need root)".to_string()
            }),
        };
        match got {
            Ok(fd) => {
                st.disk = Some(fd);
                let sep = if st.limits.summary.is_empty() { "" } else { ", " };
                st.limits.summary.push_str(&format!("{sep}disk: ext4 image ({})", crate::policy::format_size(size)));
            }
            Err(e) => disk_unenforced(&spec, &mut st, size, &e)?,
        }
    }

    // 3. The host identity the server runs under.
    match spec.host_ids {
        Some((uid, gid)) => {
            if uid == 0 || gid == 0 {
                return Err(InitError::Refused("refusing to run a server as host uid/gid 0".into()));
            }
            // The permitted set survives the uid change (the effective one does not), so that
            // the bounding set can still be dropped below if no user namespace can be made; a new
            // user namespace replaces every set anyway. Until then we are not dumpable.
            prctl::set_keepcaps(true).map_err(sys_err("prctl(PR_SET_KEEPCAPS, 1)"))?;
            setgroups(&[]).map_err(sys_err("setgroups([])"))?;
            setresgid(Gid::from_raw(gid), Gid::from_raw(gid), Gid::from_raw(gid))
                .map_err(sys_err(format!("setresgid({gid})")))?;
            setresuid(Uid::from_raw(uid), Uid::from_raw(uid), Uid::from_raw(uid))
                .map_err(sys_err(format!("setresuid({uid})")))?;
            let r = nix::unistd::getresuid().map_err(sys_err("getresuid"))?;
            if [r.real, r.effective, r.saved].iter().any(|u| u.as_raw() != uid) {
                return Err(InitError::Refused(format!("uid change to {uid} did not stick")));
            }
            st.host_uid = uid;
        }
        None => {
            if getuid().is_root() {
                return Err(InitError::Refused("running as root but no unprivileged host uid was assigned".into()));
            }
        }
    }
    let (outer_uid, outer_gid) = (getuid().as_raw(), getgid().as_raw());

    // 4. Die with our parent; and make sure it did not die already.
    prctl::set_pdeathsig(Signal::SIGKILL).map_err(sys_err("prctl(PR_SET_PDEATHSIG)"))?;
    if getppid().as_raw() != spec.parent_pid {
        return Ok(125);
    }

    // 5. Namespaces: the user namespace (and its maps) first; the network namespace, the most
    //    expensive to make, comes from a helper while PID 1 builds the mount view (NetHelper).
    let own_net = !matches!(spec.network, Network::Host { .. });
    let mut net: Option<NetHelper> = None;
    match unshare(CloneFlags::CLONE_NEWUSER) {
        Ok(()) => {
            // Every capability set and securebit was replaced by the new user namespace's:
            // nothing of the host's permitted set is left.
            prctl::set_dumpable(true).map_err(sys_err("prctl(PR_SET_DUMPABLE, 1)"))?;
            write_maps(spec.inner_uid, outer_uid, spec.inner_gid, outer_gid)?;
            prctl::set_dumpable(false).map_err(sys_err("prctl(PR_SET_DUMPABLE, 0)"))?;
            if own_net {
                net = Some(NetHelper::start(report)?);
            }
            let rest = CloneFlags::CLONE_NEWPID
                | CloneFlags::CLONE_NEWNS
                | CloneFlags::CLONE_NEWIPC
                | CloneFlags::CLONE_NEWUTS
                | CloneFlags::CLONE_NEWCGROUP;
            unshare(rest)
                .map_err(sys_err("unshare(CLONE_NEWPID|CLONE_NEWNS|CLONE_NEWIPC|CLONE_NEWUTS|CLONE_NEWCGROUP)"))?;
        }
        Err(errno) => {
            if root {
                // No user namespace to reset them: drop the bounding set with the CAP_SETPCAP
                // kept across the uid change, then every set for good.
                let ioe = |e: caps::errors::CapsError| InitError::Io(format!("dropping capabilities: {e}"));
                caps::raise(None, caps::CapSet::Effective, caps::Capability::CAP_SETPCAP).map_err(ioe)?;
                drop_bounding_set()?;
                for set in
                    [caps::CapSet::Ambient, caps::CapSet::Inheritable, caps::CapSet::Effective, caps::CapSet::Permitted]
                {
                    caps::clear(None, set).map_err(ioe)?;
                }
                prctl::set_keepcaps(false).map_err(sys_err("prctl(PR_SET_KEEPCAPS, 0)"))?;
            }
            let why = format!("unshare(CLONE_NEWUSER): {errno}");
            if spec.min_level > Level::Container {
                return Err(InitError::Refused(format!(
                    "{why}: this host cannot create namespaces, so the `full` confinement level is impossible. \
                     In Docker, start the container with `--security-opt seccomp=deploy/docker-seccomp.json \
                     --security-opt apparmor=unconfined` (see docs/DEPLOY.md) to restore `full`, or accept the \
                     weaker `container` level with `[sandbox] level = \"container\"` in the policy or \
                     `--min-level container`. On a host, check `mcpbox doctor` (user namespaces may be disabled)."
                )));
            }
            if matches!(spec.network, Network::Proxy { .. }) {
                return Err(InitError::Refused(format!(
                    "{why}: network mode `proxy` needs a network namespace, which this host cannot create (container level); \
                     use mode `none` or `host`, or restore the `full` level"
                )));
            }
            st.level = Level::Container;
            // Nowhere private to attach the data dir's filesystem.
            if let (Some(size), Some(_)) = (spec.limits.disk, st.disk.take()) {
                disk_unenforced(&spec, &mut st, size, "the `container` level has no mount namespace to mount it in")?;
            }
            st.warnings.push(format!(
                "running at `container` level ({why}): no namespaces, the filesystem view comes from Landlock alone and the network is the container's own{}",
                if matches!(spec.network, Network::None) { " (TCP denied by Landlock, sockets limited to AF_UNIX by seccomp)" } else { "" }
            ));
        }
    }
    prctl::set_dumpable(false).map_err(sys_err("prctl(PR_SET_DUMPABLE, 0)"))?;

    let mask = forwarded();
    mask.thread_block().map_err(sys_err("sigprocmask"))?;

    if st.level == Level::Full {
        // 6. PID 1 of the new PID namespace.
        let (alive_r, alive_w) = nix::unistd::pipe().map_err(sys_err("pipe"))?;
        match sys::fork().map_err(|e| InitError::Io(format!("fork: {e}")))? {
            Forked::Child => {
                drop(alive_w);
                let join = net.as_mut().and_then(|n| n.join.take());
                let code = match pid1(input, report, alive_r, &mut st, join) {
                    Ok(code) => code,
                    Err(InitError::Cancelled) => 125,
                    Err(e) => {
                        send(report, &Msg::Error { message: e.to_string() });
                        126
                    }
                };
                sys::exit_now(code);
            }
            Forked::Parent(child) => {
                drop(alive_r);
                drop(input);
                // PID 1 attaches it; our copy would keep the image mounted after the sandbox.
                st.disk.take();
                sys::close_fd(report.0);
                // Only PID 1 and the server need the helper's socket.
                if let Some(n) = net.as_mut() {
                    n.join.take();
                }
                let code = supervise(child, &mask, false, net.as_mut());
                // The helper exited long ago (and was reaped then, unless it is stuck): nothing
                // of it outlives us.
                drop(net);
                drop(alive_w);
                // Every process of the sandbox is gone: its cgroup slots are free again.
                drop(slots);
                Ok(code)
            }
        }
    } else {
        let spec: SandboxSpec = read_spec(&mut input)?;
        drop(input);
        // 6 (container level). No PID namespace to end the tree with PID 1: the reaper stands in
        // for PID 1. We are a subreaper as well, so that what a killed reaper leaves comes to us.
        prctl::set_child_subreaper(true).map_err(sys_err("prctl(PR_SET_CHILD_SUBREAPER)"))?;
        let me = nix::unistd::getpid();
        match sys::fork().map_err(|e| InitError::Io(format!("fork: {e}")))? {
            Forked::Child => reaper(&spec, report, &st, me, &mask),
            Forked::Parent(child) => {
                sys::close_fd(report.0);
                let code = supervise(child, &mask, false, None);
                end_descendants();
                limits::kill_members(&st.limits.dirs);
                drop(slots);
                Ok(code)
            }
        }
    }
}

/// The reaper's death signal: the outer sandbox-init is gone (mcpbox killed it, or mcpbox
/// itself died). Not one of the signals passed on to the server.
const OUTER_GONE: Signal = Signal::SIGPWR;

/// Container level: the child subreaper between the outer sandbox-init and the server, in
/// place of PID 1. Every orphan of the server's tree (setsid'd, double-forked daemons included)
/// is re-parented to it. It passes signals on to the server; when the server exits, or the outer
/// sandbox-init is gone (SIGKILL from mcpbox ending the session, or mcpbox's own death: a
/// parent-death signal it can catch, where the outer one has SIGKILL), it kills its whole tree
/// and reaps it before it exits. Holds no privilege and nothing of the spec once the server runs.
fn reaper(spec: &SandboxSpec, report: &Report, st: &State, outer: Pid, mask: &SigSet) -> ! {
    let mut mask = *mask;
    mask.add(OUTER_GONE);
    if mask.thread_block().is_err()
        || prctl::set_child_subreaper(true).is_err()
        || prctl::set_pdeathsig(OUTER_GONE).is_err()
        || getppid() != outer
    {
        sys::exit_now(125);
    }
    let me = nix::unistd::getpid();
    let child = match sys::fork() {
        Ok(Forked::Child) => {
            let _ = nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0));
            server(spec, report, st, me, None, None, None)
        }
        Ok(Forked::Parent(child)) => child,
        Err(e) => {
            send(report, &Msg::Error { message: format!("fork: {e}") });
            sys::exit_now(126);
        }
    };
    let _ = sys::close_from(3);
    let _ = drop_caps();
    let code = supervise(child, &mask, true, None);
    end_descendants();
    sys::exit_now(code)
}

/// Kill every descendant of this process (a child subreaper, so that every orphan of its tree
/// was re-parented to it: its descendants are the whole tree) and reap them, until it has no
/// child left. A process forked while a walk ran is found by the next one: each death that
/// `wait` reports starts another walk.
fn end_descendants() {
    loop {
        for pid in descendants(nix::unistd::getpid()) {
            let _ = kill(pid, Signal::SIGKILL);
        }
        match waitpid(None::<Pid>, None) {
            Err(Errno::ECHILD) => return,
            _ => continue,
        }
    }
}

/// The live descendants of `root`, from `/proc/PID/task/TID/children` (where a kernel lacks
/// that file, only what `wait` brings back; the loop in [`end_descendants`] still ends the tree,
/// one generation per death).
fn descendants(root: Pid) -> Vec<Pid> {
    let mut found = Vec::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else { continue };
        for t in tasks.flatten() {
            let Ok(kids) = std::fs::read_to_string(t.path().join("children")) else { continue };
            for k in kids.split_whitespace().filter_map(|k| k.parse::<i32>().ok()).map(Pid::from_raw) {
                if !found.contains(&k) {
                    found.push(k);
                    todo.push(k);
                }
            }
        }
    }
    found
}

/// `[limits] disk` could not be enforced: refused, unless the policy relaxes it (then a warning
/// at every start).
fn disk_unenforced(spec: &OuterSpec, st: &mut State, size: u64, why: &str) -> Result<(), InitError> {
    let why = format!("[limits] disk = \"{}\" cannot be enforced: {why}", crate::policy::format_size(size));
    if !spec.relax.disk {
        return Err(InitError::Refused(format!(
            "{why}. Run mcpbox as root, or accept it unenforced with `[sandbox] relax = [\"disk\"]` in the policy"
        )));
    }
    st.warnings.push(format!("{why}; not enforced ([sandbox] relax), the data dir is the host's"));
    Ok(())
}

fn write_maps(inner_uid: u32, outer_uid: u32, inner_gid: u32, outer_gid: u32) -> Result<(), InitError> {
    let w = |path: &str, data: String| {
        std::fs::write(path, data).map_err(|e| InitError::Io(format!("writing {path}: {e}")))
    };
    w("/proc/self/setgroups", "deny".into())?;
    w("/proc/self/uid_map", format!("{inner_uid} {outer_uid} 1\n"))?;
    w("/proc/self/gid_map", format!("{inner_gid} {outer_gid} 1\n"))?;
    Ok(())
}

/// Wait for `child`, passing signals on; return its exit code (128+N for a signal).
/// As PID 1 or the container-level reaper (`reap_all`), also reap every orphan of the tree; in
/// the outer process, the network helper once it is done (`helper`), so that it does not linger
/// as a zombie.
fn supervise(child: Pid, mask: &SigSet, reap_all: bool, mut helper: Option<&mut NetHelper>) -> i32 {
    // From here on we only wait, for the whole session: give back what setup used.
    sys::shed_setup_memory();
    loop {
        if let Some(h) = helper.as_deref_mut() {
            h.try_reap();
        }
        // Reap first: the child may have exited before we started waiting.
        loop {
            match waitpid(if reap_all { None } else { Some(child) }, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == child => return code,
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == child => return 128 + sig as i32,
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
        match mask.wait() {
            Ok(Signal::SIGCHLD) => continue,
            // Only in the container-level reaper's mask: its parent is gone; end the tree.
            Ok(OUTER_GONE) => return 128 + Signal::SIGKILL as i32,
            Ok(sig) => {
                let _ = kill(child, sig);
            }
            Err(_) => continue,
        }
    }
}

fn pid1(
    mut input: std::fs::File,
    report: &Report,
    alive_r: OwnedFd,
    st: &mut State,
    net: Option<NetJoin>,
) -> Result<i32, InitError> {
    prctl::set_pdeathsig(Signal::SIGKILL).map_err(sys_err("prctl(PR_SET_PDEATHSIG)"))?;
    // The outer sandbox-init holds the write end: a hang-up means it is already gone.
    let mut fds = [nix::poll::PollFd::new(std::os::fd::AsFd::as_fd(&alive_r), nix::poll::PollFlags::POLLIN)];
    if nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).unwrap_or(0) > 0 {
        return Ok(125);
    }
    drop(alive_r);
    // The whole spec (mcpbox may still have been resolving the grants when we were forked).
    let spec: SandboxSpec = read_spec(&mut input)?;
    drop(input);
    let spec = &spec;

    // 8 (early). The server is forked now and prepares everything that does not need the
    // finished view (its filter program, limits, signals, capabilities) while we build it; it
    // waits on `go` for the rest. Our cwd is the old root's "/", so pivot_root moves the
    // server's root and cwd along with ours.
    let (go_r, go_w) = nix::unistd::pipe().map_err(sys_err("pipe"))?;
    nix::unistd::chdir("/").map_err(sys_err("chdir /"))?;
    let mask = forwarded();
    let me = nix::unistd::getpid();
    let cpus = sched_getaffinity(Pid::from_raw(0)).ok();
    let child = match sys::fork().map_err(|e| InitError::Io(format!("fork: {e}")))? {
        Forked::Child => {
            drop(go_w);
            server(spec, report, st, me, Some(go_r), net, cpus)
        }
        Forked::Parent(child) => child,
    };
    drop(go_r);
    // A new child starts on its parent's CPU, and the scheduler leaves a task that has just run
    // where it is: on a small machine the server would only prepare while we sleep, and then
    // keep us from running. Keep it off our CPU until `go` (it restores its own set then).
    if let Some(cpus) = &cpus {
        if let Some(away) = other_cpus(cpus) {
            let _ = sched_setaffinity(child, &away);
        }
    }

    // 7. The mount view, hostname, network namespace (its loopback is up), proxy socket.
    mounts::build_root(spec, st.disk.take())?;
    let host = spec
        .outer
        .name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' })
        .take(63)
        .collect::<String>();
    nix::unistd::sethostname(if host.is_empty() { "mcpbox".to_string() } else { host })
        .map_err(sys_err("sethostname"))?;
    if let Some(net) = net {
        net.join()?;
    }
    if matches!(spec.outer.network, Network::Proxy { .. }) {
        let l = std::net::TcpListener::bind(("127.0.0.1", PROXY_PORT))
            .map_err(|e| InitError::Io(format!("binding the proxy port inside the sandbox: {e}")))?;
        send_with_fd(report, &Msg::Proxy, l.as_raw_fd())?;
    }
    // The view is ready: let the server go on.
    nix::unistd::write(&go_w, b"1").map_err(sys_err("write(go)"))?;
    drop(go_w);

    // PID 1 keeps nothing open and no privilege.
    let _ = sys::close_from(3);
    let _ = drop_caps();
    Ok(supervise(child, &mask, true, None))
}

/// The CPUs of `cpus` other than the one we run on, if there are any.
pub(super) fn other_cpus(cpus: &CpuSet) -> Option<CpuSet> {
    // SAFETY: sched_getcpu has no preconditions.
    let here = unsafe { libc::sched_getcpu() };
    let here = usize::try_from(here).ok()?;
    let mut away = *cpus;
    away.unset(here).ok()?;
    (0..CpuSet::count()).any(|i| away.is_set(i).unwrap_or(false)).then_some(away)
}

/// Makes the sandbox's network namespace (and brings its loopback up) in parallel with PID 1
/// building the mount view: creating a network namespace is the costliest single step of a
/// start (~0.4 ms of kernel work here). A child of the outer sandbox-init, forked right after the
/// user namespace exists, so the network namespace belongs to it. It sends a descriptor of the
/// namespace to PID 1 and to the server (one message each on a shared socket; a message in
/// flight keeps the namespace alive) and exits. Dropped by the process that started it, it kills
/// and reaps the helper, so that no helper outlives a start, failed or not.
struct NetHelper {
    pid: Pid,
    owner: Pid,
    join: Option<NetJoin>,
    reaped: bool,
}

/// What PID 1 and the server inherit to join the helper's network namespace: the receiving end
/// of its socket.
struct NetJoin(OwnedFd);

impl NetHelper {
    fn start(report: &Report) -> Result<NetHelper, InitError> {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let (rx, tx) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
            .map_err(sys_err("socketpair"))?;
        let me = nix::unistd::getpid();
        match sys::fork().map_err(|e| InitError::Io(format!("fork: {e}")))? {
            Forked::Child => {
                drop(rx);
                sys::close_fd(report.0);
                if prctl::set_pdeathsig(Signal::SIGKILL).is_err() || nix::unistd::getppid() != me {
                    sys::exit_now(125);
                }
                let errno = |e: std::io::Error| Errno::from_raw(e.raw_os_error().unwrap_or(0));
                let made = match unshare(CloneFlags::CLONE_NEWNET) {
                    Err(e) => Err((1i32, e)),
                    Ok(()) => match sys::loopback_up() {
                        Err(e) => Err((2, errno(e))),
                        Ok(()) => std::fs::File::open("/proc/self/ns/net").map_err(|e| (3, errno(e))),
                    },
                };
                for _ in 0..2 {
                    match &made {
                        Ok(ns) => {
                            if send_fd(tx.as_raw_fd(), b"netns", ns.as_raw_fd()).is_err() {
                                sys::exit_now(1);
                            }
                        }
                        Err((step, e)) => {
                            let mut msg = step.to_le_bytes().to_vec();
                            msg.extend((*e as i32).to_le_bytes());
                            sys::write_fd(tx.as_raw_fd(), &msg);
                        }
                    }
                }
                sys::exit_now(if made.is_ok() { 0 } else { 1 });
            }
            Forked::Parent(pid) => {
                drop(tx);
                Ok(NetHelper { pid, owner: me, join: Some(NetJoin(rx)), reaped: false })
            }
        }
    }

    /// Reap the helper if it has exited (its pid is not ours to signal after that).
    fn try_reap(&mut self) {
        if !self.reaped && !matches!(waitpid(self.pid, Some(WaitPidFlag::WNOHANG)), Ok(WaitStatus::StillAlive)) {
            self.reaped = true;
        }
    }
}

impl Drop for NetHelper {
    fn drop(&mut self) {
        // Forked copies (in PID 1) hold this too; only the starter reaps.
        if nix::unistd::getpid() == self.owner && !self.reaped {
            self.join.take();
            let _ = kill(self.pid, Signal::SIGKILL);
            let _ = waitpid(self.pid, None);
        }
    }
}

impl NetJoin {
    /// Receive the namespace from the helper and move into it. Needs CAP_SYS_ADMIN in the
    /// sandbox's user namespace (PID 1 has it; the server joins before dropping its capabilities).
    fn join(self) -> Result<(), InitError> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        let mut buf = [0u8; 64];
        let mut cmsg = nix::cmsg_space!([RawFd; 1]);
        let (n, fd) = loop {
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            match recvmsg::<()>(self.0.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
                Ok(m) => {
                    let fd = m.cmsgs().ok().and_then(|mut c| {
                        c.find_map(|c| match c {
                            ControlMessageOwned::ScmRights(v) => v.first().copied(),
                            _ => None,
                        })
                    });
                    break (m.bytes, fd);
                }
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(InitError::Sys { call: "recvmsg(network namespace)".into(), errno: e }),
            }
        };
        let Some(fd) = fd else {
            if n < 8 {
                return Err(InitError::Io("the network namespace helper ended before making the namespace".into()));
            }
            let step = i32::from_le_bytes(buf[..4].try_into().unwrap_or_default());
            let errno = Errno::from_raw(i32::from_le_bytes(buf[4..8].try_into().unwrap_or_default()));
            let call = match step {
                1 => "unshare(CLONE_NEWNET)",
                2 => "bringing loopback up",
                _ => "opening /proc/self/ns/net",
            };
            return Err(InitError::Sys { call: call.into(), errno });
        };
        let ns = sys::adopt_fd(fd).map_err(|e| InitError::Io(format!("network namespace descriptor: {e}")))?;
        nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).map_err(sys_err("setns(CLONE_NEWNET)"))?;
        Ok(())
    }
}

/// Loads the filter `notify` with a listener and hands that to mcpbox at once (from here on
/// the denied syscalls wait for its answer); where the kernel gives no listener (before 5.0, or
/// a listener already above us), builds and loads the same filter without the notification
/// (`filter` with `notify: false`), which answers EPERM itself, and says so. That one is built
/// only then: no filter is loaded yet when it is needed, and most starts never need it.
fn load_seccomp(
    notify: &[super::seccomp::sock_filter],
    filter: &FilterOptions,
    report: &Report,
    observe: bool,
) -> Result<Option<String>, InitError> {
    match sys::apply_seccomp_listener(notify) {
        Ok(listener) => {
            send_with_fd(report, &Msg::SeccompNotify, listener.as_raw_fd())?;
            Ok(None)
        }
        // `policy learn` observes through the listener: without one there is nothing to learn.
        Err(e) if observe => Err(InitError::Refused(format!(
            "policy learn needs a seccomp notification listener to observe the server: {e}"
        ))),
        Err(e) => {
            let plain = build_program(&FilterOptions { notify: false, observe: false, ..filter.clone() })
                .map_err(|e| InitError::Seccomp(e.to_string()))?;
            sys::apply_seccomp(&plain).map_err(|e| InitError::Seccomp(e.to_string()))?;
            Ok(Some(format!(
                "seccomp denials are not recorded: no notification listener ({e}); denied syscalls still get EPERM"
            )))
        }
    }
}

fn send_with_fd(report: &Report, msg: &Msg, fd: RawFd) -> Result<(), InitError> {
    let bytes = serde_json::to_vec(msg).map_err(|e| InitError::Io(e.to_string()))?;
    send_fd(report.0, &bytes, fd)
}

/// One datagram carrying `fd` (SCM_RIGHTS).
fn send_fd(sock: RawFd, bytes: &[u8], fd: RawFd) -> Result<(), InitError> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let iov = [std::io::IoSlice::new(bytes)];
    let fds = [fd];
    sendmsg::<()>(sock, &iov, &[ControlMessage::ScmRights(&fds)], MsgFlags::empty(), None)
        .map_err(sys_err("sendmsg(SCM_RIGHTS)"))?;
    Ok(())
}

fn drop_bounding_set() -> Result<(), InitError> {
    for cap in caps::all() {
        caps::drop(None, caps::CapSet::Bounding, cap)
            .map_err(|e| InitError::Io(format!("dropping {cap} from the bounding set: {e}")))?;
    }
    Ok(())
}

/// Drop every capability: bounding (when we still may), ambient, inheritable, permitted,
/// effective. Checked afterwards.
fn drop_caps() -> Result<(), InitError> {
    if caps::has_cap(None, caps::CapSet::Effective, caps::Capability::CAP_SETPCAP).unwrap_or(false) {
        drop_bounding_set()?;
    }
    let ioe = |e: caps::errors::CapsError| InitError::Io(format!("dropping capabilities: {e}"));
    caps::clear(None, caps::CapSet::Ambient).map_err(ioe)?;
    caps::clear(None, caps::CapSet::Inheritable).map_err(ioe)?;
    caps::clear(None, caps::CapSet::Effective).map_err(ioe)?;
    caps::clear(None, caps::CapSet::Permitted).map_err(ioe)?;
    let left = caps::read(None, caps::CapSet::Permitted).map_err(ioe)?;
    if !left.is_empty() {
        return Err(InitError::Refused(format!("capabilities left after dropping: {left:?}")));
    }
    Ok(())
}

/// The server process: never returns on success (execve).
/// `go`: at full level, PID 1 writes to it once the mount view is built (EOF: PID 1 failed).
fn server(
    spec: &SandboxSpec,
    report: &Report,
    st: &State,
    parent: Pid,
    go: Option<OwnedFd>,
    netns: Option<NetJoin>,
    cpus: Option<CpuSet>,
) -> ! {
    let mut report = *report;
    // Die with the sandbox-init that forked us (at full level PID 1's death ends the whole
    // namespace anyway; at container level this is what stops the server outliving it).
    if prctl::set_pdeathsig(Signal::SIGKILL).is_err() || nix::unistd::getppid() != parent {
        sys::exit_now(125);
    }
    let e = match server_setup(spec, &mut report, st, go, netns, cpus) {
        Ok(never) => match never {},
        Err(InitError::Cancelled) => sys::exit_now(127),
        Err(e) => e,
    };
    send(&report, &Msg::Error { message: e.to_string() });
    sys::exit_now(127);
}

enum Never {}

fn server_setup(
    spec: &SandboxSpec,
    report: &mut Report,
    st: &State,
    go: Option<OwnedFd>,
    netns: Option<NetJoin>,
    cpus: Option<CpuSet>,
) -> Result<Never, InitError> {
    let full = st.level == Level::Full;
    let tmp: PathBuf = if full { "/tmp".into() } else { spec.tmp_dir.clone() };

    // Everything that allocates is prepared before the filters go on.
    let argv: Vec<CString> = spec
        .argv
        .iter()
        .map(|a| CString::new(a.as_str()))
        .collect::<Result<_, _>>()
        .map_err(|e| InitError::Io(e.to_string()))?;
    let mut env = spec.env.clone();
    env.insert("TMPDIR".into(), tmp.to_string_lossy().into_owned());
    let envp: Vec<CString> = env
        .iter()
        .map(|(k, v)| CString::new(format!("{k}={v}")))
        .collect::<Result<_, _>>()
        .map_err(|e| InitError::Io(e.to_string()))?;
    let filter = FilterOptions {
        extra_deny: spec.seccomp_extra_deny.clone(),
        extra_allow: spec.seccomp_extra_allow.clone(),
        unix_sockets_only: !full && matches!(spec.outer.network, Network::None),
        notify: true,
        observe: spec.observe,
    };
    let prog = build_program(&filter).map_err(|e| InitError::Seccomp(e.to_string()))?;
    let mut rules: Vec<Rule> =
        spec.grants.iter().map(|g| Rule { path: g.path.clone(), access: g.access, dir: g.dir }).collect();
    rules.extend(ll::base_rules(&tmp));
    if full {
        rules.push(Rule { path: "/dev/shm".into(), access: super::spec::Access::Write, dir: true });
        // The root is a tmpfs holding only what the policy grants: listing it reveals nothing.
        rules.push(Rule { path: "/".into(), access: super::spec::Access::List, dir: true });
    }
    let net = match (&spec.outer.network, full) {
        (Network::Host { connect_ports: None, bind_ports: None }, _) => NetRules::None,
        (Network::Host { connect_ports, bind_ports }, _) => NetRules::Ports {
            connect: connect_ports.clone().unwrap_or_default(),
            bind: bind_ports.clone().unwrap_or_default(),
        },
        // No namespace to cut the network off: Landlock denies all TCP instead.
        (Network::None, false) => NetRules::Ports { connect: vec![], bind: vec![] },
        _ => NetRules::None,
    };

    // Limits on this process (inherited by everything it starts).
    limits::apply_rlimits(&spec.outer.limits, &st.limits).map_err(|e| InitError::Io(format!("setrlimit: {e}")))?;

    // Into the sandbox's network namespace (while we still have the capability for it).
    if let Some(n) = netns {
        n.join()?;
    }

    // Every inherited descriptor above 2 goes, except the report socket (close-on-exec) at 3
    // and, until the view is ready, `go` at 4.
    let io = |what: &'static str| move |e: std::io::Error| InitError::Io(format!("{what}: {e}"));
    let go = go
        .map(|g| nix::fcntl::fcntl(&g, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10)))
        .transpose()
        .map_err(sys_err("F_DUPFD_CLOEXEC"))?;
    if report.0 != 3 {
        sys::dup2(report.0, 3).map_err(io("dup2(report, 3)"))?;
        sys::set_cloexec(3).map_err(io("FD_CLOEXEC"))?;
        *report = Report(3);
    }
    let go = match go {
        Some(g) => {
            sys::dup2(g, 4).map_err(io("dup2(go, 4)"))?;
            Some(sys::adopt_fd(4).map_err(io("go"))?)
        }
        None => None,
    };
    sys::close_from(if go.is_some() { 5 } else { 4 }).map_err(io("close_range"))?;

    // A clean signal state for the server (dispositions now: every syscall after the filter
    // goes through it; the mask last, so nothing is delivered to us before execve).
    sys::reset_signal_dispositions();

    drop_caps()?;
    prctl::set_no_new_privs().map_err(sys_err("prctl(PR_SET_NO_NEW_PRIVS)"))?;

    // seccomp normally goes last, after Landlock. While PID 1 is still building the view we can
    // load it now instead (off the start's critical path): the allow-list has everything the
    // remaining steps call (read, chdir, open, the landlock_* calls, execve). Not when the policy
    // denies extra syscalls, which could be among those.
    // Nor when learning: the server's own path syscalls are what is observed, not ours.
    let seccomp_early = go.is_some() && spec.seccomp_extra_deny.is_empty() && !spec.observe;
    let mut seccomp_warning = None;
    if seccomp_early {
        seccomp_warning = load_seccomp(&prog, &filter, report, spec.observe)?;
    }

    // The rest needs the finished view. EOF instead: PID 1 failed and reports why itself.
    if let Some(g) = go {
        let mut b = [0u8; 1];
        loop {
            match nix::unistd::read(&g, &mut b) {
                Ok(1) => break,
                Err(Errno::EINTR) => continue,
                _ => return Err(InitError::Cancelled),
            }
        }
    }
    // PID 1 may have kept us off its CPU while it built the view (see pid1): every CPU we were
    // given is ours again.
    let mut warnings = st.warnings.clone();
    if let Some(cpus) = &cpus {
        if let Err(e) = sched_setaffinity(Pid::from_raw(0), cpus) {
            warnings.push(format!("could not restore the server's CPU affinity: {e}"));
        }
    }
    std::env::set_current_dir(&spec.cwd).map_err(|e| InitError::Io(format!("chdir {}: {e}", spec.cwd.display())))?;
    let ll = ll::apply(&rules, &net, spec.landlock_min_abi)?;
    if !seccomp_early {
        seccomp_warning = load_seccomp(&prog, &filter, report, spec.observe)?;
    }
    warnings.extend(seccomp_warning);
    SigSet::empty().thread_set_mask().map_err(sys_err("sigprocmask"))?;
    warnings.extend(ll.warnings);
    let rep = StartReport {
        level: st.level,
        landlock_abi: ll.abi,
        warnings,
        limits: st.limits.summary.clone(),
        cgroups: st.limits.dirs.clone(),
        host_uid: st.host_uid,
        start_latency: Default::default(),
        // mcpbox takes it from the credentials the kernel attaches to this message.
        server_pid: None,
    };
    send(report, &Msg::Ready(rep));
    let errno = nix::unistd::execve(&argv[0], &argv, &envp).unwrap_err();
    Err(InitError::Sys { call: format!("execve({})", spec.argv[0]), errno })
}

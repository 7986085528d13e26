//! Escape probes: the probe program runs under `mcpbox run` and, for comparison, unconfined;
//! every check is asserted by its specific effect, seen from outside. These tests run as root
//! and as an unprivileged user (scripts/test.sh) and assert what is right for each mode.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

fn one_of(got: &str, want: &[&str], what: &str, out: &Output) {
    assert!(want.contains(&got), "{what}: got {got}, want one of {want:?}; output:\n{out}");
}

fn no_canary(out: &Output) {
    assert!(!out.all().contains(CANARY), "the file canary leaked:\n{out}");
    assert!(!out.all().contains(ENV_CANARY), "the environment canary leaked:\n{out}");
}

#[test]
fn secrets_and_config_are_not_readable() {
    let s = shared();
    let pol = probe_policy("secrets", "", "");
    let (secret, config) = (s.secret.to_str().unwrap(), s.config.to_str().unwrap());
    for path in [secret, config, "/etc/shadow"] {
        let out = confined(&pol, &unique("secrets"), &["read", path]);
        assert_eq!(out.code, 0, "{out}");
        // ENOENT: the path is not in the sandbox's mount view at all.
        assert_eq!(out.denied("read"), "ENOENT", "reading {path}: {out}");
        no_canary(&out);
    }
    // Unconfined, the planted secret and the config are readable by the test's own user.
    for path in [secret, config] {
        let out = unconfined(&["read", path]);
        let (ok, detail) = out.result("read");
        assert!(ok && detail.contains(CANARY), "unconfined read of {path} should see the canary: {out}");
    }
    // /etc/shadow: root reads it; an unprivileged user gets EACCES from the file mode, which
    // still differs from the sandbox's ENOENT (the file is not even there).
    let out = unconfined(&["read", "/etc/shadow"]);
    if is_root() {
        assert!(out.result("read").0, "{out}");
    } else {
        assert_eq!(out.denied("read"), "EACCES", "{out}");
    }
}

#[test]
fn no_host_process_or_environment_is_visible() {
    let pol = probe_policy("procview", "", "");
    let out = confined(&pol, &unique("procview"), &["proc_pids"]);
    let (ok, detail) = out.result("proc_pids");
    let n: usize = detail.split_whitespace().next().unwrap().parse().unwrap();
    assert!(ok && n <= 3, "the sandbox should see only its own few pids: {out}");

    for path in ["/proc/1/environ", "/proc/self/environ", "/proc/1/cmdline"] {
        let out = confined(&pol, &unique("procenv"), &["read", path]);
        // Either unreadable or readable without anything of mcpbox's environment.
        if let (true, detail) = out.result("read") {
            assert!(!detail.contains(ENV_CANARY) && !detail.contains("MCPBOX_"), "{path} shows mcpbox's environment: {out}");
        } else if path == "/proc/1/environ" {
            one_of(&out.denied("read"), &["EACCES", "EPERM"], path, &out);
        }
        no_canary(&out);
    }

    // Unconfined the host's processes are all there, and the environment carries the canary.
    let out = unconfined(&["proc_pids"]);
    let n: usize = out.result("proc_pids").1.split_whitespace().next().unwrap().parse().unwrap();
    assert!(n > 3, "unconfined the probe should see the host's processes: {out}");
    let out = unconfined(&["read", "/proc/self/environ"]);
    assert!(out.result("read").1.contains(ENV_CANARY), "{out}");
}

#[test]
fn writes_outside_grants_fail_and_inside_work() {
    let s = shared();
    let base = tempdir();
    let outside = base.path().join("outside");
    mkdir_755(&outside);
    let ro = base.path().join("ro");
    mkdir_755(&ro);
    let pol = probe_policy("writes", &format!("read = [\"{}\"]\nwrite = [\"${{DATA}}\"]", ro.display()), "");
    let name = unique("writes");

    for (target, want) in [
        (outside.join("x"), &["ENOENT"][..]),        // not in the view at all
        (ro.join("x"), &["EROFS", "EACCES"][..]),    // granted read-only
        ("/usr/lib/x86_64-linux-gnu/mcpbox-probe-x".into(), &["EROFS", "EACCES"][..]),
        // Beside a grant: the directories leading to it exist inside but stand for host paths
        // that were not granted (under /tmp they sit in the sandbox's writable tmpfs).
        (base.path().join("beside"), &["EROFS"][..]),
    ] {
        let out = confined(&pol, &name, &["write", target.to_str().unwrap()]);
        one_of(&out.denied("write"), want, &format!("writing {}", target.display()), &out);
        assert!(!target.exists(), "{} appeared on the host", target.display());
    }

    // Inside the data dir: the file appears on the host, owned by the server's host uid.
    let data = s.state.join(&name).join("data");
    let file = data.join("written-by-probe");
    let out = confined(&pol, &name, &["write", file.to_str().unwrap()]);
    assert!(out.result("write").0, "{out}");
    let owner = std::fs::metadata(&file).expect("the file written inside appears on the host").uid();
    if is_root() {
        assert_ne!(owner, 0, "root running mcpbox must never mean host root inside");
        assert_eq!(owner, allocated_uid(&name));
    } else {
        assert_eq!(owner, nix::unistd::getuid().as_raw());
    }

    // Unconfined the same write outside succeeds: the check detects an unconfined probe.
    let target = outside.join("x");
    let out = unconfined(&["write", target.to_str().unwrap()]);
    assert!(out.result("write").0 && target.exists(), "{out}");
}

#[test]
fn host_loopback_and_abstract_sockets_are_unreachable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    use std::os::linux::net::SocketAddrExt;
    let abstract_name = unique("mcpbox-test-abstract");
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes()).unwrap();
    let ulistener = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
    ulistener.set_nonblocking(true).unwrap();

    let pol = probe_policy("sockets", "", "");
    let out = confined(&pol, &unique("sockets"), &["tcp", &port]);
    one_of(&out.denied("tcp"), &["ECONNREFUSED", "ENETUNREACH"], "TCP to host loopback", &out);
    assert!(listener.accept().is_err(), "the host listener accepted a connection from the sandbox");
    let out = confined(&pol, &unique("sockets"), &["abstract", &abstract_name]);
    one_of(&out.denied("abstract"), &["ECONNREFUSED", "EPERM"], "host abstract socket", &out);
    assert!(ulistener.accept().is_err(), "the host abstract socket accepted a connection");

    let out = unconfined(&["tcp", &port]);
    assert!(out.result("tcp").0, "{out}");
    let out = unconfined(&["abstract", &abstract_name]);
    assert!(out.result("abstract").0, "{out}");
}

#[test]
fn host_processes_cannot_be_signalled_or_traced() {
    let pol = probe_policy("signals", "", "");
    let me = std::process::id().to_string();
    // The test process (mcpbox's parent) does not exist inside the PID namespace.
    let out = confined(&pol, &unique("signals"), &["kill", &me, "0"]);
    one_of(&out.denied("kill"), &["ESRCH", "EPERM"], "kill(test process)", &out);
    let out = confined(&pol, &unique("signals"), &["ptrace", &me]);
    assert_eq!(out.denied("ptrace"), "EPERM", "{out}");
    // Its own parent (sandbox-init, outside its Landlock domain): scoped signals, no ptrace.
    let out = confined(&pol, &unique("signals"), &["kill", "ppid", "0"]);
    assert_eq!(out.denied("kill"), "EPERM", "{out}");
    let out = confined(&pol, &unique("signals"), &["ptrace", "ppid"]);
    assert_eq!(out.denied("ptrace"), "EPERM", "{out}");
    // Even its own child cannot be traced (ptrace is refused by the filter).
    let out = confined(&pol, &unique("signals"), &["ptrace_child"]);
    assert_eq!(out.denied("ptrace_child"), "EPERM", "{out}");

    let out = unconfined(&["kill", &me, "0"]);
    assert!(out.result("kill").0, "{out}");
    let out = unconfined(&["ptrace_child"]);
    assert!(out.result("ptrace_child").0, "{out}");
}

const PRIVILEGED: &[&str] = &[
    "setuid0", "setuid_self", "unshare_user", "mount", "keyctl", "bpf", "perf_event_open", "userfaultfd", "io_uring_setup",
    "tiocsti", "int80",
];

/// What the seccomp filter answers, at both levels.
fn assert_privileged_refused(out: &Output) {
    for check in PRIVILEGED {
        let want = if *check == "int80" { "ENOSYS" } else { "EPERM" };
        assert_eq!(out.denied(check), want, "{check}: {out}");
    }
}

#[test]
fn privileged_and_kernel_surface_syscalls_are_refused() {
    let pol = probe_policy("privileged", "", "");
    let mut args = vec!["each"];
    args.extend(PRIVILEGED);
    let out = confined(&pol, &unique("privileged"), &args);
    assert_eq!(out.code, 0, "{out}");
    assert_privileged_refused(&out);

    // Unconfined each of them answers differently, so the checks can tell.
    let out = unconfined(&args);
    for check in ["setuid_self", "unshare_user", "mount", "keyctl", "userfaultfd", "io_uring_setup", "int80"] {
        assert!(out.result(check).0, "{check} should work unconfined: {out}");
    }
    assert_eq!(out.denied("bpf"), "EINVAL", "bpf with an invalid command, unconfined: {out}");
    assert_eq!(out.denied("perf_event_open"), "EFAULT", "{out}");
    assert_eq!(out.denied("tiocsti"), "ENOTTY", "TIOCSTI on a pipe, unconfined: {out}");
    // setuid(0): root may; an unprivileged user gets the same EPERM as the filter gives, so
    // for that mode `setuid_self` above is what tells the filter apart.
    if is_root() {
        assert!(out.result("setuid0").0, "{out}");
    } else {
        assert_eq!(out.denied("setuid0"), "EPERM");
    }
}

#[test]
fn inside_status_shows_nnp_no_caps_and_seccomp() {
    let pol = probe_policy("status", "", "");
    let out = confined(&pol, &unique("status"), &["status"]);
    let d = out.result("status").1;
    for want in ["NoNewPrivs: 1;", "CapEff: 0000000000000000;", "CapPrm: 0000000000000000;", "CapBnd: 0000000000000000;", "Seccomp: 2;"] {
        assert!(d.contains(want), "missing `{want}`: {out}");
    }
    let out = unconfined(&["status"]);
    let u = out.result("status").1;
    assert!(u.contains("Seccomp: 0;") && u.contains("NoNewPrivs: 0;") && !u.contains("CapBnd: 0000000000000000;"), "unconfined: {out}");
    // PID 1 keeps the server off its own CPU while both prepare: the server gets every CPU
    // back before it runs.
    let cpus = |d: &str| d.split(';').find(|f| f.starts_with("Cpus_allowed_list:")).map(str::to_string);
    assert!(cpus(&u).is_some(), "unconfined: {out}");
    assert_eq!(cpus(&d), cpus(&u), "the server runs on fewer CPUs than it was given");
}

#[test]
fn sandbox_pid1_holds_nothing_and_survives_the_server() {
    let pol = probe_policy("pid1", "", "");
    // SIGKILL to PID 1 (sandbox-init): refused by Landlock's signal scope, and the server lives
    // on (were PID 1 killed, the kernel would kill the whole namespace, the probe included).
    let out = confined(&pol, &unique("pid1"), &["kill", "1", "9"]);
    assert_eq!(out.denied("kill"), "EPERM", "{out}");
    assert!(out.stdout.contains("ALIVE after kill") && out.code == 0, "{out}");
    let out = confined(&pol, &unique("pid1"), &["ptrace", "1"]);
    assert_eq!(out.denied("ptrace"), "EPERM", "{out}");
    let out = confined(&pol, &unique("pid1"), &["read", "/proc/1/environ"]);
    match out.result("read") {
        (true, detail) => assert!(!detail.contains(ENV_CANARY) && !detail.contains("HOME="), "{out}"),
        (false, e) => assert!(e.starts_with("EACCES") || e.starts_with("EPERM"), "{out}"),
    }
    no_canary(&out);
    // Unconfined, root may signal the host's PID 1 (signal 0: only the permission check); an
    // unprivileged user gets EPERM from the uid check, as the sandbox does, so there is nothing
    // to compare in that mode beyond the ptrace_child check of another test.
    let out = unconfined(&["kill", "1", "0"]);
    if is_root() {
        assert!(out.result("kill").0, "{out}");
    }
}

#[test]
fn proc_sys_and_sys_are_not_writable() {
    let pol = probe_policy("procsys", "", "");
    let out = confined(&pol, &unique("procsys"), &["open_w", "/proc/sys/kernel/hostname"]);
    one_of(&out.denied("open_w"), &["EROFS", "EACCES"], "/proc/sys", &out);
    let sysfile = "/sys/kernel/mm/transparent_hugepage/enabled";
    let out = confined(&pol, &unique("procsys"), &["open_w", sysfile]);
    one_of(&out.denied("open_w"), &["ENOENT", "EROFS", "EACCES"], "/sys", &out);
    // Unconfined, root can open both for writing (nothing is written); an unprivileged user
    // is refused by the file modes (EACCES), which is all that can be asserted then.
    for p in ["/proc/sys/kernel/hostname", sysfile] {
        let out = unconfined(&["open_w", p]);
        if is_root() {
            assert!(out.result("open_w").0, "{p}: {out}");
        } else {
            assert_eq!(out.denied("open_w"), "EACCES", "{p}: {out}");
        }
    }
}

#[test]
fn fork_bomb_stops_at_the_pids_limit() {
    let pol = probe_policy("forkbomb", "", "[limits]\npids = 32");
    // The host stays responsive meanwhile: this thread keeps starting processes.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let side = std::thread::spawn(move || {
        let mut n = 0;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            assert!(Command::new("/bin/true").status().unwrap().success());
            n += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        n
    });
    let out = confined(&pol, &unique("forkbomb"), &["forkbomb", "1000"]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let spawned = side.join().unwrap();
    let detail = out.result("forkbomb").1;
    assert_eq!(out.denied("forkbomb"), "EAGAIN", "{out}");
    let forks: usize = detail.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(forks < 32, "{forks} forks under pids = 32: {out}");
    assert!(out.elapsed < Duration::from_secs(20), "took {:?}", out.elapsed);
    assert!(spawned >= 1, "the host could not start a process during the fork bomb");

    let out = unconfined(&["forkbomb", "100"]);
    assert!(out.result("forkbomb").0, "unconfined, 100 forks succeed: {out}");
}

#[test]
fn memory_limit_holds() {
    let pol = probe_policy("memory", "", "[limits]\nmemory = \"64M\"");
    let out = confined(&pol, &unique("memory"), &["memory", "256"]);
    assert!(out.try_result("memory").map(|r| !r.0).unwrap_or(true), "256 MiB touched under a 64M limit: {out}");
    if is_root() {
        // cgroup memory limit: the OOM killer ends the probe with SIGKILL.
        assert_eq!(out.code, 128 + 9, "{out}");
    } else {
        // Rootless: RLIMIT_DATA refuses the mapping itself.
        assert_eq!(out.denied("memory"), "ENOMEM", "{out}");
    }
    let out = unconfined(&["memory", "256"]);
    assert!(out.result("memory").0, "{out}");
}

#[test]
fn nothing_is_left_after_the_server_exits() {
    let pol = probe_policy("orphan", "", "");
    let name = unique("orphan");
    let marker = unique("marker-orphan");
    let out = confined(&pol, &name, &["orphan", &marker]);
    assert!(out.result("orphan").0, "{out}");
    assert_eq!(pids_with_marker(&marker), Vec::<i32>::new(), "a process of the sandbox outlived it");
    if is_root() {
        assert_eq!(pids_of_uid(allocated_uid(&name)), Vec::<i32>::new(), "a process of the server's uid outlived it");
    }
    // Unconfined the left-behind child is really there: the scan detects it.
    let marker = unique("marker-orphan-unconfined");
    let out = unconfined(&["orphan", &marker]);
    assert!(out.result("orphan").0);
    let left = pids_with_marker(&marker);
    kill_all(&left);
    assert_eq!(left.len(), 1, "unconfined, the orphan should remain: {out}");
}

/// Kills the child if the test fails half-way, so nothing holds the harness's pipes open.
struct Killer(std::process::Child);

impl Drop for Killer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `cmd` (whose probe runs `pause MARKER`), wait for its RESULT line, return the child.
fn start_paused(mut cmd: Command) -> (Killer, String) {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = Killer(cmd.spawn().unwrap());
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with("RESULT pause ok"), "unexpected: {line:?}");
    (child, line)
}

#[test]
fn nothing_is_left_after_mcpbox_is_sigkilled() {
    let s = shared();
    let pol = probe_policy("sigkill", "", "");
    let name = unique("sigkill");
    let marker = unique("marker-sigkill");
    let (mut child, _) = start_paused(mcpbox_cmd(&pol, &name, &[], &s.probe, &["pause", &marker]));
    let pids = pids_with_marker(&marker);
    assert_eq!(pids.len(), 2, "the probe and its child should be running");
    // The uid the host sees for the server: never 0 as root; the user's own uid rootless.
    for p in &pids {
        let uid = proc_uid(*p).unwrap();
        if is_root() {
            assert_ne!(uid, 0);
            assert_eq!(uid, allocated_uid(&name));
        } else {
            assert_eq!(uid, nix::unistd::getuid().as_raw());
        }
    }
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let gone = eventually(Duration::from_secs(2), || pids_with_marker(&marker).is_empty());
    assert!(gone, "sandbox processes survived mcpbox's SIGKILL: {:?}", pids_with_marker(&marker));

    // Unconfined, killing the probe leaves its child: the scan would see a survivor.
    let marker = unique("marker-sigkill-unconfined");
    let mut cmd = Command::new(&s.probe);
    cmd.args(["pause", &marker]);
    let (mut child, _) = start_paused(cmd);
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let left = pids_with_marker(&marker);
    kill_all(&left);
    assert_eq!(left.len(), 1, "unconfined, the child should survive its parent");
}

/// The cgroup of `pid` for controller `ctl` ("pids", "memory"; "" for the v2 hierarchy), as the
/// host sees it (e.g. `/mcpbox/NAME.0`).
#[test]
fn sandbox_init_holds_none_of_mcpboxs_command_line_or_environment() {
    let s = shared();
    let pol = probe_policy("initenv", "", "");
    let marker = unique("marker-initenv");
    let (child, _) = start_paused(mcpbox_cmd(&pol, &unique("initenv"), &[], &s.probe, &["pause", &marker]));
    let has = |hay: &[u8], needle: &str| hay.windows(needle.len()).any(|w| w == needle.as_bytes());
    // The check can fail: mcpbox itself has the canary in its environment and the probe's
    // marker on its command line.
    let me = child.0.id() as i32;
    let own = std::fs::read(format!("/proc/{me}/environ")).unwrap();
    assert!(has(&own, ENV_CANARY), "the canary is not in mcpbox's environment");
    assert!(has(&std::fs::read(format!("/proc/{me}/cmdline")).unwrap(), &marker));
    // Its sandbox-init processes: the one outside the namespaces and PID 1 of the sandbox.
    let outer = children_of(me);
    assert_eq!(outer.len(), 1, "mcpbox should have one child: {outer:?}");
    let mut inits = outer.clone();
    inits.extend(children_of(outer[0]));
    assert_eq!(inits.len(), 2, "sandbox-init should have one live child, PID 1: {inits:?}");
    for p in inits {
        let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).unwrap();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).filter(|a| !a.is_empty()).collect();
        assert_eq!(args.get(1..), Some(&[&b"sandbox-init"[..]][..]), "pid {p}: {:?}", String::from_utf8_lossy(&cmdline));
        assert!(!has(&cmdline, &marker));
        assert_eq!(std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap().trim(), "sandbox-init");
        // Root may read it (and sees nothing); they are not dumpable, so nobody else may.
        match std::fs::read(format!("/proc/{p}/environ")) {
            Ok(env) => assert!(env.iter().all(|b| *b == 0) && !has(&env, ENV_CANARY), "pid {p}: {:?}", String::from_utf8_lossy(&env)),
            Err(e) => assert!(!is_root() && e.kind() == std::io::ErrorKind::PermissionDenied, "pid {p}: {e}"),
        }
    }
}

fn cgroup_of(pid: i32, ctl: &str) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    s.lines().find_map(|l| {
        let mut it = l.splitn(3, ':');
        let (_, ctls, path) = (it.next()?, it.next()?, it.next()?);
        ctls.split(',').any(|c| c == ctl).then(|| path.to_string())
    })
}

/// Where the host mounts the cgroup hierarchy of `ctl` (v1) or the v2 hierarchy (`""`).
fn cgroup_mount(ctl: &str) -> Option<std::path::PathBuf> {
    let s = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    s.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let mnt = pre.split_whitespace().nth(4)?;
        let mut post = post.split_whitespace();
        let (fstype, opts) = (post.next()?, post.nth(1)?);
        let hit = if ctl.is_empty() { fstype == "cgroup2" } else { fstype == "cgroup" && opts.split(',').any(|o| o == ctl) };
        hit.then(|| mnt.into())
    })
}

/// As root, each running sandbox of a server has a cgroup slot of its own (`NAME.0`, `NAME.1`),
/// holding its processes and nobody else's; a free slot is taken again, and a free extra slot
/// is swept. Rootless, no cgroup is made at all.
#[test]
fn each_running_sandbox_has_its_own_cgroup_slot_and_slots_are_reused() {
    let s = shared();
    let pol = probe_policy("slots", "", "");
    let name = unique("slots");
    let (m1, m2) = (unique("marker-slot"), unique("marker-slot"));
    // The first is running before the second starts: it holds slot 0.
    let (a, _) = start_paused(mcpbox_cmd(&pol, &name, &[], &s.probe, &["pause", &m1]));
    let (b, _) = start_paused(mcpbox_cmd(&pol, &name, &[], &s.probe, &["pause", &m2]));
    let (pa, pb) = (pids_with_marker(&m1), pids_with_marker(&m2));
    assert_eq!((pa.len(), pb.len()), (2, 2), "both probes and their children should be running");
    let ctls: Vec<&str> = if cgroup_mount("pids").is_some() { vec!["pids", "memory"] } else { vec![""] };
    for ctl in &ctls {
        for (pids, k) in [(&pa, 0), (&pb, 1)] {
            for p in pids.iter() {
                let cg = cgroup_of(*p, ctl).unwrap_or_default();
                if is_root() {
                    assert_eq!(cg, format!("/mcpbox/{name}.{k}"), "pid {p}, controller {ctl:?}");
                } else {
                    assert!(!cg.contains("/mcpbox/"), "rootless made a cgroup: {cg}");
                }
            }
        }
    }
    drop((a, b));
    assert!(eventually(Duration::from_secs(5), || pids_with_marker(&m1).is_empty() && pids_with_marker(&m2).is_empty()));
    if !is_root() {
        return;
    }
    // A process left in a free slot (as a sandbox whose mcpbox was killed at container level
    // could leave one) is killed by the next sandbox that takes the slot.
    let mut stray = Command::new("sleep").arg("60").spawn().unwrap();
    let slot0 = cgroup_mount(ctls[0]).unwrap().join(format!("mcpbox/{name}.0"));
    std::fs::write(slot0.join("cgroup.procs"), stray.id().to_string()).unwrap();
    // A new sandbox takes slot 0 again; the sweep it runs once its server is up removes the
    // free slot 1, and slot 0 stays, empty, for the next start.
    let m3 = unique("marker-slot");
    let (c, _) = start_paused(mcpbox_cmd(&pol, &name, &[], &s.probe, &["pause", &m3]));
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(stray.wait().unwrap().signal(), Some(9), "the stray process in slot 0 should have been killed");
    }
    let pc = pids_with_marker(&m3);
    for ctl in &ctls {
        let mount = cgroup_mount(ctl).expect("cgroup mount");
        let dir = |k: u32| mount.join(format!("mcpbox/{name}.{k}"));
        assert!(pc.iter().all(|p| cgroup_of(*p, ctl).as_deref() == Some(format!("/mcpbox/{name}.0").as_str())), "{pc:?}");
        assert!(eventually(Duration::from_secs(2), || !dir(1).exists()), "free slot 1 was not swept ({ctl:?})");
        assert!(dir(0).exists());
    }
    drop(c);
    assert!(eventually(Duration::from_secs(5), || pids_with_marker(&m3).is_empty()));
    for ctl in &ctls {
        let procs = cgroup_mount(ctl).unwrap().join(format!("mcpbox/{name}.0/cgroup.procs"));
        let empty = || std::fs::read_to_string(&procs).map(|t| t.trim().is_empty()).unwrap_or(false);
        assert!(eventually(Duration::from_secs(2), empty), "slot 0 should be empty once its sandbox is gone ({ctl:?})");
    }
}

#[test]
fn static_and_dynamic_probes_run_under_the_default_policy() {
    let s = shared();
    let pol = probe_policy("linking", "", "");
    for prog in [&s.probe, &s.probe_static] {
        let out = run_timeout(mcpbox_cmd(&pol, &unique("linking"), &[], prog, &["uid"]), Duration::from_secs(30));
        assert_eq!(out.code, 0, "{out}");
        let uid = out.result("uid").1;
        // Inside, the server's uid is 1000 as root (mapped to its host uid) and the user's own
        // uid rootless.
        let want = if is_root() { "1000".to_string() } else { nix::unistd::getuid().as_raw().to_string() };
        assert_eq!(uid, want, "{out}");
    }
}

// ---- container level: mcpbox under a filter like Docker's default profile ----

/// A seccomp filter denying what Docker's default profile denies to an unprivileged container:
/// unshare, setns, mount/umount2, pivot_root, and clone with namespace flags answer EPERM;
/// clone3 answers ENOSYS (as Docker does, so that libc falls back to clone). Built before fork.
fn docker_like_filters() -> Vec<Vec<seccompiler::sock_filter>> {
    use seccompiler::{SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule};
    let arch = seccompiler::TargetArch::x86_64;
    let mut rules = std::collections::BTreeMap::new();
    for nr in [libc::SYS_unshare, libc::SYS_setns, libc::SYS_mount, libc::SYS_umount2, libc::SYS_pivot_root] {
        rules.insert(nr, vec![]);
    }
    let ns = [
        libc::CLONE_NEWNS, libc::CLONE_NEWUSER, libc::CLONE_NEWPID, libc::CLONE_NEWNET, libc::CLONE_NEWIPC,
        libc::CLONE_NEWUTS, libc::CLONE_NEWCGROUP,
    ];
    let clone_rules = ns
        .iter()
        .map(|f| {
            let c = SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(*f as u64), *f as u64).unwrap();
            SeccompRule::new(vec![c]).unwrap()
        })
        .collect();
    rules.insert(libc::SYS_clone, clone_rules);
    let deny = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::EPERM as u32), arch).unwrap();
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, vec![])].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .unwrap();
    // seccompiler kills a process calling through another ABI; Docker's profile instead allows
    // the 32-bit ABI (x86 is one of its architectures). Prepend: foreign arch → allow, so that
    // an `int 0x80` meets mcpbox's own filter, as it would in Docker.
    let foreign_allow = || {
        [
            seccompiler::sock_filter { code: 0x20, jt: 0, jf: 0, k: 4 }, // ld [arch]
            seccompiler::sock_filter { code: 0x15, jt: 1, jf: 0, k: 0xC000_003E }, // jeq AUDIT_ARCH_X86_64
            seccompiler::sock_filter { code: 0x06, jt: 0, jf: 0, k: 0x7fff_0000 }, // ret ALLOW
        ]
    };
    [deny, clone3]
        .into_iter()
        .map(|f| {
            let prog: seccompiler::BpfProgram = f.try_into().unwrap();
            foreign_allow().into_iter().chain(prog).collect()
        })
        .collect()
}

pub(crate) fn under_docker_filter(mut cmd: Command) -> Command {
    use std::os::unix::process::CommandExt;
    let progs = docker_like_filters();
    // (address, length) of each program: raw pointers are not Send, addresses are.
    let fprogs: Vec<(usize, u16)> = progs.iter().map(|p| (p.as_ptr() as usize, p.len() as u16)).collect();
    // SAFETY: the closure only calls prctl and seccomp (async-signal-safe) on programs built
    // before the fork, which stay alive (moved into the closure) until exec.
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &progs;
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            for (addr, len) in &fprogs {
                let f = libc::sock_fprog { len: *len, filter: *addr as *mut libc::sock_filter };
                if libc::syscall(libc::SYS_seccomp, 1 /* SECCOMP_SET_MODE_FILTER */, 0, &f as *const libc::sock_fprog) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

#[test]
fn container_level_is_refused_unless_permitted() {
    let s = shared();
    let pol = probe_policy("container-refused", "", "");
    let cmd = under_docker_filter(mcpbox_cmd(&pol, &unique("ctr"), &[], &s.probe, &["uid"]));
    let out = run_timeout(cmd, Duration::from_secs(30));
    assert_eq!(out.code, 125, "{out}");
    assert!(out.try_result("uid").is_none(), "the server ran: {out}");
    for want in ["unshare", "--security-opt", "level = \"container\"", "--min-level container"] {
        assert!(out.stderr.contains(want), "the refusal should mention `{want}`: {out}");
    }
}

#[test]
fn container_level_still_denies() {
    let s = shared();
    let base = tempdir();
    let outside = base.path().join("outside");
    mkdir_755(&outside);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let pol = probe_policy("container", "", "");
    let run = |args: &[&str]| {
        let cmd = under_docker_filter(mcpbox_cmd(&pol, &unique("ctr"), &["--min-level", "container"], &s.probe, args));
        let out = run_timeout(cmd, Duration::from_secs(60));
        assert_eq!(out.code, 0, "{out}");
        assert!(out.stderr.contains("container"), "the container level must be announced: {out}");
        out
    };
    // No mount view here: Landlock alone refuses (EACCES) what is not granted.
    for path in [s.secret.to_str().unwrap(), s.config.to_str().unwrap(), "/etc/shadow"] {
        let out = run(&["read", path]);
        assert_eq!(out.denied("read"), "EACCES", "reading {path}: {out}");
        no_canary(&out);
    }
    let target = outside.join("x");
    let out = run(&["write", target.to_str().unwrap()]);
    assert_eq!(out.denied("write"), "EACCES", "{out}");
    assert!(!target.exists());
    // The host's network is shared at this level. Two walls: seccomp refuses AF_INET sockets
    // (EPERM, the one the probe meets first) and Landlock refuses TCP connect (EACCES).
    let out = run(&["tcp", &port]);
    one_of(&out.denied("tcp"), &["EPERM", "EACCES"], "TCP at container level", &out);
    assert!(listener.accept().is_err());
    let mut args = vec!["each", "ptrace_child", "status"];
    args.extend(PRIVILEGED);
    let out = run(&args);
    assert_privileged_refused(&out);
    assert_eq!(out.denied("ptrace_child"), "EPERM", "{out}");
    let d = out.result("status").1;
    for want in ["NoNewPrivs: 1;", "CapEff: 0000000000000000;", "CapPrm: 0000000000000000;", "Seccomp: 2;"] {
        assert!(d.contains(want), "missing `{want}`: {out}");
    }
    // Without a user namespace only root can empty the bounding set (an unprivileged user has
    // no CAP_SETPCAP; with NO_NEW_PRIVS nothing can be gained from it anyway).
    if is_root() {
        assert!(d.contains("CapBnd: 0000000000000000;"), "{out}");
    }
}

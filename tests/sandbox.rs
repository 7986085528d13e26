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
            assert!(
                !detail.contains(ENV_CANARY) && !detail.contains("MCPBOX_"),
                "{path} shows mcpbox's environment: {out}"
            );
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
        (outside.join("x"), &["ENOENT"][..]),     // not in the view at all
        (ro.join("x"), &["EROFS", "EACCES"][..]), // granted read-only
        ("/usr/lib/x86_64-linux-gnu/mcpbox-probe-x".into(), &["EROFS", "EACCES"][..]),
        // Beside a grant: the directories leading to it exist inside but stand for host paths
        // that were not granted (under /tmp they sit in the sandbox's writable tmpfs).
        (base.path().join("beside"), &["EROFS"][..]),
    ] {
        let out = confined(&pol, &name, &["write", target.to_str().unwrap()]);
        one_of(&out.denied("write"), want, &format!("writing {}", target.display()), &out);
        assert!(!target.exists(), "{} appeared on the host", target.display());
    }

    // Inside the data dir: the file is kept, owned by the server's host uid. As root the data
    // dir is a filesystem of its own (the default policy's `[limits] disk`): the file is in its
    // image; rootless it appears in the host's data dir.
    let data = s.state.join(&name).join("data");
    let file = data.join("written-by-probe");
    let out = confined(&pol, &name, &["write", file.to_str().unwrap()]);
    assert!(out.result("write").0, "{out}");
    if is_root() {
        let owner = image_file_owner(&s.state.join(&name).join("data.img"), "written-by-probe")
            .expect("the file written inside is in the data image");
        assert_ne!(owner, 0, "root running mcpbox must never mean host root inside");
        assert_eq!(owner, allocated_uid(&name));
    } else {
        let owner = std::fs::metadata(&file).expect("the file written inside appears on the host").uid();
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
    "setuid0",
    "setuid_self",
    "unshare_user",
    "mount",
    "keyctl",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "tiocsti",
    "int80",
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
    for want in [
        "NoNewPrivs: 1;",
        "CapEff: 0000000000000000;",
        "CapPrm: 0000000000000000;",
        "CapBnd: 0000000000000000;",
        "Seccomp: 2;",
    ] {
        assert!(d.contains(want), "missing `{want}`: {out}");
    }
    let out = unconfined(&["status"]);
    let u = out.result("status").1;
    assert!(
        u.contains("Seccomp: 0;") && u.contains("NoNewPrivs: 0;") && !u.contains("CapBnd: 0000000000000000;"),
        "unconfined: {out}"
    );
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
    // The network helper exits once it has handed over the namespace, but on a loaded machine
    // it may not have run to its exit yet when the server already answers.
    let alone = eventually(Duration::from_secs(5), || children_of(outer[0]).len() == 1);
    let mut inits = outer.clone();
    inits.extend(children_of(outer[0]));
    assert!(alone && inits.len() == 2, "sandbox-init should have one live child, PID 1: {inits:?}");
    for p in inits {
        let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).unwrap();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).filter(|a| !a.is_empty()).collect();
        assert_eq!(
            args.get(1..),
            Some(&[&b"sandbox-init"[..]][..]),
            "pid {p}: {:?}",
            String::from_utf8_lossy(&cmdline)
        );
        assert!(!has(&cmdline, &marker));
        assert_eq!(std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap().trim(), "sandbox-init");
        // Root may read it (and sees nothing); they are not dumpable, so nobody else may.
        match std::fs::read(format!("/proc/{p}/environ")) {
            Ok(env) => assert!(
                env.iter().all(|b| *b == 0) && !has(&env, ENV_CANARY),
                "pid {p}: {:?}",
                String::from_utf8_lossy(&env)
            ),
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
        let hit =
            if ctl.is_empty() { fstype == "cgroup2" } else { fstype == "cgroup" && opts.split(',').any(|o| o == ctl) };
        hit.then(|| mnt.into())
    })
}

/// The hierarchies mcpbox makes sandbox cgroups in here: v1 `pids` and `memory` where v1 is
/// mounted, else cgroup v2 (`""`).
fn cgroup_ctls() -> Vec<&'static str> {
    if cgroup_mount("pids").is_some() {
        vec!["pids", "memory"]
    } else {
        vec![""]
    }
}

/// Cgroups made for one test (root only) to start mcpbox in, removed with everything below them
/// when dropped. In cgroup v2 at the hierarchy's root: a cgroup under the test's own could not
/// be given controllers while the test runs in it; in v1 under the test's own cgroup.
struct ScratchCgroups(Vec<(&'static str, String, std::path::PathBuf)>);

impl ScratchCgroups {
    fn new(ctls: &[&'static str]) -> Self {
        let name = unique("mcpbox-test-cg");
        let v = ctls
            .iter()
            .map(|ctl| {
                let mount = cgroup_mount(ctl).expect("cgroup mount");
                let rel = if ctl.is_empty() {
                    std::fs::write(mount.join("cgroup.subtree_control"), "+pids +memory")
                        .expect("enabling pids and memory at the v2 root");
                    format!("/{name}")
                } else {
                    format!("{}/{name}", cgroup_of(std::process::id() as i32, ctl).unwrap().trim_end_matches('/'))
                };
                let dir = mount.join(rel.trim_start_matches('/'));
                std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
                (*ctl, rel, dir)
            })
            .collect();
        ScratchCgroups(v)
    }

    /// The cgroup path of `ctl`'s scratch cgroup, as /proc/PID/cgroup shows it.
    fn rel(&self, ctl: &str) -> &str {
        &self.0.iter().find(|(c, _, _)| *c == ctl).unwrap().1
    }

    fn dir(&self, ctl: &str) -> std::path::PathBuf {
        self.0.iter().find(|(c, _, _)| *c == ctl).unwrap().2.clone()
    }

    /// `cmd`, started inside the scratch cgroups (by a shell that moves itself there, then execs
    /// it). In cgroup v2, once an mcpbox started there has handed controllers to its sandboxes,
    /// no process may join the scratch cgroup itself: then into the leaf it moved into (where
    /// systemd's `DelegateSubgroup=mcpbox-supervisor` would start it).
    fn enter(&self, cmd: Command) -> Command {
        let mut script = String::new();
        for (ctl, _, dir) in &self.0 {
            script += &if ctl.is_empty() {
                format!("{{ echo $$ > '{0}/cgroup.procs' || echo $$ > '{0}/mcpbox-supervisor/cgroup.procs'; }} 2>/dev/null && ", dir.display())
            } else {
                format!("echo $$ > '{}/cgroup.procs' && ", dir.display())
            };
        }
        script += "exec \"$@\"";
        let mut sh = Command::new("/bin/sh");
        sh.arg("-c").arg(script).arg("sh").arg(cmd.get_program()).args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => sh.env(k, v),
                None => sh.env_remove(k),
            };
        }
        sh
    }
}

impl Drop for ScratchCgroups {
    fn drop(&mut self) {
        for (_, _, dir) in &self.0 {
            // Deepest first: the slots, `mcpbox`, the supervisor leaf, the scratch cgroup.
            let mut dirs: Vec<std::path::PathBuf> = vec![dir.clone()];
            let mut i = 0;
            while i < dirs.len() {
                if let Ok(rd) = std::fs::read_dir(&dirs[i]) {
                    dirs.extend(rd.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
                }
                i += 1;
            }
            for d in dirs.iter().rev() {
                let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
                kill_all(&procs.lines().filter_map(|l| l.parse().ok()).collect::<Vec<i32>>());
                eventually(Duration::from_secs(2), || std::fs::remove_dir(d).is_ok() || !d.exists());
            }
        }
    }
}

/// As root, a sandbox's cgroup lies under the cgroup mcpbox runs in (so that a systemd unit's
/// TasksMax and KillMode cover it), not at the hierarchy's root; in cgroup v2 mcpbox moved
/// itself into the leaf `mcpbox-supervisor` beside it. Rootless, no cgroup is made: the server
/// stays in the cgroup mcpbox ran in.
#[test]
fn sandbox_cgroups_are_made_under_mcpboxs_own() {
    let s = shared();
    let pol = probe_policy("owncg", "", "");
    let name = unique("owncg");
    let marker = unique("marker-owncg");
    let ctls = cgroup_ctls();
    let me = std::process::id() as i32;
    if !is_root() {
        let (_child, _) = start_paused(mcpbox_cmd(&pol, &name, &[], &s.probe, &["pause", &marker]));
        let pids = pids_with_marker(&marker);
        assert_eq!(pids.len(), 2, "{pids:?}");
        for ctl in &ctls {
            for p in &pids {
                assert_eq!(
                    cgroup_of(*p, ctl),
                    cgroup_of(me, ctl),
                    "rootless, pid {p} left the cgroup mcpbox ran in ({ctl:?})"
                );
            }
        }
        return;
    }
    let scratch = ScratchCgroups::new(&ctls);
    let (child, _) = start_paused(scratch.enter(mcpbox_cmd(&pol, &name, &[], &s.probe, &["pause", &marker])));
    let pids = pids_with_marker(&marker);
    assert_eq!(pids.len(), 2, "{pids:?}");
    for ctl in &ctls {
        let rel = scratch.rel(ctl);
        for p in &pids {
            let cg = cgroup_of(*p, ctl).unwrap_or_default();
            assert!(
                cg.starts_with(&format!("{rel}/")),
                "pid {p}: cgroup {cg} is not under {rel}, where mcpbox ran ({ctl:?})"
            );
            assert_eq!(cg, format!("{rel}/mcpbox/{name}.0"), "pid {p} ({ctl:?})");
        }
        let own = cgroup_of(child.0.id() as i32, ctl).unwrap_or_default();
        let want = if ctl.is_empty() { format!("{rel}/mcpbox-supervisor") } else { rel.to_string() };
        assert_eq!(own, want, "where mcpbox itself is ({ctl:?})");
    }
    drop(child);
    assert!(eventually(Duration::from_secs(5), || pids_with_marker(&marker).is_empty()));
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
    let ctls = cgroup_ctls();
    // As root, mcpbox runs in a scratch cgroup of its own (as in a systemd unit), so that where
    // it makes the slots does not depend on who shares the test's cgroup.
    let scratch = is_root().then(|| ScratchCgroups::new(&ctls));
    let run = |marker: &str| {
        let cmd = mcpbox_cmd(&pol, &name, &[], &s.probe, &["pause", marker]);
        start_paused(match &scratch {
            Some(sc) => sc.enter(cmd),
            None => cmd,
        })
    };
    // The first is running before the second starts: it holds slot 0.
    let (a, _) = run(&m1);
    let (b, _) = run(&m2);
    let (pa, pb) = (pids_with_marker(&m1), pids_with_marker(&m2));
    assert_eq!((pa.len(), pb.len()), (2, 2), "both probes and their children should be running");
    let slot_dir = |ctl: &str| scratch.as_ref().expect("root").dir(ctl);
    for ctl in &ctls {
        for (pids, k) in [(&pa, 0), (&pb, 1)] {
            for p in pids.iter() {
                let cg = cgroup_of(*p, ctl).unwrap_or_default();
                if let Some(sc) = &scratch {
                    assert_eq!(cg, format!("{}/mcpbox/{name}.{k}", sc.rel(ctl)), "pid {p}, controller {ctl:?}");
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
    let slot0 = slot_dir(ctls[0]).join(format!("mcpbox/{name}.0"));
    std::fs::write(slot0.join("cgroup.procs"), stray.id().to_string()).unwrap();
    // A new sandbox takes slot 0 again; the sweep it runs once its server is up removes the
    // free slot 1, and slot 0 stays, empty, for the next start.
    let m3 = unique("marker-slot");
    let (c, _) = run(&m3);
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(stray.wait().unwrap().signal(), Some(9), "the stray process in slot 0 should have been killed");
    }
    let pc = pids_with_marker(&m3);
    for ctl in &ctls {
        let mount = slot_dir(ctl);
        let dir = |k: u32| mount.join(format!("mcpbox/{name}.{k}"));
        let rel = scratch.as_ref().unwrap().rel(ctl);
        assert!(pc.iter().all(|p| cgroup_of(*p, ctl) == Some(format!("{rel}/mcpbox/{name}.0"))), "{pc:?}");
        assert!(eventually(Duration::from_secs(2), || !dir(1).exists()), "free slot 1 was not swept ({ctl:?})");
        assert!(dir(0).exists());
    }
    drop(c);
    assert!(eventually(Duration::from_secs(5), || pids_with_marker(&m3).is_empty()));
    for ctl in &ctls {
        let procs = slot_dir(ctl).join(format!("mcpbox/{name}.0/cgroup.procs"));
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
        libc::CLONE_NEWNS,
        libc::CLONE_NEWUSER,
        libc::CLONE_NEWPID,
        libc::CLONE_NEWNET,
        libc::CLONE_NEWIPC,
        libc::CLONE_NEWUTS,
        libc::CLONE_NEWCGROUP,
    ];
    let clone_rules = ns
        .iter()
        .map(|f| {
            let c = SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(*f as u64), *f as u64)
                .unwrap();
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

pub(crate) fn under_docker_filter(cmd: Command) -> Command {
    under_filters(cmd, docker_like_filters())
}

/// `cmd` with NO_NEW_PRIVS and the seccomp programs `progs` (installed in order) applied in
/// the child before exec.
fn under_filters(mut cmd: Command, progs: Vec<Vec<seccompiler::sock_filter>>) -> Command {
    use std::os::unix::process::CommandExt;
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
                if libc::syscall(
                    libc::SYS_seccomp,
                    1, /* SECCOMP_SET_MODE_FILTER */
                    0,
                    &f as *const libc::sock_fprog,
                ) != 0
                {
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

// ---- Docker's `full`-level profile (deploy/docker-seccomp.json), applied as Docker would ----

/// x86_64 syscall numbers by name, from the kernel headers (linux-libc-dev, pulled in by libc6-dev).
fn x86_64_syscalls() -> std::collections::HashMap<String, i64> {
    let path = "/usr/include/x86_64-linux-gnu/asm/unistd_64.h";
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{path}: {e} (install linux-libc-dev: scripts/test.sh does)"));
    text.lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("#define __NR_")?.split_whitespace();
            Some((w.next()?.to_string(), w.next()?.parse().ok()?))
        })
        .collect()
}

/// The capabilities Docker gives a container by default (moby's `DefaultCapabilities`): the
/// profile's `includes`/`excludes` are decided against these.
const DOCKER_DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Translate a Docker seccomp profile (JSON) into seccomp programs for x86_64, the way Docker
/// sets it up for a default container: rules whose `includes`/`excludes` (arch `amd64`, the
/// default capabilities, the running kernel) rule them out are dropped; names unknown on x86_64
/// are skipped (as libseccomp does); arguments of one rule must all hold, rules of one syscall
/// are alternatives. One program allows what the profile allows (anything else gets the default
/// action); one program per `SCMP_ACT_ERRNO` value, installed after it, so that its errno wins
/// (the kernel keeps the most recent filter's result among equal actions).
fn docker_profile_filters(profile: &serde_json::Value) -> Vec<Vec<seccompiler::sock_filter>> {
    use seccompiler::{SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule};
    use std::collections::BTreeMap;
    let nrs = x86_64_syscalls();
    let release = nix::sys::utsname::uname().unwrap().release().to_string_lossy().into_owned();
    let version = |v: &str| -> (u32, u32) {
        let mut it = v.split(|c: char| !c.is_ascii_digit()).filter_map(|x| x.parse().ok());
        (it.next().unwrap_or(0), it.next().unwrap_or(0))
    };
    let kernel = version(&release);
    let strs = |v: &serde_json::Value| -> Vec<String> {
        v.as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect()).unwrap_or_default()
    };
    let errno_of = |action: &str, errno: &serde_json::Value| -> Option<u32> {
        match action {
            "SCMP_ACT_ALLOW" => None,
            "SCMP_ACT_ERRNO" => Some(errno.as_u64().unwrap_or(libc::EPERM as u64) as u32),
            other => panic!("the loader does not know action {other}"),
        }
    };
    let default = errno_of(profile["defaultAction"].as_str().unwrap(), &profile["defaultErrnoRet"])
        .expect("a profile that denies by default");
    // None: unconditional; Some(rules): any of them.
    type Rules = BTreeMap<i64, Option<Vec<SeccompRule>>>;
    let mut by_action: BTreeMap<Option<u32>, Rules> = BTreeMap::new();
    for rule in profile["syscalls"].as_array().unwrap() {
        let (inc, exc) = (&rule["includes"], &rule["excludes"]);
        if strs(&exc["arches"]).iter().any(|a| a == "amd64")
            || strs(&exc["caps"]).iter().any(|c| DOCKER_DEFAULT_CAPS.contains(&c.as_str()))
            || exc["minKernel"].as_str().is_some_and(|k| kernel >= version(k))
        {
            continue;
        }
        let arches = strs(&inc["arches"]);
        if (!arches.is_empty() && !arches.iter().any(|a| a == "amd64"))
            || !strs(&inc["caps"]).iter().all(|c| DOCKER_DEFAULT_CAPS.contains(&c.as_str()))
            || inc["minKernel"].as_str().is_some_and(|k| kernel < version(k))
        {
            continue;
        }
        let conds: Vec<SeccompCondition> = rule["args"]
            .as_array()
            .map(|a| a.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|a| {
                let (value, two) = (a["value"].as_u64().unwrap(), a["valueTwo"].as_u64().unwrap_or(0));
                let op = match a["op"].as_str().unwrap() {
                    "SCMP_CMP_EQ" => SeccompCmpOp::Eq,
                    "SCMP_CMP_NE" => SeccompCmpOp::Ne,
                    "SCMP_CMP_LT" => SeccompCmpOp::Lt,
                    "SCMP_CMP_LE" => SeccompCmpOp::Le,
                    "SCMP_CMP_GT" => SeccompCmpOp::Gt,
                    "SCMP_CMP_GE" => SeccompCmpOp::Ge,
                    "SCMP_CMP_MASKED_EQ" => SeccompCmpOp::MaskedEq(value),
                    other => panic!("the loader does not know comparison {other}"),
                };
                let operand = if a["op"] == "SCMP_CMP_MASKED_EQ" { two } else { value };
                SeccompCondition::new(a["index"].as_u64().unwrap() as u8, SeccompCmpArgLen::Qword, op, operand).unwrap()
            })
            .collect();
        let action = errno_of(rule["action"].as_str().unwrap(), &rule["errnoRet"]);
        let rules = by_action.entry(action).or_default();
        for name in strs(&rule["names"]) {
            let Some(nr) = nrs.get(&name) else { continue };
            let entry = rules.entry(*nr).or_insert_with(|| Some(Vec::new()));
            match (entry.as_mut(), conds.is_empty()) {
                (_, true) => *entry = None,
                (Some(v), false) => v.push(SeccompRule::new(conds.clone()).unwrap()),
                (None, false) => {}
            }
        }
    }
    let arch = seccompiler::TargetArch::x86_64;
    let program = |rules: Rules, mismatch: SeccompAction, matched: SeccompAction| -> Vec<seccompiler::sock_filter> {
        let rules = rules.into_iter().map(|(nr, r)| (nr, r.unwrap_or_default())).collect();
        let f = SeccompFilter::new(rules, mismatch, matched, arch).unwrap();
        let prog: seccompiler::BpfProgram = f.try_into().unwrap();
        prog
    };
    let mut progs =
        vec![program(by_action.remove(&None).unwrap_or_default(), SeccompAction::Errno(default), SeccompAction::Allow)];
    for (errno, rules) in by_action {
        progs.push(program(rules, SeccompAction::Allow, SeccompAction::Errno(errno.unwrap())));
    }
    progs
}

fn shipped_docker_profile() -> serde_json::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/docker-seccomp.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Without `name` anywhere in the profile.
fn profile_without(mut profile: serde_json::Value, name: &str) -> serde_json::Value {
    for rule in profile["syscalls"].as_array_mut().unwrap() {
        rule["names"].as_array_mut().unwrap().retain(|n| n != name);
    }
    profile
}

/// `deploy/docker-seccomp.json`, loaded the way Docker loads it, lets `mcpbox doctor` and
/// `mcpbox run` reach the `full` level; without `mount_setattr` (which the mount setup calls),
/// the same run is refused, naming it: so the filter really is in force.
#[test]
fn docker_full_profile_lets_the_full_level_start() {
    let s = shared();
    let profile = shipped_docker_profile();
    let mut doctor = Command::new(mcpbox());
    doctor.arg("doctor");
    test_env(&mut doctor);
    let out = run_timeout(under_filters(doctor, docker_profile_filters(&profile)), Duration::from_secs(60));
    assert_eq!(out.code, 0, "{out}");
    assert!(
        out.stdout.contains("\nlevel: full") && !out.stdout.contains("trial failed"),
        "doctor should reach `full` under the profile: {out}"
    );
    assert!(out.stdout.contains("under a filter (mode 2"), "doctor should see the profile's filter: {out}");

    let pol = probe_policy("docker-full", "", "");
    let cmd = mcpbox_cmd(&pol, &unique("dockerfull"), &[], &s.probe, &["uid", "status"]);
    let out = run_timeout(under_filters(cmd, docker_profile_filters(&profile)), Duration::from_secs(60));
    assert_eq!(out.code, 0, "{out}");
    assert!(out.result("uid").0, "{out}");
    assert!(!out.stderr.contains("container"), "the run should be at `full`, not `container`: {out}");
    let mut truecmd = Command::new(mcpbox());
    truecmd.args(["run", "--state-dir"]).arg(&s.state).args([
        "--name",
        &unique("dockertrue"),
        "--policy",
        "default",
        "--",
        "/bin/true",
    ]);
    test_env(&mut truecmd);
    let out = run_timeout(under_filters(truecmd, docker_profile_filters(&profile)), Duration::from_secs(60));
    assert_eq!(out.code, 0, "{out}");

    let cmd = mcpbox_cmd(&pol, &unique("dockerfull"), &[], &s.probe, &["uid"]);
    let out = run_timeout(
        under_filters(cmd, docker_profile_filters(&profile_without(profile, "mount_setattr"))),
        Duration::from_secs(60),
    );
    assert_ne!(out.code, 0, "the run should fail without mount_setattr: {out}");
    assert!(out.try_result("uid").is_none(), "the server ran: {out}");
    assert!(out.stderr.contains("mount_setattr"), "the failure should name mount_setattr: {out}");
}

// ---- container level: nothing of a sandbox outlives it ----

/// Run `cmd` with piped output until it exits (at most `timeout`), then give its stdout and
/// stderr `eof` to reach end of file. The bool is false if something still held them open then.
pub fn run_to_eof(mut cmd: Command, timeout: Duration, eof: Duration) -> (Output, bool) {
    use std::io::Read;
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let started = std::time::Instant::now();
    let mut child = cmd.spawn().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let out: Box<dyn Read + Send> = Box::new(child.stdout.take().unwrap());
    let err: Box<dyn Read + Send> = Box::new(child.stderr.take().unwrap());
    for (k, mut stream) in [(0, out), (1, err)] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = stream.read_to_end(&mut s);
            let _ = tx.send((k, String::from_utf8_lossy(&s).into_owned()));
        });
    }
    let status =
        wait_timeout(&mut child, timeout).unwrap_or_else(|| panic!("{cmd:?} did not finish within {timeout:?}"));
    let elapsed = started.elapsed();
    let (mut stdout, mut stderr, mut closed) = (String::new(), String::new(), true);
    let deadline = std::time::Instant::now() + eof;
    for _ in 0..2 {
        match rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
            Ok((0, s)) => stdout = s,
            Ok((_, s)) => stderr = s,
            Err(_) => closed = false,
        }
    }
    use std::os::unix::process::ExitStatusExt;
    let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    (Output { code, stdout, stderr, elapsed }, closed)
}

/// The processes of `pids` that are not zombies (an exited process whose parent, here the host's
/// PID 1 once sandbox-init is gone, has not collected its status yet: it runs and holds nothing).
pub fn not_zombies(pids: Vec<i32>) -> Vec<i32> {
    pids.into_iter()
        .filter(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            stat.rsplit_once(')').is_some_and(|(_, rest)| rest.split_whitespace().next() != Some("Z"))
        })
        .collect()
}

/// At `container` level (no PID namespace) a server that double-forks a setsid'd daemon holding
/// its stdout: once the server exits, the run ends, its output reaches end of file, and within
/// 1 s no process of the sandbox is left (as root: none of the server's uid either).
#[test]
fn container_level_leaves_no_daemon_when_the_server_exits() {
    let s = shared();
    let pol = probe_policy("ctr-daemon", "", "");
    let name = unique("ctrdaemon");
    let marker = unique("marker-ctrdaemon");
    let cmd =
        under_docker_filter(mcpbox_cmd(&pol, &name, &["--min-level", "container"], &s.probe, &["daemon", &marker]));
    let (out, closed) = run_to_eof(cmd, Duration::from_secs(60), Duration::from_secs(2));
    let left = || {
        let mut v = pids_with_marker(&marker);
        if is_root() {
            v.extend(pids_of_uid(allocated_uid(&name)));
        }
        not_zombies(v)
    };
    let gone = eventually(Duration::from_secs(1), || left().is_empty());
    let left = left();
    kill_all(&left);
    assert!(closed, "a process of the sandbox held mcpbox's output open after the run ended: {left:?}\n{out}");
    assert!(gone, "processes of the sandbox (or of the server's uid) outlived it by 1 s: {left:?}\n{out}");
    assert_eq!(out.code, 0, "{out}");
    assert!(out.result("daemon").0, "{out}");
    assert!(out.stderr.contains("container"), "the run should be at `container` level: {out}");

    // Unconfined, the daemon outlives the probe and keeps the pipe open: the checks above can fail.
    let marker = unique("marker-ctrdaemon-unconfined");
    let mut cmd = Command::new(&s.probe);
    cmd.args(["daemon", &marker]);
    let (out, closed) = run_to_eof(cmd, Duration::from_secs(10), Duration::from_millis(500));
    let left = pids_with_marker(&marker);
    kill_all(&left);
    assert!(
        out.code == 0 && !closed && left.len() == 1,
        "unconfined, the daemon should survive and hold the pipe: {left:?} {out}"
    );
}

/// At `container` level, a session that ends while its server runs, with a setsid'd
/// double-forked daemon beside it: by SIGTERM to mcpbox (passed on to the server), by SIGKILL to
/// mcpbox, and by SIGKILL to the sandbox-init mcpbox started (how `serve` ends a session whose
/// server ignores SIGTERM). Within 1 s nothing of the sandbox is left.
#[test]
fn container_level_session_end_leaves_no_daemon() {
    let s = shared();
    let pol = probe_policy("ctr-end", "", "");
    for how in ["SIGTERM to mcpbox", "SIGKILL to mcpbox", "SIGKILL to sandbox-init"] {
        let name = unique("ctrend");
        let marker = unique("marker-ctrend");
        let mut cmd = under_docker_filter(mcpbox_cmd(
            &pol,
            &name,
            &["--min-level", "container"],
            &s.probe,
            &["daemon", &marker, "stay"],
        ));
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = Killer(cmd.spawn().unwrap());
        let mut line = String::new();
        BufReader::new(child.0.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert!(line.starts_with("RESULT daemon ok"), "{how}: unexpected: {line:?}");
        let running = pids_with_marker(&marker);
        assert_eq!(running.len(), 2, "{how}: the probe and its daemon should be running: {running:?}");
        let mcpbox_pid = nix::unistd::Pid::from_raw(child.0.id() as i32);
        let target = match how {
            "SIGKILL to sandbox-init" => {
                let inits = children_of(mcpbox_pid.as_raw());
                assert_eq!(inits.len(), 1, "{how}: mcpbox should have one child, sandbox-init: {inits:?}");
                nix::unistd::Pid::from_raw(inits[0])
            }
            _ => mcpbox_pid,
        };
        let sig = if how.starts_with("SIGTERM") {
            nix::sys::signal::Signal::SIGTERM
        } else {
            nix::sys::signal::Signal::SIGKILL
        };
        nix::sys::signal::kill(target, sig).unwrap();
        let _ =
            wait_timeout(&mut child.0, Duration::from_secs(10)).unwrap_or_else(|| panic!("{how}: mcpbox did not exit"));
        // As root, sandbox-init runs under the server's uid too: none of them may be left.
        let left = || {
            let mut v = pids_with_marker(&marker);
            if is_root() {
                v.extend(pids_of_uid(allocated_uid(&name)));
            }
            not_zombies(v)
        };
        let gone = eventually(Duration::from_secs(1), || left().is_empty());
        let left = left();
        let what: Vec<String> =
            left.iter().map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default()).collect();
        kill_all(&left);
        assert!(gone, "{how}: processes of the sandbox outlived the session by 1 s: {what:?}");
    }
}

/// `mcpbox serve` at `container` level with a shared server whose process leaves a setsid'd
/// double-forked daemon: when serve stops (SIGTERM: it ends its servers, SIGKILL to sandbox-init
/// after the grace period for one that ignores SIGTERM) or is killed, nothing of the sandbox is
/// left 1 s after serve has exited: neither the server's processes nor any process that was in
/// serve's tree while it ran (its sandbox-inits). (Not by uid: on a shared machine, the test
/// suites of other checkouts hand out the same uids at the same time.)
#[test]
fn container_level_serve_leaves_no_daemon() {
    let s = shared();
    let pol = probe_policy("ctr-serve", "", "");
    for how in ["SIGTERM", "SIGKILL"] {
        let name = unique("ctrserve");
        let marker = unique("marker-ctrserve");
        let dir = tempdir();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let cfg = serde_json::json!({
            "mcpProxy": { "addr": format!("127.0.0.1:{port}"), "name": "ctr", "type": "streamable-http", "options": { "authTokens": ["t0ken"] } },
            "mcpServers": { &name: {
                "command": s.probe, "args": ["daemon", &marker, "stay"], "isolation": "shared", "policy": pol,
            } },
        });
        let cfg_path = dir.path().join("mcpbox.json");
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let mut cmd = Command::new(mcpbox());
        cmd.args(["serve", "--config"]).arg(&cfg_path).arg("--state-dir").arg(&s.state).args([
            "--min-level",
            "container",
            "--grace",
            "1",
        ]);
        test_env(&mut cmd);
        let mut cmd = under_docker_filter(cmd);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(dir.path().join("log")).unwrap());
        let mut serve = Killer(cmd.spawn().unwrap());
        let log = || std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
        assert!(
            eventually(Duration::from_secs(20), || pids_with_marker(&marker).len() == 2),
            "{how}: the server and its daemon should be running:\n{}",
            log()
        );
        let tree = tree_of(serve.0.id() as i32);
        let sig = if how == "SIGTERM" { nix::sys::signal::Signal::SIGTERM } else { nix::sys::signal::Signal::SIGKILL };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(serve.0.id() as i32), sig).unwrap();
        wait_timeout(&mut serve.0, Duration::from_secs(20))
            .unwrap_or_else(|| panic!("{how}: serve did not exit:\n{}", log()));
        let left = || {
            let mut v = pids_with_marker(&marker);
            v.extend(tree.iter().filter(|(p, start)| start_time(*p) == Some(*start)).map(|(p, _)| *p));
            v.sort();
            v.dedup();
            not_zombies(v)
        };
        let gone = eventually(Duration::from_secs(1), || left().is_empty());
        let left = left();
        kill_all(&left);
        let what: Vec<String> = left
            .iter()
            .map(|p| {
                format!(
                    "{} uid {:?}",
                    std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default(),
                    proc_uid(*p)
                )
            })
            .collect();
        assert!(gone, "{how}: processes of the sandbox outlived serve by 1 s: {left:?} {what:?}\n{}", log());
        assert!(
            tree.len() >= 4,
            "{how}: serve's tree should have held sandbox-init, its reaper, the server and the daemon: {tree:?}"
        );
        assert!(log().contains("container"), "{how}: the server should run at `container` level:\n{}", log());
    }
}

/// The start time of `pid` (field 22 of /proc/PID/stat), to tell it from a later process that
/// reuses its number.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

/// Every descendant of `root` (from /proc/PID/task/TID/children), with its start time.
fn tree_of(root: i32) -> Vec<(i32, u64)> {
    let mut found = Vec::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else { continue };
        for t in tasks.flatten() {
            let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for k in kids.split_whitespace().filter_map(|k| k.parse::<i32>().ok()) {
                if let Some(st) = start_time(k) {
                    found.push((k, st));
                    todo.push(k);
                }
            }
        }
    }
    found
}

/// The owner uid of `/NAME` inside an ext4 image, read with debugfs (no mount needed).
fn image_file_owner(image: &std::path::Path, name: &str) -> Option<u32> {
    let out = Command::new("/usr/sbin/debugfs")
        .arg("-R")
        .arg(format!("stat /{name}"))
        .arg(image)
        .output()
        .expect("running debugfs (e2fsprogs)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let rest = text.split("User:").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// `[limits] disk`: as root the data dir is a filesystem of its own, and a server writing past
/// its size gets ENOSPC (asserted by the probe's errno), while the host's disk gets nothing and
/// mcpbox goes on starting the server; sandboxes of one server running at once share it.
/// Rootless, the limit cannot be enforced: the start is refused unless the policy relaxes it,
/// and then it is announced.
#[test]
fn disk_limit_stops_writes_with_enospc_and_mcpbox_is_unaffected() {
    let s = shared();
    let strict = probe_policy(
        "disk-strict",
        "write = [\"${DATA}\"]",
        "[limits]\ndisk = \"16M\"\n[sandbox]\nrelax = [\"cpu\"]\n",
    );
    let relaxed = probe_policy(
        "disk-relaxed",
        "write = [\"${DATA}\"]",
        "[limits]\ndisk = \"16M\"\n[sandbox]\nrelax = [\"cpu\", \"disk\"]\n",
    );
    let name = unique("disk");
    let data = s.state.join(&name).join("data");
    let big = data.join("big");
    if !is_root() {
        let out = confined(&strict, &name, &["write", data.join("x").to_str().unwrap()]);
        assert_eq!(out.code, 125, "{out}");
        assert!(out.try_result("write").is_none(), "the server must not have run: {out}");
        assert!(
            out.stderr.contains("[limits] disk = \"16M\" cannot be enforced")
                && out.stderr.contains("relax = [\"disk\"]"),
            "{out}"
        );
        let out = confined(&relaxed, &name, &["write", data.join("x").to_str().unwrap()]);
        assert!(out.result("write").0, "{out}");
        assert!(
            out.stderr.contains("cannot be enforced") && out.stderr.contains("not enforced"),
            "the relaxed limit must be announced: {out}"
        );
        return;
    }
    let out = confined(&strict, &name, &["fill", big.to_str().unwrap(), "64"]);
    assert_eq!(out.code, 0, "mcpbox reports the server's own exit: {out}");
    let (ok, detail) = out.result("fill");
    assert!(!ok, "64 MiB fitted in a 16M disk: {out}");
    one_of(detail.split_whitespace().next().unwrap(), &["ENOSPC", "EDQUOT"], "writing past the disk limit", &out);
    let mib: u64 = detail.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!((4..=16).contains(&mib), "the disk held {mib} MiB: {out}");
    // Nothing reached the host's own filesystem: the image stays its size, and the host's data
    // dir holds no file.
    assert!(!big.exists(), "the write landed in the host's data dir");
    let image = s.state.join(&name).join("data.img");
    let meta = std::fs::metadata(&image).unwrap();
    assert_eq!(
        (meta.len(), meta.uid(), meta.mode() & 0o777),
        (16 << 20, 0, 0o600),
        "the image: its size, root's, private"
    );
    assert!(meta.blocks() * 512 <= 17 << 20, "the image grew past its size on the host");

    // mcpbox goes on: the next start of the same server works, on the same full disk.
    let out = confined(&strict, &name, &["read", big.to_str().unwrap()]);
    assert!(out.result("read").0, "{out}");
    let small = data.join("small");
    let out = confined(&strict, &name, &["fill", small.to_str().unwrap(), "1"]);
    one_of(&out.denied("fill"), &["ENOSPC", "EDQUOT"], "the disk is still full", &out);

    // Two sandboxes of one server at once share one filesystem (one loop device): a file
    // written by one while the other holds the disk mounted is there for a third.
    let marker = unique("disk-pause");
    let (paused, _) = start_paused(mcpbox_cmd(&strict, &name, &[], &s.probe, &["pause", &marker]));
    let out = confined(&strict, &name, &["fill", big.to_str().unwrap(), "2"]);
    assert!(out.result("fill").0, "after truncating the big file there is room: {out}");
    drop(paused);
    let out = confined(&strict, &name, &["read", big.to_str().unwrap()]);
    assert!(out.result("read").1.contains("bytes: xxxx"), "{out}");
    // The file is the server's (its host uid) on the image, and the image is not mounted on the
    // host once no sandbox runs.
    assert_eq!(image_file_owner(&image, "big"), Some(allocated_uid(&name)));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(data.to_str().unwrap()), "the data image stayed mounted on the host");
}

/// `[limits] cpu`: as root the sandbox's cgroup holds the quota (read back from the host, via
/// the probe's own cgroup), and two processes spinning for 2 s get no more than the quota's
/// CPU time (with a generous margin; a loaded machine can only give them less). Rootless there
/// is no cgroup: refused unless relaxed, then announced.
#[test]
fn cpu_limit_holds_the_server_to_its_quota() {
    let s = shared();
    let strict = probe_policy("cpu-strict", "", "[limits]\ncpu = \"0.5\"\n[sandbox]\nrelax = [\"disk\"]\n");
    let relaxed = probe_policy("cpu-relaxed", "", "[limits]\ncpu = \"0.5\"\n[sandbox]\nrelax = [\"cpu\", \"disk\"]\n");
    let name = unique("cpu");
    if !is_root() {
        let out = confined(&strict, &name, &["uid"]);
        assert_eq!(out.code, 125, "{out}");
        assert!(out.try_result("uid").is_none(), "the server must not have run: {out}");
        assert!(
            out.stderr.contains("[limits] cpu = \"0.5\" cannot be enforced")
                && out.stderr.contains("relax = [\"cpu\"]"),
            "{out}"
        );
        let out = confined(&relaxed, &name, &["uid"]);
        assert!(out.result("uid").0, "{out}");
        assert!(
            out.stderr.contains("cannot be enforced") && out.stderr.contains("not enforced"),
            "the relaxed limit must be announced: {out}"
        );
        return;
    }
    let marker = unique("cpu-pause");
    let (paused, _) = start_paused(mcpbox_cmd(&strict, &name, &[], &s.probe, &["pause", &marker]));
    let pid = *pids_with_marker(&marker).first().expect("the paused probe");
    let quota = if let Some(mnt) = cgroup_mount("cpu") {
        let dir = mnt.join(cgroup_of(pid, "cpu").unwrap().trim_start_matches('/'));
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap().trim().to_string();
        format!("{} {}", read("cpu.cfs_quota_us"), read("cpu.cfs_period_us"))
    } else {
        let mnt = cgroup_mount("").expect("a cgroup hierarchy");
        let dir = mnt.join(cgroup_of(pid, "").unwrap().trim_start_matches('/'));
        std::fs::read_to_string(dir.join("cpu.max")).unwrap().trim().to_string()
    };
    assert_eq!(quota, "50000 100000", "the sandbox's CPU quota");
    drop(paused);

    let out = confined(&strict, &name, &["spin", "2", "2"]);
    let detail = out.result("spin").1;
    let permille: u64 = detail.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(permille <= 650, "two spinning processes got {permille}/1000 of a core under a 0.5 core limit: {out}");
    assert!(!out.stderr.contains("cannot be enforced"), "no CPU warning as root: {out}");
}

/// Swap `dir` (a directory holding `f` = GRANTED-CONTENT) with `link` (a symlink to a canary
/// directory) in a tight loop while `mcpbox run` starts `starts` times, each reading `dir/f`.
/// Every start must read the real file or fail; none may show the canary. Returns (reads,
/// failures' last stderr lines, swaps).
fn swap_race(
    pol: &std::path::Path,
    name: &str,
    dir: &std::path::Path,
    link: &std::path::Path,
    starts: usize,
) -> (usize, Vec<String>, u64) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let swapper = {
        let (stop, dir, link) = (stop.clone(), dir.to_path_buf(), link.to_path_buf());
        let aside = dir.with_extension("aside");
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Each rename is atomic: `dir` is the directory, missing, or the symlink.
                std::fs::rename(&dir, &aside).unwrap();
                std::fs::rename(&link, &dir).unwrap();
                std::thread::sleep(Duration::from_micros(200));
                std::fs::rename(&dir, &link).unwrap();
                std::fs::rename(&aside, &dir).unwrap();
                std::thread::sleep(Duration::from_micros(200));
                swaps += 1;
            }
            swaps
        })
    };
    let (mut read, mut failed) = (0, Vec::new());
    for _ in 0..starts {
        let out = confined(pol, name, &["read", dir.join("f").to_str().unwrap()]);
        if out.all().contains(CANARY) {
            stop.store(true, Ordering::Relaxed);
            panic!("the canary was read through a swapped-in symlink:\n{out}");
        }
        match out.try_result("read") {
            Some((true, d)) if d.contains("GRANTED-CONTENT") => read += 1,
            _ => failed.push(out.stderr.lines().last().unwrap_or("").to_string()),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    assert!(swaps > starts as u64, "the swapper barely ran ({swaps} swaps)");
    assert!(read > 0, "no start read the real directory (failures: {failed:?})");
    (read, failed, swaps)
}

/// A directory with `f` = GRANTED-CONTENT, a canary directory with `f` = the canary, and a
/// symlink `link` to the canary directory beside `dir`.
fn swap_setup(parent: &std::path::Path, canary_dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let (dir, link) = (parent.join("granted"), parent.join("link"));
    mkdir_755(&dir);
    mkdir_755(canary_dir);
    for (f, text) in [(dir.join("f"), "GRANTED-CONTENT\n".to_string()), (canary_dir.join("f"), format!("{CANARY}\n"))] {
        std::fs::write(&f, text).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    // Relative: it leads to the canary from wherever the tree is seen (an absolute one would
    // miss it in a view where the host tree sits below another root).
    std::os::unix::fs::symlink(std::path::Path::new("..").join(canary_dir.file_name().unwrap()), &link).unwrap();
    (dir, link)
}

/// Grants are opened once without following symlinks and mounted from that handle, and
/// planning never follows a symlink the server could have planted: while a thread keeps
/// swapping a granted directory for a symlink to a canary directory, 50 starts each read the
/// real directory or fail; none ever shows the canary.
///
/// Both modes: the directory lies in a tree the policy makes writable (a read grant inside it).
/// As root, also: the swapped directory is itself a grant, separately mounted, in a directory
/// owned by the server's host uid: the race between planning and mounting is the mount's.
#[test]
fn a_granted_dir_swapped_for_a_symlink_never_shows_the_canary() {
    let base = tempdir();
    let w = base.path().join("w");
    mkdir_755(&w);
    let (dir, link) = swap_setup(&w, &base.path().join("canary"));
    let pol = probe_policy("swap", &format!("write = [\"{}\"]\nread = [\"{}\"]", w.display(), dir.display()), "");
    let name = unique("swap");
    let (read, failed, swaps) = swap_race(&pol, &name, &dir, &link, 50);
    eprintln!(
        "swap (inside a writable grant): {read} starts read the granted dir, {} failed, {swaps} swaps",
        failed.len()
    );

    // With the symlink in place for good, planning refuses to follow it.
    std::fs::rename(&dir, w.join("aside")).unwrap();
    std::fs::rename(&link, &dir).unwrap();
    let out = confined(&pol, &name, &["read", dir.join("f").to_str().unwrap()]);
    assert_eq!(out.code, 125, "{out}");
    assert!(out.stderr.contains("refusing to follow the symlink") && !out.all().contains(CANARY), "{out}");

    if !is_root() {
        return;
    }
    // The grant itself swapped, in a directory of the server's own uid.
    let owned = base.path().join("owned");
    mkdir_755(&owned);
    let (dir, link) = swap_setup(&owned, &base.path().join("canary2"));
    let pol = probe_policy("swap-own", &format!("read = [\"{}\"]", dir.display()), "");
    let name = unique("swap-own");
    assert!(confined(&pol, &name, &["uid"]).result("uid").0);
    let uid = allocated_uid(&name);
    nix::unistd::chown(&owned, Some(nix::unistd::Uid::from_raw(uid)), Some(nix::unistd::Gid::from_raw(uid))).unwrap();
    let (read, failed, swaps) = swap_race(&pol, &name, &dir, &link, 50);
    let at_mount = failed.iter().filter(|f| f.contains("no symlinks")).count();
    let at_plan = failed.iter().filter(|f| f.contains("refusing to follow")).count();
    let other: Vec<&String> =
        failed.iter().filter(|f| !f.contains("no symlinks") && !f.contains("refusing to follow")).collect();
    eprintln!("swap (a grant of its own): {read} read, {} failed ({at_plan} when planning, {at_mount} at the mount), {swaps} swaps; other failures: {other:?}", failed.len());
}

/// A grant that leads to `/` (through a symlink the policy loader cannot see) is refused when
/// the sandbox is planned; written as `/` (or another spelling of it) it is refused by
/// `policy check` as by a start.
#[test]
fn grants_over_proc_dev_tmp_are_refused_at_check_and_launch() {
    let base = tempdir();
    let link = base.path().join("root-link");
    std::os::unix::fs::symlink("/", &link).unwrap();
    let pol = probe_policy("root-link", &format!("read = [\"{}\"]", link.display()), "");
    let out = confined(&pol, &unique("rootlink"), &["read", "/proc/1/environ"]);
    assert_eq!(out.code, 125, "{out}");
    assert!(out.try_result("read").is_none(), "{out}");
    assert!(
        out.stderr.contains(&format!("{} (which is /): / cannot be granted", link.display()))
            && out.stderr.contains("it contains /proc"),
        "{out}"
    );
    for spelled in ["/", "//", "/./", "/dev", "/proc/self"] {
        let pol = probe_policy("root", &format!("read = [\"{spelled}\"]"), "");
        let out = run_timeout(
            {
                let mut c = Command::new(mcpbox());
                c.args(["policy", "check"]).arg(&pol);
                c
            },
            Duration::from_secs(30),
        );
        assert_ne!(out.code, 0, "{spelled}: {out}");
        assert!(out.stderr.contains("cannot be granted"), "{spelled}: {out}");
        let out = confined(&pol, &unique("root"), &["read", "/proc/1/environ"]);
        assert_eq!(out.code, 125, "{spelled}: {out}");
        assert!(out.stderr.contains("cannot be granted") && out.try_result("read").is_none(), "{spelled}: {out}");
    }
}

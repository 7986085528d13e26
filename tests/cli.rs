//! The command line: policy check, the shipped runtime policies, exit codes and signals.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

fn run_policy(policy: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(mcpbox());
    cmd.args(["run", "--policy", policy, "--state-dir"])
        .arg(&shared().state)
        .args(["--name", &unique("cli"), "--"])
        .args(args);
    test_env(&mut cmd);
    run_timeout(cmd, Duration::from_secs(60))
}

#[test]
fn policy_check_prints_the_effective_policy() {
    let mut cmd = Command::new(mcpbox());
    cmd.args(["policy", "check", concat!(env!("CARGO_MANIFEST_DIR"), "/policies/node.toml")]);
    let out = run_timeout(cmd, Duration::from_secs(30));
    assert_eq!(out.code, 0, "{out}");
    // `extends` resolved: the loader cache from default.toml, node itself from node.toml.
    for want in ["[filesystem]", "/etc/ld.so.cache", "/usr/bin/node", "[limits]"] {
        assert!(out.stdout.contains(want), "missing `{want}`:\n{out}");
    }
}

#[test]
fn policy_check_rejects_unknown_keys_with_file_and_line() {
    let d = tempdir();
    let p = write_policy(d.path(), "bad", "extends = \"default\"\n\n[filesystem]\nread = []\nreed = [\"/etc\"]\n");
    let mut cmd = Command::new(mcpbox());
    cmd.args(["policy", "check"]).arg(&p);
    let out = run_timeout(cmd, Duration::from_secs(30));
    assert_eq!(out.code, 1, "{out}");
    assert!(out.stderr.contains("reed"), "{out}");
    assert!(out.stderr.contains(&format!("{} line 5", p.display())), "file and line expected:\n{out}");
}

#[test]
fn node_runs_under_the_node_policy() {
    let out = run_policy("node", &["node", "-e", "console.log(1)"]);
    assert_eq!((out.code, out.stdout.as_str()), (0, "1\n"), "{out}");
}

#[test]
fn python_runs_under_the_python_policy() {
    let out = run_policy("python", &["python3", "-c", "print(2)"]);
    assert_eq!((out.code, out.stdout.as_str()), (0, "2\n"), "{out}");
}

#[test]
fn exit_codes_pass_through() {
    let d = tempdir();
    let p =
        write_policy(d.path(), "sh", "extends = \"default\"\n[filesystem]\nexec = [\"/usr/bin/dash\", \"/bin/sh\"]\n");
    let out = run_policy(p.to_str().unwrap(), &["/bin/sh", "-c", "exit 7"]);
    assert_eq!(out.code, 7, "{out}");
    // Death by a signal: 128+N, as a shell reports it.
    let pol = probe_policy("selfkill", "", "");
    let out = run_policy(pol.to_str().unwrap(), &[shared().probe.to_str().unwrap(), "selfkill", "15"]);
    assert_eq!(out.code, 128 + 15, "{out}");
}

#[test]
fn signals_are_forwarded() {
    let s = shared();
    let pol = probe_policy("sigterm", "", "");
    let cmd = mcpbox_cmd(&pol, &unique("sigterm"), &[], &s.probe, &["sigterm"]);
    signals_reach_the_server(cmd, 3);
}

/// `policy learn` passes the same signals on as `run` (it had left SIGUSR1 and SIGUSR2 out,
/// whose default action ended mcpbox, and the sandbox with it).
#[test]
fn signals_are_forwarded_while_learning() {
    let s = shared();
    let pol = probe_policy("sigterm-learn", "", "");
    let out = tempdir();
    let mut cmd = Command::new(mcpbox());
    cmd.args(["policy", "learn", "--policy"]).arg(&pol).arg("--state-dir").arg(&s.state);
    cmd.args(["--name", &unique("sigterm-learn"), "--out"]).arg(out.path().join("learned.toml"));
    cmd.arg("--").arg(&s.probe).arg("sigterm");
    test_env(&mut cmd);
    // learn ends with its own code (0: the policy is written), not the server's.
    signals_reach_the_server(cmd, 0);
}

/// The learned policy replaces whatever its path was: a symlink planted there (in a shared
/// directory, by another user) is not written through.
#[test]
fn a_learned_policy_replaces_a_symlink_at_its_path() {
    let s = shared();
    let pol = probe_policy("learn-out", "", "");
    let d = tempdir();
    let victim = d.path().join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    let out = d.path().join("learned.toml");
    std::os::unix::fs::symlink(&victim, &out).unwrap();
    let mut cmd = Command::new(mcpbox());
    cmd.args(["policy", "learn", "--policy"]).arg(&pol).arg("--state-dir").arg(&s.state);
    cmd.args(["--name", &unique("learn-out"), "--out"]).arg(&out);
    cmd.arg("--").arg(&s.probe).arg("uid");
    test_env(&mut cmd);
    let o = run_timeout(cmd, Duration::from_secs(120));
    assert_eq!(o.code, 0, "{o}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n", "the learned policy went through the symlink");
    let meta = std::fs::symlink_metadata(&out).unwrap();
    assert!(meta.file_type().is_file(), "{meta:?}");
    assert!(std::fs::read_to_string(&out).unwrap().contains("extends = "), "{o}");
}

/// SIGUSR1, SIGUSR2 and SIGHUP sent to mcpbox reach the server, which says so; SIGTERM ends it
/// (the server exits 3), and mcpbox with `code`.
fn signals_reach_the_server(mut cmd: Command, code: i32) {
    use nix::sys::signal::{kill, Signal};
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("RESULT sigterm ok"), "{line:?}");
    for sig in [Signal::SIGUSR1, Signal::SIGUSR2, Signal::SIGHUP] {
        kill(pid, sig).unwrap();
        let mut got = String::new();
        out.read_line(&mut got).unwrap();
        assert_eq!(got.trim(), format!("GOT {}", sig.as_str()), "after {sig} to mcpbox");
    }
    kill(pid, Signal::SIGTERM).unwrap();
    let status = wait_timeout(&mut child, Duration::from_secs(10)).expect("mcpbox did not exit after SIGTERM");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(rest.contains("GOT SIGTERM"), "the server did not see SIGTERM: {rest:?}");
    assert_eq!(status.code(), Some(code), "mcpbox's exit code after SIGTERM");
}

#[test]
fn a_command_the_policy_does_not_allow_is_refused() {
    let name = unique("cli");
    let mut cmd = Command::new(mcpbox());
    cmd.args(["run", "--policy", "default", "--state-dir"])
        .arg(&shared().state)
        .args(["--name", &name, "--", "/bin/ls", "/"]);
    test_env(&mut cmd);
    let out = run_timeout(cmd, Duration::from_secs(60));
    assert_eq!(out.code, 125, "{out}");
    assert!(out.stdout.is_empty(), "{out}");
    assert!(out.stderr.contains("default") && out.stderr.contains("[filesystem] exec"), "{out}");
    // Refused by the check that comes before anything is made for the server: sandbox-init,
    // started before planning, gets no spec and exits without a word (the refusal is the only
    // line), and the server got no state dir, no uid and no sandbox.
    assert_eq!(out.stderr.trim().lines().count(), 1, "{out}");
    assert!(!shared().state.join(&name).exists(), "a state dir was made for a refused server");
    let uids = std::fs::read_to_string(shared().state.join("uids")).unwrap_or_default();
    assert!(!uids.lines().any(|l| l.split_whitespace().next() == Some(name.as_str())), "{uids}");
}

/// `--state-dir` relative to the working directory, or through a symlink, names the directory
/// it names (the sandbox opens the server's directories without following symlinks: it had
/// refused both).
#[test]
fn a_relative_or_symlinked_state_dir_is_the_directory_it_names() {
    let d = tempdir();
    std::fs::create_dir(d.path().join("real")).unwrap();
    std::os::unix::fs::symlink(d.path().join("real"), d.path().join("link")).unwrap();
    for dir in ["rel", "link"] {
        let name = unique("statedir");
        let mut cmd = Command::new(mcpbox());
        cmd.current_dir(d.path()).args(["run", "--policy", "default", "--state-dir", dir, "--name", &name]);
        cmd.args(["--", "/bin/true"]);
        test_env(&mut cmd);
        let out = run_timeout(cmd, Duration::from_secs(60));
        assert_eq!(out.code, 0, "--state-dir {dir}: {out}");
        let root = if dir == "link" { d.path().join("real") } else { d.path().join(dir) };
        assert!(root.join(&name).join("data").is_dir(), "--state-dir {dir}: no data dir under {}", root.display());
    }
}

/// An npx/uvx server whose runtime the policy cannot execute is refused before its package is
/// prepared: an install runs the package's own scripts (and reaches the registry), which a
/// server that can never start must not get to do. `serve --check` refuses it the same way.
#[test]
fn a_package_whose_runtime_the_policy_cannot_execute_is_refused_before_it_is_prepared() {
    let d = tempdir();
    let state = d.path().join("state");
    // `default` grants no node; the package name is never looked up.
    let pkg = "@mcpbox-test/never-prepared";
    let mut cmd = Command::new(mcpbox());
    cmd.args(["run", "--policy", "default", "--state-dir"]).arg(&state);
    cmd.args(["--name", "never", "--", "npx", "-y", pkg]);
    test_env(&mut cmd);
    let out = run_timeout(cmd, Duration::from_secs(60));
    assert_eq!(out.code, 125, "{out}");
    assert!(out.stderr.contains("does not allow executing") && out.stderr.contains("which runs the package"), "{out}");
    assert!(!out.stderr.contains("prepar"), "{out}");
    assert!(!state.join("never").exists(), "something was made (or prepared) for the refused server");

    let config = d.path().join("mcpbox.json");
    let body = serde_json::json!({"mcpProxy": {"addr": "127.0.0.1:0"},
        "mcpServers": {"never": {"command": "npx", "args": ["-y", pkg], "policy": "default"}}});
    std::fs::write(&config, body.to_string()).unwrap();
    let mut cmd = Command::new(mcpbox());
    cmd.args(["serve", "--check", "--config"]).arg(&config).arg("--state-dir").arg(&state);
    test_env(&mut cmd);
    let out = run_timeout(cmd, Duration::from_secs(60));
    assert_eq!(out.code, 2, "{out}");
    assert!(out.stderr.contains("does not allow executing") && out.stderr.contains("server never"), "{out}");
    assert!(!state.join("never").exists(), "serve --check made something for the refused server");
}

/// `run` writes the denial records a burst held back while the server still runs, as `serve`
/// does: what `policy suggest` reads is at most seconds behind, even if mcpbox is then killed.
#[test]
fn run_writes_held_back_denials_while_the_server_runs() {
    let d = tempdir();
    let state = d.path().join("state");
    // Syscalls `default`'s filter refuses, each once, in one burst; then the server waits.
    let script = "import ctypes, time\nlibc = ctypes.CDLL(None, use_errno=True)\n\
        for nr in (153, 156, 159, 163, 164, 167, 168, 169, 172, 173, 175, 176, 179, 246, 248, 249, 250, 298, 313, 321):\n    libc.syscall(nr, 0, 0, 0, 0)\n\
        print('done', flush=True)\ntime.sleep(30)\n";
    let mut cmd = Command::new(mcpbox());
    cmd.args(["run", "--policy", "python", "--state-dir"]).arg(&state).args(["--name", "burst", "--"]);
    cmd.args(["/usr/bin/python3", "-c", script]);
    test_env(&mut cmd);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "done");
    let file = state.join("burst").join("denials.json");
    let recorded = || -> usize {
        let v: serde_json::Value =
            std::fs::read_to_string(&file).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
        v["denials"].as_array().map_or(0, |a| a.iter().filter(|d| d["layer"] == "seccomp").count())
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while recorded() < 20 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(recorded(), 20, "{}", std::fs::read_to_string(&file).unwrap_or_default());
}

/// A first start ended by a signal while its package downloads (a client giving up on a slow
/// install, a Ctrl-C) leaves no registry credentials on disk: the file the download step
/// reads them from goes with mcpbox, which still ends by that signal.
#[test]
fn an_interrupted_prepare_leaves_no_credentials_behind() {
    use nix::sys::signal::{kill, Signal};
    use std::os::unix::process::ExitStatusExt;
    let d = tempdir();
    let state = d.path().join("state");
    let npmrc = d.path().join("npmrc");
    // A credential for a registry the install never asks: npm sends it nowhere, mcpbox still
    // hands it to the download step.
    std::fs::write(&npmrc, "//auth.example.test/:_authToken=mcpbox-test-secret\n").unwrap();
    let mut cmd = Command::new(mcpbox());
    cmd.args(["run", "--state-dir"]).arg(&state).args(["--name", "creds", "--"]);
    cmd.args(["npx", "-y", "@modelcontextprotocol/server-sequential-thinking"]);
    test_env(&mut cmd);
    cmd.env("NPM_CONFIG_USERCONFIG", &npmrc);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let auth = state.join("creds").join("prepare-auth.npmrc");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !auth.exists() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("mcpbox ended ({st:?}) before the download step held the credentials");
        }
        assert!(std::time::Instant::now() < deadline, "no credentials file in 120 s");
        std::thread::sleep(Duration::from_millis(2));
    }
    kill(nix::unistd::Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    let status = wait_timeout(&mut child, Duration::from_secs(30)).expect("mcpbox did not end after SIGINT");
    assert_eq!(status.signal(), Some(libc::SIGINT), "{status:?}");
    assert!(!auth.exists(), "the registry credentials outlived the interrupted prepare");
}

/// The drop-in use for local MCP clients: `mcpbox run -- npx -y PKG`, no policy named. The
/// package is prepared in its own sandbox on first use, then the real server from npm answers
/// `initialize` over stdin/stdout under the policy mcpbox ships for that package, named after its
/// package (not `npx`, which every such server would share).
#[test]
fn npx_server_runs_over_stdio_without_a_policy() {
    let d = tempdir();
    let state = d.path().join("state");
    let (v, err) =
        initialize_over_run(&state, None, &["npx", "-y", "@modelcontextprotocol/server-sequential-thinking"]);
    assert_eq!(v["result"]["serverInfo"]["name"], "sequential-thinking-server", "{v}");
    assert!(
        err.contains("shipped policy `server-sequential-thinking`"),
        "the log names the package's shipped policy:\n{err}"
    );
    assert!(
        state.join("server-sequential-thinking/cache/prepared.json").is_file(),
        "prepared under the package's name:\n{err}"
    );
}

/// Policies that a launch refuses, and one it takes: `policy check`, `serve --check` and
/// `run` must all say the same.
const REFUSED: &[(&str, &str, &str)] = &[
    (
        "wildtld",
        "[network]\nmode = \"proxy\"\nallow = [\"*.com:443\"]\n",
        "a wildcard over a whole top-level domain is too broad",
    ),
    (
        "nosuchcall",
        "extends = \"default\"\n[seccomp]\nextra_deny = [\"no_such_call\"]\n",
        "`no_such_call` is not an x86_64 syscall",
    ),
    ("hardallow", "extends = \"default\"\n[seccomp]\nextra_allow = [\"bpf\"]\n", "syscall `bpf` can never be allowed"),
];

fn policy_check(p: &std::path::Path) -> Output {
    let mut cmd = Command::new(mcpbox());
    cmd.args(["policy", "check"]).arg(p);
    run_timeout(cmd, Duration::from_secs(30))
}

/// `serve --check` of a config with one server, `s`, under policy file `p`.
fn serve_check(dir: &std::path::Path, p: &std::path::Path) -> Output {
    let cfg = dir.join(format!("{}.json", p.file_stem().unwrap().to_string_lossy()));
    let body = serde_json::json!({"mcpProxy": {"addr": "127.0.0.1:0"}, "mcpServers": {"s": {"command": "/bin/true", "policy": p}}});
    std::fs::write(&cfg, body.to_string()).unwrap();
    let mut cmd = Command::new(mcpbox());
    cmd.args(["serve", "--check", "--config"]).arg(&cfg).arg("--state-dir").arg(dir.join("state"));
    run_timeout(cmd, Duration::from_secs(30))
}

#[test]
fn policy_check_serve_check_and_run_refuse_what_a_launch_refuses() {
    let d = tempdir();
    for (name, body, why) in REFUSED {
        let p = write_policy(d.path(), name, body);
        let out = policy_check(&p);
        assert_eq!(out.code, 1, "policy check {name}:\n{out}");
        assert!(
            out.stderr.contains(why) && out.stderr.contains(&p.display().to_string()),
            "policy check {name}:\n{out}"
        );
        let out = serve_check(d.path(), &p);
        assert_eq!(out.code, 2, "serve --check {name}:\n{out}");
        assert!(out.stderr.contains(why) && out.stderr.contains("server s"), "serve --check {name}:\n{out}");
        let out = run_policy(&p.to_string_lossy(), &["/bin/true"]);
        assert_eq!(out.code, 125, "run {name}:\n{out}");
        assert!(out.stderr.contains(why), "run {name}:\n{out}");
    }
    // An IPv6 literal is an entry the egress proxy takes: so does every check.
    // (It extends `default`, which lets the server's /bin/true run: a policy that does not is
    // refused by `serve --check` too.)
    let p =
        write_policy(d.path(), "v6", "extends = \"default\"\n[network]\nmode = \"proxy\"\nallow = [\"[::1]:8080\"]\n");
    let out = policy_check(&p);
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.contains("allow = [\"[::1]:8080\"]"), "{out}");
    let out = serve_check(d.path(), &p);
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.contains("ok; listen"), "{out}");
}

#[test]
fn readyz_reports_a_server_whose_policy_a_launch_would_refuse() {
    let d = tempdir();
    let bad = write_policy(d.path(), "wild", REFUSED[0].1);
    let port = crate::serve_support::free_port();
    let cfg = d.path().join("mcpbox.json");
    let body = serde_json::json!({
        "mcpProxy": {"addr": format!("127.0.0.1:{port}")},
        "mcpServers": {
            "wild": {"command": "/bin/true", "policy": bad, "isolation": "shared"},
            "fine": {"command": "/bin/true", "policy": "default", "isolation": "shared"},
        },
    });
    std::fs::write(&cfg, body.to_string()).unwrap();
    let mut cmd = Command::new(mcpbox());
    cmd.args(["serve", "--grace", "1", "--config"]).arg(&cfg).arg("--state-dir").arg(d.path().join("state"));
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let listening = eventually(Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    let ready = listening.then(|| http(port, "GET", "/readyz", &[], ""));
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(listening, "mcpbox serve did not listen:\n{log}");
    let (status, _, body) = ready.unwrap();
    assert_eq!((status, body.as_str()), (503, "not ready: wild\n"), "{log}");
}

#[test]
fn run_serves_the_egress_proxy_of_a_proxy_mode_policy() {
    use crate::realservers::support::site;
    use std::sync::atomic::Ordering;
    let allowed = site("RUN-PROXY-CANARY-ALLOWED");
    let denied = site("RUN-PROXY-CANARY-DENIED");
    let d = tempdir();
    let body = format!("extends = \"python\"\n[network]\nmode = \"proxy\"\nallow = [\"127.0.0.1:{}\"]\n", allowed.port);
    let p = write_policy(d.path(), "proxied", &body);
    // urllib takes http_proxy from the environment the policy sets; the direct way out does
    // not exist (own network namespace, loopback only).
    let script = r#"
import sys, urllib.request
for port in sys.argv[1:]:
    try:
        print(urllib.request.urlopen(f'http://127.0.0.1:{port}/', timeout=10).read().decode())
    except Exception as e:
        print('REFUSED', port, type(e).__name__)
"#;
    let out = run_policy(
        p.to_str().unwrap(),
        &["python3", "-c", script, &allowed.port.to_string(), &denied.port.to_string()],
    );
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.contains("RUN-PROXY-CANARY-ALLOWED"), "the allowed site through the proxy:\n{out}");
    assert!(
        out.stdout.contains(&format!("REFUSED {}", denied.port)) && !out.stdout.contains("RUN-PROXY-CANARY-DENIED"),
        "{out}"
    );
    assert_eq!(denied.hits.load(Ordering::SeqCst), 0, "the unlisted site was contacted");
    assert!(out.stderr.contains("egress denied"), "the proxy logs the refusal:\n{out}");
}

#[test]
fn a_policy_that_would_fail_at_launch_is_refused_before_anything_is_prepared() {
    let d = tempdir();
    let state = d.path().join("state");
    for (name, body, says) in [
        ("badsys", "extends = \"node\"\n[seccomp]\nextra_deny = [\"not_a_syscall\"]\n", "not_a_syscall"),
        ("badallow", "extends = \"node\"\n[network]\nmode = \"proxy\"\nallow = [\"*.com:443\"]\n", "*.com"),
    ] {
        let p = write_policy(d.path(), name, body);
        let mut cmd = Command::new(mcpbox());
        cmd.args(["run", "--policy"]).arg(&p).arg("--state-dir").arg(&state);
        cmd.args(["--name", name, "--", "npx", "-y", "@modelcontextprotocol/server-memory"]);
        test_env(&mut cmd);
        let out = run_timeout(cmd, Duration::from_secs(60));
        assert_eq!(out.code, 125, "{out}");
        assert!(out.stderr.contains(says), "the refusal names its reason:\n{out}");
        let cache = state.join(name).join("cache");
        let prepared: Vec<_> =
            std::fs::read_dir(&cache).map(|r| r.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
        assert!(prepared.is_empty(), "nothing may be prepared for a refused server: {prepared:?}");
    }
}

#[test]
fn serve_check_refuses_what_a_launch_would_refuse() {
    let d = tempdir();
    let state = d.path().join("state");
    for (policy, says) in [
        (serde_json::json!({"extends": "python", "seccomp": {"extra_deny": ["not_a_syscall"]}}), "not_a_syscall"),
        (serde_json::json!({"extends": "python", "network": {"mode": "proxy", "allow": ["*.com:443"]}}), "*.com"),
        (serde_json::json!({"extends": "no-such-policy"}), "no-such-policy"),
    ] {
        let cfg =
            serde_json::json!({"mcpServers": {"s": {"command": "python3", "args": ["-c", "0"], "policy": policy}}});
        let path = d.path().join("mcpbox.json");
        std::fs::write(&path, cfg.to_string()).unwrap();
        let mut cmd = Command::new(mcpbox());
        cmd.args(["serve", "--check", "--config"]).arg(&path).arg("--state-dir").arg(&state);
        let out = run_timeout(cmd, Duration::from_secs(30));
        assert_eq!(out.code, 2, "{out}");
        assert!(out.stderr.contains("server s") && out.stderr.contains(says), "{out}");
    }
    assert!(!state.exists(), "--check creates nothing");
    // The same config with a policy a launch accepts passes.
    let cfg = serde_json::json!({"mcpServers": {"s": {"command": "python3", "args": ["-c", "0"], "policy": {"extends": "python"}}}});
    let path = d.path().join("mcpbox.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    let mut cmd = Command::new(mcpbox());
    cmd.args(["serve", "--check", "--config"]).arg(&path).arg("--state-dir").arg(&state);
    let out = run_timeout(cmd, Duration::from_secs(30));
    assert_eq!(out.code, 0, "{out}");
}

/// The README's own example, as written: `mcpbox run -- npx -y @modelcontextprotocol/server-memory`
/// gets the shipped server-memory policy without `--policy`, so its main tool can write its graph
/// (into the server's data dir; under the bare node base it failed with EROFS).
#[test]
fn the_readme_memory_example_works_without_a_policy() {
    let d = tempdir();
    let state = d.path().join("state");
    let mut cmd = Command::new(mcpbox());
    cmd.args(["run", "--state-dir"]).arg(&state).args(["--", "npx", "-y", "@modelcontextprotocol/server-memory"]);
    test_env(&mut cmd);
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let msgs = [
        r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#,
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"create_entities","arguments":{"entities":[{"name":"README-CANARY","entityType":"test","observations":["works as written"]}]}}}"#,
    ];
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    {
        use std::io::Write;
        for m in msgs {
            writeln!(stdin, "{m}").unwrap();
        }
    }
    // Wait for the tool's answer before closing stdin (the server may exit on EOF first).
    let mut answer = None;
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if line.contains("\"id\":2") {
            answer = Some(line);
            break;
        }
    }
    drop(stdin);
    wait_timeout(&mut child, Duration::from_secs(120)).expect("mcpbox run did not finish");
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    let answer = answer.unwrap_or_else(|| panic!("no answer to create_entities\nstderr: {err}"));
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert!(v["result"]["isError"] != true && v.get("error").is_none(), "create_entities failed: {answer}\n{err}");
    assert!(err.contains("shipped policy `server-memory`"), "{err}");
    if is_root() {
        // As root the data dir is the server's own filesystem (`[limits] disk` of the shipped
        // policies): the graph (MEMORY_FILE_PATH, policies/server-memory.toml) is in its image.
        let image = state.join("server-memory/data.img");
        let out = Command::new("/usr/sbin/debugfs")
            .args(["-R", "cat /memory.jsonl"])
            .arg(&image)
            .output()
            .expect("running debugfs (e2fsprogs)");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("README-CANARY"),
            "the graph is in the server's data image"
        );
        return;
    }
    let data = state.join("server-memory/data");
    let written: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains("README-CANARY")))
        .collect();
    assert!(!written.is_empty(), "the graph is in the server's data dir");
}

/// `mcpbox run` with a command line as configs write it, answering `initialize` on stdio.
/// `name`: `--name`, or None for the default (the package's name).
pub(crate) fn initialize_over_run(
    state: &std::path::Path,
    name: Option<&str>,
    npx: &[&str],
) -> (serde_json::Value, String) {
    let mut cmd = Command::new(mcpbox());
    cmd.args(["run", "--state-dir"]).arg(state);
    if let Some(name) = name {
        cmd.args(["--name", name]);
    }
    cmd.arg("--").args(npx);
    test_env(&mut cmd);
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{init}").unwrap();
    }
    let status = wait_timeout(&mut child, Duration::from_secs(120)).expect("mcpbox run did not finish in 120 s");
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    let answer = out
        .lines()
        .find(|l| l.contains("\"id\":1"))
        .unwrap_or_else(|| panic!("{npx:?}: no answer to initialize\nstdout: {out}\nstderr: {err}"));
    assert!(status.success(), "{npx:?}: exit {status:?}\n{err}");
    (serde_json::from_str(answer).unwrap(), err)
}

/// An extended npx line as real configs carry it (`--yes --prefer-offline -q --package=PKG -- BIN`)
/// is prepared and run like `npx -y PKG`; then the issue's own form, `npx --offline --prefix DIR --
/// BIN`, runs the bin of that install from DIR as it is (nothing prepared, nothing fetched), and a
/// bin DIR does not have is refused rather than fetched from the registry under that name.
#[test]
fn npx_lines_as_configs_write_them_run() {
    let d = tempdir();
    let state = d.path().join("state");
    let (v, err) = initialize_over_run(
        &state,
        Some("seqthink-ext"),
        &[
            "npx",
            "--yes",
            "--prefer-offline",
            "-q",
            "--package=@modelcontextprotocol/server-sequential-thinking",
            "--",
            "mcp-server-sequential-thinking",
        ],
    );
    assert_eq!(v["result"]["serverInfo"]["name"], "sequential-thinking-server", "{v}");
    assert!(
        err.contains("shipped policy `server-sequential-thinking`"),
        "the package is recognised behind --package=:\n{err}"
    );
    // A local install: the tree prepare made, copied where a user would have installed it.
    let inst = d.path().join("inst");
    let copied =
        Command::new("cp").arg("-a").arg(prepared_tree(&state.join("seqthink-ext/cache"))).arg(&inst).status().unwrap();
    assert!(copied.success());
    let ok = Command::new("chmod").args(["-R", "a+rX"]).arg(&inst).status().unwrap();
    assert!(ok.success());
    let dir = inst.to_string_lossy().into_owned();
    let (v, err) = initialize_over_run(
        &state,
        Some("seqthink-local"),
        &["npx", "--offline", "--prefix", &dir, "--", "mcp-server-sequential-thinking"],
    );
    assert_eq!(v["result"]["serverInfo"]["name"], "sequential-thinking-server", "{v}");
    assert!(!state.join("seqthink-local/cache/prepared.json").exists(), "a --prefix install is not prepared:\n{err}");
    let mut cmd = Command::new(mcpbox());
    cmd.args(["run", "--state-dir"]).arg(&state).args([
        "--name",
        "notthere",
        "--",
        "npx",
        "--prefix",
        &dir,
        "--",
        "some-other-bin",
    ]);
    test_env(&mut cmd);
    let out = run_timeout(cmd, Duration::from_secs(60));
    assert_eq!(out.code, 125, "{out}");
    assert!(out.stderr.contains("is not installed there"), "{out}");
}

/// mcp-proxy's own example config passes `serve --check` as it is, with a warning for each key
/// that is accepted but changes nothing; `_…` keys are comments; any other unknown key stops it,
/// named.
#[test]
fn serve_check_takes_the_mcp_proxy_example_and_says_what_has_no_effect() {
    let d = tempdir();
    let state = d.path().join("state");
    let reference =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/reference/mcp-proxy-example-config.json");
    let reference = if reference.exists() {
        reference
    } else {
        std::path::PathBuf::from("/work/shared/reference/mcp-proxy-example-config.json")
    };
    let text = std::fs::read_to_string(&reference).unwrap_or_else(|e| {
        panic!("{}: {e} (the reference config ships in /work/shared/reference)", reference.display())
    });
    let check = |cfg: &serde_json::Value| {
        let path = d.path().join("config.json");
        std::fs::write(&path, cfg.to_string()).unwrap();
        let mut cmd = Command::new(mcpbox());
        cmd.args(["serve", "--check", "--config"]).arg(&path).arg("--state-dir").arg(&state);
        run_timeout(cmd, Duration::from_secs(30))
    };
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    let out = check(&cfg);
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.contains("3 server(s)"), "{out}");
    assert!(
        out.stderr.contains("warning: mcpProxy.version")
            && out.stderr.contains("warning: mcpServers.fetch.options.panicIfInvalid"),
        "{out}"
    );
    cfg["_comment"] = "top-level comment".into();
    cfg["mcpServers"]["fetch"]["_comment"] = "a server's comment".into();
    let out = check(&cfg);
    assert_eq!(out.code, 0, "{out}");
    cfg["mcpServers"]["fetch"]["comment"] = "not a comment".into();
    let out = check(&cfg);
    assert_eq!(out.code, 2, "{out}");
    assert!(out.stderr.contains("mcpServers.fetch") && out.stderr.contains("unknown field `comment`"), "{out}");
    // A package command line with an option mcpbox does not take: refused, named, with the forms.
    cfg["mcpServers"]["fetch"].as_object_mut().unwrap().remove("comment");
    cfg["mcpServers"]["github"]["args"] =
        serde_json::json!(["--workspace", "w", "-y", "@modelcontextprotocol/server-github"]);
    let out = check(&cfg);
    assert_eq!(out.code, 2, "{out}");
    assert!(
        out.stderr.contains("server github")
            && out.stderr.contains("--workspace")
            && out.stderr.contains("supported: `npx`"),
        "{out}"
    );
    assert!(!state.exists(), "--check creates nothing");
}

/// `uv --directory DIR run server.py`, as Claude Desktop configs run a local project: the
/// project's own `.venv` runs the script as it is (no uv, nothing prepared), DIR read-only.
#[test]
fn a_synced_uv_project_runs_from_its_venv() {
    let d = tempdir();
    let proj = d.path().join("proj");
    mkdir_755(&proj);
    let venv = Command::new("/usr/bin/python3")
        .args(["-m", "venv", "--without-pip"])
        .arg(proj.join(".venv"))
        .status()
        .expect("/usr/bin/python3");
    assert!(venv.success(), "python3 -m venv failed");
    let script = r#"
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("method") == "initialize":
        try:
            open(sys.argv[1] + "/WRITTEN", "w")
            wrote = "yes"
        except OSError as e:
            wrote = e.__class__.__name__
        info = {"name": "local-project", "version": sys.prefix + " " + wrote}
        print(json.dumps({"jsonrpc": "2.0", "id": m["id"], "result": {"protocolVersion": "2025-06-18", "capabilities": {}, "serverInfo": info}}), flush=True)
"#;
    std::fs::write(proj.join("server.py"), script).unwrap();
    let ok = Command::new("chmod").args(["-R", "a+rX"]).arg(&proj).status().unwrap();
    assert!(ok.success());
    let state = d.path().join("state");
    let mut cmd = Command::new(mcpbox());
    let dir = proj.to_string_lossy().into_owned();
    cmd.args(["run", "--state-dir"]).arg(&state).args([
        "--name",
        "localproj",
        "--",
        "uv",
        "--directory",
        &dir,
        "run",
        "server.py",
        &dir,
    ]);
    test_env(&mut cmd);
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, r#"{{"jsonrpc":"2.0","id":1,"method":"initialize","params":{{}}}}"#).unwrap();
    }
    let status = wait_timeout(&mut child, Duration::from_secs(60)).expect("mcpbox run did not finish");
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.success(), "exit {status:?}\n{out}\n{err}");
    let v: serde_json::Value =
        serde_json::from_str(out.lines().next().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
    let real = std::fs::canonicalize(&proj).unwrap();
    let version = v["result"]["serverInfo"]["version"].as_str().unwrap_or_default().to_string();
    assert!(version.starts_with(&format!("{}/.venv ", real.display())), "the project's venv runs it: {v}");
    assert!(
        !version.ends_with(" yes") && !proj.join("WRITTEN").exists(),
        "the project is read-only to the server: {v}"
    );
    assert!(!state.join("localproj/cache/prepared.json").exists(), "nothing is prepared");
}

/// A hostile install script (tests/fixtures/daemon-pkg) leaves a daemon in a session of its own
/// that tries to hold mcpbox's prepare output pipe open (npm's stdout and stderr, through /proc).
/// At `container` level too (no PID namespace), `mcpbox prepare` finishes, its output closes, and
/// no process of the daemon is left 1 s later: it can never wedge `prepare`, nor `serve`'s start,
/// which prepares first. (Before the container-level reaper, rootless, the daemon survived.)
#[test]
fn a_daemon_left_by_an_install_script_cannot_wedge_prepare() {
    let d = tempdir();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/daemon-pkg");
    let tgz = npm_pack(&fixture, d.path(), "daemon-pkg-1.0.0.tgz");
    let cfg = d.path().join("daemon.json");
    let body = serde_json::json!({ "mcpServers": { "daemon": { "command": "npx", "args": ["-y", tgz] } } });
    std::fs::write(&cfg, body.to_string()).unwrap();
    let marker = "mcpbox-daemon-pkg-marker";
    let daemons = || {
        let pids = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok());
        crate::sandbox::not_zombies(
            pids.filter(|p| {
                std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
            })
            .collect(),
        )
    };
    for level in ["full", "container"] {
        let mut cmd = Command::new(mcpbox());
        cmd.args(["prepare", "--config"]).arg(&cfg).arg("--state-dir").arg(d.path().join(format!("state-{level}")));
        test_env(&mut cmd);
        let cmd = if level == "container" {
            cmd.args(["--min-level", "container"]);
            crate::sandbox::under_docker_filter(cmd)
        } else {
            cmd
        };
        let (out, closed) = crate::sandbox::run_to_eof(cmd, Duration::from_secs(120), Duration::from_secs(2));
        let gone = eventually(Duration::from_secs(1), || daemons().is_empty());
        let left = daemons();
        kill_all(&left);
        assert!(closed, "{level}: a process held prepare's output open after it ended: {left:?}\n{out}");
        assert!(gone, "{level}: the install script's daemon outlived prepare: {left:?}\n{out}");
        assert_eq!(out.code, 0, "{level}: {out}");
        assert!(out.stderr.contains("prepared daemon-pkg@1.0.0"), "{level}: the package should be prepared: {out}");
        if level == "container" {
            assert!(out.stderr.contains("container"), "the prepare sandbox should be at `container` level: {out}");
        }
    }
}

/// mcpbox starts without the Rust runtime's start-up (src/main.rs) and does what the runtime
/// did for closed standard descriptors: reopens them on /dev/null before it opens anything.
/// Otherwise its own pipes and sockets would take those numbers, and the server would inherit
/// one of them, or a closed stdin.
#[test]
fn a_closed_stdin_reaches_the_server_as_dev_null() {
    let d = tempdir();
    let p =
        write_policy(d.path(), "sh", "extends = \"default\"\n[filesystem]\nexec = [\"/usr/bin/dash\", \"/bin/sh\"]\n");
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(format!(
        "exec {} run --policy {} --state-dir {} --name {} -- /bin/sh -c 'exec 3<&0 && echo stdin-open' <&-",
        mcpbox(),
        p.display(),
        shared().state.display(),
        unique("cli")
    ));
    test_env(&mut cmd);
    let out = run_timeout(cmd, Duration::from_secs(60));
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.contains("stdin-open"), "{out}");
}

/// mcpbox starts without the Rust runtime's start-up (src/main.rs) and ignores SIGPIPE itself,
/// as the runtime did: a write to a pipe nobody reads fails with EPIPE (here: the printing
/// panics with "Broken pipe") instead of killing mcpbox silently, as it would kill `serve` on a
/// write to a client that went away.
#[test]
fn a_write_to_a_closed_pipe_is_an_error_not_a_signal() {
    use std::os::unix::process::ExitStatusExt;
    let (r, w) = nix::unistd::pipe().unwrap();
    drop(r);
    let out = Command::new(mcpbox())
        .args(["policy", "check", "default"])
        .stdin(Stdio::null())
        .stdout(Stdio::from(w))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.signal(), Some(libc::SIGPIPE), "killed by SIGPIPE:\n{stderr}");
    assert!(stderr.contains("Broken pipe"), "{:?}:\n{stderr}", out.status);
}

/// `[runtime] node_flags` go on node's command line (seen by node itself: `process.execArgv`,
/// and `--lite-mode` takes WebAssembly away); `node_flags = []` in a policy that extends them
/// turns them off; a command that is not node does not get them.
#[test]
fn node_flags_reach_node_and_a_policy_turns_them_off() {
    let d = tempdir();
    let script =
        "console.log(JSON.stringify([process.execArgv.filter(a => a.startsWith(\"--\")), typeof WebAssembly]))";
    // The shipped base: compact code; the JIT and WebAssembly are kept.
    let out = run_policy("node", &["node", "-e", script]);
    assert_eq!((out.code, out.stdout.trim()), (0, r#"[["--optimize-for-size"],"object"]"#), "{out}");
    let on = write_policy(
        d.path(),
        "flags-on",
        "extends = \"node\"\n[runtime]\nnode_flags = [\"--lite-mode\", \"--max-semi-space-size=2\"]\n",
    );
    let out = run_policy(on.to_str().unwrap(), &["node", "-e", script]);
    assert_eq!(out.code, 0, "{out}");
    assert_eq!(out.stdout.trim(), r#"[["--lite-mode","--max-semi-space-size=2"],"undefined"]"#, "{out}");

    let off = write_policy(d.path(), "flags-off", "extends = \"flags-on.toml\"\n[runtime]\nnode_flags = []\n");
    let out = run_policy(off.to_str().unwrap(), &["node", "-e", script]);
    assert_eq!((out.code, out.stdout.trim()), (0, r#"[[],"object"]"#), "{out}");

    // Flags the server's own command line gives node come after the policy's.
    let out = run_policy(on.to_str().unwrap(), &["node", "--max-semi-space-size=4", "-e", script]);
    assert_eq!(
        (out.code, out.stdout.trim()),
        (0, r#"[["--lite-mode","--max-semi-space-size=2","--max-semi-space-size=4"],"undefined"]"#),
        "{out}"
    );

    // Not node: the flags are not passed (sh would refuse `--lite-mode`).
    let sh = write_policy(
        d.path(),
        "flags-sh",
        "extends = \"flags-on.toml\"\n[filesystem]\nexec = [\"/usr/bin/dash\", \"/bin/sh\"]\n",
    );
    let out = run_policy(sh.to_str().unwrap(), &["/bin/sh", "-c", "echo \"$0 $*\""]);
    assert_eq!((out.code, out.stdout.trim()), (0, "/bin/sh"), "{out}");

    // A flag that would load code is refused before anything starts.
    let bad =
        write_policy(d.path(), "flags-bad", "extends = \"node\"\n[runtime]\nnode_flags = [\"--require=/tmp/x.js\"]\n");
    let out = run_policy(bad.to_str().unwrap(), &["node", "-e", "console.log(1)"]);
    assert_eq!(out.code, 125, "{out}");
    assert!(out.stderr.contains("[runtime] node_flags: `--require=/tmp/x.js`"), "{out}");
    assert!(out.stdout.is_empty(), "{out}");
}

/// `--memory-merge`: the sandboxed program's memory is KSM-mergeable (the kernel says so in
/// `/proc/self/ksm_stat`, read by the program itself); without it, it is not.
#[test]
fn memory_merge_only_when_asked() {
    let d = tempdir();
    let p = write_policy(d.path(), "cat", "extends = \"default\"\n[filesystem]\nexec = [\"/usr/bin/cat\"]\n");
    let stat = |extra: &[&str]| {
        let mut cmd = Command::new(mcpbox());
        cmd.args(["run", "--policy"])
            .arg(&p)
            .arg("--state-dir")
            .arg(&shared().state)
            .args(["--name", &unique("ksm")])
            .args(extra)
            .args(["--", "/usr/bin/cat", "/proc/self/ksm_stat"]);
        test_env(&mut cmd);
        run_timeout(cmd, Duration::from_secs(60))
    };
    let out = stat(&["--memory-merge"]);
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.lines().any(|l| l == "ksm_merge_any: yes"), "{out}");
    let out = stat(&[]);
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.lines().any(|l| l == "ksm_merge_any: no"), "{out}");
}

/// A small package packed from scratch (no registry needed): its bin prints where it runs from,
/// then on a line of stdin (or at its end) loads `lib.js` from its tree and prints it.
fn pack_swap_pkg(dir: &std::path::Path) -> std::path::PathBuf {
    let pkg = dir.join("swap-pkg");
    std::fs::create_dir_all(&pkg).unwrap();
    let manifest =
        r#"{"name":"swap-pkg","version":"1.0.0","private":true,"bin":{"swap-pkg":"bin.js"},"license":"Apache-2.0"}"#;
    std::fs::write(pkg.join("package.json"), manifest).unwrap();
    std::fs::write(
        pkg.join("bin.js"),
        "#!/usr/bin/env node\nprocess.stdout.write('entry ' + __filename + '\\n');\n\
         const done = () => { process.stdout.write('lib ' + require('./lib.js') + '\\n'); process.exit(0); };\n\
         process.stdin.once('data', done);\nprocess.stdin.once('end', done);\n",
    )
    .unwrap();
    std::fs::write(pkg.join("lib.js"), "module.exports = 'loaded';\n").unwrap();
    npm_pack(&pkg, dir, "swap-pkg-1.0.0.tgz")
}

/// A running `mcpbox run` of a package whose server prints `entry WHERE`, then waits for a line
/// on stdin before it loads a module of its tree and prints `lib loaded`.
pub(crate) struct Held {
    child: std::process::Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    pub(crate) entry: String,
}

impl Held {
    fn start(state: &std::path::Path, tgz: &std::path::Path) -> Held {
        let mut cmd = Command::new(mcpbox());
        cmd.args(["run", "--state-dir"]).arg(state).args(["--name", "swap", "--", "npx", "-y"]).arg(tgz);
        test_env(&mut cmd);
        Held::spawn(cmd)
    }

    pub(crate) fn spawn(mut cmd: Command) -> Held {
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().expect("the server printed nothing").unwrap();
        let entry = first.strip_prefix("entry ").unwrap_or_else(|| panic!("not an entry line: {first}")).to_string();
        Held { child, lines, entry }
    }

    /// Let it load its module now: what it prints, and how it ended.
    pub(crate) fn finish(mut self) -> (String, std::process::ExitStatus) {
        use std::io::Write;
        self.child.stdin.take().unwrap().write_all(b"go\n").unwrap();
        let line = self.lines.next().map(|l| l.unwrap()).unwrap_or_default();
        let st = wait_timeout(&mut self.child, Duration::from_secs(30)).expect("the server did not end");
        (line, st)
    }
}

/// Preparing a package again (`--force`, or a failed attempt) never takes the files from under
/// a server that runs: the new install goes into a tree of its own, the record switches to it
/// only once it is complete, a server started before keeps loading from its tree, new starts
/// use the new one, and only the tree before the previous one is removed. A failed re-prepare
/// leaves the record and its tree as they were, and the half-made tree goes.
#[test]
fn preparing_again_leaves_a_running_server_its_files() {
    let d = tempdir();
    let state = d.path().join("state");
    let tgz = pack_swap_pkg(d.path());
    let cfg = d.path().join("swap.json");
    let body = serde_json::json!({ "mcpServers": { "swap": { "command": "npx", "args": ["-y", tgz] } } });
    std::fs::write(&cfg, body.to_string()).unwrap();
    let cache = state.join("swap/cache");
    let prepare = |force: bool| {
        let mut cmd = Command::new(mcpbox());
        cmd.args(["prepare", "--config"]).arg(&cfg).arg("--state-dir").arg(&state);
        if force {
            cmd.arg("--force");
        }
        test_env(&mut cmd);
        run_timeout(cmd, Duration::from_secs(180))
    };
    let entry = || {
        let rec: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(cache.join("prepared.json")).unwrap()).unwrap();
        rec["entry"].as_str().unwrap().to_string()
    };
    let trees = || {
        let mut t: Vec<String> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("npm-") && n != "npm-cache")
            .collect();
        t.sort();
        t
    };
    let run_once = || {
        let mut cmd = Command::new(mcpbox());
        cmd.args(["run", "--state-dir"]).arg(&state).args(["--name", "swap", "--", "npx", "-y"]).arg(&tgz);
        test_env(&mut cmd);
        run_timeout(cmd, Duration::from_secs(60))
    };

    let out = prepare(false);
    assert_eq!(out.code, 0, "{out}");
    let first = entry();
    assert!(first.contains("/cache/npm-1/"), "{first}");
    let held = Held::start(&state, &tgz);
    assert_eq!(held.entry, first);

    // What an install script could have left for the next install: --force removes it, while
    // the tree the server runs from stays.
    std::fs::write(cache.join("npm-cache/poison"), "x").unwrap();
    std::fs::write(cache.join(".npmrc"), "ignore-scripts=false\n").unwrap();
    let out = prepare(true);
    assert_eq!(out.code, 0, "{out}");
    assert!(!cache.join("npm-cache/poison").exists() && !cache.join(".npmrc").exists(), "--force kept the old cache");
    let second = entry();
    assert!(second.contains("/cache/npm-2/"), "{second}");
    assert!(std::path::Path::new(&first).is_file(), "the running server's entry was removed");
    let (line, st) = held.finish();
    assert_eq!(line, "lib loaded", "the running server could not load its files after the re-prepare");
    assert!(st.success(), "{st:?}");
    // A new start runs from the new tree.
    let out = run_once();
    assert_eq!(out.code, 0, "{out}");
    assert_eq!(out.stdout, format!("entry {second}\nlib loaded\n"), "{out}");

    // Once more, with a server on the second tree: the first goes, the second stays.
    let held = Held::start(&state, &tgz);
    assert_eq!(held.entry, second);
    let out = prepare(true);
    assert_eq!(out.code, 0, "{out}");
    let third = entry();
    assert!(third.contains("/cache/npm-3/"), "{third}");
    assert_eq!(trees(), ["npm-2", "npm-3"], "the previous tree and the new one, no more");
    let (line, st) = held.finish();
    assert_eq!((line.as_str(), st.success()), ("lib loaded", true));

    // A re-prepare that fails (the package no longer unpacks): the record still names the third
    // tree, which runs; what the failed attempt made is gone.
    std::fs::write(&tgz, b"not a tarball").unwrap();
    let out = prepare(true);
    assert_eq!(out.code, 1, "a broken package must fail to prepare: {out}");
    assert_eq!(entry(), third);
    assert_eq!(trees(), ["npm-2", "npm-3"], "the failed attempt left its tree");
    let out = run_once();
    assert_eq!(out.code, 0, "{out}");
    assert_eq!(out.stdout, format!("entry {third}\nlib loaded\n"), "{out}");
}

/// A policy name resolves to the same file under `serve --check`, `policy check`, `policy
/// diff` and `run` given the same config: the config's own `policies/NAME.toml` first. Without
/// `--config` only the shipped policies are names, and a `policies/` in the working directory (a
/// decoy granting more, as a cloned repository could hold) is never read. A policy there that
/// extends a name of the config's (as `policy learn --config` writes them) passes its check.
#[test]
fn a_policy_name_resolves_to_the_configs_own_file_under_serve_check_policy_check_and_run() {
    let d = tempdir();
    let cfg_dir = d.path().join("cfg");
    let work = d.path().join("work");
    mkdir_755(&cfg_dir.join("policies"));
    mkdir_755(&work.join("policies"));
    let sh = "extends = \"default\"\n[filesystem]\nexec = [\"/usr/bin/dash\", \"/bin/sh\"]\n";
    let mine =
        write_policy(&cfg_dir.join("policies"), "mine", &format!("{sh}[env]\nset = {{ WHICH = \"config-dir\" }}\n"));
    write_policy(&work.join("policies"), "mine", &format!("{sh}[env]\nset = {{ WHICH = \"working-dir\" }}\n"));
    let learned = write_policy(&cfg_dir.join("policies"), "learned", "extends = \"mine\"\n");
    let cfg = cfg_dir.join("mcpbox.json");
    let body = serde_json::json!({"mcpProxy": {"addr": "127.0.0.1:0"},
        "mcpServers": {"s": {"command": "/bin/sh", "args": ["-c", "true"], "policy": "mine"}}});
    std::fs::write(&cfg, body.to_string()).unwrap();
    let mine = mine.display().to_string();
    let cmd = |args: &[&str], config: bool| {
        let mut cmd = Command::new(mcpbox());
        cmd.current_dir(&work).args(args);
        if config {
            cmd.arg("--config").arg(&cfg);
        }
        test_env(&mut cmd);
        cmd
    };
    let mut serve = cmd(&["serve", "--check"], true);
    serve.arg("--state-dir").arg(d.path().join("state"));
    let out = run_timeout(serve, Duration::from_secs(30));
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.contains(&format!("policy of s: {mine}\n")), "serve --check:\n{out}");

    let out = run_timeout(cmd(&["policy", "check", "mine"], true), Duration::from_secs(30));
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.contains(&format!("# files read: {mine}, shipped:default.toml\n")), "policy check:\n{out}");
    assert!(out.stdout.contains("WHICH = \"config-dir\""), "{out}");
    let out = run_timeout(cmd(&["policy", "check", learned.to_str().unwrap()], true), Duration::from_secs(30));
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.contains(&format!("{}, {mine}, shipped:default.toml\n", learned.display())), "{out}");
    // `policy learn --config` writes a policy extending the server's (`mine`) and checks it
    // as `policy check --config` does (it failed its own check: `mine` was not found).
    let out_file = cfg_dir.join("policies/s.learned.toml");
    let mut learn = cmd(&["policy", "learn", "--server", "s", "--out", out_file.to_str().unwrap()], true);
    learn.arg("--state-dir").arg(&shared().state).stdin(Stdio::null());
    let out = run_timeout(learn, Duration::from_secs(60));
    assert_eq!(out.code, 0, "policy learn:\n{out}");
    let written = std::fs::read_to_string(&out_file).unwrap();
    assert!(written.contains("extends = \"mine\""), "{written}");
    let out = run_timeout(cmd(&["policy", "check", out_file.to_str().unwrap()], true), Duration::from_secs(30));
    assert!(out.code == 0 && out.stdout.contains(&format!(", {mine}, shipped:default.toml\n")), "{out}");
    let out = run_timeout(cmd(&["policy", "diff", "default", "mine"], true), Duration::from_secs(30));
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.contains("config-dir") && !out.stdout.contains("working-dir"), "policy diff:\n{out}");

    let state = shared().state.to_str().unwrap();
    let run = |config: bool| {
        let name = unique("cfgpol");
        let args = ["run", "--policy", "mine", "--state-dir", state, "--name", &name];
        let mut c = cmd(&args, config);
        c.args(["--", "/bin/sh", "-c", "echo $WHICH"]);
        run_timeout(c, Duration::from_secs(60))
    };
    let out = run(true);
    assert_eq!((out.code, out.stdout.as_str()), (0, "config-dir\n"), "run --config:\n{out}");

    // Without --config: shipped names only, whatever the working directory holds.
    let out = run(false);
    assert_eq!(out.code, 125, "run:\n{out}");
    assert!(out.stderr.contains("policy `mine` not found") && !out.stdout.contains("working-dir"), "run:\n{out}");
    let out = run_timeout(cmd(&["policy", "check", "mine"], false), Duration::from_secs(30));
    assert_eq!(out.code, 1, "{out}");
    assert!(out.stderr.contains("policy `mine` not found") && out.stderr.contains("--config FILE"), "{out}");
    let out = run_timeout(cmd(&["policy", "check", learned.to_str().unwrap()], false), Duration::from_secs(30));
    assert_eq!(out.code, 1, "{out}");
    assert!(out.stderr.contains("policy `mine` not found"), "policy check:\n{out}");
}

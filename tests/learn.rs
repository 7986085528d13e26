//! `mcpbox policy learn`: the learn sandbox attacked by the server being learned, and learned
//! policies of real servers replayed under themselves and compared with the shipped ones.
//! As root only (per-server uids, the host's /root and /opt are used): not in the unprivileged run.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::{is_root, run_timeout, test_env};
use crate::realservers::support::site;

/// A server under `mcpbox policy learn`, driven over its stdio as an MCP client would.
pub struct Learning {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    stderr: std::thread::JoinHandle<String>,
    next_id: u64,
}

impl Learning {
    pub fn start(mut cmd: Command) -> Learning {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        test_env(&mut cmd);
        let mut child = cmd.spawn().expect("spawning mcpbox policy learn");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut err, &mut s);
            s
        });
        let mut l = Learning { stdin: child.stdin.take(), child, lines, stderr, next_id: 1 };
        let init = l.request(
            "initialize",
            json!({"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "learn-test", "version": "1"}}),
        );
        assert!(init.get("result").is_some(), "initialize: {init}");
        l.notify("notifications/initialized", json!({}));
        l
    }

    pub fn notify(&mut self, method: &str, params: Value) {
        let msg = json!({"jsonrpc": "2.0", "method": method, "params": params});
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{msg}").unwrap();
        stdin.flush().unwrap();
    }

    /// Sends a request and waits (up to 120 s: a first start may prepare a package) for its answer.
    pub fn request(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{msg}").unwrap();
        stdin.flush().unwrap();
        loop {
            let line = match self.lines.recv_timeout(Duration::from_secs(120)) {
                Ok(l) => l,
                Err(e) => {
                    let _ = self.child.kill();
                    panic!("no answer to {method}: {e}");
                }
            };
            let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
            if v.get("id") == Some(&json!(id)) {
                return v;
            }
        }
    }

    pub fn call(&mut self, tool: &str, args: Value) -> Value {
        self.request("tools/call", json!({"name": tool, "arguments": args}))
    }

    /// Closes the server's stdin and waits for mcpbox to write the policy and exit.
    pub fn finish(mut self) -> (i32, String) {
        drop(self.stdin.take());
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("policy learn did not exit after its server's stdin closed");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        (status.code().unwrap_or(-1), self.stderr.join().unwrap())
    }
}

pub fn text_of(v: &Value) -> String {
    v["result"]["content"].as_array().map_or_else(
        || panic!("not a tool result: {v}"),
        |c| c.iter().filter_map(|x| x["text"].as_str()).collect::<Vec<_>>().join("\n"),
    )
}

/// `mcpbox policy check FILE` succeeds on it.
pub fn assert_checks(policy: &Path) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mcpbox"));
    cmd.args(["policy", "check"]).arg(policy);
    let out = run_timeout(cmd, Duration::from_secs(60));
    assert_eq!(out.code, 0, "policy check {}: {out}", policy.display());
}

/// A directory under the host's `path` (a place inside the learn view), removed afterwards.
struct HostDir(PathBuf);

impl HostDir {
    fn new(parent: &str, name: &str) -> HostDir {
        let p = Path::new(parent).join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        HostDir(p)
    }
}

impl Drop for HostDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A file removed when the test ends, however it ends.
struct Removed(PathBuf);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn write_644(p: &Path, body: &str) {
    std::fs::write(p, body).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).unwrap();
}

#[test]
fn the_learn_sandbox_gives_a_hostile_server_nothing_and_its_attempts_stay_out_of_the_policy() {
    assert!(is_root(), "the learn tests run as root (scripts/test.sh runs them in the root pass only)");
    // Everything planted lies where the learn view reaches (/opt is one of its roots), so that
    // only the view's carving keeps it out: mcpbox's config and state dir, another server's data.
    let conf = HostDir::new("/opt", "mcpbox-learn-conf");
    let state = conf.0.join("state");
    let other_data = state.join("other/data");
    std::fs::create_dir_all(&other_data).unwrap();
    let other_secret = other_data.join("secret.txt");
    write_644(&other_secret, "OTHER-SERVER-CANARY-41d9");
    let script_dir = HostDir::new("/opt", "mcpbox-learn-script");
    let script = script_dir.0.join("learn_attack_mcp.py");
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/learn_attack_mcp.py"), &script).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    // The base: python, plus the script.
    let base = script_dir.0.join("base.toml");
    write_644(
        &base,
        &format!("extends = \"python\"\n[filesystem]\nread = [{:?}]\n", script_dir.0.display().to_string()),
    );
    let config = conf.0.join("mcpbox.json");
    let cfg = json!({
        "mcpbox": {"stateDir": state},
        "mcpServers": {
            "att": {"command": "/usr/bin/python3", "args": [script], "policy": base, "env": {"ATT_MODE": "LEARNVALUE-3e1"}},
            "other": {"command": "/usr/bin/python3", "args": [script], "env": {"OTHER_TOKEN": "CONFIG-CANARY-77c2"}}
        }
    });
    write_644(&config, &cfg.to_string());
    // A canary in the host's /root.
    let root_canary = PathBuf::from(format!("/root/mcpbox-learn-canary-{}", std::process::id()));
    write_644(&root_canary, "ROOT-CANARY-90ab");
    let _canary = Removed(root_canary.clone());
    let internal = site("LEARN-INTERNAL-SITE");
    let out = script_dir.0.join("att.learned.toml");

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mcpbox"));
    cmd.args(["policy", "learn", "--config"]).arg(&config).args(["--server", "att", "--out"]).arg(&out);
    let mut l = Learning::start(cmd);
    let legit = "/usr/share/common-licenses/GPL-3";
    let reads = [
        config.display().to_string(),
        other_secret.display().to_string(),
        "/etc/shadow".to_string(),
        "/etc/sudoers".to_string(),
        root_canary.display().to_string(),
        legit.to_string(),
    ];
    let internal_url = format!("http://127.0.0.1:{}/", internal.port);
    let metadata_url = "http://169.254.169.254/latest/meta-data/".to_string();
    let r = l.call(
        "attack",
        json!({"read": reads, "write": ["/usr/lib/mcpbox-learn-evil", state.join("x")], "get": [internal_url, metadata_url]}),
    );
    let text = text_of(&r);
    let (code, stderr) = l.finish();
    assert_eq!(code, 0, "policy learn failed:\n{stderr}\n{text}");

    // Nothing of the planted secrets was read: each path is absent from the view.
    for p in &reads[..5] {
        assert!(text.contains(&format!("READ-ERRNO {p} 2")), "{p} was not ENOENT:\n{text}");
    }
    for canary in ["OTHER-SERVER-CANARY", "CONFIG-CANARY", "ROOT-CANARY", "root:"] {
        assert!(!text.contains(canary), "{canary} leaked:\n{text}");
    }
    // The system's files are there to read.
    assert!(text.contains(&format!("READ {legit} ")), "{text}");
    // Writes outside DATA and /tmp fail; the state dir is not even there.
    assert!(text.contains("WRITE-ERRNO /usr/lib/mcpbox-learn-evil 30"), "not EROFS:\n{text}");
    // The state dir's directories above the server's own DATA are in the view (empty, read-only:
    // EROFS); nothing else of it is (ENOENT above), and nothing is written there.
    let sx = state.join("x").display().to_string();
    assert!(text.contains(&format!("WRITE-ERRNO {sx} 30")) || text.contains(&format!("WRITE-ERRNO {sx} 2")), "{text}");
    assert!(!state.join("x").exists());
    assert!(!Path::new("/usr/lib/mcpbox-learn-evil").exists());
    // Internal addresses stay refused by the proxy in record mode, and were never contacted.
    assert!(text.contains(&format!("GET-STATUS http://127.0.0.1:{}/ 403", internal.port)), "{text}");
    assert!(text.contains("GET-STATUS http://169.254.169.254/latest/meta-data/ 403"), "{text}");
    assert_eq!(internal.hits.load(std::sync::atomic::Ordering::SeqCst), 0);

    // The learned policy: what was used, none of the attempts.
    let policy = std::fs::read_to_string(&out).unwrap_or_else(|e| panic!("no learned policy: {e}\n{stderr}"));
    assert!(policy.contains(&format!("extends = {:?}", base.display().to_string())), "{policy}");
    assert!(policy.contains("\"/usr/share/common-licenses/GPL-3\""), "the legit read is granted:\n{policy}");
    // The command's own name (a symlink to the runtime the base grants) is no grant.
    assert!(!policy.contains("\"/usr/bin/python3\""), "{policy}");
    for absent in [
        conf.0.display().to_string(),
        "shadow".into(),
        "sudoers".into(),
        "/root".into(),
        "127.0.0.1".into(),
        "169.254".into(),
        "[network]".into(),
        "CANARY".into(),
    ] {
        assert!(!policy.contains(&absent), "{absent} is in the learned policy:\n{policy}");
    }
    // The refused write is there, commented out, for the reader to decide.
    assert!(policy.contains("#     \"/usr/lib/mcpbox-learn-evil\","), "{policy}");
    // The configured env names are passed, never their values.
    assert!(policy.contains("\"ATT_MODE\""), "{policy}");
    assert!(!policy.contains("OTHER_TOKEN") && !policy.contains("LEARNVALUE"), "{policy}");
    assert_checks(&out);
}

/// As root and rootless (scripts/test.sh runs `learn::any_user` in both passes): a server
/// started by its command line is learned, and its learned policy covers what it read and
/// executed, none of what it could not reach.
mod any_user {
    use super::*;

    #[test]
    fn a_command_line_server_is_learned_as_any_user() {
        let dir = crate::common::tempdir();
        let script = dir.path().join("learn_attack_mcp.py");
        std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/learn_attack_mcp.py"), &script).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
        let base = dir.path().join("base.toml");
        write_644(&base, &format!("extends = \"python\"\n[filesystem]\nread = [{:?}]\n", script.display().to_string()));
        let state = dir.path().join("state");
        let out = dir.path().join("learned.toml");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mcpbox"));
        cmd.args(["policy", "learn", "--policy"]).arg(&base).arg("--state-dir").arg(&state);
        cmd.args(["--name", &crate::common::unique("learn-any"), "--out"]).arg(&out);
        cmd.arg("--").arg("/usr/bin/python3").arg(&script);
        let mut l = Learning::start(cmd);
        let legit = "/usr/share/common-licenses/GPL-3";
        let r = l.call("attack", json!({"read": ["/etc/shadow", legit], "write": ["/usr/lib/mcpbox-learn-any"]}));
        let text = text_of(&r);
        let (code, stderr) = l.finish();
        assert_eq!(code, 0, "{stderr}\n{text}");
        assert!(text.contains("READ-ERRNO /etc/shadow 2"), "{text}");
        assert!(text.contains(&format!("READ {legit} ")), "{text}");
        assert!(text.contains("WRITE-ERRNO /usr/lib/mcpbox-learn-any 30"), "{text}");
        let policy = std::fs::read_to_string(&out).unwrap();
        assert!(policy.contains(&format!("{legit:?}")), "{policy}");
        assert!(policy.contains("#     \"/usr/lib/mcpbox-learn-any\","), "{policy}");
        assert!(!policy.contains("shadow"), "{policy}");
        assert!(stderr.contains("path syscalls"), "{stderr}");
        assert_checks(&out);
    }

    /// A path syscall the base policy denies (`extra_deny`) reaches mcpbox's listener like an
    /// observed one: it must still get its EPERM, not be let through.
    #[test]
    fn a_path_syscall_the_base_denies_stays_denied_while_learning() {
        let dir = crate::common::tempdir();
        let base = dir.path().join("base.toml");
        write_644(&base, "extends = \"default\"\n[seccomp]\nextra_deny = [\"mkdir\", \"mkdirat\"]\n");
        let state = dir.path().join("state");
        let out = dir.path().join("learned.toml");
        let name = crate::common::unique("learn-deny");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mcpbox"));
        cmd.args(["policy", "learn", "--policy"]).arg(&base).arg("--state-dir").arg(&state);
        cmd.args(["--name", &name, "--out"]).arg(&out);
        cmd.args(["--", "/bin/sh", "-c", "mkdir \"$HOME/made\" && echo MADE || echo REFUSED"]);
        test_env(&mut cmd);
        let o = run_timeout(cmd, Duration::from_secs(60));
        assert_eq!(o.code, 0, "{o}");
        assert!(o.stdout.contains("REFUSED") && o.stderr.contains("Operation not permitted"), "{o}");
        assert!(!state.join(&name).join("data/made").exists(), "mkdir went through");
        let policy = std::fs::read_to_string(&out).unwrap();
        assert!(policy.contains("#   mkdir: 1 time(s)"), "{policy}");
    }
}

// ---------------------------------------------------------------------------------------------
// The seven servers mcpbox ships policies for: learned, replayed, compared.
// ---------------------------------------------------------------------------------------------

mod real {
    use super::*;
    use crate::realservers::support::{command, scratch};

    /// One state dir for every learn of this run (packages are prepared into it by `policy
    /// learn` itself, as `run` and `serve` prepare).
    fn state() -> &'static Path {
        static S: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
        S.get_or_init(|| scratch("learn-state"))
    }

    struct Call {
        tool: String,
        args: Value,
        /// A substring of the answer that shows it worked.
        expect: String,
    }

    fn call(tool: &str, args: Value, expect: &str) -> Call {
        Call { tool: tool.into(), args, expect: expect.into() }
    }

    /// The calls of a session, given the tools the server lists.
    type Session = dyn Fn(&[String]) -> Vec<Call>;

    struct Case {
        name: &'static str,
        args: Vec<String>,
        env: Vec<(String, String)>,
        /// The runtime base learned on, and the shipped policy compared with.
        runtime: &'static str,
        shipped: &'static str,
        /// What the test gives the server on top of both (its directories, its site), as TOML.
        extras: String,
        /// The session, given the tools the server lists.
        calls: Box<Session>,
        /// `+` lines of `policy diff SHIPPED LEARNED` the learned policy may have, each with why.
        extra_ok: Vec<(&'static str, &'static str)>,
    }

    /// Runs the session; (tool, worked, answer) per call.
    fn session(s: &mut Learning, calls: &Session) -> Vec<(String, bool, String)> {
        let list = s.request("tools/list", json!({}));
        let names: Vec<String> = list["result"]["tools"]
            .as_array()
            .unwrap_or_else(|| panic!("tools/list: {list}"))
            .iter()
            .filter_map(|t| t["name"].as_str().map(String::from))
            .collect();
        calls(&names)
            .into_iter()
            .map(|c| {
                let r = s.call(&c.tool, c.args.clone());
                let text = r["result"]["content"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|x| x["text"].as_str()).collect::<Vec<_>>().join("\n"))
                    .unwrap_or_else(|| r.to_string());
                let ok = r["result"]["isError"] != json!(true) && text.contains(&c.expect);
                (c.tool, ok, text)
            })
            .collect()
    }

    fn policy_file(dir: &Path, name: &str, extends: &str, extras: &str) -> PathBuf {
        let p = dir.join(format!("{name}.toml"));
        write_644(&p, &format!("extends = {extends:?}\n{extras}"));
        p
    }

    fn run_session(case: &Case, policy: &Path) -> Vec<(String, bool, String)> {
        let (cmd, args) = command(case.name);
        let mut c = Command::new(env!("CARGO_BIN_EXE_mcpbox"));
        c.args(["run", "--policy"]).arg(policy).arg("--state-dir").arg(state()).args(["--name", case.name, "--"]);
        c.arg(cmd).args(args).args(&case.args);
        c.envs(case.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let mut s = Learning::start(c);
        let out = session(&mut s, &*case.calls);
        let (_, stderr) = s.finish();
        for (tool, ok, text) in &out {
            if !ok {
                eprintln!("{} under {}: {tool} failed: {text}\n{stderr}", case.name, policy.display());
            }
        }
        out
    }

    fn learn_case(case: Case) {
        assert!(is_root(), "the learn tests run as root");
        let dir = scratch(&format!("learn-{}", case.name));
        let base = policy_file(&dir, "base", case.runtime, &case.extras);
        let shipped = policy_file(&dir, "shipped", case.shipped, &case.extras);
        let (cmd, args) = command(case.name);
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        args.extend(case.args.iter().cloned());
        let env: serde_json::Map<String, Value> = case.env.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        let config = dir.join("mcpbox.json");
        let cfg = json!({
            "mcpbox": {"stateDir": state()},
            "mcpServers": {case.name: {"command": cmd, "args": args, "env": env, "policy": base}},
        });
        write_644(&config, &cfg.to_string());
        let learned = dir.join("learned.toml");

        // 1. Learn, driving the server with a real session.
        let mut c = Command::new(env!("CARGO_BIN_EXE_mcpbox"));
        c.args(["policy", "learn", "--config"]).arg(&config).args(["--server", case.name, "--out"]).arg(&learned);
        let mut s = Learning::start(c);
        let learning = session(&mut s, &*case.calls);
        let (code, stderr) = s.finish();
        assert_eq!(code, 0, "{}: policy learn failed:\n{stderr}", case.name);
        for (tool, ok, text) in &learning {
            assert!(ok, "{}: {tool} did not work while learning: {text}\n{stderr}", case.name);
        }
        let text = std::fs::read_to_string(&learned).unwrap();
        eprintln!("{}: learned policy:\n{text}", case.name);
        assert_checks(&learned);

        // 2. Every call that worked while learning works under the learned policy, and under
        //    the shipped one.
        for policy in [&learned, &shipped] {
            let again = run_session(&case, policy);
            let failed: Vec<&String> = again.iter().filter(|(_, ok, _)| !ok).map(|(t, _, _)| t).collect();
            assert!(failed.is_empty(), "{}: under {}: {failed:?} failed", case.name, policy.display());
        }

        // 3. The learned policy grants nothing the shipped one does not, but the named extras.
        let dirs = state().join(case.name);
        let mut c = Command::new(env!("CARGO_BIN_EXE_mcpbox"));
        c.args(["policy", "diff"]).arg(&shipped).arg(&learned);
        c.arg("--data").arg(dirs.join("data")).arg("--cache").arg(dirs.join("cache"));
        let out = run_timeout(c, Duration::from_secs(60));
        assert_eq!(out.code, 0, "{out}");
        let unexplained: Vec<&str> = out
            .stdout
            .lines()
            .filter(|l| l.starts_with("+ "))
            .filter(|l| !case.extra_ok.iter().any(|(grant, _)| l.contains(grant)))
            .collect();
        assert!(
            unexplained.is_empty(),
            "{}: the learned policy grants what the shipped one does not: {unexplained:?}\n{}",
            case.name,
            out.stdout
        );
    }

    #[test]
    fn time() {
        learn_case(Case {
            name: "time",
            args: vec!["--local-timezone".into(), "UTC".into()],
            env: vec![],
            runtime: "python",
            shipped: "mcp-server-time",
            extras: String::new(),
            calls: Box::new(|_| {
                vec![
                    call("get_current_time", json!({"timezone": "Asia/Tokyo"}), "+09:00"),
                    call(
                        "convert_time",
                        json!({"source_timezone": "Europe/Paris", "time": "12:00", "target_timezone": "America/New_York"}),
                        "America/New_York",
                    ),
                ]
            }),
            extra_ok: vec![LOCALE_ALIAS],
        });
    }

    /// glibc's setlocale() reads the alias table; where it is absent it takes the name as given
    /// (the shipped policies work without it): used, not needed.
    const LOCALE_ALIAS: (&str, &str) = ("\"/usr/share/locale/locale.alias\"", "glibc setlocale() alias table");

    #[test]
    fn everything() {
        learn_case(Case {
            name: "everything",
            args: vec![],
            env: vec![],
            runtime: "node",
            shipped: "server-everything",
            extras: String::new(),
            calls: Box::new(|names| {
                let mut c = vec![call("echo", json!({"message": "hello from learn"}), "hello from learn")];
                if let Some(sum) = names.iter().find(|n| *n == "add" || *n == "get-sum") {
                    c.push(call(sum, json!({"a": 2, "b": 40}), "42"));
                }
                c
            }),
            extra_ok: vec![LOCALE_ALIAS],
        });
    }

    #[test]
    fn filesystem() {
        let dir = scratch("learn-fs-root");
        let root = dir.join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::write(root.join("hello.txt"), "hello inside the root\n").unwrap();
        let r = root.to_string_lossy().into_owned();
        let r2 = r.clone();
        learn_case(Case {
            name: "filesystem",
            args: vec![r.clone()],
            env: vec![],
            runtime: "node",
            shipped: "server-filesystem",
            extras: format!("[filesystem]\nwrite = [{r:?}]\n"),
            calls: Box::new(move |names| {
                let read = if names.iter().any(|n| n == "read_text_file") { "read_text_file" } else { "read_file" };
                let root = Path::new(&r2);
                vec![
                    call("list_allowed_directories", json!({}), &r2),
                    call(read, json!({"path": root.join("hello.txt")}), "hello inside the root"),
                    call("write_file", json!({"path": root.join("new.txt"), "content": "written while learning"}), ""),
                    call("list_directory", json!({"path": root}), "new.txt"),
                ]
            }),
            extra_ok: vec![LOCALE_ALIAS],
        });
    }

    #[test]
    fn memory() {
        // The graph file, where the shipped policy puts it (it sets the variable itself; here
        // the server's config does, as a user's would).
        let file = state().join("memory/data/memory.jsonl");
        learn_case(Case {
            name: "memory",
            args: vec![],
            env: vec![("MEMORY_FILE_PATH".into(), file.display().to_string())],
            runtime: "node",
            shipped: "server-memory",
            extras: String::new(),
            // A new entity each session: the graph persists in DATA from one to the next.
            calls: Box::new(|_| {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let entity = format!("learned-entity-{}", N.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
                vec![
                    call(
                        "create_entities",
                        json!({"entities": [{"name": entity, "entityType": "test", "observations": ["seen while learning"]}]}),
                        &entity,
                    ),
                    call("read_graph", json!({}), &entity),
                ]
            }),
            extra_ok: vec![
                LOCALE_ALIAS,
                // The test's config names the graph file in the server's env; the shipped
                // policy sets the same variable itself.
                ("pass = \"MEMORY_FILE_PATH\"", "the config's env, passed by name"),
            ],
        });
    }

    #[test]
    fn sequential_thinking() {
        learn_case(Case {
            name: "sequential-thinking",
            args: vec![],
            env: vec![],
            runtime: "node",
            shipped: "server-sequential-thinking",
            extras: String::new(),
            calls: Box::new(|names| {
                let tool = names.iter().find(|n| n.contains("thinking")).cloned().unwrap_or_default();
                vec![call(
                    &tool,
                    json!({"thought": "first step", "nextThoughtNeeded": false, "thoughtNumber": 1, "totalThoughts": 1}),
                    "thoughtNumber",
                )]
            }),
            extra_ok: vec![LOCALE_ALIAS],
        });
    }

    #[test]
    fn fetch() {
        let page = site("<html><head><title>Learn</title></head><body><article><h1>Learned page</h1><p>FETCH-LEARN-CANARY paragraph of text that readability keeps.</p></article></body></html>");
        let url = format!("http://127.0.0.1:{}/page", page.port);
        // A loopback site is internal: only an exact allow-list entry reaches it (the base and
        // the shipped policy both get it), never the record mode.
        learn_case(Case {
            name: "fetch",
            args: vec!["--ignore-robots-txt".into(), "--allow-private-ips".into()],
            env: vec![],
            runtime: "python",
            shipped: "mcp-server-fetch",
            extras: format!("[network]\nmode = \"proxy\"\nallow = [\"127.0.0.1:{}\"]\n", page.port),
            // `raw`: the simplified mode (readabilipy) probes for node and, finding it in the learn
            // view, runs npm to install its JavaScript, which fails offline; without node (the
            // shipped policy) it falls back to Python. A server that probes the host for
            // optional tools behaves differently in the learn view (docs/POLICIES.md says so).
            calls: Box::new(move |_| vec![call("fetch", json!({"url": url, "raw": true}), "FETCH-LEARN-CANARY")]),
            extra_ok: vec![LOCALE_ALIAS],
        });
    }

    #[test]
    fn git() {
        let dir = scratch("learn-git-repo");
        let repo = dir.join("repo");
        std::fs::create_dir(&repo).unwrap();
        for args in [&["init", "-q"][..], &["add", "README"], &["commit", "-q", "-m", "learned commit"]] {
            if args[0] == "add" {
                std::fs::write(repo.join("README"), "learn").unwrap();
            }
            let st = Command::new("git")
                .args(["-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"])
                .args(args)
                .current_dir(&repo)
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .status()
                .unwrap();
            assert!(st.success(), "git {args:?}");
        }
        std::fs::write(repo.join("untracked.txt"), "new").unwrap();
        let r = repo.to_string_lossy().into_owned();
        let r2 = r.clone();
        learn_case(Case {
            name: "git",
            args: vec!["--repository".into(), r.clone()],
            // The repository is not the server uid's: git wants it named safe, which the
            // shipped policy sets itself and a user's config would.
            env: vec![
                ("GIT_CONFIG_COUNT".into(), "1".into()),
                ("GIT_CONFIG_KEY_0".into(), "safe.directory".into()),
                ("GIT_CONFIG_VALUE_0".into(), "*".into()),
            ],
            runtime: "python",
            shipped: "mcp-server-git",
            extras: format!("[filesystem]\nread = [{r:?}]\n"),
            calls: Box::new(move |_| {
                vec![
                    call("git_status", json!({"repo_path": r2}), "untracked.txt"),
                    call("git_log", json!({"repo_path": r2, "max_count": 5}), "learned commit"),
                ]
            }),
            extra_ok: vec![
                LOCALE_ALIAS,
                ("pass = \"GIT_CONFIG_COUNT\"", "the config's env (safe.directory), passed by name"),
                ("pass = \"GIT_CONFIG_KEY_0\"", "the config's env (safe.directory), passed by name"),
                ("pass = \"GIT_CONFIG_VALUE_0\"", "the config's env (safe.directory), passed by name"),
                // Where the host has a git of its own in /usr/local/bin (first on the default
                // PATH), that is the one the server ran; the shipped policy pins /usr/bin/git
                // (and PATH). On a plain Debian host the learned grant is /usr/bin/git.
                ("exec = \"/usr/local/bin/git\"", "the git first on this host's PATH"),
            ],
        });
    }
}

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
    std::fs::remove_file(&root_canary).unwrap();
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
    assert!(text.contains(&format!("WRITE-ERRNO {} 2", state.join("x").display())), "{text}");
    assert!(!Path::new("/usr/lib/mcpbox-learn-evil").exists());
    // Internal addresses stay refused by the proxy in record mode, and were never contacted.
    assert!(text.contains(&format!("GET-STATUS http://127.0.0.1:{}/ 403", internal.port)), "{text}");
    assert!(text.contains("GET-STATUS http://169.254.169.254/latest/meta-data/ 403"), "{text}");
    assert_eq!(internal.hits.load(std::sync::atomic::Ordering::SeqCst), 0);

    // The learned policy: what was used, none of the attempts.
    let policy = std::fs::read_to_string(&out).unwrap_or_else(|e| panic!("no learned policy: {e}\n{stderr}"));
    assert!(policy.contains(&format!("extends = {:?}", base.display().to_string())), "{policy}");
    assert!(policy.contains("\"/usr/share/common-licenses\""), "the legit read is granted:\n{policy}");
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

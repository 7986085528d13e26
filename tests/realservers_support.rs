//! Support for the real-server tests: scratch dirs, `mcpbox prepare` once for every package,
//! `mcpbox serve` as a child process, and a minimal Streamable HTTP MCP client (one blocking
//! HTTP/1.1 request per connection, JSON answers).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const TOKEN: &str = "realservers-test-token";

pub use crate::common::{http, mcpbox, prepared_tree, processes_mentioning};

/// A fresh directory under the target dir (not /tmp: the sandbox has its own /tmp), traversable
/// by the per-server uids.
pub fn scratch(name: &str) -> PathBuf {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("realservers");
    // Scratch dirs of earlier runs (their test process is gone) are removed once.
    static CLEAN: OnceLock<()> = OnceLock::new();
    CLEAN.get_or_init(|| {
        for e in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let pid = n.rsplit('-').next().and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|p| p != std::process::id() && !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    });
    let d = base.join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    for p in [&base, &d] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    d
}

/// The npx/uvx command of every server under test. Server names and packages must match
/// between [`prepared_state`] and the tests, so that serving finds them prepared.
pub fn command(name: &str) -> (&'static str, Vec<&'static str>) {
    match name {
        "everything" => ("npx", vec!["-y", "@modelcontextprotocol/server-everything"]),
        "filesystem" => ("npx", vec!["-y", "@modelcontextprotocol/server-filesystem"]),
        "memory" => ("npx", vec!["-y", "@modelcontextprotocol/server-memory"]),
        "sequential-thinking" => ("npx", vec!["-y", "@modelcontextprotocol/server-sequential-thinking"]),
        "fetch" => ("uvx", vec!["mcp-server-fetch"]),
        "git" => ("uvx", vec!["mcp-server-git"]),
        "time" => ("uvx", vec!["mcp-server-time"]),
        _ => panic!("unknown server {name}"),
    }
}

pub const ALL: &[&str] = &["everything", "filesystem", "memory", "sequential-thinking", "fetch", "git", "time"];

/// A server entry for a config: its npx/uvx command plus `extra_args`, and `policy`.
pub fn server(name: &str, extra_args: &[&str], policy: Value) -> Value {
    let (cmd, mut args) = command(name);
    args.extend_from_slice(extra_args);
    json!({ "command": cmd, "args": args, "policy": policy })
}

pub fn config(servers: Value) -> Value {
    json!({
        "mcpProxy": { "addr": "127.0.0.1:0", "name": "realservers", "options": { "authTokens": [TOKEN] } },
        "mcpServers": servers,
    })
}

/// One state dir in which every package was prepared once, by `mcpbox prepare`. Preparing is
/// part of what is tested: a failure fails every test that needs the packages.
pub fn prepared_state() -> PathBuf {
    static STATE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    STATE
        .get_or_init(|| {
            let dir = scratch("prepared");
            let state = dir.join("state");
            let mut servers = serde_json::Map::new();
            // Each under its runtime's base policy: a policy that cannot execute the runtime
            // that runs the package is refused before anything is prepared.
            for n in ALL {
                let base = if command(n).0 == "npx" { "node" } else { "python" };
                servers.insert(n.to_string(), server(n, &[], json!(base)));
            }
            let cfg = dir.join("prepare.json");
            std::fs::write(&cfg, config(Value::Object(servers)).to_string()).unwrap();
            let t = Instant::now();
            let out = Command::new(mcpbox())
                .args(["prepare", "--config"])
                .arg(&cfg)
                .arg("--state-dir")
                .arg(&state)
                .env("MCPBOX_LOG", "info")
                .output()
                .map_err(|e| e.to_string())?;
            let log = String::from_utf8_lossy(&out.stderr).into_owned();
            eprintln!("mcpbox prepare ({:.1} s):\n{log}", t.elapsed().as_secs_f64());
            if !out.status.success() {
                return Err(format!("mcpbox prepare failed ({}):\n{log}", out.status));
            }
            Ok(state)
        })
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `mcpbox serve` running as a child; killed on drop.
pub struct Serve {
    child: Child,
    pub port: u16,
    pub log: Arc<Mutex<String>>,
}

impl Serve {
    pub fn start(dir: &Path, state: &Path, cfg: Value) -> Serve {
        Self::start_env(dir, state, cfg, &[])
    }

    pub fn start_env(dir: &Path, state: &Path, cfg: Value, env: &[(&str, &str)]) -> Serve {
        let path = dir.join(format!("mcpbox-{}.json", rand_suffix()));
        std::fs::write(&path, cfg.to_string()).unwrap();
        let mut child = Command::new(mcpbox())
            .args(["serve", "--grace", "2", "--config"])
            .arg(&path)
            .arg("--state-dir")
            .arg(state)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting mcpbox serve");
        let log = Arc::new(Mutex::new(String::new()));
        let (l2, stderr) = (log.clone(), child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = l2.lock().unwrap();
                l.push_str(&strip_ansi(&line));
                l.push('\n');
            }
        });
        let deadline = Instant::now() + Duration::from_secs(300);
        let port = loop {
            let text = log.lock().unwrap().clone();
            if let Some(rest) = text.split("listening on 127.0.0.1:").nth(1) {
                let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
                break digits.parse::<u16>().unwrap();
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!("mcpbox serve exited ({st}):\n{text}");
            }
            assert!(Instant::now() < deadline, "mcpbox serve did not listen:\n{text}");
            std::thread::sleep(Duration::from_millis(50));
        };
        Serve { child, port, log }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// GET a path without auth (health endpoints): (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        let (st, _, body) = http(self.port, "GET", path, &[], "");
        (st, body)
    }

    /// An initialized MCP session on `server`.
    pub fn client(&self, server: &str) -> Client {
        let mut c = Client { port: self.port, server: server.to_string(), session: None, next: 1 };
        let r = c.request(
            "initialize",
            json!({
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": { "name": "mcpbox-realservers", "version": "1" },
            }),
        );
        assert!(r.get("result").is_some(), "initialize {server}: {r}\n{}", self.log());
        c.notify("notifications/initialized");
        c
    }

    /// SIGTERM, then wait (mcpbox stops its servers).
    pub fn stop(mut self) -> String {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.log()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{}", N.fetch_add(1, Ordering::Relaxed))
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub struct Client {
    port: u16,
    server: String,
    session: Option<String>,
    next: u64,
}

impl Client {
    fn post(&mut self, body: Value) -> (u16, Vec<(String, String)>, String) {
        let mut headers = vec![
            ("Authorization".to_string(), format!("Bearer {TOKEN}")),
            ("Content-Type".to_string(), "application/json".to_string()),
            ("Accept".to_string(), "application/json".to_string()),
            ("MCP-Protocol-Version".to_string(), "2025-06-18".to_string()),
        ];
        if let Some(s) = &self.session {
            headers.push(("Mcp-Session-Id".to_string(), s.clone()));
        }
        let h: Vec<(&str, &str)> = headers.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        http(self.port, "POST", &format!("/{}/mcp", self.server), &h, &body.to_string())
    }

    /// A JSON-RPC request; returns the whole response object.
    pub fn request(&mut self, method: &str, params: Value) -> Value {
        let id = self.next;
        self.next += 1;
        let (st, headers, body) = self.post(json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }));
        if let Some((_, v)) = headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("mcp-session-id")) {
            self.session = Some(v.clone());
        }
        assert_eq!(st, 200, "{} {method}: HTTP {st}: {body}", self.server);
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{} {method}: not JSON ({e}): {body}", self.server))
    }

    pub fn notify(&mut self, method: &str) {
        let (st, _, body) = self.post(json!({ "jsonrpc": "2.0", "method": method }));
        assert!(st == 202 || st == 200, "{method}: HTTP {st}: {body}");
    }

    pub fn tool_names(&mut self) -> Vec<String> {
        let r = self.request("tools/list", json!({}));
        r["result"]["tools"]
            .as_array()
            .unwrap_or_else(|| panic!("tools/list: {r}"))
            .iter()
            .filter_map(|t| t["name"].as_str().map(str::to_owned))
            .collect()
    }

    /// tools/call: (text of the content, isError). A JSON-RPC error counts as an error too.
    pub fn tool(&mut self, name: &str, args: Value) -> (String, bool) {
        let r = self.request("tools/call", json!({ "name": name, "arguments": args }));
        if let Some(e) = r.get("error") {
            return (e.to_string(), true);
        }
        let res = &r["result"];
        let text = res["content"]
            .as_array()
            .map(|a| a.iter().filter_map(|c| c["text"].as_str()).collect::<Vec<_>>().join("\n"))
            .unwrap_or_default();
        (text, res["isError"].as_bool().unwrap_or(false))
    }
}

/// A tiny HTTP server on 127.0.0.1 answering every GET with `body`; counts connections.
pub struct Site {
    pub port: u16,
    pub hits: Arc<std::sync::atomic::AtomicUsize>,
}

pub fn site(body: &'static str) -> Site {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h2 = hits.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            h2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = [0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let resp = format!("HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                let _ = s.write_all(resp.as_bytes());
            });
        }
    });
    Site { port, hits }
}

/// Every file under `dir` whose contents include `needle`.
pub fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                if let Ok(b) = std::fs::read(e.path()) {
                    if b.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                        out.push(e.path());
                    }
                }
            }
        }
    }
    out
}

/// Files under `dir` whose name passes `want`, sorted.
pub fn files_named(dir: &Path, want: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() && want(&e.file_name().to_string_lossy()) {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

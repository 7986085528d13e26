//! Support for the end-to-end tests of `mcpbox serve` (tests/serve.rs): a real `mcpbox serve`
//! process with real sandboxes, `@modelcontextprotocol/server-everything` from npm behind it,
//! raw HTTP clients for both transports, a legacy-SSE transport for the rmcp client (rmcp no
//! longer ships one), and /proc scanning to find and check the sandboxed processes.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;

pub const TOKEN: &str = "e2e-token-3b9f51c2";
/// Put into mcpbox's environment; no server may ever see it.
pub const CANARY: &str = "canary-8e1d4c7a-must-not-leak";
pub const CANARY_VAR: &str = "MCPBOX_SECRET_CANARY";

pub fn node_modules() -> PathBuf {
    std::env::var_os("MCPBOX_TEST_NODE_MODULES")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/mcpbox-test/node_modules"))
}

/// The stdio entry point of server-everything. Missing → the test fails (never skips).
pub fn everything_entry() -> PathBuf {
    let entry = node_modules().join("@modelcontextprotocol/server-everything/dist/index.js");
    assert!(
        entry.is_file(),
        "{} is missing: run scripts/install-test-deps.sh (or point MCPBOX_TEST_NODE_MODULES at a node_modules \
         that holds @modelcontextprotocol/server-everything)",
        entry.display()
    );
    entry
}

/// The `mcpServers` entry for server-everything. The policy extends the shipped `node`
/// policy with read access to the test's node_modules only: nothing else was needed.
pub fn everything(isolation: &str) -> Value {
    json!({
        "command": "node",
        "args": [everything_entry(), "stdio"],
        "isolation": isolation,
        "policy": {"extends": "node", "filesystem": {"read": [node_modules()]}},
    })
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running `mcpbox serve`, stopped (TERM, then KILL) when dropped.
pub struct Mcpbox {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub log: PathBuf,
    pub http: reqwest::Client,
}

impl Mcpbox {
    /// `servers` is the `mcpServers` object; `extra` is merged into the `mcpbox` section.
    pub async fn start(servers: Value, extra: Value) -> Mcpbox {
        Self::start_with_args(servers, extra, &[]).await
    }

    /// [`Mcpbox::start`] with more `serve` flags.
    pub async fn start_with_args(servers: Value, extra: Value, args: &[&str]) -> Mcpbox {
        // reqwest is built with rustls and no default crypto provider (as mcpbox's url-bridge
        // is): install ring once, before any client of this process is created.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::Builder::new().prefix("mcpbox-e2e-").tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut mcpbox = json!({});
        if let Value::Object(e) = extra {
            for (k, v) in e {
                mcpbox[k] = v;
            }
        }
        let cfg = json!({
            "mcpProxy": {"addr": addr.to_string(), "name": "mcpbox-e2e", "type": "streamable-http",
                          "options": {"authTokens": [TOKEN]}},
            "mcpbox": mcpbox,
            "mcpServers": servers,
        });
        let cfg_path = dir.path().join("mcpbox.json");
        std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
        let log = dir.path().join("mcpbox.log");
        let child = Command::new(crate::common::mcpbox())
            .arg("serve")
            .arg("--config")
            .arg(&cfg_path)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(["--grace", "2", "--log-format", "json"])
            .args(args)
            .env(CANARY_VAR, CANARY)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start mcpbox serve");
        let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
        let mut mb = Mcpbox { child: Some(child), addr, dir, log, http };
        mb.wait_healthy().await;
        mb
    }

    /// An `mcpbox serve` started by the caller (listening on `addr`, logging to `log`), once healthy;
    /// ended as [`Mcpbox::start`]'s is.
    pub async fn adopt(child: Child, addr: SocketAddr, dir: tempfile::TempDir, log: PathBuf) -> Mcpbox {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
        let mut mb = Mcpbox { child: Some(child), addr, dir, log, http };
        mb.wait_healthy().await;
        mb
    }

    async fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("mcpbox serve exited ({st}) before it was healthy:\n{}", self.log_text());
            }
            if let Ok(r) = self.http.get(self.url("/healthz")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "mcpbox serve not healthy after 10 s:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait (up to `within`) for the exit status.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().unwrap();
        signal(child.id(), nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.child = None;
                panic!("mcpbox did not exit within {within:?} of SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait (up to `within`) for mcpbox to exit on its own; `None`: still running.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.as_mut()?.try_wait().unwrap() {
                self.child = None;
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A raw request with the right token; `headers` may add more (or override Authorization).
    pub async fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<Vec<u8>>) -> Resp {
        let mut rb = self
            .http
            .request(method.parse().unwrap(), self.url(path))
            .header("authorization", format!("Bearer {TOKEN}"));
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        if let Some(b) = body {
            rb = rb.body(b);
        }
        let r = rb.send().await.unwrap();
        Resp::read(r).await
    }

    /// Processes below mcpbox: the sandbox inits and the servers.
    pub fn descendants(&self) -> Vec<Proc> {
        descendants(self.pid())
    }

    /// The server process of a session, from mcpbox's log ("server started", with the session
    /// id and the pid of its sandbox) and /proc (the server below that sandbox).
    pub fn server_of_session(&self, sid: &str) -> Proc {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let sandbox = self.log_text().lines().find_map(|l| {
                let v: Value = serde_json::from_str(l).ok()?;
                let f = &v["fields"];
                (f["message"] == "server started" && f["session"] == sid).then(|| f["pid"].as_u64()).flatten()
            });
            if let Some(pid) = sandbox {
                let servers: Vec<Proc> =
                    descendants(pid as u32).into_iter().filter(|p| p.cmdline.contains("server-everything")).collect();
                if servers.len() == 1 {
                    return servers[0].clone();
                }
            }
            assert!(Instant::now() < deadline, "no server process found for session {sid}:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The node processes (servers) running under this mcpbox.
    pub fn servers(&self) -> Vec<Proc> {
        self.descendants().into_iter().filter(|p| p.cmdline.contains("server-everything")).collect()
    }
}

impl Drop for Mcpbox {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

pub struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Resp {
    pub async fn read(r: reqwest::Response) -> Resp {
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r.text().await.unwrap_or_default();
        Resp { status, headers, body }
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: body {:?}", self.body))
    }
}

// ---- SSE parsing ----------------------------------------------------------------------------

/// One server-sent event.
#[derive(Debug, Clone)]
pub struct Event {
    pub event: String,
    pub data: String,
    pub id: Option<String>,
}

/// Read the events of an SSE response into a channel (closed when the stream ends).
pub fn sse_events(resp: reqwest::Response) -> mpsc::UnboundedReceiver<Event> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut body = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut cur = Event { event: String::new(), data: String::new(), id: None };
        let mut has_data = false;
        while let Some(Ok(chunk)) = body.next().await {
            buf.extend_from_slice(&chunk);
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let line = String::from_utf8_lossy(&line);
                let line = line.trim_end_matches(['\n', '\r']);
                if line.is_empty() {
                    if has_data {
                        let ev =
                            std::mem::replace(&mut cur, Event { event: String::new(), data: String::new(), id: None });
                        let ev = Event { event: if ev.event.is_empty() { "message".into() } else { ev.event }, ..ev };
                        if tx.send(ev).is_err() {
                            return;
                        }
                    }
                    has_data = false;
                    continue;
                }
                if line.starts_with(':') {
                    continue;
                }
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "event" => cur.event = value.to_string(),
                    "id" => cur.id = Some(value.to_string()),
                    "data" => {
                        if has_data {
                            cur.data.push('\n');
                        }
                        cur.data.push_str(value);
                        has_data = true;
                    }
                    _ => {}
                }
            }
        }
    });
    rx
}

fn id_of(v: &Value) -> Option<&Value> {
    if v.get("method").is_none() {
        v.get("id")
    } else {
        None
    }
}

/// The JSON messages of an SSE response, as they arrive.
fn json_events(r: reqwest::Response) -> mpsc::UnboundedReceiver<Value> {
    let mut events = sse_events(r);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            let v: Value = serde_json::from_str(&ev.data).unwrap_or_else(|e| panic!("{e}: {:?}", ev.data));
            if tx.send(v).is_err() {
                return;
            }
        }
    });
    rx
}

pub fn init_msg(id: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "mcpbox-e2e", "version": "0"}}})
}

pub fn initialized_msg() -> Value {
    json!({"jsonrpc": "2.0", "method": "notifications/initialized"})
}

pub fn call_msg(id: Value, tool: &str, args: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": args}})
}

pub fn call_with_progress(id: Value, tool: &str, args: Value, token: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
           "params": {"name": tool, "arguments": args, "_meta": {"progressToken": token}}})
}

/// The text of the first content item of a tools/call result message.
pub fn text_of(resp: &Value) -> String {
    resp["result"]["content"][0]["text"].as_str().unwrap_or_else(|| panic!("no text content in {resp}")).to_string()
}

// ---- legacy HTTP+SSE client ---------------------------------------------------------------

/// A legacy SSE session: the GET stream is read in the background; every `message` event is
/// kept, answers are picked out by id.
pub struct Legacy {
    pub post_url: String,
    pub session_id: String,
    http: reqwest::Client,
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Event>>,
    /// Every message received that was not taken as an answer (notifications, requests).
    pub others: Mutex<Vec<Value>>,
    /// Answers received while waiting for another id.
    early: Mutex<HashMap<String, Value>>,
}

impl Legacy {
    pub async fn connect(mb: &Mcpbox, server: &str) -> Legacy {
        let r = mb
            .http
            .get(mb.url(&format!("/{server}/sse")))
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("accept", "text/event-stream")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "GET /{server}/sse");
        let mut rx = sse_events(r);
        let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("endpoint event in time")
            .expect("endpoint event");
        assert_eq!(first.event, "endpoint", "first event: {first:?}");
        let session_id = first.data.split("sessionId=").nth(1).expect("sessionId in the endpoint").to_string();
        Legacy {
            post_url: mb.url(&first.data),
            session_id,
            http: mb.http.clone(),
            rx: tokio::sync::Mutex::new(rx),
            others: Mutex::new(Vec::new()),
            early: Mutex::new(HashMap::new()),
        }
    }

    /// Connect and run the initialize handshake.
    pub async fn open(mb: &Mcpbox, server: &str) -> Legacy {
        let l = Legacy::connect(mb, server).await;
        let r = l.request(init_msg(json!(0))).await;
        assert!(r["result"]["serverInfo"].is_object(), "initialize: {r}");
        assert_eq!(l.post(&initialized_msg().to_string()).await.status, 202);
        l
    }

    pub async fn post(&self, body: &str) -> Resp {
        let r = self
            .http
            .post(&self.post_url)
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        Resp::read(r).await
    }

    /// The next message on the stream (`None`: none within `wait`, or the stream ended).
    pub async fn next(&self, wait: Duration) -> Option<Value> {
        let mut rx = self.rx.lock().await;
        match tokio::time::timeout(wait, rx.recv()).await {
            Ok(Some(ev)) => {
                assert_eq!(ev.event, "message", "{ev:?}");
                Some(serde_json::from_str(&ev.data).unwrap_or_else(|e| panic!("{e}: {:?}", ev.data)))
            }
            _ => None,
        }
    }

    /// Wait for the answer with this id; everything else read meanwhile is kept.
    pub async fn answer(&self, id: &Value, wait: Duration) -> Option<Value> {
        let k = id.to_string();
        if let Some(v) = self.early.lock().unwrap().remove(&k) {
            return Some(v);
        }
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self.next(left).await?;
            match id_of(&v) {
                Some(i) if i.to_string() == k => return Some(v),
                Some(i) => {
                    self.early.lock().unwrap().insert(i.to_string(), v);
                }
                None => self.others.lock().unwrap().push(v),
            }
        }
    }

    /// POST a request (202 expected) and wait for its answer on the stream.
    pub async fn request(&self, msg: Value) -> Value {
        let r = self.post(&msg.to_string()).await;
        assert_eq!(r.status, 202, "POST {msg}: {}", r.body);
        self.answer(&msg["id"], Duration::from_secs(20)).await.unwrap_or_else(|| panic!("no answer to {msg}"))
    }

    /// Notifications (and server requests) received so far, after reading for `wait`.
    pub async fn drain(&self, wait: Duration) -> Vec<Value> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.next(left).await {
                Some(v) => match id_of(&v) {
                    Some(i) => {
                        self.early.lock().unwrap().insert(i.to_string(), v);
                    }
                    None => self.others.lock().unwrap().push(v),
                },
                None => break,
            }
        }
        self.others.lock().unwrap().clone()
    }
}

/// A legacy-SSE transport for the rmcp client: the GET stream feeds the client, every
/// outgoing message is a POST.
pub async fn rmcp_legacy_transport(
    mb: &Mcpbox,
    server: &str,
) -> (
    std::pin::Pin<
        Box<dyn futures::Sink<rmcp::service::TxJsonRpcMessage<rmcp::RoleClient>, Error = std::io::Error> + Send>,
    >,
    tokio_stream::wrappers::UnboundedReceiverStream<rmcp::service::RxJsonRpcMessage<rmcp::RoleClient>>,
) {
    let l = Legacy::connect(mb, server).await;
    let Legacy { post_url, http, rx, .. } = l;
    let mut events = rx.into_inner();
    let (tx, msgs) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            if ev.event != "message" {
                continue;
            }
            match serde_json::from_str(&ev.data) {
                Ok(m) => {
                    if tx.send(m).is_err() {
                        return;
                    }
                }
                Err(e) => panic!("legacy SSE: undecodable message {e}: {}", ev.data),
            }
        }
    });
    let sink = futures::sink::unfold(
        (http, post_url),
        |(http, url), msg: rmcp::service::TxJsonRpcMessage<rmcp::RoleClient>| async move {
            let r = http
                .post(&url)
                .header("authorization", format!("Bearer {TOKEN}"))
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&msg).map_err(std::io::Error::other)?)
                .send()
                .await
                .map_err(std::io::Error::other)?;
            if r.status() != 202 {
                return Err(std::io::Error::other(format!("POST {url}: {}", r.status())));
            }
            Ok((http, url))
        },
    );
    (Box::pin(sink), tokio_stream::wrappers::UnboundedReceiverStream::new(msgs))
}

// ---- Streamable HTTP raw client ---------------------------------------------------------

pub struct Streamable {
    pub url: String,
    pub sid: String,
    http: reqwest::Client,
}

impl Streamable {
    /// POST initialize (JSON answer), keep the session id, send `initialized`.
    pub async fn open(mb: &Mcpbox, server: &str) -> Streamable {
        let url = mb.url(&format!("/{server}/mcp"));
        let r = mb
            .http
            .post(&url)
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .body(init_msg(json!(0)).to_string())
            .send()
            .await
            .unwrap();
        let sid = r.headers().get("mcp-session-id").map(|v| v.to_str().unwrap().to_string());
        let r = Resp::read(r).await;
        assert_eq!(r.status, 200, "initialize: {}", r.body);
        let answer = if r.header("content-type").is_some_and(|c| c.starts_with("text/event-stream")) {
            // The answer is the last message: notifications may come before it.
            let data =
                r.body.lines().filter_map(|l| l.strip_prefix("data: ")).next_back().expect("an event").to_string();
            serde_json::from_str::<Value>(&data).unwrap()
        } else {
            r.json()
        };
        assert!(answer["result"]["serverInfo"].is_object(), "initialize: {answer}");
        let s = Streamable { url, sid: sid.expect("Mcp-Session-Id on the initialize answer"), http: mb.http.clone() };
        let r = s.post_raw(&initialized_msg().to_string(), &[]).await;
        assert_eq!(r.status, 202, "initialized: {}", r.body);
        s
    }

    fn builder(&self, method: reqwest::Method) -> reqwest::RequestBuilder {
        self.http
            .request(method, &self.url)
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("mcp-session-id", &self.sid)
            .header("mcp-protocol-version", "2025-06-18")
    }

    pub async fn post_raw(&self, body: &str, headers: &[(&str, &str)]) -> Resp {
        let mut rb = self
            .builder(reqwest::Method::POST)
            .header("content-type", "application/json")
            .header("accept", "application/json");
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        Resp::read(rb.body(body.to_string()).send().await.unwrap()).await
    }

    /// A request answered as JSON.
    pub async fn request(&self, msg: Value) -> Value {
        let r = self.post_raw(&msg.to_string(), &[]).await;
        assert_eq!(r.status, 200, "POST {msg}: {}", r.body);
        r.json()
    }

    /// A request answered as an SSE stream: every message on it, the answer last.
    pub async fn request_sse(&self, msg: Value) -> mpsc::UnboundedReceiver<Value> {
        let r = self
            .builder(reqwest::Method::POST)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(msg.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "POST {msg}");
        json_events(r)
    }

    /// The session's GET stream: every message on it.
    pub async fn get_stream(&self) -> mpsc::UnboundedReceiver<Value> {
        let r = self.builder(reqwest::Method::GET).header("accept", "text/event-stream").send().await.unwrap();
        assert_eq!(r.status(), 200, "GET stream");
        json_events(r)
    }

    pub async fn delete(&self) -> u16 {
        self.builder(reqwest::Method::DELETE).send().await.unwrap().status().as_u16()
    }
}

/// Everything a channel holds now or receives within `wait`.
pub async fn collect_for(rx: &mut mpsc::UnboundedReceiver<Value>, wait: Duration) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut out = Vec::new();
    while let Ok(Some(v)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        out.push(v);
    }
    out
}

pub fn is_progress(v: &Value) -> bool {
    v.get("method").and_then(Value::as_str) == Some("notifications/progress")
}

// ---- /proc: the scanner of tests/common -------------------------------------------------

pub use crate::common::{alive, all_procs, descendants, Proc};

pub fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

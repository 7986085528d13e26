//! mcpbench: measures one MCP endpoint (a stdio process, or an HTTP bridge over Streamable
//! HTTP or legacy SSE) with a trivial echo tool behind it, and prints one JSON line:
//! cold start (launch → first initialize answer), tools/call round trip p50/p99 over
//! sequential calls, calls/s with concurrent sessions, the bridge's idle RSS and its own CPU
//! time per call (sequential / concurrent; less at the mercy of a busy machine than calls/s),
//! session start latency, and this generator's own CPU use (so one can see it is not the
//! bottleneck).
//!
//! `--transport stateless` speaks MCP 2026-07-28 on a Streamable HTTP endpoint: no initialize,
//! no session; every request carries `MCP-Protocol-Version`, `Mcp-Method` (and `Mcp-Name`)
//! headers and its version and capabilities in `params._meta`. A "session" there is one
//! keep-alive connection, opened with `server/discover` (the cold start is launch → first
//! discover answer). `--token` may be repeated: concurrent session k uses token k mod n, so
//! with n tokens the bridge sees n principals.
//!
//! ```text
//! mcpbench --transport stdio|streamable|sse|stateless [--url URL] [--token T]… [--accept both|json]
//!          [--calls 2000] [--sessions 16] [--per-session 300] [--session-starts 50]
//!          [--label NAME] -- COMMAND ARGS…
//! ```
//! With `stdio`, COMMAND is the MCP server itself (the floor: no bridge). Otherwise COMMAND
//! is the bridge; it is launched by mcpbench (cold start), measured, then sent SIGTERM.
//! The HTTP client is hand-written HTTP/1.1 over keep-alive connections: no framework cost.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Mutex};

type Res<T> = Result<T, String>;

#[derive(Clone)]
struct Opts {
    transport: String,
    url: String,
    tokens: Vec<String>,
    accept: String,
    calls: usize,
    sessions: usize,
    per_session: usize,
    session_starts: usize,
    session_gap_ms: u64,
    label: String,
    cmd: Vec<String>,
}

fn parse_args() -> Opts {
    let mut o = Opts {
        transport: "stdio".into(),
        url: String::new(),
        tokens: Vec::new(),
        accept: "both".into(),
        calls: 2000,
        sessions: 16,
        per_session: 300,
        session_starts: 0,
        session_gap_ms: 20,
        label: String::new(),
        cmd: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--transport" => o.transport = val(),
            "--url" => o.url = val(),
            "--token" => o.tokens.push(val()),
            "--accept" => o.accept = val(),
            "--calls" => o.calls = val().parse().unwrap(),
            "--sessions" => o.sessions = val().parse().unwrap(),
            "--per-session" => o.per_session = val().parse().unwrap(),
            "--session-starts" => o.session_starts = val().parse().unwrap(),
            "--session-gap-ms" => o.session_gap_ms = val().parse().unwrap(),
            "--label" => o.label = val(),
            "--" => {
                o.cmd = it.collect();
                break;
            }
            _ => panic!("unknown argument {a}"),
        }
    }
    assert!(!o.cmd.is_empty(), "a command after --");
    o
}

// ---- JSON-RPC messages ------------------------------------------------------------------------

fn init_msg(id: u64) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "initialize", "params": {
        "protocolVersion": "2025-03-26", "capabilities": {}, "clientInfo": {"name": "mcpbench", "version": "0"}}})
}
fn initialized() -> Value {
    json!({"jsonrpc": "2.0", "method": "notifications/initialized"})
}
fn echo(id: u64, text: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": text}}})
}
/// The same message as a 2026-07-28 request: version and capabilities in `params._meta`.
fn stateless(mut msg: Value) -> Value {
    msg["params"]["_meta"] = json!({
        "io.modelcontextprotocol/protocolVersion": STATELESS_VERSION,
        "io.modelcontextprotocol/clientCapabilities": {},
    });
    msg
}
const STATELESS_VERSION: &str = "2026-07-28";

fn check_echo(v: &Value, id: u64, text: &str) -> Res<()> {
    if v["id"] != id {
        return Err(format!("answer for id {} where {id} was expected: {v}", v["id"]));
    }
    let got = v["result"]["content"][0]["text"].as_str();
    if got != Some(text) {
        return Err(format!("wrong answer: expected {text:?}, got {v}"));
    }
    Ok(())
}

// ---- a minimal HTTP/1.1 client ----------------------------------------------------------------

struct Url {
    host: String,
    path: String,
}

fn parse_url(u: &str) -> Url {
    let rest = u.strip_prefix("http://").expect("http:// URL");
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    Url { host: host.to_string(), path }
}

struct Http {
    host: String,
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, k: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(k)).map(|(_, v)| v.as_str())
    }
}

impl Http {
    async fn connect(host: &str) -> Res<Http> {
        let s = TcpStream::connect(host).await.map_err(|e| format!("connect {host}: {e}"))?;
        s.set_nodelay(true).ok();
        let (r, w) = s.into_split();
        Ok(Http { host: host.to_string(), r: BufReader::with_capacity(64 * 1024, r), w })
    }

    async fn send(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Res<()> {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n", self.host, body.len());
        for (k, v) in headers {
            req.push_str(k);
            req.push_str(": ");
            req.push_str(v);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        let mut buf = req.into_bytes();
        buf.extend_from_slice(body);
        self.w.write_all(&buf).await.map_err(|e| e.to_string())
    }

    async fn head(&mut self) -> Res<(u16, Vec<(String, String)>)> {
        let mut line = String::new();
        if self.r.read_line(&mut line).await.map_err(|e| e.to_string())? == 0 {
            return Err("connection closed".into());
        }
        let status =
            line.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| format!("bad status line {line:?}"))?;
        let mut headers = Vec::new();
        loop {
            line.clear();
            self.r.read_line(&mut line).await.map_err(|e| e.to_string())?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        Ok((status, headers))
    }

    /// One chunk of a chunked body (`None` at the end).
    async fn chunk(&mut self) -> Res<Option<Vec<u8>>> {
        let mut line = String::new();
        self.r.read_line(&mut line).await.map_err(|e| e.to_string())?;
        let n = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
            .map_err(|_| format!("bad chunk size {line:?}"))?;
        let mut data = vec![0; n + 2];
        self.r.read_exact(&mut data).await.map_err(|e| e.to_string())?;
        data.truncate(n);
        if n == 0 {
            return Ok(None);
        }
        Ok(Some(data))
    }

    /// A whole response (the body read to its end: length, chunked, or close).
    async fn request(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Res<Response> {
        self.send(method, path, headers, body).await?;
        let (status, headers) = self.head().await?;
        let get = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let mut body = Vec::new();
        if let Some(n) = get("content-length") {
            body.resize(n.parse().map_err(|_| "bad content-length")?, 0);
            self.r.read_exact(&mut body).await.map_err(|e| e.to_string())?;
        } else if get("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
            while let Some(c) = self.chunk().await? {
                body.extend_from_slice(&c);
            }
        } else if status != 204 && status != 304 {
            self.r.read_to_end(&mut body).await.map_err(|e| e.to_string())?;
        }
        Ok(Response { status, headers, body })
    }
}

/// `data:` payloads of the SSE events in `text` (event type, data).
fn sse_events(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for block in text.replace("\r\n", "\n").split("\n\n") {
        let (mut ev, mut data) = (String::from("message"), String::new());
        for l in block.lines() {
            if let Some(v) = l.strip_prefix("event:") {
                ev = v.trim().to_string();
            } else if let Some(v) = l.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        if !data.is_empty() {
            out.push((ev, data));
        }
    }
    out
}

// ---- sessions ---------------------------------------------------------------------------------

enum Session {
    Stdio {
        child: tokio::process::Child,
        stdin: tokio::process::ChildStdin,
        stdout: BufReader<tokio::process::ChildStdout>,
    },
    Streamable {
        http: Http,
        path: String,
        sid: Option<String>,
        auth: Option<String>,
        accept: String,
    },
    Stateless {
        http: Http,
        path: String,
        auth: Option<String>,
        accept: String,
    },
    Sse {
        http: Http,
        post_path: String,
        auth: Option<String>,
        rx: mpsc::UnboundedReceiver<Value>,
        reader: tokio::task::JoinHandle<()>,
    },
}

impl Session {
    /// Session `k` (its token is the k-th mod the number given).
    async fn open(o: &Opts, k: usize) -> Res<Session> {
        let auth = (!o.tokens.is_empty()).then(|| format!("Bearer {}", o.tokens[k % o.tokens.len()]));
        let mut s = match o.transport.as_str() {
            "stdio" => {
                let mut child = tokio::process::Command::new(&o.cmd[0])
                    .args(&o.cmd[1..])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .kill_on_drop(true)
                    .spawn()
                    .map_err(|e| format!("spawn {}: {e}", o.cmd[0]))?;
                let stdin = child.stdin.take().unwrap();
                let stdout = BufReader::new(child.stdout.take().unwrap());
                Session::Stdio { child, stdin, stdout }
            }
            "streamable" => {
                let u = parse_url(&o.url);
                let accept =
                    if o.accept == "json" { "application/json" } else { "application/json, text/event-stream" };
                Session::Streamable {
                    http: Http::connect(&u.host).await?,
                    path: u.path,
                    sid: None,
                    auth,
                    accept: accept.into(),
                }
            }
            "stateless" => {
                let u = parse_url(&o.url);
                let accept =
                    if o.accept == "json" { "application/json" } else { "application/json, text/event-stream" };
                let mut s = Session::Stateless {
                    http: Http::connect(&u.host).await?,
                    path: u.path,
                    auth,
                    accept: accept.into(),
                };
                let r = s.call(json!({"jsonrpc": "2.0", "id": 0, "method": "server/discover", "params": {}})).await?;
                if !r["result"]["capabilities"].is_object() {
                    return Err(format!("server/discover: {r}"));
                }
                return Ok(s);
            }
            "sse" => {
                let u = parse_url(&o.url);
                let mut get = Http::connect(&u.host).await?;
                let mut h = vec![("Accept", "text/event-stream")];
                if let Some(a) = &auth {
                    h.push(("Authorization", a));
                }
                get.send("GET", &u.path, &h, b"").await?;
                let (status, headers) = get.head().await?;
                if status != 200 {
                    return Err(format!("GET {}: {status}", o.url));
                }
                let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
                let (etx, mut erx) = mpsc::unbounded_channel::<(String, String)>();
                let reader = tokio::spawn(async move {
                    let mut buf = String::new();
                    loop {
                        let data = if chunked {
                            match get.chunk().await {
                                Ok(Some(d)) => d,
                                _ => return,
                            }
                        } else {
                            let mut b = vec![0; 65536];
                            match get.r.read(&mut b).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    b.truncate(n);
                                    b
                                }
                            }
                        };
                        buf.push_str(&String::from_utf8_lossy(&data));
                        let norm = buf.replace("\r\n", "\n");
                        if let Some(end) = norm.rfind("\n\n") {
                            for e in sse_events(&norm[..end + 2]) {
                                if etx.send(e).is_err() {
                                    return;
                                }
                            }
                            buf = norm[end + 2..].to_string();
                        } else {
                            buf = norm;
                        }
                    }
                });
                let (ev, data) = tokio::time::timeout(Duration::from_secs(10), erx.recv())
                    .await
                    .map_err(|_| "no endpoint event")?
                    .ok_or("stream closed")?;
                if ev != "endpoint" {
                    return Err(format!("first event {ev}: {data}"));
                }
                let post_path = if data.starts_with("http") { parse_url(&data).path } else { data };
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(async move {
                    while let Some((ev, data)) = erx.recv().await {
                        if ev == "message" {
                            if let Ok(v) = serde_json::from_str(&data) {
                                if tx.send(v).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
                Session::Sse { http: Http::connect(&u.host).await?, post_path, auth, rx, reader }
            }
            t => return Err(format!("unknown transport {t}")),
        };
        let r = s.call(init_msg(0)).await?;
        if !r["result"]["serverInfo"].is_object() {
            return Err(format!("initialize: {r}"));
        }
        s.notify(initialized()).await?;
        Ok(s)
    }

    async fn notify(&mut self, msg: Value) -> Res<()> {
        match self {
            Session::Stdio { stdin, .. } => {
                let mut b = serde_json::to_vec(&msg).unwrap();
                b.push(b'\n');
                stdin.write_all(&b).await.map_err(|e| e.to_string())
            }
            Session::Stateless { .. } => Err("no notifications in this benchmark".into()),
            Session::Streamable { .. } | Session::Sse { .. } => {
                let r = self.post(&msg).await?;
                if r.status != 202 && r.status != 200 {
                    return Err(format!("notification: {}", r.status));
                }
                Ok(())
            }
        }
    }

    async fn post(&mut self, msg: &Value) -> Res<Response> {
        let body = serde_json::to_vec(msg).unwrap();
        match self {
            Session::Stateless { http, path, auth, accept } => {
                let body = serde_json::to_vec(&stateless(msg.clone())).unwrap();
                let method = msg["method"].as_str().unwrap_or("");
                let mut h: Vec<(&str, &str)> = vec![
                    ("Content-Type", "application/json"),
                    ("Accept", accept.as_str()),
                    ("MCP-Protocol-Version", STATELESS_VERSION),
                    ("Mcp-Method", method),
                ];
                if let Some(a) = auth {
                    h.push(("Authorization", a));
                }
                if let Some(name) = msg["params"]["name"].as_str() {
                    h.push(("Mcp-Name", name));
                }
                http.request("POST", path, &h, &body).await
            }
            Session::Streamable { http, path, sid, auth, accept } => {
                let mut h: Vec<(&str, &str)> = vec![("Content-Type", "application/json"), ("Accept", accept.as_str())];
                if let Some(a) = auth {
                    h.push(("Authorization", a));
                }
                if let Some(s) = sid {
                    h.push(("Mcp-Session-Id", s));
                    h.push(("MCP-Protocol-Version", "2025-03-26"));
                }
                let r = http.request("POST", path, &h, &body).await?;
                if let Some(s) = r.header("mcp-session-id") {
                    *sid = Some(s.to_string());
                }
                Ok(r)
            }
            Session::Sse { http, post_path, auth, .. } => {
                let mut h: Vec<(&str, &str)> = vec![("Content-Type", "application/json")];
                if let Some(a) = auth {
                    h.push(("Authorization", a));
                }
                http.request("POST", post_path, &h, &body).await
            }
            Session::Stdio { .. } => unreachable!(),
        }
    }

    /// Send a request, return its answer (skipping notifications).
    async fn call(&mut self, msg: Value) -> Res<Value> {
        let id = msg["id"].clone();
        match self {
            Session::Stdio { stdin, stdout, .. } => {
                let mut b = serde_json::to_vec(&msg).unwrap();
                b.push(b'\n');
                stdin.write_all(&b).await.map_err(|e| e.to_string())?;
                let mut line = String::new();
                loop {
                    line.clear();
                    if stdout.read_line(&mut line).await.map_err(|e| e.to_string())? == 0 {
                        return Err("server closed stdout".into());
                    }
                    let v: Value = serde_json::from_str(&line).map_err(|e| e.to_string())?;
                    if v.get("method").is_none() && v["id"] == id {
                        return Ok(v);
                    }
                }
            }
            Session::Streamable { .. } | Session::Stateless { .. } => {
                let r = self.post(&msg).await?;
                if r.status != 200 {
                    return Err(format!("POST: HTTP {} {}", r.status, String::from_utf8_lossy(&r.body)));
                }
                if r.header("content-type").is_some_and(|c| c.starts_with("text/event-stream")) {
                    for (_, data) in sse_events(&String::from_utf8_lossy(&r.body)) {
                        let v: Value = serde_json::from_str(&data).map_err(|e| e.to_string())?;
                        if v.get("method").is_none() && v["id"] == id {
                            return Ok(v);
                        }
                    }
                    Err(format!("no answer in the SSE body: {}", String::from_utf8_lossy(&r.body)))
                } else {
                    serde_json::from_slice(&r.body).map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&r.body)))
                }
            }
            Session::Sse { .. } => {
                let r = self.post(&msg).await?;
                if r.status != 202 && r.status != 200 {
                    return Err(format!("POST: HTTP {}", r.status));
                }
                let Session::Sse { rx, .. } = self else { unreachable!() };
                loop {
                    let v = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                        .await
                        .map_err(|_| "no answer within 10 s")?
                        .ok_or("SSE stream closed")?;
                    if v.get("method").is_none() && v["id"] == id {
                        return Ok(v);
                    }
                }
            }
        }
    }

    async fn close(self) {
        match self {
            Session::Stdio { mut child, stdin, .. } => {
                drop(stdin);
                let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
            }
            Session::Streamable { mut http, path, sid: Some(sid), auth, .. } => {
                let mut h = vec![("Mcp-Session-Id", sid.as_str())];
                if let Some(a) = &auth {
                    h.push(("Authorization", a));
                }
                let _ = http.request("DELETE", &path, &h, b"").await;
            }
            Session::Streamable { .. } | Session::Stateless { .. } => {}
            Session::Sse { reader, .. } => reader.abort(),
        }
    }
}

// ---- measurements -----------------------------------------------------------------------------

fn cpu_seconds() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU time the bridge process (every thread of it, not its children) has had, in ns: the sum
/// of its threads' `schedstat` run times (ns resolution, where `stat` has clock ticks).
fn bridge_cpu_ns(pid: Option<u32>) -> Option<u64> {
    let mut sum = 0;
    for t in std::fs::read_dir(format!("/proc/{}/task", pid?)).ok()?.flatten() {
        let s = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
        sum += s.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(sum)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn cold_start(o: &Opts) -> Res<(Option<tokio::process::Child>, f64, Session)> {
    let t = Instant::now();
    if o.transport == "stdio" {
        let s = Session::open(o, 0).await?;
        return Ok((None, t.elapsed().as_secs_f64() * 1e3, s));
    }
    let child = tokio::process::Command::new(&o.cmd[0])
        .args(&o.cmd[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", o.cmd[0]))?;
    let host = parse_url(&o.url).host;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if TcpStream::connect(&host).await.is_ok() {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("{host} not listening after 30 s"));
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let s = Session::open(o, 0).await?;
    Ok((Some(child), t.elapsed().as_secs_f64() * 1e3, s))
}

async fn run(o: Opts) -> Res<Value> {
    let mut out = serde_json::Map::new();
    out.insert("label".into(), json!(o.label));
    let (child, cold_ms, mut s) = cold_start(&o).await?;
    out.insert("cold_start_ms".into(), json!(cold_ms));

    // Sequential round trips (after a short warm-up).
    for i in 0..(if o.calls > 0 { 50u64 } else { 0 }) {
        let r = s.call(echo(i + 1, "warm")).await?;
        check_echo(&r, i + 1, "warm")?;
    }
    let pid = child.as_ref().and_then(|c| c.id());
    let (cpu0, bridge0) = (cpu_seconds(), bridge_cpu_ns(pid));
    let mut lat = Vec::with_capacity(o.calls);
    let t0 = Instant::now();
    for i in 0..o.calls as u64 {
        let text = format!("seq-{i}");
        let t = Instant::now();
        let r = s.call(echo(1000 + i, &text)).await?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        check_echo(&r, 1000 + i, &text)?;
    }
    let seq_wall = t0.elapsed().as_secs_f64();
    out.insert("seq_gen_cpu_pct".into(), json!(100.0 * (cpu_seconds() - cpu0) / seq_wall));
    if let (Some(a), Some(b), true) = (bridge0, bridge_cpu_ns(pid), o.calls > 0) {
        out.insert("seq_bridge_cpu_us_per_call".into(), json!(b.saturating_sub(a) as f64 / 1e3 / o.calls as f64));
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if !lat.is_empty() {
        out.insert("p50_us".into(), json!(pct(&lat, 0.5)));
        out.insert("p99_us".into(), json!(pct(&lat, 0.99)));
    }

    // Idle RSS of the bridge (the launched process itself, not its children).
    if let Some(c) = &child {
        tokio::time::sleep(Duration::from_millis(500)).await;
        out.insert("idle_rss_kib".into(), json!(c.id().and_then(rss_kib)));
    }

    // Throughput: concurrent sessions, each with its own ids 1..n (clashing on purpose).
    let mut sessions = Vec::new();
    for k in 0..o.sessions {
        sessions.push(Session::open(&o, k).await?);
    }
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let (cpu0, bridge0) = (cpu_seconds(), bridge_cpu_ns(pid));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (k, mut sess) in sessions.into_iter().enumerate() {
        let (n, errors) = (o.per_session, errors.clone());
        tasks.push(tokio::spawn(async move {
            for i in 1..=n as u64 {
                let text = format!("s{k}-{i}");
                match sess.call(echo(i, &text)).await {
                    Ok(r) => {
                        if let Err(e) = check_echo(&r, i, &text) {
                            errors.lock().await.push(format!("session {k}: {e}"));
                            break;
                        }
                    }
                    Err(e) => {
                        errors.lock().await.push(format!("session {k}: {e}"));
                        break;
                    }
                }
            }
            sess
        }));
    }
    let mut done = Vec::new();
    for t in tasks {
        done.push(t.await.map_err(|e| e.to_string())?);
    }
    let wall = t0.elapsed().as_secs_f64();
    let errs = errors.lock().await.clone();
    if o.sessions == 0 {
    } else if errs.is_empty() {
        out.insert("calls_per_s".into(), json!((o.sessions * o.per_session) as f64 / wall));
    } else {
        out.insert("calls_per_s".into(), Value::Null);
        out.insert("errors".into(), json!(errs.iter().take(3).collect::<Vec<_>>()));
    }
    if o.sessions > 0 {
        out.insert("tput_gen_cpu_pct".into(), json!(100.0 * (cpu_seconds() - cpu0) / wall));
        if let (Some(a), Some(b), true) = (bridge0, bridge_cpu_ns(pid), errs.is_empty()) {
            let calls = (o.sessions * o.per_session) as f64;
            out.insert("tput_bridge_cpu_us_per_call".into(), json!(b.saturating_sub(a) as f64 / 1e3 / calls));
        }
    }
    for sess in done {
        sess.close().await;
    }

    // Session start: a new session's first initialize answer.
    if o.session_starts > 0 {
        let mut st = Vec::new();
        for _ in 0..o.session_starts {
            let t = Instant::now();
            let sess = Session::open(&o, 0).await?;
            st.push(t.elapsed().as_secs_f64() * 1e3);
            sess.close().await;
            tokio::time::sleep(Duration::from_millis(o.session_gap_ms)).await;
        }
        st.sort_by(|a, b| a.partial_cmp(b).unwrap());
        out.insert("session_start_p50_ms".into(), json!(pct(&st, 0.5)));
        out.insert("session_start_p99_ms".into(), json!(pct(&st, 0.99)));
    }

    s.close().await;
    if let Some(mut c) = child {
        if let Some(pid) = c.id() {
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        if tokio::time::timeout(Duration::from_secs(10), c.wait()).await.is_err() {
            let _ = c.kill().await;
        }
    }
    Ok(Value::Object(out))
}

fn main() {
    let o = parse_args();
    // Two worker threads: the generator must stay light on a small machine.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let label = o.label.clone();
    match rt.block_on(run(o)) {
        Ok(v) => println!("{v}"),
        Err(e) => {
            println!("{}", json!({"label": label, "error": e}));
            std::process::exit(1);
        }
    }
}

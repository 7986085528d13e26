//! HTTP-level tests: a real TCP listener, a hand-written HTTP/1.1 client, and the Python echo
//! server of tests/fixtures started (unconfined, tests only) by `DirectLauncher`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::supervisor::{DirectLauncher, Options, Supervisor};

pub(super) const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/echo_mcp.py");

pub(super) struct Srv {
    pub(super) addr: SocketAddr,
    pub(super) sup: Arc<Supervisor>,
}

async fn start(extra: &str) -> Srv {
    start_text(format!(
        r#"{{"mcpProxy":{{"addr":"127.0.0.1:9090","options":{{"authTokens":["T"]}}}},
            "mcpbox":{{"maxBodyBytes":4096,"maxLineBytes":2048}},
            "mcpServers":{{
              "echo":{{"command":"/usr/bin/python3","args":["{FIXTURE}"],"maxSessions":3,
                       "options":{{"toolFilter":{{"mode":"block","list":["secret"]}}}}}},
              "shared":{{"command":"/usr/bin/python3","args":["{FIXTURE}"],"isolation":"shared",
                       "options":{{"authTokens":["S"]}}}} {extra} }}}}"#
    ))
    .await
}

pub(super) async fn start_text(text: String) -> Srv {
    let cfg = crate::config::parse(&text, Path::new("t.json"), Path::new("/"), &|_| None).unwrap();
    let cfg = Arc::new(cfg);
    let sup = Supervisor::start(&cfg, Arc::new(DirectLauncher), Options::from_config(&cfg, Duration::from_secs(1)));
    let app = super::router(sup.clone(), cfg);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Srv { addr, sup }
}

pub(super) struct Resp {
    pub(super) status: u16,
    headers: Vec<(String, String)>,
    pub(super) body: String,
}

impl Resp {
    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub(super) fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {:?}", self.body))
    }
}

/// An open response whose body is read incrementally (chunked or not).
pub(super) struct Conn {
    r: BufReader<TcpStream>,
    pub(super) status: u16,
    headers: Vec<(String, String)>,
    chunked: bool,
    left_in_chunk: usize,
    pending: String,
}

pub(super) async fn send(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Conn {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\nContent-Length: {}\r\n",
        addr.port(),
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    let status = line.split(' ').nth(1).unwrap_or("0").parse().unwrap();
    let mut hs = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).await.unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').unwrap();
        hs.push((k.trim().to_string(), v.trim().to_string()));
    }
    let chunked = hs.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    Conn { r, status, headers: hs, chunked, left_in_chunk: 0, pending: String::new() }
}

impl Conn {
    /// More body bytes; None at the end.
    async fn more(&mut self) -> Option<String> {
        if !self.chunked {
            let mut buf = vec![0; 8192];
            let n = self.r.read(&mut buf).await.ok()?;
            return (n > 0).then(|| String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        if self.left_in_chunk == 0 {
            let mut line = String::new();
            self.r.read_line(&mut line).await.ok()?;
            if line.trim().is_empty() {
                line.clear();
                self.r.read_line(&mut line).await.ok()?;
            }
            self.left_in_chunk = usize::from_str_radix(line.trim(), 16).ok()?;
            if self.left_in_chunk == 0 {
                return None;
            }
        }
        let mut buf = vec![0; self.left_in_chunk];
        let n = self.r.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        self.left_in_chunk -= n;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    async fn all(mut self) -> Resp {
        let mut body = std::mem::take(&mut self.pending);
        while let Some(s) = self.more().await {
            body.push_str(&s);
        }
        Resp { status: self.status, headers: self.headers, body }
    }

    /// Next SSE event (skipping comments): (event, data, id).
    pub(super) async fn event(&mut self) -> Option<(String, String, String)> {
        loop {
            if let Some(i) = self.pending.find("\n\n") {
                let block: String = self.pending.drain(..i + 2).collect();
                let (mut ev, mut data, mut id) = ("message".to_string(), String::new(), String::new());
                for l in block.lines() {
                    if let Some(v) = l.strip_prefix("event:") {
                        ev = v.trim().into();
                    } else if let Some(v) = l.strip_prefix("data:") {
                        data.push_str(v.strip_prefix(' ').unwrap_or(v));
                    } else if let Some(v) = l.strip_prefix("id:") {
                        id = v.trim().into();
                    }
                }
                if data.is_empty() && block.lines().all(|l| l.starts_with(':') || l.is_empty()) {
                    continue;
                }
                return Some((ev, data, id));
            }
            let more = tokio::time::timeout(Duration::from_secs(10), self.more()).await.ok()??;
            self.pending.push_str(&more);
        }
    }
}

pub(super) async fn call(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
    send(addr, method, path, headers, body).await.all().await
}

const AUTH: (&str, &str) = ("Authorization", "Bearer T");
const JSON: (&str, &str) = ("Accept", "application/json");

fn init_body(id: Value) -> String {
    json!({"jsonrpc":"2.0","id":id,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"0"}}}).to_string()
}

fn tool_call(id: Value, name: &str, args: Value) -> String {
    json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":name,"arguments":args}}).to_string()
}

/// initialize a Streamable session on `server`; returns its id.
async fn st_init(addr: SocketAddr, server: &str, auth: (&str, &str)) -> String {
    let r = call(addr, "POST", &format!("/{server}/mcp"), &[auth, JSON], &init_body(json!(0))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["result"]["serverInfo"]["name"], "echo");
    let sid = r.header("mcp-session-id").expect("session id").to_string();
    let n = json!({"jsonrpc":"2.0","method":"notifications/initialized"}).to_string();
    let r = call(addr, "POST", &format!("/{server}/mcp"), &[auth, JSON, ("Mcp-Session-Id", &sid)], &n).await;
    assert_eq!(r.status, 202);
    sid
}

#[tokio::test]
async fn streamable_roundtrip_filter_and_bad_input() {
    let s = start("").await;
    let a = s.addr;
    let sid = st_init(a, "echo", AUTH).await;
    let h = [AUTH, JSON, ("Mcp-Session-Id", sid.as_str()), ("MCP-Protocol-Version", "2025-06-18")];
    let r = call(a, "POST", "/echo/mcp", &h, &json!({"jsonrpc":"2.0","id":1,"method":"tools/list"}).to_string()).await;
    let names: Vec<String> = r.json()["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    assert!(names.contains(&"echo".to_string()) && !names.contains(&"secret".to_string()), "{names:?}");
    let r = call(a, "POST", "/echo/mcp", &h, &tool_call(json!(2), "secret", json!({}))).await;
    assert_eq!(r.json()["error"]["code"], -32602);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("secret"));
    // malformed JSON, then non-JSON-RPC: clear errors, session still usable
    let r = call(a, "POST", "/echo/mcp", &h, "{not json").await;
    assert_eq!((r.status, r.json()["error"]["code"].clone()), (400, json!(-32700)));
    let r = call(a, "POST", "/echo/mcp", &h, r#"{"hello":"world"}"#).await;
    assert_eq!((r.status, r.json()["error"]["code"].clone()), (400, json!(-32600)));
    let r = call(a, "POST", "/echo/mcp", &h, r#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#).await;
    assert_eq!(r.status, 400);
    let r = call(a, "POST", "/echo/mcp", &h, &tool_call(json!("s-3"), "echo", json!({"text":"hi"}))).await;
    assert_eq!(r.json()["id"], "s-3");
    assert_eq!(r.json()["result"]["content"][0]["text"], "hi");
    // oversized body
    let big = tool_call(json!(4), "echo", json!({"text": "x".repeat(5000)}));
    assert_eq!(call(a, "POST", "/echo/mcp", &h, &big).await.status, 413);
    // an over-long line from the server is dropped; the server keeps working
    let r = call(a, "POST", "/echo/mcp", &h, &tool_call(json!(5), "big", json!({"n": 3000, "text": "after"}))).await;
    assert_eq!(r.json()["result"]["content"][0]["text"], "after");
    // header rules
    let ping = json!({"jsonrpc":"2.0","id":9,"method":"ping"}).to_string();
    assert_eq!(call(a, "POST", "/echo/mcp", &[AUTH, JSON], &ping).await.status, 400);
    assert_eq!(call(a, "POST", "/echo/mcp", &[AUTH, JSON, ("Mcp-Session-Id", "nope")], &ping).await.status, 404);
    assert_eq!(
        call(
            a,
            "POST",
            "/echo/mcp",
            &[AUTH, JSON, ("Mcp-Session-Id", &sid), ("MCP-Protocol-Version", "1999-01-01")],
            &ping
        )
        .await
        .status,
        400
    );
    assert_eq!(call(a, "POST", "/nope/mcp", &[AUTH, JSON], &ping).await.status, 404);
    // DELETE ends the session
    assert_eq!(call(a, "DELETE", "/echo/mcp", &h, "").await.status, 204);
    assert_eq!(call(a, "POST", "/echo/mcp", &h, &ping).await.status, 404);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.sup.server("echo").unwrap().active_sessions(), 0);
}

/// A JSON-mode answer counts in the session's budget (`sessionBufferBytes`): one larger than
/// what is left gets a JSON-RPC error naming the budget, and the session goes on; answers that
/// fit arrive whole, with their length.
#[tokio::test]
async fn a_json_answer_over_the_session_budget_gets_an_error_and_the_session_goes_on() {
    let s = start_text(format!(
        r#"{{"mcpProxy":{{"addr":"127.0.0.1:9090","options":{{"authTokens":["T"]}}}},
            "mcpbox":{{"maxBodyBytes":200000,"maxLineBytes":200000,"sessionBufferBytes":60000}},
            "mcpServers":{{"echo":{{"command":"/usr/bin/python3","args":["{FIXTURE}"]}}}}}}"#
    ))
    .await;
    let a = s.addr;
    let sid = st_init(a, "echo", AUTH).await;
    let h = [AUTH, JSON, ("Mcp-Session-Id", sid.as_str())];
    let r = call(a, "POST", "/echo/mcp", &h, &tool_call(json!(1), "echo", json!({"text": "x".repeat(70000)}))).await;
    assert_eq!(r.status, 200);
    let e = r.json();
    assert_eq!((e["id"].clone(), e["error"]["code"].clone()), (json!(1), json!(-32603)), "{e}");
    let m = e["error"]["message"].as_str().unwrap();
    assert!(m.contains("does not fit") && m.contains("mcpbox.sessionBufferBytes, 60000 bytes"), "{m}");
    for (id, n) in [(2, 100), (3, 50000)] {
        let r = call(a, "POST", "/echo/mcp", &h, &tool_call(json!(id), "echo", json!({"text": "y".repeat(n)}))).await;
        assert_eq!(r.header("content-length"), Some(r.body.len().to_string().as_str()));
        assert_eq!(r.json()["id"], id);
        assert_eq!(r.json()["result"]["content"][0]["text"].as_str().map(str::len), Some(n));
    }
}

#[tokio::test]
async fn legacy_sse_roundtrip() {
    let s = start("").await;
    let a = s.addr;
    let mut c = send(a, "GET", "/echo/sse", &[AUTH], "").await;
    assert_eq!(c.status, 200);
    let (ev, endpoint, _) = c.event().await.unwrap();
    assert_eq!(ev, "endpoint");
    assert!(endpoint.starts_with("/echo/message?sessionId="), "{endpoint}");
    let r = call(a, "POST", &endpoint, &[AUTH], &init_body(json!(1))).await;
    assert_eq!(r.status, 202);
    let (ev, data, _) = c.event().await.unwrap();
    assert_eq!(ev, "message");
    assert_eq!(serde_json::from_str::<Value>(&data).unwrap()["id"], 1);
    // malformed → 400, session still fine
    assert_eq!(call(a, "POST", &endpoint, &[AUTH], "{{{").await.status, 400);
    assert_eq!(
        call(a, "POST", &endpoint, &[AUTH], &tool_call(json!(2), "echo", json!({"text":"yo"}))).await.status,
        202
    );
    let (_, data, _) = c.event().await.unwrap();
    assert_eq!(serde_json::from_str::<Value>(&data).unwrap()["result"]["content"][0]["text"], "yo");
    assert_eq!(call(a, "POST", "/echo/message?sessionId=nope", &[AUTH], "{}").await.status, 404);
    assert_eq!(call(a, "POST", &endpoint, &[("Authorization", "Bearer wrong")], "{}").await.status, 401);
    // disconnect ends the session (and its process)
    drop(c);
    for _ in 0..50 {
        if s.sup.server("echo").unwrap().active_sessions() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(s.sup.server("echo").unwrap().active_sessions(), 0);
    assert_eq!(call(a, "POST", &endpoint, &[AUTH], "{}").await.status, 404);
}

#[tokio::test]
async fn auth_host_origin_health() {
    let s = start("").await;
    let a = s.addr;
    for (m, p) in [
        ("GET", "/echo/sse"),
        ("POST", "/echo/message?sessionId=x"),
        ("POST", "/echo/mcp"),
        ("GET", "/status"),
        ("GET", "/metrics"),
    ] {
        let r = call(a, m, p, &[], "").await;
        assert_eq!(r.status, 401, "{m} {p}");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    }
    // per-server tokens replace the global ones; a bare token works
    assert_eq!(call(a, "POST", "/shared/mcp", &[AUTH, JSON], &init_body(json!(0))).await.status, 401);
    let sid = st_init(a, "shared", ("Authorization", "S")).await;
    assert!(!sid.is_empty());
    assert_eq!(call(a, "GET", "/healthz", &[], "").await.body, "ok");
    assert_eq!(call(a, "GET", "/readyz", &[], "").await.status, 200);
    let r = call(a, "GET", "/status", &[AUTH], "").await;
    assert_eq!(r.json()["servers"]["shared"]["isolation"], "shared");
    let r = call(a, "GET", "/metrics", &[AUTH], "").await;
    assert!(r.body.contains("mcpbox_sessions_active{server=\"shared\"} 1"), "{}", r.body);
    assert!(r.body.contains("mcpbox_confinement_level{server=\"shared\",level=\"none\"} 1"), "{}", r.body);
    let r = call(a, "GET", "/status", &[AUTH, ("Origin", "https://evil.example")], "").await;
    assert_eq!(r.status, 403);
    assert_eq!(call(a, "GET", "/status", &[AUTH, ("Origin", "http://localhost:5173")], "").await.status, 200);
    // wrong Host (DNS rebinding)
    let mut tcp = TcpStream::connect(a).await.unwrap();
    tcp.write_all(
        b"GET /status HTTP/1.1\r\nHost: rebind.evil.example\r\nAuthorization: T\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
}

#[tokio::test]
async fn shared_mode_clashing_ids_and_progress() {
    let s = start("").await;
    let a = s.addr;
    let auth = ("Authorization", "Bearer S");
    let (s1, s2) = (st_init(a, "shared", auth).await, st_init(a, "shared", auth).await);
    assert_ne!(s1, s2);
    // both sessions use id 7 at the same time; the slow one answers last
    let h1 = [auth, JSON, ("Mcp-Session-Id", s1.as_str())];
    let h2 = [auth, JSON, ("Mcp-Session-Id", s2.as_str())];
    let b1 = tool_call(json!(7), "slow", json!({"ms": 300, "text": "one"}));
    let b2 = tool_call(json!(7), "echo", json!({"text": "two"}));
    let (r1, r2) = tokio::join!(call(a, "POST", "/shared/mcp", &h1, &b1), call(a, "POST", "/shared/mcp", &h2, &b2));
    assert_eq!(r1.json()["result"]["content"][0]["text"], "one");
    assert_eq!(r2.json()["result"]["content"][0]["text"], "two");
    assert_eq!((r1.json()["id"].clone(), r2.json()["id"].clone()), (json!(7), json!(7)));
    // progress arrives on the calling POST's SSE stream, with the client's own token
    let body = json!({"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"echo","arguments":{"text":"p"},"_meta":{"progressToken":"tok"}}}).to_string();
    let mut c = send(
        a,
        "POST",
        "/shared/mcp",
        &[auth, ("Accept", "application/json, text/event-stream"), ("Mcp-Session-Id", &s2)],
        &body,
    )
    .await;
    let (_, d, _) = c.event().await.unwrap();
    let d: Value = serde_json::from_str(&d).unwrap();
    assert_eq!(
        (d["method"].clone(), d["params"]["progressToken"].clone()),
        (json!("notifications/progress"), json!("tok"))
    );
    let (_, d, _) = c.event().await.unwrap();
    assert_eq!(serde_json::from_str::<Value>(&d).unwrap()["id"], 8);
    assert!(c.event().await.is_none(), "the POST stream ends after the response");
    // list_changed goes to every session's GET stream, with resumable ids
    let gh1 = [auth, ("Accept", "text/event-stream"), ("Mcp-Session-Id", s1.as_str())];
    let mut g1 = send(a, "GET", "/shared/mcp", &gh1, "").await;
    assert_eq!(g1.status, 200);
    assert_eq!(send(a, "GET", "/shared/mcp", &gh1, "").await.status, 409);
    call(a, "POST", "/shared/mcp", &h2, &tool_call(json!(9), "notify", json!({}))).await;
    let (_, d, id) = g1.event().await.unwrap();
    assert!(d.contains("list_changed") && id == "0-1", "{d} {id}");
    drop(g1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut g1 = send(a, "GET", "/shared/mcp", &[gh1[0], gh1[1], gh1[2], ("Last-Event-ID", "0-0")], "").await;
    let (_, d, id) = g1.event().await.unwrap();
    assert!(d.contains("list_changed") && id == "0-1", "replayed: {d} {id}");
}

#[tokio::test]
async fn crash_fails_in_flight_at_once() {
    let s = start("").await;
    let a = s.addr;
    let sid = st_init(a, "echo", AUTH).await;
    let h = [AUTH, JSON, ("Mcp-Session-Id", sid.as_str())];
    let t = std::time::Instant::now();
    let r = call(a, "POST", "/echo/mcp", &h, &tool_call(json!(1), "crash", json!({}))).await;
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(r.json()["error"]["code"], -32603);
    assert_eq!(r.json()["error"]["message"], "MCP server exited");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(call(a, "POST", "/echo/mcp", &h, &tool_call(json!(2), "echo", json!({}))).await.status, 404);
    // shared: the server restarts, sessions survive it
    let auth = ("Authorization", "S");
    let sid = st_init(a, "shared", auth).await;
    let h = [auth, JSON, ("Mcp-Session-Id", sid.as_str())];
    let r = call(a, "POST", "/shared/mcp", &h, &tool_call(json!(1), "crash", json!({}))).await;
    assert_eq!(r.json()["error"]["message"], "MCP server exited");
    let mut ok = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = call(a, "POST", "/shared/mcp", &h, &tool_call(json!(2), "echo", json!({"text":"back"}))).await;
        if r.json()["result"]["content"][0]["text"] == "back" {
            ok = true;
            break;
        }
    }
    assert!(ok, "shared server came back");
    assert_eq!(s.sup.server("shared").unwrap().metrics.restarts.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[tokio::test]
async fn max_sessions_and_shutdown() {
    let s = start(&format!(r#","mark":{{"command":"/usr/bin/python3","args":["{FIXTURE}","--mark-shutdown"]}}"#)).await;
    let a = s.addr;
    let mut pids = vec![];
    for _ in 0..3 {
        st_init(a, "echo", AUTH).await;
    }
    st_init(a, "mark", AUTH).await;
    st_init(a, "mark", AUTH).await;
    let r = call(a, "POST", "/echo/mcp", &[AUTH, JSON], &init_body(json!(0))).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("5"));
    // every child is gone after shutdown
    for line in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read_to_string(line.path().join("cmdline")) {
            let ppid = std::fs::read_to_string(line.path().join("stat")).unwrap_or_default();
            let me = std::process::id().to_string();
            if cmd.contains("--mark-shutdown") && ppid.split(' ').nth(3) == Some(me.as_str()) {
                pids.push(line.file_name().to_string_lossy().into_owned());
            }
        }
    }
    // Two session servers and the warm ones waiting for the next sessions (the pool grows to
    // the two sessions that arrived): all must go.
    assert!((3..=4).contains(&pids.len()), "two marked session servers and one or two warm ones: {pids:?}");
    s.sup.shutdown().await;
    for p in pids {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        assert!(stat.is_empty() || stat.split(' ').nth(2) == Some("Z"), "process {p} still alive: {stat}");
    }
}

/// Every non-canonical spelling of a server's endpoint, for `/NAME/EP`.
fn evasions(name: &str, ep: &str) -> Vec<String> {
    let first = name.as_bytes()[0];
    let enc_first = format!("%{first:02X}{}", &name[1..]);
    let enc_first_lower = format!("%{first:02x}{}", &name[1..]);
    let upper = name.to_ascii_uppercase();
    vec![
        format!("/{enc_first}/{ep}"),
        format!("/{enc_first_lower}/{ep}"),
        format!("//{name}/{ep}"),
        format!("/{name}//{ep}"),
        format!("/./{name}/{ep}"),
        format!("/{name}/./{ep}"),
        format!("/x/../{name}/{ep}"),
        format!("/%2e%2e/{name}/{ep}"),
        format!("/{upper}/{ep}"),
        format!("/{name}/{}", ep.to_ascii_uppercase()),
        format!("/{name}/{ep}/"),
        format!("/{name}%2F{ep}"),
        format!("/{name}/%{:02X}{}", ep.as_bytes()[0], &ep[1..]),
        format!("/{name}%00/{ep}"),
        format!("/{name}/{ep}%20"),
    ]
}

#[tokio::test]
async fn non_canonical_paths_reach_no_server_under_any_token() {
    // Global token G; server `a` has its own token A, server `b` none (so G).
    let s = start_text(format!(
        r#"{{"mcpProxy":{{"addr":"127.0.0.1:9090","options":{{"authTokens":["G"]}}}},
            "mcpServers":{{"a":{{"command":"/usr/bin/python3","args":["{FIXTURE}"],"options":{{"authTokens":["A"]}}}},
                          "b":{{"command":"/usr/bin/python3","args":["{FIXTURE}"]}}}}}}"#
    ))
    .await;
    let a = s.addr;
    let init = init_body(json!(0));
    // The canonical path: A opens `a`, G does not.
    assert_eq!(call(a, "POST", "/a/mcp", &[("Authorization", "Bearer G"), JSON], &init).await.status, 401);
    assert_eq!(call(a, "POST", "/a/mcp", &[("Authorization", "Bearer A"), JSON], &init).await.status, 200);
    for (ep, method) in [("mcp", "POST"), ("sse", "GET"), ("message", "POST")] {
        for path in evasions("a", ep) {
            for tok in ["Bearer G", "Bearer A", ""] {
                let h: Vec<(&str, &str)> = if tok.is_empty() { vec![JSON] } else { vec![("Authorization", tok), JSON] };
                let r = call(a, method, &path, &h, &init).await;
                assert_eq!(r.status, 404, "{method} {path} with {tok:?}: {} {}", r.status, r.body);
            }
        }
    }
    assert_eq!(s.sup.server("a").unwrap().active_sessions(), 1, "only the canonical open made a session");
    for path in ["/%73tatus", "/status/", "//status", "/STATUS", "/metrics/", "/%6detrics"] {
        assert_eq!(call(a, "GET", path, &[("Authorization", "Bearer G")], "").await.status, 404, "{path}");
    }
}

#[tokio::test]
async fn per_server_tokens_only_guard_every_endpoint_and_status() {
    // No global token: every server has its own. Such a config may bind 0.0.0.0.
    let s = start_text(format!(
        r#"{{"mcpProxy":{{"addr":"127.0.0.1:9090"}},
            "mcpServers":{{"a":{{"command":"/usr/bin/python3","args":["{FIXTURE}"],"options":{{"authTokens":["A"]}}}},
                          "b":{{"command":"/usr/bin/python3","args":["{FIXTURE}"],"options":{{"authTokens":["B"]}}}}}}}}"#
    ))
    .await;
    let a = s.addr;
    let init = init_body(json!(0));
    for path in evasions("a", "mcp") {
        assert_eq!(call(a, "POST", &path, &[JSON], &init).await.status, 404, "{path}");
    }
    assert_eq!(call(a, "POST", "/a/mcp", &[JSON], &init).await.status, 401);
    assert_eq!(call(a, "POST", "/a/mcp", &[("Authorization", "Bearer B"), JSON], &init).await.status, 401);
    assert_eq!(call(a, "GET", "/a/sse", &[], "").await.status, 401);
    assert_eq!(call(a, "POST", "/a/message?sessionId=x", &[], "{}").await.status, 401);
    for path in ["/status", "/metrics"] {
        let r = call(a, "GET", path, &[], "").await;
        assert_eq!(r.status, 401, "{path} answered without a token: {}", r.body);
        assert_eq!(call(a, "GET", path, &[("Authorization", "Bearer nope")], "").await.status, 401, "{path}");
        assert_eq!(call(a, "GET", path, &[("Authorization", "Bearer A")], "").await.status, 200, "{path}");
    }
    assert_eq!(call(a, "GET", "/healthz", &[], "").await.status, 200);
    assert_eq!(call(a, "GET", "/readyz", &[], "").await.status, 200);
    assert_eq!(s.sup.server("a").unwrap().active_sessions(), 0);
}

#[tokio::test]
async fn a_session_belongs_to_the_token_that_opened_it() {
    let s = start(r#","two":{"command":"/usr/bin/python3","args":["FIX"],"options":{"authTokens":["P1","P2"]}}"#.replace("FIX", FIXTURE).as_str()).await;
    let a = s.addr;
    let (p1, p2) = (("Authorization", "Bearer P1"), ("Authorization", "Bearer P2"));
    // Streamable HTTP: P2 presenting P1's session id gets 404 on POST, GET and DELETE.
    let sid = st_init(a, "two", p1).await;
    let ping = json!({"jsonrpc":"2.0","id":7,"method":"ping"}).to_string();
    let stolen = [p2, JSON, ("Mcp-Session-Id", sid.as_str())];
    assert_eq!(call(a, "POST", "/two/mcp", &stolen, &ping).await.status, 404);
    assert_eq!(
        call(a, "GET", "/two/mcp", &[p2, ("Accept", "text/event-stream"), ("Mcp-Session-Id", &sid)], "").await.status,
        404
    );
    assert_eq!(call(a, "DELETE", "/two/mcp", &stolen, "").await.status, 404);
    let r = call(a, "POST", "/two/mcp", &[p1, JSON, ("Mcp-Session-Id", sid.as_str())], &ping).await;
    assert_eq!(r.status, 200, "the owner's session survived: {}", r.body);
    assert_eq!(r.json()["id"], 7);
    // Legacy SSE: P2 posting to P1's session gets 404 and nothing reaches P1's stream.
    let mut c = send(a, "GET", "/two/sse", &[p1], "").await;
    let (ev, endpoint, _) = c.event().await.unwrap();
    assert_eq!(ev, "endpoint");
    let call_body = tool_call(json!("stolen"), "echo", json!({"text":"from p2"}));
    assert_eq!(call(a, "POST", &endpoint, &[p2], &call_body).await.status, 404);
    assert_eq!(call(a, "POST", &endpoint, &[p1], &init_body(json!(1))).await.status, 202);
    let (_, data, _) = c.event().await.unwrap();
    assert_eq!(serde_json::from_str::<Value>(&data).unwrap()["id"], 1, "the first answer is P1's own: {data}");
    // The same id under the other server's global token: also nothing.
    assert_eq!(call(a, "POST", &endpoint, &[AUTH], &ping).await.status, 401);
}

// ---- budgets: a hostile server beside a healthy one ------------------------------------------

const FLOOD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/flood_mcp.py");

/// `flood` (a process per session) and `calm` (shared) run the hostile fixture; `echo` is healthy.
async fn start_flood(mcpbox: &str) -> Srv {
    start_text(format!(
        r#"{{"mcpProxy":{{"addr":"127.0.0.1:9090","options":{{"authTokens":["T"]}}}},
            "mcpbox":{{"maxLineBytes":2000000 {mcpbox}}},
            "mcpServers":{{
              "flood":{{"command":"/usr/bin/python3","args":["{FLOOD}"]}},
              "calm":{{"command":"/usr/bin/python3","args":["{FLOOD}"],"isolation":"shared"}},
              "echo":{{"command":"/usr/bin/python3","args":["{FIXTURE}"]}} }}}}"#
    ))
    .await
}

/// initialize a Streamable session on any server; returns its id.
async fn st_open(addr: SocketAddr, server: &str) -> String {
    let r = call(addr, "POST", &format!("/{server}/mcp"), &[AUTH, JSON], &init_body(json!(0))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.header("mcp-session-id").expect("session id").to_string()
}

/// Open a legacy SSE session and initialize it; returns the stream and the message endpoint.
async fn legacy_open(addr: SocketAddr, server: &str) -> (Conn, String) {
    let mut c = send(addr, "GET", &format!("/{server}/sse"), &[AUTH], "").await;
    assert_eq!(c.status, 200);
    let (_, endpoint, _) = c.event().await.unwrap();
    assert_eq!(call(addr, "POST", &endpoint, &[AUTH], &init_body(json!("i"))).await.status, 202);
    let (_, data, _) = c.event().await.unwrap();
    assert_eq!(serde_json::from_str::<Value>(&data).unwrap()["id"], "i");
    (c, endpoint)
}

pub(super) fn alive(pid: u64) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty() && stat.rsplit(')').next().and_then(|r| r.split_whitespace().next()) != Some("Z")
}

pub(super) async fn until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "{what}: not within {secs} s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_burst_of_small_messages_does_not_end_a_session_that_reads() {
    let s = start_flood("").await;
    let a = s.addr;
    // Legacy SSE: 5000 notifications on the session's stream, read at full speed.
    let (mut c, endpoint) = legacy_open(a, "flood").await;
    assert_eq!(
        call(a, "POST", &endpoint, &[AUTH], &tool_call(json!(1), "burst", json!({"n": 5000}))).await.status,
        202
    );
    let mut notes = 0;
    loop {
        let (_, data, _) = c.event().await.expect("the stream stays open");
        let v: Value = serde_json::from_str(&data).unwrap();
        if v["id"] == 1 {
            break;
        }
        assert_eq!(v["params"]["data"], notes);
        notes += 1;
    }
    assert_eq!(notes, 5000);
    assert_eq!(
        call(a, "POST", &endpoint, &[AUTH], &tool_call(json!(2), "echo", json!({"text": "still"}))).await.status,
        202
    );
    let (_, data, _) = c.event().await.unwrap();
    assert_eq!(serde_json::from_str::<Value>(&data).unwrap()["result"]["content"][0]["text"], "still");
    // Streamable HTTP: 5000 progress notifications on the call's own stream, then its answer.
    let sid = st_open(a, "flood").await;
    let body = json!({"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"burst","arguments":{"n":5000},"_meta":{"progressToken":"p"}}});
    let mut p = send(
        a,
        "POST",
        "/flood/mcp",
        &[AUTH, ("Accept", "application/json, text/event-stream"), ("Mcp-Session-Id", &sid)],
        &body.to_string(),
    )
    .await;
    let mut progress = 0;
    loop {
        let (_, data, _) = p.event().await.expect("the POST stream carries everything");
        let v: Value = serde_json::from_str(&data).unwrap();
        if v["id"] == 3 {
            break;
        }
        assert_eq!(
            (v["params"]["progressToken"].clone(), v["params"]["progress"].clone()),
            (json!("p"), json!(progress))
        );
        progress += 1;
    }
    assert_eq!(progress, 5000);
    let r = call(
        a,
        "POST",
        "/flood/mcp",
        &[AUTH, JSON, ("Mcp-Session-Id", &sid)],
        &tool_call(json!(4), "echo", json!({"text": "here"})),
    )
    .await;
    assert_eq!(r.json()["result"]["content"][0]["text"], "here");
    assert_eq!(s.sup.server("flood").unwrap().active_sessions(), 2);
}

#[tokio::test]
async fn a_client_that_does_not_read_loses_its_session_and_only_that() {
    let s = start_flood(r#","sessionBufferBytes":1048576"#).await;
    let a = s.addr;
    // Legacy SSE that stops reading while the server floods: the session ends (budget named).
    let (c, endpoint) = legacy_open(a, "flood").await;
    let pid_call =
        call(a, "POST", &endpoint, &[AUTH], &tool_call(json!(1), "flood", json!({"mb": 256, "size": 65536}))).await;
    assert_eq!(pid_call.status, 202);
    let healthy = st_open(a, "echo").await;
    let h = [AUTH, JSON, ("Mcp-Session-Id", healthy.as_str())];
    let mut answered = 0;
    let sessions = || s.sup.server("flood").unwrap().active_sessions();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while sessions() > 0 {
        assert!(std::time::Instant::now() < deadline, "the flooded session did not end");
        // The healthy server keeps answering during the flood.
        let r = call(a, "POST", "/echo/mcp", &h, &tool_call(json!(answered), "echo", json!({"text": "ok"}))).await;
        assert_eq!(r.json()["result"]["content"][0]["text"], "ok");
        answered += 1;
    }
    drop(c);
    assert_eq!(call(a, "POST", &endpoint, &[AUTH], "{}").await.status, 404, "the flooded session is gone");
    // A Streamable session whose GET stream is open but not read: the same, with the budget
    // named in the error its waiting call gets.
    let sid = st_open(a, "flood").await;
    let g = send(a, "GET", "/flood/mcp", &[AUTH, ("Accept", "text/event-stream"), ("Mcp-Session-Id", &sid)], "").await;
    assert_eq!(g.status, 200);
    let t = std::time::Instant::now();
    let r = call(
        a,
        "POST",
        "/flood/mcp",
        &[AUTH, JSON, ("Mcp-Session-Id", &sid)],
        &tool_call(json!("f"), "flood", json!({"mb": 256, "size": 65536})),
    )
    .await;
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(r.json()["id"], "f");
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("mcpbox.sessionBufferBytes") && msg.contains("1048576"), "{msg}");
    drop(g);
    until("the flooded session ends", 5, || sessions() == 0).await;
    let r = call(a, "POST", "/echo/mcp", &h, &tool_call(json!("after"), "echo", json!({"text": "after"}))).await;
    assert_eq!(r.json()["result"]["content"][0]["text"], "after");
}

#[tokio::test]
async fn a_server_that_closes_stdout_fails_the_call_at_once_and_is_ended() {
    let s = start_flood("").await;
    let a = s.addr;
    for server in ["flood", "calm"] {
        let sid = st_open(a, server).await;
        let h = [AUTH, JSON, ("Mcp-Session-Id", sid.as_str())];
        let r = call(a, "POST", &format!("/{server}/mcp"), &h, &tool_call(json!(1), "pid", json!({}))).await;
        let pid: u64 = r.json()["result"]["content"][0]["text"].as_str().unwrap().parse().unwrap();
        assert!(alive(pid));
        let t = std::time::Instant::now();
        let r = call(a, "POST", &format!("/{server}/mcp"), &h, &tool_call(json!(2), "close_stdout", json!({}))).await;
        assert!(t.elapsed() < Duration::from_secs(1), "{server}: answered after {:?}", t.elapsed());
        assert_eq!(
            (r.json()["id"].clone(), r.json()["error"]["message"].clone()),
            (json!(2), json!("MCP server exited")),
            "{server}"
        );
        // grace is 1 s: SIGTERM at once, SIGKILL after it.
        until(&format!("{server}: the process that closed its stdout is gone"), 3, || !alive(pid)).await;
    }
}

#[tokio::test]
async fn a_server_that_stops_reading_gets_errors_instead_of_buffers() {
    let s = start_flood(r#","serverInputBytes":65536"#).await;
    let a = s.addr;
    let (mut c, endpoint) = legacy_open(a, "flood").await;
    assert_eq!(call(a, "POST", &endpoint, &[AUTH], &tool_call(json!("d"), "deaf", json!({}))).await.status, 202);
    let (_, data, _) = c.event().await.unwrap();
    assert_eq!(serde_json::from_str::<Value>(&data).unwrap()["id"], "d");
    // 100 calls of 32 KiB: the pipe (64 KiB) and the input budget (64 KiB) take a few; the rest
    // are refused at once with an error naming the budget.
    let pad = "p".repeat(32 * 1024);
    for i in 0..100 {
        assert_eq!(
            call(a, "POST", &endpoint, &[AUTH], &tool_call(json!(i), "echo", json!({"text": pad}))).await.status,
            202
        );
    }
    let mut refused = 0;
    while let Ok(Some((_, data, _))) = tokio::time::timeout(Duration::from_secs(2), c.event()).await {
        let v: Value = serde_json::from_str(&data).unwrap();
        assert!(v["error"]["message"].as_str().unwrap().contains("mcpbox.serverInputBytes"), "{v}");
        refused += 1;
    }
    assert!(refused >= 90, "only {refused} of 100 refused");
    assert_eq!(s.sup.server("flood").unwrap().active_sessions(), 1, "the session itself goes on");
}

#[tokio::test]
async fn delete_frees_what_the_session_held() {
    let s = start_flood("").await;
    let a = s.addr;
    let sid = st_open(a, "flood").await;
    let h = [AUTH, JSON, ("Mcp-Session-Id", sid.as_str())];
    // 64 MiB of notifications with no GET stream: the replay ring keeps the newest 8 MiB.
    let r = call(a, "POST", "/flood/mcp", &h, &tool_call(json!(1), "flood", json!({"mb": 64, "size": 65536}))).await;
    assert!(r.json()["result"]["content"][0]["text"].as_str().unwrap().parse::<u64>().unwrap() >= 64 << 20);
    let session = s.sup.server("flood").unwrap().sessions.all().pop().unwrap();
    let held = session.outbox.lock().held();
    assert!(held > 4 << 20 && held <= crate::config::DEFAULT_SESSION_BUFFER, "the ring holds {held} bytes");
    assert_eq!(call(a, "DELETE", "/flood/mcp", &h, "").await.status, 204);
    until("the session ends", 5, || s.sup.server("flood").unwrap().active_sessions() == 0).await;
    let left = session.outbox.lock().held();
    assert!(left < 1024, "DELETE frees the outbox (all but the closing note): {left} bytes held");
}

#[tokio::test]
async fn replica_ids_foreign_sessions_and_draining() {
    let text = format!(
        r#"{{"mcpProxy":{{"addr":"127.0.0.1:9090","options":{{"authTokens":["T"]}}}},"mcpbox":{{"replicaId":"r2"}},
            "mcpServers":{{"echo":{{"command":"/usr/bin/python3","args":["{FIXTURE}"]}}}}}}"#
    );
    let s = start_text(text).await;
    let a = s.addr;
    // Both transports' session ids name this replica.
    let sid = st_open(a, "echo").await;
    assert!(sid.starts_with("r2.") && sid.len() == 35, "{sid}");
    let (mut c, endpoint) = legacy_open(a, "echo").await;
    assert!(endpoint.starts_with("/echo/message?sessionId=r2."), "{endpoint}");
    // Another replica's session (even one whose random part is a live one here), or an id
    // naming no replica: 404 at once; an unknown id of this replica: 404 as before.
    let ping = json!({"jsonrpc":"2.0","id":9,"method":"ping"}).to_string();
    let other = sid.replacen("r2.", "r1.", 1);
    for id in [other.as_str(), &sid[3..], "r2.nope"] {
        let r = call(a, "POST", "/echo/mcp", &[AUTH, JSON, ("Mcp-Session-Id", id)], &ping).await;
        assert_eq!(r.status, 404, "{id}: {}", r.body);
        let r = call(a, "POST", &format!("/echo/message?sessionId={id}"), &[AUTH], &ping).await;
        assert_eq!(r.status, 404, "{id}: {}", r.body);
    }
    let r = call(a, "POST", "/echo/mcp", &[AUTH, JSON, ("Mcp-Session-Id", &other)], &ping).await;
    assert!(r.body.contains("replica r1"), "{}", r.body);
    // Draining: not ready, new sessions refused with Retry-After, open ones go on.
    assert_eq!(call(a, "GET", "/readyz", &[], "").await.status, 200);
    s.sup.drain();
    assert_eq!(call(a, "GET", "/readyz", &[], "").await.status, 503);
    let r = call(a, "POST", "/echo/mcp", &[AUTH, JSON], &init_body(json!(0))).await;
    assert_eq!((r.status, r.header("retry-after")), (503, Some("1")), "{}", r.body);
    let r = call(a, "GET", "/echo/sse", &[AUTH], "").await;
    assert_eq!((r.status, r.header("retry-after")), (503, Some("1")), "{}", r.body);
    let r = call(
        a,
        "POST",
        "/echo/mcp",
        &[AUTH, JSON, ("Mcp-Session-Id", &sid)],
        &tool_call(json!(1), "echo", json!({"text":"still"})),
    )
    .await;
    assert_eq!(r.json()["result"]["content"][0]["text"], "still");
    assert_eq!(
        call(a, "POST", &endpoint, &[AUTH], &tool_call(json!(2), "echo", json!({"text":"here"}))).await.status,
        202
    );
    let (_, data, _) = c.event().await.unwrap();
    assert_eq!(serde_json::from_str::<Value>(&data).unwrap()["result"]["content"][0]["text"], "here");
    assert_eq!(s.sup.open_sessions(), 2);
}

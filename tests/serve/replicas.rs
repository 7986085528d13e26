//! Many replicas behind an existing proxy (issue 13, point 3): three real `mcpbox serve`
//! processes (replica ids r0, r1, r2) behind nginx running the shipped deploy/nginx/mcpbox.conf
//! on loopback ports, as a child of the test (no daemon, pid/logs/temp files in a temp dir, so
//! it runs unprivileged too). 50 sessions over both transports go through nginx; every request
//! of a session must reach the replica its id names (a replica answers another's session 404,
//! and nginx's access log records which upstream each request went to); one replica is drained
//! mid-run and refuses new sessions while its open ones go on.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::serve_support::*;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/echo_mcp.py");
const NGINX: &str = "/usr/sbin/nginx";

/// The echo fixture, one shared process per replica.
fn echo() -> Value {
    json!({"echo": {"command": "/usr/bin/python3", "args": [FIXTURE], "isolation": "shared", "maxSessions": 0,
           "policy": {"extends": "python", "filesystem": {"read": [FIXTURE]}}}})
}

/// nginx with the shipped configuration, pointed at `replicas` (r0, r1, r2); killed on drop.
struct Nginx {
    child: Child,
    dir: tempfile::TempDir,
    base: String,
}

impl Nginx {
    async fn start(replicas: [SocketAddr; 3]) -> Nginx {
        assert!(
            Path::new(NGINX).is_file(),
            "{NGINX} is missing: scripts/test.sh installs it (apt-get install nginx-light)"
        );
        let dir = tempfile::Builder::new().prefix("mcpbox-nginx-").tempdir().unwrap();
        let shipped =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nginx/mcpbox.conf")).unwrap();
        let port = free_port();
        let mut conf = shipped.clone();
        for (i, r) in replicas.iter().enumerate() {
            let from = format!("127.0.0.1:{}", 9091 + i);
            // Its own upstream and the round-robin one.
            assert_eq!(
                conf.matches(&format!("server {from}")).count(),
                2,
                "deploy/nginx/mcpbox.conf no longer names {from} twice"
            );
            conf = conf.replace(&format!("server {from}"), &format!("server {r}"));
        }
        assert!(conf.contains("listen 8080;"), "deploy/nginx/mcpbox.conf no longer listens on 8080");
        conf = conf.replace("listen 8080;", &format!("listen 127.0.0.1:{port};"));
        let d = dir.path().display();
        std::fs::write(dir.path().join("mcpbox.conf"), conf).unwrap();
        let main = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
               uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  include {d}/mcpbox.conf;\n\
               log_format replicas '$request_method $uri [$mcpbox_session] $upstream_addr $status';\n\
               access_log {d}/access.log replicas;\n}}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), main).unwrap();
        let child = Command::new(NGINX)
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
            .spawn()
            .expect("start nginx");
        let mut n = Nginx { child, dir, base: format!("http://127.0.0.1:{port}") };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = n.child.try_wait().unwrap() {
                panic!("nginx exited ({st}):\n{}", n.logs());
            }
            if http.get(format!("{}/healthz", n.base)).send().await.is_ok_and(|r| r.status() == 200) {
                return n;
            }
            assert!(Instant::now() < deadline, "nginx not answering after 10 s:\n{}", n.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn logs(&self) -> String {
        let r = |n| std::fs::read_to_string(self.file(n)).unwrap_or_default();
        format!("stderr:\n{}\nerror.log:\n{}", r("stderr.log"), r("error.log"))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let access = std::fs::read_to_string(self.file("access.log")).unwrap_or_default();
            eprintln!("nginx's logs:\n{}\naccess.log:\n{access}", self.logs());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The events of an SSE response (event name, data), read by a task that [`Stream::close`] ends
/// (which closes the connection).
struct Stream {
    rx: mpsc::UnboundedReceiver<(String, String)>,
    task: tokio::task::JoinHandle<()>,
}

impl Stream {
    fn new(resp: reqwest::Response) -> Stream {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut body = resp.bytes_stream();
            let mut buf = String::new();
            while let Some(Ok(chunk)) = body.next().await {
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buf.find("\n\n") {
                    let block: String = buf.drain(..end + 2).collect();
                    let (mut event, mut data) = ("message".to_string(), String::new());
                    for line in block.lines() {
                        if let Some(v) = line.strip_prefix("event:") {
                            event = v.trim().to_string();
                        } else if let Some(v) = line.strip_prefix("data:") {
                            data.push_str(v.strip_prefix(' ').unwrap_or(v));
                        }
                    }
                    if !data.is_empty() && tx.send((event, data)).is_err() {
                        return;
                    }
                }
            }
        });
        Stream { rx, task }
    }

    async fn next(&mut self) -> Option<(String, String)> {
        tokio::time::timeout(Duration::from_secs(20), self.rx.recv()).await.ok().flatten()
    }

    fn close(self) {
        self.task.abort();
    }
}

/// One client session through nginx, over either transport.
enum Client {
    Streamable { sid: String },
    Legacy { sid: String, post: String, events: Stream },
}

struct Session {
    client: Client,
}

impl Session {
    fn sid(&self) -> &str {
        match &self.client {
            Client::Streamable { sid } | Client::Legacy { sid, .. } => sid,
        }
    }

    fn replica(&self) -> &str {
        self.sid().split('.').next().unwrap()
    }
}

fn auth(rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    rb.header("authorization", format!("Bearer {TOKEN}")).header("content-type", "application/json")
}

/// Open a session through nginx and initialize it.
async fn open(http: &reqwest::Client, base: &str, legacy: bool) -> Session {
    if legacy {
        let r = auth(http.get(format!("{base}/echo/sse"))).header("accept", "text/event-stream").send().await.unwrap();
        if r.status() != 200 {
            panic!("GET /echo/sse through nginx: {} {:?}", r.status(), r.text().await);
        }
        let mut events = Stream::new(r);
        let (ev, endpoint) = events.next().await.expect("the endpoint event");
        assert_eq!(ev, "endpoint");
        let sid = endpoint.split("sessionId=").nth(1).expect("sessionId in the endpoint").to_string();
        let mut s = Session { client: Client::Legacy { sid, post: format!("{base}{endpoint}"), events } };
        let answer = call(http, base, &mut s, init_msg(json!(0))).await;
        assert_eq!(answer["result"]["serverInfo"]["name"], "echo", "{answer}");
        call(http, base, &mut s, initialized_msg()).await;
        s
    } else {
        let r = auth(http.post(format!("{base}/echo/mcp")))
            .header("accept", "application/json")
            .body(init_msg(json!(0)).to_string())
            .send()
            .await
            .unwrap();
        let sid = r.headers().get("mcp-session-id").map(|v| v.to_str().unwrap().to_string());
        let r = Resp::read(r).await;
        assert_eq!(r.status, 200, "initialize through nginx: {}", r.body);
        assert_eq!(r.json()["result"]["serverInfo"]["name"], "echo", "{}", r.body);
        let mut s = Session { client: Client::Streamable { sid: sid.expect("Mcp-Session-Id") } };
        call(http, base, &mut s, initialized_msg()).await;
        s
    }
}

/// Send one message of the session through nginx; a request's answer is returned.
async fn call(http: &reqwest::Client, base: &str, s: &mut Session, msg: Value) -> Value {
    let is_request = msg.get("id").is_some();
    match &mut s.client {
        Client::Streamable { sid } => {
            let r = auth(http.post(format!("{base}/echo/mcp")))
                .header("accept", "application/json")
                .header("mcp-session-id", sid.as_str())
                .header("mcp-protocol-version", "2025-06-18")
                .body(msg.to_string())
                .send()
                .await
                .unwrap();
            let r = Resp::read(r).await;
            if !is_request {
                assert_eq!(r.status, 202, "{msg} in {sid}: {}", r.body);
                return Value::Null;
            }
            assert_eq!(r.status, 200, "{msg} in {sid}: {}", r.body);
            r.json()
        }
        Client::Legacy { sid, post, events } => {
            let r = Resp::read(auth(http.post(post.as_str())).body(msg.to_string()).send().await.unwrap()).await;
            assert_eq!(r.status, 202, "{msg} in {sid}: {}", r.body);
            if !is_request {
                return Value::Null;
            }
            let (ev, data) = events.next().await.unwrap_or_else(|| panic!("no answer to {msg} in {sid}"));
            assert_eq!(ev, "message");
            serde_json::from_str(&data).unwrap()
        }
    }
}

/// An echo call whose answer must carry this session's own text.
async fn echo_round(http: &reqwest::Client, base: &str, s: &mut Session, n: u32) {
    let text = format!("{}#{n}", s.sid());
    let answer = call(http, base, s, call_msg(json!(n), "echo", json!({"text": text}))).await;
    assert_eq!(answer["id"], json!(n), "{answer}");
    assert_eq!(text_of(&answer), text, "{answer}");
}

async fn open_many(http: &reqwest::Client, base: &str, n: usize) -> Vec<Session> {
    let opened = futures::future::join_all((0..n).map(|i| async move {
        let mut s = open(http, base, i % 2 == 1).await;
        echo_round(http, base, &mut s, 1).await;
        echo_round(http, base, &mut s, 2).await;
        s
    }));
    opened.await
}

/// Open sessions of `server` on a replica, from its own /status.
async fn status_sessions(mb: &Mcpbox) -> u64 {
    let r = mb.request("GET", "/status", &[], None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["servers"]["echo"]["sessions"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_sessions_through_nginx_reach_their_replicas_and_a_drained_replica_finishes_its_own() {
    // r1 has a short drain grace (its open sessions are ended 3 s after SIGTERM); r2 a long one
    // (it must exit as soon as its last session ends).
    let graces = ["60s", "3s", "60s"];
    let mut mbs = Vec::new();
    for (i, g) in graces.iter().enumerate() {
        mbs.push(Mcpbox::start(echo(), json!({"replicaId": format!("r{i}"), "drainGrace": g})).await);
    }
    let addrs = [mbs[0].addr, mbs[1].addr, mbs[2].addr];
    let nginx = Nginx::start(addrs).await;
    let base = nginx.base.clone();
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();

    // 30 sessions (15 per transport) through nginx, two calls each.
    let mut sessions = open_many(&http, &base, 30).await;
    let mut per_replica: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, s) in sessions.iter().enumerate() {
        per_replica.entry(s.replica().to_string()).or_default().push(i);
    }
    assert_eq!(
        per_replica.keys().cloned().collect::<Vec<_>>(),
        ["r0", "r1", "r2"],
        "round robin reached every replica"
    );
    // Each replica holds exactly the sessions whose ids name it.
    for (i, mb) in mbs.iter().enumerate() {
        assert_eq!(status_sessions(mb).await, per_replica[&format!("r{i}")].len() as u64, "r{i}'s /status");
    }

    // Drain r2: not ready, new sessions refused (with Retry-After), open ones go on.
    let r2_sessions: Vec<usize> = per_replica["r2"].clone();
    signal(mbs[2].pid(), nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while mbs[2].request("GET", "/readyz", &[], None).await.status != 503 {
        assert!(Instant::now() < deadline, "r2's /readyz still not 503 after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = mbs[2]
        .request(
            "POST",
            "/echo/mcp",
            &[("accept", "application/json"), ("content-type", "application/json")],
            Some(init_msg(json!(0)).to_string().into_bytes()),
        )
        .await;
    assert_eq!(r.status, 503, "initialize on a draining replica: {}", r.body);
    assert!(r.header("retry-after").is_some(), "503 without Retry-After");
    let r = mbs[2].request("GET", "/echo/sse", &[("accept", "text/event-stream")], None).await;
    assert_eq!(r.status, 503, "GET /echo/sse on a draining replica: {}", r.body);
    assert!(r.header("retry-after").is_some(), "503 without Retry-After");

    // 20 more sessions through nginx, while r2's open ones go on: none of the new ones is on r2.
    let more = open_many(&http, &base, 20);
    let old = futures::future::join_all(sessions.iter_mut().filter(|s| s.replica() == "r2").map(|s| {
        let (http, base) = (&http, &base);
        async move { echo_round(http, base, s, 3).await }
    }));
    let (more, _) = tokio::join!(more, old);
    for s in &more {
        assert_ne!(s.replica(), "r2", "a new session went to the draining replica");
    }
    sessions.extend(more);
    assert_eq!(sessions.len(), 50);
    assert_eq!(status_sessions(&mbs[2]).await, r2_sessions.len() as u64, "r2 still holds its open sessions");

    // r2's clients finish: r2 exits at once, long before its 60 s grace.
    let mut kept = Vec::new();
    for s in sessions.drain(..) {
        if s.replica() != "r2" {
            kept.push(s);
            continue;
        }
        match s.client {
            Client::Streamable { sid } => {
                let r = auth(http.delete(format!("{base}/echo/mcp")))
                    .header("mcp-session-id", sid.as_str())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 204, "DELETE {sid} through nginx");
            }
            Client::Legacy { events, .. } => events.close(),
        }
    }
    let t = Instant::now();
    let st = mbs[2]
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("r2 still running with no sessions left:\n{}", mbs[2].log_text()));
    assert!(st.success(), "r2 exited with {st}:\n{}", mbs[2].log_text());
    assert!(t.elapsed() < Duration::from_secs(15));
    let mut sessions = kept;

    // Every request that named a session went to the replica it names (nginx's access log).
    let log = std::fs::read_to_string(nginx.file("access.log")).unwrap();
    let mut routed = 0;
    for line in log.lines() {
        let sid = line.split('[').nth(1).and_then(|x| x.split(']').next()).unwrap_or("");
        if sid.is_empty() {
            continue;
        }
        let r: usize = sid[1..2].parse().unwrap();
        let upstream = line.split("] ").nth(1).unwrap().split(' ').next().unwrap();
        assert_eq!(upstream, addrs[r].to_string(), "{line}");
        routed += 1;
    }
    // Per session at least: initialized, two calls (legacy: initialize too).
    assert!(routed >= 50 * 3, "only {routed} requests with a session id in nginx's log:\n{log}");

    // The rest still work; then r1 drains with its sessions open: they keep answering until
    // its 3 s grace ends them and it exits.
    for s in sessions.iter_mut() {
        echo_round(&http, &base, s, 4).await;
    }
    signal(mbs[1].pid(), nix::sys::signal::Signal::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    for s in sessions.iter_mut().filter(|s| s.replica() == "r1") {
        echo_round(&http, &base, s, 5).await;
    }
    let st = mbs[1]
        .wait_exit(Duration::from_secs(12))
        .unwrap_or_else(|| panic!("r1 outlived its 3 s drain grace:\n{}", mbs[1].log_text()));
    assert!(st.success(), "r1 exited with {st}");
    assert!(t.elapsed() > Duration::from_secs(2), "r1 did not wait for its drain grace ({:?})", t.elapsed());
    let log = mbs[1].log_text();
    assert!(log.contains("drain grace over"), "{log}");
    // r0 alone takes the new sessions now.
    let s = open(&http, &base, false).await;
    assert_eq!(s.replica(), "r0");
    drop(nginx);
}

//! The HTTP edge under hostile connections (issue 10, point 2): a real `mcpbox serve` with the
//! echo fixture behind it; idle, half-sent and surplus connections made with raw sockets from
//! several loopback addresses (127.0.0.0/8 is all loopback on Linux).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::serve_support::*;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/echo_mcp.py");

fn echo(isolation: &str) -> Value {
    json!({"command": "/usr/bin/python3", "args": [FIXTURE], "isolation": isolation,
           "policy": {"extends": "python", "filesystem": {"read": [FIXTURE]}}})
}

/// A TCP connection to mcpbox from the loopback address `127.0.0.SRC`.
async fn connect_from(src: u8, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::from((Ipv4Addr::new(127, 0, 0, src), 0))).unwrap();
    s.connect(to).await.unwrap_or_else(|e| panic!("connect from 127.0.0.{src}: {e}"))
}

/// Read until mcpbox closes the connection: what it sent and when the end came. Panics if the
/// connection is still open after `within`.
async fn read_to_eof(s: &mut TcpStream, within: Duration) -> (String, Duration) {
    read_to_eof_since(s, within, Instant::now()).await
}

/// As [`read_to_eof`], with times counted from `t`.
async fn read_to_eof_since(s: &mut TcpStream, within: Duration, t: Instant) -> (String, Duration) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(within.saturating_sub(t.elapsed()), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&got).into_owned(), t.elapsed()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("still open after {within:?}; received so far: {:?}", String::from_utf8_lossy(&got)),
        }
    }
}

/// True if nothing arrives and the connection stays open for `wait`.
async fn still_open(s: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 64];
    tokio::time::timeout(wait, s.read(&mut buf)).await.is_err()
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Raise this process's soft descriptor limit to its hard limit; returns the hard limit.
fn raise_own_nofile() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
    hard
}

fn head(mb: &Mcpbox, lines: &str) -> String {
    format!("{lines}Host: {}\r\n", mb.addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_and_half_sent_connections_do_not_stop_a_normal_client() {
    // mcpbox inherits the raised limit; as an unprivileged user whose hard limit is low, the test
    // holds what fits (mcpbox sizes its cap from the same limit) and says so.
    let hard = raise_own_nofile();
    let mb =
        Mcpbox::start(json!({"echo": echo("session")}), json!({"headerTimeout": "60s", "bodyTimeout": "60s"})).await;
    // mcpbox's default cap at this limit keeps 128 + 8 x 64 descriptors for itself and the
    // sandboxes (src/listen.rs); stay 40 under it, room for the normal client.
    let n = (hard as usize).saturating_sub(128 + 8 * 64 + 40).min(1000);
    assert!(n >= 300, "descriptor hard limit {hard} is too low for this test: raise it (ulimit -Hn)");
    if n < 1000 {
        eprintln!("descriptor hard limit {hard}: holding {n} connections instead of 1000");
    }
    let before = fd_count(mb.pid());
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        // 40 per source address: under the default per-address cap of 64.
        let mut s = connect_from(10 + (i / 40) as u8, mb.addr).await;
        match i % 10 {
            // a request head cut short
            0 => s.write_all(head(&mb, "POST /echo/mcp HTTP/1.1\r\n").as_bytes()).await.unwrap(),
            // a complete head, a body cut short
            1 => {
                let req = format!(
                    "{}Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\n\
                     Content-Length: 1000\r\n\r\n{{\"jsonrpc\":",
                    head(&mb, "POST /echo/mcp HTTP/1.1\r\n")
                );
                s.write_all(req.as_bytes()).await.unwrap()
            }
            // nothing at all
            _ => {}
        }
        held.push(s);
    }
    // mcpbox has accepted them all (they are its descriptors, not just the kernel's backlog;
    // a few of its own come and go meanwhile, hence the slack).
    let deadline = Instant::now() + Duration::from_secs(10);
    while fd_count(mb.pid()) + 10 < before + n {
        assert!(
            Instant::now() < deadline,
            "mcpbox holds {} descriptors, expected {} + {n}",
            fd_count(mb.pid()),
            before
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t = Instant::now();
    let work = async {
        let s = Streamable::open(&mb, "echo").await;
        let r = s.request(call_msg(json!(1), "echo", json!({"text": "still answering"}))).await;
        assert_eq!(text_of(&r), "still answering");
        assert!(matches!(s.delete().await, 200 | 204));
    };
    tokio::time::timeout(Duration::from_secs(20), work).await.expect("the normal client timed out");
    eprintln!("normal client with {n} idle connections held: {:?}", t.elapsed());
    // and the idle ones were not simply dropped meanwhile
    assert!(fd_count(mb.pid()) + 10 >= before + n, "idle connections were closed early");
    assert!(still_open(&mut held[2], Duration::from_millis(100)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_sent_connections_are_closed_after_the_timeouts() {
    let mb = Mcpbox::start(json!({"echo": echo("session")}), json!({"headerTimeout": "1s", "bodyTimeout": "1s"})).await;
    let within = Duration::from_secs(5);
    // 1. connected, nothing sent
    let mut idle = connect_from(1, mb.addr).await;
    let t_idle = Instant::now();
    // 2. a request head cut short
    let mut half_head = connect_from(1, mb.addr).await;
    half_head.write_all(head(&mb, "GET /healthz HTTP/1.1\r\n").as_bytes()).await.unwrap();
    let t_half_head = Instant::now();
    // 3. a complete head, the body cut short
    let mut half_body = connect_from(1, mb.addr).await;
    let req = format!(
        "{}Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\n\
         Content-Length: 500\r\n\r\n{{\"jsonrpc\":",
        head(&mb, "POST /echo/mcp HTTP/1.1\r\n")
    );
    half_body.write_all(req.as_bytes()).await.unwrap();
    let t_half_body = Instant::now();
    // 4. a body cut short on an endpoint that never reads one
    let mut unread_body = connect_from(1, mb.addr).await;
    let req = format!("{}Content-Length: 500\r\n\r\nabc", head(&mb, "GET /healthz HTTP/1.1\r\n"));
    unread_body.write_all(req.as_bytes()).await.unwrap();
    // 5. keep-alive: one complete request answered, then nothing
    let mut kept = connect_from(1, mb.addr).await;
    kept.write_all(format!("{}\r\n", head(&mb, "GET /healthz HTTP/1.1\r\n")).as_bytes()).await.unwrap();
    let t_kept = Instant::now();

    // Each is closed by mcpbox, and not before its timeout (1 s; 0.7 s leaves room for timers).
    let early = Duration::from_millis(700);
    let (got, t) = read_to_eof_since(&mut idle, within, t_idle).await;
    assert!(got.is_empty() && t >= early, "idle: {got:?} after {t:?}");
    let (got, t) = read_to_eof_since(&mut half_head, within, t_half_head).await;
    assert!(!got.contains(" 200 ") && t >= early, "half head: {got:?} after {t:?}");
    let (got, t) = read_to_eof_since(&mut half_body, within, t_half_body).await;
    assert!(got.starts_with("HTTP/1.1 408 ") && t >= early, "half body: {got:?} after {t:?}");
    let (got, _) = read_to_eof(&mut unread_body, within).await;
    assert!(got.starts_with("HTTP/1.1 200 "), "unread body: {got:?}");
    let (got, t) = read_to_eof_since(&mut kept, within, t_kept).await;
    assert!(got.starts_with("HTTP/1.1 200 ") && got.ends_with("ok"), "keep-alive: {got:?}");
    assert!(t >= early, "keep-alive connection closed after {t:?}, before the idle timeout");
    // a client that sends in time is served on the same kind of connection
    let r = mb.request("GET", "/healthz", &[], None).await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_and_slow_answers_outlive_the_idle_timeout() {
    let mb = Mcpbox::start(json!({"echo": echo("session")}), json!({"headerTimeout": "1s", "bodyTimeout": "1s"})).await;
    let legacy = Legacy::open(&mb, "echo").await;
    let st = Streamable::open(&mb, "echo").await;
    let mut get = st.get_stream().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // the legacy stream still carries answers
    let r = legacy.request(call_msg(json!(7), "echo", json!({"text": "after 3 s"}))).await;
    assert_eq!(text_of(&r), "after 3 s");
    // the Streamable HTTP GET stream is still open
    assert!(matches!(get.try_recv(), Err(tokio::sync::mpsc::error::TryRecvError::Empty)), "GET stream ended");
    // a POST answered as SSE, and one answered as JSON, each taking longer than the idle timeout
    let mut sse = st.request_sse(call_msg(json!(8), "slow", json!({"ms": 2500, "text": "slow sse"}))).await;
    let got = collect_for(&mut sse, Duration::from_secs(6)).await;
    assert!(got.iter().any(|m| m["id"] == 8 && text_of(m) == "slow sse"), "{got:?}");
    let r = st.request(call_msg(json!(9), "slow", json!({"ms": 2500, "text": "slow json"}))).await;
    assert_eq!(text_of(&r), "slow json");
    assert!(matches!(get.try_recv(), Err(tokio::sync::mpsc::error::TryRecvError::Empty)), "GET stream ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_caps_are_refused_at_once() {
    let mb = Mcpbox::start(json!({"echo": echo("shared")}), json!({"maxConnectionsPerAddress": 4})).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect_from(3, mb.addr).await);
    }
    let mut fifth = connect_from(3, mb.addr).await;
    let (got, t) = read_to_eof(&mut fifth, Duration::from_secs(2)).await;
    assert!(got.starts_with("HTTP/1.1 503 ") && got.contains("Retry-After"), "connection 5 from one address: {got:?}");
    assert!(t < Duration::from_secs(1), "refused only after {t:?}");
    for s in &mut held {
        assert!(still_open(s, Duration::from_millis(200)).await, "a connection under the cap was closed");
    }
    // other addresses are not affected
    let mut other = connect_from(4, mb.addr).await;
    other
        .write_all(format!("{}Connection: close\r\n\r\n", head(&mb, "GET /healthz HTTP/1.1\r\n")).as_bytes())
        .await
        .unwrap();
    let (got, _) = read_to_eof(&mut other, Duration::from_secs(5)).await;
    assert!(got.starts_with("HTTP/1.1 200 "), "{got:?}");
    // a freed place is taken again
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut again = connect_from(3, mb.addr).await;
    again
        .write_all(format!("{}Connection: close\r\n\r\n", head(&mb, "GET /healthz HTTP/1.1\r\n")).as_bytes())
        .await
        .unwrap();
    let (got, _) = read_to_eof(&mut again, Duration::from_secs(5)).await;
    assert!(got.starts_with("HTTP/1.1 200 "), "{got:?}");
    assert!(mb.log_text().contains("maxConnectionsPerAddress"), "the refusal is not logged:\n{}", mb.log_text());
    drop(held);

    // the cap in all
    let mb = Mcpbox::start(json!({"echo": echo("shared")}), json!({"maxConnections": 6})).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // the start-up health checks' connections are gone
    let mut held = Vec::new();
    for i in 0..6 {
        held.push(connect_from(20 + i, mb.addr).await);
    }
    let mut seventh = connect_from(30, mb.addr).await;
    let (got, _) = read_to_eof(&mut seventh, Duration::from_secs(2)).await;
    assert!(got.starts_with("HTTP/1.1 503 "), "connection 7 of 6: {got:?}");
    assert!(still_open(&mut held[0], Duration::from_millis(200)).await);
    assert!(mb.log_text().contains("mcpbox.maxConnections ("), "the refusal is not logged:\n{}", mb.log_text());
}

/// POST initialize on `/NAME/mcp`: the status, Retry-After and the session id if any.
async fn try_open(mb: &Mcpbox, server: &str) -> (u16, Option<String>, Option<String>) {
    let r = mb
        .request(
            "POST",
            &format!("/{server}/mcp"),
            &[("content-type", "application/json"), ("accept", "application/json, text/event-stream")],
            Some(init_msg(json!(0)).to_string().into_bytes()),
        )
        .await;
    (r.status, r.header("retry-after").map(str::to_owned), r.header("mcp-session-id").map(str::to_owned))
}

/// The number of processes below mcpbox once it has not changed for a second.
async fn settled_descendants(mb: &Mcpbox) -> usize {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = (mb.descendants().len(), Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let n = mb.descendants().len();
        if n != last.0 {
            last = (n, Instant::now());
        } else if last.1.elapsed() >= Duration::from_secs(1) {
            return n;
        }
        assert!(Instant::now() < deadline, "processes below mcpbox do not settle");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_session_budget_answers_503_with_retry_after() {
    let mb = Mcpbox::start(
        json!({"a": echo("session"), "b": echo("session"), "sh": echo("shared")}),
        json!({"maxSessionsTotal": 3, "maxSandboxes": 2}),
    )
    .await;
    let (st, _, a1) = try_open(&mb, "a").await;
    assert_eq!(st, 200);
    assert_eq!(try_open(&mb, "b").await.0, 200);
    // two session sandboxes are the most: a third is refused, on any server, before it starts
    // (once the warm processes that replace the two taken ones stand)
    let sandboxes = settled_descendants(&mb).await;
    let (st, retry, _) = try_open(&mb, "a").await;
    assert_eq!(st, 503, "third sandbox");
    assert!(retry.is_some_and(|r| r.parse::<u64>().is_ok()), "no Retry-After");
    assert_eq!(settled_descendants(&mb).await, sandboxes, "a refused session started a process");
    // legacy SSE is refused the same way
    let r = mb.request("GET", "/b/sse", &[("accept", "text/event-stream")], None).await;
    assert_eq!(r.status, 503);
    assert!(r.header("retry-after").is_some());
    // a shared server's session needs no sandbox, but counts as a session
    assert_eq!(try_open(&mb, "sh").await.0, 200);
    let (st, retry, _) = try_open(&mb, "sh").await;
    assert_eq!(st, 503, "fourth session");
    assert!(retry.is_some());
    assert!(mb.log_text().contains("maxSandboxes"), "the refusal is not logged:\n{}", mb.log_text());
    // an ended session gives its place back
    let r = mb.request("DELETE", "/a/mcp", &[("mcp-session-id", a1.as_deref().unwrap())], None).await;
    assert!(matches!(r.status, 200 | 204), "DELETE: {}", r.status);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (st, _, _) = try_open(&mb, "a").await;
        if st == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the budget was not given back: {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn serve_check_prints_the_effective_limits() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("mcpbox.json");
    std::fs::write(
        &cfg,
        // Commands that exist and that `default` lets run: `--check` refuses any other.
        json!({"mcpServers": {"d": {"command": "/bin/true"}, "u": {"command": "/bin/true", "maxSessions": 0}, "t": {"command": "/bin/true", "maxSessions": 3}},
               "mcpbox": {"maxConnectionsPerAddress": 9, "headerTimeout": "5s"}})
        .to_string(),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mcpbox"))
        .args(["serve", "--check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    for want in [
        "d: maxSessions 16",
        "u: maxSessions unlimited",
        "t: maxSessions 3",
        "9 per client address",
        "headerTimeout 5s",
        "from the descriptor limit",
        "egress proxies: at most 64 connections per sandbox, ",
    ] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
}

/// Each connection buffers at most 64 KiB each way: a request head well over that (over 128 KiB:
/// the last read may take it past 64 KiB) is answered `431` and closed (hyper's default let
/// ~400 KiB in on every connection); one that fits is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_over_the_connection_buffer_gets_431() {
    let mb = Mcpbox::start(json!({"echo": echo("session")}), json!({})).await;
    for (pad, status) in [(60 << 10, "200"), (200 << 10, "431")] {
        let mut c = connect_from(1, mb.addr).await;
        let req = format!(
            "{}X-Pad: {}\r\nConnection: close\r\n\r\n",
            head(&mb, "GET /healthz HTTP/1.1\r\n"),
            "p".repeat(pad)
        );
        c.write_all(req.as_bytes()).await.unwrap();
        let (got, _) = read_to_eof(&mut c, Duration::from_secs(5)).await;
        assert!(got.starts_with(&format!("HTTP/1.1 {status} ")), "{pad}-byte header: {got:?}");
    }
}

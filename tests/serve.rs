//! End to end: a real `mcpbox serve` (the built binary, real sandboxes), the real
//! `@modelcontextprotocol/server-everything` from npm behind it (installed by
//! scripts/install-test-deps.sh), and real clients: the official Rust MCP SDK (rmcp) over
//! Streamable HTTP and over a legacy-SSE transport of ours, plus raw HTTP for the edge cases.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rmcp::model::{
    CallToolRequestParams, GetPromptRequestParams, ProgressNotificationParam, ReadResourceRequestParams,
};
use rmcp::service::{MaybeSendFuture, NotificationContext};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{ClientHandler, RoleClient, ServiceExt};
use serde_json::{json, Value};

use crate::serve_support::*;

/// The HTTP edge under hostile connections: timeouts, caps, the global budget.
mod edge;

/// Three replicas behind the shipped nginx configuration (deploy/nginx/mcpbox.conf).
mod replicas;

/// Two servers in one mcpbox: `ev` (a process per session) and `evs` (one shared process).
async fn both_modes(extra: Value) -> Mcpbox {
    Mcpbox::start(json!({"ev": everything("session"), "evs": everything("shared")}), extra).await
}

const SERVERS: [&str; 2] = ["ev", "evs"];

// ---- the SDK client, over both transports -----------------------------------------------------

/// An rmcp client handler that records the progress notifications it receives.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<ProgressNotificationParam>>>);

impl ClientHandler for Recorder {
    fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) -> impl Future<Output = ()> + MaybeSendFuture + '_ {
        self.0.lock().unwrap().push(params);
        std::future::ready(())
    }
}

fn args(v: Value) -> serde_json::Map<String, Value> {
    v.as_object().unwrap().clone()
}

/// Initialize, tools, resources, prompts, progress and the environment check, through rmcp.
async fn tour<T, E, A>(transport: T, label: &str)
where
    T: rmcp::transport::IntoTransport<RoleClient, E, A>,
    E: std::error::Error + Send + Sync + 'static,
{
    let rec = Recorder::default();
    let client = tokio::time::timeout(Duration::from_secs(20), rec.clone().serve(transport))
        .await
        .unwrap_or_else(|_| panic!("{label}: initialize timed out"))
        .unwrap_or_else(|e| panic!("{label}: initialize: {e}"));
    let info = serde_json::to_value(client.peer_info().expect("server info")).unwrap();
    assert!(info["serverInfo"]["name"].as_str().is_some_and(|n| n.contains("everything")), "{label}: {info}");

    let tools: Vec<String> = client.list_all_tools().await.unwrap().iter().map(|t| t.name.to_string()).collect();
    for want in ["echo", "get-sum", "get-env", "trigger-long-running-operation"] {
        assert!(tools.iter().any(|t| t == want), "{label}: {want} missing from {tools:?}");
    }
    let r = client
        .call_tool(
            CallToolRequestParams::new("echo").with_arguments(args(json!({"message": format!("hello over {label}")}))),
        )
        .await
        .unwrap();
    let r = serde_json::to_value(r).unwrap();
    assert_eq!(r["content"][0]["text"], format!("Echo: hello over {label}"), "{label}");
    let r = client
        .call_tool(CallToolRequestParams::new("get-sum").with_arguments(args(json!({"a": 2, "b": 40}))))
        .await
        .unwrap();
    let r = serde_json::to_value(r).unwrap();
    assert!(r["content"][0]["text"].as_str().unwrap().contains("is 42"), "{label}: {r}");

    let resources = client.list_all_resources().await.unwrap();
    assert!(!resources.is_empty(), "{label}: no resources");
    let uri = resources[0].uri.clone();
    let read =
        serde_json::to_value(client.read_resource(ReadResourceRequestParams::new(uri.clone())).await.unwrap()).unwrap();
    assert_eq!(read["contents"][0]["uri"], uri.as_str(), "{label}: {read}");
    assert!(read["contents"][0]["text"].as_str().is_some_and(|t| !t.is_empty()), "{label}: empty resource {read}");

    let prompts: Vec<String> = client.list_all_prompts().await.unwrap().iter().map(|p| p.name.clone()).collect();
    assert!(
        prompts.iter().any(|p| p == "simple-prompt") && prompts.iter().any(|p| p == "args-prompt"),
        "{label}: {prompts:?}"
    );
    let p = client
        .get_prompt(GetPromptRequestParams::new("args-prompt").with_arguments(args(json!({"city": "Lisbon"}))))
        .await
        .unwrap();
    let p = serde_json::to_value(p).unwrap();
    assert!(p.to_string().contains("Lisbon"), "{label}: {p}");

    // Progress, through the SDK's own notification handling (rmcp puts a progress token on
    // every request it sends).
    let params = CallToolRequestParams::new("trigger-long-running-operation")
        .with_arguments(args(json!({"duration": 0.6, "steps": 3})));
    let r = client.call_tool(params).await.unwrap();
    assert!(serde_json::to_value(r).unwrap().to_string().contains("completed"), "{label}");
    // rmcp hands notifications to the handler on its own task: the last one may be recorded
    // just after the call returns, so give it a moment (bounded) before counting.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while rec.0.lock().unwrap().len() < 3 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let got = rec.0.lock().unwrap().clone();
    assert_eq!(got.len(), 3, "{label}: progress notifications {got:?}");
    assert!(got.iter().all(|p| p.progress_token == got[0].progress_token), "{label}: mixed progress tokens: {got:?}");
    assert_eq!(got.iter().map(|p| p.progress).collect::<Vec<_>>(), [1.0, 2.0, 3.0], "{label}");

    // Nothing of mcpbox's environment reaches the server.
    let env = client.call_tool(CallToolRequestParams::new("get-env")).await.unwrap();
    let env = serde_json::to_value(env).unwrap()["content"][0]["text"].as_str().unwrap().to_string();
    assert!(env.contains("HOME"), "{label}: get-env did not print an environment: {env}");
    for secret in [CANARY, CANARY_VAR, TOKEN, "RUST_LOG", "CARGO_"] {
        assert!(!env.contains(secret), "{label}: the server sees {secret} from mcpbox's environment:\n{env}");
    }
    client.cancel().await.unwrap();
}

fn streamable_transport(mb: &Mcpbox, server: &str) -> StreamableHttpClientTransport<reqwest::Client> {
    StreamableHttpClientTransport::from_config(
        StreamableHttpClientTransportConfig::with_uri(mb.url(&format!("/{server}/mcp"))).auth_header(TOKEN),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rmcp_client_over_both_transports_and_both_isolation_modes() {
    let mb = both_modes(json!({})).await;
    for server in SERVERS {
        tour(streamable_transport(&mb, server), &format!("streamable-http/{server}")).await;
        tour(rmcp_legacy_transport(&mb, server).await, &format!("legacy-sse/{server}")).await;
    }
}

// ---- routing between sessions --------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_reaches_only_the_calling_session() {
    let mb = both_modes(json!({})).await;
    for server in SERVERS {
        let a = Streamable::open(&mb, server).await;
        let b = Legacy::open(&mb, server).await;
        let c = Streamable::open(&mb, server).await;
        let mut c_get = c.get_stream().await;
        // The same progress token in every session: only the caller may see its progress.
        let call = |id| {
            call_with_progress(
                json!(id),
                "trigger-long-running-operation",
                json!({"duration": 0.8, "steps": 4}),
                json!("p1"),
            )
        };

        // A (Streamable HTTP, answer as an SSE stream) calls; B and C must see nothing of it.
        let mut a_stream = a.request_sse(call(7)).await;
        let got = collect_for(&mut a_stream, Duration::from_secs(10)).await;
        let progress: Vec<&Value> = got.iter().filter(|v| is_progress(v)).collect();
        assert_eq!(progress.len(), 4, "{server}: A's stream: {got:?}");
        assert!(progress.iter().all(|p| p["params"]["progressToken"] == "p1"), "{server}: {got:?}");
        assert_eq!(got.last().unwrap()["id"], 7, "{server}: the answer ends A's stream: {got:?}");
        let b_seen = b.drain(Duration::from_millis(300)).await;
        assert!(!b_seen.iter().any(is_progress), "{server}: B saw A's progress: {b_seen:?}");
        let c_seen = collect_for(&mut c_get, Duration::from_millis(100)).await;
        assert!(!c_seen.iter().any(is_progress), "{server}: C saw A's progress: {c_seen:?}");

        // B (legacy SSE) calls; A and C must see nothing of it.
        let mut a_get = a.get_stream().await;
        let answer = b.request(call(7)).await;
        assert!(text_of(&answer).contains("completed"), "{server}: {answer}");
        let b_seen = b.drain(Duration::from_millis(100)).await;
        let b_progress: Vec<&Value> = b_seen.iter().filter(|v| is_progress(v)).collect();
        assert_eq!(b_progress.len(), 4, "{server}: B's stream: {b_seen:?}");
        let a_seen = collect_for(&mut a_get, Duration::from_millis(100)).await;
        let c_seen = collect_for(&mut c_get, Duration::from_millis(100)).await;
        assert!(
            !a_seen.iter().any(is_progress) && !c_seen.iter().any(is_progress),
            "{server}: A {a_seen:?} / C {c_seen:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clashing_request_ids_get_only_their_own_answers() {
    let mb = both_modes(json!({})).await;
    for server in SERVERS {
        let x = Streamable::open(&mb, server).await;
        let y = Streamable::open(&mb, server).await;
        let z = Legacy::open(&mb, server).await;
        const N: i64 = 25;
        // Every session uses ids 1..=N at the same time.
        let xs = futures::future::join_all(
            (1..=N).map(|i| x.request(call_msg(json!(i), "echo", json!({"message": format!("x-{i}")})))),
        );
        let ys = futures::future::join_all(
            (1..=N).map(|i| y.request(call_msg(json!(i), "echo", json!({"message": format!("y-{i}")})))),
        );
        let zs = async {
            for i in 1..=N {
                let r = z.post(&call_msg(json!(i), "echo", json!({"message": format!("z-{i}")})).to_string()).await;
                assert_eq!(r.status, 202);
            }
            let mut out = Vec::new();
            for i in 1..=N {
                out.push(
                    z.answer(&json!(i), Duration::from_secs(20))
                        .await
                        .unwrap_or_else(|| panic!("{server}: z: no answer to {i}")),
                );
            }
            out
        };
        let (xs, ys, zs) = tokio::join!(xs, ys, zs);
        for (name, answers) in [("x", xs), ("y", ys), ("z", zs)] {
            for (i, a) in (1..=N).zip(answers) {
                assert_eq!(a["id"], i, "{server}/{name}: {a}");
                assert_eq!(text_of(&a), format!("Echo: {name}-{i}"), "{server}/{name}: got someone else's answer: {a}");
            }
        }
        // Nothing extra on the legacy stream either: no answers meant for x or y.
        let extra = z.drain(Duration::from_millis(200)).await;
        assert!(extra.iter().all(|v| v.get("id").is_none()), "{server}: z got foreign answers {extra:?}");
    }
}

// ---- the edge ----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_but_health_needs_the_token() {
    let mb = Mcpbox::start(json!({"ev": everything("session")}), json!({})).await;
    let legacy = Legacy::open(&mb, "ev").await;
    let st = Streamable::open(&mb, "ev").await;
    let message = format!("/ev/message?sessionId={}", legacy.session_id);
    let ping = json!({"jsonrpc": "2.0", "id": 99, "method": "ping"}).to_string();
    let init = init_msg(json!(1)).to_string();
    let endpoints: Vec<(&str, String, Option<String>)> = vec![
        ("GET", "/ev/sse".into(), None),
        ("POST", message.clone(), Some(ping.clone())),
        ("POST", "/ev/mcp".into(), Some(init)),
        ("POST", "/ev/mcp".into(), Some(ping.clone())),
        ("GET", "/ev/mcp".into(), None),
        ("DELETE", "/ev/mcp".into(), None),
        ("GET", "/status".into(), None),
        ("GET", "/metrics".into(), None),
    ];
    for auth in [None, Some("Bearer wrong-token"), Some(&*format!("Bearer {TOKEN}x")), Some("Basic ZTJlOmUyZQ==")] {
        for (method, path, body) in &endpoints {
            let mut rb = mb
                .http
                .request(method.parse().unwrap(), mb.url(path))
                .header("accept", "application/json, text/event-stream")
                .header("content-type", "application/json")
                .header("mcp-session-id", &st.sid);
            if let Some(a) = auth {
                rb = rb.header("authorization", a);
            }
            if let Some(b) = body {
                rb = rb.body(b.clone());
            }
            let r = Resp::read(rb.send().await.unwrap()).await;
            assert_eq!(r.status, 401, "{method} {path} with {auth:?}: {}", r.body);
            assert!(
                r.header("www-authenticate").is_some_and(|v| v.starts_with("Bearer")),
                "{method} {path}: no WWW-Authenticate"
            );
        }
    }
    // Health needs no token; with the token everything works, and the sessions survived.
    for path in ["/healthz", "/readyz"] {
        assert_eq!(mb.http.get(mb.url(path)).send().await.unwrap().status(), 200, "{path}");
    }
    let status = mb.request("GET", "/status", &[], None).await;
    assert_eq!(status.status, 200);
    assert_eq!(status.json()["servers"]["ev"]["sessions"], 2, "{}", status.body);
    let metrics = mb.request("GET", "/metrics", &[], None).await;
    assert!(
        metrics.status == 200 && metrics.body.contains("mcpbox_sessions_active{server=\"ev\"} 2"),
        "{}",
        metrics.body
    );
    assert_eq!(
        text_of(&legacy.request(call_msg(json!(5), "echo", json!({"message": "still here"}))).await),
        "Echo: still here"
    );
    assert_eq!(
        text_of(&st.request(call_msg(json!(5), "echo", json!({"message": "still here"}))).await),
        "Echo: still here"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_origin_and_host_get_403() {
    let mb = Mcpbox::start(json!({"ev": everything("session")}), json!({})).await;
    let legacy = Legacy::open(&mb, "ev").await;
    let init = init_msg(json!(1)).to_string();
    let message = format!("/ev/message?sessionId={}", legacy.session_id);
    let ping = json!({"jsonrpc": "2.0", "id": 99, "method": "ping"}).to_string();
    let cases: [(&str, &str, Option<&str>); 4] = [
        ("POST", "/ev/mcp", Some(&init)),
        ("GET", "/ev/sse", None),
        ("POST", &message, Some(&ping)),
        ("GET", "/status", None),
    ];
    for (method, path, body) in cases {
        for (h, v) in [("origin", "https://evil.example"), ("origin", "null"), ("host", "rebind.evil.example")] {
            let headers =
                [(h, v), ("content-type", "application/json"), ("accept", "application/json, text/event-stream")];
            let r = mb.request(method, path, &headers, body.map(|b| b.as_bytes().to_vec())).await;
            assert_eq!(r.status, 403, "{method} {path} with {h}: {v}: {}", r.body);
        }
    }
    // A loopback origin is fine on a loopback bind.
    let port_origin = format!("http://localhost:{}", mb.addr.port());
    let r = mb
        .request(
            "POST",
            "/ev/mcp",
            &[("origin", port_origin.as_str()), ("content-type", "application/json"), ("accept", "application/json")],
            Some(init.into_bytes()),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

fn error_code(r: &Resp) -> i64 {
    r.json()["error"]["code"].as_i64().unwrap_or_else(|| panic!("not a JSON-RPC error: {}", r.body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_non_jsonrpc_and_oversized_bodies_get_clear_errors_and_sessions_survive() {
    let max = 64 * 1024;
    let mb = both_modes(json!({"maxBodyBytes": max})).await;
    let big = call_msg(json!(3), "echo", json!({"message": "x".repeat(max + 1024)})).to_string();
    for server in SERVERS {
        let st = Streamable::open(&mb, server).await;
        let legacy = Legacy::open(&mb, server).await;

        let r = st.post_raw("{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": ", &[]).await;
        assert_eq!((r.status, error_code(&r)), (400, -32700), "{server}: streamable, malformed: {}", r.body);
        let r = st.post_raw(r#"{"hello": "world", "id": 2}"#, &[]).await;
        assert_eq!((r.status, error_code(&r)), (400, -32600), "{server}: streamable, not JSON-RPC: {}", r.body);
        let r = st.post_raw(&big, &[]).await;
        assert_eq!(r.status, 413, "{server}: streamable, oversized: {}", r.body);

        let r = legacy.post("{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": ").await;
        assert_eq!((r.status, error_code(&r)), (400, -32700), "{server}: legacy, malformed: {}", r.body);
        let r = legacy.post(r#"[1, "two"]"#).await;
        assert_eq!((r.status, error_code(&r)), (400, -32600), "{server}: legacy, not JSON-RPC: {}", r.body);
        let r = legacy.post(&big).await;
        assert_eq!(r.status, 413, "{server}: legacy, oversized: {}", r.body);

        // Both sessions, and the server, are still fine; nothing leaked onto the streams.
        let a = st.request(call_msg(json!(4), "get-sum", json!({"a": 1, "b": 2}))).await;
        assert!(text_of(&a).contains("is 3"), "{server}: {a}");
        let a = legacy.request(call_msg(json!(4), "echo", json!({"message": "after"}))).await;
        assert_eq!(text_of(&a), "Echo: after", "{server}");
        let seen = legacy.drain(Duration::from_millis(100)).await;
        assert!(seen.iter().all(|v| v.get("id").is_none()), "{server}: {seen:?}");
        // A body just under the limit goes through.
        let fits = call_msg(json!(5), "echo", json!({"message": "y".repeat(max - 200)}));
        assert_eq!(text_of(&st.request(fits).await).len(), "Echo: ".len() + max - 200, "{server}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_ended_sessions_get_404() {
    let mb = Mcpbox::start(json!({"ev": everything("session")}), json!({})).await;
    let ping = json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}).to_string();
    let bogus = "0123456789abcdef0123456789abcdef";
    let json_ct = ("content-type", "application/json");
    let accept = ("accept", "application/json, text/event-stream");
    for (method, body) in [("POST", Some(ping.clone())), ("GET", None), ("DELETE", None)] {
        let r = mb
            .request(method, "/ev/mcp", &[("mcp-session-id", bogus), json_ct, accept], body.map(String::into_bytes))
            .await;
        assert_eq!(r.status, 404, "{method} /ev/mcp with an unknown session: {}", r.body);
    }
    let r = mb
        .request("POST", &format!("/ev/message?sessionId={bogus}"), &[json_ct], Some(ping.clone().into_bytes()))
        .await;
    assert_eq!(r.status, 404, "legacy POST, unknown session: {}", r.body);
    let r = mb.request("POST", "/ev/mcp", &[json_ct, accept], Some(ping.clone().into_bytes())).await;
    assert_eq!(r.status, 400, "no Mcp-Session-Id on a non-initialize POST: {}", r.body);
    let r = mb.request("GET", "/nope/sse", &[], None).await;
    assert_eq!(r.status, 404, "unknown server: {}", r.body);

    // Ended sessions: DELETE (streamable) and a closed GET stream (legacy).
    let st = Streamable::open(&mb, "ev").await;
    assert_eq!(st.delete().await, 204);
    assert_eq!(st.post_raw(&ping, &[]).await.status, 404, "POST after DELETE");
    let legacy = Legacy::connect(&mb, "ev").await;
    let message = legacy.post_url.clone();
    drop(legacy);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let r = Resp::read(
            mb.http
                .post(&message)
                .header("authorization", format!("Bearer {TOKEN}"))
                .header("content-type", "application/json")
                .body(ping.clone())
                .send()
                .await
                .unwrap(),
        )
        .await;
        if r.status == 404 {
            break;
        }
        assert!(Instant::now() < deadline, "legacy session still open 3 s after its stream closed: {}", r.status);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---- lifecycle -------------------------------------------------------------------------------

fn long_call(id: i64) -> Value {
    call_with_progress(
        json!(id),
        "trigger-long-running-operation",
        json!({"duration": 30, "steps": 60}),
        json!(format!("kill-{id}")),
    )
}

fn assert_server_error(v: &Value, what: &str) {
    assert!(v["error"]["code"].is_i64(), "{what}: expected a JSON-RPC error, got {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_request_fails_the_request_within_a_second() {
    use nix::sys::signal::Signal::SIGKILL;
    let mb = both_modes(json!({})).await;
    let limit = Duration::from_secs(1);

    // Shared server, legacy SSE client. (Wait for the shared process first: a request that
    // arrives before it is up is answered "MCP server exited" at once.)
    let shared = mb.server_of_session("-");
    let legacy = Legacy::open(&mb, "evs").await;
    assert_eq!(legacy.post(&long_call(11).to_string()).await.status, 202);
    loop {
        let m = legacy.next(Duration::from_secs(5)).await.expect("progress while the call runs");
        if is_progress(&m) {
            break;
        }
    }
    signal(shared.pid, SIGKILL);
    let t = Instant::now();
    let answer = legacy.answer(&json!(11), Duration::from_secs(5)).await.expect("an answer after the kill");
    let took = t.elapsed();
    assert_server_error(&answer, "shared/legacy");
    assert!(took < limit, "shared/legacy: error after {took:?}");
    // The shared server comes back (backoff 250 ms) and the session goes on.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = legacy.request(call_msg(json!(12), "echo", json!({"message": "back"}))).await;
        if r.get("result").is_some() {
            assert_eq!(text_of(&r), "Echo: back");
            break;
        }
        assert!(Instant::now() < deadline, "shared server not back: {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Session server, Streamable HTTP client, answer as an SSE stream.
    let st = Streamable::open(&mb, "ev").await;
    let proc = mb.server_of_session(&st.sid);
    let mut stream = st.request_sse(long_call(21)).await;
    let first =
        tokio::time::timeout(Duration::from_secs(5), stream.recv()).await.expect("progress in time").expect("progress");
    assert!(is_progress(&first), "{first}");
    signal(proc.pid, SIGKILL);
    let t = Instant::now();
    let rest = collect_for(&mut stream, Duration::from_secs(5)).await;
    let last = rest
        .iter()
        .find(|v| v.get("id").is_some())
        .unwrap_or_else(|| panic!("session/streamable-sse: no answer, got {rest:?}"));
    assert_server_error(last, "session/streamable-sse");
    assert!(
        t.elapsed() < limit + Duration::from_millis(200) || rest.len() < 3,
        "session/streamable-sse: stream ended late"
    );
    // The session is over with its process.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(st.post_raw(&call_msg(json!(22), "echo", json!({"message": "x"})).to_string(), &[]).await.status, 404);

    // Session server, Streamable HTTP client, JSON answer: the POST itself returns in time.
    let st = Streamable::open(&mb, "ev").await;
    let proc = mb.server_of_session(&st.sid);
    let killer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        signal(proc.pid, SIGKILL);
        Instant::now()
    });
    let r = st.post_raw(&long_call(31).to_string(), &[]).await;
    let done = Instant::now();
    let killed = killer.await.unwrap();
    let took = done.saturating_duration_since(killed);
    assert_server_error(&r.json(), "session/streamable-json");
    assert!(took < limit, "session/streamable-json: error after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_leaves_no_process_behind() {
    let mut mb = both_modes(json!({})).await;
    let legacy = Legacy::open(&mb, "ev").await;
    let st = Streamable::open(&mb, "ev").await;
    let shared = Streamable::open(&mb, "evs").await;
    // One call in flight while mcpbox is told to stop.
    let _inflight = st.request_sse(long_call(1)).await;
    let _inflight2 = shared.request_sse(long_call(2)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let procs = mb.descendants();
    let servers: Vec<&Proc> = procs.iter().filter(|p| p.cmdline.contains("server-everything")).collect();
    // Two session servers, the warm ones waiting for the next sessions (one, or two once the
    // pool has followed the two arrivals), and the shared one.
    assert!((4..=5).contains(&servers.len()), "{procs:#?}");
    assert!(procs.len() > servers.len(), "the sandbox inits are there too: {procs:#?}");

    let t = Instant::now();
    let status = mb.terminate(Duration::from_secs(10));
    assert!(status.success(), "mcpbox exit status {status}:\n{}", mb.log_text());
    let took = t.elapsed();
    let left: Vec<&Proc> = procs.iter().filter(|p| alive(p)).collect();
    assert!(left.is_empty(), "processes left behind after SIGTERM: {left:#?}");
    // Servers that answer TERM go at once; nobody waited for the grace period to run out.
    assert!(took < Duration::from_secs(2), "stopping took {took:?}");
    // Nor any process anywhere whose command line names this test's config or state dir.
    let strays: Vec<Proc> = all_procs().into_iter().filter(|p| p.cmdline.contains(&path_str(mb.dir.path()))).collect();
    assert!(strays.is_empty(), "{strays:#?}");
    drop(legacy);
}

// ---- url upstreams -------------------------------------------------------------------------

/// A `url` upstream's URL often carries its key (`?api_key=…`): it reaches the bridge in its
/// environment (owner-only), never on a command line that every host user can read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_upstreams_key_is_on_no_command_line() {
    let upstream = Mcpbox::start(json!({"ev": everything("session")}), json!({})).await;
    let canary = format!("canary{}x{}", std::process::id(), rand_suffix());
    let auth = json!({"Authorization": format!("Bearer {TOKEN}")});
    let mb = Mcpbox::start(
        json!({"up": {"url": upstream.url(&format!("/ev/mcp?api_key={canary}")), "headers": auth}}),
        json!({}),
    )
    .await;
    // A session through the bridge: it answers, so the bridge is running now.
    let s = mb
        .request(
            "POST",
            "/up/mcp",
            &[("content-type", "application/json"), ("accept", "application/json")],
            Some(init_msg(json!(1)).to_string().into_bytes()),
        )
        .await;
    let body = s.json();
    assert!(body["result"]["serverInfo"]["name"].is_string(), "initialize through the bridge: {body}");
    let bridges: Vec<Proc> = all_procs().into_iter().filter(|p| p.cmdline.contains("url-bridge")).collect();
    assert!(!bridges.is_empty(), "no url-bridge process is running");
    let leaks: Vec<Proc> = all_procs().into_iter().filter(|p| p.cmdline.contains(&canary)).collect();
    assert!(leaks.is_empty(), "the upstream's key is on a command line: {leaks:#?}");
    assert!(!mb.log_text().contains(&canary), "the upstream's key is in mcpbox's log");
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64
}

/// mcp-proxy configs name remote servers by `url`: mcpbox serves them through its own bridge,
/// itself sandboxed. Here the upstream is another mcpbox serving server-everything, reached
/// with its token in the configured `headers`, over both upstream transports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_upstreams_are_proxied_through_a_sandboxed_bridge() {
    let upstream = Mcpbox::start(json!({"ev": everything("session")}), json!({})).await;
    let auth = json!({"Authorization": format!("Bearer {TOKEN}")});
    let mb = Mcpbox::start(
        json!({
            "up": {"url": upstream.url("/ev/mcp"), "headers": auth},
            "upsse": {"url": upstream.url("/ev/sse"), "headers": auth},
        }),
        json!({}),
    )
    .await;
    tour(streamable_transport(&mb, "up"), "url upstream over streamable-http").await;
    tour(rmcp_legacy_transport(&mb, "upsse").await, "url upstream over legacy sse").await;
    // Each bridge ran in a full sandbox, like a server.
    let log = mb.log_text();
    for server in ["up", "upsse"] {
        let started = log.lines().any(|l| {
            l.contains("server started")
                && l.contains(&format!("\"server\":\"{server}\""))
                && l.contains("\"level\":\"full\"")
        });
        assert!(started, "no sandboxed start of the {server} bridge in the log:\n{log}");
    }
    // Without the upstream's token the bridge gets 401 and the client a clear error, not a hang.
    let bad = Mcpbox::start(json!({"noauth": {"url": upstream.url("/ev/mcp")}}), json!({})).await;
    let s = bad
        .request(
            "POST",
            "/noauth/mcp",
            &[("content-type", "application/json"), ("accept", "application/json")],
            Some(init_msg(json!(1)).to_string().into_bytes()),
        )
        .await;
    let body = s.json();
    assert!(
        body["error"]["message"].as_str().is_some_and(|m| m.contains("401")),
        "initialize without the upstream's token: {body}"
    );
}

/// A hostile `url` upstream: it answers a streamable-http POST with a redirect to another
/// origin, and a legacy SSE GET with an endpoint on another origin. Neither the messages nor
/// the configured credentials go there (the other origin here is a port of this host, as a
/// local service or cloud metadata would be), and a client never sees the upstream's key in
/// an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_upstream_cannot_send_the_bridge_elsewhere_and_its_key_stays_out_of_errors() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let trip = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    trip.set_nonblocking(true).unwrap();
    let elsewhere = format!("http://127.0.0.1:{}/steal", trip.local_addr().unwrap().port());
    let hostile = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hostile_addr = hostile.local_addr().unwrap();
    let target = elsewhere.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut c, _)) = hostile.accept().await else { return };
            let target = target.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let reply = if head.starts_with(b"GET ") {
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\nevent: endpoint\ndata: {target}\n\n"
                    )
                } else {
                    format!("HTTP/1.1 307 Temporary Redirect\r\nlocation: {target}\r\ncontent-length: 0\r\n\r\n")
                };
                let _ = c.write_all(reply.as_bytes()).await;
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    let canary = format!("key{}x{}", std::process::id(), rand_suffix());
    // A port nothing listens on: the upstream is unreachable.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let auth = json!({"X-Api-Key": canary});
    let mb = Mcpbox::start(
        json!({
            "redir": {"url": format!("http://{hostile_addr}/mcp"), "headers": auth},
            "sse": {"url": format!("http://{hostile_addr}/sse"), "headers": auth, "transportType": "sse"},
            "gone": {"url": format!("http://127.0.0.1:{closed}/mcp?api_key={canary}")},
        }),
        json!({}),
    )
    .await;
    let init = |server: &'static str| {
        let mb = &mb;
        async move {
            let path = format!("/{server}/mcp");
            let r = mb.request(
                "POST",
                &path,
                &[("content-type", "application/json"), ("accept", "application/json")],
                Some(init_msg(json!(1)).to_string().into_bytes()),
            );
            // Followed elsewhere, the bridge waits on a listener that never answers.
            tokio::time::timeout(Duration::from_secs(30), r).await.expect("an answer, not a hang").body
        }
    };
    let redir = init("redir").await;
    assert!(redir.contains("307"), "a redirect to another origin is an error: {redir}");
    let sse = init("sse").await;
    assert!(!sse.contains("\"result\""), "an endpoint on another origin is refused: {sse}");
    let gone = init("gone").await;
    assert!(gone.contains("unreachable") && !gone.contains(&canary), "{gone}");
    match trip.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Ok((_, peer)) => panic!("the bridge followed the upstream to another origin (from {peer})"),
        Err(e) => panic!("accept: {e}"),
    }
    assert!(mb.log_text().contains("another origin"), "the refused endpoint is logged");
}

/// A hostile url upstream sends what no bound of the bridge's would hold: an event of ten times
/// `maxLineBytes` (in short lines) before its initialize answer, a JSON answer of a hundred
/// times it (no Content-Length), and an event stream whose line never ends. The over-long event
/// is dropped and the answer after it arrives; the over-long JSON answer and the endless line
/// fail their requests with an error naming the limit; the session goes on; the log names the
/// limit and never the URL's key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_upstreams_over_long_events_answers_and_lines_are_bounded_by_max_line_bytes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const MAX: usize = 8192;
    let hostile = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hostile_addr = hostile.local_addr().unwrap();
    // The event streams of the legacy SSE upstream that answers (`/ev`), each with an endpoint
    // of its own (`/ev-message?c=N`, as warm bridges connect too): where its POSTs are answered.
    type Streams = Arc<Mutex<Vec<tokio::sync::mpsc::UnboundedSender<String>>>>;
    let ev_streams: Streams = Arc::default();
    tokio::spawn(async move {
        loop {
            let Ok((mut c, _)) = hostile.accept().await else { return };
            let ev_streams = ev_streams.clone();
            tokio::spawn(async move {
                // One request per connection (every answer says `connection: close`).
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                let head_end = loop {
                    if let Some(i) = req.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match c.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&req[..head_end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                while req.len() < head_end + len {
                    match c.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                if head.starts_with("get /sse") {
                    // Legacy SSE: the endpoint, then a line that never ends.
                    let open = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
                    let _ = c.write_all(format!("{open}event: endpoint\ndata: /message\n\ndata: ").as_bytes()).await;
                    let chunk = vec![b'z'; 64 * 1024];
                    for _ in 0..(100 * MAX / chunk.len()) {
                        if c.write_all(&chunk).await.is_err() {
                            return;
                        }
                    }
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    return;
                }
                let answer_of = |msg: &Value| -> Option<String> {
                    let id = &msg["id"];
                    Some(match msg["method"].as_str()? {
                        "initialize" => json!({"jsonrpc": "2.0", "id": id, "result": {"protocolVersion": "2024-11-05",
                            "capabilities": {}, "serverInfo": {"name": "hostile", "version": "0"}}})
                        .to_string(),
                        "ping" => json!({"jsonrpc": "2.0", "id": id, "result": {}}).to_string(),
                        // Ten times the limit, in lines of 100 bytes.
                        "resources/list" => format!(
                            "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{{\"pad\":\"\n{}\"}}}}",
                            format!("{}\n", "w".repeat(100)).repeat(10 * MAX / 100)
                        ),
                        _ => return None,
                    })
                };
                if head.starts_with("get /ev?") {
                    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                    let n = {
                        let mut streams = ev_streams.lock().unwrap();
                        streams.push(tx);
                        streams.len() - 1
                    };
                    let open = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
                    let _ = c.write_all(format!("{open}event: endpoint\ndata: /ev-message?c={n}\n\n").as_bytes()).await;
                    while let Some(data) = rx.recv().await {
                        let event: String = data.lines().map(|l| format!("data: {l}\n")).collect();
                        if c.write_all(format!("{event}\n").as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    return;
                }
                if let Some(rest) = head.strip_prefix("post /ev-message?c=") {
                    let _ =
                        c.write_all(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
                    let n: usize = rest.split(' ').next().unwrap().parse().unwrap();
                    let msg: Value = serde_json::from_slice(&req[head_end..head_end + len]).unwrap();
                    if let (Some(a), Some(tx)) = (answer_of(&msg), ev_streams.lock().unwrap().get(n)) {
                        let _ = tx.send(a);
                    }
                    return;
                }
                if !head.starts_with("post /mcp") {
                    let status = if head.starts_with("post ") { "202 Accepted" } else { "405 Method Not Allowed" };
                    let _ = c
                        .write_all(
                            format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").as_bytes(),
                        )
                        .await;
                    return;
                }
                let msg: Value = serde_json::from_slice(&req[head_end..head_end + len]).unwrap();
                let id = msg["id"].clone();
                let sse = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nmcp-session-id: s1\r\nconnection: close\r\n\r\n";
                match msg["method"].as_str().unwrap_or("") {
                    "initialize" => {
                        let mut body = sse.to_string();
                        let line = format!("data: {}\n", "x".repeat(100));
                        body.push_str(&line.repeat(10 * MAX / 100));
                        body.push('\n');
                        let answer = json!({"jsonrpc": "2.0", "id": id, "result": {"protocolVersion": "2025-06-18",
                            "capabilities": {"tools": {}}, "serverInfo": {"name": "hostile", "version": "0"}}});
                        body.push_str(&format!("data: {answer}\n\n"));
                        let _ = c.write_all(body.as_bytes()).await;
                    }
                    "tools/list" => {
                        let pad = "y".repeat(100 * MAX);
                        let answer = json!({"jsonrpc": "2.0", "id": id, "result": {"tools": [], "pad": pad}});
                        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n";
                        let _ = c.write_all(head.as_bytes()).await;
                        let _ = c.write_all(answer.to_string().as_bytes()).await;
                    }
                    "resources/list" => {
                        // An answer of ten times the limit, in lines of 100 bytes.
                        let mut body =
                            format!("{sse}data: {{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{{\"pad\":\"\n");
                        body.push_str(&format!("data: {}\n", "w".repeat(100)).repeat(10 * MAX / 100));
                        body.push_str("data: \"}}\n\n");
                        let _ = c.write_all(body.as_bytes()).await;
                    }
                    "tools/call" => {
                        let _ = c.write_all(format!("{sse}data: ").as_bytes()).await;
                        let chunk = vec![b'z'; 64 * 1024];
                        for _ in 0..(100 * MAX / chunk.len()) {
                            if c.write_all(&chunk).await.is_err() {
                                return;
                            }
                        }
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                    "ping" => {
                        let answer = json!({"jsonrpc": "2.0", "id": id, "result": {}}).to_string();
                        let head = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            answer.len()
                        );
                        let _ = c.write_all(format!("{head}{answer}").as_bytes()).await;
                    }
                    _ => {
                        let _ = c
                            .write_all(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                            .await;
                    }
                }
            });
        }
    });
    let canary = format!("key{}x{}", std::process::id(), rand_suffix());
    let mb = Mcpbox::start(
        json!({
            "hostile": {"url": format!("http://{hostile_addr}/mcp?api_key={canary}")},
            "legacy": {"url": format!("http://{hostile_addr}/sse?api_key={canary}")},
            "answering": {"url": format!("http://{hostile_addr}/ev?api_key={canary}"), "transportType": "sse"},
        }),
        json!({"maxLineBytes": MAX}),
    )
    .await;
    async fn within<T>(f: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(30), f).await.expect("an answer, not a hang")
    }
    // The initialize answer after the dropped event arrives (Streamable::open checks it).
    let st = within(Streamable::open(&mb, "hostile")).await;
    let listed = within(st.request(json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}))).await;
    let m = listed["error"]["message"].as_str().unwrap_or_default();
    assert!(m.contains("maxLineBytes") && m.contains(&MAX.to_string()), "{listed}");
    // An answer on an event stream too long for the limit fails its request the same way.
    let listed = within(st.request(json!({"jsonrpc": "2.0", "id": 5, "method": "resources/list"}))).await;
    let m = listed["error"]["message"].as_str().unwrap_or_default();
    assert!(m.contains("byte event from the upstream") && m.contains(&MAX.to_string()), "{listed}");
    let called = within(st.request(call_msg(json!(3), "anything", json!({})))).await;
    let m = called["error"]["message"].as_str().unwrap_or_default();
    assert!(m.contains("line longer than mcpbox.maxLineBytes") && m.contains(&MAX.to_string()), "{called}");
    let pong = within(st.request(json!({"jsonrpc": "2.0", "id": 4, "method": "ping"}))).await;
    assert_eq!(pong["result"], json!({}), "the session goes on: {pong}");
    // Legacy SSE: the stream is the bridge's only way to hear the upstream; a line that never
    // ends ends it, and the bridge with it, as a server's exit would.
    let r = within(mb.request(
        "POST",
        "/legacy/mcp",
        &[("content-type", "application/json"), ("accept", "application/json")],
        Some(init_msg(json!(1)).to_string().into_bytes()),
    ))
    .await;
    let r = r.json();
    assert!(r["error"]["message"].is_string() && r.get("result").is_none(), "the server's failure: {r}");
    // Legacy SSE: an answer too long fails its request (its opening names it), and the
    // stream goes on.
    let st = within(Streamable::open(&mb, "answering")).await;
    let listed = within(st.request(json!({"jsonrpc": "2.0", "id": 6, "method": "resources/list"}))).await;
    let m = listed["error"]["message"].as_str().unwrap_or_default();
    assert!(m.contains("byte event from the upstream") && m.contains(&MAX.to_string()), "{listed}");
    let pong = within(st.request(json!({"jsonrpc": "2.0", "id": 7, "method": "ping"}))).await;
    assert_eq!(pong["result"], json!({}), "the stream goes on: {pong}");
    let log = mb.log_text();
    assert!(log.contains(&format!("event from the upstream (longer than mcpbox.maxLineBytes, {MAX} bytes)")), "{log}");
    assert!(log.contains(&format!("has a line longer than mcpbox.maxLineBytes ({MAX} bytes)")), "{log}");
    assert!(log.contains("/mcp?…") && !log.contains(&canary), "the log names the URL without its key:\n{log}");
}

/// mcp-proxy's `timeout` is a deadline per request: a call that runs past it is answered with a
/// JSON-RPC error when it passes (not when the server finishes), the server is told to cancel it,
/// and the session goes on. `logEnabled` logs each client message of that server, not of others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_servers_timeout_answers_a_slow_request_with_an_error_in_time() {
    let mut timed = everything("session");
    // Long enough for the sandbox and node to start and answer initialize on a loaded machine
    // (the deadline covers every request, initialize included).
    timed["timeout"] = json!("4s");
    timed["options"] = json!({"logEnabled": true});
    let mb = Mcpbox::start(json!({"evt": timed, "ev": everything("session")}), json!({})).await;
    let st = Streamable::open(&mb, "evt").await;
    let t = Instant::now();
    let r = st.post_raw(&long_call(41).to_string(), &[]).await.json();
    let took = t.elapsed();
    assert_eq!(r["error"]["code"], -32001, "{r}");
    assert!(r["error"]["message"].as_str().is_some_and(|m| m.contains("timed out after 4s")), "{r}");
    assert!(
        took >= Duration::from_millis(3900) && took < Duration::from_secs(10),
        "answered after {took:?} (the call runs 30 s)"
    );
    let r = st.post_raw(&call_msg(json!(42), "echo", json!({"message": "still here"})).to_string(), &[]).await.json();
    assert_eq!(text_of(&r), "Echo: still here");
    // The other server has no timeout and logs no client messages.
    let other = Streamable::open(&mb, "ev").await;
    let r = other.post_raw(&call_msg(json!(43), "echo", json!({"message": "x"})).to_string(), &[]).await.json();
    assert_eq!(text_of(&r), "Echo: x");
    let log = mb.log_text();
    let logged: Vec<&str> = log.lines().filter(|l| l.contains("client message")).collect();
    assert!(logged.iter().any(|l| l.contains("\"evt\"") && l.contains("tools/call")), "{log}");
    assert!(!logged.iter().any(|l| l.contains("\"ev\"")), "logEnabled is per server:\n{log}");
    assert!(log.contains("request timed out after 4s"), "{log}");
}

// ---- budgets: mcpbox's own memory while a server floods ---------------------------------------

/// The hostile fixture (tests/fixtures/flood_mcp.py), copied where a server's uid can read it,
/// run by Debian's python under the shipped `python` policy.
fn flood_servers() -> (tempfile::TempDir, Value) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new().prefix("mcpbox-flood-").tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = dir.path().join("flood_mcp.py");
    std::fs::copy(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flood_mcp.py"), &script)
        .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let server = |isolation: &str| {
        json!({"command": "/usr/bin/python3", "args": [script], "isolation": isolation,
               "policy": {"extends": "python", "filesystem": {"read": [dir.path()]}}})
    };
    let servers = json!({"flood": server("session"), "calm": server("shared")});
    (dir, servers)
}

/// A `/proc/PID/status` field in KiB (VmRSS, VmHWM: the peak).
fn vm_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field} in {status}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The bound docs/DEPLOY.md states for mcpbox's own memory while one server floods.
const RSS_BOUND_MIB: u64 = 200;

/// A server that floods — 512 MiB of stderr without a newline, 64 MiB of 1 MiB notifications
/// to a Streamable client that has no GET stream, 1 GiB to a legacy SSE client that does not read —
/// moves mcpbox's peak RSS by a fixed amount, not by what it sends; the session that does not
/// read ends with the budget named; the healthy server beside it answers all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_server_leaves_mcpbox_within_its_memory_bound() {
    let (_fixtures, servers) = flood_servers();
    let mb = Mcpbox::start(servers, json!({"maxLineBytes": 2_000_000})).await;
    let calm = Streamable::open(&mb, "calm").await;
    let calm_answers = |i: u64| {
        let calm = &calm;
        async move {
            let r = tokio::time::timeout(
                Duration::from_secs(10),
                calm.request(call_msg(json!(i), "echo", json!({"text": "calm"}))),
            )
            .await;
            assert_eq!(text_of(&r.expect("the healthy server answers within 10 s")), "calm");
        }
    };
    calm_answers(0).await;
    let mut n = 1;

    // 1. stderr without a newline: read through a bounded buffer, the rest dropped and counted.
    let t = Instant::now();
    let flood = Streamable::open(&mb, "flood").await;
    let (r, ()) = tokio::join!(flood.request(call_msg(json!(1), "stderr", json!({"mb": 512}))), calm_answers(n));
    assert_eq!(text_of(&r), "done");
    n += 1;

    eprintln!("stderr flood done after {:?}", t.elapsed());
    // 2. 64 MiB of notifications to a session with no GET stream: the replay ring keeps the
    //    newest within the session budget; all of it passes through mcpbox.
    let (r, ()) =
        tokio::join!(flood.request(call_msg(json!(2), "flood", json!({"mb": 64, "size": 1 << 20}))), calm_answers(n));
    assert!(text_of(&r).parse::<u64>().unwrap() >= 64 << 20, "{r}");
    eprintln!("notification flood done after {:?}", t.elapsed());
    n += 1;
    assert_eq!(flood.delete().await, 204);

    // 3. The same to a legacy SSE client that reads its endpoint event and then nothing.
    let mut sse = mb
        .http
        .get(mb.url("/flood/sse"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    let mut head = String::new();
    while !head.contains("\n\n") {
        head.push_str(&String::from_utf8_lossy(&sse.chunk().await.unwrap().expect("the endpoint event")));
    }
    let endpoint = head.lines().find_map(|l| l.strip_prefix("data: ")).expect("endpoint").to_string();
    for msg in [init_msg(json!(0)), call_msg(json!(3), "flood", json!({"mb": 1024, "size": 1 << 20}))] {
        let r = mb
            .request("POST", &endpoint, &[("content-type", "application/json")], Some(msg.to_string().into_bytes()))
            .await;
        assert_eq!(r.status, 202);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !mb.log_text().contains("mcpbox.sessionBufferBytes exceeded") {
        assert!(Instant::now() < deadline, "the session that does not read was not ended:\n{}", mb.log_text());
        calm_answers(n).await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = mb
        .request(
            "POST",
            &endpoint,
            &[("content-type", "application/json")],
            Some(call_msg(json!(4), "pid", json!({})).to_string().into_bytes()),
        )
        .await;
    assert_eq!(r.status, 404, "the flooded session is gone");
    drop(sse);
    eprintln!("legacy flood ended after {:?}", t.elapsed());

    let log = mb.log_text();
    assert!(log.contains("more bytes of this line dropped"), "the stderr line's cut is logged:\n{log}");
    let peak = vm_kib(mb.pid(), "VmHWM:") / 1024;
    let now = vm_kib(mb.pid(), "VmRSS:") / 1024;
    eprintln!("mcpbox peak RSS {peak} MiB, now {now} MiB, while a server flooded");
    assert!(peak < RSS_BOUND_MIB, "mcpbox's peak RSS was {peak} MiB (bound {RSS_BOUND_MIB} MiB)");
    calm_answers(n).await;
}

/// Answers given as one JSON body count in their session's budget until the client has taken
/// them: a client that asks for 6 MB answers on 30 connections (each with a small receive
/// buffer, so that the kernel's socket buffers cannot take the answers off mcpbox's hands) and
/// reads none holds at most `sessionBufferBytes` of them in mcpbox (the rest get an error naming
/// the budget), not 30 × 6 MB; other sessions go on, and the budget is freed when those
/// connections close. `MCPBOX_TEST_SESSION_BUFFER=1073741824` runs it with a budget nothing
/// reaches, as before answers were counted: it then fails, printing how much RSS grew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_answers_nobody_reads_stay_within_the_session_budget() {
    use tokio::io::AsyncWriteExt;
    const BIG: usize = 6_000_000;
    const CONNS: usize = 30;
    let (_fixtures, servers) = flood_servers();
    let budget = std::env::var("MCPBOX_TEST_SESSION_BUFFER").map_or(8 << 20, |v| v.parse::<u64>().unwrap());
    let mb = Mcpbox::start(servers, json!({"maxLineBytes": 8_000_000, "sessionBufferBytes": budget})).await;
    let calm = Streamable::open(&mb, "calm").await;
    let flood = Streamable::open(&mb, "flood").await;
    let big = |id: Value| call_msg(id, "big", json!({"bytes": BIG}));
    assert_eq!(text_of(&flood.request(big(json!("read"))).await).len(), BIG, "read at once, it passes whole");
    let before = vm_kib(mb.pid(), "VmRSS:");
    let mut unread = Vec::new();
    for i in 0..CONNS {
        let body = big(json!(i)).to_string();
        let head = format!(
            "POST /flood/mcp HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {TOKEN}\r\nMcp-Session-Id: {}\r\n\
             Accept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            mb.addr,
            flood.sid,
            body.len()
        );
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut c = socket.connect(mb.addr).await.unwrap();
        c.write_all(format!("{head}{body}").as_bytes()).await.unwrap();
        unread.push(c);
    }
    let refused = |log: &str| log.matches("does not fit mcpbox.sessionBufferBytes").count();
    let deadline = Instant::now() + Duration::from_secs(60);
    // One fits in the 8 MiB budget; the others are refused.
    let expected = if budget == 8 << 20 { CONNS - 1 } else { 0 };
    while refused(&mb.log_text()) < expected {
        assert!(Instant::now() < deadline, "only {} refused:\n{}", refused(&mb.log_text()), mb.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(if expected == 0 { 20 } else { 1 })).await;
    let grown = vm_kib(mb.pid(), "VmRSS:").saturating_sub(before) / 1024;
    eprintln!("{CONNS} unread {BIG}-byte JSON answers, sessionBufferBytes {budget}: mcpbox's RSS grew by {grown} MiB");
    assert!(grown < 40, "mcpbox's RSS grew by {grown} MiB for answers nobody reads");
    // The session's budget is taken by its own unread answers: it gets the error; others go on.
    let r = flood.request(big(json!("more"))).await;
    let m = r["error"]["message"].as_str().unwrap_or_else(|| panic!("{r}"));
    assert!(m.contains("mcpbox.sessionBufferBytes"), "{m}");
    assert_eq!(text_of(&calm.request(call_msg(json!(1), "echo", json!({"text": "calm"}))).await), "calm");
    // Those connections gone, their answers are freed.
    drop(unread);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = flood.request(big(json!("again"))).await;
        if r.get("result").is_some() {
            assert_eq!(text_of(&r).len(), BIG);
            break;
        }
        assert!(Instant::now() < deadline, "the budget was not freed: {r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The CPU weight of the sandbox `pid` runs in (cgroup v2 `cpu.weight`, or v1 `cpu.shares`
/// scaled back), if it has a cpu cgroup.
fn cpu_weight_of(pid: u32) -> Option<u64> {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    for line in cg.lines() {
        let mut f = line.splitn(3, ':');
        let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        if ctrls.is_empty() {
            if let Ok(w) = std::fs::read_to_string(format!("/sys/fs/cgroup{path}/cpu.weight")) {
                return w.trim().parse().ok();
            }
        } else if ctrls.split(',').any(|c| c == "cpu") {
            for base in ["/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu"] {
                if let Ok(s) = std::fs::read_to_string(format!("{base}{path}/cpu.shares")) {
                    return s.trim().parse::<u64>().ok().map(|s| (s * 100).div_ceil(1024));
                }
            }
        }
    }
    None
}

/// Session starts are counted warm or cold, timed into the `mcpbox_session_start_seconds`
/// histogram, and a cold one is named in the log; the warm pool grows to the sessions that
/// arrived together. As root (cgroups), a warm process waits at the low CPU weight and is raised
/// to a live session's when taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_starts_are_measured_and_the_warm_pool_follows_arrivals() {
    let mb = Mcpbox::start(json!({"ev": everything("session")}), json!({})).await;
    // Ready, not only running: the warm process's pid shows before its start is finished (and
    // a session arriving then gets a cold start). /status shows the confinement level once the
    // process is in the pool, under the pool's lock, so a session that comes after sees it.
    let deadline = Instant::now() + Duration::from_secs(20);
    let warm = loop {
        let st = mb.request("GET", "/status", &[], None).await;
        let ready = serde_json::from_str::<serde_json::Value>(&st.body)
            .is_ok_and(|v| !v["servers"]["ev"]["confinement"].is_null());
        if let ([p], true) = (mb.servers().as_slice(), ready) {
            break p.clone();
        }
        assert!(Instant::now() < deadline, "no warm process ready after 20 s:\n{}", mb.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let root = nix::unistd::geteuid().is_root();
    if root {
        assert_eq!(cpu_weight_of(warm.pid), Some(10), "the waiting warm process's cgroup");
    }
    let first = Streamable::open(&mb, "ev").await;
    let taken = mb.server_of_session(&first.sid);
    assert_eq!(taken.pid, warm.pid, "the first session did not get the warm process");
    if root {
        assert_eq!(cpu_weight_of(taken.pid), Some(100), "the weight of a taken warm process was not raised");
    }
    // Two more at once: at most one process can be waiting by now, so one start at least is cold.
    let (a, b) = tokio::join!(Streamable::open(&mb, "ev"), Streamable::open(&mb, "ev"));
    let m = mb.request("GET", "/metrics", &[], None).await;
    assert_eq!(m.status, 200);
    let value = |name: &str| -> u64 {
        m.body
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{}", m.body))
    };
    let (w, c) = (
        value("mcpbox_session_starts_total{server=\"ev\",start=\"warm\"}"),
        value("mcpbox_session_starts_total{server=\"ev\",start=\"cold\"}"),
    );
    assert!(w >= 1 && c >= 1 && w + c == 3, "warm {w}, cold {c}:\n{}", m.body);
    assert_eq!(value("mcpbox_session_start_seconds_count{server=\"ev\"}"), 3, "{}", m.body);
    assert_eq!(value("mcpbox_session_start_seconds_bucket{server=\"ev\",le=\"+Inf\"}"), 3, "{}", m.body);
    assert!(
        m.body.contains("# TYPE mcpbox_session_start_seconds histogram") && m.body.contains("le=\"0.005\""),
        "{}",
        m.body
    );
    assert!(
        mb.log_text().contains("the session waits for a cold start"),
        "a cold start was not logged:\n{}",
        mb.log_text()
    );
    // Three sessions arrived within the window: three processes wait beside the three sessions.
    let deadline = Instant::now() + Duration::from_secs(30);
    while mb.servers().len() < 6 {
        assert!(
            Instant::now() < deadline,
            "the warm pool did not grow to 3 ({} servers running):\n{}",
            mb.servers().len(),
            mb.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop((a, b));
}

/// `mcpbox.memoryMerge`: every process of a session sandbox (its sandbox-init pair and the
/// server) is KSM-mergeable, as the kernel reports in `/proc/PID/ksm_stat`; without the key,
/// none is. And the node base's `[runtime] node_flags` reach the served node's command line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_merge_reaches_every_process_of_a_sandbox_only_when_asked() {
    async fn warm_tree(mb: &Mcpbox) -> (crate::common::Proc, Vec<crate::common::Proc>) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let server = loop {
            if let [p] = mb.servers().as_slice() {
                break p.clone();
            }
            assert!(Instant::now() < deadline, "no warm process after 20 s:\n{}", mb.log_text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let inits: Vec<_> = mb.descendants().into_iter().filter(|p| p.cmdline.contains("sandbox-init")).collect();
        (server, inits)
    }
    fn merge_any(pid: u32) -> String {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/ksm_stat")).unwrap();
        stat.lines().find_map(|l| l.strip_prefix("ksm_merge_any: ")).unwrap_or_default().to_string()
    }
    for (on, want) in [(true, "yes"), (false, "no")] {
        let mb = Mcpbox::start(json!({"ev": everything("session")}), json!({"memoryMerge": on})).await;
        let (server, inits) = warm_tree(&mb).await;
        assert_eq!(server.argv.get(1).map(String::as_str), Some("--optimize-for-size"), "{:?}", server.argv);
        assert!(inits.len() >= 2, "the sandbox-init pair: {inits:?}");
        // Rootless, sandbox-init is not dumpable (its /proc files are root's): only root reads them.
        let inits = if nix::unistd::geteuid().is_root() { inits } else { Vec::new() };
        for p in inits.iter().chain([&server]) {
            assert_eq!(merge_any(p.pid), want, "memoryMerge {on}: {:?}", p.argv);
        }
    }
}

//! 2026-07-28 stateless requests on `/NAME/mcp`, against the Python echo fixture (raw HTTP).

use std::net::SocketAddr;

use serde_json::{json, Value};

use super::tests::{call, send, start_text, Resp, Srv, FIXTURE};

async fn start() -> Srv {
    start_text(format!(
        r#"{{"mcpProxy":{{"addr":"127.0.0.1:9090"}},
            "mcpServers":{{
              "pr":{{"command":"/usr/bin/python3","args":["{FIXTURE}"],"isolation":"principal",
                     "options":{{"authTokens":["P1","P2"]}}}},
              "se":{{"command":"/usr/bin/python3","args":["{FIXTURE}"],"options":{{"authTokens":["P1","P2"]}}}},
              "sh":{{"command":"/usr/bin/python3","args":["{FIXTURE}"],"isolation":"shared",
                     "options":{{"authTokens":["P1","P2"]}}}} }}}}"#
    ))
    .await
}

fn body(id: Value, method: &str, mut params: Value, caps: Value) -> String {
    params["_meta"] = json!({"io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": caps,
        "io.modelcontextprotocol/clientInfo": {"name": "t", "version": "0"}});
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string()
}

/// A well-formed 2026-07-28 request from `token` to `server`.
async fn sl(a: SocketAddr, server: &str, token: &str, method: &str, params: Value, caps: Value) -> Resp {
    let name = params.get("name").and_then(Value::as_str).unwrap_or("").to_string();
    let auth = format!("Bearer {token}");
    let mut h = vec![
        ("Authorization", auth.as_str()),
        ("Accept", "application/json, text/event-stream"),
        ("Content-Type", "application/json"),
        ("MCP-Protocol-Version", "2026-07-28"),
        ("Mcp-Method", method),
    ];
    if method == "tools/call" {
        h.push(("Mcp-Name", name.as_str()));
    }
    call(a, "POST", &format!("/{server}/mcp"), &h, &body(json!(7), method, params, caps)).await
}

fn text(r: &Resp) -> String {
    let v = r.json();
    assert_eq!(v["result"]["resultType"], "complete", "{v}");
    v["result"]["content"][0]["text"].as_str().unwrap_or_else(|| panic!("{v}")).to_string()
}

#[tokio::test]
async fn discover_list_and_call_without_initialize_or_session() {
    let s = start().await;
    let a = s.addr;
    let r = sl(a, "pr", "P1", "server/discover", json!({}), json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.header("mcp-session-id").is_none());
    let v = r.json();
    assert_eq!(v["id"], 7);
    assert_eq!(v["result"]["resultType"], "complete");
    assert_eq!(v["result"]["supportedVersions"], json!(["2026-07-28"]));
    assert_eq!(v["result"]["serverInfo"]["name"], "echo", "from the backend's own initialize: {v}");
    assert_eq!(v["result"]["_meta"]["io.modelcontextprotocol/serverInfo"]["name"], "echo", "{v}");
    assert_eq!(v["result"]["capabilities"]["tools"]["listChanged"], true);
    let r = sl(a, "pr", "P1", "tools/list", json!({}), json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["result"]["resultType"], "complete");
    // A 2025-era server gives no caching hints: mcpbox says "do not cache, private".
    assert_eq!(
        (r.json()["result"]["ttlMs"].clone(), r.json()["result"]["cacheScope"].clone()),
        (json!(0), json!("private"))
    );
    assert!(r.json()["result"]["tools"].as_array().unwrap().iter().any(|t| t["name"] == "echo"));
    let r = sl(a, "pr", "P1", "tools/call", json!({"name": "echo", "arguments": {"text": "hi"}}), json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(text(&r), "hi");
    assert_eq!(r.json()["id"], 7, "the client's id comes back");
    // The other isolation modes answer stateless requests too; a 2025 session still works beside them.
    for server in ["se", "sh"] {
        let r =
            sl(a, server, "P2", "tools/call", json!({"name": "echo", "arguments": {"text": server}}), json!({})).await;
        assert_eq!(text(&r), server);
    }
    let init = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"0"}}});
    let r =
        call(a, "POST", "/pr/mcp", &[("Authorization", "P1"), ("Accept", "application/json")], &init.to_string()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.header("mcp-session-id").is_some());
    s.sup.shutdown().await;
}

#[tokio::test]
async fn required_headers_are_checked_and_named() {
    let s = start().await;
    let a = s.addr;
    let call_body = body(json!(1), "tools/call", json!({"name": "echo", "arguments": {}}), json!({}));
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![("Mcp-Method", "tools/call"), ("Mcp-Name", "echo")], "MCP-Protocol-Version"),
        (vec![("MCP-Protocol-Version", "2026-07-28"), ("Mcp-Name", "echo")], "Mcp-Method"),
        (
            vec![("MCP-Protocol-Version", "2026-07-28"), ("Mcp-Method", "tools/list"), ("Mcp-Name", "echo")],
            "Mcp-Method",
        ),
        (vec![("MCP-Protocol-Version", "2026-07-28"), ("Mcp-Method", "tools/call")], "Mcp-Name"),
        (
            vec![("MCP-Protocol-Version", "2026-07-28"), ("Mcp-Method", "tools/call"), ("Mcp-Name", "secret")],
            "Mcp-Name",
        ),
    ];
    for (extra, named) in cases {
        let mut h = vec![("Authorization", "P1"), ("Accept", "application/json")];
        h.extend(extra.iter().cloned());
        let r = call(a, "POST", "/pr/mcp", &h, &call_body).await;
        assert_eq!(r.status, 400, "{extra:?}: {}", r.body);
        let v = r.json();
        assert_eq!(v["error"]["code"], -32020, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(named), "{extra:?} names {named}: {v}");
        assert_eq!(v["id"], 1);
    }
    // The header and the body's _meta must agree.
    let mut v: Value = serde_json::from_str(&call_body).unwrap();
    v["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"] = json!("2099-01-01");
    let h = [
        ("Authorization", "P1"),
        ("MCP-Protocol-Version", "2026-07-28"),
        ("Mcp-Method", "tools/call"),
        ("Mcp-Name", "echo"),
    ];
    let r = call(a, "POST", "/pr/mcp", &h, &v.to_string()).await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("MCP-Protocol-Version"));
    // An unknown version is refused as before; no backend was started for any of these.
    let r = call(a, "POST", "/pr/mcp", &[("Authorization", "P1"), ("MCP-Protocol-Version", "2099-01-01")], &call_body)
        .await;
    assert_eq!(r.status, 400);
    let v = r.json();
    assert_eq!(v["error"]["code"], -32022, "{v}");
    assert_eq!(v["error"]["data"]["supported"], json!(["2025-03-26", "2025-06-18", "2025-11-25", "2026-07-28"]));
    assert_eq!(v["error"]["data"]["requested"], "2099-01-01");
    assert_eq!(s.sup.server("pr").unwrap().active_sessions(), 0);
    s.sup.shutdown().await;
}

fn count(r: &Resp) -> (u64, u64) {
    let t = text(r);
    let (n, pid) = t.split_once(' ').unwrap();
    (n.parse().unwrap(), pid.parse().unwrap())
}

#[tokio::test]
async fn one_process_per_principal_whose_state_persists() {
    let s = start().await;
    let a = s.addr;
    let c = |tok: &'static str, server: &'static str| async move {
        count(&sl(a, server, tok, "tools/call", json!({"name": "count", "arguments": {}}), json!({})).await)
    };
    for server in ["pr", "se"] {
        let (n1, p1) = c("P1", server).await;
        let (n2, p2) = c("P1", server).await;
        assert_eq!((n1, n2), (1, 2), "{server}: the principal's state persists between requests");
        assert_eq!(p1, p2, "{server}: one process for one principal");
        let (m1, q1) = c("P2", server).await;
        assert_eq!(m1, 1, "{server}: another principal starts from nothing");
        assert_ne!(q1, p1, "{server}: different principals never share a process");
        assert!(super::tests::alive(p1) && super::tests::alive(q1));
        assert_eq!(c("P1", server).await, (3, p1));
    }
    // Shared: one process for everyone.
    let (_, p1) = c("P1", "sh").await;
    let (_, p2) = c("P2", "sh").await;
    assert_eq!(p1, p2);
    s.sup.shutdown().await;
}

fn ask_params() -> Value {
    json!({"name": "ask", "arguments": {}})
}

#[tokio::test]
async fn elicitation_becomes_an_input_required_round_trip() {
    let s = start().await;
    let a = s.addr;
    let caps = json!({"elicitation": {}});
    let r = sl(a, "pr", "P1", "tools/call", ask_params(), caps.clone()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["result"]["resultType"], "input_required", "{v}");
    let reqs = v["result"]["inputRequests"].as_object().unwrap();
    assert_eq!(reqs.len(), 1);
    let (k, req) = reqs.iter().next().unwrap();
    assert_eq!(req["method"], "elicitation/create");
    assert_eq!(req["params"]["message"], "name?");
    let state = v["result"]["requestState"].as_str().unwrap().to_string();
    let retry = |state: &str| {
        let mut p = ask_params();
        p["inputResponses"] = json!({k.clone(): {"action": "accept", "content": {"name": "ada"}}});
        p["requestState"] = json!(state);
        p
    };
    // Altered, or presented by another principal: refused, and the round stays usable.
    let mut bad = state.clone();
    let last = bad.pop().unwrap();
    bad.push(if last == '0' { '1' } else { '0' });
    let r = sl(a, "pr", "P1", "tools/call", retry(&bad), caps.clone()).await;
    assert_eq!(r.json()["error"]["code"], -32602, "{}", r.body);
    let r = sl(a, "pr", "P2", "tools/call", retry(&state), caps.clone()).await;
    assert_eq!(r.json()["error"]["code"], -32602, "{}", r.body);
    let r = sl(a, "pr", "P1", "tools/call", retry(&state), caps.clone()).await;
    let t = text(&r);
    let answer: Value = serde_json::from_str(&t).unwrap();
    assert_eq!(answer["result"]["content"]["name"], "ada", "the server got the client's answer: {answer}");
    // Replayed: refused.
    let r = sl(a, "pr", "P1", "tools/call", retry(&state), caps.clone()).await;
    assert_eq!(r.json()["error"]["code"], -32602, "{}", r.body);
    // The backend goes on serving.
    let r = sl(a, "pr", "P1", "tools/call", json!({"name": "echo", "arguments": {"text": "after"}}), caps).await;
    assert_eq!(text(&r), "after");
    s.sup.shutdown().await;
}

#[tokio::test]
async fn an_undeclared_capability_is_answered_by_mcpbox() {
    let s = start().await;
    let a = s.addr;
    let r = sl(a, "pr", "P1", "tools/call", ask_params(), json!({})).await;
    let t = text(&r);
    let answer: Value = serde_json::from_str(&t).unwrap();
    assert_eq!(answer["error"]["code"], -32601, "mcpbox refused on the client's behalf: {answer}");
    s.sup.shutdown().await;
}

/// A 2025-11-25 session on the shared server whose client declares `caps`.
async fn open_2025(a: SocketAddr, caps: Value) -> String {
    let init = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":caps,"clientInfo":{"name":"t","version":"0"}}});
    let r =
        call(a, "POST", "/sh/mcp", &[("Authorization", "P1"), ("Accept", "application/json")], &init.to_string()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let sid = r.header("mcp-session-id").unwrap().to_string();
    let n = json!({"jsonrpc":"2.0","method":"notifications/initialized"}).to_string();
    call(a, "POST", "/sh/mcp", &[("Authorization", "P1"), ("Mcp-Session-Id", &sid)], &n).await;
    sid
}

#[tokio::test]
async fn shared_mode_asks_only_the_session_whose_call_it_is() {
    let s = start().await;
    let a = s.addr;
    // B's client declared no capability at all; the shared server was initialized with all.
    let (sa, sb) = (open_2025(a, json!({"elicitation": {}})).await, open_2025(a, json!({})).await);
    let sse = ("Accept", "application/json, text/event-stream");
    let ask = |id: u64, delay: u64| {
        json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":"ask","arguments":{"delay_ms":delay}}})
            .to_string()
    };
    let echo = |id: u64| {
        json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":"echo","arguments":{"text":"b"}}})
            .to_string()
    };
    let ha = [("Authorization", "P1"), sse, ("Mcp-Session-Id", sa.as_str())];
    let hb = [("Authorization", "P1"), sse, ("Mcp-Session-Id", sb.as_str())];
    // B's GET stream: anything of A's that leaked to B would show here or on B's POST stream.
    let mut gb = send(
        a,
        "GET",
        "/sh/mcp",
        &[("Authorization", "P1"), ("Accept", "text/event-stream"), ("Mcp-Session-Id", &sb)],
        "",
    )
    .await;
    assert_eq!(gb.status, 200);

    // A alone is busy: A is asked (on its call's stream), answers, and its call completes.
    let mut ca = send(a, "POST", "/sh/mcp", &ha, &ask(1, 0)).await;
    let (_, d, _) = ca.event().await.unwrap();
    let req: Value = serde_json::from_str(&d).unwrap();
    assert_eq!(req["method"], "elicitation/create", "{req}");
    let answer = json!({"jsonrpc":"2.0","id":req["id"],"result":{"action":"accept","content":{"who":"a"}}}).to_string();
    assert_eq!(call(a, "POST", "/sh/mcp", &[ha[0], ha[2]], &answer).await.status, 202);
    let (_, d, _) = ca.event().await.unwrap();
    let done: Value = serde_json::from_str(&d).unwrap();
    assert!(done["result"]["content"][0]["text"].as_str().unwrap().contains("\"who\": \"a\""), "{done}");

    // The server asks during A's call while B's call is in flight: not guessed, refused.
    let ask2 = ask(2, 400);
    let ca = send(a, "POST", "/sh/mcp", &ha, &ask2);
    let cb = async {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        send(a, "POST", "/sh/mcp", &hb, &echo(2)).await
    };
    let (mut ca, mut cb) = tokio::join!(ca, cb);
    let (_, d, _) = cb.event().await.unwrap();
    let v: Value = serde_json::from_str(&d).unwrap();
    assert_eq!(
        (v["id"].clone(), v["result"]["content"][0]["text"].clone()),
        (json!(2), json!("b")),
        "B gets only its own answer: {v}"
    );
    assert!(cb.event().await.is_none(), "and nothing else");
    let (_, d, _) = ca.event().await.unwrap();
    let v: Value = serde_json::from_str(&d).unwrap();
    assert_eq!(v["id"], 2, "A's call ends with the server's result, not a question: {v}");
    let inner: Value = serde_json::from_str(v["result"]["content"][0]["text"].as_str().unwrap()).unwrap();
    assert_eq!(inner["error"]["code"], -32603, "the server's request was refused: {inner}");

    // B's own call asks for elicitation, which B's client did not declare: mcpbox answers for it.
    let r = call(a, "POST", "/sh/mcp", &hb, &ask(3, 0)).await;
    assert!(r.body.contains("elicitation capability"), "{}", r.body);
    assert!(!r.body.contains("elicitation/create"), "B was never asked: {}", r.body);
    // B's GET stream saw nothing at all.
    let nothing = tokio::time::timeout(std::time::Duration::from_millis(300), gb.event()).await;
    assert!(nothing.is_err(), "B's GET stream got {nothing:?}");
    s.sup.shutdown().await;
}

#[tokio::test]
async fn listen_streams_what_the_filter_asks_for_from_the_principals_backend() {
    let s = start().await;
    let a = s.addr;
    let listen = |tok: &'static str| async move {
        let b = body(
            json!("L"),
            "subscriptions/listen",
            json!({"notifications": {"toolsListChanged": true, "resourceSubscriptions": ["file:///x"]}}),
            json!({}),
        );
        let auth = format!("Bearer {tok}");
        let h = [
            ("Authorization", auth.as_str()),
            ("Accept", "application/json, text/event-stream"),
            ("MCP-Protocol-Version", "2026-07-28"),
            ("Mcp-Method", "subscriptions/listen"),
        ];
        send(a, "POST", "/pr/mcp", &h, &b).await
    };
    let mut l1 = listen("P1").await;
    assert_eq!(l1.status, 200);
    let (_, d, _) = l1.event().await.unwrap();
    let ack: Value = serde_json::from_str(&d).unwrap();
    assert_eq!(ack["method"], "notifications/subscriptions/acknowledged");
    assert_eq!(
        ack["params"]["notifications"],
        json!({"toolsListChanged": true, "resourceSubscriptions": ["file:///x"]})
    );
    assert_eq!(ack["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"], "L");
    let mut l2 = listen("P2").await;
    l2.event().await.unwrap();
    // P1's call makes its server say its tools changed: P1's stream gets it, P2's does not.
    let r = sl(a, "pr", "P1", "tools/call", json!({"name": "notify", "arguments": {}}), json!({})).await;
    assert_eq!(text(&r), "notify");
    let (_, d, _) = l1.event().await.unwrap();
    let n: Value = serde_json::from_str(&d).unwrap();
    assert_eq!(n["method"], "notifications/tools/list_changed");
    assert_eq!(n["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"], "L");
    let nothing = tokio::time::timeout(std::time::Duration::from_millis(300), l2.event()).await;
    assert!(nothing.is_err(), "P2's stream got {nothing:?}");
    s.sup.shutdown().await;
}

#[tokio::test]
async fn progress_comes_on_the_answer_stream_and_a_client_that_leaves_cancels() {
    let s = start().await;
    let a = s.addr;
    let mut b: Value = serde_json::from_str(&body(
        json!(7),
        "tools/call",
        json!({"name": "echo", "arguments": {"text": "p"}}),
        json!({}),
    ))
    .unwrap();
    b["params"]["_meta"]["progressToken"] = json!("pt");
    let h = [
        ("Authorization", "P1"),
        ("Accept", "application/json, text/event-stream"),
        ("MCP-Protocol-Version", "2026-07-28"),
        ("Mcp-Method", "tools/call"),
        ("Mcp-Name", "echo"),
    ];
    let mut c = send(a, "POST", "/pr/mcp", &h, &b.to_string()).await;
    let (_, d, _) = c.event().await.unwrap();
    let p: Value = serde_json::from_str(&d).unwrap();
    assert_eq!(
        (p["method"].clone(), p["params"]["progressToken"].clone()),
        (json!("notifications/progress"), json!("pt")),
        "{p}"
    );
    let (_, d, _) = c.event().await.unwrap();
    let r: Value = serde_json::from_str(&d).unwrap();
    assert_eq!((r["id"].clone(), r["result"]["resultType"].clone()), (json!(7), json!("complete")), "{r}");
    assert!(c.event().await.is_none(), "the stream ends with the answer");
    // A slow call whose client goes away is cancelled at the server.
    let slow = body(json!(8), "tools/call", json!({"name": "slow", "arguments": {"ms": 600}}), json!({}));
    let h = [
        ("Authorization", "P1"),
        ("MCP-Protocol-Version", "2026-07-28"),
        ("Mcp-Method", "tools/call"),
        ("Mcp-Name", "slow"),
    ];
    let c = send(a, "POST", "/pr/mcp", &h, &slow);
    let _ = tokio::time::timeout(std::time::Duration::from_millis(150), c).await;
    let r = sl(a, "pr", "P1", "tools/call", json!({"name": "cancelled", "arguments": {}}), json!({})).await;
    let cancelled: Value = serde_json::from_str(&text(&r)).unwrap();
    assert_eq!(cancelled.as_array().map(Vec::len), Some(1), "the server was told: {cancelled}");
    s.sup.shutdown().await;
}

#[tokio::test]
async fn log_messages_only_for_a_request_that_opts_in_and_at_its_level() {
    let s = start().await;
    let a = s.addr;
    let h = [
        ("Authorization", "P1"),
        ("Accept", "application/json, text/event-stream"),
        ("MCP-Protocol-Version", "2026-07-28"),
        ("Mcp-Method", "tools/call"),
        ("Mcp-Name", "log"),
    ];
    let mut b: Value =
        serde_json::from_str(&body(json!(5), "tools/call", json!({"name": "log", "arguments": {}}), json!({})))
            .unwrap();
    b["params"]["_meta"]["io.modelcontextprotocol/logLevel"] = json!("info");
    let mut c = send(a, "POST", "/pr/mcp", &h, &b.to_string()).await;
    let (_, d, _) = c.event().await.unwrap();
    let m: Value = serde_json::from_str(&d).unwrap();
    assert_eq!(
        (m["method"].clone(), m["params"]["level"].clone()),
        (json!("notifications/message"), json!("warning")),
        "debug is below info: {m}"
    );
    let (_, d, _) = c.event().await.unwrap();
    assert_eq!(serde_json::from_str::<Value>(&d).unwrap()["id"], 5);
    assert!(c.event().await.is_none());
    // No opt-in: no log lines, one JSON answer.
    let r = sl(a, "pr", "P1", "tools/call", json!({"name": "log", "arguments": {}}), json!({})).await;
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(text(&r), "log");
    s.sup.shutdown().await;
}

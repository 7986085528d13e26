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
    // Every version the endpoint serves: an unsupported-version error lists the same ones.
    assert_eq!(v["result"]["supportedVersions"], json!(["2025-03-26", "2025-06-18", "2025-11-25", "2026-07-28"]));
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
    assert_eq!(v["id"], 1, "the error carries the request's id: {v}");
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
    assert_eq!(k, "srv-1", "the key is the server's own id for its request");
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
    // The 2026-07-28 MissingRequiredClientCapabilityError, naming the capability.
    assert_eq!(answer["error"]["code"], -32021, "mcpbox refused on the client's behalf: {answer}");
    assert_eq!(answer["error"]["data"]["requiredCapabilities"], json!({"elicitation": {}}), "{answer}");
    // A server that ends its call with that error: the client gets it with HTTP 400.
    let p = json!({"name": "ask", "arguments": {"method": "sampling/createMessage", "pass_error": true}});
    let r = sl(a, "pr", "P1", "tools/call", p, json!({"elicitation": {}})).await;
    assert_eq!(r.status, 400, "{}", r.body);
    let v = r.json();
    assert_eq!((v["id"].clone(), v["error"]["code"].clone()), (json!(7), json!(-32021)), "{v}");
    assert_eq!(v["error"]["data"]["requiredCapabilities"], json!({"sampling": {}}), "{v}");
    s.sup.shutdown().await;
}

/// A 2026-07-28 request to `pr` with `params` as they are (no `_meta` added).
async fn raw(a: SocketAddr, method: &str, params: Value) -> Resp {
    let h = [
        ("Authorization", "P1"),
        ("Accept", "application/json, text/event-stream"),
        ("MCP-Protocol-Version", "2026-07-28"),
        ("Mcp-Method", method),
    ];
    let b = json!({"jsonrpc": "2.0", "id": 9, "method": method, "params": params}).to_string();
    call(a, "POST", "/pr/mcp", &h, &b).await
}

#[tokio::test]
async fn request_meta_is_required_and_removed_or_unknown_methods_are_404() {
    let s = start().await;
    let a = s.addr;
    let caps = "io.modelcontextprotocol/clientCapabilities";
    let version = "io.modelcontextprotocol/protocolVersion";
    for params in [
        json!({}),
        json!({"_meta": "x"}),
        json!({"_meta": {caps: {}}}),
        json!({"_meta": {version: "2026-07-28"}}),
        json!({"_meta": {version: "2026-07-28", caps: "all"}}),
    ] {
        let r = raw(a, "server/discover", params.clone()).await;
        assert_eq!(r.status, 400, "{params}: {}", r.body);
        let v = r.json();
        assert_eq!((v["id"].clone(), v["error"]["code"].clone()), (json!(9), json!(-32602)), "{params}: {v}");
    }
    assert_eq!(s.sup.server("pr").unwrap().active_sessions(), 0, "nothing was started for them");
    // clientInfo is optional.
    let r = raw(a, "server/discover", json!({"_meta": {version: "2026-07-28", caps: {}}})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Methods 2026-07-28 removed are not forwarded: 404 with -32601, the server never sees them.
    for m in ["initialize", "ping", "logging/setLevel", "resources/subscribe", "resources/unsubscribe"] {
        let r = sl(a, "pr", "P1", m, json!({"uri": "file:///x"}), json!({})).await;
        assert_eq!(r.status, 404, "{m}: {}", r.body);
        let v = r.json();
        assert_eq!((v["id"].clone(), v["error"]["code"].clone()), (json!(7), json!(-32601)), "{m}: {v}");
    }
    // A method the server does not know: its -32601 goes back with 404.
    let r = sl(a, "pr", "P1", "nosuch/method", json!({}), json!({})).await;
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], -32601);
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
    // The same principal listening again: the new stream takes over, the old one ends.
    let mut l0 = l1;
    let mut l1 = listen("P1").await;
    assert_eq!(l1.status, 200);
    let (_, d, _) = l1.event().await.unwrap();
    assert_eq!(serde_json::from_str::<Value>(&d).unwrap()["method"], "notifications/subscriptions/acknowledged");
    assert!(l0.event().await.is_none(), "the older stream ended");
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

#[test]
fn input_keys_are_the_servers_plain_ids_else_numbered() {
    use super::stateless::input_key;
    let mut taken = serde_json::Map::new();
    assert_eq!(input_key(&json!("user_name"), &taken), "user_name");
    taken.insert("user_name".into(), json!({}));
    // A server reusing an id within one round, a number, or an id that is long or not plain
    // (what a hostile server might send to confuse a client) gets a numbered key instead.
    assert_eq!(input_key(&json!("user_name"), &taken), "input-2");
    assert_eq!(input_key(&json!(3), &taken), "input-2");
    for odd in ["", "a b", "x\n", "requestState\"", "ü", &"k".repeat(65)] {
        assert_eq!(input_key(&json!(odd), &taken), "input-2", "{odd:?}");
    }
    taken.insert("input-2".into(), json!({}));
    assert_eq!(input_key(&json!(null), &taken), "input-3");
    assert_eq!(input_key(&json!("k".repeat(64)), &taken), "k".repeat(64));
}

#[test]
fn header_values_decode_strict_base64_or_stand_for_themselves() {
    use super::stateless::header_text;
    assert_eq!(header_text("=?base64?SGVsbG8=?=").as_deref(), Some("Hello"));
    assert_eq!(header_text("=?base64?w7w=?=").as_deref(), Some("ü"));
    assert_eq!(header_text("=?base64??=").as_deref(), Some(""));
    // Not wrapped: the value itself, even when it looks like Base64.
    assert_eq!(header_text("SGVsbG8=").as_deref(), Some("SGVsbG8="));
    assert_eq!(header_text("=?base64?SGVsbG8=").as_deref(), Some("=?base64?SGVsbG8="));
    // Wrapped but not strict Base64 of UTF-8: missing padding, foreign characters, padding in
    // the middle, non-zero trailing bits, URL-safe alphabet, invalid UTF-8.
    for bad in ["SGVsbG8", "SGVs!!!bG8=", "SG==bG8=", "SGVsbG9=", "_-8=", "/w==", "SGVsbG8===", "===="] {
        assert_eq!(header_text(&format!("=?base64?{bad}?=")), None, "{bad}");
    }
}

/// A `tools/call` of the echo fixture's `route` tool with `args` and extra headers.
async fn route(a: SocketAddr, args: Value, extra: &[(&str, &str)]) -> Resp {
    let mut h = vec![
        ("Authorization", "P1"),
        ("Accept", "application/json"),
        ("MCP-Protocol-Version", "2026-07-28"),
        ("Mcp-Method", "tools/call"),
        ("Mcp-Name", "route"),
    ];
    h.extend_from_slice(extra);
    call(
        a,
        "POST",
        "/pr/mcp",
        &h,
        &body(json!(4), "tools/call", json!({"name": "route", "arguments": args}), json!({})),
    )
    .await
}

#[tokio::test]
async fn mcp_param_headers_must_match_the_arguments_the_tool_annotates() {
    let s = start().await;
    let a = s.addr;
    let ok = |r: &Resp| {
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["result"]["resultType"], "complete", "{}", r.body);
    };
    let refused = |r: &Resp, named: &str| {
        assert_eq!(r.status, 400, "{}", r.body);
        let v = r.json();
        assert!(v["id"] == 4 || v["id"] == 7, "the request's id: {v}");
        assert_eq!(v["error"]["code"], -32020, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(named), "{v}");
    };
    ok(&route(a, json!({"region": "eu", "shard": 3}), &[("Mcp-Param-Region", "eu"), ("Mcp-Param-Shard", "3")]).await);
    ok(&route(a, json!({"region": "Hello"}), &[("mcp-param-region", "=?base64?SGVsbG8=?=")]).await);
    // Neither argument nor header; an annotation that is no header name is not checked.
    ok(&route(a, json!({"text": "t", "odd": "x"}), &[]).await);
    refused(&route(a, json!({"region": "eu"}), &[]).await, "Mcp-Param-Region");
    refused(&route(a, json!({"region": "eu"}), &[("Mcp-Param-Region", "us")]).await, "Mcp-Param-Region");
    refused(&route(a, json!({"shard": 3}), &[("Mcp-Param-Shard", "4")]).await, "Mcp-Param-Shard");
    refused(&route(a, json!({}), &[("Mcp-Param-Region", "eu")]).await, "Mcp-Param-Region");
    refused(&route(a, json!({"region": "Hello"}), &[("Mcp-Param-Region", "=?base64?SGVsbG8?=")]).await, "not valid");
    // Mcp-Name in its Base64 form.
    let h = [
        ("Authorization", "P1"),
        ("Accept", "application/json"),
        ("MCP-Protocol-Version", "2026-07-28"),
        ("Mcp-Method", "tools/call"),
        ("Mcp-Name", "=?base64?ZWNobw==?="),
    ];
    let b = body(json!(5), "tools/call", json!({"name": "echo", "arguments": {"text": "b64"}}), json!({}));
    assert_eq!(text(&call(a, "POST", "/pr/mcp", &h, &b).await), "b64");
    // The server changes echo's schema and says so: the next call is checked against the new one.
    let echo = || sl(a, "pr", "P1", "tools/call", json!({"name": "echo", "arguments": {"text": "x"}}), json!({}));
    assert_eq!(text(&echo().await), "x");
    text(&sl(a, "pr", "P1", "tools/call", json!({"name": "annotate", "arguments": {}}), json!({})).await);
    refused(&echo().await, "Mcp-Param-Text");
    s.sup.shutdown().await;
}

#[tokio::test]
async fn the_servers_timeout_is_each_stateless_requests_deadline() {
    let s = start_text(format!(
        r#"{{"mcpProxy":{{"addr":"127.0.0.1:9090"}},
            "mcpServers":{{"pr":{{"command":"/usr/bin/python3","args":["{FIXTURE}"],"isolation":"principal",
                     "timeout":"400ms","options":{{"authTokens":["P1"]}}}} }}}}"#
    ))
    .await;
    let a = s.addr;
    // The first request also starts the backend (its initialize has the same deadline).
    assert_eq!(
        text(&sl(a, "pr", "P1", "tools/call", json!({"name": "echo", "arguments": {}}), json!({})).await),
        "echo"
    );
    let t = std::time::Instant::now();
    let r = sl(a, "pr", "P1", "tools/call", json!({"name": "slow", "arguments": {"ms": 1500}}), json!({})).await;
    let v = r.json();
    assert_eq!((v["id"].clone(), v["error"]["code"].clone()), (json!(7), json!(-32001)), "{v}");
    assert!(t.elapsed() < std::time::Duration::from_millis(1400), "answered at the deadline: {:?}", t.elapsed());
    // The server was told, and the backend goes on serving the principal (once the fixture,
    // which serves one request at a time, is done sleeping).
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let r = sl(a, "pr", "P1", "tools/call", json!({"name": "cancelled", "arguments": {}}), json!({})).await;
    let cancelled: Value = serde_json::from_str(&text(&r)).unwrap();
    assert_eq!(cancelled.as_array().map(Vec::len), Some(1), "{cancelled}");
    s.sup.shutdown().await;
}

#[tokio::test]
async fn a_clients_cancellation_ends_its_own_request_and_reaches_the_server() {
    let s = start().await;
    let a = s.addr;
    assert_eq!(
        text(&sl(a, "pr", "P1", "tools/call", json!({"name": "echo", "arguments": {}}), json!({})).await),
        "echo"
    );
    let cancel = |tok: &'static str, id: Value| async move {
        let h =
            [("Authorization", tok), ("MCP-Protocol-Version", "2026-07-28"), ("Mcp-Method", "notifications/cancelled")];
        let n = json!({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": id,
            "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}});
        call(a, "POST", "/pr/mcp", &h, &n.to_string()).await.status
    };
    let slow =
        tokio::spawn(sl(a, "pr", "P1", "tools/call", json!({"name": "slow", "arguments": {"ms": 1500}}), json!({})));
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    // Another principal naming the same id, or this one naming another id: nothing happens.
    assert_eq!(cancel("P2", json!(7)).await, 202);
    assert_eq!(cancel("P1", json!(8)).await, 202);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!slow.is_finished(), "the call goes on");
    let t = std::time::Instant::now();
    assert_eq!(cancel("P1", json!(7)).await, 202);
    let r = tokio::time::timeout(std::time::Duration::from_secs(1), slow).await.expect("answered at once").unwrap();
    let v = r.json();
    assert_eq!((v["id"].clone(), v["error"]["code"].clone()), (json!(7), json!(-32800)), "{v}");
    assert!(t.elapsed() < std::time::Duration::from_millis(900));
    // The server was told (the fixture reads it once its sleep is over).
    tokio::time::sleep(std::time::Duration::from_millis(1300)).await;
    let r = sl(a, "pr", "P1", "tools/call", json!({"name": "cancelled", "arguments": {}}), json!({})).await;
    let cancelled: Value = serde_json::from_str(&text(&r)).unwrap();
    assert_eq!(cancelled.as_array().map(Vec::len), Some(1), "{cancelled}");
    s.sup.shutdown().await;
}

/// A 2025-11-25 session on `server` for `token`; its id.
async fn open_2025_on(a: SocketAddr, server: &str, token: &str, caps: Value) -> String {
    let init = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":caps,"clientInfo":{"name":"t","version":"0"}}});
    let path = format!("/{server}/mcp");
    let r =
        call(a, "POST", &path, &[("Authorization", token), ("Accept", "application/json")], &init.to_string()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["result"]["serverInfo"]["name"], "echo", "{}", r.body);
    let sid = r.header("mcp-session-id").unwrap().to_string();
    let n = json!({"jsonrpc":"2.0","method":"notifications/initialized"}).to_string();
    call(a, "POST", &path, &[("Authorization", token), ("Mcp-Session-Id", &sid)], &n).await;
    sid
}

#[tokio::test]
async fn on_a_principal_server_2025_sessions_share_the_principals_process() {
    let s = start().await;
    let a = s.addr;
    let stateless = |tok: &'static str| async move {
        count(&sl(a, "pr", tok, "tools/call", json!({"name": "count", "arguments": {}}), json!({})).await)
    };
    let in_session = |sid: String, tok: &'static str| async move {
        let b = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"count","arguments":{}}});
        let h = [("Authorization", tok), ("Accept", "application/json"), ("Mcp-Session-Id", sid.as_str())];
        let r = call(a, "POST", "/pr/mcp", &h, &b.to_string()).await;
        let t = r.json()["result"]["content"][0]["text"].as_str().unwrap_or_else(|| panic!("{}", r.body)).to_string();
        let (n, pid) = t.split_once(' ').unwrap();
        (n.parse::<u64>().unwrap(), pid.parse::<u64>().unwrap())
    };
    let (n, pid) = stateless("P1").await;
    assert_eq!(n, 1);
    let s1 = open_2025_on(a, "pr", "P1", json!({})).await;
    assert_eq!(in_session(s1.clone(), "P1").await, (2, pid), "the session runs on the principal's process");
    let s2 = open_2025_on(a, "pr", "P1", json!({})).await;
    assert_eq!(in_session(s2.clone(), "P1").await, (3, pid));
    // Another principal: its own process, from nothing; its session too.
    let s3 = open_2025_on(a, "pr", "P2", json!({})).await;
    let (m, other) = in_session(s3, "P2").await;
    assert_eq!(m, 1);
    assert_ne!(other, pid);
    assert_eq!(stateless("P2").await, (2, other));
    // Ending a session leaves the process to the others.
    let r = call(a, "DELETE", "/pr/mcp", &[("Authorization", "P1"), ("Mcp-Session-Id", &s1)], "").await;
    assert!(r.status < 300, "{}", r.body);
    assert!(super::tests::alive(pid));
    assert_eq!(stateless("P1").await, (4, pid));
    assert_eq!(in_session(s2, "P1").await, (5, pid));
    // A session id of P1 presented by P2 names nothing.
    let b = json!({"jsonrpc":"2.0","id":1,"method":"tools/list"}).to_string();
    let r = call(a, "POST", "/pr/mcp", &[("Authorization", "P2"), ("Mcp-Session-Id", &s1)], &b).await;
    assert_eq!(r.status, 404);
    s.sup.shutdown().await;
}

#[tokio::test]
async fn a_session_on_the_principals_process_is_asked_during_its_own_call_only() {
    let s = start().await;
    let a = s.addr;
    let sid = open_2025_on(a, "pr", "P1", json!({"elicitation": {}})).await;
    let h =
        [("Authorization", "P1"), ("Accept", "application/json, text/event-stream"), ("Mcp-Session-Id", sid.as_str())];
    let ask = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"ask","arguments":{}}});
    let mut c = send(a, "POST", "/pr/mcp", &h, &ask.to_string()).await;
    let (_, d, _) = c.event().await.unwrap();
    let req: Value = serde_json::from_str(&d).unwrap();
    assert_eq!(req["method"], "elicitation/create", "{req}");
    let answer =
        json!({"jsonrpc":"2.0","id":req["id"],"result":{"action":"accept","content":{"name":"s"}}}).to_string();
    assert_eq!(call(a, "POST", "/pr/mcp", &[h[0], h[2]], &answer).await.status, 202);
    let (_, d, _) = c.event().await.unwrap();
    let done: Value = serde_json::from_str(&d).unwrap();
    assert!(done["result"]["content"][0]["text"].as_str().unwrap().contains("\"name\": \"s\""), "{done}");
    // The principal's stateless requests go on beside it, with their own round trips.
    let r = sl(a, "pr", "P1", "tools/call", ask_params(), json!({"elicitation": {}})).await;
    assert_eq!(r.json()["result"]["resultType"], "input_required", "{}", r.body);
    s.sup.shutdown().await;
}

#[tokio::test]
async fn a_principals_process_lives_while_any_session_on_it_is_used() {
    let s = start_text(format!(
        r#"{{"mcpProxy":{{"addr":"127.0.0.1:9090"}},
            "mcpServers":{{"pr":{{"command":"/usr/bin/python3","args":["{FIXTURE}"],"isolation":"principal",
                     "idleTimeout":"1s","options":{{"authTokens":["P1"]}}}} }}}}"#
    ))
    .await;
    let a = s.addr;
    let stateless = || async {
        count(&sl(a, "pr", "P1", "tools/call", json!({"name": "count", "arguments": {}}), json!({})).await)
    };
    let (_, pid) = stateless().await;
    let sid = open_2025_on(a, "pr", "P1", json!({})).await;
    // Only the 2025 session is used for longer than idleTimeout: the process stays.
    let b = json!({"jsonrpc":"2.0","id":1,"method":"tools/list"}).to_string();
    for _ in 0..6 {
        let r = call(a, "POST", "/pr/mcp", &[("Authorization", "P1"), ("Mcp-Session-Id", &sid)], &b).await;
        assert_eq!(r.status, 200, "{}", r.body);
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    }
    assert_eq!(stateless().await, (2, pid), "the principal's process and its state lived on");
    // Nobody uses either: both end, and the next request starts from nothing.
    tokio::time::sleep(std::time::Duration::from_millis(2600)).await;
    assert!(!super::tests::alive(pid), "reaped when idle");
    let r = call(a, "POST", "/pr/mcp", &[("Authorization", "P1"), ("Mcp-Session-Id", &sid)], &b).await;
    assert_eq!(r.status, 404, "the session ended with it");
    assert_eq!(stateless().await.0, 1);
    s.sup.shutdown().await;
}

//! The official Rust MCP SDK (rmcp) as a real client program: tests/rmcp-client, a crate of its
//! own that scripts/test.sh builds before this suite (`bash scripts/build-rmcp-client.sh`), run
//! against `mcpbox serve` in front of real npx and uvx servers (prepared once by the
//! real-server suite's support code). Over Streamable HTTP in the SDK's three lifecycles
//! (2025 `initialize`, 2026-07-28 `server/discover` with per-request `_meta`, and auto, which
//! probes and settles on 2026-07-28 here), and over legacy SSE (the program's own transport:
//! rmcp has none). A missing client binary fails these tests.
//!
//! Runs as root only (like `realservers::`): the npx/uvx packages are prepared with root's tools.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::realservers::support::*;

/// The client binary: `rmcp-client/debug/mcpbox-rmcp-client` in this build's target dir.
fn client_bin() -> PathBuf {
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let target = target.parent().expect("CARGO_TARGET_TMPDIR is TARGET/tmp");
    let bin = target.join("rmcp-client/debug/mcpbox-rmcp-client");
    assert!(
        bin.is_file(),
        "{} is missing: build it with `bash scripts/build-rmcp-client.sh` (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// Runs the client (at most 120 s) and returns its JSON output; panics with its stderr and
/// mcpbox's log when it fails.
fn run_client(srv: &Serve, path: &str, transport: &str, mode: &str, extra: &[&str]) -> Value {
    let url = format!("http://127.0.0.1:{}{path}", srv.port);
    let mut child = Command::new(client_bin())
        .args(["--url", &url, "--token", TOKEN, "--transport", transport, "--mode", mode])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting mcpbox-rmcp-client");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let o = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let e = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (stdout, stderr) = (o.join().unwrap(), e.join().unwrap());
    let label = format!("{transport} {mode} {path} {extra:?}");
    match status {
        Some(st) if st.success() => serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("{label}: output is not JSON ({e}): {stdout}\n{stderr}")),
        Some(st) => panic!("{label}: client failed ({st}):\n{stderr}\nmcpbox:\n{}", srv.log()),
        None => panic!("{label}: client ran over 120 s:\n{stderr}\nmcpbox:\n{}", srv.log()),
    }
}

/// The concatenated text content of a tools/call result.
fn text_of(call: &Value) -> String {
    call["content"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| c["text"].as_str()).collect::<Vec<_>>().join("\n"))
        .unwrap_or_default()
}

/// Seconds since the epoch of an ISO 8601 date-time with an offset (`2026-12-06T10:49:19+09:00`,
/// fractions of a second ignored).
fn epoch_of(s: &str) -> Option<i64> {
    let n = |a: usize, b: usize| s.get(a..b)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, se) = (n(0, 4)?, n(5, 7)?, n(8, 10)?, n(11, 13)?, n(14, 16)?, n(17, 19)?);
    let tail = s.get(19..)?.trim_start_matches(|c: char| c == '.' || c.is_ascii_digit());
    let offset = if tail == "Z" {
        0
    } else {
        let sign = if tail.starts_with('-') { -1 } else { 1 };
        sign * (tail.get(1..3)?.parse::<i64>().ok()? * 3600 + tail.get(4..6)?.parse::<i64>().ok()? * 60)
    };
    // Days from the civil date (proleptic Gregorian), the usual era arithmetic.
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(days * 86400 + h * 3600 + mi * 60 + se - offset)
}

fn tools_of(v: &Value) -> Vec<String> {
    v["tools"].as_array().map(|a| a.iter().filter_map(|t| t.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

/// mcp-server-time (uvx) and server-everything (npx), both sandboxed, through the Rust SDK in
/// every lifecycle and over both transports: the tools listed, a real call answered, the
/// negotiated protocol version the one asked for.
#[test]
fn rmcp_client_lists_and_calls_real_servers_in_every_lifecycle() {
    let state = prepared_state();
    let dir = scratch("rmcp-client");
    let cfg = config(json!({
        "time": server("time", &["--local-timezone", "UTC"], json!("mcp-server-time")),
        "everything": server("everything", &[], json!("server-everything")),
    }));
    let srv = Serve::start(&dir, &state, cfg);
    // (transport, lifecycle, the protocol version it must end up speaking)
    let cases = [
        ("streamable", "initialize", "2025-11-25"),
        ("streamable", "discover", "2026-07-28"),
        ("streamable", "auto", "2026-07-28"),
        ("sse", "initialize", "2025-11-25"),
        // On legacy SSE mcpbox passes messages through: the SDK's `server/discover` probe is
        // answered by the server itself. server-everything does not know it (the SDK falls
        // back to initialize); mcp-server-time's current releases answer it (2026-07-28).
        ("sse", "auto", "the server's"),
    ];
    for (transport, mode, version) in cases {
        let path = |name: &str| format!("/{name}/{}", if transport == "sse" { "sse" } else { "mcp" });
        let label = format!("{transport}/{mode}");

        // mcp-server-time: get_current_time's answer is JSON whose datetime is now, in UTC.
        let v = run_client(
            &srv,
            &path("time"),
            transport,
            mode,
            &["--call", "get_current_time", "--args", r#"{"timezone":"UTC"}"#],
        );
        let versions: &[&str] = if version == "the server's" { &["2025-11-25", "2026-07-28"] } else { &[version] };
        assert!(versions.iter().any(|w| v["protocolVersion"] == *w), "{label}: {v}");
        assert_eq!(v["serverInfo"]["name"], "mcp-time", "{label}: the server's own name: {v}");
        let tools = tools_of(&v);
        assert!(
            tools.contains(&"get_current_time".into()) && tools.contains(&"convert_time".into()),
            "{label}: {tools:?}"
        );
        let text = text_of(&v["call"]);
        let t: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{label}: not JSON ({e}): {text}"));
        assert_eq!(t["timezone"], "UTC", "{label}: {t}");
        let when = t["datetime"].as_str().and_then(epoch_of).unwrap_or_else(|| panic!("{label}: no datetime in {t}"));
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        assert!((when - now).abs() < 120, "{label}: the server's time {t} is {} s from ours", when - now);

        // server-everything: echo echoes.
        let msg = format!("hello from rmcp over {label}");
        let v = run_client(
            &srv,
            &path("everything"),
            transport,
            mode,
            &["--call", "echo", "--args", &json!({"message": msg}).to_string()],
        );
        assert!(versions.iter().any(|w| v["protocolVersion"] == *w), "{label}: {v}");
        assert!(v["serverInfo"]["name"].as_str().is_some_and(|n| n.contains("everything")), "{label}: {v}");
        assert!(tools_of(&v).contains(&"echo".into()), "{label}: {v}");
        assert_eq!(text_of(&v["call"]), format!("Echo: {msg}"), "{label}: {v}");
        if v["protocolVersion"] == "2026-07-28" {
            assert_eq!(v["call"]["resultType"], "complete", "{label}: {v}");
        }
    }
    // The wrong token: the SDK client is refused before any server is asked.
    let url = format!("http://127.0.0.1:{}/everything/mcp", srv.port);
    for mode in ["initialize", "discover"] {
        let out = Command::new(client_bin())
            .args(["--url", &url, "--token", "not-the-token", "--mode", mode, "--call", "echo"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{mode} with a wrong token: {}", String::from_utf8_lossy(&out.stdout));
    }
    srv.stop();
}

/// server-everything asks its client to sample, or to fill in a form (elicitation), during a
/// tool call. Through mcpbox a 2026-07-28 Rust SDK client gets the request as an
/// input-required round trip, answers it and gets the call's result with its answer in it; a
/// 2025 client gets the server's request on its session. A client that did not declare
/// sampling is never asked: mcpbox refuses for it.
#[test]
fn rmcp_client_answers_a_real_servers_sampling_and_elicitation_in_both_generations() {
    let state = prepared_state();
    let dir = scratch("rmcp-client-sampling");
    let cfg = config(json!({ "everything": server("everything", &[], json!("server-everything")) }));
    let srv = Serve::start(&dir, &state, cfg);
    let args = json!({"prompt": "What is the capital of France?", "maxTokens": 20}).to_string();
    for mode in ["discover", "initialize"] {
        let reply = format!("Paris, says the rmcp client ({mode})");
        let v = run_client(
            &srv,
            "/everything/mcp",
            "streamable",
            mode,
            &["--call", "trigger-sampling-request", "--args", &args, "--sampling-reply", &reply],
        );
        let text = text_of(&v["call"]);
        assert!(text.contains(&reply) && text.contains("mcpbox-rmcp-client"), "{mode}: {v}");

        let name = format!("Ada via rmcp ({mode})");
        let form = json!({"name": name, "check": true}).to_string();
        let v = run_client(
            &srv,
            "/everything/mcp",
            "streamable",
            mode,
            &["--call", "trigger-elicitation-request", "--elicitation-reply", &form],
        );
        let text = text_of(&v["call"]);
        assert!(text.contains(&format!("- Name: {name}")) && text.contains("\"accept\""), "{mode}: {v}");
    }
    // Not declared: in 2026-07-28 the server still lists the tool (mcpbox initialized it with
    // every capability), but its request is refused on the client's behalf and the call fails.
    let v = run_client(
        &srv,
        "/everything/mcp",
        "streamable",
        "discover",
        &["--call", "trigger-sampling-request", "--args", &args],
    );
    let text = text_of(&v["call"]);
    assert!(
        v["call"]["isError"] == true && text.contains("did not declare") && !text.contains("mcpbox-rmcp-client"),
        "asked a client that cannot sample: {v}"
    );
    srv.stop();
}

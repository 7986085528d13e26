//! MCP 2026-07-28 (stateless) requests on `/NAME/mcp`, in front of 2025-era stdio servers.
//!
//! A request is stateless when its `MCP-Protocol-Version` header says 2026-07-28 (or, with no
//! header, when its `_meta` names a protocol version: it then gets 400 for the missing header).
//! There is no `initialize` and no session id: each request carries its version and client
//! capabilities in `params._meta`, and the headers `Mcp-Method` (every message) and `Mcp-Name`
//! (`tools/call`, `prompts/get`: the name; `resources/read`: the URI) must match the body, or
//! the answer is 400 with a JSON-RPC error (-32020) naming the header.
//!
//! Which process answers: every principal (token) has one backend session per server, opened
//! and initialized by mcpbox on its first request ([`crate::supervisor::Supervisor::principal_backend`]):
//! a process of its own for `isolation: "principal"` and `"session"`, the one process for
//! `"shared"`. Its state persists between the principal's requests until it is idle for
//! `idleTimeout`. `server/discover` is answered from that backend's own `initialize` result.
//!
//! The backend is initialized with every client capability mcpbox can route (sampling,
//! elicitation, roots). A server request made while serving a stateless request becomes an
//! `InputRequiredResult`: the request stays in flight in the backend, the client gets the
//! server's requests and a `requestState` (an entry number with an HMAC-SHA256 tag over it,
//! the server, the principal and the method, under a key drawn at start; each `inputRequests`
//! key is the server request's own id when that is a short plain string), and retries with
//! `inputResponses`; the answers go to the server and the first answer's wait goes on. A state
//! that does not verify, belongs to another principal, server or method, or was used already
//! is refused. Where the request's `_meta` did not declare the capability a server request
//! needs, mcpbox answers the server with an error on the client's behalf.
//!
//! A request must carry `params._meta` with its protocol version and client capabilities (else
//! 400, -32602). Methods 2026-07-28 removed (`initialize`, `ping`, `logging/setLevel`,
//! `resources/subscribe`, `resources/unsubscribe`) are answered 404 with -32601 and not
//! forwarded; a server's own -32601 answer also goes back with 404, and a -32021 (missing client
//! capability) with 400. Where a tool's input schema annotates an argument with `x-mcp-header`,
//! a `tools/call` must carry the matching `Mcp-Param-…` header (SEP-2243; the schema comes from
//! the server's `tools/list`, kept until it says its tools changed). `Mcp-Name` and
//! `Mcp-Param-…` values may be `=?base64?…?=`.
//!
//! `subscriptions/listen` answers with an SSE stream of the list-changed and resource-updated
//! notifications of the principal's backend that its filter asks for ([`listen`]); a new one of
//! the same principal takes over from the older one.
//!
//! A request's progress (with a `progressToken`) and log messages (only when it opts in with
//! `io.modelcontextprotocol/logLevel`, at or above that level; mcpbox sets the server's level with
//! `logging/setLevel` when it changes) come on an SSE answer, ahead of the result. A client that
//! disconnects before its answer cancels the request at the server.
//!
//! Client notifications are accepted with 202; `notifications/cancelled` naming a request of the
//! same principal still being answered ends it (the client gets -32800, the server
//! `notifications/cancelled`); others are dropped. The server's `timeout` is each request's
//! deadline, as for a session's (the hub keeps it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::edge::Principal;
use super::{open_error, rpc_error, Shared};
use crate::bridge::{PostStream, Session};

pub const VERSION: &str = "2026-07-28";
const META_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
const META_CAPS: &str = "io.modelcontextprotocol/clientCapabilities";
const META_INFO: &str = "io.modelcontextprotocol/clientInfo";
const META_LOG: &str = "io.modelcontextprotocol/logLevel";
/// Log levels, least severe first.
const LEVELS: [&str; 8] = ["debug", "info", "notice", "warning", "error", "critical", "alert", "emergency"];

fn severity(level: &str) -> Option<usize> {
    LEVELS.iter().position(|l| *l == level)
}
/// JSON-RPC error for a missing or mismatched `MCP-Protocol-Version`, `Mcp-Method`, `Mcp-Name`.
pub const HEADER_MISMATCH: i64 = -32020;
/// JSON-RPC error for a request whose processing needs a client capability it did not declare.
pub const MISSING_CAPABILITY: i64 = -32021;
const METHOD_NOT_FOUND: i64 = -32601;
/// 2025-era methods that 2026-07-28 removed: answered 404 with -32601, never forwarded (the
/// principal's backend was initialized by mcpbox; its log level and subscriptions are mcpbox's).
const REMOVED: [&str; 5] = ["initialize", "ping", "logging/setLevel", "resources/subscribe", "resources/unsubscribe"];
/// How long mcpbox waits for a server's `tools/list` page (for the `x-mcp-header` checks).
const TOOLS_WAIT: Duration = Duration::from_secs(30);
/// Longest server request id that names its `inputRequests` entry.
const MAX_KEY: usize = 64;
/// The protocol version mcpbox speaks to the stdio servers behind it.
const BACKEND_VERSION: &str = "2025-11-25";
/// How long an input-required round waits for the client's retry.
pub const ROUND_TTL: Duration = Duration::from_secs(300);
/// How often rounds past [`ROUND_TTL`] are looked for when no new round comes to do it.
pub const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// Input-required rounds waiting at once, across all servers.
const MAX_ROUNDS: usize = 1024;
/// After a first server request, how long to wait for more before answering the client.
const GATHER: Duration = Duration::from_millis(20);

/// Whether a POST on `/NAME/mcp` is a 2026-07-28 one.
pub fn wants(headers: &HeaderMap, msg: &Value) -> bool {
    match headers.get("mcp-protocol-version") {
        Some(v) => v.as_bytes() == VERSION.as_bytes(),
        None => meta(msg).is_some_and(|m| m.contains_key(META_VERSION)),
    }
}

fn meta(msg: &Value) -> Option<&Map<String, Value>> {
    msg.get("params")?.get("_meta")?.as_object()
}

fn bad_header(id: Value, text: &str) -> Response {
    rpc_error(StatusCode::BAD_REQUEST, id, HEADER_MISMATCH, text)
}

/// The header checks of a 2026-07-28 message: the response to give when one fails.
#[allow(clippy::result_large_err)]
fn check_headers(headers: &HeaderMap, msg: &Value) -> Result<(), Response> {
    let id = msg.get("id").cloned().unwrap_or(Value::Null);
    let get = |h: &str| headers.get(h).map(|v| v.to_str().unwrap_or("\u{fffd}"));
    let Some(version) = get("mcp-protocol-version") else {
        return Err(bad_header(id, "MCP-Protocol-Version header is required (2026-07-28)"));
    };
    if let Some(v) = meta(msg).and_then(|m| m.get(META_VERSION)) {
        if v.as_str() != Some(version) {
            return Err(bad_header(id, "MCP-Protocol-Version header does not match params._meta's protocolVersion"));
        }
    }
    let method = msg.get("method").and_then(Value::as_str);
    if let Some(method) = method {
        match get("mcp-method") {
            None => return Err(bad_header(id, "Mcp-Method header is required")),
            Some(h) if h != method => return Err(bad_header(id, "Mcp-Method header does not match the body's method")),
            Some(_) => {}
        }
        let field = match method {
            "tools/call" | "prompts/get" => Some("name"),
            "resources/read" => Some("uri"),
            _ => None,
        };
        if let Some(field) = field {
            let want = msg.get("params").and_then(|p| p.get(field)).and_then(Value::as_str);
            match get("mcp-name").map(header_text) {
                None => return Err(bad_header(id, "Mcp-Name header is required for this method")),
                Some(None) => return Err(bad_header(id, "Mcp-Name header is not valid Base64 (=?base64?…?=)")),
                Some(Some(h)) if Some(h.as_str()) != want => {
                    return Err(bad_header(id, &format!("Mcp-Name header does not match params.{field}")))
                }
                Some(Some(_)) => {}
            }
        }
    }
    Ok(())
}

/// The text a `Mcp-Name` or `Mcp-Param-*` header value stands for: `=?base64?B64?=` is the
/// Base64 (standard alphabet, padded) of UTF-8 text, anything else is the text itself. `None`
/// for a wrapped value that does not decode.
pub(super) fn header_text(v: &str) -> Option<String> {
    match v.strip_prefix("=?base64?").and_then(|r| r.strip_suffix("?=")) {
        Some(b64) => String::from_utf8(base64_decode(b64)?).ok(),
        None => Some(v.to_string()),
    }
}

/// Strict Base64: the standard alphabet, whole 4-character groups, `=` padding only at the end
/// and zero bits after the last byte.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(4) {
        return None;
    }
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(b.len() / 4 * 3);
    for (i, group) in b.chunks(4).enumerate() {
        let last = i == b.len() / 4 - 1;
        let pad = group.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &group[..4 - pad] {
            n = (n << 6) | val(c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        let keep = 3 - pad;
        // Bits below the last byte kept must be zero (one encoding per text).
        if bytes[keep..].iter().any(|&x| x != 0) {
            return None;
        }
        out.extend_from_slice(&bytes[..keep]);
    }
    Some(out)
}

/// The `x-mcp-header` annotations of a tool's input schema: (argument, header suffix). An
/// annotation that is not a plain header name (letters, digits, `-`, at most 64) is not
/// checked: no client sends it (SDK clients drop such a tool).
fn param_headers(tool: &Value) -> Vec<(String, String)> {
    let Some(props) = tool.get("inputSchema").and_then(|s| s.get("properties")).and_then(Value::as_object) else {
        return vec![];
    };
    props
        .iter()
        .filter_map(|(arg, schema)| {
            let h = schema.get("x-mcp-header")?.as_str()?;
            let plain = !h.is_empty() && h.len() <= 64 && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
            plain.then(|| (arg.clone(), h.to_string()))
        })
        .collect()
}

/// SEP-2243 custom headers of a `tools/call`: for each argument the tool's schema annotates
/// with `x-mcp-header: H`, the request's `Mcp-Param-H` header must be there when the argument
/// is, and stand for the same value (strings as they are, numbers and booleans as JSON text).
#[allow(clippy::result_large_err)]
fn check_param_headers(headers: &HeaderMap, msg: &Value, tool: &Value) -> Result<(), Response> {
    let id = msg.get("id").cloned().unwrap_or(Value::Null);
    let args = msg.get("params").and_then(|p| p.get("arguments"));
    for (arg, h) in param_headers(tool) {
        let name = format!("Mcp-Param-{h}");
        let body = args.and_then(|a| a.get(&arg)).filter(|v| !v.is_null());
        let want = body.map(|v| match v {
            Value::String(s) => s.clone(),
            v => v.to_string(),
        });
        let got = match headers.get(name.as_str()) {
            None => None,
            Some(v) => match v.to_str().ok().and_then(header_text) {
                Some(t) => Some(t),
                None => return Err(bad_header(id, &format!("{name} header is not valid (Base64 as =?base64?…?=)"))),
            },
        };
        match (got, want) {
            (None, None) => {}
            (None, Some(_)) => return Err(bad_header(id, &format!("{name} header is required: the call has {arg}"))),
            (Some(g), w) if Some(&g) != w.as_ref() => {
                return Err(bad_header(id, &format!("{name} header does not match arguments.{arg}")))
            }
            (Some(_), _) => {}
        }
    }
    Ok(())
}

/// The `x-mcp-header` annotations of the backend's tool `name` (as a tool entry with only those),
/// from its `tools/list` kept until the server says its tools changed. `Ok(None)` when the tool
/// has none or the server has no such tool (or answers `tools/list` with an error: it lists
/// nothing to check against); `Err` when it gives no answer in time.
async fn backend_tool(backend: &crate::supervisor::Backend, name: &str) -> Result<Option<Value>, ()> {
    let epoch = backend.session.outbox.tools_changed();
    let mut cache = backend.tools.lock().await;
    if cache.as_ref().is_none_or(|(e, _)| *e != epoch) {
        let mut tools = Vec::new();
        let mut cursor: Option<Value> = None;
        // A bounded number of pages: a server that pages forever gets no more asked of it.
        for _ in 0..100 {
            let id = format!("mcpbox-sl-{}", WIRE_IDS.fetch_add(1, Ordering::Relaxed));
            let mut req = json!({"jsonrpc": "2.0", "id": id, "method": "tools/list"});
            if let Some(c) = cursor.take() {
                req["params"] = json!({"cursor": c});
            }
            let answer = tokio::time::timeout(TOOLS_WAIT, backend.session.request_json(req)).await;
            let Ok(Some(answer)) = answer else { return Err(()) };
            let v: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
            let Some(result) = v.get("result") else { break };
            // Kept: only what the checks read (tools with annotations, the annotations), so a
            // server's long list costs its size once, while it is read, not for as long as it holds.
            for t in result.get("tools").and_then(Value::as_array).into_iter().flatten() {
                let annotated = param_headers(t);
                if let (Some(name), false) = (t.get("name").and_then(Value::as_str), annotated.is_empty()) {
                    let props: Map<String, Value> =
                        annotated.into_iter().map(|(arg, h)| (arg, json!({"x-mcp-header": h}))).collect();
                    tools.push(json!({"name": name, "inputSchema": {"properties": props}}));
                }
            }
            match result.get("nextCursor") {
                Some(c) if !c.is_null() => cursor = Some(c.clone()),
                _ => break,
            }
        }
        *cache = Some((epoch, Value::Array(tools)));
    }
    let tools = cache.as_ref().and_then(|(_, t)| t.as_array());
    Ok(tools.into_iter().flatten().find(|t| t.get("name").and_then(Value::as_str) == Some(name)).cloned())
}

/// A 2026-07-28 request must carry its protocol version and client capabilities in
/// `params._meta` (the client info is optional): else 400 with -32602 naming what is missing.
#[allow(clippy::result_large_err)]
fn check_meta(msg: &Value) -> Result<(), Response> {
    let id = msg.get("id").cloned().unwrap_or(Value::Null);
    let missing = match meta(msg) {
        None => Some(
            "params._meta is required (2026-07-28 requests carry their protocol version and client capabilities there)",
        ),
        Some(m) if !m.get(META_VERSION).is_some_and(Value::is_string) => {
            Some("params._meta must name io.modelcontextprotocol/protocolVersion")
        }
        Some(m) if !m.get(META_CAPS).is_some_and(Value::is_object) => {
            Some("params._meta must carry io.modelcontextprotocol/clientCapabilities (an object)")
        }
        Some(_) => None,
    };
    match missing {
        Some(text) => Err(rpc_error(StatusCode::BAD_REQUEST, id, -32602, text)),
        None => Ok(()),
    }
}

/// The `inputRequests` key of a server request: its own id when that is a short plain string
/// not used yet in the round (the server's name for it), else `input-N`.
pub(super) fn input_key(server_id: &Value, taken: &Map<String, Value>) -> String {
    if let Some(s) = server_id.as_str() {
        let plain = !s.is_empty()
            && s.len() <= MAX_KEY
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if plain && !taken.contains_key(s) {
            return s.to_string();
        }
    }
    let mut n = taken.len() + 1;
    while taken.contains_key(&format!("input-{n}")) {
        n += 1;
    }
    format!("input-{n}")
}

/// The HTTP status of a 2026-07-28 JSON answer: 404 for method-not-found, 400 for a missing
/// client capability, else 200.
fn status_of(v: &Value) -> StatusCode {
    match v.get("error").and_then(|e| e.get("code")).and_then(Value::as_i64) {
        Some(METHOD_NOT_FOUND) => StatusCode::NOT_FOUND,
        Some(MISSING_CAPABILITY) => StatusCode::BAD_REQUEST,
        _ => StatusCode::OK,
    }
}

/// JSON-RPC error of a request its client cancelled (before the server answered it).
const REQUEST_CANCELLED: i64 = -32800;

type FlightKey = (String, Principal, String);

/// A 2026-07-28 request being answered, findable by its client's `notifications/cancelled`
/// (server, principal and the client's id); unlisted when dropped.
struct InFlight<'a> {
    rounds: &'a Rounds,
    key: FlightKey,
    n: u64,
    token: tokio_util::sync::CancellationToken,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut map = self.rounds.flights.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = map.get_mut(&self.key) {
            v.retain(|(n, _)| *n != self.n);
            if v.is_empty() {
                map.remove(&self.key);
            }
        }
    }
}

/// One input-required round: the backend request still in flight, and which server request
/// each `inputRequests` key stands for.
struct Round {
    server: String,
    principal: Principal,
    method: String,
    session: Arc<Session>,
    stream: PostStream,
    /// The backend id mcpbox gave the original request, to restore the client's on the answer.
    wire_id: Value,
    /// The least severe log level the client opted in to for this request.
    log_level: Option<usize>,
    asked: HashMap<String, Value>,
    /// The server's requests gathered for the next `InputRequiredResult`, by key.
    requests: Map<String, Value>,
    caps: Value,
    created: Instant,
}

/// The input-required rounds waiting for their retry, and the key their states are signed with.
pub struct Rounds {
    key: ring::hmac::Key,
    next: AtomicU64,
    map: Mutex<HashMap<u64, Round>>,
    /// Requests being answered, by server, principal and client id (several when a client
    /// reuses an id: then a cancellation naming it is ambiguous and does nothing).
    flights: Mutex<HashMap<FlightKey, Vec<(u64, tokio_util::sync::CancellationToken)>>>,
}

impl Default for Rounds {
    fn default() -> Self {
        let secret: [u8; 32] = rand::random();
        Rounds {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
            next: AtomicU64::new(1),
            map: Mutex::default(),
            flights: Mutex::default(),
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

impl Rounds {
    fn signed(n: u64, server: &str, principal: &Principal, method: &str) -> String {
        format!("{n}\n{server}\n{principal}\n{method}")
    }

    fn state(&self, n: u64, server: &str, principal: &Principal, method: &str) -> String {
        let tag = ring::hmac::sign(&self.key, Self::signed(n, server, principal, method).as_bytes());
        format!("{n:x}.{}", hex(tag.as_ref()))
    }

    /// The round a state names, if its tag verifies for this server, principal and method;
    /// it is taken out, so a state works once.
    fn take(&self, state: &str, server: &str, principal: &Principal, method: &str) -> Option<Round> {
        let (n, tag) = state.split_once('.')?;
        let n = u64::from_str_radix(n, 16).ok()?;
        let tag = unhex(tag)?;
        ring::hmac::verify(&self.key, Self::signed(n, server, principal, method).as_bytes(), &tag).ok()?;
        self.map.lock().unwrap_or_else(|e| e.into_inner()).remove(&n)
    }

    fn in_flight(&self, server: &str, principal: &Principal, client_id: &Value) -> InFlight<'_> {
        let key = (server.to_string(), principal.clone(), client_id.to_string());
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let token = tokio_util::sync::CancellationToken::new();
        let mut map = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(key.clone()).or_default().push((n, token.clone()));
        InFlight { rounds: self, key, n, token }
    }

    /// A client's `notifications/cancelled` for its request `id`: whether it named exactly one
    /// request of this principal being answered (which then ends, cancelled at the server).
    fn cancel(&self, server: &str, principal: &Principal, id: &Value) -> bool {
        let key = (server.to_string(), principal.clone(), id.to_string());
        let map = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&key).map(Vec::as_slice) {
            Some([(_, token)]) => {
                token.cancel();
                true
            }
            _ => false,
        }
    }

    /// Keep `round`; the state that names it, or `None` when too many rounds wait.
    fn put(&self, round: Round) -> Option<String> {
        self.expire(ROUND_TTL);
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_ROUNDS {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let s = self.state(n, &round.server, &round.principal, &round.method);
        map.insert(n, round);
        Some(s)
    }

    /// Drops the rounds older than `ttl` whose client never came back: their server requests
    /// get an error, so that the server's call can end (and the backend, no longer held by the
    /// round's stream, can go idle). Run at every `put` and every [`SWEEP_EVERY`].
    pub fn expire(&self, ttl: Duration) {
        let expired: Vec<Round> = {
            let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            let old: Vec<u64> = map.iter().filter(|(_, r)| r.created.elapsed() > ttl).map(|(n, _)| *n).collect();
            old.into_iter().filter_map(|n| map.remove(&n)).collect()
        };
        for r in expired {
            for id in r.asked.values() {
                r.session.send(crate::bridge::error_response(id.clone(), -32603, "the client did not answer in time"));
            }
        }
    }
}

/// Which client capability a server request needs.
fn needs(method: &str) -> Option<&'static str> {
    match method {
        "elicitation/create" => Some("elicitation"),
        "sampling/createMessage" => Some("sampling"),
        "roots/list" => Some("roots"),
        _ => None,
    }
}

static WIRE_IDS: AtomicU64 = AtomicU64::new(1);

pub async fn post(st: Shared, server: String, principal: Principal, headers: &HeaderMap, mut msg: Value) -> Response {
    if let Err(r) = check_headers(headers, &msg) {
        if let Some(srv) = st.sup.server(&server) {
            srv.metrics.errors.fetch_add(1, Ordering::Relaxed);
        }
        return r;
    }
    let Some(method) = msg.get("method").and_then(Value::as_str).map(str::to_owned) else {
        let id = msg.get("id").cloned().unwrap_or(Value::Null);
        return rpc_error(
            StatusCode::BAD_REQUEST,
            id,
            -32600,
            "2026-07-28 clients answer server requests by retrying with inputResponses",
        );
    };
    let Some(client_id) = msg.get("id").cloned() else {
        // A client notification. notifications/cancelled ends the request it names, if that
        // is one of this principal's being answered here; others have no 2025-era counterpart.
        if method == "notifications/cancelled" {
            let id = msg.get("params").and_then(|p| p.get("requestId")).cloned().unwrap_or(Value::Null);
            if !st.stateless.cancel(&server, &principal, &id) {
                tracing::debug!(server = %server, principal = %principal, "notifications/cancelled names no request of this principal in flight");
            }
        }
        return (StatusCode::ACCEPTED, "").into_response();
    };
    if let Err(r) = check_meta(&msg) {
        return r;
    }
    let caps = meta(&msg).and_then(|m| m.get(META_CAPS)).cloned().unwrap_or_else(|| json!({}));
    if REMOVED.contains(&method.as_str()) {
        let text = match method.as_str() {
            "initialize" => "initialize is not part of 2026-07-28; use server/discover".to_string(),
            m => format!("{m} is not part of 2026-07-28"),
        };
        return rpc_error(StatusCode::NOT_FOUND, client_id, METHOD_NOT_FOUND, &text);
    }
    // Progress and (opted-in) log messages go back on an SSE answer when the client asked for
    // them and accepts SSE.
    let log_level = meta(&msg).and_then(|m| m.get(META_LOG)).and_then(Value::as_str).and_then(severity);
    let sse = headers.get_all(header::ACCEPT).iter().any(|v| v.to_str().is_ok_and(|s| s.contains("text/event-stream")))
        && (log_level.is_some() || meta(&msg).is_some_and(|m| m.contains_key("progressToken")));
    let client_info = meta(&msg).and_then(|m| m.get(META_INFO)).cloned();
    let init_params = json!({
        "protocolVersion": BACKEND_VERSION,
        "capabilities": {"sampling": {}, "elicitation": {}, "roots": {}},
        "clientInfo": client_info.unwrap_or_else(|| json!({"name": "mcpbox", "version": env!("CARGO_PKG_VERSION")})),
    });
    let backend = match st.sup.principal_backend(&server, &principal, init_params).await {
        Ok(b) => b,
        Err(e) => return open_error(e),
    };
    if method == "subscriptions/listen" {
        let filter = msg.get("params").and_then(|p| p.get("notifications")).cloned().unwrap_or_else(|| json!({}));
        return listen(backend.session.clone(), client_id, filter).await;
    }
    if method == "server/discover" {
        let init = &backend.init;
        let mut result = json!({
            "resultType": "complete",
            "supportedVersions": super::SESSION_VERSIONS.iter().chain([&VERSION]).collect::<Vec<_>>(),
            "capabilities": init.get("capabilities").cloned().unwrap_or_else(|| json!({})),
        });
        if let Some(r) = result.as_object_mut() {
            cache_hints(r);
        }
        for k in ["serverInfo", "instructions"] {
            if let Some(v) = init.get(k) {
                result[k] = v.clone();
            }
        }
        // 2026-07-28 names the server in the result's `_meta` (the Rust SDK reads it only there);
        // the top-level `serverInfo` above stays for clients that read the 2025 place.
        if let Some(v) = init.get("serverInfo") {
            result["_meta"]["io.modelcontextprotocol/serverInfo"] = v.clone();
        }
        return json_answer(json!({"jsonrpc": "2.0", "id": client_id, "result": result}));
    }
    // A retry: the answers go to the server, and the original request's wait goes on.
    let params = msg.get_mut("params").and_then(Value::as_object_mut);
    let retry = params.map(|p| (p.remove("requestState"), p.remove("inputResponses")));
    if let Some((Some(state), responses)) = retry {
        let state = state.as_str().unwrap_or("");
        let Some(mut round) = st.stateless.take(state, &server, &principal, &method) else {
            tracing::warn!(server = %server, principal = %principal, "refused a requestState that is invalid, altered, another's, or used already");
            return json_answer(crate::bridge::error_response(
                client_id,
                -32602,
                "requestState is invalid, altered, or was used already; send the original request again without it",
            ));
        };
        let responses = responses.and_then(|r| r.as_object().cloned()).unwrap_or_default();
        for (k, server_id) in std::mem::take(&mut round.asked) {
            let answer = match responses.get(&k) {
                Some(result) => json!({"jsonrpc": "2.0", "id": server_id, "result": result}),
                None => crate::bridge::error_response(server_id, -32603, "the client gave no answer to this request"),
            };
            round.session.send(answer);
        }
        round.created = Instant::now();
        return answer(st, round, client_id, sse).await;
    }
    if let (Some(level), true) = (log_level, backend.init.get("capabilities").and_then(|c| c.get("logging")).is_some())
    {
        // The server's level is one for the principal: set when it changes, filtered here per request.
        let mut set = backend.log_level.lock().await;
        if set.as_deref() != Some(LEVELS[level]) {
            let id = format!("mcpbox-sl-{}", WIRE_IDS.fetch_add(1, Ordering::Relaxed));
            let req =
                json!({"jsonrpc": "2.0", "id": id, "method": "logging/setLevel", "params": {"level": LEVELS[level]}});
            if backend.session.request_json(req).await.is_some() {
                *set = Some(LEVELS[level].to_string());
            }
        }
    }
    if method == "tools/call" {
        let name = msg.get("params").and_then(|p| p.get("name")).and_then(Value::as_str).unwrap_or("");
        match backend_tool(&backend, name).await {
            Ok(Some(tool)) => {
                if let Err(r) = check_param_headers(headers, &msg, &tool) {
                    return r;
                }
            }
            Ok(None) => {}
            // Unchecked is not forwarded: the headers may be what an intermediary routed on.
            Err(()) => {
                return json_answer(crate::bridge::error_response(
                    client_id,
                    -32603,
                    "mcpbox could not read the server's tool list to check the Mcp-Param headers; try again",
                ))
            }
        }
    }
    strip_meta(&mut msg);
    let wire_id = Value::String(format!("mcpbox-sl-{}", WIRE_IDS.fetch_add(1, Ordering::Relaxed)));
    msg["id"] = wire_id.clone();
    let session = backend.session.clone();
    let stream = session.request_stream(msg);
    let round = Round {
        server,
        principal,
        method,
        session,
        stream,
        wire_id,
        log_level,
        asked: HashMap::new(),
        requests: Map::new(),
        caps,
        created: Instant::now(),
    };
    answer(st, round, client_id, sse).await
}

/// Results that carry caching hints in 2026-07-28.
fn cacheable(method: &str) -> bool {
    matches!(method, "tools/list" | "prompts/list" | "resources/list" | "resources/templates/list" | "resources/read")
}

/// The server's own hints pass through; a 2025-era server gives none, and mcpbox cannot know
/// how long its answer holds (or whether it differs per principal): not cached, private.
fn cache_hints(r: &mut Map<String, Value>) {
    r.entry("ttlMs").or_insert_with(|| json!(0));
    r.entry("cacheScope").or_insert_with(|| json!("private"));
}

/// `subscriptions/listen`: an SSE stream of the principal's backend notifications that the
/// filter asks for, opened by `notifications/subscriptions/acknowledged` with what is honoured.
/// Resource URIs are subscribed to on the server (`resources/subscribe`); only those it accepts
/// are acknowledged. One listen stream per principal and server: a new one
/// takes over, and the older one ends.
async fn listen(session: Arc<Session>, client_id: Value, filter: Value) -> Response {
    let want = |k: &str| filter.get(k).and_then(Value::as_bool) == Some(true);
    let mut honoured = Map::new();
    for k in ["toolsListChanged", "promptsListChanged", "resourcesListChanged"] {
        if want(k) {
            honoured.insert(k.into(), json!(true));
        }
    }
    let mut uris = Vec::new();
    for uri in
        filter.get("resourceSubscriptions").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str)
    {
        let id = format!("mcpbox-sl-{}", WIRE_IDS.fetch_add(1, Ordering::Relaxed));
        let req = json!({"jsonrpc": "2.0", "id": id, "method": "resources/subscribe", "params": {"uri": uri}});
        let ok = session
            .request_json(req)
            .await
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .is_some_and(|v| v.get("result").is_some());
        if ok {
            uris.push(uri.to_string());
        }
    }
    if !uris.is_empty() {
        honoured.insert("resourceSubscriptions".into(), json!(uris));
    }
    // A client that opens a new listen stream reads that one: the older one ends.
    let events = session.take_over_events();
    let stamp = |mut v: Value, id: &Value| {
        if let Some(p) = v.as_object_mut().map(|o| o.entry("params").or_insert_with(|| json!({}))) {
            if let Some(p) = p.as_object_mut() {
                let meta = p.entry("_meta").or_insert_with(|| json!({}));
                meta["io.modelcontextprotocol/subscriptionId"] = id.clone();
            }
        }
        v
    };
    let ack = stamp(
        json!({"jsonrpc": "2.0", "method": "notifications/subscriptions/acknowledged", "params": {"notifications": honoured}}),
        &client_id,
    );
    let first = futures_util::stream::iter([ack]);
    let rest =
        futures_util::stream::unfold((events, honoured, client_id), move |(mut events, honoured, id)| async move {
            loop {
                let (_, b) = events.next().await?;
                let Ok(v) = serde_json::from_slice::<Value>(&b) else { continue };
                let m = v.get("method").and_then(Value::as_str).unwrap_or("");
                let pass = match m {
                    "notifications/tools/list_changed" => honoured.contains_key("toolsListChanged"),
                    "notifications/prompts/list_changed" => honoured.contains_key("promptsListChanged"),
                    "notifications/resources/list_changed" => honoured.contains_key("resourcesListChanged"),
                    "notifications/resources/updated" => {
                        let uri = v.get("params").and_then(|p| p.get("uri")).cloned().unwrap_or(Value::Null);
                        honoured
                            .get("resourceSubscriptions")
                            .and_then(Value::as_array)
                            .is_some_and(|l| l.contains(&uri))
                    }
                    _ => false,
                };
                if pass {
                    let v = stamp(v, &id);
                    return Some((v, (events, honoured, id)));
                }
            }
        });
    let events = first
        .chain(rest)
        .map(|v| Ok::<_, std::convert::Infallible>(Event::default().event("message").data(v.to_string())));
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

/// The `io.modelcontextprotocol/…` keys are for mcpbox, not for a 2025-era server.
fn strip_meta(msg: &mut Value) {
    if let Some(m) = msg.get_mut("params").and_then(|p| p.get_mut("_meta")).and_then(Value::as_object_mut) {
        m.retain(|k, _| !k.starts_with("io.modelcontextprotocol/"));
        if m.is_empty() {
            if let Some(p) = msg.get_mut("params").and_then(Value::as_object_mut) {
                p.remove("_meta");
            }
        }
    }
}

fn json_answer(v: Value) -> Response {
    (status_of(&v), [(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

/// Read the backend's messages for `round` until its answer (given the client's id) or until
/// the server asks the client something (an `InputRequiredResult`).
async fn drive(
    st: &Shared,
    mut round: Round,
    client_id: Value,
    progress: Option<&mpsc::UnboundedSender<Value>>,
) -> Value {
    // A client that goes away mid-request (the HTTP request is dropped) cancels it, as does its
    // notifications/cancelled naming the request's id.
    let mut cancel = CancelOnDrop { session: round.session.clone(), wire_id: Some(round.wire_id.clone()) };
    let by_client = st.stateless.in_flight(&round.server, &round.principal, &client_id);
    loop {
        let next = tokio::select! {
            biased;
            () = by_client.token.cancelled() => {
                tracing::info!(server = %round.server, principal = %round.principal, id = %client_id, "request cancelled by the client");
                // `cancel` (its wire id still set) tells the server as it drops.
                return crate::bridge::error_response(client_id, REQUEST_CANCELLED, "request cancelled by the client");
            }
            n = async {
                if round.asked.is_empty() {
                    Ok(round.stream.next().await)
                } else {
                    tokio::time::timeout(GATHER, round.stream.next()).await
                }
            } => n,
        };
        let Ok(next) = next else { break };
        let Some(body) = next else {
            cancel.wire_id = None;
            return crate::bridge::error_response(client_id, -32603, crate::bridge::SERVER_EXITED);
        };
        let Ok(mut v) = serde_json::from_slice::<Value>(&body) else { continue };
        let method = v.get("method").and_then(Value::as_str).map(str::to_owned);
        match (method, v.get("id").cloned()) {
            (None, Some(id)) if id == round.wire_id => {
                cancel.wire_id = None;
                v["id"] = client_id;
                if let Some(r) = v.get_mut("result").and_then(Value::as_object_mut) {
                    r.entry("resultType").or_insert_with(|| json!("complete"));
                    if cacheable(&round.method) {
                        cache_hints(r);
                    }
                }
                return v;
            }
            (Some(m), Some(server_id)) => {
                if m == "ping" {
                    round.session.send(json!({"jsonrpc": "2.0", "id": server_id, "result": {}}));
                    continue;
                }
                let Some(cap) = needs(&m) else {
                    let why = format!("{m} cannot be asked of a 2026-07-28 client");
                    round.session.send(crate::bridge::error_response(server_id, METHOD_NOT_FOUND, &why));
                    continue;
                };
                if round.caps.get(cap).is_none_or(|v| v.is_null()) {
                    // mcpbox answers for a client that cannot be asked this, with the error a
                    // 2026-07-28 server gives (a server that passes it on gets its client 400).
                    let why = format!("the client did not declare the {cap} capability {m} needs");
                    let mut e = crate::bridge::error_response(server_id, MISSING_CAPABILITY, &why);
                    e["error"]["data"] = json!({"requiredCapabilities": {cap: {}}});
                    round.session.send(e);
                    continue;
                }
                let k = input_key(&server_id, &round.requests);
                let mut req = json!({"method": m});
                if let Some(p) = v.get("params") {
                    req["params"] = p.clone();
                }
                round.asked.insert(k.clone(), server_id);
                round.requests.insert(k, req);
            }
            (Some(m), None) if m == "notifications/progress" => {
                if let Some(tx) = progress {
                    let _ = tx.send(v);
                }
            }
            (Some(m), None) if m == "notifications/message" => {
                let level = v.get("params").and_then(|p| p.get("level")).and_then(Value::as_str).and_then(severity);
                if let (Some(tx), Some(want), Some(level)) = (progress, round.log_level, level) {
                    if level >= want {
                        let _ = tx.send(v);
                    }
                }
            }
            _ => {}
        }
    }
    let requests = std::mem::take(&mut round.requests);
    let session = round.session.clone();
    let asked: Vec<Value> = round.asked.values().cloned().collect();
    cancel.wire_id = None;
    match st.stateless.put(round) {
        Some(state) => json!({"jsonrpc": "2.0", "id": client_id, "result": {
            "resultType": "input_required", "inputRequests": requests, "requestState": state}}),
        None => {
            for id in asked {
                session.send(crate::bridge::error_response(
                    id,
                    -32603,
                    "mcpbox has too many input-required requests waiting",
                ));
            }
            crate::bridge::error_response(
                client_id,
                -32603,
                "mcpbox has too many input-required requests waiting; retry later",
            )
        }
    }
}

/// Sends `notifications/cancelled` for a request whose client went away before its answer.
struct CancelOnDrop {
    session: Arc<Session>,
    wire_id: Option<Value>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(id) = self.wire_id.take() {
            let n = json!({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": id, "reason": "the client went away"}});
            self.session.send(n);
        }
    }
}

/// Answer a request: one JSON body, or, with progress wanted, an SSE stream of its progress
/// notifications ending with the answer.
async fn answer(st: Shared, round: Round, client_id: Value, sse: bool) -> Response {
    if !sse {
        // The answer is held in the backend session's budget until the client has taken it.
        let session = round.session.clone();
        let v = drive(&st, round, client_id, None).await;
        let status = status_of(&v);
        let id = v.get("id").cloned().unwrap_or(Value::Null);
        return match session.hold_answer(axum::body::Bytes::from(v.to_string())) {
            Ok(a) => super::json_body(status, a),
            Err(why) => json_answer(crate::bridge::error_response(id, -32603, &why)),
        };
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let v = drive(&st, round, client_id, Some(&tx)).await;
        let _ = tx.send(v);
    });
    // The stream owns the request: a client that goes away ends (and so cancels) it.
    let guard = AbortOnDrop(task.abort_handle());
    let events = futures_util::stream::unfold((rx, guard), |(mut rx, guard)| async move {
        let v = rx.recv().await?;
        Some((v, (rx, guard)))
    });
    let events =
        events.map(|v| Ok::<_, std::convert::Infallible>(Event::default().event("message").data(v.to_string())));
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::{input_queue, Hub, Limits, Transport};

    /// A round whose client never retries is dropped once past its time, without another round
    /// coming along: its server request gets an error (so the server's call can end) and its
    /// backend session is no longer held busy by it.
    #[tokio::test]
    async fn an_abandoned_round_ends_and_its_server_request_gets_an_error() {
        let hub = Arc::new(Hub::new("s", false, None, Limits { max_line: 1 << 20, input: 1 << 20 }));
        let (stdin, mut server) = input_queue(1 << 20);
        hub.connect_process(stdin);
        let session = Session::new(
            "backend".into(),
            "s",
            Principal::anonymous(),
            Transport::Streamable,
            hub.clone(),
            1 << 20,
            tokio_util::sync::CancellationToken::new(),
            Default::default(),
        );
        let call = json!({"jsonrpc":"2.0","id":"c1","method":"tools/call","params":{"name":"ask"}});
        let stream = session.request_stream(call);
        let _forwarded = server.recv().await.unwrap();
        // The server asks the client something while answering (what makes a round).
        let ask = json!({"jsonrpc":"2.0","id":"srv-1","method":"elicitation/create","params":{}});
        hub.from_backend(crate::bridge::Frame::Line(ask.to_string().into()));
        assert_eq!(session.idle_for(), None, "the round's stream holds the session");
        let rounds = Rounds::default();
        let round = Round {
            server: "s".into(),
            principal: Principal::anonymous(),
            method: "tools/call".into(),
            session: session.clone(),
            stream,
            wire_id: json!("c1"),
            log_level: None,
            asked: HashMap::from([("srv-1".to_string(), json!("srv-1"))]),
            requests: Map::new(),
            caps: json!({}),
            created: Instant::now(),
        };
        assert!(rounds.put(round).is_some());
        rounds.expire(ROUND_TTL);
        assert_eq!(rounds.map.lock().unwrap().len(), 1, "a round within its time stays");
        rounds.expire(Duration::ZERO);
        assert!(rounds.map.lock().unwrap().is_empty());
        let answer = tokio::time::timeout(Duration::from_secs(5), server.recv()).await.expect("the server is answered");
        let err: Value = serde_json::from_slice(&answer.unwrap()).unwrap();
        assert_eq!((err["id"].clone(), err["error"]["code"].clone()), (json!("srv-1"), json!(-32603)), "{err}");
        assert!(session.idle_for().is_some(), "the backend can go idle again");
    }
}

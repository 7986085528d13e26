//! The HTTP edge (axum): legacy SSE ([`sse`]), Streamable HTTP ([`streamable`]), health,
//! status, metrics; auth, Host/Origin checks and body limits ([`edge`]).
//!
//! Routes, under `baseURL`'s path prefix for the per-server ones:
//! `GET /NAME/sse`, `POST /NAME/message?sessionId=…`, `POST|GET|DELETE /NAME/mcp`;
//! at the root: `GET /healthz`, `GET /readyz` (no auth), `GET /status`, `GET /metrics`.
//! Which of these a request is for is decided once, by [`edge::decide`] on the raw path; auth,
//! the handlers, logs and metrics all take that decision (there are no axum path patterns).

pub mod edge;
pub mod listen;
pub mod sse;
pub mod stateless;
pub mod streamable;

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};

use crate::bridge::error_response;
use crate::config::{Config, Isolation};
use crate::supervisor::{OpenError, Supervisor};
use edge::{Endpoint, Routed, Target};

/// The protocol versions served with `initialize` and sessions (`streamable`); 2026-07-28,
/// stateless, is `stateless::VERSION`.
pub const SESSION_VERSIONS: [&str; 3] = ["2025-03-26", "2025-06-18", "2025-11-25"];

pub struct AppState {
    pub sup: Arc<Supervisor>,
    pub cfg: Arc<Config>,
    /// `baseURL`'s path ("" or "/prefix").
    pub prefix: String,
    pub edge: edge::Edge,
    /// 2026-07-28 input-required rounds waiting for their retry.
    pub stateless: stateless::Rounds,
}

pub type Shared = Arc<AppState>;

pub fn router(sup: Arc<Supervisor>, cfg: Arc<Config>) -> Router {
    let prefix = cfg.proxy.base_url.as_ref().map(|b| b.path.clone()).unwrap_or_default();
    let state = Arc::new(AppState {
        edge: edge::Edge::new(&cfg),
        sup,
        prefix,
        cfg: cfg.clone(),
        stateless: stateless::Rounds::default(),
    });
    // Input-required rounds whose client never retries end within ROUND_TTL + SWEEP_EVERY even
    // when no other round comes along to expire them (for as long as the app exists).
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        let weak = Arc::downgrade(&state);
        rt.spawn(async move {
            loop {
                tokio::time::sleep(stateless::SWEEP_EVERY).await;
                let Some(st) = weak.upgrade() else { return };
                st.stateless.expire(stateless::ROUND_TTL);
            }
        });
    }
    // No path patterns: every request goes to `dispatch`, which routes on the edge's one decision.
    Router::new().fallback(dispatch).layer(DefaultBodyLimit::max(cfg.max_body_bytes)).with_state(state)
}

/// Every request: [`edge::admit`] decides what it is for and who sent it (or answers 404, 403,
/// 401); the handlers get that decision and never look at the path again.
async fn dispatch(State(st): State<Shared>, req: Request) -> Response {
    let routed = match edge::admit(&st, req.uri(), req.headers()) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let method = req.method().clone();
    let get = method == Method::GET || method == Method::HEAD;
    let Routed { target, principal } = routed;
    if let Target::Server { endpoint: Endpoint::Message | Endpoint::Mcp, .. } = &target {
        if let Some(resp) = foreign_session(&st, &req) {
            return resp;
        }
    }
    match target {
        Target::Health if get => "ok".into_response(),
        Target::Ready if get => readyz(&st),
        Target::Status if get => status(&st),
        Target::Metrics if get => metrics(&st),
        Target::Server { name, endpoint } => match (endpoint, method) {
            (Endpoint::Sse, Method::GET) => sse::get(st, name, principal).await,
            (Endpoint::Message, Method::POST) => {
                let query = req.uri().query().unwrap_or("").to_owned();
                match Bytes::from_request(req, &st).await {
                    Ok(body) => sse::post(st, name, principal, &query, body).await,
                    Err(rej) => rej.into_response(),
                }
            }
            (Endpoint::Mcp, Method::POST) => {
                let headers = req.headers().clone();
                match Bytes::from_request(req, &st).await {
                    Ok(body) => streamable::post(st, name, principal, headers, body).await,
                    Err(rej) => rej.into_response(),
                }
            }
            (Endpoint::Mcp, Method::GET) => streamable::get(st, name, principal, req.headers()).await,
            (Endpoint::Mcp, Method::DELETE) => streamable::delete(st, name, principal, req.headers()).await,
            (Endpoint::Sse, _) => method_not_allowed("GET"),
            (Endpoint::Message, _) => method_not_allowed("POST"),
            (Endpoint::Mcp, _) => method_not_allowed("GET, POST, DELETE"),
        },
        _ => method_not_allowed("GET"),
    }
}

/// 404 at once for a session id that names another replica (`REPLICA.<random>`): the proxy in
/// front routes on that prefix, so a request that got here anyway has no session to find.
fn foreign_session(st: &Shared, req: &Request) -> Option<Response> {
    let sid = match req.headers().get("mcp-session-id") {
        Some(v) => v.to_str().ok()?.to_owned(),
        None => {
            let q = axum::extract::Query::<std::collections::HashMap<String, String>>::try_from_uri(req.uri()).ok()?;
            q.0.get("sessionId")?.clone()
        }
    };
    let owner = crate::supervisor::session_replica(&sid);
    if owner == st.cfg.replica.id.as_deref() {
        return None;
    }
    let msg = match owner {
        Some(r) => format!("unknown session: it belongs to replica {r}\n"),
        None => "unknown session: it names no replica\n".to_string(),
    };
    Some((StatusCode::NOT_FOUND, msg).into_response())
}

fn method_not_allowed(allow: &'static str) -> Response {
    (StatusCode::METHOD_NOT_ALLOWED, [(header::ALLOW, allow)], "method not allowed\n").into_response()
}

/// A JSON answer as a response body, read out of the session's outbox a chunk at a time as the
/// connection takes it: until the client has taken it, it is counted in the session's budget
/// (and finished even if the session ends meanwhile; cut off only if the session's buffer
/// overflowed and dropped everything it held).
struct JsonBody(crate::bridge::Answer);

impl hyper::body::Body for JsonBody {
    type Data = Bytes;
    type Error = crate::bridge::AnswerGone;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(
            self.0.next_chunk(crate::bridge::outbox::ANSWER_CHUNK).transpose().map(|r| r.map(hyper::body::Frame::data)),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.0.remaining() == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.0.remaining() as u64)
    }
}

/// A response whose body is `answer` (a JSON-RPC message), read out of its session's outbox as
/// the connection takes it.
pub fn json_body(status: StatusCode, answer: crate::bridge::Answer) -> Response {
    let len = answer.len();
    let mut r = axum::body::Body::new(JsonBody(answer)).into_response();
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    r
}

/// A JSON-RPC error as an HTTP response.
pub fn rpc_error(status: StatusCode, id: Value, code: i64, msg: &str) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], error_response(id, code, msg).to_string()).into_response()
}

pub fn open_error(e: OpenError) -> Response {
    match e {
        OpenError::NotFound => (StatusCode::NOT_FOUND, "no such server\n").into_response(),
        OpenError::TooMany(_) => {
            let mut r = (StatusCode::SERVICE_UNAVAILABLE, "too many sessions on this server\n").into_response();
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            r
        }
        // The global budget: the detail (which budget) is in the log.
        OpenError::Busy(_) => {
            let mut r =
                (StatusCode::SERVICE_UNAVAILABLE, "mcpbox is at its session limit; retry later\n").into_response();
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            r
        }
        OpenError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response(),
        // Draining after SIGTERM: the proxy's next pick is another replica.
        OpenError::Draining => {
            let mut r = (StatusCode::SERVICE_UNAVAILABLE, "draining: this replica takes no new sessions; retry\n")
                .into_response();
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
        // The detail is in the log.
        OpenError::Launch(_) => (StatusCode::SERVICE_UNAVAILABLE, "the server could not be started\n").into_response(),
    }
}

/// Parse a request body into JSON-RPC messages, or the error response to give.
pub enum Parsed {
    One(Value),
    Batch(Vec<Value>),
}

pub fn parse_body(body: &[u8]) -> Result<Parsed, Value> {
    let v: Value = serde_json::from_slice(body).map_err(|_| error_response(Value::Null, -32700, "Parse error"))?;
    match v {
        Value::Array(items) if !items.is_empty() => {
            for i in &items {
                check_jsonrpc(i)?;
            }
            Ok(Parsed::Batch(items))
        }
        v => {
            check_jsonrpc(&v)?;
            Ok(Parsed::One(v))
        }
    }
}

fn check_jsonrpc(v: &Value) -> Result<(), Value> {
    let invalid = || {
        let id = v.get("id").filter(|i| i.is_string() || i.is_number()).cloned().unwrap_or(Value::Null);
        error_response(id, -32600, "Invalid Request: not a JSON-RPC 2.0 message")
    };
    let o = v.as_object().ok_or_else(invalid)?;
    if o.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(invalid());
    }
    if let Some(id) = o.get("id") {
        if !(id.is_string() || id.is_number() || (id.is_null() && !o.contains_key("method"))) {
            return Err(invalid());
        }
    }
    match o.get("method") {
        Some(Value::String(_)) => Ok(()),
        Some(_) => Err(invalid()),
        None if o.contains_key("id") && (o.contains_key("result") || o.contains_key("error")) => Ok(()),
        None => Err(invalid()),
    }
}

fn readyz(st: &Shared) -> Response {
    if st.sup.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response();
    }
    let failed: Vec<&str> = st.sup.servers.values().filter(|s| s.ready.is_err()).map(|s| s.cfg.name.as_str()).collect();
    if failed.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", failed.join(", "))).into_response()
    }
}

fn status(st: &Shared) -> Response {
    let servers: serde_json::Map<String, Value> = st
        .sup
        .servers
        .values()
        .map(|s| {
            let m = &s.metrics;
            (
                s.cfg.name.clone(),
                json!({
                    "isolation": match s.cfg.isolation { Isolation::Session => "session", Isolation::Shared => "shared", Isolation::Principal => "principal" },
                    "ready": s.ready.is_ok(),
                    "sessions": s.active_sessions(),
                    "confinement": m.level.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                    "restarts": m.restarts.load(Ordering::Relaxed),
                    "requests": m.requests.load(Ordering::Relaxed),
                    "errors": m.errors.load(Ordering::Relaxed),
                    "denials": denials_json(&s.cfg.name),
                }),
            )
        })
        .collect();
    axum::Json(json!({"name": st.cfg.proxy.name, "version": env!("CARGO_PKG_VERSION"), "servers": servers}))
        .into_response()
}

/// Counts per layer and the most recent distinct denials (newest first, at most 20; the full
/// record is in the server's state dir for `mcpbox policy suggest`).
fn denials_json(server: &str) -> Value {
    let Some(d) = crate::denials::registry().get(server) else {
        return json!({"total": {}, "recent": []});
    };
    let total: serde_json::Map<String, Value> =
        d.totals().iter().map(|(l, n)| (l.as_str().to_string(), json!(n))).collect();
    let recent: Vec<Value> = d.recent().iter().rev().take(20).map(|r| json!(r)).collect();
    json!({"total": total, "recent": recent})
}

fn label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn metrics(st: &Shared) -> Response {
    let mut out = String::new();
    let servers: Vec<_> = st.sup.servers.values().collect();
    let mut family = |name: &str, kind: &str, help: &str, f: &dyn Fn(&crate::supervisor::Server) -> u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for s in &servers {
            let _ = writeln!(out, "{name}{{server=\"{}\"}} {}", label(&s.cfg.name), f(s));
        }
    };
    family("mcpbox_sessions_active", "gauge", "Open client sessions.", &|s| s.active_sessions() as u64);
    family("mcpbox_requests_total", "counter", "JSON-RPC requests from clients.", &|s| {
        s.metrics.requests.load(Ordering::Relaxed)
    });
    family("mcpbox_errors_total", "counter", "Failed starts, crashes and rejected messages.", &|s| {
        s.metrics.errors.load(Ordering::Relaxed)
    });
    family("mcpbox_restarts_total", "counter", "Restarts of shared servers.", &|s| {
        s.metrics.restarts.load(Ordering::Relaxed)
    });
    let _ = writeln!(out, "# HELP mcpbox_sandbox_start_seconds Time to start a sandboxed server.\n# TYPE mcpbox_sandbox_start_seconds summary");
    for s in &servers {
        let n = label(&s.cfg.name);
        let sum = s.metrics.start_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "mcpbox_sandbox_start_seconds_sum{{server=\"{n}\"}} {sum}");
        let _ = writeln!(
            out,
            "mcpbox_sandbox_start_seconds_count{{server=\"{n}\"}} {}",
            s.metrics.starts.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(out, "# HELP mcpbox_session_start_seconds How long a new session (isolation \"session\") waited for its server process.\n# TYPE mcpbox_session_start_seconds histogram");
    for s in &servers {
        s.metrics.session_start.render(
            "mcpbox_session_start_seconds",
            &format!("server=\"{}\"", label(&s.cfg.name)),
            &mut out,
        );
    }
    let _ = writeln!(out, "# HELP mcpbox_session_starts_total New sessions by start: \"warm\" (a process was waiting) or \"cold\" (it was started for the session).\n# TYPE mcpbox_session_starts_total counter");
    for s in &servers {
        let n = label(&s.cfg.name);
        let _ = writeln!(
            out,
            "mcpbox_session_starts_total{{server=\"{n}\",start=\"warm\"}} {}",
            s.metrics.warm_starts.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "mcpbox_session_starts_total{{server=\"{n}\",start=\"cold\"}} {}",
            s.metrics.cold_starts.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(out, "# HELP mcpbox_denials_total Accesses a sandbox layer refused (landlock, seccomp, egress).\n# TYPE mcpbox_denials_total counter");
    for s in &servers {
        let totals = crate::denials::registry().get(&s.cfg.name).map(|d| d.totals());
        for layer in crate::denials::Layer::ALL {
            let n = totals.iter().flatten().find(|(l, _)| *l == layer).map_or(0, |(_, n)| *n);
            let _ = writeln!(
                out,
                "mcpbox_denials_total{{server=\"{}\",layer=\"{}\"}} {n}",
                label(&s.cfg.name),
                layer.as_str()
            );
        }
    }
    let _ = writeln!(out, "# HELP mcpbox_confinement_level Confinement level of the last started process.\n# TYPE mcpbox_confinement_level gauge");
    for s in &servers {
        if let Some(level) = s.metrics.level.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            let _ = writeln!(
                out,
                "mcpbox_confinement_level{{server=\"{}\",level=\"{}\"}} 1",
                label(&s.cfg.name),
                label(&level)
            );
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

#[cfg(test)]
mod stateless_tests;
#[cfg(test)]
mod tests;

//! Streamable HTTP transport at `/NAME/mcp` (revisions 2025-03-26, 2025-06-18, 2025-11-25).
//!
//! Answer rule for a POSTed request: if `Accept` lists `text/event-stream`, the answer is an
//! SSE stream that carries the messages related to that request (progress, server requests)
//! and ends with the response; otherwise a single `application/json` response (related
//! messages then go to the GET stream). Notifications and responses get 202. JSON-RPC batches
//! are refused (-32600): 2025-06-18 removed them, and no 2025-03-26 client we know sends them.
//!
//! An adapter over [`crate::bridge::Session`], whose outbox decides where each message from the
//! server goes: the response to the POST that carried the request; related messages to that
//! POST's SSE stream while it is open; everything else to the session's GET stream, as events
//! with ids `0-<n>` that a reconnecting GET replays from `Last-Event-ID` (while the session's
//! byte budget still holds them).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::Value;

use super::edge::Principal;
use super::{open_error, parse_body, rpc_error, Parsed, Shared};
use crate::bridge::{Session, Transport};

use super::SESSION_VERSIONS as VERSIONS;
const SESSION_HEADER: &str = "mcp-session-id";

/// How long a POST answered as SSE waits for its first message before sending headers alone.
const FIRST_EVENT_WAIT: Duration = Duration::from_millis(50);

/// An unknown `MCP-Protocol-Version`: 400 with JSON-RPC error -32022 naming the versions
/// served (both generations), which a dual-era client reads to pick one.
#[allow(clippy::result_large_err)]
fn version_ok(h: &HeaderMap, msg: &Value) -> Result<(), Response> {
    match h.get("mcp-protocol-version") {
        None => Ok(()),
        Some(v) if v.to_str().is_ok_and(|v| VERSIONS.contains(&v)) => Ok(()),
        Some(v) => {
            let mut supported: Vec<&str> = VERSIONS.to_vec();
            supported.push(super::stateless::VERSION);
            let text = format!("unsupported MCP-Protocol-Version; supported: {}", supported.join(", "));
            let id = msg.get("id").cloned().unwrap_or(Value::Null);
            let mut body = crate::bridge::error_response(id, -32022, &text);
            body["error"]["data"] =
                serde_json::json!({"supported": supported, "requested": String::from_utf8_lossy(v.as_bytes())});
            Err((StatusCode::BAD_REQUEST, [(header::CONTENT_TYPE, "application/json")], body.to_string())
                .into_response())
        }
    }
}

fn accepts_sse(h: &HeaderMap) -> bool {
    h.get_all(header::ACCEPT).iter().any(|v| v.to_str().is_ok_and(|s| s.contains("text/event-stream")))
}

/// The streamable session named by the request, or the response to give.
#[allow(clippy::result_large_err)]
fn lookup(st: &Shared, server: &str, principal: &Principal, h: &HeaderMap) -> Result<Arc<Session>, Response> {
    let Some(sid) = h.get(SESSION_HEADER).and_then(|v| v.to_str().ok()) else {
        return Err((StatusCode::BAD_REQUEST, "Mcp-Session-Id header is required\n").into_response());
    };
    match st.sup.server(server).and_then(|s| s.session(sid, principal)) {
        Some(s) if s.transport == Transport::Streamable => Ok(s),
        _ => Err((StatusCode::NOT_FOUND, "unknown or ended session\n").into_response()),
    }
}

pub async fn post(st: Shared, server: String, principal: Principal, headers: HeaderMap, body: Bytes) -> Response {
    let Some(srv) = st.sup.server(&server).cloned() else {
        return (StatusCode::NOT_FOUND, "no such server\n").into_response();
    };
    let msg = match parse_body(&body) {
        Ok(Parsed::One(v)) => v,
        Ok(Parsed::Batch(_)) => {
            srv.metrics.errors.fetch_add(1, Ordering::Relaxed);
            return rpc_error(
                StatusCode::BAD_REQUEST,
                Value::Null,
                -32600,
                "Invalid Request: JSON-RPC batches are not supported",
            );
        }
        Err(e) => {
            srv.metrics.errors.fetch_add(1, Ordering::Relaxed);
            return (StatusCode::BAD_REQUEST, [(header::CONTENT_TYPE, "application/json")], e.to_string())
                .into_response();
        }
    };
    // The protocol generation is chosen per request.
    if super::stateless::wants(&headers, &msg) {
        return super::stateless::post(st, server, principal, &headers, msg).await;
    }
    if let Err(r) = version_ok(&headers, &msg) {
        return r;
    }
    let method = msg.get("method").and_then(Value::as_str);
    let is_request = method.is_some() && msg.get("id").is_some();
    let ss = if method == Some("initialize") && !headers.contains_key(SESSION_HEADER) {
        match st.sup.open_session(&server, principal, Transport::Streamable).await {
            Ok(ss) => ss,
            Err(e) => return open_error(e),
        }
    } else {
        match lookup(&st, &server, &principal, &headers) {
            Ok(ss) => ss,
            Err(r) => return r,
        }
    };
    let sid_header = HeaderValue::from_str(&ss.id).ok();
    if !is_request {
        ss.send(msg);
        return (StatusCode::ACCEPTED, "").into_response();
    }
    let id = msg["id"].clone();
    let mut resp = if accepts_sse(&headers) {
        let mut stream = ss.request_stream(msg);
        // Most answers come within a millisecond: waiting briefly for the first message lets
        // the headers, the event and the end of the stream leave in one write instead of three
        // packets. A slow call still gets its headers (and keep-alives) after the wait.
        let first = tokio::time::timeout(FIRST_EVENT_WAIT, stream.next()).await;
        let (first, more) = match first {
            Ok(Some(b)) => (Some(b), true),
            Ok(None) => (None, false),
            Err(_) => (None, true),
        };
        let rest = futures_util::stream::unfold((stream, more), |(mut stream, more)| async move {
            if !more {
                return None;
            }
            let b = stream.next().await?;
            Some((b, (stream, true)))
        });
        let events = futures_util::stream::iter(first)
            .chain(rest)
            .map(|b| Ok::<_, Infallible>(Event::default().event("message").data(String::from_utf8_lossy(&b))));
        Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
    } else {
        match ss.request_answer(msg).await {
            Some(answer) => super::json_body(StatusCode::OK, answer),
            None => rpc_error(StatusCode::OK, id, -32603, "session ended"),
        }
    };
    if let Some(v) = sid_header {
        resp.headers_mut().insert(SESSION_HEADER, v);
    }
    resp
}

pub async fn get(st: Shared, server: String, principal: Principal, headers: &HeaderMap) -> Response {
    if let Err(r) = version_ok(headers, &Value::Null) {
        return r;
    }
    if !accepts_sse(headers) {
        return (StatusCode::NOT_ACCEPTABLE, "GET needs Accept: text/event-stream\n").into_response();
    }
    let ss = match lookup(&st, &server, &principal, headers) {
        Ok(ss) => ss,
        Err(r) => return r,
    };
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("0-"))
        .and_then(|n| n.parse::<u64>().ok());
    let Some(events) = ss.events(last) else {
        return (StatusCode::CONFLICT, "this session already has a GET stream\n").into_response();
    };
    let stream = futures_util::stream::unfold(events, |mut events| async move {
        let (n, b) = events.next().await?;
        let ev = Event::default().id(format!("0-{n}")).event("message").data(String::from_utf8_lossy(&b));
        Some((Ok::<_, Infallible>(ev), events))
    });
    let mut resp = Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response();
    if let Ok(v) = HeaderValue::from_str(&ss.id) {
        resp.headers_mut().insert(SESSION_HEADER, v);
    }
    resp
}

pub async fn delete(st: Shared, server: String, principal: Principal, headers: &HeaderMap) -> Response {
    if let Err(r) = version_ok(headers, &Value::Null) {
        return r;
    }
    let ss = match lookup(&st, &server, &principal, headers) {
        Ok(ss) => ss,
        Err(r) => return r,
    };
    // The supervisor then ends its process and the bridge frees all the session held.
    ss.close("DELETE from the client");
    StatusCode::NO_CONTENT.into_response()
}

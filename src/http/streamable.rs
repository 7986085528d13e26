//! Streamable HTTP transport at `/NAME/mcp` (revisions 2025-03-26, 2025-06-18, 2025-11-25).
//!
//! Answer rule for a POSTed request: if `Accept` lists `text/event-stream`, the answer is an
//! SSE stream that carries the messages related to that request (progress, server requests)
//! and ends with the response; otherwise a single `application/json` response (related
//! messages then go to the GET stream). Notifications and responses get 202. JSON-RPC batches
//! are refused (-32600): 2025-06-18 removed them, and no 2025-03-26 client we know sends them.
//!
//! Every message from the server reaches exactly one stream: the response goes to the POST
//! that carried the request; related messages to that POST's SSE stream while it is open;
//! everything else to the session's GET stream, through a bounded ring of events with ids
//! `0-<n>` that a reconnecting GET replays from `Last-Event-ID`.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_stream::wrappers::ReceiverStream;

use super::edge::Principal;
use super::sse::StreamGuard;
use super::{open_error, parse_body, rpc_error, Parsed, Shared};
use crate::bridge::{router::key, Key, Outbound};
use crate::supervisor::Session;

pub const VERSIONS: [&str; 3] = ["2025-03-26", "2025-06-18", "2025-11-25"];
const SESSION_HEADER: &str = "mcp-session-id";

enum Waiter {
    Json(oneshot::Sender<Bytes>),
    Sse(mpsc::Sender<Bytes>),
}

struct Inner {
    posts: HashMap<Key, Waiter>,
    ring: VecDeque<(u64, Bytes)>,
    next_event: u64,
    /// Highest event number sent on a GET stream.
    delivered: u64,
    get_open: bool,
    closed: bool,
}

pub struct StreamSession {
    pub session: Arc<Session>,
    inner: Mutex<Inner>,
    notify: Notify,
    cap: usize,
}

impl StreamSession {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn route(&self, o: Outbound) {
        let mut inner = self.lock();
        if let Some(k) = &o.reply_to {
            match inner.posts.remove(k) {
                Some(Waiter::Json(tx)) => {
                    let _ = tx.send(o.body);
                }
                Some(Waiter::Sse(tx)) => {
                    let _ = tx.try_send(o.body);
                }
                None => tracing::debug!(session = %self.session.id, "response for a request whose POST is gone; dropped"),
            }
            return;
        }
        if let Some(Waiter::Sse(tx)) = o.related_to.as_ref().and_then(|k| inner.posts.get(k)) {
            if tx.try_send(o.body.clone()).is_ok() {
                return;
            }
        }
        inner.next_event += 1;
        let n = inner.next_event;
        inner.ring.push_back((n, o.body));
        while inner.ring.len() > self.cap {
            inner.ring.pop_front();
        }
        drop(inner);
        self.notify.notify_one();
    }
}

/// How long a POST answered as SSE waits for its first message before sending headers alone.
const FIRST_EVENT_WAIT: Duration = Duration::from_millis(50);

#[allow(clippy::result_large_err)]
fn version_ok(h: &HeaderMap) -> Result<(), Response> {
    match h.get("mcp-protocol-version") {
        None => Ok(()),
        Some(v) if v.to_str().is_ok_and(|v| VERSIONS.contains(&v)) => Ok(()),
        Some(_) => Err((StatusCode::BAD_REQUEST, format!("unsupported MCP-Protocol-Version; supported: {}\n", VERSIONS.join(", "))).into_response()),
    }
}

fn accepts_sse(h: &HeaderMap) -> bool {
    h.get_all(header::ACCEPT).iter().any(|v| v.to_str().is_ok_and(|s| s.contains("text/event-stream")))
}

/// The streamable session named by the request, or the response to give.
#[allow(clippy::result_large_err)]
fn lookup(st: &Shared, server: &str, principal: &Principal, h: &HeaderMap) -> Result<Arc<StreamSession>, Response> {
    let Some(sid) = h.get(SESSION_HEADER).and_then(|v| v.to_str().ok()) else {
        return Err((StatusCode::BAD_REQUEST, "Mcp-Session-Id header is required\n").into_response());
    };
    let ss = st.streams.lock().unwrap_or_else(|e| e.into_inner()).get(sid).cloned();
    match ss {
        // Another principal's session is as unknown as one that never existed.
        Some(ss) if ss.session.server == server && ss.session.principal == *principal && !ss.session.closed.is_cancelled() => Ok(ss),
        _ => Err((StatusCode::NOT_FOUND, "unknown or ended session\n").into_response()),
    }
}

async fn open(st: &Shared, server: &str, principal: Principal) -> Result<Arc<StreamSession>, Response> {
    let (session, mut rx) = st.sup.open_session(server, principal).await.map_err(open_error)?;
    let ss = Arc::new(StreamSession {
        session: session.clone(),
        inner: Mutex::new(Inner { posts: HashMap::new(), ring: VecDeque::new(), next_event: 0, delivered: 0, get_open: false, closed: false }),
        notify: Notify::new(),
        cap: st.cfg.session_queue,
    });
    st.streams.lock().unwrap_or_else(|e| e.into_inner()).insert(session.id.clone(), ss.clone());
    let (st2, ss2) = (st.clone(), ss.clone());
    tokio::spawn(async move {
        while let Some(o) = rx.recv().await {
            ss2.route(o);
        }
        // The session ended: its streams end, its id is forgotten.
        {
            let mut inner = ss2.lock();
            inner.closed = true;
            inner.posts.clear();
        }
        ss2.notify.notify_one();
        ss2.session.close("session queue closed");
        st2.streams.lock().unwrap_or_else(|e| e.into_inner()).remove(&ss2.session.id);
    });
    Ok(ss)
}

pub async fn post(st: Shared, server: String, principal: Principal, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(r) = version_ok(&headers) {
        return r;
    }
    let Some(srv) = st.sup.server(&server).cloned() else {
        return (StatusCode::NOT_FOUND, "no such server\n").into_response();
    };
    let msg = match parse_body(&body) {
        Ok(Parsed::One(v)) => v,
        Ok(Parsed::Batch(_)) => {
            srv.metrics.errors.fetch_add(1, Ordering::Relaxed);
            return rpc_error(StatusCode::BAD_REQUEST, Value::Null, -32600, "Invalid Request: JSON-RPC batches are not supported");
        }
        Err(e) => {
            srv.metrics.errors.fetch_add(1, Ordering::Relaxed);
            return (StatusCode::BAD_REQUEST, [(header::CONTENT_TYPE, "application/json")], e.to_string()).into_response();
        }
    };
    let method = msg.get("method").and_then(Value::as_str);
    let is_request = method.is_some() && msg.get("id").is_some();
    let ss = if method == Some("initialize") && !headers.contains_key(SESSION_HEADER) {
        match open(&st, &server, principal).await {
            Ok(ss) => ss,
            Err(r) => return r,
        }
    } else {
        match lookup(&st, &server, &principal, &headers) {
            Ok(ss) => ss,
            Err(r) => return r,
        }
    };
    let sid_header = HeaderValue::from_str(&ss.session.id).ok();
    if !is_request {
        ss.session.send(msg);
        return (StatusCode::ACCEPTED, "").into_response();
    }
    let k = key(&msg["id"]);
    let mut resp = if accepts_sse(&headers) {
        let (tx, mut rx) = mpsc::channel(st.cfg.session_queue);
        ss.lock().posts.insert(k, Waiter::Sse(tx));
        ss.session.send(msg);
        // Most answers come within a millisecond: waiting briefly for the first message lets
        // the headers, the event and the end of the stream leave in one write instead of three
        // packets. A slow call still gets its headers (and keep-alives) after the wait.
        let first = match tokio::time::timeout(FIRST_EVENT_WAIT, rx.recv()).await {
            Ok(Some(b)) => Some(b),
            Ok(None) | Err(_) => None,
        };
        let events = futures_util::stream::iter(first)
            .chain(ReceiverStream::new(rx))
            .map(|b| Ok::<_, Infallible>(Event::default().event("message").data(String::from_utf8_lossy(&b))));
        Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
    } else {
        let (tx, rx) = oneshot::channel();
        ss.lock().posts.insert(k.clone(), Waiter::Json(tx));
        ss.session.send(msg);
        match rx.await {
            Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
            Err(_) => {
                let id = serde_json::from_str(&k).unwrap_or(Value::Null);
                rpc_error(StatusCode::OK, id, -32603, "session ended")
            }
        }
    };
    if let Some(v) = sid_header {
        resp.headers_mut().insert(SESSION_HEADER, v);
    }
    resp
}

pub async fn get(st: Shared, server: String, principal: Principal, headers: &HeaderMap) -> Response {
    if let Err(r) = version_ok(headers) {
        return r;
    }
    if !accepts_sse(headers) {
        return (StatusCode::NOT_ACCEPTABLE, "GET needs Accept: text/event-stream\n").into_response();
    }
    let ss = match lookup(&st, &server, &principal, headers) {
        Ok(ss) => ss,
        Err(r) => return r,
    };
    let cursor = {
        let mut inner = ss.lock();
        if inner.get_open {
            return (StatusCode::CONFLICT, "this session already has a GET stream\n").into_response();
        }
        inner.get_open = true;
        let last = headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("0-"))
            .and_then(|n| n.parse::<u64>().ok());
        last.unwrap_or(inner.delivered)
    };
    ss.session.streams.fetch_add(1, Ordering::Relaxed);
    struct GetGuard(Arc<StreamSession>, #[allow(dead_code)] StreamGuard);
    impl Drop for GetGuard {
        fn drop(&mut self) {
            self.0.lock().get_open = false;
        }
    }
    let guard = GetGuard(ss.clone(), StreamGuard { session: ss.session.clone(), end_session: false });
    let stream = futures_util::stream::unfold((guard, cursor), |(guard, cursor)| async move {
        loop {
            {
                let mut inner = guard.0.lock();
                if let Some((n, b)) = inner.ring.iter().find(|(n, _)| *n > cursor).cloned() {
                    inner.delivered = inner.delivered.max(n);
                    drop(inner);
                    let ev = Event::default().id(format!("0-{n}")).event("message").data(String::from_utf8_lossy(&b));
                    return Some((Ok::<_, Infallible>(ev), (guard, n)));
                }
                if inner.closed {
                    return None;
                }
            }
            guard.0.notify.notified().await;
        }
    });
    let mut resp = Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response();
    if let Ok(v) = HeaderValue::from_str(&ss.session.id) {
        resp.headers_mut().insert(SESSION_HEADER, v);
    }
    resp
}

pub async fn delete(st: Shared, server: String, principal: Principal, headers: &HeaderMap) -> Response {
    if let Err(r) = version_ok(headers) {
        return r;
    }
    let ss = match lookup(&st, &server, &principal, headers) {
        Ok(ss) => ss,
        Err(r) => return r,
    };
    ss.session.close("DELETE from the client");
    st.streams.lock().unwrap_or_else(|e| e.into_inner()).remove(&ss.session.id);
    StatusCode::NO_CONTENT.into_response()
}

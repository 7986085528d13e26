//! JSON-RPC between client sessions and a server's stdio: framing ([`framing`]), routing and id
//! remapping ([`router`]), and the [`Hub`] that ties one server process to its sessions.

pub mod framing;
pub mod router;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::ToolFilter;
pub use framing::{Frame, LineReader};
pub use router::{error_response, Action, Delivery, Key, Router, SessionId, SERVER_EXITED};

/// Who a request comes from: which configured token it presented (never the token itself), or
/// `anonymous` where no token guards the endpoint. A session belongs to the principal that opened
/// it; the same session id presented by another principal names nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal(pub std::sync::Arc<str>);

impl Principal {
    pub fn anonymous() -> Self {
        Principal("anonymous".into())
    }
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A message on its way to a client, serialized once.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub body: Bytes,
    pub reply_to: Option<Key>,
    pub related_to: Option<Key>,
}

/// Where a session's messages go: a bounded queue, and the token that ends the session.
pub struct SessionSink {
    pub tx: mpsc::Sender<Outbound>,
    pub closed: CancellationToken,
}

struct State {
    router: Router,
    sinks: HashMap<SessionId, SessionSink>,
    stdin: Option<mpsc::Sender<Bytes>>,
    waiting: std::collections::VecDeque<(SessionId, Value)>,
}

/// Client messages a shared server's hub holds while its process is (re)starting.
const MAX_WAITING: usize = 1024;

/// One server process (or, in shared mode, the succession of its restarts) and its sessions.
pub struct Hub {
    server: String,
    shared: bool,
    max_line: usize,
    state: Mutex<State>,
    /// `logEnabled`: log each client message (method and id, never params).
    log_requests: bool,
    /// `timeout`: each client request's deadline, kept by [`deadlines`].
    timeout: Option<std::time::Duration>,
    deadline_tx: Option<mpsc::UnboundedSender<Deadline>>,
}

/// When a request (session, client id) runs out of time.
type Deadline = (tokio::time::Instant, SessionId, Value);

/// Most deadlines one hub keeps: beyond it the oldest fire at once (its request is answered
/// early rather than mcpbox holding memory without bound for a flood of requests).
const MAX_DEADLINES: usize = 100_000;

/// What `from_client` tells the caller.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    Forwarded,
    /// Answered without the server (cache, filter, server gone).
    Answered,
}

impl Hub {
    pub fn new(server: &str, shared: bool, filter: Option<ToolFilter>, max_line: usize) -> Self {
        Hub {
            server: server.to_string(),
            shared,
            max_line,
            state: Mutex::new(State {
                router: Router::new(shared, filter),
                sinks: HashMap::new(),
                stdin: None,
                waiting: std::collections::VecDeque::new(),
            }),
            log_requests: false,
            timeout: None,
            deadline_tx: None,
        }
    }

    /// The server's mcp-proxy options: `logEnabled` and `timeout`. With a timeout, a task keeps
    /// the deadlines (it ends with the hub); call inside a tokio runtime.
    pub fn with_options(self, log_requests: bool, timeout: Option<std::time::Duration>) -> Arc<Hub> {
        let (tx, rx) = mpsc::unbounded_channel();
        let hub = Arc::new(Hub { log_requests, timeout, deadline_tx: timeout.map(|_| tx), ..self });
        if timeout.is_some() {
            tokio::spawn(deadlines(Arc::downgrade(&hub), rx));
        }
        hub
    }

    /// A request ran out of time: answered with an error, cancelled at the server.
    fn expire(&self, sid: &SessionId, client_id: &Value) {
        let t = self.timeout.unwrap_or_default();
        let reason = format!("request timed out after {t:?} (the timeout of server {})", self.server);
        let mut st = self.lock();
        let actions = st.router.expire(sid, client_id, &reason);
        if !actions.is_empty() {
            tracing::warn!(server = %self.server, session = %sid, id = %client_id, "request timed out after {t:?}: answered with an error, cancelled at the server");
            self.run(&mut st, actions);
        }
    }

    pub fn max_line(&self) -> usize {
        self.max_line
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn attach(&self, sid: SessionId, sink: SessionSink) {
        let mut st = self.lock();
        st.router.attach(sid.clone());
        st.sinks.insert(sid, sink);
    }

    /// Drop a session: its queue closes (its streams end once drained).
    pub fn detach(&self, sid: &SessionId) {
        let mut st = self.lock();
        st.router.detach(sid);
        st.sinks.remove(sid);
    }

    pub fn session_count(&self) -> usize {
        self.lock().sinks.len()
    }

    /// A new process is up: route to its stdin; bring it up to date if sessions already
    /// initialized an earlier one.
    pub fn connect_process(&self, stdin: mpsc::Sender<Bytes>) {
        let mut st = self.lock();
        st.stdin = Some(stdin);
        let actions = st.router.reinitialize();
        self.run(&mut st, actions);
        // What clients sent while there was no process goes to this one, in order.
        let waiting = std::mem::take(&mut st.waiting);
        for (sid, msg) in waiting {
            if st.sinks.contains_key(&sid) {
                let actions = st.router.from_client(&sid, msg);
                self.run(&mut st, actions);
            }
        }
    }

    /// A shared server could not be started: requests waiting for it fail now.
    pub fn fail_waiting(&self, reason: &str) {
        let mut st = self.lock();
        let waiting = std::mem::take(&mut st.waiting);
        for (sid, msg) in waiting {
            if let (Some(id), true) = (msg.get("id"), msg.get("method").is_some()) {
                let d = Delivery { msg: error_response(id.clone(), -32603, reason), reply_to: Some(router::key(id)), related_to: None };
                self.deliver(&mut st, sid, d);
            }
        }
    }

    /// The process is gone: fail everything in flight.
    pub fn process_exited(&self) {
        let mut st = self.lock();
        st.stdin = None;
        let actions = st.router.backend_exited();
        self.run(&mut st, actions);
    }

    pub fn from_client(&self, sid: &SessionId, msg: Value) -> Sent {
        let method = msg.get("method").and_then(Value::as_str);
        if self.log_requests {
            if let Some(m) = method {
                let id = msg.get("id").map(Value::to_string).unwrap_or_default();
                tracing::info!(server = %self.server, session = %sid, id = %id, method = m, "client message");
            }
        }
        if let (Some(tx), Some(t), Some(id), true) = (&self.deadline_tx, self.timeout, msg.get("id"), method.is_some()) {
            let _ = tx.send((tokio::time::Instant::now() + t, sid.clone(), id.clone()));
        }
        let mut st = self.lock();
        if st.stdin.is_none() && self.shared && st.waiting.len() < MAX_WAITING {
            // A shared server between processes (starting, or restarting after a crash):
            // hold the message for the next one rather than failing it.
            st.waiting.push_back((sid.clone(), msg));
            return Sent::Forwarded;
        }
        if st.stdin.is_none() {
            if let (Some(id), true) = (msg.get("id"), msg.get("method").is_some()) {
                let d = Delivery {
                    msg: error_response(id.clone(), -32603, SERVER_EXITED),
                    reply_to: Some(router::key(id)),
                    related_to: None,
                };
                self.deliver(&mut st, sid.clone(), d);
            }
            return Sent::Answered;
        }
        let actions = st.router.from_client(sid, msg);
        let forwarded = actions.iter().any(|a| matches!(a, Action::Backend(_)));
        self.run(&mut st, actions);
        if forwarded {
            Sent::Forwarded
        } else {
            Sent::Answered
        }
    }

    pub fn from_backend(&self, frame: Frame) {
        let mut st = self.lock();
        match frame {
            Frame::Line(line) => match serde_json::from_slice::<Value>(&line) {
                Ok(v) if v.is_object() => {
                    let actions = st.router.from_backend(v);
                    self.run(&mut st, actions);
                }
                Ok(Value::Array(items)) => {
                    for v in items {
                        let actions = st.router.from_backend(v);
                        self.run(&mut st, actions);
                    }
                }
                _ => {
                    let shown = String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned();
                    tracing::warn!(server = %self.server, line = %shown, "server wrote a line that is not JSON-RPC; ignored");
                }
            },
            Frame::TooLong(n) => {
                tracing::warn!(server = %self.server, bytes = n, limit = self.max_line, "server wrote an over-long line; discarded");
                let note = json!({"jsonrpc": "2.0", "method": "notifications/message", "params": {
                    "level": "error", "logger": "mcpbox",
                    "data": format!("mcpbox discarded a {n}-byte message from the server (limit {} bytes)", self.max_line)}});
                let targets = st.router.busy_sessions();
                for sid in targets {
                    self.deliver(&mut st, sid, Delivery { msg: note.clone(), reply_to: None, related_to: None });
                }
            }
        }
    }

    fn run(&self, st: &mut State, actions: Vec<Action>) {
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        while let Some(a) = queue.pop_front() {
            match a {
                Action::Backend(v) => {
                    let mut b = serde_json::to_vec(&v).unwrap_or_default();
                    b.push(b'\n');
                    let ok = st.stdin.as_ref().is_some_and(|tx| tx.try_send(Bytes::from(b)).is_ok());
                    if !ok {
                        tracing::warn!(server = %self.server, "server input queue full or closed; message not delivered");
                        queue.extend(st.router.undeliverable(&v, "MCP server is not accepting input (queue full)"));
                    }
                }
                Action::Session(sid, d) => self.deliver(st, sid, d),
            }
        }
    }

    fn deliver(&self, st: &mut State, sid: SessionId, d: Delivery) {
        let Some(sink) = st.sinks.get(&sid) else { return };
        let body = Bytes::from(serde_json::to_vec(&d.msg).unwrap_or_default());
        match sink.tx.try_send(Outbound { body, reply_to: d.reply_to, related_to: d.related_to }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(server = %self.server, session = %sid, "client does not read its messages: outbound queue full, closing the session");
                sink.closed.cancel();
                st.sinks.remove(&sid);
                st.router.detach(&sid);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                st.sinks.remove(&sid);
                st.router.detach(&sid);
            }
        }
    }
}

/// Keeps one hub's request deadlines, in order (one timeout per server, so they come due in the
/// order they were set), and expires each that is due; ends when the hub is gone.
async fn deadlines(hub: std::sync::Weak<Hub>, mut rx: mpsc::UnboundedReceiver<Deadline>) {
    let mut due: std::collections::VecDeque<Deadline> = std::collections::VecDeque::new();
    loop {
        let next = due.front().map(|d| d.0);
        let sleep = async move {
            match next {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            d = rx.recv() => match d {
                Some(d) => due.push_back(d),
                None => return,
            },
            () = sleep => {}
        }
        let now = tokio::time::Instant::now();
        while due.front().is_some_and(|d| d.0 <= now) || due.len() > MAX_DEADLINES {
            let Some((_, sid, id)) = due.pop_front() else { break };
            let Some(h) = hub.upgrade() else { return };
            h.expire(&sid, &id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(hub: &Hub, name: &str) -> (SessionId, mpsc::Receiver<Outbound>) {
        let (tx, rx) = mpsc::channel(16);
        let sid: SessionId = name.to_string().into();
        hub.attach(sid.clone(), SessionSink { tx, closed: CancellationToken::new() });
        (sid, rx)
    }

    #[tokio::test]
    async fn a_request_past_its_timeout_gets_an_error_and_is_cancelled_at_the_server() {
        let hub = Hub::new("s", false, None, 1 << 20).with_options(true, Some(std::time::Duration::from_millis(100)));
        let (sid, mut rx) = session(&hub, "a");
        let (stdin, mut server) = mpsc::channel(16);
        hub.connect_process(stdin);
        let started = tokio::time::Instant::now();
        assert_eq!(hub.from_client(&sid, json!({"jsonrpc":"2.0","id":"slow","method":"tools/call","params":{"name":"x"}})), Sent::Forwarded);
        assert_eq!(hub.from_client(&sid, json!({"jsonrpc":"2.0","id":"fast","method":"tools/call","params":{"name":"y"}})), Sent::Forwarded);
        let fwd: Vec<Value> = [server.recv().await.unwrap(), server.recv().await.unwrap()].iter().map(|b| serde_json::from_slice(b).unwrap()).collect();
        // The fast one is answered in time; the slow one is not.
        hub.from_backend(Frame::Line(Bytes::from(json!({"jsonrpc":"2.0","id":fwd[1]["id"],"result":{}}).to_string())));
        let first: Value = serde_json::from_slice(&rx.recv().await.unwrap().body).unwrap();
        assert_eq!(first["id"], "fast");
        let out = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv()).await.expect("the deadline fires").unwrap();
        let err: Value = serde_json::from_slice(&out.body).unwrap();
        assert!(started.elapsed() >= std::time::Duration::from_millis(100));
        assert_eq!((err["id"].clone(), err["error"]["code"].as_i64()), (json!("slow"), Some(router::REQUEST_TIMEOUT)));
        assert!(err["error"]["message"].as_str().unwrap().contains("timed out after 100ms"), "{err}");
        let cancel: Value = serde_json::from_slice(&server.recv().await.unwrap()).unwrap();
        assert_eq!((cancel["method"].as_str(), &cancel["params"]["requestId"]), (Some("notifications/cancelled"), &fwd[0]["id"]));
        // The answer that comes too late goes nowhere; the fast one got no error.
        hub.from_backend(Frame::Line(Bytes::from(json!({"jsonrpc":"2.0","id":fwd[0]["id"],"result":{}}).to_string())));
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn shared_requests_wait_for_the_next_process() {
        let hub = Hub::new("s", true, None, 1 << 20);
        let (a, mut out) = session(&hub, "a");
        let req = serde_json::json!({"jsonrpc":"2.0","id":1,"method":"tools/list"});
        assert_eq!(hub.from_client(&a, req), Sent::Forwarded);
        assert!(out.try_recv().is_err(), "no error while the process is starting");
        let (stdin, mut backend) = mpsc::channel(16);
        hub.connect_process(stdin);
        let line = backend.try_recv().expect("the waiting request reaches the new process");
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["method"], "tools/list");
    }

    #[test]
    fn waiting_requests_fail_when_the_start_fails() {
        let hub = Hub::new("s", true, None, 1 << 20);
        let (a, mut out) = session(&hub, "a");
        hub.from_client(&a, serde_json::json!({"jsonrpc":"2.0","id":"x","method":"tools/list"}));
        hub.fail_waiting("MCP server could not be started");
        let o = out.try_recv().expect("an answer");
        let v: Value = serde_json::from_slice(&o.body).unwrap();
        assert_eq!(v["id"], "x");
        assert_eq!(v["error"]["message"], "MCP server could not be started");
    }

    #[test]
    fn session_hubs_without_a_process_answer_at_once() {
        let hub = Hub::new("s", false, None, 1 << 20);
        let (a, mut out) = session(&hub, "a");
        assert_eq!(hub.from_client(&a, serde_json::json!({"jsonrpc":"2.0","id":2,"method":"ping"})), Sent::Answered);
        let v: Value = serde_json::from_slice(&out.try_recv().unwrap().body).unwrap();
        assert_eq!(v["error"]["message"], router::SERVER_EXITED);
    }
}

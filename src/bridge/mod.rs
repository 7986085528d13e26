//! JSON-RPC between client sessions and a server's stdio: framing ([`framing`]), routing and id
//! remapping ([`router`]), and the [`Hub`] that ties one server process to its sessions.

pub mod framing;
pub mod router;

use std::collections::HashMap;
use std::sync::Mutex;

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
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn session(hub: &Hub, name: &str) -> (SessionId, mpsc::Receiver<Outbound>) {
        let (tx, rx) = mpsc::channel(16);
        let sid: SessionId = name.to_string().into();
        hub.attach(sid.clone(), SessionSink { tx, closed: CancellationToken::new() });
        (sid, rx)
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

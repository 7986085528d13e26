//! JSON-RPC between client sessions and a server's stdio: framing ([`framing`]), routing and id
//! remapping ([`router`]), each session's outbox with reply routing, replay and its byte budget
//! ([`outbox`]), the sessions themselves ([`session`]), and the [`Hub`] that ties one server
//! process to its sessions.
//!
//! The HTTP transports (`http/sse.rs`, `http/streamable.rs`) are adapters over [`Session`];
//! the supervisor starts processes, wires them to a hub, and opens and ends sessions. This
//! module does no I/O of its own beyond the queues it is handed; it imports nothing above it.
//!
//! Budgets (bytes, never message counts): a session's outbox (`mcpbox.sessionBufferBytes`),
//! a server's input queue (`mcpbox.serverInputBytes`, also holding a shared server's messages
//! while it restarts), a server's output lines (`mcpbox.maxLineBytes`), and the router's tables
//! (requests in flight per session, server-to-client requests outstanding).

pub mod framing;
pub mod outbox;
pub mod router;
pub mod session;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::ToolFilter;
pub use framing::{Frame, LineReader};
pub use outbox::{Outbox, Transport};
pub use router::{error_response, Action, Delivery, Key, Router, SessionId, SERVER_EXITED};
pub use session::{Answer, AnswerGone, PostStream, Session, Sessions};

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

/// The way to a server's stdin: a queue bounded in bytes. A server that stops reading its
/// input makes senders fail at once instead of making mcpbox hold what they send.
#[derive(Clone)]
pub struct Input {
    tx: mpsc::UnboundedSender<Bytes>,
    held: Arc<AtomicUsize>,
    budget: usize,
}

/// The server side of [`Input`]: the writer calls [`InputRx::written`] once a message is out.
pub struct InputRx {
    rx: mpsc::UnboundedReceiver<Bytes>,
    held: Arc<AtomicUsize>,
}

/// A bounded input queue of `budget` bytes (one message larger than that still passes when the
/// queue is empty: the body limit bounds it).
pub fn input_queue(budget: usize) -> (Input, InputRx) {
    let (tx, rx) = mpsc::unbounded_channel();
    let held = Arc::new(AtomicUsize::new(0));
    (Input { tx, held: held.clone(), budget }, InputRx { rx, held })
}

impl Input {
    fn try_send(&self, b: Bytes) -> Result<(), &'static str> {
        let len = b.len();
        let before = self.held.fetch_add(len, Ordering::SeqCst);
        if before > 0 && before + len > self.budget {
            self.held.fetch_sub(len, Ordering::SeqCst);
            return Err("full");
        }
        self.tx.send(b).map_err(|_| {
            self.held.fetch_sub(len, Ordering::SeqCst);
            "closed"
        })
    }
}

impl InputRx {
    pub async fn recv(&mut self) -> Option<Bytes> {
        self.rx.recv().await
    }

    pub fn written(&self, len: usize) {
        self.held.fetch_sub(len, Ordering::SeqCst);
    }
}

struct Sink {
    outbox: Arc<Outbox>,
    closed: CancellationToken,
}

struct State {
    router: Router,
    sinks: HashMap<SessionId, Sink>,
    stdin: Option<Input>,
    /// A shared server's client messages while it has no process, with their size.
    waiting: std::collections::VecDeque<(SessionId, Value, usize)>,
    waiting_bytes: usize,
}

/// The budgets a hub enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest line accepted from the server's stdout.
    pub max_line: usize,
    /// Bytes queued for the server's stdin (and held for a restarting shared server).
    pub input: usize,
}

/// One server process (or, in shared mode, the succession of its restarts) and its sessions.
pub struct Hub {
    server: String,
    shared: bool,
    limits: Limits,
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
    pub fn new(server: &str, shared: bool, filter: Option<ToolFilter>, limits: Limits) -> Self {
        Hub {
            server: server.to_string(),
            shared,
            limits,
            state: Mutex::new(State {
                router: Router::new(shared, filter),
                sinks: HashMap::new(),
                stdin: None,
                waiting: std::collections::VecDeque::new(),
                waiting_bytes: 0,
            }),
            log_requests: false,
            timeout: None,
            deadline_tx: None,
        }
    }

    /// Route as a shared server's hub does ([`Router::share`]) while the process stays this
    /// hub's alone (not restarted, nothing held for a next one): a principal's process, which
    /// its stateless requests and its 2025-era sessions share.
    pub fn with_shared_routing(self) -> Self {
        self.lock().router.share();
        self
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
            return;
        }
        let reason = format!(
            "the server did not answer initialize within {t:?} (the timeout of server {}); try again",
            self.server
        );
        let actions = st.router.expire_initialize(sid, client_id, &reason);
        if !actions.is_empty() {
            tracing::warn!(server = %self.server, session = %sid, "the server did not answer initialize within {t:?}: {} waiting initialize request(s) answered with an error; the next one is sent to it again", actions.len());
            self.run(&mut st, actions);
        }
    }

    pub fn max_line(&self) -> usize {
        self.limits.max_line
    }

    pub fn input_budget(&self) -> usize {
        self.limits.input
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A session joins: the hub delivers its messages to `outbox`, and cancels `closed` if the
    /// session must end (its outbox over budget).
    pub fn attach(&self, sid: SessionId, outbox: Arc<Outbox>, closed: CancellationToken) {
        let mut st = self.lock();
        st.router.attach(sid.clone());
        st.sinks.insert(sid, Sink { outbox, closed });
    }

    /// Drop a session: what is on its way to it is dropped.
    pub fn detach(&self, sid: &SessionId) {
        let mut st = self.lock();
        st.router.detach(sid);
        st.sinks.remove(sid);
        let before = st.waiting.len();
        st.waiting.retain(|(s, _, _)| s != sid);
        if st.waiting.len() != before {
            st.waiting_bytes = st.waiting.iter().map(|(_, _, n)| n).sum();
        }
    }

    pub fn session_count(&self) -> usize {
        self.lock().sinks.len()
    }

    /// A new process is up: route to its stdin; bring it up to date if sessions already
    /// initialized an earlier one.
    pub fn connect_process(&self, stdin: Input) {
        let mut st = self.lock();
        st.stdin = Some(stdin);
        let actions = st.router.reinitialize();
        self.run(&mut st, actions);
        // What clients sent while there was no process goes to this one, in order.
        let waiting = std::mem::take(&mut st.waiting);
        st.waiting_bytes = 0;
        for (sid, msg, _) in waiting {
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
        st.waiting_bytes = 0;
        for (sid, msg, _) in waiting {
            self.answer_error(&mut st, &sid, &msg, reason);
        }
    }

    fn answer_error(&self, st: &mut State, sid: &SessionId, msg: &Value, reason: &str) {
        if let (Some(id), true) = (msg.get("id"), msg.get("method").is_some()) {
            let d = Delivery {
                msg: error_response(id.clone(), -32603, reason),
                reply_to: Some(router::key(id)),
                related_to: None,
            };
            self.deliver(st, sid.clone(), d);
        }
    }

    /// The process is gone (or its stdout closed, which ends it): fail everything in flight.
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
        if let (Some(tx), Some(t), Some(id), true) = (&self.deadline_tx, self.timeout, msg.get("id"), method.is_some())
        {
            let _ = tx.send((tokio::time::Instant::now() + t, sid.clone(), id.clone()));
        }
        let mut st = self.lock();
        if st.stdin.is_none() && self.shared {
            // A shared server between processes (starting, or restarting after a crash):
            // hold the message for the next one rather than failing it, within the input budget.
            let size = serde_json::to_vec(&msg).map(|v| v.len()).unwrap_or(0);
            if st.waiting_bytes + size <= self.limits.input || st.waiting.is_empty() {
                st.waiting_bytes += size;
                st.waiting.push_back((sid.clone(), msg, size));
                return Sent::Forwarded;
            }
            tracing::warn!(server = %self.server, session = %sid, budget = self.limits.input,
                "messages held for a restarting server went over mcpbox.serverInputBytes; message refused");
            self.answer_error(&mut st, sid, &msg, INPUT_FULL);
            return Sent::Answered;
        }
        if st.stdin.is_none() {
            self.answer_error(&mut st, sid, &msg, SERVER_EXITED);
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
            Frame::TooLong(n, head) => {
                let max = self.limits.max_line;
                tracing::warn!(server = %self.server, bytes = n, limit = max, "server wrote a line longer than mcpbox.maxLineBytes; discarded");
                let what =
                    format!("mcpbox discarded a {n}-byte message from the server (mcpbox.maxLineBytes is {max} bytes)");
                let note = json!({"jsonrpc": "2.0", "method": "notifications/message", "params": {
                    "level": "error", "logger": "mcpbox", "data": what}});
                let targets = st.router.busy_sessions();
                for sid in targets {
                    self.deliver(&mut st, sid, Delivery { msg: note.clone(), reply_to: None, related_to: None });
                }
                // If it was an answer, its request gets an error instead of waiting for ever:
                // the request its opening names, or else the only one in flight. (A message
                // that names a method is the server's own request or notification.)
                let o = router::opening(&head);
                let id = match o.id {
                    _ if o.method => None,
                    Some(id) if st.router.is_pending(&id) => Some(id),
                    _ if o.answer => st.router.only_request_in_flight(),
                    _ => None,
                };
                if let Some(id) = id {
                    let err = json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32603, "message": what}});
                    let actions = st.router.from_backend(err);
                    self.run(&mut st, actions);
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
                    let sent = match st.stdin.as_ref() {
                        Some(tx) => tx.try_send(Bytes::from(b)),
                        None => Err("closed"),
                    };
                    if let Err(why) = sent {
                        let reason = if why == "full" { INPUT_FULL } else { SERVER_EXITED };
                        if why == "full" {
                            tracing::warn!(server = %self.server, budget = self.limits.input,
                                "server does not read its input: mcpbox.serverInputBytes is full; message refused");
                        }
                        queue.extend(st.router.undeliverable(&v, reason));
                    }
                }
                Action::Session(sid, d) => self.deliver(st, sid, d),
            }
        }
    }

    fn deliver(&self, st: &mut State, sid: SessionId, d: Delivery) {
        let Some(sink) = st.sinks.get(&sid) else { return };
        if d.msg.get("method").and_then(Value::as_str) == Some("notifications/tools/list_changed") {
            sink.outbox.note_tools_changed();
        }
        let body = Bytes::from(serde_json::to_vec(&d.msg).unwrap_or_default());
        if let Err(e) = sink.outbox.push(Outbound { body, reply_to: d.reply_to, related_to: d.related_to }) {
            tracing::warn!(server = %self.server, session = %sid, budget = e.budget, "session ends: budget mcpbox.sessionBufferBytes exceeded ({e})");
            sink.outbox.overflowed(&format!("mcpbox ended this session: {e}"));
            sink.closed.cancel();
            st.sinks.remove(&sid);
            st.router.detach(&sid);
        } else if sink.outbox.lock().is_closed() {
            st.sinks.remove(&sid);
            st.router.detach(&sid);
        }
    }
}

/// The error a request gets when the server's input queue is full.
pub const INPUT_FULL: &str = "MCP server is not reading its input: mcpbox.serverInputBytes is full; try again later";

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

    const LIMITS: Limits = Limits { max_line: 1 << 20, input: 1 << 20 };

    /// A legacy session's outbox and its stream, read without sockets.
    struct Out(Arc<Outbox>, u64);

    impl Out {
        fn try_recv(&mut self) -> Result<Outbound, ()> {
            match self.0.lock().next_event(self.1) {
                outbox::Next::Item((n, body)) => {
                    self.1 = n;
                    Ok(Outbound { body, reply_to: None, related_to: None })
                }
                _ => Err(()),
            }
        }
    }

    fn session(hub: &Hub, name: &str) -> (SessionId, Out) {
        let outbox = Arc::new(Outbox::new(Transport::LegacySse, 1 << 20));
        let cursor = outbox.lock().open_events(None).unwrap();
        let sid: SessionId = name.to_string().into();
        hub.attach(sid.clone(), outbox.clone(), CancellationToken::new());
        (sid, Out(outbox, cursor))
    }

    #[tokio::test]
    async fn a_request_past_its_timeout_gets_an_error_and_is_cancelled_at_the_server() {
        let hub = Hub::new("s", false, None, LIMITS).with_options(true, Some(std::time::Duration::from_millis(100)));
        let (sid, mut out) = session(&hub, "a");
        let (stdin, mut server) = input_queue(1 << 20);
        hub.connect_process(stdin);
        let started = tokio::time::Instant::now();
        assert_eq!(
            hub.from_client(&sid, json!({"jsonrpc":"2.0","id":"slow","method":"tools/call","params":{"name":"x"}})),
            Sent::Forwarded
        );
        assert_eq!(
            hub.from_client(&sid, json!({"jsonrpc":"2.0","id":"fast","method":"tools/call","params":{"name":"y"}})),
            Sent::Forwarded
        );
        let fwd: Vec<Value> = [server.recv().await.unwrap(), server.recv().await.unwrap()]
            .iter()
            .map(|b| serde_json::from_slice(b).unwrap())
            .collect();
        // The fast one is answered in time; the slow one is not.
        hub.from_backend(Frame::Line(Bytes::from(json!({"jsonrpc":"2.0","id":fwd[1]["id"],"result":{}}).to_string())));
        let first: Value = serde_json::from_slice(&out.try_recv().unwrap().body).unwrap();
        assert_eq!(first["id"], "fast");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let err: Value = serde_json::from_slice(&out.try_recv().expect("the deadline fired").body).unwrap();
        assert!(started.elapsed() >= std::time::Duration::from_millis(100));
        assert_eq!((err["id"].clone(), err["error"]["code"].as_i64()), (json!("slow"), Some(router::REQUEST_TIMEOUT)));
        assert!(err["error"]["message"].as_str().unwrap().contains("timed out after 100ms"), "{err}");
        let cancel: Value = serde_json::from_slice(&server.recv().await.unwrap()).unwrap();
        assert_eq!(
            (cancel["method"].as_str(), &cancel["params"]["requestId"]),
            (Some("notifications/cancelled"), &fwd[0]["id"])
        );
        // The answer that comes too late goes nowhere; the fast one got no error.
        hub.from_backend(Frame::Line(Bytes::from(json!({"jsonrpc":"2.0","id":fwd[0]["id"],"result":{}}).to_string())));
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        assert!(out.try_recv().is_err());
    }

    /// A shared server that does not answer its first `initialize`: after `timeout` the session
    /// that sent it and those waiting on it get an error saying so, and the next `initialize`
    /// is sent to the server again; its answer serves that session.
    #[tokio::test]
    async fn a_shared_servers_unanswered_initialize_times_out_and_is_sent_again() {
        let hub = Hub::new("s", true, None, LIMITS).with_options(false, Some(std::time::Duration::from_millis(100)));
        let (a, mut out_a) = session(&hub, "a");
        let (b, mut out_b) = session(&hub, "b");
        let (c, mut out_c) = session(&hub, "c");
        let (stdin, mut server) = input_queue(1 << 20);
        hub.connect_process(stdin);
        let init = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18"}});
        let started = tokio::time::Instant::now();
        assert_eq!(hub.from_client(&a, init.clone()), Sent::Forwarded);
        let first: Value = serde_json::from_slice(&server.recv().await.unwrap()).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        assert_eq!(hub.from_client(&b, init.clone()), Sent::Answered, "b waits on a's initialize");
        assert!(out_b.try_recv().is_err());
        for out in [&mut out_a, &mut out_b] {
            let got = loop {
                if let Ok(o) = out.try_recv() {
                    break serde_json::from_slice::<Value>(&o.body).unwrap();
                }
                assert!(started.elapsed() < std::time::Duration::from_secs(5), "no answer within 5 s");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            };
            assert!(started.elapsed() >= std::time::Duration::from_millis(100));
            assert_eq!((got["id"].clone(), got["error"]["code"].as_i64()), (json!(0), Some(router::REQUEST_TIMEOUT)));
            let m = got["error"]["message"].as_str().unwrap();
            assert!(m.contains("did not answer initialize within 100ms"), "{m}");
        }
        // The late answer reaches nobody; c's initialize goes to the server again.
        let late = json!({"jsonrpc":"2.0","id":first["id"],"result":{"serverInfo":{"name":"late"}}});
        hub.from_backend(Frame::Line(Bytes::from(late.to_string())));
        assert_eq!(hub.from_client(&c, init.clone()), Sent::Forwarded);
        let again: Value = serde_json::from_slice(&server.recv().await.unwrap()).unwrap();
        assert_eq!((again["method"].as_str(), again["id"] == first["id"]), (Some("initialize"), false));
        let ok = json!({"jsonrpc":"2.0","id":again["id"],"result":{"serverInfo":{"name":"x"}}});
        hub.from_backend(Frame::Line(Bytes::from(ok.to_string())));
        let got: Value = serde_json::from_slice(&out_c.try_recv().unwrap().body).unwrap();
        assert_eq!(got["result"]["serverInfo"]["name"], "x");
        assert!(out_a.try_recv().is_err() && out_b.try_recv().is_err(), "the late answer went nowhere");
        // c's deadline passes with its initialize answered: nothing more happens.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(out_c.try_recv().is_err());
        assert_eq!(hub.from_client(&a, init), Sent::Answered, "answered from the cached result");
        let got: Value = serde_json::from_slice(&out_a.try_recv().unwrap().body).unwrap();
        assert_eq!(got["result"]["serverInfo"]["name"], "x");
    }

    /// A hub with a process connected (what the server reads comes out of the returned queue)
    /// and one Streamable HTTP session on it with a `budget` of bytes.
    fn streamable_session(budget: usize) -> (Arc<Hub>, Arc<session::Session>, InputRx) {
        let hub = Arc::new(Hub::new("s", false, None, LIMITS));
        let (stdin, server) = input_queue(1 << 20);
        hub.connect_process(stdin);
        let s = session::Session::new(
            "a".into(),
            "s",
            Principal::anonymous(),
            Transport::Streamable,
            hub.clone(),
            budget,
            CancellationToken::new(),
            Default::default(),
        );
        (hub, s, server)
    }

    /// A request answered as one JSON body keeps its session busy while it waits: a call that
    /// runs past `idleTimeout` is not ended under its client (the supervisor reaps sessions
    /// whose `idle_for` passes it).
    #[tokio::test]
    async fn a_json_request_in_flight_keeps_its_session_from_idling() {
        let (hub, s, mut server) = streamable_session(1 << 20);
        assert!(s.idle_for().is_some(), "a session with nothing in flight is idle");
        let call = {
            let s = s.clone();
            tokio::spawn(async move {
                s.request_json(json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"slow"}})).await
            })
        };
        let fwd: Value = serde_json::from_slice(&server.recv().await.unwrap()).unwrap();
        assert_eq!(s.idle_for(), None, "a session waiting on its server is not idle");
        hub.from_backend(Frame::Line(Bytes::from(json!({"jsonrpc":"2.0","id":fwd["id"],"result":{}}).to_string())));
        assert!(call.await.unwrap().is_some(), "the answer reaches the request");
        assert!(s.idle_for().is_some(), "idle again once answered");
    }

    /// A JSON-body answer stays in its session's budget while its [`Answer`] (the HTTP
    /// response being written) lives: another that does not fit beside it gets an error naming
    /// the budget, the session goes on, and dropping the first (or a request whose client went
    /// away before its answer came) frees its bytes.
    #[tokio::test]
    async fn json_answers_are_held_within_the_session_budget() {
        let (hub, s, mut server) = streamable_session(100_000);
        let answer_with = |id: Value, n: usize| {
            let body = json!({"jsonrpc":"2.0","id":id,"result":{"text":"x".repeat(n)}}).to_string();
            hub.from_backend(Frame::Line(Bytes::from(body)));
        };
        let ask = |id: u64| {
            let s = s.clone();
            tokio::spawn(async move {
                s.request_answer(json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":"read"}})).await
            })
        };
        let call = ask(1);
        let fwd: Value = serde_json::from_slice(&server.recv().await.unwrap()).unwrap();
        answer_with(fwd["id"].clone(), 60_000);
        let mut first = call.await.unwrap().expect("answered");
        assert!(first.len() > 60_000 && s.outbox.lock().held() == first.len(), "held while unread");
        let call = ask(2);
        let fwd: Value = serde_json::from_slice(&server.recv().await.unwrap()).unwrap();
        answer_with(fwd["id"].clone(), 60_000);
        let refused = call.await.unwrap().expect("answered").into_bytes().unwrap();
        let e: Value = serde_json::from_slice(&refused).unwrap();
        assert_eq!(e["id"], 2);
        assert!(e["error"]["message"].as_str().unwrap().contains("mcpbox.sessionBufferBytes"), "{e}");
        assert!(!s.is_closed(), "the session goes on");
        // Read out half, then the client goes away: all of it is freed.
        let chunk = first.next_chunk(30_000).unwrap().unwrap();
        assert_eq!((chunk.len(), s.outbox.lock().held()), (30_000, first.len()));
        drop(first);
        assert_eq!(s.outbox.lock().held(), 0);
        // A request whose client went away before its answer came holds nothing of it.
        let call = ask(3);
        let fwd: Value = serde_json::from_slice(&server.recv().await.unwrap()).unwrap();
        call.abort();
        let _ = call.await;
        answer_with(fwd["id"].clone(), 60_000);
        assert_eq!(s.outbox.lock().held(), 0);
        // And one that fits goes through whole.
        let call = ask(4);
        let fwd: Value = serde_json::from_slice(&server.recv().await.unwrap()).unwrap();
        answer_with(fwd["id"].clone(), 60_000);
        let mut whole = call.await.unwrap().expect("answered");
        let mut got = Vec::new();
        while let Some(c) = whole.next_chunk(25_600).unwrap() {
            got.extend_from_slice(&c);
        }
        let v: Value = serde_json::from_slice(&got).unwrap();
        assert_eq!((v["id"].clone(), v["result"]["text"].as_str().map(str::len)), (json!(4), Some(60_000)));
        assert_eq!(s.outbox.lock().held(), 0);
        // An answer mcpbox makes itself (2026-07-28) is held the same way.
        let made = s.hold_answer(Bytes::from(vec![b'm'; 70_000])).expect("fits");
        let why = s.hold_answer(Bytes::from(vec![b'n'; 40_000])).err().expect("does not fit beside it");
        assert!(why.contains("mcpbox.sessionBufferBytes, 100000 bytes, 70000 of them in use"), "{why}");
        assert_eq!(made.into_bytes().map(|b| b.len()), Some(70_000));
        assert_eq!(s.outbox.lock().held(), 0);
        assert!(s.hold_answer(Bytes::from(vec![b'n'; 40_000])).is_ok());
        // A small one is the Answer's own, whatever the budget holds.
        let _big = s.hold_answer(Bytes::from(vec![b'b'; 90_000])).expect("fits");
        let mut small = s.hold_answer(Bytes::from_static(b"{}")).expect("small: not held");
        assert_eq!(small.next_chunk(1 << 20).unwrap().as_deref(), Some(&b"{}"[..]));
        drop((_big, small));
        // The session ends (DELETE, the server exits) while an answer is being read out: the
        // answer still finishes, and is freed once read.
        let call = ask(5);
        let fwd: Value = serde_json::from_slice(&server.recv().await.unwrap()).unwrap();
        answer_with(fwd["id"].clone(), 60_000);
        let mut reading = call.await.unwrap().expect("answered");
        let mut got = reading.next_chunk(20_000).unwrap().unwrap().to_vec();
        let answer_len = reading.len();
        s.finish("the server exited");
        assert!(s.is_closed());
        let held = s.outbox.lock().held();
        assert!(held >= answer_len, "the answer is still held after the session's end ({held} bytes)");
        while let Some(c) = reading.next_chunk(20_000).expect("not cut off by the session's end") {
            got.extend_from_slice(&c);
        }
        let v: Value = serde_json::from_slice(&got).unwrap();
        assert_eq!((v["id"].clone(), v["result"]["text"].as_str().map(str::len)), (json!(5), Some(60_000)));
        drop(reading);
        assert_eq!(s.outbox.lock().held(), held - answer_len, "freed once read");
    }

    /// An answer over `maxLineBytes` is discarded, and its request answered with an error that
    /// says so instead of waiting for ever: found by the id the answer opens with, or, cut
    /// before its id, as the only request in flight.
    #[tokio::test]
    async fn a_request_whose_answer_is_too_long_gets_an_error() {
        let hub = Hub::new("s", false, None, LIMITS);
        let (sid, mut out) = session(&hub, "a");
        let (stdin, mut server) = input_queue(1 << 20);
        hub.connect_process(stdin);
        for (client_id, head_of) in [
            (
                "big",
                (|id: &Value| format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{{"content":[{{"text":"xxx"#))
                    as fn(&Value) -> String,
            ),
            ("cut", |_: &Value| r#"{"jsonrpc":"2.0","result":{"content":[{"text":"xxx"#.to_string()),
        ] {
            let call = json!({"jsonrpc":"2.0","id":client_id,"method":"tools/call","params":{"name":"read"}});
            assert_eq!(hub.from_client(&sid, call), Sent::Forwarded);
            let fwd: Value = serde_json::from_slice(&server.recv().await.unwrap()).unwrap();
            hub.from_backend(Frame::TooLong(50 << 20, Bytes::from(head_of(&fwd["id"]))));
            let mut got = Vec::new();
            while let Ok(o) = out.try_recv() {
                got.push(serde_json::from_slice::<Value>(&o.body).unwrap());
            }
            let err = got.iter().find(|m| m["id"] == json!(client_id)).unwrap_or_else(|| panic!("{got:?}"));
            assert!(err["error"]["message"].as_str().unwrap().contains("maxLineBytes"), "{err}");
        }
    }

    #[test]
    fn shared_requests_wait_for_the_next_process() {
        let hub = Hub::new("s", true, None, LIMITS);
        let (a, mut out) = session(&hub, "a");
        let req = serde_json::json!({"jsonrpc":"2.0","id":1,"method":"tools/list"});
        assert_eq!(hub.from_client(&a, req), Sent::Forwarded);
        assert!(out.try_recv().is_err(), "no error while the process is starting");
        let (stdin, mut backend) = input_queue(1 << 20);
        hub.connect_process(stdin);
        let line = backend.rx.try_recv().expect("the waiting request reaches the new process");
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["method"], "tools/list");
    }

    #[test]
    fn waiting_requests_fail_when_the_start_fails() {
        let hub = Hub::new("s", true, None, LIMITS);
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
        let hub = Hub::new("s", false, None, LIMITS);
        let (a, mut out) = session(&hub, "a");
        assert_eq!(hub.from_client(&a, serde_json::json!({"jsonrpc":"2.0","id":2,"method":"ping"})), Sent::Answered);
        let v: Value = serde_json::from_slice(&out.try_recv().unwrap().body).unwrap();
        assert_eq!(v["error"]["message"], router::SERVER_EXITED);
    }

    #[test]
    fn a_server_that_does_not_read_holds_no_more_than_its_input_budget() {
        let hub = Hub::new("s", false, None, Limits { max_line: 1 << 20, input: 1000 });
        let (a, mut out) = session(&hub, "a");
        let (stdin, backend) = input_queue(1000);
        hub.connect_process(stdin);
        let call = |i: u64| serde_json::json!({"jsonrpc":"2.0","id":i,"method":"tools/call","params":{"name":"x","arguments":{"pad":"p".repeat(300)}}});
        let sent: Vec<Sent> = (0..10).map(|i| hub.from_client(&a, call(i))).collect();
        assert_eq!(
            sent.iter().filter(|s| **s == Sent::Forwarded).count(),
            10,
            "the router forwards; the queue refuses"
        );
        assert!(backend.held.load(Ordering::SeqCst) <= 1000, "{}", backend.held.load(Ordering::SeqCst));
        let mut refused = 0;
        while let Ok(o) = out.try_recv() {
            let v: Value = serde_json::from_slice(&o.body).unwrap();
            assert_eq!(v["error"]["message"], INPUT_FULL);
            refused += 1;
        }
        assert!(refused >= 7, "{refused} of 10 refused");
        // Once the server reads, calls pass again.
        backend.written(backend.held.load(Ordering::SeqCst));
        hub.from_client(&a, call(99));
        assert!(out.try_recv().is_err(), "accepted");
    }

    #[test]
    fn an_outbox_over_budget_ends_its_session_alone() {
        let hub = Hub::new("s", true, None, LIMITS);
        let small = Arc::new(Outbox::new(Transport::LegacySse, 1000));
        small.lock().open_events(None).unwrap();
        let ended = CancellationToken::new();
        let a: SessionId = "a".into();
        hub.attach(a.clone(), small.clone(), ended.clone());
        let (b, mut out_b) = session(&hub, "b");
        let (stdin, _backend) = input_queue(1 << 20);
        hub.connect_process(stdin);
        hub.from_client(&a, serde_json::json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}}));
        let note = format!(
            r#"{{"jsonrpc":"2.0","method":"notifications/message","params":{{"data":"{}"}}}}"#,
            "x".repeat(300)
        );
        for _ in 0..5 {
            hub.from_backend(Frame::Line(Bytes::from(note.clone())));
        }
        assert!(ended.is_cancelled(), "a's session is ended");
        assert!(small.lock().held() < 1000);
        assert_eq!(hub.session_count(), 1);
        let list_changed = r#"{"jsonrpc":"2.0","method":"notifications/tools/list_changed"}"#;
        hub.from_backend(Frame::Line(Bytes::from_static(list_changed.as_bytes())));
        assert!(out_b.try_recv().is_ok(), "b goes on");
        let _ = b;
    }
}

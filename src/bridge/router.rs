//! JSON-RPC routing between client sessions and one server process. Pure state, no I/O:
//! every call returns the [`Action`]s to carry out.
//!
//! Every client request gets a backend id that is unique for the process (same JSON type as
//! the client's: number for number, string for string); the answer gets the client's id back.
//! Progress tokens are remapped the same way, so `notifications/progress` reaches only the
//! session that asked. In shared mode the backend is initialized once and later `initialize`
//! requests are answered from the cached result; those that come while the first is in flight
//! wait on it, and fail with it when it is not answered in time ([`Router::expire_initialize`];
//! the deadlines themselves are kept by the hub, which has the clock).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::config::ToolFilter;

pub type SessionId = Arc<str>;

/// JSON text of an id or token: keeps `1` and `"1"` apart.
pub type Key = String;

pub fn key(v: &Value) -> Key {
    v.to_string()
}

pub const SERVER_EXITED: &str = "MCP server exited";
/// The JSON-RPC error code of a request that ran past its server's `timeout` (the code MCP SDKs
/// use for a request timeout).
pub const REQUEST_TIMEOUT: i64 = -32001;

/// Requests one session may have in flight at once (each holds an entry until answered).
pub const MAX_IN_FLIGHT: usize = 1024;
/// Server-to-client requests outstanding at once, per server process.
pub const MAX_SERVER_REQUESTS: usize = 1024;
/// Longest id (as JSON text) accepted on a server-to-client request.
pub const MAX_SERVER_ID: usize = 256;

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Write to the server's stdin.
    Backend(Value),
    /// Deliver to one session.
    Session(SessionId, Delivery),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub msg: Value,
    /// Set for the response to a client request: that request's id (as a [`Key`]).
    pub reply_to: Option<Key>,
    /// Set for messages caused by a client request still in flight (progress, server
    /// requests): that request's id key.
    pub related_to: Option<Key>,
}

impl Delivery {
    fn plain(msg: Value) -> Self {
        Delivery { msg, reply_to: None, related_to: None }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Initialize,
    ToolsList,
    Other,
    /// mcpbox's own re-initialize after a restart; the answer is swallowed.
    Internal,
}

struct Pending {
    sid: SessionId,
    client_id: Value,
    kind: Kind,
    seq: u64,
    token: Option<Key>,
}

enum Init {
    None,
    Pending(Vec<(SessionId, Value)>),
    Done(Value),
}

pub struct Router {
    shared: bool,
    filter: Option<ToolFilter>,
    next: u64,
    pending: HashMap<Key, Pending>,
    by_client: HashMap<(SessionId, Key), Value>,
    /// backend token key -> (session, client token, client request key)
    tokens: HashMap<Key, (SessionId, Value, Key)>,
    /// server->client request id key -> the session it was sent to
    server_reqs: HashMap<Key, SessionId>,
    init: Init,
    init_params: Option<Value>,
    initialized_sent: bool,
    sessions: Vec<SessionId>,
    /// Shared mode: the client capabilities each session declared in its `initialize`.
    caps: HashMap<SessionId, Value>,
    /// Shared mode: the protocol version each session asked for in its `initialize`.
    versions: HashMap<SessionId, String>,
}

/// The client capabilities a shared server is initialized with: every one mcpbox can route.
const ROUTABLE: [&str; 3] = ["sampling", "elicitation", "roots"];

/// The client capability a server request needs, if any.
fn capability_for(method: &str) -> Option<&'static str> {
    match method {
        "sampling/createMessage" => Some("sampling"),
        "elicitation/create" => Some("elicitation"),
        "roots/list" => Some("roots"),
        _ => None,
    }
}

/// A later session of a shared server is answered from the first `initialize`'s result with the
/// version it asked for where that is older than the one the server chose (as the server itself
/// would have negotiated: MCP versions are dates, and servers keep the older ones), else with the
/// server's.
fn negotiate(result: &mut Value, asked: Option<&String>) {
    let is_date = |v: &str| {
        v.len() == 10
            && v.bytes().enumerate().all(|(i, b)| if i == 4 || i == 7 { b == b'-' } else { b.is_ascii_digit() })
    };
    let Some(asked) = asked.filter(|a| is_date(a)) else { return };
    if let Some(chosen) = result.get("protocolVersion").and_then(Value::as_str) {
        if is_date(chosen) && asked.as_str() < chosen {
            result["protocolVersion"] = json!(asked);
        }
    }
}

pub fn error_response(id: Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

fn is_request(m: &Map<String, Value>) -> bool {
    m.contains_key("method") && m.contains_key("id")
}

impl Router {
    pub fn new(shared: bool, filter: Option<ToolFilter>) -> Self {
        Router {
            shared,
            filter,
            next: 1,
            pending: HashMap::new(),
            by_client: HashMap::new(),
            tokens: HashMap::new(),
            server_reqs: HashMap::new(),
            init: Init::None,
            init_params: None,
            initialized_sent: false,
            sessions: Vec::new(),
            caps: HashMap::new(),
            versions: HashMap::new(),
        }
    }

    /// Route as for a shared server (one initialize, answered from its result for later
    /// sessions; server messages only where unambiguous): for a process several sessions use.
    pub fn share(&mut self) {
        self.shared = true;
    }

    pub fn attach(&mut self, sid: SessionId) {
        if !self.sessions.contains(&sid) {
            self.sessions.push(sid);
        }
    }

    /// Forget a session; answers still on their way to it are dropped. A shared server's first
    /// `initialize` stays awaited without its session: its answer is what every other session
    /// is (or will be) answered from.
    pub fn detach(&mut self, sid: &SessionId) {
        self.sessions.retain(|s| s != sid);
        let shared = self.shared;
        for p in self.pending.values_mut() {
            if &p.sid == sid && shared && p.kind == Kind::Initialize {
                p.sid = Arc::from("");
            }
        }
        self.pending.retain(|_, p| &p.sid != sid || p.kind == Kind::Internal);
        self.by_client.retain(|(s, _), _| s != sid);
        self.tokens.retain(|_, (s, _, _)| s != sid);
        self.server_reqs.retain(|_, s| s != sid);
        self.caps.remove(sid);
        self.versions.remove(sid);
        if let Init::Pending(w) = &mut self.init {
            w.retain(|(s, _)| s != sid);
        }
    }

    pub fn sessions(&self) -> &[SessionId] {
        &self.sessions
    }

    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    fn fresh(&mut self, like: &Value) -> Value {
        let n = self.next;
        self.next += 1;
        match like {
            Value::String(_) => Value::String(format!("mcpbox-{n}")),
            _ => Value::from(n),
        }
    }

    /// A message from a client session (already checked to be a JSON-RPC object).
    pub fn from_client(&mut self, sid: &SessionId, mut msg: Value) -> Vec<Action> {
        let Some(obj) = msg.as_object_mut() else { return vec![] };
        let method = obj.get("method").and_then(Value::as_str).map(str::to_owned);
        match (method, obj.contains_key("id")) {
            (Some(method), true) => {
                let client_id = obj.get("id").cloned().unwrap_or(Value::Null);
                let reply = |msg: Value, cid: &Value| {
                    vec![Action::Session(sid.clone(), Delivery { msg, reply_to: Some(key(cid)), related_to: None })]
                };
                if method == "tools/call" {
                    if let Some(f) = &self.filter {
                        let name = obj.get("params").and_then(|p| p.get("name")).and_then(Value::as_str).unwrap_or("");
                        if !f.allows(name) {
                            let m = format!("tool {name:?} is not available on this server (tool filter)");
                            return reply(error_response(client_id.clone(), -32602, &m), &client_id);
                        }
                    }
                }
                if self.pending.values().filter(|p| &p.sid == sid).count() >= MAX_IN_FLIGHT {
                    let m = format!(
                        "too many requests in flight on this session (limit {MAX_IN_FLIGHT}); wait for answers first"
                    );
                    return reply(error_response(client_id.clone(), -32603, &m), &client_id);
                }
                let kind = match method.as_str() {
                    "initialize" => Kind::Initialize,
                    "tools/list" => Kind::ToolsList,
                    _ => Kind::Other,
                };
                if kind == Kind::Initialize && self.shared {
                    let declared =
                        obj.get("params").and_then(|p| p.get("capabilities")).cloned().unwrap_or_else(|| json!({}));
                    self.caps.insert(sid.clone(), declared);
                    if let Some(v) = obj.get("params").and_then(|p| p.get("protocolVersion")).and_then(Value::as_str) {
                        self.versions.insert(sid.clone(), v.to_string());
                    }
                    match &mut self.init {
                        Init::Done(result) => {
                            let mut result = result.clone();
                            negotiate(&mut result, self.versions.get(sid));
                            let r = json!({"jsonrpc": "2.0", "id": client_id, "result": result});
                            return reply(r, &client_id);
                        }
                        Init::Pending(waiters) => {
                            waiters.push((sid.clone(), client_id));
                            return vec![];
                        }
                        Init::None => {
                            self.init = Init::Pending(Vec::new());
                            // The one process serves every session: it is told the client can
                            // do all mcpbox can route, and mcpbox answers for a session whose
                            // client cannot.
                            if let Some(p) = obj.get_mut("params").and_then(Value::as_object_mut) {
                                let caps = p.entry("capabilities").or_insert_with(|| json!({}));
                                if let Some(c) = caps.as_object_mut() {
                                    for k in ROUTABLE {
                                        c.entry(k).or_insert_with(|| json!({}));
                                    }
                                }
                            }
                            self.init_params = obj.get("params").cloned();
                        }
                    }
                }
                let backend_id = self.fresh(&client_id);
                let bkey = key(&backend_id);
                obj.insert("id".into(), backend_id.clone());
                let mut token = None;
                if let Some(meta) =
                    obj.get_mut("params").and_then(|p| p.get_mut("_meta")).and_then(Value::as_object_mut)
                {
                    if let Some(t) = meta.get("progressToken").cloned() {
                        let bt = self.fresh(&t);
                        self.tokens.insert(key(&bt), (sid.clone(), t, key(&client_id)));
                        token = Some(key(&bt));
                        meta.insert("progressToken".into(), bt);
                    }
                }
                let seq = self.next;
                self.by_client.insert((sid.clone(), key(&client_id)), backend_id);
                self.pending.insert(bkey, Pending { sid: sid.clone(), client_id, kind, seq, token });
                vec![Action::Backend(msg)]
            }
            (Some(method), false) => {
                if method == "notifications/initialized" && self.shared {
                    if self.initialized_sent {
                        return vec![];
                    }
                    self.initialized_sent = true;
                }
                if method == "notifications/cancelled" {
                    let rid = obj.get("params").and_then(|p| p.get("requestId")).map(key);
                    let Some(bid) = rid.and_then(|r| self.by_client.get(&(sid.clone(), r)).cloned()) else {
                        return vec![];
                    };
                    if let Some(p) = obj.get_mut("params").and_then(Value::as_object_mut) {
                        p.insert("requestId".into(), bid);
                    }
                }
                vec![Action::Backend(msg)]
            }
            (None, _) => {
                // A response to a server->client request: only from the session it went to.
                let k = obj.get("id").map(key).unwrap_or_default();
                match self.server_reqs.get(&k) {
                    Some(s) if s == sid => {
                        self.server_reqs.remove(&k);
                        vec![Action::Backend(msg)]
                    }
                    _ => vec![],
                }
            }
        }
    }

    /// The session that most recently sent a request still in flight, and that request's key.
    fn most_recent_in_flight(&self) -> Option<(SessionId, Key)> {
        self.pending
            .values()
            .filter(|p| p.kind != Kind::Internal)
            .max_by_key(|p| p.seq)
            .map(|p| (p.sid.clone(), key(&p.client_id)))
    }

    /// The session a server-initiated message belongs to, and its latest request in flight:
    /// a server's own session (not shared), or, shared, the only session with requests in
    /// flight. `None` where that is ambiguous (several sessions busy) or nobody is busy.
    fn owner(&self) -> Option<(SessionId, Key)> {
        if !self.shared {
            let sid = self.sessions.first()?.clone();
            let related = self.most_recent_in_flight().map(|(_, k)| k).unwrap_or_default();
            return Some((sid, related));
        }
        let (sid, related) = self.most_recent_in_flight()?;
        let alone = self.pending.values().filter(|p| p.kind != Kind::Internal).all(|p| p.sid == sid);
        alone.then_some((sid, related))
    }

    fn broadcast(&self, msg: &Value) -> Vec<Action> {
        self.sessions.iter().map(|s| Action::Session(s.clone(), Delivery::plain(msg.clone()))).collect()
    }

    /// A message from the server.
    pub fn from_backend(&mut self, mut msg: Value) -> Vec<Action> {
        let Some(obj) = msg.as_object_mut() else { return vec![] };
        let method = obj.get("method").and_then(Value::as_str).map(str::to_owned);
        if let Some(method) = method {
            if is_request(obj) {
                let id_len = obj.get("id").map(|i| key(i).len()).unwrap_or(0);
                if self.server_reqs.len() >= MAX_SERVER_REQUESTS || id_len > MAX_SERVER_ID {
                    let id = obj.get("id").filter(|_| id_len <= MAX_SERVER_ID).cloned().unwrap_or(Value::Null);
                    let m = format!("mcpbox refused this request: at most {MAX_SERVER_REQUESTS} server requests may be outstanding, with ids of at most {MAX_SERVER_ID} bytes");
                    return vec![Action::Backend(error_response(id, -32603, &m))];
                }
                let id = obj.get("id").cloned().unwrap_or(Value::Null);
                let Some((sid, related)) = self.owner() else {
                    let m = "mcpbox cannot tell which client this request is for (no single client session has a request in flight); refused";
                    return vec![Action::Backend(error_response(id, -32603, m))];
                };
                if self.shared {
                    if let Some(cap) = capability_for(&method) {
                        if self.caps.get(&sid).and_then(|c| c.get(cap)).is_none_or(Value::is_null) {
                            // mcpbox answers for a client that did not declare the capability.
                            let m = format!("the client did not declare the {cap} capability");
                            return vec![Action::Backend(error_response(id, -32601, &m))];
                        }
                    }
                }
                self.server_reqs.insert(key(&obj["id"]), sid.clone());
                let related_to = (!related.is_empty()).then_some(related);
                return vec![Action::Session(sid, Delivery { msg, reply_to: None, related_to })];
            }
            if method == "notifications/progress" {
                let tk = obj.get("params").and_then(|p| p.get("progressToken")).map(key);
                let Some((sid, orig, req)) = tk.and_then(|t| self.tokens.get(&t).cloned()) else {
                    return vec![];
                };
                if let Some(p) = obj.get_mut("params").and_then(Value::as_object_mut) {
                    p.insert("progressToken".into(), orig);
                }
                return vec![Action::Session(sid, Delivery { msg, reply_to: None, related_to: Some(req) })];
            }
            if method.ends_with("/list_changed") || method == "notifications/resources/updated" {
                return self.broadcast(&msg);
            }
            if method == "notifications/cancelled" {
                let k = obj.get("params").and_then(|p| p.get("requestId")).map(key).unwrap_or_default();
                return match self.server_reqs.remove(&k) {
                    Some(sid) => vec![Action::Session(sid, Delivery::plain(msg))],
                    None => vec![],
                };
            }
            // Other notifications (logging, …): to the one session they can belong to; with a
            // shared server and no such session, dropped rather than guessed.
            return match self.owner() {
                Some((sid, related)) => {
                    // With one request of its session in flight, a notification (a log line)
                    // belongs to that request: it goes on its stream where it has one.
                    let busy = self.pending.values().filter(|p| p.kind != Kind::Internal && p.sid == sid).count();
                    let related_to = (busy == 1 && !related.is_empty()).then_some(related);
                    vec![Action::Session(sid, Delivery { msg, reply_to: None, related_to })]
                }
                None if !self.shared => self.broadcast(&msg),
                None => vec![],
            };
        }
        // A response.
        let k = obj.get("id").map(key).unwrap_or_default();
        let Some(p) = self.pending.remove(&k) else { return vec![] };
        self.by_client.remove(&(p.sid.clone(), key(&p.client_id)));
        if let Some(t) = &p.token {
            self.tokens.remove(t);
        }
        if p.kind == Kind::Internal {
            return vec![];
        }
        obj.insert("id".into(), p.client_id.clone());
        if p.kind == Kind::ToolsList {
            if let (Some(f), Some(tools)) =
                (&self.filter, obj.get_mut("result").and_then(|r| r.get_mut("tools")).and_then(Value::as_array_mut))
            {
                tools.retain(|t| t.get("name").and_then(Value::as_str).is_some_and(|n| f.allows(n)));
            }
        }
        let mut out = Vec::new();
        if p.kind == Kind::Initialize && self.shared {
            let waiters = match std::mem::replace(&mut self.init, Init::None) {
                Init::Pending(w) => w,
                _ => vec![],
            };
            if let Some(result) = obj.get("result") {
                self.init = Init::Done(result.clone());
            }
            for (sid, cid) in waiters {
                let mut m = Value::Object(obj.clone());
                m["id"] = cid.clone();
                if let Some(r) = m.get_mut("result") {
                    negotiate(r, self.versions.get(&sid));
                }
                out.push(Action::Session(sid, Delivery { msg: m, reply_to: Some(key(&cid)), related_to: None }));
            }
        }
        out.insert(
            0,
            Action::Session(p.sid, Delivery { msg, reply_to: Some(k_client(&p.client_id)), related_to: None }),
        );
        out
    }

    /// A message for the server could not be written (its input queue is full or closed): if it
    /// was a client request, answer that request at once instead of letting it hang.
    pub fn undeliverable(&mut self, msg: &Value, reason: &str) -> Vec<Action> {
        let Some(id) = msg.get("id").filter(|_| msg.get("method").is_some()) else { return vec![] };
        let Some(p) = self.pending.remove(&key(id)) else { return vec![] };
        if p.kind == Kind::Internal {
            return vec![];
        }
        self.by_client.remove(&(p.sid.clone(), key(&p.client_id)));
        if let Some(t) = &p.token {
            self.tokens.remove(t);
        }
        let k = key(&p.client_id);
        let mut out = vec![Action::Session(
            p.sid,
            Delivery { msg: error_response(p.client_id, -32603, reason), reply_to: Some(k), related_to: None },
        )];
        // A shared server's first `initialize` never reached it: the sessions waiting on its
        // answer get the same error, and the next `initialize` is sent anew.
        if p.kind == Kind::Initialize && self.shared {
            out.extend(self.fail_init_waiters(-32603, reason));
        }
        out
    }

    /// The sessions waiting on a shared server's first `initialize` get error `reason`, and the
    /// next `initialize` is sent to the server anew.
    fn fail_init_waiters(&mut self, code: i64, reason: &str) -> Vec<Action> {
        if !matches!(self.init, Init::Pending(_)) {
            return vec![];
        }
        let Init::Pending(w) = std::mem::replace(&mut self.init, Init::None) else { return vec![] };
        w.into_iter()
            .map(|(sid, cid)| {
                let k = key(&cid);
                Action::Session(
                    sid,
                    Delivery { msg: error_response(cid, code, reason), reply_to: Some(k), related_to: None },
                )
            })
            .collect()
    }

    /// A shared server's first `initialize` is not answered in time: the deadline of the session
    /// that sent it, or of one waiting on its answer (which came later, so the first has waited
    /// at least as long), passed. That session and every one waiting get error `reason`; the
    /// server's late answer, if it comes, reaches nobody, and the next `initialize` is sent anew
    /// (a server that was only slow gets another chance). Nothing happens unless `client_id` of
    /// `sid` is that `initialize` or waits on it. The server gets no `notifications/cancelled`:
    /// MCP forbids cancelling `initialize`.
    pub fn expire_initialize(&mut self, sid: &SessionId, client_id: &Value, reason: &str) -> Vec<Action> {
        let Init::Pending(waiters) = &self.init else { return vec![] };
        if !self.shared {
            return vec![];
        }
        let k = key(client_id);
        let first = self.pending.iter().find(|(_, p)| p.kind == Kind::Initialize).map(|(b, _)| b.clone());
        let is_first = self.by_client.get(&(sid.clone(), k.clone())).is_some_and(|b| Some(key(b)) == first);
        if !is_first && !waiters.iter().any(|(s, c)| s == sid && key(c) == k) {
            return vec![];
        }
        let mut out = Vec::new();
        if let Some(p) = first.and_then(|b| self.pending.remove(&b)) {
            self.by_client.remove(&(p.sid.clone(), key(&p.client_id)));
            if let Some(t) = &p.token {
                self.tokens.remove(t);
            }
            // Its session may have left (see `detach`): then nobody is told.
            if self.sessions.contains(&p.sid) {
                let k = key(&p.client_id);
                out.push(Action::Session(
                    p.sid,
                    Delivery {
                        msg: error_response(p.client_id, REQUEST_TIMEOUT, reason),
                        reply_to: Some(k),
                        related_to: None,
                    },
                ));
            }
        }
        out.extend(self.fail_init_waiters(REQUEST_TIMEOUT, reason));
        out
    }

    /// A client request's deadline passed (its server's `timeout`): answer it with a JSON-RPC
    /// error now, tell the server to stop working on it (`notifications/cancelled`), and forget
    /// it, so that a late answer reaches nobody. Nothing happens if it was answered already. A
    /// shared server's first `initialize`, which other sessions wait on, is expired by
    /// [`Router::expire_initialize`] instead.
    pub fn expire(&mut self, sid: &SessionId, client_id: &Value, reason: &str) -> Vec<Action> {
        let Some(bid) = self.by_client.get(&(sid.clone(), key(client_id))).cloned() else { return vec![] };
        match self.pending.get(&key(&bid)) {
            Some(p) if p.kind == Kind::Internal || (p.kind == Kind::Initialize && self.shared) => return vec![],
            Some(_) => {}
            None => return vec![],
        }
        let Some(p) = self.pending.remove(&key(&bid)) else { return vec![] };
        self.by_client.remove(&(sid.clone(), key(client_id)));
        if let Some(t) = &p.token {
            self.tokens.remove(t);
        }
        let k = key(&p.client_id);
        vec![
            Action::Backend(
                json!({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": bid, "reason": reason}}),
            ),
            Action::Session(
                p.sid,
                Delivery {
                    msg: error_response(p.client_id, REQUEST_TIMEOUT, reason),
                    reply_to: Some(k),
                    related_to: None,
                },
            ),
        ]
    }

    /// The server process is gone: every request in flight fails at once.
    pub fn backend_exited(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        let mut pending: Vec<Pending> = self.pending.drain().map(|(_, p)| p).collect();
        pending.sort_by_key(|p| p.seq);
        for p in pending.into_iter().filter(|p| p.kind != Kind::Internal) {
            let k = key(&p.client_id);
            out.push(Action::Session(
                p.sid,
                Delivery {
                    msg: error_response(p.client_id, -32603, SERVER_EXITED),
                    reply_to: Some(k),
                    related_to: None,
                },
            ));
        }
        // A shared server keeps the answer to its first `initialize` across a restart (later
        // sessions are answered from it, and `reinitialize` replays it to the new process);
        // sessions still waiting for it fail with the process.
        match std::mem::replace(&mut self.init, Init::None) {
            Init::Pending(w) => {
                for (sid, cid) in w {
                    let k = key(&cid);
                    out.push(Action::Session(
                        sid,
                        Delivery {
                            msg: error_response(cid, -32603, SERVER_EXITED),
                            reply_to: Some(k),
                            related_to: None,
                        },
                    ));
                }
            }
            Init::Done(r) => self.init = Init::Done(r),
            Init::None => {}
        }
        self.by_client.clear();
        self.tokens.clear();
        self.server_reqs.clear();
        self.initialized_sent = false;
        out
    }

    /// After a restart of a shared server whose sessions were already initialized: the
    /// messages that bring the new process to the same point.
    pub fn reinitialize(&mut self) -> Vec<Action> {
        if !matches!(self.init, Init::Done(_)) {
            return vec![];
        }
        let Some(params) = self.init_params.clone() else { return vec![] };
        let id = self.fresh(&Value::from(0));
        let seq = self.next;
        self.pending.insert(
            key(&id),
            Pending { sid: Arc::from(""), client_id: Value::Null, kind: Kind::Internal, seq, token: None },
        );
        self.initialized_sent = true;
        vec![
            Action::Backend(json!({"jsonrpc": "2.0", "id": id, "method": "initialize", "params": params})),
            Action::Backend(json!({"jsonrpc": "2.0", "method": "notifications/initialized"})),
        ]
    }

    /// Sessions with requests in flight (for errors that belong to no single request).
    /// Whether `id` (as the server knows it) is a client request in flight.
    pub fn is_pending(&self, id: &Value) -> bool {
        self.pending.get(&key(id)).is_some_and(|p| p.kind != Kind::Internal)
    }

    /// The id (as the server knows it) of the one client request in flight, if exactly one is.
    pub fn only_request_in_flight(&self) -> Option<Value> {
        let mut ids = self.pending.iter().filter(|(_, p)| p.kind != Kind::Internal).map(|(k, _)| k);
        let only = ids.next()?;
        if ids.next().is_some() {
            return None;
        }
        serde_json::from_str(only).ok()
    }

    pub fn busy_sessions(&self) -> Vec<SessionId> {
        let set: HashSet<&SessionId> =
            self.pending.values().filter(|p| p.kind != Kind::Internal).map(|p| &p.sid).collect();
        set.into_iter().cloned().collect()
    }
}

/// What the opening bytes of a JSON-RPC message (the rest may be cut off) say at its top level.
#[derive(Debug, Default, PartialEq)]
pub struct Opening {
    /// Its `"id"`, a number or a string as JSON-RPC has them.
    pub id: Option<Value>,
    /// A `"method"` key: a request or notification.
    pub method: bool,
    /// A `"result"` or `"error"` key: an answer.
    pub answer: bool,
}

/// See [`Opening`]; all empty unless `head` opens a JSON object.
pub fn opening(head: &[u8]) -> Opening {
    let mut o = Opening::default();
    if head.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return o;
    }
    let mut depth = 0usize;
    let mut i = 0;
    // A string starting at `at` (its opening quote): its end (after the closing quote), if any.
    let string_end = |at: usize| -> Option<usize> {
        let mut j = at + 1;
        while j < head.len() {
            match head[j] {
                b'\\' => j += 2,
                b'"' => return Some(j + 1),
                _ => j += 1,
            }
        }
        None
    };
    while i < head.len() {
        match head[i] {
            b'{' | b'[' => {
                depth += 1;
                i += 1;
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b'"' => {
                let Some(end) = string_end(i) else { break };
                let mut j = end;
                while j < head.len() && head[j].is_ascii_whitespace() {
                    j += 1;
                }
                if depth == 1 && head.get(j) == Some(&b':') {
                    match &head[i + 1..end - 1] {
                        b"method" => o.method = true,
                        b"result" | b"error" => o.answer = true,
                        b"id" => {
                            let mut v = j + 1;
                            while v < head.len() && head[v].is_ascii_whitespace() {
                                v += 1;
                            }
                            let value_end = match head.get(v) {
                                Some(b'"') => string_end(v),
                                Some(_) => head[v..]
                                    .iter()
                                    .position(|b| !matches!(b, b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'))
                                    .map(|n| v + n),
                                None => None,
                            };
                            if let Some(e) = value_end {
                                o.id = serde_json::from_slice(&head[v..e]).ok();
                            }
                        }
                        _ => {}
                    }
                }
                i = end;
            }
            _ => i += 1,
        }
    }
    o
}

fn k_client(v: &Value) -> Key {
    key(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FilterMode;

    fn sid(s: &str) -> SessionId {
        Arc::from(s)
    }

    fn backend(a: &[Action]) -> Value {
        match &a[0] {
            Action::Backend(v) => v.clone(),
            other => panic!("expected backend action, got {other:?}"),
        }
    }

    fn session(a: &[Action]) -> (SessionId, Delivery) {
        match &a[0] {
            Action::Session(s, d) => (s.clone(), d.clone()),
            other => panic!("expected session action, got {other:?}"),
        }
    }

    #[test]
    fn an_expired_request_is_answered_cancelled_and_its_late_answer_dropped() {
        let mut r = Router::new(true, None);
        let (a, b) = (sid("a"), sid("b"));
        r.attach(a.clone());
        r.attach(b.clone());
        let fwd = backend(&r.from_client(&a, json!({"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"slow","_meta":{"progressToken":"p"}}})));
        let other =
            backend(&r.from_client(&b, json!({"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"fast"}})));
        // Another session's request of the same id is not touched.
        let out = r.expire(&a, &json!(7), "request timed out");
        assert_eq!(out.len(), 2, "{out:?}");
        let cancel = backend(&out);
        assert_eq!(
            (cancel["method"].as_str(), &cancel["params"]["requestId"]),
            (Some("notifications/cancelled"), &fwd["id"])
        );
        let (to, d) = session(&out[1..]);
        assert_eq!(
            (to, d.msg["id"].clone(), d.msg["error"]["code"].as_i64(), d.reply_to.as_deref()),
            (a.clone(), json!(7), Some(REQUEST_TIMEOUT), Some("7"))
        );
        assert_eq!(r.in_flight(), 1);
        // The late answer and its progress reach nobody; b's answer still reaches b.
        assert!(r.from_backend(json!({"jsonrpc":"2.0","id":fwd["id"],"result":{}})).is_empty());
        let tok = fwd["params"]["_meta"]["progressToken"].clone();
        assert!(r
            .from_backend(
                json!({"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":tok,"progress":1}})
            )
            .is_empty());
        assert_eq!(session(&r.from_backend(json!({"jsonrpc":"2.0","id":other["id"],"result":{}}))).0, b);
        // Answered or unknown: nothing to do.
        assert!(r.expire(&b, &json!(7), "late").is_empty());
        assert!(r.expire(&a, &json!(8), "never sent").is_empty());
        // A shared server's first initialize is not an ordinary request (others wait on it).
        r.from_client(&a, json!({"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}));
        assert!(r.expire(&a, &json!(1), "x").is_empty());
    }

    #[test]
    fn clashing_ids_from_two_sessions() {
        let mut r = Router::new(true, None);
        let (a, b) = (sid("a"), sid("b"));
        r.attach(a.clone());
        r.attach(b.clone());
        let fa =
            backend(&r.from_client(&a, json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}})));
        let fb =
            backend(&r.from_client(&b, json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"y"}})));
        assert_ne!(fa["id"], fb["id"]);
        assert!(fa["id"].is_u64());
        // answer b first
        let (s, d) = session(&r.from_backend(json!({"jsonrpc":"2.0","id":fb["id"],"result":{"who":"b"}})));
        assert_eq!((s.as_ref(), &d.msg["id"], &d.msg["result"]["who"]), ("b", &json!(1), &json!("b")));
        assert_eq!(d.reply_to.as_deref(), Some("1"));
        let (s, d) = session(&r.from_backend(json!({"jsonrpc":"2.0","id":fa["id"],"result":{"who":"a"}})));
        assert_eq!((s.as_ref(), &d.msg["id"]), ("a", &json!(1)));
        // a duplicate answer goes nowhere
        assert!(r.from_backend(json!({"jsonrpc":"2.0","id":fa["id"],"result":{}})).is_empty());
    }

    #[test]
    fn string_ids_keep_their_type() {
        let mut r = Router::new(true, None);
        let a = sid("a");
        r.attach(a.clone());
        let f = backend(&r.from_client(&a, json!({"jsonrpc":"2.0","id":"req-1","method":"ping"})));
        assert!(f["id"].is_string());
        let f2 = backend(&r.from_client(&a, json!({"jsonrpc":"2.0","id":7,"method":"ping"})));
        assert!(f2["id"].is_u64());
        let (_, d) = session(&r.from_backend(json!({"jsonrpc":"2.0","id":f["id"],"result":{}})));
        assert_eq!(d.msg["id"], json!("req-1"));
        let (_, d) = session(&r.from_backend(json!({"jsonrpc":"2.0","id":f2["id"],"result":{}})));
        assert_eq!(d.msg["id"], json!(7));
    }

    #[test]
    fn progress_tokens_route_to_their_session() {
        let mut r = Router::new(true, None);
        let (a, b) = (sid("a"), sid("b"));
        r.attach(a.clone());
        r.attach(b.clone());
        let call = |t: Value| json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","_meta":{"progressToken":t}}});
        let fa = backend(&r.from_client(&a, call(json!("tok"))));
        let fb = backend(&r.from_client(&b, call(json!("tok"))));
        let (ta, tb) = (fa["params"]["_meta"]["progressToken"].clone(), fb["params"]["_meta"]["progressToken"].clone());
        assert_ne!(ta, tb);
        let (s, d) = session(&r.from_backend(
            json!({"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":tb,"progress":1}}),
        ));
        assert_eq!(s.as_ref(), "b");
        assert_eq!(d.msg["params"]["progressToken"], json!("tok"));
        assert_eq!(d.related_to.as_deref(), Some("1"));
        // unknown token: dropped, never guessed
        assert!(r
            .from_backend(json!({"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":"zzz"}}))
            .is_empty());
        let _ = ta;
    }

    #[test]
    fn cancel_is_remapped_and_scoped() {
        let mut r = Router::new(true, None);
        let (a, b) = (sid("a"), sid("b"));
        r.attach(a.clone());
        r.attach(b.clone());
        let fa =
            backend(&r.from_client(&a, json!({"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"x"}})));
        let c = backend(
            &r.from_client(&a, json!({"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":5}})),
        );
        assert_eq!(c["params"]["requestId"], fa["id"]);
        // b cannot cancel a's request
        assert!(r
            .from_client(&b, json!({"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":5}}))
            .is_empty());
    }

    #[test]
    fn shared_initialize_once_and_list_changed_broadcast() {
        let mut r = Router::new(true, None);
        let (a, b) = (sid("a"), sid("b"));
        r.attach(a.clone());
        r.attach(b.clone());
        let init = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18"}});
        let f = backend(&r.from_client(&a, init.clone()));
        assert!(r.from_client(&b, init.clone()).is_empty()); // waits for the first
        let out = r.from_backend(json!({"jsonrpc":"2.0","id":f["id"],"result":{"serverInfo":{"name":"x"}}}));
        assert_eq!(out.len(), 2);
        let (s, d) = session(&r.from_client(&b, init));
        assert_eq!((s.as_ref(), &d.msg["result"]["serverInfo"]["name"]), ("b", &json!("x")));
        let n = json!({"jsonrpc":"2.0","method":"notifications/initialized"});
        assert_eq!(r.from_client(&a, n.clone()).len(), 1);
        assert!(r.from_client(&b, n).is_empty());
        let out = r.from_backend(json!({"jsonrpc":"2.0","method":"notifications/tools/list_changed"}));
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn exit_fails_in_flight_and_server_requests_route() {
        let mut r = Router::new(true, None);
        let (a, b) = (sid("a"), sid("b"));
        r.attach(a.clone());
        r.attach(b.clone());
        backend(&r.from_client(
            &a,
            json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"capabilities":{"sampling":{}}}}),
        ));
        backend(&r.from_client(&a, json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}})));
        // a server request while a's call is in flight goes to a, related to that call
        let (s, d) =
            session(&r.from_backend(json!({"jsonrpc":"2.0","id":99,"method":"sampling/createMessage","params":{}})));
        assert_eq!((s.as_ref(), d.related_to.as_deref()), ("a", Some("1")));
        // only a may answer it
        assert!(r.from_client(&b, json!({"jsonrpc":"2.0","id":99,"result":{}})).is_empty());
        assert_eq!(r.from_client(&a, json!({"jsonrpc":"2.0","id":99,"result":{}})).len(), 1);
        let out = r.backend_exited();
        let (s, d) = session(&out);
        assert_eq!(s.as_ref(), "a");
        assert_eq!(d.msg["error"]["code"], json!(-32603));
        assert_eq!(d.msg["error"]["message"], json!(SERVER_EXITED));
    }

    /// The first session of a shared server leaves before the server answers its `initialize`:
    /// the answer still initializes the server, for the sessions waiting and those to come.
    #[test]
    fn a_shared_servers_first_initialize_outlives_its_session() {
        let mut r = Router::new(true, None);
        r.share();
        let (a, b, c) = (sid("a"), sid("b"), sid("c"));
        for s in [&a, &b, &c] {
            r.attach(s.clone());
        }
        let init = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18"}});
        let f = backend(&r.from_client(&a, init.clone()));
        r.detach(&a);
        assert!(r.from_client(&b, init.clone()).is_empty(), "b waits for the one initialize");
        let out = r.from_backend(json!({"jsonrpc":"2.0","id":f["id"],"result":{"serverInfo":{"name":"x"}}}));
        let to_b: Vec<_> = out
            .iter()
            .filter_map(|a| match a {
                Action::Session(s, d) if s.as_ref() == "b" => Some(d.msg["result"]["serverInfo"]["name"].clone()),
                _ => None,
            })
            .collect();
        assert_eq!(to_b, vec![json!("x")], "{out:?}");
        let (s, d) = session(&r.from_client(&c, init));
        assert_eq!((s.as_ref(), &d.msg["result"]["serverInfo"]["name"]), ("c", &json!("x")));
    }

    /// A shared server's first `initialize` could not be written: its session and those waiting
    /// on it get the error, and the next `initialize` goes to the server.
    #[test]
    fn an_undeliverable_first_initialize_fails_its_waiters_and_is_sent_again() {
        let mut r = Router::new(true, None);
        r.share();
        let (a, b) = (sid("a"), sid("b"));
        r.attach(a.clone());
        r.attach(b.clone());
        let init = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{}});
        let sent = backend(&r.from_client(&a, init.clone()));
        assert!(r.from_client(&b, init.clone()).is_empty());
        let out = r.undeliverable(&sent, "queue full");
        let failed: Vec<&str> = out
            .iter()
            .filter_map(|x| match x {
                Action::Session(s, d) if d.msg["error"]["message"] == json!("queue full") => Some(s.as_ref()),
                _ => None,
            })
            .collect();
        assert_eq!(failed, vec!["a", "b"], "{out:?}");
        backend(&r.from_client(&b, init));
    }

    /// A shared server does not answer its first `initialize` in time: that session and those
    /// waiting on it get the timeout error, the late answer reaches nobody, and the next
    /// `initialize` goes to the server again and, answered, serves everyone after it.
    #[test]
    fn an_unanswered_first_initialize_expires_with_its_waiters_and_is_sent_again() {
        let mut r = Router::new(true, None);
        r.share();
        let (a, b, c, d) = (sid("a"), sid("b"), sid("c"), sid("d"));
        for s in [&a, &b, &c, &d] {
            r.attach(s.clone());
        }
        let init = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18"}});
        let first = backend(&r.from_client(&a, init.clone()));
        assert!(r.from_client(&b, init.clone()).is_empty(), "b waits");
        assert!(r.expire(&a, &json!(0), "x").is_empty(), "not expired as an ordinary request");
        assert!(r.expire_initialize(&c, &json!(0), "x").is_empty(), "c sent no initialize");
        assert!(r.expire_initialize(&a, &json!(1), "x").is_empty(), "a's other id");
        let why = "the server did not answer initialize within 1s";
        let out = r.expire_initialize(&a, &json!(0), why);
        let failed: Vec<(&str, Option<i64>, Option<&str>)> = out
            .iter()
            .map(|x| match x {
                Action::Session(s, d) if d.msg["error"]["message"] == json!(why) && d.msg["id"] == json!(0) => {
                    (s.as_ref(), d.msg["error"]["code"].as_i64(), d.reply_to.as_deref())
                }
                other => panic!("only the two errors, got {other:?}"),
            })
            .collect();
        assert_eq!(failed, vec![("a", Some(REQUEST_TIMEOUT), Some("0")), ("b", Some(REQUEST_TIMEOUT), Some("0"))]);
        assert_eq!(r.in_flight(), 0);
        assert!(r.expire_initialize(&b, &json!(0), why).is_empty(), "b's own deadline finds nothing left");
        // The late answer reaches nobody and leaves no cached answer.
        let late = r.from_backend(json!({"jsonrpc":"2.0","id":first["id"],"result":{"serverInfo":{"name":"late"}}}));
        assert!(late.is_empty(), "{late:?}");
        let again = backend(&r.from_client(&c, init.clone()));
        assert_eq!(again["method"], "initialize");
        assert_ne!(again["id"], first["id"]);
        assert!(r.from_client(&d, init.clone()).is_empty(), "d waits on the new one");
        let out = r.from_backend(json!({"jsonrpc":"2.0","id":again["id"],"result":{"serverInfo":{"name":"x"}}}));
        let served: Vec<(&str, Value)> = out
            .iter()
            .map(|x| match x {
                Action::Session(s, d) => (s.as_ref(), d.msg["result"]["serverInfo"]["name"].clone()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(served, vec![("c", json!("x")), ("d", json!("x"))]);
        let (s, d) = session(&r.from_client(&b, init));
        assert_eq!((s.as_ref(), &d.msg["result"]["serverInfo"]["name"]), ("b", &json!("x")));
    }

    /// The session that sent a shared server's first `initialize` left: the deadline of one
    /// waiting on it expires it.
    #[test]
    fn a_waiters_deadline_expires_a_first_initialize_whose_session_left() {
        let mut r = Router::new(true, None);
        r.share();
        let (a, b) = (sid("a"), sid("b"));
        r.attach(a.clone());
        r.attach(b.clone());
        let init = json!({"jsonrpc":"2.0","id":"i","method":"initialize","params":{}});
        backend(&r.from_client(&a, init.clone()));
        r.detach(&a);
        assert!(r.from_client(&b, init.clone()).is_empty());
        let out = r.expire_initialize(&b, &json!("i"), "late");
        let (s, d) = session(&out);
        assert_eq!((out.len(), s.as_ref(), &d.msg["error"]["message"]), (1, "b", &json!("late")));
        assert_eq!(r.in_flight(), 0);
        assert_eq!(backend(&r.from_client(&b, init))["method"], "initialize");
    }

    /// After a restart, a shared server whose sessions were initialized is initialized again by
    /// mcpbox (the answer to the first `initialize` survives the exit).
    #[test]
    fn a_restarted_shared_server_is_initialized_again() {
        let mut r = Router::new(true, None);
        r.share();
        let a = sid("a");
        r.attach(a.clone());
        let init = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18"}});
        let f = backend(&r.from_client(&a, init));
        r.from_backend(json!({"jsonrpc":"2.0","id":f["id"],"result":{"serverInfo":{"name":"x"}}}));
        r.backend_exited();
        let again = r.reinitialize();
        let methods: Vec<_> = again
            .iter()
            .map(|x| match x {
                Action::Backend(m) => m["method"].clone(),
                other => panic!("expected a message to the server, got {other:?}"),
            })
            .collect();
        assert_eq!(methods, vec![json!("initialize"), json!("notifications/initialized")]);
    }

    #[test]
    fn the_id_of_a_cut_off_answer_is_found_at_its_top_level_only() {
        let t = |s: &str| {
            let o = opening(s.as_bytes());
            (o.id, o.method, o.answer)
        };
        let answer = r#"{"jsonrpc":"2.0","id":17,"result":{"content":[{"id":3,"text":"xx"#;
        assert_eq!(t(answer), (Some(json!(17)), false, true));
        assert_eq!(t(r#"{"result":{"id":3,"method":"m","text":"a\"}}\"b"#), (None, false, true));
        assert_eq!(t(r#"{ "id" : "mcpbox-4" , "error": "#), (Some(json!("mcpbox-4")), false, true));
        let request = r#"{"jsonrpc":"2.0","id":9,"method":"sampling/createMessage","params":{"#;
        assert_eq!(t(request), (Some(json!(9)), true, false));
        assert_eq!(t(r#"{"id":12"#), (None, false, false), "a number cut off at the end may be longer");
        assert_eq!(t("xxxxxxxx"), (None, false, false));
    }

    /// A later session of a shared server that asks for an older protocol version gets it, as the
    /// server would have answered; one asking for a newer one gets the server's.
    #[test]
    fn later_sessions_of_a_shared_server_get_the_version_they_asked_for_when_older() {
        let mut r = Router::new(true, None);
        r.share();
        let (a, b, c) = (sid("a"), sid("b"), sid("c"));
        for s in [&a, &b, &c] {
            r.attach(s.clone());
        }
        let init = |v: &str| json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":v}});
        let f = backend(&r.from_client(&a, init("2025-11-25")));
        r.from_backend(json!({"jsonrpc":"2.0","id":f["id"],"result":{"protocolVersion":"2025-11-25"}}));
        let (_, d) = session(&r.from_client(&b, init("2025-03-26")));
        assert_eq!(d.msg["result"]["protocolVersion"], "2025-03-26");
        let (_, d) = session(&r.from_client(&c, init("2099-01-01")));
        assert_eq!(d.msg["result"]["protocolVersion"], "2025-11-25");
    }

    #[test]
    fn undeliverable_request_is_answered_at_once() {
        let mut r = Router::new(true, None);
        let (a, b) = (sid("a"), sid("b"));
        r.attach(a.clone());
        r.attach(b.clone());
        let sent_b =
            backend(&r.from_client(&b, json!({"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"y"}})));
        let sent =
            backend(&r.from_client(&a, json!({"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"x"}})));
        let (s, d) = session(&r.undeliverable(&sent, "queue full"));
        assert_eq!(s.as_ref(), "a");
        assert_eq!(d.msg["id"], json!(5));
        assert_eq!(d.msg["error"]["message"], json!("queue full"));
        assert_eq!(d.reply_to.as_deref(), Some("5"));
        // b's request with the same client id is untouched and still answerable
        let (s, d) = session(&r.from_backend(json!({"jsonrpc":"2.0","id":sent_b["id"],"result":{"ok":true}})));
        assert_eq!((s.as_ref(), &d.msg["result"]["ok"]), ("b", &json!(true)));
        // notifications cannot be answered and produce nothing
        assert!(r.undeliverable(&json!({"jsonrpc":"2.0","method":"notifications/initialized"}), "x").is_empty());
    }

    #[test]
    fn tables_are_bounded() {
        let mut r = Router::new(true, None);
        let (a, b) = (sid("a"), sid("b"));
        r.attach(a.clone());
        r.attach(b.clone());
        for i in 0..MAX_IN_FLIGHT {
            backend(&r.from_client(&a, json!({"jsonrpc":"2.0","id":i,"method":"ping"})));
        }
        let (s, d) = session(&r.from_client(&a, json!({"jsonrpc":"2.0","id":"one-more","method":"ping"})));
        assert_eq!((s.as_ref(), &d.msg["id"]), ("a", &json!("one-more")));
        assert!(d.msg["error"]["message"].as_str().unwrap().contains("too many requests in flight"));
        // another session is not held back by a's requests
        backend(&r.from_client(&b, json!({"jsonrpc":"2.0","id":1,"method":"ping"})));
        // The server's requests, on a server of a's own (shared, two busy sessions are ambiguous).
        let mut r = Router::new(false, None);
        r.attach(a.clone());
        backend(&r.from_client(&a, json!({"jsonrpc":"2.0","id":1,"method":"tools/call"})));
        for i in 0..MAX_SERVER_REQUESTS {
            session(&r.from_backend(json!({"jsonrpc":"2.0","id":i,"method":"roots/list"})));
        }
        let e = backend(&r.from_backend(json!({"jsonrpc":"2.0","id":"x","method":"roots/list"})));
        assert_eq!(e["id"], json!("x"));
        assert!(e["error"]["message"].as_str().unwrap().contains("outstanding"));
        let e = backend(&r.from_backend(json!({"jsonrpc":"2.0","id":"y".repeat(1000),"method":"roots/list"})));
        assert_eq!(e["id"], Value::Null);
    }

    #[test]
    fn tool_filter_blocks_calls_and_filters_lists() {
        let f = ToolFilter { mode: FilterMode::Block, list: ["rm".to_string()].into_iter().collect() };
        let mut r = Router::new(false, Some(f));
        let a = sid("a");
        r.attach(a.clone());
        let (_, d) =
            session(&r.from_client(&a, json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"rm"}})));
        assert_eq!(d.msg["error"]["code"], json!(-32602));
        assert!(d.msg["error"]["message"].as_str().unwrap().contains("rm"));
        let l = backend(&r.from_client(&a, json!({"jsonrpc":"2.0","id":2,"method":"tools/list"})));
        let (_, d) = session(
            &r.from_backend(json!({"jsonrpc":"2.0","id":l["id"],"result":{"tools":[{"name":"rm"},{"name":"ls"}]}})),
        );
        assert_eq!(d.msg["result"]["tools"], json!([{"name":"ls"}]));
        let allow = ToolFilter { mode: FilterMode::Allow, list: ["ls".to_string()].into_iter().collect() };
        assert!(allow.allows("ls") && !allow.allows("rm"));
    }

    fn init(r: &mut Router, s: &SessionId, caps: Value) -> Vec<Action> {
        r.from_client(s, json!({"jsonrpc":"2.0","id":"i","method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":caps}}))
    }

    #[test]
    fn a_shared_server_is_initialized_with_every_routable_capability() {
        let mut r = Router::new(true, None);
        let a = sid("a");
        r.attach(a.clone());
        let m = backend(&init(&mut r, &a, json!({"roots":{"listChanged":true}})));
        let caps = &m["params"]["capabilities"];
        assert_eq!(caps["roots"], json!({"listChanged": true}), "what the client declared is kept");
        assert_eq!((caps["sampling"].is_object(), caps["elicitation"].is_object()), (true, true), "{caps}");
        // A session-mode server is told only what its client declared.
        let mut r = Router::new(false, None);
        r.attach(a.clone());
        assert_eq!(backend(&init(&mut r, &a, json!({})))["params"]["capabilities"], json!({}));
    }

    #[test]
    fn shared_server_messages_go_only_where_unambiguous() {
        let mut r = Router::new(true, None);
        let (a, b) = (sid("a"), sid("b"));
        r.attach(a.clone());
        r.attach(b.clone());
        let m = backend(&init(&mut r, &a, json!({"elicitation":{}})));
        r.from_backend(json!({"jsonrpc":"2.0","id":m["id"],"result":{"capabilities":{}}}));
        init(&mut r, &b, json!({}));
        let elicit = |id: &str| json!({"jsonrpc":"2.0","id":id,"method":"elicitation/create","params":{"message":"?"}});
        let log = json!({"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info","data":"x"}});
        // Nobody busy: refused, dropped.
        assert!(backend(&r.from_backend(elicit("e0")))["error"]["message"].as_str().unwrap().contains("cannot tell"));
        assert!(r.from_backend(log.clone()).is_empty());
        // Only a busy: a is asked, related to its call.
        backend(&r.from_client(&a, json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}})));
        let (s, d) = session(&r.from_backend(elicit("e1")));
        assert_eq!((s.as_ref(), d.related_to.as_deref()), ("a", Some("1")));
        assert_eq!(session(&r.from_backend(log.clone())).0.as_ref(), "a");
        // a and b busy: neither is guessed.
        backend(&r.from_client(&b, json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"y"}})));
        let e = backend(&r.from_backend(elicit("e2")));
        assert_eq!(e["id"], "e2");
        assert_eq!(e["error"]["code"], -32603);
        assert!(r.from_backend(log.clone()).is_empty());
        // Only b busy, and b's client did not declare elicitation: mcpbox answers for it.
        r.from_backend(json!({"jsonrpc":"2.0","id":r.by_client[&(a.clone(), key(&json!(1)))].clone(),"result":{}}));
        let e = backend(&r.from_backend(elicit("e3")));
        assert_eq!(e["error"]["code"], -32601, "{e}");
        assert!(e["error"]["message"].as_str().unwrap().contains("elicitation"));
    }
}

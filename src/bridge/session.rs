//! Client sessions: who opened them, their [`Outbox`], the streams reading it, and the table of
//! one server's sessions ([`Sessions`]). The HTTP transports only translate between HTTP and
//! these calls; the supervisor creates sessions and ends them, and nothing else keeps a second
//! list.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::outbox::{Outbox, Reply, Transport, ANSWER_CHUNK};
use super::router::{key, Key};
use super::{Hub, Principal, Sent, SessionId};

pub struct Session {
    pub id: SessionId,
    pub server: String,
    /// Who opened it; only they can use it.
    pub principal: Principal,
    pub transport: Transport,
    hub: Arc<Hub>,
    pub outbox: Arc<Outbox>,
    /// Cancelled when the session ends (its process, if it has its own, is then ended).
    pub closed: CancellationToken,
    last_active: Mutex<Instant>,
    /// Open client streams; idle timeouts only apply with none open.
    streams: AtomicUsize,
    /// The server's request counter.
    requests: Arc<AtomicU64>,
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: SessionId,
        server: &str,
        principal: Principal,
        transport: Transport,
        hub: Arc<Hub>,
        budget: usize,
        closed: CancellationToken,
        requests: Arc<AtomicU64>,
    ) -> Arc<Self> {
        let outbox = Arc::new(Outbox::new(transport, budget));
        hub.attach(id.clone(), outbox.clone(), closed.clone());
        Arc::new(Session {
            id,
            server: server.to_string(),
            principal,
            transport,
            hub,
            outbox,
            closed,
            last_active: Mutex::new(Instant::now()),
            streams: AtomicUsize::new(0),
            requests,
        })
    }

    /// The hub (server process) this session is on.
    pub fn hub(&self) -> Arc<Hub> {
        self.hub.clone()
    }

    /// A message from the client (a JSON-RPC object).
    pub fn send(&self, msg: Value) -> Sent {
        self.touch();
        if msg.get("method").is_some() && msg.get("id").is_some() {
            self.requests.fetch_add(1, Ordering::Relaxed);
        }
        self.hub.from_client(&self.id, msg)
    }

    /// Send request `msg` and wait for its response as one JSON body, read out of the outbox
    /// at once (for mcpbox's own requests, whose answers it reads there and then); `None` if
    /// the session ended first without answering it.
    pub async fn request_json(self: &Arc<Self>, msg: Value) -> Option<Bytes> {
        self.request_answer(msg).await?.into_bytes()
    }

    /// Send request `msg` and wait for its response as one JSON body, which the outbox keeps
    /// (within the session's budget) until the returned [`Answer`] has read it out or is
    /// dropped; `None` if the session ended first without answering it. Until then the session
    /// is not idle (a call that runs longer than `idleTimeout`, or an answer still being
    /// written, is not ended under its client).
    pub async fn request_answer(self: &Arc<Self>, msg: Value) -> Option<Answer> {
        let k = key(&msg["id"]);
        let rx = self.outbox.lock().expect_json(k.clone());
        let lease = self.lease(false);
        let mut wait = JsonWait { outbox: self.outbox.clone(), k, rx: Some(rx) };
        self.send(msg);
        let reply = wait.rx.as_mut()?.await.ok();
        wait.rx = None;
        let (ticket, len, inline) = match reply? {
            // Dropped between the answer and now (the session's buffer overflowed).
            Reply::Held { ticket, .. } if !self.outbox.lock().has_answer(ticket) => return None,
            Reply::Held { ticket, len } => (Some(ticket), len, None),
            Reply::Inline(b) => (None, b.len(), Some(b)),
        };
        Some(Answer { outbox: self.outbox.clone(), ticket, inline, len, pos: 0, _lease: lease })
    }

    /// Hold `body` (an answer mcpbox made from the server's) in this session's outbox for a
    /// JSON body, as [`Session::request_answer`] holds the server's; `Err` with the message
    /// saying why if it does not fit the budget.
    pub fn hold_answer(self: &Arc<Self>, body: Bytes) -> Result<Answer, String> {
        let len = body.len();
        if len <= ANSWER_CHUNK {
            return Ok(Answer {
                outbox: self.outbox.clone(),
                ticket: None,
                inline: Some(body),
                len,
                pos: 0,
                _lease: self.lease(false),
            });
        }
        let ticket = self.outbox.lock().hold(body)?;
        Ok(Answer {
            outbox: self.outbox.clone(),
            ticket: Some(ticket),
            inline: None,
            len,
            pos: 0,
            _lease: self.lease(false),
        })
    }

    /// Send request `msg`; its related messages and then its response arrive on the returned
    /// stream.
    pub fn request_stream(self: &Arc<Self>, msg: Value) -> PostStream {
        let k = key(&msg["id"]);
        self.outbox.lock().expect_stream(k.clone());
        let s = PostStream { session: self.clone(), key: k, _lease: self.lease(false) };
        self.send(msg);
        s
    }

    /// The session's event stream (Streamable HTTP's GET, resuming after `after`; legacy
    /// SSE's only stream). `None` if one is open already.
    pub fn events(self: &Arc<Self>, after: Option<u64>) -> Option<EventStream> {
        let (cursor, gen) = {
            let mut o = self.outbox.lock();
            let cursor = o.open_events(after)?;
            (cursor, o.events_gen())
        };
        let end_session = self.transport == Transport::LegacySse;
        Some(EventStream { session: self.clone(), cursor, gen, _lease: self.lease(end_session) })
    }

    /// The event stream, taken over from whichever stream had it (which then ends): for a
    /// stream a client reopens at will, where the newest one is the one it reads.
    pub fn take_over_events(self: &Arc<Self>) -> EventStream {
        let (cursor, gen) = self.outbox.take_over_events();
        EventStream { session: self.clone(), cursor, gen, _lease: self.lease(false) }
    }

    fn lease(self: &Arc<Self>, end_session: bool) -> StreamLease {
        self.streams.fetch_add(1, Ordering::Relaxed);
        StreamLease { session: self.clone(), end_session }
    }

    pub fn touch(&self) {
        *self.last_active.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// How long the session has been idle: `None` while a client stream is open.
    pub fn idle_for(&self) -> Option<Duration> {
        if self.streams.load(Ordering::Relaxed) > 0 {
            return None;
        }
        Some(self.last_active.lock().unwrap_or_else(|e| e.into_inner()).elapsed())
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    pub fn close(&self, reason: &str) {
        if !self.closed.is_cancelled() {
            tracing::info!(server = %self.server, session = %self.id, "session ends: {reason}");
            self.closed.cancel();
        }
    }

    /// The session is over: it leaves its hub and everything its outbox holds is freed.
    /// Requests still waiting get `reason` as their error.
    pub fn finish(&self, reason: &str) {
        self.closed.cancel();
        self.hub.detach(&self.id);
        self.outbox.close(Some(reason));
    }
}

/// A request waiting for its JSON body; dropped before the answer came (its client went
/// away), it releases what the outbox holds for it.
struct JsonWait {
    outbox: Arc<Outbox>,
    k: Key,
    rx: Option<tokio::sync::oneshot::Receiver<Reply>>,
}

impl Drop for JsonWait {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        rx.close();
        let mut o = self.outbox.lock();
        if let Ok(Reply::Held { ticket, .. }) = rx.try_recv() {
            o.release(ticket);
        }
        o.forget_json(&self.k);
    }
}

/// The answer to a request given as one JSON body. The outbox holds it, counted in the
/// session's budget, until it is read out (a chunk at a time, as the client takes the HTTP
/// response) or this is dropped; while this lives the session is not idle. A session that
/// ends meanwhile lets it finish; only a session whose budget overflowed (everything it held
/// dropped) leaves the rest of the answer gone ([`AnswerGone`]).
pub struct Answer {
    outbox: Arc<Outbox>,
    ticket: Option<u64>,
    /// An answer of at most [`ANSWER_CHUNK`] bytes, or an error mcpbox made: held here, not in
    /// the outbox.
    inline: Option<Bytes>,
    len: usize,
    pos: usize,
    _lease: StreamLease,
}

/// The session's outbox dropped the answer while it was being written (its budget overflowed).
#[derive(Debug, thiserror::Error)]
#[error("the session dropped its answer while it was being written (its buffer overflowed)")]
pub struct AnswerGone;

impl Answer {
    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes not read out yet.
    pub fn remaining(&self) -> usize {
        self.len - self.pos
    }

    /// The next at most `max` bytes; `None` at the end.
    pub fn next_chunk(&mut self, max: usize) -> Result<Option<Bytes>, AnswerGone> {
        if let Some(b) = self.inline.take() {
            self.pos = self.len;
            return Ok(Some(b));
        }
        let Some(ticket) = self.ticket.filter(|_| self.pos < self.len) else { return Ok(None) };
        let chunk = self.outbox.lock().answer_chunk(ticket, self.pos, max).ok_or(AnswerGone)?;
        self.pos += chunk.len();
        if self.pos >= self.len {
            self.ticket = None;
        }
        Ok(Some(chunk))
    }

    /// The whole answer, which the outbox then holds no more; `None` if the session ended.
    pub fn into_bytes(mut self) -> Option<Bytes> {
        if let Some(b) = self.inline.take() {
            return Some(b);
        }
        let ticket = self.ticket.take()?;
        self.outbox.lock().take_answer(ticket)
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        if let Some(t) = self.ticket.take() {
            self.outbox.lock().release(t);
        }
    }
}

/// Counts an open client stream while it lives.
struct StreamLease {
    session: Arc<Session>,
    /// Legacy SSE: the session is its stream.
    end_session: bool,
}

impl Drop for StreamLease {
    fn drop(&mut self) {
        self.session.streams.fetch_sub(1, Ordering::Relaxed);
        self.session.touch();
        if self.end_session {
            self.session.close("SSE client disconnected");
        }
    }
}

/// The messages of one POSTed request, ending with its response.
pub struct PostStream {
    session: Arc<Session>,
    key: Key,
    _lease: StreamLease,
}

impl PostStream {
    pub async fn next(&mut self) -> Option<Bytes> {
        let k = &self.key;
        self.session.outbox.wait_for(|s| s.next_for_post(k)).await
    }
}

impl Drop for PostStream {
    fn drop(&mut self) {
        self.session.outbox.lock().forget(&self.key);
    }
}

/// A session's event stream: events with their numbers.
pub struct EventStream {
    session: Arc<Session>,
    cursor: u64,
    /// Which opening of the session's event stream this is.
    gen: u64,
    _lease: StreamLease,
}

impl EventStream {
    pub async fn next(&mut self) -> Option<(u64, Bytes)> {
        let (cursor, gen) = (self.cursor, self.gen);
        let (n, b) = self.session.outbox.wait_for(|s| s.next_event_of(gen, cursor)).await?;
        self.cursor = n;
        Some((n, b))
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.session.outbox.lock().close_events(self.gen);
    }
}

/// The sessions of one server, with the count of slots taken (sessions and opens in progress)
/// that `maxSessions` is checked against.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<SessionId, Arc<Session>>>,
    reserved: AtomicUsize,
}

/// A slot for a session being opened; given back when dropped unless the session took it.
pub struct Slot<'a> {
    sessions: &'a Sessions,
    taken: bool,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if !self.taken {
            self.sessions.reserved.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Arc<Session>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for one more session, if fewer than `max` are open or opening.
    pub fn reserve(&self, max: Option<usize>) -> Option<Slot<'_>> {
        let n = self.reserved.fetch_add(1, Ordering::SeqCst);
        let slot = Slot { sessions: self, taken: false };
        if max.is_some_and(|m| n >= m) {
            return None;
        }
        Some(slot)
    }

    pub fn insert(&self, mut slot: Slot<'_>, s: Arc<Session>) {
        slot.taken = true;
        self.lock().insert(s.id.clone(), s);
    }

    /// The session `id` if it is open and belongs to `principal`: another principal's
    /// session is as unknown as one that never existed.
    pub fn get(&self, id: &str, principal: &Principal) -> Option<Arc<Session>> {
        self.lock().get(id).filter(|s| !s.is_closed() && s.principal == *principal).cloned()
    }

    /// Forget session `id` and free its slot.
    pub fn remove(&self, id: &SessionId) {
        if self.lock().remove(id).is_some() {
            self.reserved.fetch_sub(1, Ordering::SeqCst);
        }
    }

    pub fn all(&self) -> Vec<Arc<Session>> {
        self.lock().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

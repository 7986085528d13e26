//! A session's outbox: which stream or POST gets each message from the server (reply
//! routing), the session's event stream with its replay ring, and the byte budget over all of
//! it.
//!
//! [`OutboxState`] is pure state (messages in, what became of them out) and is tested without
//! sockets; [`Outbox`] wraps it in a lock and wakes the streams that read it.
//!
//! Routing: a response goes to the POST that carried its request (as one JSON body, or as the
//! last event of that POST's own stream); a message related to a request in flight goes to
//! that request's POST stream while one is open; everything else goes to the session's event
//! stream (the GET stream of Streamable HTTP, the one stream of legacy SSE).
//!
//! Budget: every byte the outbox holds counts (POST stream queues, the event stream's
//! undelivered events, Streamable HTTP's already-delivered events kept for replay, and the
//! answers given as one JSON body until their HTTP response has been written, see
//! [`Reply`]). Over budget, delivered replay events go first (and, for a Streamable session
//! with no GET stream open, the oldest events: nobody is reading them); if that is not enough
//! the client is not keeping up, and the session ends ([`Overflow`]); an answer for a JSON body
//! that does not fit is replaced by a JSON-RPC error instead ([`too_big`]), and the session goes
//! on. The budget is in bytes, never in messages: a client that reads as fast as messages come
//! never reaches it, however many there are.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use tokio::sync::{oneshot, Notify};

use super::router::{error_response, Key};
use super::Outbound;

/// How a session's event stream is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Legacy SSE: one stream carries everything; events are gone once sent.
    LegacySse,
    /// Streamable HTTP: responses go to their POST; the GET stream's events are kept for
    /// replay (`Last-Event-ID`) while the budget allows.
    Streamable,
}

/// What a request answered as one JSON body gets.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// The answer, held by the outbox (and counted in its budget) as answer `ticket` until it
    /// is read out ([`OutboxState::answer_chunk`], [`OutboxState::take_answer`]) or released.
    Held { ticket: u64, len: usize },
    /// An answer of at most [`ANSWER_CHUNK`] bytes, or an error made by mcpbox (a few hundred
    /// bytes and the request's id): not counted.
    Inline(Bytes),
}

/// Answers for a JSON body up to this long are handed over whole, not held: no more than what
/// the connection holds of a larger one at a time (see `CONN_BUF_BYTES` in `http/listen.rs`), and
/// a session that ends at once after such an answer (the server's exit, with the error it made)
/// does not cut it off.
pub const ANSWER_CHUNK: usize = 16 << 10;

/// The error message of an answer for a JSON body that does not fit the session's budget.
pub fn too_big(len: usize, budget: usize, held: usize) -> String {
    format!(
        "mcpbox dropped the server's {len}-byte answer: it does not fit in this session's buffer \
         (mcpbox.sessionBufferBytes, {budget} bytes, {held} of them in use)"
    )
}

/// Where the response to a request goes.
enum Waiter {
    Json(oneshot::Sender<Reply>),
    /// A POST answered as a stream: its queue, and whether the response has arrived.
    Stream {
        queue: VecDeque<Bytes>,
        done: bool,
    },
}

/// The outbox went over its budget: the session must end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the session's outbound buffer went over mcpbox.sessionBufferBytes ({budget} bytes): the client does not read its messages as fast as the server sends them")]
pub struct Overflow {
    pub budget: usize,
}

/// What a stream reader gets next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next<T> {
    Item(T),
    /// Nothing yet: wait for a wake-up.
    Wait,
    /// The stream is over.
    End,
}

pub struct OutboxState {
    transport: Transport,
    budget: usize,
    posts: HashMap<Key, Waiter>,
    ring: VecDeque<(u64, Bytes)>,
    next_event: u64,
    /// Highest event number handed to an event stream.
    delivered: u64,
    get_open: bool,
    /// Counts the event streams opened: a stream whose number is no longer the latest was
    /// taken over ([`OutboxState::take_over_events`]) and ends.
    events_gen: u64,
    /// Answers for JSON bodies not yet read out, by ticket.
    answers: HashMap<u64, Bytes>,
    next_ticket: u64,
    /// Bytes held in `posts`, `ring` and `answers`.
    held: usize,
    closed: bool,
}

impl OutboxState {
    pub fn new(transport: Transport, budget: usize) -> Self {
        OutboxState {
            transport,
            budget,
            posts: HashMap::new(),
            ring: VecDeque::new(),
            next_event: 0,
            delivered: 0,
            get_open: false,
            events_gen: 0,
            answers: HashMap::new(),
            next_ticket: 0,
            held: 0,
            closed: false,
        }
    }

    pub fn held(&self) -> usize {
        self.held
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// The response to request `k` goes to a JSON body.
    pub fn expect_json(&mut self, k: Key) -> oneshot::Receiver<Reply> {
        let (tx, rx) = oneshot::channel();
        if !self.closed {
            self.posts.insert(k, Waiter::Json(tx));
        }
        rx
    }

    /// The response to request `k`, and the messages related to it, go to that POST's stream.
    pub fn expect_stream(&mut self, k: Key) {
        if !self.closed {
            self.posts.insert(k, Waiter::Stream { queue: VecDeque::new(), done: false });
        }
    }

    /// The request `k` that waited for a JSON body is gone (its receiver closed): it waits no
    /// more. (A newer request of the same id, still waiting, is left alone.)
    pub fn forget_json(&mut self, k: &Key) {
        if matches!(self.posts.get(k), Some(Waiter::Json(tx)) if tx.is_closed()) {
            self.posts.remove(k);
        }
    }

    /// Up to `max` bytes of answer `ticket` from `pos`; once its last byte is out, the outbox
    /// holds it no more. `None` when there is no such answer (released, or the session ended).
    pub fn answer_chunk(&mut self, ticket: u64, pos: usize, max: usize) -> Option<Bytes> {
        let b = self.answers.get(&ticket)?;
        if pos >= b.len() {
            return None;
        }
        if pos == 0 && b.len() <= max {
            return self.take_answer(ticket);
        }
        // A copy: a slice would keep the whole answer alive wherever it goes.
        let end = b.len().min(pos + max);
        let chunk = Bytes::copy_from_slice(&b[pos..end]);
        if end == b.len() {
            self.release(ticket);
        }
        Some(chunk)
    }

    /// Hold `body`, an answer mcpbox made from the server's, for a JSON body, as
    /// [`Reply::Held`] answers are held; `Err` with the [`too_big`] message if it does not fit.
    pub fn hold(&mut self, body: Bytes) -> Result<u64, String> {
        let len = body.len();
        if self.closed || !self.room_for(len) {
            tracing::warn!(
                bytes = len,
                budget = self.budget,
                held = self.held,
                "an answer for a JSON body does not fit mcpbox.sessionBufferBytes; its request gets an error"
            );
            return Err(too_big(len, self.budget, self.held));
        }
        self.next_ticket += 1;
        self.answers.insert(self.next_ticket, body);
        self.held += len;
        Ok(self.next_ticket)
    }

    /// Whether answer `ticket` is still held (not read out, the session not over).
    pub fn has_answer(&self, ticket: u64) -> bool {
        self.answers.contains_key(&ticket)
    }

    /// Answer `ticket`, which the outbox then holds no more.
    pub fn take_answer(&mut self, ticket: u64) -> Option<Bytes> {
        let b = self.answers.remove(&ticket)?;
        self.held -= b.len();
        Some(b)
    }

    /// Answer `ticket` is not wanted any more (its response was written, or never will be).
    pub fn release(&mut self, ticket: u64) {
        self.take_answer(ticket);
    }

    /// The POST that waited for `k` is gone.
    pub fn forget(&mut self, k: &Key) {
        if let Some(Waiter::Stream { queue, .. }) = self.posts.remove(k) {
            self.held -= queue.iter().map(Bytes::len).sum::<usize>();
        }
    }

    /// Next message of the POST stream for `k`.
    pub fn next_for_post(&mut self, k: &Key) -> Next<Bytes> {
        let Some(Waiter::Stream { queue, done }) = self.posts.get_mut(k) else { return Next::End };
        match queue.pop_front() {
            Some(b) => {
                self.held -= b.len();
                Next::Item(b)
            }
            None if *done || self.closed => {
                self.posts.remove(k);
                Next::End
            }
            None => Next::Wait,
        }
    }

    /// Open the event stream, resuming after event `after` (default: after the last one sent).
    /// `None` if one is open already (Streamable HTTP allows one GET stream per session).
    pub fn open_events(&mut self, after: Option<u64>) -> Option<u64> {
        if self.get_open {
            return None;
        }
        self.get_open = true;
        self.events_gen += 1;
        Some(after.unwrap_or(self.delivered))
    }

    /// Open the event stream even if one is open: that one ends (its next read is the end),
    /// this one goes on from the last event sent. The cursor and the new stream's number.
    pub fn take_over_events(&mut self) -> (u64, u64) {
        self.get_open = true;
        self.events_gen += 1;
        (self.delivered, self.events_gen)
    }

    /// The number of the event stream opened last.
    pub fn events_gen(&self) -> u64 {
        self.events_gen
    }

    /// Event stream `gen` is closed; a stream that was taken over closes nothing.
    pub fn close_events(&mut self, gen: u64) {
        if gen == self.events_gen {
            self.get_open = false;
        }
    }

    /// [`Self::next_event`] for event stream `gen`: the end once another stream took over.
    pub fn next_event_of(&mut self, gen: u64, cursor: u64) -> Next<(u64, Bytes)> {
        if gen != self.events_gen {
            return Next::End;
        }
        self.next_event(cursor)
    }

    /// The next event after `cursor`.
    pub fn next_event(&mut self, cursor: u64) -> Next<(u64, Bytes)> {
        let found = match self.transport {
            // Legacy: events leave the ring when they are sent.
            Transport::LegacySse => self.ring.pop_front().inspect(|(_, b)| self.held -= b.len()),
            Transport::Streamable => self.ring.iter().find(|(n, _)| *n > cursor).cloned(),
        };
        match found {
            Some((n, b)) => {
                self.delivered = self.delivered.max(n);
                Next::Item((n, b))
            }
            None if self.closed => Next::End,
            None => Next::Wait,
        }
    }

    /// A message for this session. `Err` when it does not fit the budget: the session ends.
    pub fn push(&mut self, o: Outbound) -> Result<(), Overflow> {
        if self.closed {
            return Ok(());
        }
        let len = o.body.len();
        if let Some(k) = &o.reply_to {
            match self.posts.remove(k) {
                Some(Waiter::Json(tx)) if len <= ANSWER_CHUNK => {
                    let _ = tx.send(Reply::Inline(o.body));
                    return Ok(());
                }
                Some(Waiter::Json(tx)) => {
                    if !self.room_for(len) {
                        tracing::warn!(bytes = len, budget = self.budget, held = self.held, "an answer for a JSON body does not fit mcpbox.sessionBufferBytes; its request gets an error");
                        let id = serde_json::from_str(k).unwrap_or(serde_json::Value::Null);
                        let e = error_response(id, -32603, &too_big(len, self.budget, self.held));
                        let _ = tx.send(Reply::Inline(Bytes::from(e.to_string())));
                        return Ok(());
                    }
                    self.next_ticket += 1;
                    let ticket = self.next_ticket;
                    // Held only if someone still waits for it (under this lock, so the reader
                    // cannot look for it before it is there).
                    if tx.send(Reply::Held { ticket, len }).is_ok() {
                        self.answers.insert(ticket, o.body);
                        self.held += len;
                    }
                    return Ok(());
                }
                Some(Waiter::Stream { mut queue, .. }) => {
                    queue.push_back(o.body);
                    self.posts.insert(k.clone(), Waiter::Stream { queue, done: true });
                    self.held += len;
                    return self.fit();
                }
                // Legacy SSE answers on the session's stream.
                None if self.transport == Transport::LegacySse => {}
                None => {
                    tracing::debug!("response for a request whose POST is gone; dropped");
                    return Ok(());
                }
            }
        }
        if let Some(Waiter::Stream { queue, done: false }) = o.related_to.as_ref().and_then(|k| self.posts.get_mut(k)) {
            queue.push_back(o.body);
            self.held += len;
            return self.fit();
        }
        self.next_event += 1;
        self.ring.push_back((self.next_event, o.body));
        self.held += len;
        self.fit()
    }

    /// Whether event `n` of the ring may be dropped to make room: it was sent already, or
    /// nobody is reading the events (a Streamable session with no GET stream open).
    fn evictable(&self, n: u64) -> bool {
        n <= self.delivered || (self.transport == Transport::Streamable && !self.get_open)
    }

    /// Make room for `len` more bytes by dropping what may go, if that is enough; `false`
    /// (nothing dropped) if it is not.
    fn room_for(&mut self, len: usize) -> bool {
        let droppable: usize = self.ring.iter().take_while(|(n, _)| self.evictable(*n)).map(|(_, b)| b.len()).sum();
        if self.held - droppable + len > self.budget {
            return false;
        }
        while self.held + len > self.budget {
            let Some((_, b)) = self.ring.pop_front() else { break };
            self.held -= b.len();
        }
        true
    }

    /// Drop what may go; `Err` if the rest is still over budget.
    fn fit(&mut self) -> Result<(), Overflow> {
        while self.held > self.budget {
            let evictable = self.ring.front().is_some_and(|(n, _)| self.evictable(*n));
            if !evictable {
                return Err(Overflow { budget: self.budget });
            }
            if let Some((_, b)) = self.ring.pop_front() {
                self.held -= b.len();
            }
        }
        Ok(())
    }

    /// Drop everything held (the budget is exceeded: nothing of it is worth keeping).
    pub fn discard(&mut self) {
        self.ring = VecDeque::new();
        self.answers = HashMap::new();
        for w in self.posts.values_mut() {
            if let Waiter::Stream { queue, .. } = w {
                *queue = VecDeque::new();
            }
        }
        self.held = 0;
    }

    /// End the outbox: what no open stream will read is freed; requests still waiting get
    /// `reason` as their JSON-RPC error, and the event stream gets it as a last log message.
    pub fn close(&mut self, reason: Option<&str>) {
        if self.closed {
            return;
        }
        self.closed = true;
        // Events still on their way to an open event stream drain to it (a legacy client
        // gets the errors of its last requests); with no stream open nobody can read them.
        let ring = std::mem::take(&mut self.ring);
        if self.get_open {
            self.ring = ring.into_iter().filter(|(n, _)| *n > self.delivered).collect();
        }
        let posts = std::mem::take(&mut self.posts);
        // Answers still being written as JSON bodies are finished, as the events above drain
        // to their stream: the server answered, and its client is reading the answer. Each is
        // freed when its response has been written or its client goes away (`Answer` drops).
        self.held = self.ring.iter().map(|(_, b)| b.len()).sum::<usize>()
            + self.answers.values().map(Bytes::len).sum::<usize>();
        let Some(reason) = reason else { return };
        let error_for = |k: &Key| {
            let id = serde_json::from_str(k).unwrap_or(serde_json::Value::Null);
            Bytes::from(error_response(id, -32603, reason).to_string())
        };
        for (k, w) in posts {
            match w {
                Waiter::Json(tx) => {
                    let _ = tx.send(Reply::Inline(error_for(&k)));
                }
                // A POST stream keeps what it holds up to its response (which may be the error
                // the server's exit gave it), so that its reader still gets an answer.
                Waiter::Stream { mut queue, done } => {
                    if !done {
                        queue.push_back(error_for(&k));
                    }
                    self.held += queue.iter().map(Bytes::len).sum::<usize>();
                    self.posts.insert(k, Waiter::Stream { queue, done: true });
                }
            }
        }
        let note = serde_json::json!({"jsonrpc": "2.0", "method": "notifications/message",
            "params": {"level": "error", "logger": "mcpbox", "data": reason}});
        let b = Bytes::from(note.to_string());
        self.held += b.len();
        self.next_event += 1;
        self.ring.push_back((self.next_event, b));
    }
}

/// [`OutboxState`] behind a lock, with the wake-up its streams wait on.
pub struct Outbox {
    state: std::sync::Mutex<OutboxState>,
    notify: Notify,
    /// `notifications/tools/list_changed` delivered to this session so far.
    tools_changed: std::sync::atomic::AtomicU64,
}

impl Outbox {
    pub fn new(transport: Transport, budget: usize) -> Self {
        Outbox {
            state: std::sync::Mutex::new(OutboxState::new(transport, budget)),
            notify: Notify::new(),
            tools_changed: Default::default(),
        }
    }

    /// How many `notifications/tools/list_changed` were delivered to this session.
    pub fn tools_changed(&self) -> u64 {
        self.tools_changed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The server said its tools changed (counted before the notification is queued).
    pub fn note_tools_changed(&self) {
        self.tools_changed.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, OutboxState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, o: Outbound) -> Result<(), Overflow> {
        let r = self.lock().push(o);
        self.notify.notify_waiters();
        r
    }

    pub fn close(&self, reason: Option<&str>) {
        self.lock().close(reason);
        self.notify.notify_waiters();
    }

    /// [`OutboxState::take_over_events`], waking the stream taken over so that it ends.
    pub fn take_over_events(&self) -> (u64, u64) {
        let r = self.lock().take_over_events();
        self.notify.notify_waiters();
        r
    }

    /// Over budget: drop everything held, then close.
    pub fn overflowed(&self, reason: &str) {
        let mut st = self.lock();
        st.discard();
        st.close(Some(reason));
        drop(st);
        self.notify.notify_waiters();
    }

    /// Wait until `f` gives an item or the end.
    pub async fn wait_for<T>(&self, mut f: impl FnMut(&mut OutboxState) -> Next<T>) -> Option<T> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let next = f(&mut self.lock());
            match next {
                Next::Item(t) => return Some(t),
                Next::End => return None,
                Next::Wait => notified.await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(n: usize) -> Outbound {
        Outbound { body: Bytes::from(vec![b'x'; n]), reply_to: None, related_to: None }
    }

    fn reply(k: &str, n: usize) -> Outbound {
        Outbound { body: Bytes::from(vec![b'r'; n]), reply_to: Some(k.into()), related_to: None }
    }

    #[test]
    fn a_reader_that_keeps_up_is_never_cut_off() {
        let mut o = OutboxState::new(Transport::LegacySse, 1000);
        let mut cursor = 0;
        o.open_events(None).unwrap();
        for _ in 0..100_000 {
            o.push(msg(200)).unwrap();
            let Next::Item((n, _)) = o.next_event(cursor) else { panic!("an event") };
            cursor = n;
        }
        assert_eq!(o.held(), 0);
        let mut s = OutboxState::new(Transport::Streamable, 1000);
        s.open_events(None).unwrap();
        let mut cursor = 0;
        for _ in 0..100_000 {
            s.push(msg(200)).unwrap();
            let Next::Item((n, _)) = s.next_event(cursor) else { panic!("an event") };
            cursor = n;
        }
        assert!(s.held() <= 1000, "the replay ring stays in budget: {}", s.held());
    }

    #[test]
    fn a_reader_that_does_not_read_overflows_the_budget() {
        let mut o = OutboxState::new(Transport::LegacySse, 1000);
        o.open_events(None).unwrap();
        for _ in 0..5 {
            o.push(msg(200)).unwrap();
        }
        assert_eq!(o.push(msg(1)), Err(Overflow { budget: 1000 }));
        // A Streamable session with a GET stream open that lags: the same.
        let mut s = OutboxState::new(Transport::Streamable, 1000);
        s.open_events(None).unwrap();
        assert!((0..10).map(|_| s.push(msg(200))).any(|r| r.is_err()));
        // A POST stream that is not read: the same.
        let mut p = OutboxState::new(Transport::Streamable, 1000);
        p.expect_stream("1".into());
        let related = |n| Outbound { body: Bytes::from(vec![b'p'; n]), reply_to: None, related_to: Some("1".into()) };
        assert!((0..10).map(|_| p.push(related(200))).any(|r| r.is_err()));
    }

    #[test]
    fn without_a_get_stream_the_ring_keeps_the_newest_within_budget() {
        let mut s = OutboxState::new(Transport::Streamable, 1000);
        for _ in 0..50 {
            s.push(msg(300)).unwrap();
        }
        assert!(s.held() <= 1000);
        let cursor = s.open_events(Some(0)).unwrap();
        let Next::Item((n, _)) = s.next_event(cursor) else { panic!() };
        assert_eq!(n, 48, "the three newest are kept for replay");
    }

    #[test]
    fn replies_go_to_their_post_and_close_answers_the_rest() {
        let mut s = OutboxState::new(Transport::Streamable, 1 << 20);
        let mut json = s.expect_json("1".into());
        s.expect_stream("2".into());
        let related = Outbound { body: Bytes::from_static(b"progress"), reply_to: None, related_to: Some("2".into()) };
        s.push(related).unwrap();
        s.push(reply("1", 3)).unwrap();
        assert_eq!(json.try_recv().unwrap(), Reply::Inline(Bytes::from_static(b"rrr")));
        assert_eq!(s.next_for_post(&"2".into()), Next::Item(Bytes::from_static(b"progress")));
        assert_eq!(s.next_for_post(&"2".into()), Next::Wait);
        let mut json = s.expect_json("3".into());
        s.close(Some("session ended: budget"));
        let Reply::Inline(b) = json.try_recv().unwrap() else { panic!("an error") };
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(
            (v["id"].clone(), v["error"]["message"].clone()),
            (serde_json::json!(3), serde_json::json!("session ended: budget"))
        );
        let Next::Item(b) = s.next_for_post(&"2".into()) else { panic!() };
        assert!(String::from_utf8_lossy(&b).contains("session ended: budget"));
        assert_eq!(s.next_for_post(&"2".into()), Next::End);
        // A response already queued on a POST stream survives the close.
        let mut s = OutboxState::new(Transport::Streamable, 1 << 20);
        s.expect_stream("4".into());
        s.push(reply("4", 2)).unwrap();
        s.close(Some("gone"));
        assert_eq!(s.next_for_post(&"4".into()), Next::Item(Bytes::from_static(b"rr")));
        assert_eq!(s.next_for_post(&"4".into()), Next::End);
        // Closing frees what no open stream reads; an open stream drains its undelivered events.
        let mut s = OutboxState::new(Transport::Streamable, 1 << 20);
        s.push(msg(5000)).unwrap();
        s.close(None);
        assert_eq!(s.held(), 0);
        assert_eq!(s.next_event(0), Next::End);
        let mut l = OutboxState::new(Transport::LegacySse, 1 << 20);
        l.open_events(None).unwrap();
        l.push(msg(1)).unwrap();
        assert!(matches!(l.next_event(0), Next::Item((1, _))));
        l.push(msg(7)).unwrap();
        l.close(None);
        assert!(matches!(l.next_event(1), Next::Item((2, b)) if b.len() == 7));
        assert_eq!(l.next_event(2), Next::End);
        l.discard();
        assert_eq!(l.held(), 0);
    }

    /// An answer for a JSON body counts in the budget until it is read out; one that does not
    /// fit (after dropping what may go) is replaced by an error naming the budget, and the
    /// session goes on.
    #[test]
    fn json_answers_count_in_the_budget_until_read_out() {
        let mut s = OutboxState::new(Transport::Streamable, 100_000);
        s.open_events(None).unwrap();
        let mut a = s.expect_json("1".into());
        s.push(reply("1", 60_000)).unwrap();
        let Ok(Reply::Held { ticket, len: 60_000 }) = a.try_recv() else { panic!("held") };
        assert_eq!(s.held(), 60_000);
        let mut b = s.expect_json("2".into());
        s.push(reply("2", 60_000)).expect("the session goes on");
        let Ok(Reply::Inline(e)) = b.try_recv() else { panic!("an error") };
        let e: serde_json::Value = serde_json::from_slice(&e).unwrap();
        assert_eq!((e["id"].clone(), e["error"]["code"].clone()), (serde_json::json!(2), serde_json::json!(-32603)));
        assert_eq!(e["error"]["message"], too_big(60_000, 100_000, 60_000));
        assert!(too_big(60_000, 100_000, 60_000).contains("mcpbox.sessionBufferBytes"));
        assert_eq!(s.held(), 60_000, "the refused answer is not held");
        // What fits still passes, on every kind of way out.
        s.expect_stream("3".into());
        s.push(reply("3", 30_000)).unwrap();
        assert_eq!(s.held(), 90_000);
        // Read out a chunk at a time: held until its last byte is out, as copies.
        let mut pos = 0;
        while let Some(c) = s.answer_chunk(ticket, pos, 25_600) {
            pos += c.len();
            assert_eq!(s.held(), if pos < 60_000 { 90_000 } else { 30_000 }, "at {pos}");
        }
        assert_eq!(pos, 60_000);
        let mut c = s.expect_json("4".into());
        s.push(reply("4", 70_000)).unwrap();
        let Ok(Reply::Held { ticket, .. }) = c.try_recv() else { panic!("fits once the first is out") };
        // Released unread (the client went away): gone from the budget.
        s.release(ticket);
        assert_eq!(s.held(), 30_000);
        // An answer nobody waits for any more is not held.
        let d = s.expect_json("5".into());
        drop(d);
        s.forget_json(&"5".into());
        let e = s.expect_json("6".into());
        drop(e);
        s.push(reply("6", 20_000)).unwrap();
        assert_eq!(s.held(), 30_000);
        // A small answer is handed over whole, not held.
        let mut f = s.expect_json("7".into());
        s.push(reply("7", ANSWER_CHUNK)).unwrap();
        assert!(matches!(f.try_recv(), Ok(Reply::Inline(b)) if b.len() == ANSWER_CHUNK));
        assert_eq!(s.held(), 30_000);
    }

    /// Replay events that were sent already make room for an answer; a session that ends lets
    /// the answers still being read out finish, and they are freed once read.
    #[test]
    fn json_answers_make_room_from_replay_and_end_with_the_session() {
        let mut s = OutboxState::new(Transport::Streamable, 100_000);
        let cursor = s.open_events(None).unwrap();
        s.push(msg(40_000)).unwrap();
        s.push(msg(40_000)).unwrap();
        assert!(matches!(s.next_event(cursor), Next::Item((1, _))));
        let mut a = s.expect_json("1".into());
        s.push(reply("1", 50_000)).unwrap();
        let Ok(Reply::Held { ticket, .. }) = a.try_recv() else { panic!("room made from the sent event") };
        assert_eq!(s.held(), 90_000);
        // Not enough even without the sent events: nothing is dropped for it.
        let mut b = s.expect_json("2".into());
        s.push(reply("2", 20_000)).unwrap();
        assert!(matches!(b.try_recv(), Ok(Reply::Inline(_))));
        assert_eq!(s.held(), 90_000);
        s.close(None);
        assert_eq!(s.held(), 90_000, "the event on its way to the open stream, and the answer being read out");
        assert_eq!(s.answer_chunk(ticket, 0, 1 << 20).map(|b| b.len()), Some(50_000));
        s.release(ticket);
        assert_eq!(s.held(), 40_000, "only the event still on its way to the open stream");
    }

    #[test]
    fn a_new_event_stream_takes_over_and_the_old_one_ends() {
        let mut s = OutboxState::new(Transport::Streamable, 1 << 20);
        let first = s.open_events(None).unwrap();
        let g1 = s.events_gen();
        assert_eq!(s.open_events(None), None, "a plain second open is still refused");
        s.push(msg(1)).unwrap();
        assert!(matches!(s.next_event_of(g1, first), Next::Item((1, _))));
        let (cursor, g2) = s.take_over_events();
        assert_eq!(cursor, 1, "the new stream goes on after what was sent");
        s.push(msg(2)).unwrap();
        assert_eq!(s.next_event_of(g1, 1), Next::End, "the old stream ends");
        assert!(matches!(s.next_event_of(g2, cursor), Next::Item((2, _))));
        // The old stream closing does not close the new one's hold on the events.
        s.close_events(g1);
        assert_eq!(s.open_events(None), None);
        s.close_events(g2);
        assert!(s.open_events(None).is_some());
    }
}

//! `mcpbox url-bridge` (hidden): a `url` upstream seen as a stdio MCP server.
//!
//! mcp-proxy configs may name remote servers by URL. Rather than give the supervisor a second
//! kind of backend, mcpbox runs this small bridge as the "server": newline-delimited JSON-RPC on
//! stdin/stdout, HTTP to the upstream — Streamable HTTP (POST each message; JSON or SSE answers;
//! a GET stream for what the server sends on its own) or legacy SSE (GET the stream, POST to the
//! endpoint it announces). It runs in a sandbox like any server (network `host`), so the code
//! that parses what a remote server sends holds no more than it needs.
//!
//! The upstream's URL (which often carries `?api_key=…`) comes in `MCPBOX_UPSTREAM_URL` and its
//! headers (its tokens) in `MCPBOX_UPSTREAM_HEADERS` as a JSON object: never on the command
//! line, which every user of the host can read in `/proc/PID/cmdline` (a process's environment
//! is readable by its owner only). What the bridge writes to stderr (mcpbox's log) names the
//! URL without its query.
//!
//! What the upstream sends is held a bounded amount, whatever it sends: at most
//! `mcpbox.maxLineBytes` (`--max-line-bytes`, set by the plan) of one line of an event stream,
//! of one event's data and of one JSON answer. A longer event or answer is discarded (logged;
//! a request it answered gets an error naming the limit) and the stream goes on; a line that
//! does not end within the limit ends its stream with an error.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

/// The environment variable carrying the upstream's headers.
pub const HEADERS_ENV: &str = "MCPBOX_UPSTREAM_HEADERS";
/// The environment variable carrying the upstream's URL.
pub const URL_ENV: &str = "MCPBOX_UPSTREAM_URL";

/// The URL as logs may show it: without its query (and fragment) and without user info.
pub fn redact(url: &str) -> String {
    let base = url.split(['?', '#']).next().unwrap_or(url);
    let base = match base.split_once("://") {
        Some((scheme, rest)) => {
            let (auth, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = auth.rsplit_once('@').map_or(auth, |(_, h)| h);
            format!("{scheme}://{host}{path}")
        }
        None => base.to_string(),
    };
    if url.contains(['?', '#']) {
        format!("{base}?…")
    } else {
        base
    }
}

/// The upstream URL and its redacted form, for scrubbing messages that quote it.
static URL_SEEN: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();

/// A message for stderr with the upstream URL (as given, or as reqwest prints it) redacted.
fn scrub(msg: impl std::fmt::Display) -> String {
    let mut s = msg.to_string();
    if let Some((url, red)) = URL_SEEN.get() {
        s = s.replace(url.as_str(), red);
        if let Ok(parsed) = reqwest::Url::parse(url) {
            s = s.replace(parsed.as_str(), red);
        }
    }
    s
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Streamable,
    Sse,
}

impl Transport {
    /// mcp-proxy's `transportType`, or a guess from the URL (`…/sse` is legacy SSE).
    pub fn pick(configured: Option<&str>, url: &str) -> anyhow::Result<Transport> {
        match configured.map(|s| s.to_ascii_lowercase()) {
            Some(t) if t == "sse" => Ok(Transport::Sse),
            Some(t) if t == "streamable-http" || t == "streamablehttp" || t == "http" => Ok(Transport::Streamable),
            Some(t) => bail!("transportType {t:?}: expected \"sse\" or \"streamable-http\""),
            None => {
                let path = url.split(['?', '#']).next().unwrap_or(url).trim_end_matches('/');
                Ok(if path.ends_with("/sse") { Transport::Sse } else { Transport::Streamable })
            }
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Streamable => "streamable-http",
            Transport::Sse => "sse",
        }
    }
}

/// One server-sent event.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
}

/// What [`SseParser::push`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum SseItem {
    Event(SseEvent),
    /// An event whose data was longer than the limit was discarded, when its end came.
    Dropped {
        /// Its type (`message` unless it said otherwise).
        event: String,
        /// The length its data had (the values joined by newlines, as it would have gone on).
        bytes: usize,
        /// The opening of its data (at most [`crate::bridge::framing::HEAD`] bytes), which
        /// names the request an over-long answer was for.
        head: Vec<u8>,
    },
    /// A line longer than the limit that had not ended: the stream cannot go on (the parser
    /// ignores everything after it). Always the last item.
    LineTooLong,
}

/// Incremental `text/event-stream` parser (fields `event` and `data`; others ignored), holding
/// at most `max` bytes of a line and `max` bytes of an event's data, whatever the upstream
/// sends: an event with more data is discarded (and reported), a longer line ends the stream.
pub struct SseParser {
    max: usize,
    /// The line so far (at most `max + 1` bytes: its last may be the `\r` of a `\r\n`).
    buf: Vec<u8>,
    event: String,
    data: Vec<String>,
    /// Length of `data` joined with `\n`.
    data_len: usize,
    /// Length of the data of an event being discarded, and its opening.
    dropping: Option<(usize, Vec<u8>)>,
    failed: bool,
}

impl SseParser {
    /// A parser holding at most `max` bytes of a line and of an event's data.
    pub fn new(max: usize) -> Self {
        SseParser {
            max,
            buf: Vec::new(),
            event: String::new(),
            data: Vec::new(),
            data_len: 0,
            dropping: None,
            failed: false,
        }
    }

    /// Bytes of the stream held (the open line and the open event's data).
    pub fn held(&self) -> usize {
        self.buf.len() + self.data_len + self.event.len()
    }

    pub fn push(&mut self, mut chunk: &[u8]) -> Vec<SseItem> {
        let mut out = Vec::new();
        while !self.failed && !chunk.is_empty() {
            let (part, end) = match chunk.iter().position(|b| *b == b'\n') {
                Some(i) => (&chunk[..i], Some(i)),
                None => (chunk, None),
            };
            // `max + 1`: the line's last byte may be the `\r` of a `\r\n`, not part of it.
            if self.buf.len() + part.len() > self.max.saturating_add(1) {
                self.fail();
                out.push(SseItem::LineTooLong);
                break;
            }
            self.buf.extend_from_slice(part);
            let Some(i) = end else { break };
            chunk = &chunk[i + 1..];
            if self.buf.last() == Some(&b'\r') {
                self.buf.pop();
            }
            if self.buf.len() > self.max {
                self.fail();
                out.push(SseItem::LineTooLong);
                break;
            }
            let line = String::from_utf8_lossy(&self.buf).into_owned();
            self.buf.clear();
            if let Some(item) = self.line(line) {
                out.push(item);
            }
        }
        out
    }

    /// Give up on the stream, and what is held of it.
    fn fail(&mut self) {
        self.failed = true;
        (self.buf, self.event, self.data, self.data_len, self.dropping) = Default::default();
    }

    /// One complete line (without its end).
    fn line(&mut self, line: String) -> Option<SseItem> {
        if line.is_empty() {
            let item = if let Some((bytes, head)) = self.dropping.take() {
                let event = if self.event.is_empty() { "message".to_string() } else { std::mem::take(&mut self.event) };
                Some(SseItem::Dropped { event, bytes, head })
            } else if !self.data.is_empty() {
                let event = if self.event.is_empty() { "message".to_string() } else { std::mem::take(&mut self.event) };
                Some(SseItem::Event(SseEvent { event, data: self.data.join("\n") }))
            } else {
                None
            };
            self.event.clear();
            self.data.clear();
            self.data_len = 0;
            return item;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_str(), ""),
        };
        match field {
            "event" => self.event = value.to_string(),
            "data" => {
                // The data joined with `\n` is what goes on as one message.
                let add = value.len() + usize::from(!self.data.is_empty() || self.dropping.is_some());
                if let Some((n, head)) = self.dropping.as_mut() {
                    *n += add;
                    let room = crate::bridge::framing::HEAD.saturating_sub(head.len());
                    if room > 0 {
                        head.push(b'\n');
                        head.extend_from_slice(&value.as_bytes()[..value.len().min(room - 1)]);
                    }
                } else if self.data_len + add > self.max {
                    let mut head = Vec::new();
                    for (i, part) in self.data.iter().map(String::as_str).chain([value]).enumerate() {
                        if i > 0 {
                            head.push(b'\n');
                        }
                        head.extend_from_slice(&part.as_bytes()[..part.len().min(crate::bridge::framing::HEAD)]);
                        if head.len() >= crate::bridge::framing::HEAD {
                            break;
                        }
                    }
                    head.truncate(crate::bridge::framing::HEAD);
                    self.dropping = Some((self.data_len + add, head));
                    self.data = Vec::new();
                    self.data_len = 0;
                } else {
                    self.data.push(value.to_string());
                    self.data_len += add;
                }
            }
            _ => {}
        }
        None
    }
}

fn headers_from_env() -> anyhow::Result<reqwest::header::HeaderMap> {
    let mut map = reqwest::header::HeaderMap::new();
    let Ok(raw) = std::env::var(HEADERS_ENV) else { return Ok(map) };
    let parsed: BTreeMap<String, String> =
        serde_json::from_str(&raw).context("MCPBOX_UPSTREAM_HEADERS is not a JSON object of strings")?;
    for (k, v) in parsed {
        let name =
            reqwest::header::HeaderName::from_bytes(k.as_bytes()).with_context(|| format!("header name {k:?}"))?;
        let value = reqwest::header::HeaderValue::from_str(&v).with_context(|| format!("value of header {k}"))?;
        map.insert(name, value);
    }
    Ok(map)
}

/// Entry point of the hidden subcommand: the URL is read from [`URL_ENV`]. `max_line`: the
/// most the bridge holds of one message or line from the upstream (`mcpbox.maxLineBytes`).
pub fn main(transport: Option<String>, max_line: Option<usize>) -> ExitCode {
    let url = match std::env::var(URL_ENV) {
        Ok(u) if !u.is_empty() => u,
        _ => {
            eprintln!("mcpbox url-bridge: {URL_ENV} is not set (mcpbox serve sets it; the URL never goes on the command line)");
            return ExitCode::from(2);
        }
    };
    let _ = URL_SEEN.set((url.clone(), redact(&url)));
    let rt = match crate::runtime("url-bridge", false) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let max = max_line.filter(|m| *m > 0).unwrap_or(crate::config::DEFAULT_MAX_LINE);
    let result = rt.block_on(run(url, transport, max));
    // Not a plain drop: that waits for the blocking read of stdin, which the supervisor keeps
    // open, so a bridge whose upstream had gone stayed alive instead of exiting.
    rt.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcpbox url-bridge: {}", scrub(format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

async fn run(url: String, transport: Option<String>, max: usize) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let transport = Transport::pick(transport.as_deref(), &url)?;
    // The upstream's credentials (headers, the URL's own key) go to its origin only: a redirect
    // is followed within that origin, never to another host, port or scheme (which a hostile
    // or compromised upstream could point at this host's own services or cloud metadata, with
    // the credentials along), and no Referer (it would carry the URL's key) is sent.
    let client = reqwest::Client::builder()
        .default_headers(headers_from_env()?)
        .connect_timeout(std::time::Duration::from_secs(15))
        .redirect(reqwest::redirect::Policy::custom(|attempt| {
            let from = attempt.previous().first().map(reqwest::Url::origin);
            if attempt.previous().len() >= 5 || from.as_ref() != Some(&attempt.url().origin()) {
                attempt.stop()
            } else {
                attempt.follow()
            }
        }))
        .referer(false)
        .build()
        .context("building the HTTP client")?;
    // Everything for stdout goes through one writer, one message per line.
    let (out_tx, mut out_rx) = mpsc::channel::<String>(256);
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(mut line) = out_rx.recv().await {
            line.retain(|c| c != '\n' && c != '\r');
            line.push('\n');
            if stdout.write_all(line.as_bytes()).await.is_err() || stdout.flush().await.is_err() {
                break;
            }
        }
    });
    let result = match transport {
        Transport::Streamable => streamable(client, url, out_tx, max).await,
        Transport::Sse => legacy_sse(client, url, out_tx, max).await,
    };
    // Let what is queued (e.g. the error answering a refused initialize) reach stdout; a
    // stream task still holding a sender must not keep us alive, hence the bound.
    let _ = tokio::time::timeout(std::time::Duration::from_millis(500), writer).await;
    result
}

/// What [`pump_sse`] saw of a stream.
#[derive(Default)]
struct Pumped {
    /// A message answering the request it was given was forwarded.
    answered: bool,
    /// Events discarded for their size.
    dropped: usize,
}

/// Forward the `message` events (or all data-only events) of an SSE body to stdout, holding at
/// most `max` bytes of a line or an event: a longer event is discarded (logged, and the client
/// told), a longer line ends the stream with an error. `request`: the id of the request whose
/// answer the stream carries, if any.
async fn pump_sse(
    resp: reqwest::Response,
    max: usize,
    out: &mpsc::Sender<String>,
    on_endpoint: Option<tokio::sync::oneshot::Sender<String>>,
    state: Option<&Arc<Mutex<StreamState>>>,
    request: Option<&serde_json::Value>,
) -> (Pumped, anyhow::Result<()>) {
    let shown = redact(resp.url().as_str());
    let mut parser = SseParser::new(max);
    let mut body = resp.bytes_stream();
    let mut on_endpoint = on_endpoint;
    let mut seen = Pumped::default();
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                let e = anyhow::Error::new(e.without_url()).context("reading the upstream's event stream");
                return (seen, Err(e));
            }
        };
        for item in parser.push(&chunk) {
            let ev = match item {
                SseItem::Event(ev) => ev,
                SseItem::Dropped { event, bytes, head } => {
                    seen.dropped += 1;
                    let what = format!(
                        "mcpbox discarded a {bytes}-byte event from the upstream (longer than mcpbox.maxLineBytes, {max} bytes)"
                    );
                    eprintln!("mcpbox url-bridge: {shown}: {what}");
                    let note = serde_json::json!({"jsonrpc": "2.0", "method": "notifications/message", "params": {
                        "level": "error", "logger": "mcpbox", "data": what}});
                    let mut msgs = vec![note];
                    // An answer (its opening names an id and no method) fails its request
                    // rather than leave it waiting, as a server's over-long stdout line does.
                    let o = crate::bridge::router::opening(&head);
                    if let (Some(id), false, "message") = (o.id, o.method, event.as_str()) {
                        seen.answered |= request == Some(&id);
                        msgs.push(
                            serde_json::json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32603, "message": what}}),
                        );
                    }
                    for m in msgs {
                        if out.send(m.to_string()).await.is_err() {
                            return (seen, Ok(()));
                        }
                    }
                    continue;
                }
                SseItem::LineTooLong => {
                    let e = anyhow::anyhow!(
                        "the upstream's event stream has a line longer than mcpbox.maxLineBytes ({max} bytes); stream ended"
                    );
                    return (seen, Err(e));
                }
            };
            match ev.event.as_str() {
                "endpoint" => {
                    if let Some(tx) = on_endpoint.take() {
                        let _ = tx.send(ev.data);
                    }
                }
                "message" if !ev.data.trim().is_empty() => {
                    if state.is_some() || request.is_some() {
                        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&ev.data) {
                            if let Some(st) = state {
                                remember_protocol(st, &v);
                            }
                            seen.answered |= request.is_some_and(|id| answers(&v, id));
                        }
                    }
                    if out.send(ev.data).await.is_err() {
                        return (seen, Ok(()));
                    }
                }
                _ => {}
            }
        }
    }
    (seen, Ok(()))
}

/// Whether `msg` (a message or a batch) holds the answer to request `id`.
fn answers(msg: &serde_json::Value, id: &serde_json::Value) -> bool {
    match msg {
        serde_json::Value::Array(items) => items.iter().any(|m| answers(m, id)),
        m => m.get("method").is_none() && m.get("id") == Some(id),
    }
}

/// At most `max` bytes of `resp`'s body, and whether there was more (then no more is read).
async fn body_capped(resp: reqwest::Response, max: usize) -> anyhow::Result<(Vec<u8>, bool)> {
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Ok((Vec::new(), true));
    }
    let mut kept = Vec::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| e.without_url())?;
        if kept.len() + chunk.len() > max {
            let room = max - kept.len();
            kept.extend_from_slice(&chunk[..room]);
            return Ok((kept, true));
        }
        kept.extend_from_slice(&chunk);
    }
    Ok((kept, false))
}

async fn stdin_lines() -> tokio::io::Lines<BufReader<tokio::io::Stdin>> {
    BufReader::new(tokio::io::stdin()).lines()
}

struct StreamState {
    session: Option<String>,
    protocol: Option<String>,
    get_started: bool,
}

async fn streamable(client: reqwest::Client, url: String, out: mpsc::Sender<String>, max: usize) -> anyhow::Result<()> {
    let state = Arc::new(Mutex::new(StreamState { session: None, protocol: None, get_started: false }));
    let mut lines = stdin_lines().await;
    let mut tasks = tokio::task::JoinSet::new();
    while let Some(line) = lines.next_line().await.context("reading stdin")? {
        if line.trim().is_empty() {
            continue;
        }
        let msg: serde_json::Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("mcpbox url-bridge: ignoring a line that is not JSON: {e}");
                continue;
            }
        };
        let is_initialize = msg.get("method").and_then(|m| m.as_str()) == Some("initialize");
        let (client, url, out, state) = (client.clone(), url.clone(), out.clone(), state.clone());
        // Initialize first, alone: every later request needs the session id it brings.
        let task = async move { post_streamable(&client, &url, msg, &out, &state, max).await };
        if is_initialize {
            if let Err(e) = task.await {
                eprintln!("mcpbox url-bridge: initialize: {}", scrub(format!("{e:#}")));
                bail!("the upstream did not accept initialize");
            }
        } else {
            tasks.spawn(async move {
                if let Err(e) = task.await {
                    eprintln!("mcpbox url-bridge: {}", scrub(format!("{e:#}")));
                }
            });
        }
        while tasks.try_join_next().is_some() {}
    }
    // The client side is gone: end the upstream session (best effort).
    let session = state.lock().unwrap_or_else(|e| e.into_inner()).session.clone();
    if let Some(sid) = session {
        let _ = client.delete(&url).header("mcp-session-id", sid).send().await;
    }
    Ok(())
}

async fn post_streamable(
    client: &reqwest::Client,
    url: &str,
    msg: serde_json::Value,
    out: &mpsc::Sender<String>,
    state: &Arc<Mutex<StreamState>>,
    max: usize,
) -> anyhow::Result<()> {
    let id = msg.get("id").cloned();
    let is_request = id.is_some() && msg.get("method").is_some();
    let (session, protocol) = {
        let s = state.lock().unwrap_or_else(|e| e.into_inner());
        (s.session.clone(), s.protocol.clone())
    };
    let mut req = client
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(msg.to_string());
    if let Some(s) = &session {
        req = req.header("mcp-session-id", s);
    }
    if let Some(p) = &protocol {
        req = req.header("mcp-protocol-version", p);
    }
    let request = id.clone().filter(|_| is_request);
    let answer_error = |why: String| async move {
        if let (true, Some(id)) = (is_request, id) {
            let e = serde_json::json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32603, "message": why}});
            let _ = out.send(e.to_string()).await;
        }
    };
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            // The error's text names the URL, key and all: the client (any principal) is told
            // what failed, not where.
            let e = e.without_url();
            answer_error(format!("upstream unreachable: {}", scrub(&e))).await;
            return Err(e.into());
        }
    };
    if let Some(sid) = resp.headers().get("mcp-session-id").and_then(|v| v.to_str().ok()) {
        state.lock().unwrap_or_else(|e| e.into_inner()).session = Some(sid.to_string());
    }
    let status = resp.status();
    if status == reqwest::StatusCode::ACCEPTED {
        return Ok(());
    }
    if !status.is_success() {
        // Only the opening is shown: no more is read.
        let (text, _) = body_capped(resp, 800).await.unwrap_or_default();
        let short: String = String::from_utf8_lossy(&text).chars().take(200).collect();
        answer_error(format!("upstream answered HTTP {status}: {short}")).await;
        bail!("upstream answered HTTP {status}");
    }
    let ctype = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    if ctype.starts_with("text/event-stream") {
        let (seen, result) = pump_sse(resp, max, out, None, Some(state), request.as_ref()).await;
        // An answer discarded for its size, or a stream that failed before the answer: the
        // request is answered with the error rather than left waiting.
        if !seen.answered {
            if let Err(e) = &result {
                answer_error(scrub(format!("{e:#}"))).await;
            } else if seen.dropped > 0 {
                answer_error(format!(
                    "the upstream's answer was discarded: longer than mcpbox.maxLineBytes ({max} bytes)"
                ))
                .await;
            }
        }
        result?;
    } else {
        let (body, more) = body_capped(resp, max).await.context("reading the upstream's answer")?;
        if more {
            let what = format!("the upstream's answer is longer than mcpbox.maxLineBytes ({max} bytes); discarded");
            answer_error(what.clone()).await;
            bail!("{}: {what}", redact(url));
        }
        let body = String::from_utf8_lossy(&body).into_owned();
        if !body.trim().is_empty() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) {
                remember_protocol(state, &v);
            }
            let _ = out.send(body).await;
        }
    }
    maybe_open_get_stream(client, url, out, state, max);
    Ok(())
}

/// Remember the protocol version the initialize result negotiated (sent on later requests).
fn remember_protocol(state: &Arc<Mutex<StreamState>>, msg: &serde_json::Value) {
    if let Some(p) = msg.pointer("/result/protocolVersion").and_then(|p| p.as_str()) {
        state.lock().unwrap_or_else(|e| e.into_inner()).protocol = Some(p.to_string());
    }
}

/// Once a session exists, listen for what the server sends on its own (405: not offered).
fn maybe_open_get_stream(
    client: &reqwest::Client,
    url: &str,
    out: &mpsc::Sender<String>,
    state: &Arc<Mutex<StreamState>>,
    max: usize,
) {
    let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
    let Some(sid) = s.session.clone() else { return };
    if s.get_started || s.protocol.is_none() {
        return;
    }
    s.get_started = true;
    let protocol = s.protocol.clone();
    drop(s);
    let (client, url, out) = (client.clone(), url.to_string(), out.clone());
    tokio::spawn(async move {
        let mut req = client.get(&url).header("accept", "text/event-stream").header("mcp-session-id", sid);
        if let Some(p) = protocol {
            req = req.header("mcp-protocol-version", p);
        }
        if let Ok(resp) = req.send().await {
            if resp.status().is_success() {
                let shown = redact(resp.url().as_str());
                if let (_, Err(e)) = pump_sse(resp, max, &out, None, None, None).await {
                    eprintln!("mcpbox url-bridge: {shown}: {}", scrub(format!("{e:#}")));
                }
            }
        }
    });
}

async fn legacy_sse(client: reqwest::Client, url: String, out: mpsc::Sender<String>, max: usize) -> anyhow::Result<()> {
    let resp =
        client.get(&url).header("accept", "text/event-stream").send().await.context("connecting to the upstream")?;
    if !resp.status().is_success() {
        bail!("upstream answered HTTP {} to GET {}", resp.status(), redact(&url));
    }
    let (ep_tx, ep_rx) = tokio::sync::oneshot::channel();
    let out2 = out.clone();
    let stream = tokio::spawn(async move { pump_sse(resp, max, &out2, Some(ep_tx), None, None).await.1 });
    let endpoint = match tokio::time::timeout(std::time::Duration::from_secs(15), ep_rx).await {
        Err(_) => bail!("the upstream sent no endpoint event"),
        Ok(Ok(ep)) => ep,
        Ok(Err(_)) => match stream.await {
            Ok(Err(e)) => return Err(e.context("the upstream's stream failed before its endpoint event")),
            _ => bail!("the upstream's stream ended before its endpoint event"),
        },
    };
    let base = reqwest::Url::parse(&url).context("upstream url")?;
    let post_url = base.join(endpoint.trim()).context("the upstream's endpoint")?;
    // Messages (and the configured headers) go to the upstream's own origin, as MCP's SSE
    // clients require: an endpoint elsewhere is the upstream pointing mcpbox at someone else.
    if post_url.origin() != base.origin() {
        bail!(
            "the upstream's endpoint is on another origin ({}); refused: messages and credentials go to the configured upstream only",
            redact(post_url.as_str())
        );
    }
    let mut lines = stdin_lines().await;
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line.context("reading stdin")? else { break };
                if line.trim().is_empty() {
                    continue;
                }
                let r = client.post(post_url.clone()).header("content-type", "application/json").body(line).send().await;
                match r {
                    Ok(r) if r.status().is_success() => {}
                    Ok(r) => eprintln!("mcpbox url-bridge: upstream answered HTTP {} to a message", r.status()),
                    Err(e) => eprintln!("mcpbox url-bridge: posting to the upstream: {}", scrub(e)),
                }
            }
            _ = stream_finished(&stream) => {
                // The stream's own error (an over-long line …) says more than that it ended.
                match stream.await {
                    Ok(Err(e)) => return Err(e),
                    _ => bail!("the upstream closed its event stream"),
                }
            }
        }
    }
    stream.abort();
    Ok(())
}

async fn stream_finished(h: &tokio::task::JoinHandle<anyhow::Result<()>>) {
    while !h.is_finished() {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacted_urls_keep_no_query_and_no_user_info() {
        assert_eq!(redact("https://h.example:8443/mcp?api_key=SECRET#x"), "https://h.example:8443/mcp?…");
        assert_eq!(redact("https://user:pw@h.example/sse"), "https://h.example/sse");
        assert_eq!(redact("http://127.0.0.1:9/ev/mcp"), "http://127.0.0.1:9/ev/mcp");
        let _ = URL_SEEN.set(("http://127.0.0.1:9/a?k=SECRET".into(), redact("http://127.0.0.1:9/a?k=SECRET")));
        assert!(!scrub("error sending request for url (http://127.0.0.1:9/a?k=SECRET)").contains("SECRET"));
    }

    fn ev(event: &str, data: &str) -> SseItem {
        SseItem::Event(SseEvent { event: event.into(), data: data.into() })
    }

    #[test]
    fn sse_parser_handles_split_chunks_and_multiline_data() {
        let mut p = SseParser::new(1 << 20);
        assert!(p.push(b"event: endpoint\r\ndata: /m?sess").is_empty());
        let items = p.push(b"ionId=1\r\n\r\n: comment\n\ndata: {\"a\":\ndata: 1}\n\n");
        assert_eq!(items, vec![ev("endpoint", "/m?sessionId=1"), ev("message", "{\"a\":\n1}")]);
        // Byte by byte, the same.
        let mut p = SseParser::new(1 << 20);
        let mut items = Vec::new();
        for b in b"event: endpoint\r\ndata: /m?sessionId=1\r\n\r\ndata: {\"a\":\ndata: 1}\n\n" {
            items.extend(p.push(std::slice::from_ref(b)));
        }
        assert_eq!(items, vec![ev("endpoint", "/m?sessionId=1"), ev("message", "{\"a\":\n1}")]);
    }

    /// An event whose data passes the limit (in many short lines, so no line does) is dropped,
    /// reported with its length, and the next event comes through; the parser never holds more
    /// than the limit of it, fed ten times the limit in pieces that split lines anywhere.
    #[test]
    fn sse_parser_drops_an_over_long_event_holding_at_most_the_limit_and_goes_on() {
        const MAX: usize = 1000;
        let mut stream = Vec::new();
        stream.extend_from_slice(b"data: {\"first\":1}\n\n");
        let value = "x".repeat(70);
        let mut lines = 0;
        while lines * 70 < 10 * MAX {
            stream.extend_from_slice(format!("data: {value}\r\n").as_bytes());
            lines += 1;
        }
        stream.extend_from_slice(b"\r\nevent: message\ndata: {\"next\":2}\n\n");
        for piece in [1, 7, 64, 999, 4096] {
            let mut p = SseParser::new(MAX);
            let mut items = Vec::new();
            for chunk in stream.chunks(piece) {
                items.extend(p.push(chunk));
                assert!(p.buf.len() <= MAX + 1 && p.data_len <= MAX, "holds {} + {}", p.buf.len(), p.data_len);
                assert!(p.held() <= 2 * MAX + 1);
            }
            // The data's length as it would have been sent: the values joined by newlines.
            let dropped = lines * 70 + lines - 1;
            let head = format!("{value}\n").repeat(20).into_bytes()[..1024].to_vec();
            let gone = SseItem::Dropped { event: "message".into(), bytes: dropped, head };
            assert_eq!(items, vec![ev("message", "{\"first\":1}"), gone, ev("message", "{\"next\":2}")]);
            assert_eq!(p.held(), 0);
        }
        // Exactly the limit passes; one byte more does not.
        let mut p = SseParser::new(16);
        let items = p.push(b"data: 0123456\ndata: 89abcdef\n\ndata: 0123456\ndata: 89abcdefg\n\n");
        let gone = SseItem::Dropped { event: "message".into(), bytes: 17, head: b"0123456\n89abcdefg".to_vec() };
        assert_eq!(items, vec![ev("message", "0123456\n89abcdef"), gone]);
    }

    /// Streams of events of every size around the limit, with `\n` or `\r\n` line ends and
    /// comments, cut into pieces of random sizes: each event within the limit comes out whole,
    /// each over it is reported dropped with its length, in order, and the parser never holds
    /// more than the limit of a line plus the limit of an event.
    #[test]
    fn sse_parser_gives_the_same_events_however_the_stream_is_cut() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        const MAX: usize = 300;
        for _ in 0..200 {
            let (mut stream, mut want) = (Vec::new(), Vec::new());
            for e in 0..rand(8) + 1 {
                let end: &[u8] = if rand(2) == 0 { b"\n" } else { b"\r\n" };
                if rand(3) == 0 {
                    stream.extend_from_slice(b": keep-alive");
                    stream.extend_from_slice(end);
                }
                let lines: Vec<String> =
                    (0..rand(6) + 1).map(|l| format!("{e}-{l}:{}", "d".repeat(rand(150)))).collect();
                for l in &lines {
                    stream.extend_from_slice(format!("data: {l}").as_bytes());
                    stream.extend_from_slice(end);
                }
                stream.extend_from_slice(end);
                let data = lines.join("\n");
                want.push(if data.len() <= MAX {
                    ev("message", &data)
                } else {
                    let head = data.as_bytes()[..data.len().min(crate::bridge::framing::HEAD)].to_vec();
                    SseItem::Dropped { event: "message".into(), bytes: data.len(), head }
                });
            }
            let mut p = SseParser::new(MAX);
            let (mut got, mut rest) = (Vec::new(), &stream[..]);
            while !rest.is_empty() {
                let (piece, more) = rest.split_at((rand(400) + 1).min(rest.len()));
                got.extend(p.push(piece));
                assert!(p.buf.len() <= MAX + 1 && p.data_len <= MAX);
                rest = more;
            }
            assert_eq!(got, want, "{}", String::from_utf8_lossy(&stream));
            assert_eq!(p.held(), 0);
        }
    }

    /// A line that does not end within the limit ends the stream, whatever follows, and the
    /// parser holds no more than the limit while it comes.
    #[test]
    fn sse_parser_refuses_an_endless_line_holding_at_most_the_limit() {
        const MAX: usize = 1000;
        for first in [&b"data: "[..], b": a comment that never ends ", b"event: "] {
            let mut p = SseParser::new(MAX);
            let mut items = p.push(b"data: 1\n\n");
            items.extend(p.push(first));
            let mut fed = 0;
            while fed < 10 * MAX && !items.contains(&SseItem::LineTooLong) {
                items.extend(p.push(&[b'y'; 97]));
                fed += 97;
                assert!(p.held() <= MAX + 1, "holds {}", p.held());
            }
            assert_eq!(items, vec![ev("message", "1"), SseItem::LineTooLong]);
            assert!(fed <= MAX + 97, "refused only after {fed} bytes");
            // Nothing after it is parsed, nor held.
            assert!(p.push(b"\n\ndata: 2\n\n").is_empty());
            assert_eq!(p.held(), 0);
        }
        // A line of exactly the limit, ended by `\r\n`, is a line.
        let mut p = SseParser::new(8);
        assert_eq!(p.push(b"data: ab\r\n\r\n"), vec![ev("message", "ab")]);
        assert_eq!(p.push(b"data: abc\r\n"), vec![SseItem::LineTooLong]);
    }

    #[test]
    fn transport_is_configured_or_guessed() {
        assert_eq!(Transport::pick(None, "https://x.example/sse?key=1").unwrap(), Transport::Sse);
        assert_eq!(Transport::pick(None, "https://x.example/mcp").unwrap(), Transport::Streamable);
        assert_eq!(Transport::pick(Some("streamable-http"), "https://x.example/sse").unwrap(), Transport::Streamable);
        assert!(Transport::pick(Some("websocket"), "https://x.example/").is_err());
    }
}

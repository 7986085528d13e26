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

/// Incremental `text/event-stream` parser (fields `event` and `data`; others ignored).
#[derive(Default)]
pub struct SseParser {
    buf: Vec<u8>,
    event: String,
    data: Vec<String>,
}

impl SseParser {
    pub fn push(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=i).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            if line.is_empty() {
                if !self.data.is_empty() {
                    let event =
                        if self.event.is_empty() { "message".to_string() } else { std::mem::take(&mut self.event) };
                    out.push(SseEvent { event, data: self.data.join("\n") });
                }
                self.event.clear();
                self.data.clear();
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f.to_string(), v.strip_prefix(' ').unwrap_or(v).to_string()),
                None => (line.clone(), String::new()),
            };
            match field.as_str() {
                "event" => self.event = value,
                "data" => self.data.push(value),
                _ => {}
            }
        }
        out
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

/// Entry point of the hidden subcommand: the URL is read from [`URL_ENV`].
pub fn main(transport: Option<String>) -> ExitCode {
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
    match rt.block_on(run(url, transport)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcpbox url-bridge: {}", scrub(format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

async fn run(url: String, transport: Option<String>) -> anyhow::Result<()> {
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
        Transport::Streamable => streamable(client, url, out_tx).await,
        Transport::Sse => legacy_sse(client, url, out_tx).await,
    };
    // Let what is queued (e.g. the error answering a refused initialize) reach stdout; a
    // stream task still holding a sender must not keep us alive, hence the bound.
    let _ = tokio::time::timeout(std::time::Duration::from_millis(500), writer).await;
    result
}

/// Forward the `message` events (or all data-only events) of an SSE body to stdout.
async fn pump_sse(
    resp: reqwest::Response,
    out: &mpsc::Sender<String>,
    on_endpoint: Option<tokio::sync::oneshot::Sender<String>>,
    state: Option<&Arc<Mutex<StreamState>>>,
) -> anyhow::Result<()> {
    let mut parser = SseParser::default();
    let mut body = resp.bytes_stream();
    let mut on_endpoint = on_endpoint;
    while let Some(chunk) = body.next().await {
        for ev in parser.push(&chunk.context("reading the upstream's event stream")?) {
            match ev.event.as_str() {
                "endpoint" => {
                    if let Some(tx) = on_endpoint.take() {
                        let _ = tx.send(ev.data);
                    }
                }
                "message" if !ev.data.trim().is_empty() => {
                    if let Some(st) = state {
                        remember_protocol(st, &ev.data);
                    }
                    if out.send(ev.data).await.is_err() {
                        return Ok(());
                    }
                }
                _ => {}
            }
        }
    }
    Ok(())
}

async fn stdin_lines() -> tokio::io::Lines<BufReader<tokio::io::Stdin>> {
    BufReader::new(tokio::io::stdin()).lines()
}

struct StreamState {
    session: Option<String>,
    protocol: Option<String>,
    get_started: bool,
}

async fn streamable(client: reqwest::Client, url: String, out: mpsc::Sender<String>) -> anyhow::Result<()> {
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
        let task = async move { post_streamable(&client, &url, msg, &out, &state).await };
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
        let text = resp.text().await.unwrap_or_default();
        let short: String = text.chars().take(200).collect();
        answer_error(format!("upstream answered HTTP {status}: {short}")).await;
        bail!("upstream answered HTTP {status}");
    }
    let ctype = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    if ctype.starts_with("text/event-stream") {
        pump_sse(resp, out, None, Some(state)).await?;
    } else {
        let body = resp.text().await.context("reading the upstream's answer")?;
        if !body.trim().is_empty() {
            remember_protocol(state, &body);
            let _ = out.send(body).await;
        }
    }
    maybe_open_get_stream(client, url, out, state);
    Ok(())
}

/// Remember the protocol version the initialize result negotiated (sent on later requests).
fn remember_protocol(state: &Arc<Mutex<StreamState>>, body: &str) {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(body) {
        if let Some(p) = v.pointer("/result/protocolVersion").and_then(|p| p.as_str()) {
            state.lock().unwrap_or_else(|e| e.into_inner()).protocol = Some(p.to_string());
        }
    }
}

/// Once a session exists, listen for what the server sends on its own (405: not offered).
fn maybe_open_get_stream(
    client: &reqwest::Client,
    url: &str,
    out: &mpsc::Sender<String>,
    state: &Arc<Mutex<StreamState>>,
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
                let _ = pump_sse(resp, &out, None, None).await;
            }
        }
    });
}

async fn legacy_sse(client: reqwest::Client, url: String, out: mpsc::Sender<String>) -> anyhow::Result<()> {
    let resp =
        client.get(&url).header("accept", "text/event-stream").send().await.context("connecting to the upstream")?;
    if !resp.status().is_success() {
        bail!("upstream answered HTTP {} to GET {}", resp.status(), redact(&url));
    }
    let (ep_tx, ep_rx) = tokio::sync::oneshot::channel();
    let out2 = out.clone();
    let stream = tokio::spawn(async move { pump_sse(resp, &out2, Some(ep_tx), None).await });
    let endpoint = tokio::time::timeout(std::time::Duration::from_secs(15), ep_rx)
        .await
        .context("the upstream sent no endpoint event")?
        .context("the upstream's stream ended before its endpoint event")?;
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
            _ = stream_finished(&stream) => bail!("the upstream closed its event stream"),
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

    #[test]
    fn sse_parser_handles_split_chunks_and_multiline_data() {
        let mut p = SseParser::default();
        assert!(p.push(b"event: endpoint\r\ndata: /m?sess").is_empty());
        let ev = p.push(b"ionId=1\r\n\r\n: comment\n\ndata: {\"a\":\ndata: 1}\n\n");
        assert_eq!(
            ev,
            vec![
                SseEvent { event: "endpoint".into(), data: "/m?sessionId=1".into() },
                SseEvent { event: "message".into(), data: "{\"a\":\n1}".into() },
            ]
        );
    }

    #[test]
    fn transport_is_configured_or_guessed() {
        assert_eq!(Transport::pick(None, "https://x.example/sse?key=1").unwrap(), Transport::Sse);
        assert_eq!(Transport::pick(None, "https://x.example/mcp").unwrap(), Transport::Streamable);
        assert_eq!(Transport::pick(Some("streamable-http"), "https://x.example/sse").unwrap(), Transport::Streamable);
        assert!(Transport::pick(Some("websocket"), "https://x.example/").is_err());
    }
}

//! A legacy-SSE client transport (MCP 2024-11-05 HTTP+SSE) for the rmcp service loop: the
//! `GET` stream's first event (`endpoint`) names where to `POST`, its `message` events are the
//! server's messages, and every client message is one `POST` answered `202`.
//!
//! The endpoint must be on the same origin as the stream: a server naming another host does
//! not get the token sent there.

use std::pin::Pin;

use futures::{Sink, StreamExt};
use rmcp::service::{RxJsonRpcMessage, TxJsonRpcMessage};
use rmcp::RoleClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

pub type Transport = (
    Pin<Box<dyn Sink<TxJsonRpcMessage<RoleClient>, Error = std::io::Error> + Send>>,
    UnboundedReceiverStream<RxJsonRpcMessage<RoleClient>>,
);

/// `scheme://host[:port]` of an absolute http(s) URL.
fn origin(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"))?;
    let end = rest.find('/').unwrap_or(rest.len());
    Some(&url[..url.len() - rest.len() + end])
}

pub async fn connect(url: &str, token: Option<&str>) -> Result<Transport, String> {
    let base = origin(url).ok_or_else(|| format!("{url}: not an http(s) URL"))?.to_string();
    let http = reqwest::Client::new();
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut get = http.get(url).header("accept", "text/event-stream");
    if let Some(a) = &auth {
        get = get.header("authorization", a);
    }
    let resp = get.send().await.map_err(|e| format!("GET {url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("GET {url}: HTTP {}", resp.status()));
    }
    let mut events = sse_stream::SseStream::from_bytes_stream(resp.bytes_stream());
    let endpoint = loop {
        match events.next().await {
            Some(Ok(ev)) if ev.event.as_deref() == Some("endpoint") => break ev.data.unwrap_or_default(),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(format!("GET {url}: {e}")),
            None => return Err(format!("GET {url}: the stream ended before its endpoint event")),
        }
    };
    let post_url = if endpoint.starts_with('/') {
        format!("{base}{endpoint}")
    } else if origin(&endpoint) == Some(base.as_str()) {
        endpoint
    } else {
        return Err(format!("endpoint {endpoint:?} is not on {base}"));
    };

    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(ev) = events.next().await {
            let Ok(ev) = ev else { return };
            if ev.event.as_deref().unwrap_or("message") != "message" {
                continue;
            }
            let data = ev.data.unwrap_or_default();
            match serde_json::from_str(&data) {
                Ok(m) => {
                    if tx.send(m).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    eprintln!("mcpbox-rmcp-client: undecodable SSE message ({e}): {data}");
                    return;
                }
            }
        }
    });
    let sink = futures::sink::unfold(
        (http, post_url, auth),
        |(http, url, auth), msg: TxJsonRpcMessage<RoleClient>| async move {
            let mut post = http.post(&url).header("content-type", "application/json");
            if let Some(a) = &auth {
                post = post.header("authorization", a);
            }
            let body = serde_json::to_vec(&msg).map_err(std::io::Error::other)?;
            let r = post.body(body).send().await.map_err(std::io::Error::other)?;
            if !r.status().is_success() {
                return Err(std::io::Error::other(format!("POST {url}: HTTP {}", r.status())));
            }
            Ok((http, url, auth))
        },
    );
    Ok((Box::pin(sink), UnboundedReceiverStream::new(rx)))
}

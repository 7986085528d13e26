//! mcpbox-rmcp-client: a small MCP client on the official Rust SDK (rmcp), for mcpbox's
//! integration tests (tests/rmcp_client.rs) and for trying an endpoint by hand.
//!
//! ```text
//! mcpbox-rmcp-client --url URL [--token TOKEN] [--transport streamable|sse]
//!                    [--mode initialize|discover|auto] [--call TOOL] [--args JSON]
//!                    [--sampling-reply TEXT] [--elicitation-reply JSON]
//! ```
//! It starts the client the way `--mode` says (`initialize`: the 2025 handshake, 2025-11-25;
//! `discover`: MCP 2026-07-28, `server/discover` and per-request `_meta`, no fallback; `auto`:
//! the SDK probes with `server/discover` and falls back to `initialize`), lists every tool,
//! calls `--call` with `--args` (a JSON object) if given, and prints one JSON object on stdout:
//! `{"transport", "mode", "protocolVersion", "serverInfo", "tools": [names], "call": result}`.
//! With `--sampling-reply` the client declares sampling and answers every
//! `sampling/createMessage` with that text (in 2026-07-28 this is an input-required round
//! trip, which the SDK's `call_tool` drives); with `--elicitation-reply` it declares (form)
//! elicitation and accepts every `elicitation/create` with that JSON object as the content.
//! Any failure: a message on stderr, exit status 1.
//!
//! `--transport sse` is legacy SSE (`GET …/sse`, `POST` to the endpoint it names): rmcp no
//! longer ships that client, so [`sse`] is a small one feeding the SDK's own service loop.

mod sse;

use std::future::Future;
use std::time::Duration;

// Sampling is deprecated by the 2026-07-28 specification (SEP-2577) but still in it, and 2025-era
// servers ask for it: this client answers it.
use rmcp::model::{CallToolRequestParams, ClientConfig, ElicitRequestParams, ElicitResult, ErrorData, ProtocolVersion};
#[allow(deprecated)]
use rmcp::model::{CreateMessageRequestParams, CreateMessageResult};
use rmcp::service::{MaybeSendFuture, RequestContext, RunningService};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{ClientHandler, ClientLifecycleMode, ClientServiceExt, RoleClient};
use serde_json::{json, Value};

struct Opts {
    url: String,
    token: Option<String>,
    transport: String,
    mode: String,
    call: Option<String>,
    args: serde_json::Map<String, Value>,
    sampling_reply: Option<String>,
    elicitation_reply: Option<Value>,
}

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        url: String::new(),
        token: None,
        transport: "streamable".into(),
        mode: "initialize".into(),
        call: None,
        args: serde_json::Map::new(),
        sampling_reply: None,
        elicitation_reply: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--url" => o.url = val()?,
            "--token" => o.token = Some(val()?),
            "--transport" => o.transport = val()?,
            "--mode" => o.mode = val()?,
            "--call" => o.call = Some(val()?),
            "--args" => {
                o.args = match serde_json::from_str(&val()?) {
                    Ok(Value::Object(m)) => m,
                    _ => return Err("--args must be a JSON object".into()),
                }
            }
            "--sampling-reply" => o.sampling_reply = Some(val()?),
            "--elicitation-reply" => match serde_json::from_str(&val()?) {
                Ok(v @ Value::Object(_)) => o.elicitation_reply = Some(v),
                _ => return Err("--elicitation-reply must be a JSON object".into()),
            },
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    if o.url.is_empty() {
        return Err("--url is required".into());
    }
    if !["streamable", "sse"].contains(&o.transport.as_str()) {
        return Err(format!("--transport {}: streamable or sse", o.transport));
    }
    Ok(o)
}

/// The client's side: its capabilities, and the answer to a server's sampling request.
#[derive(Clone)]
struct Handler {
    sampling_reply: Option<String>,
    elicitation_reply: Option<Value>,
}

impl ClientHandler for Handler {
    fn get_info(&self) -> ClientConfig {
        let mut caps = json!({});
        if self.sampling_reply.is_some() {
            caps["sampling"] = json!({});
        }
        if self.elicitation_reply.is_some() {
            caps["elicitation"] = json!({"form": {}});
        }
        serde_json::from_value(json!({
            "protocolVersion": ProtocolVersion::LATEST_WITH_INITIALIZE,
            "capabilities": caps,
            "clientInfo": {"name": "mcpbox-rmcp-client", "version": env!("CARGO_PKG_VERSION")},
        }))
        .expect("a valid ClientConfig")
    }

    #[allow(deprecated)]
    fn create_message(
        &self,
        _params: CreateMessageRequestParams,
        _context: RequestContext<RoleClient>,
    ) -> impl Future<Output = Result<CreateMessageResult, ErrorData>> + MaybeSendFuture + '_ {
        let r = match &self.sampling_reply {
            Some(text) => serde_json::from_value(json!({
                "model": "mcpbox-rmcp-client",
                "role": "assistant",
                "content": {"type": "text", "text": text},
                "stopReason": "endTurn",
            }))
            .map_err(|e| ErrorData::internal_error(e.to_string(), None)),
            None => Err(ErrorData::invalid_request("this client does not sample", None)),
        };
        std::future::ready(r)
    }

    fn create_elicitation(
        &self,
        _request: ElicitRequestParams,
        _context: RequestContext<RoleClient>,
    ) -> impl Future<Output = Result<ElicitResult, ErrorData>> + MaybeSendFuture + '_ {
        let action = if self.elicitation_reply.is_some() { "accept" } else { "decline" };
        let mut r = json!({ "action": action });
        if let Some(content) = &self.elicitation_reply {
            r["content"] = content.clone();
        }
        std::future::ready(serde_json::from_value(r).map_err(|e| ErrorData::internal_error(e.to_string(), None)))
    }
}

fn lifecycle(mode: &str) -> Result<ClientLifecycleMode, String> {
    Ok(match mode {
        "initialize" => ClientLifecycleMode::Initialize,
        "discover" => ClientLifecycleMode::Discover { preferred_versions: vec![ProtocolVersion::V_2026_07_28] },
        "auto" => ClientLifecycleMode::Auto {
            preferred_versions: vec![ProtocolVersion::V_2026_07_28],
            legacy_version: Some(ProtocolVersion::V_2025_11_25),
        },
        m => return Err(format!("--mode {m}: initialize, discover or auto")),
    })
}

async fn run(o: Opts) -> Result<Value, String> {
    let handler = Handler { sampling_reply: o.sampling_reply.clone(), elicitation_reply: o.elicitation_reply.clone() };
    let mode = lifecycle(&o.mode)?;
    let start = async {
        match o.transport.as_str() {
            "sse" => {
                let t = sse::connect(&o.url, o.token.as_deref()).await?;
                handler.serve_with_lifecycle(t, mode).await.map_err(|e| format!("start ({}): {e}", o.mode))
            }
            _ => {
                let mut cfg = StreamableHttpClientTransportConfig::with_uri(o.url.as_str());
                if let Some(t) = &o.token {
                    cfg = cfg.auth_header(t.clone());
                }
                let t = StreamableHttpClientTransport::from_config(cfg);
                handler.serve_with_lifecycle(t, mode).await.map_err(|e| format!("start ({}): {e}", o.mode))
            }
        }
    };
    let client: RunningService<RoleClient, Handler> =
        tokio::time::timeout(Duration::from_secs(60), start).await.map_err(|_| "start: timed out after 60 s")??;
    let info = client.peer_info().ok_or("no server info after start")?;
    let info = serde_json::to_value(&*info).map_err(|e| e.to_string())?;

    let tools = client.list_all_tools().await.map_err(|e| format!("tools/list: {e}"))?;
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    let mut out = json!({
        "transport": o.transport,
        "mode": o.mode,
        "protocolVersion": info["protocolVersion"],
        "serverInfo": info["serverInfo"],
        "tools": names,
    });
    if let Some(name) = &o.call {
        let params = CallToolRequestParams::new(name.clone()).with_arguments(o.args.clone());
        let r = client.call_tool(params).await.map_err(|e| format!("tools/call {name}: {e}"))?;
        out["call"] = serde_json::to_value(r).map_err(|e| e.to_string())?;
    }
    let _ = client.cancel().await;
    Ok(out)
}

fn main() {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("mcpbox-rmcp-client: {e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
    match rt.block_on(run(o)) {
        Ok(v) => println!("{v}"),
        Err(e) => {
            eprintln!("mcpbox-rmcp-client: {e}");
            std::process::exit(1);
        }
    }
}

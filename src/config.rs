//! `mcpbox.json`: parse, expand `${VAR}`, validate.
//!
//! The format is a superset of TBXark/mcp-proxy's: a config written for it loads unchanged.
//! Every error names the field (`mcpServers.fetch.env.API_KEY`) and says what is wrong.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::policy::PolicyRef;

pub const DEFAULT_MAX_BODY: usize = 16 << 20;
pub const DEFAULT_MAX_LINE: usize = 16 << 20;
/// What one session's outbox may hold (undelivered messages and the replay ring), in bytes.
pub const DEFAULT_SESSION_BUFFER: usize = 8 << 20;
/// What one server's input queue may hold (and a restarting shared server's waiting messages).
pub const DEFAULT_SERVER_INPUT: usize = 8 << 20;
pub const DEFAULT_IDLE: Duration = Duration::from_secs(600);
/// `maxSessions` of a server that does not set it; `0` in the config means no per-server limit.
pub const DEFAULT_MAX_SESSIONS: usize = 16;
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: usize = 64;
pub const DEFAULT_MAX_SESSIONS_TOTAL: usize = 256;
pub const DEFAULT_MAX_SANDBOXES: usize = 64;
/// Connections one sandbox's egress proxy serves at once (`mcpbox.maxEgressConnections`). An
/// MCP server that calls an API or fetches pages needs a handful at a time; 64 leaves room for
/// one that fans out (npm opens at most 15 per origin, uv 50 downloads at once, a browser 6
/// per host) while the most one sandbox can make mcpbox hold is 128 descriptors.
pub const DEFAULT_MAX_EGRESS_CONNECTIONS: usize = 64;
/// Memory all warm pools may hold together: 512 MiB (about ten warm processes of a Python and
/// a Node server each).
pub const DEFAULT_WARM_POOL_BYTES: u64 = 512 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: not valid JSON: {msg}")]
    Syntax { path: PathBuf, msg: String },
    /// A field is present but wrong; `field` is the dotted path.
    #[error("{field}: {msg}")]
    Field { field: String, msg: String },
}

fn field_err(field: impl Into<String>, msg: impl Into<String>) -> ConfigError {
    ConfigError::Field { field: field.into(), msg: msg.into() }
}

/// What the startup banner advertises (both transports are always served).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Sse,
    StreamableHttp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// A fresh sandboxed process per client session.
    Session,
    /// One process for all sessions, ids remapped per session.
    Shared,
    /// One process per principal (token) for stateless (2026-07-28) requests; a 2025-era
    /// session still gets a process of its own, as with `Session`.
    Principal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterMode {
    Allow,
    Block,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolFilter {
    pub mode: FilterMode,
    pub list: HashSet<String>,
}

impl ToolFilter {
    pub fn allows(&self, tool: &str) -> bool {
        match self.mode {
            FilterMode::Allow => self.list.contains(tool),
            FilterMode::Block => !self.list.contains(tool),
        }
    }
}

/// `baseURL`, split into what the edge checks need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    pub scheme: String,
    /// Host as written, lowercased, with brackets for IPv6, without port.
    pub host: String,
    pub port: Option<u16>,
    /// Path prefix without trailing slash: "" or "/mcp".
    pub path: String,
}

impl BaseUrl {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (scheme, rest) = s.split_once("://").ok_or("expected scheme://host[:port][/path]")?;
        let scheme = scheme.to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(format!("scheme {scheme:?} is not http or https"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err("expected a host (and no user info)".into());
        }
        let (host, port) = split_host_port(authority)?;
        let path = path.split(['?', '#']).next().unwrap_or("").trim_end_matches('/').to_string();
        // The edge matches request paths byte for byte and refuses `%`, dot and empty segments
        // (http::edge::decide); a prefix with them would be reachable only in that form.
        if path.contains('%') || path.split('/').skip(1).any(|s| s.is_empty() || s == "." || s == "..") {
            return Err(format!("the path {path:?} must be plain: no `%`, no `.` or `..` segments, no `//`"));
        }
        Ok(BaseUrl { scheme, host, port, path })
    }

    /// `scheme://host[:port]`, as a browser sends it in `Origin`.
    pub fn origin(&self) -> String {
        match self.port {
            Some(p) => format!("{}://{}:{}", self.scheme, self.host, p),
            None => format!("{}://{}", self.scheme, self.host),
        }
    }
}

/// Split `host[:port]` / `[v6]:port` with the policy's splitter ([`crate::policy::split_host_port`]);
/// the host is lowercased, an IPv6 address keeps its brackets (as `Host` headers write it).
pub fn split_host_port(s: &str) -> Result<(String, Option<u16>), String> {
    let (host, port) = crate::policy::split_host_port(s).map_err(|e| format!("`{s}`: {e}"))?;
    let host = if host.contains(':') { format!("[{host}]") } else { host.to_string() };
    Ok((host.to_ascii_lowercase(), port))
}

#[derive(Debug, Clone)]
pub struct Proxy {
    pub addr: SocketAddr,
    pub base_url: Option<BaseUrl>,
    pub name: String,
    pub version: String,
    pub transport: Transport,
    pub auth_tokens: Vec<String>,
    pub tool_filter: Option<ToolFilter>,
    pub log_enabled: bool,
}

#[derive(Debug, Clone)]
pub enum ServerKind {
    Stdio {
        command: String,
        args: Vec<String>,
        env: BTreeMap<String, String>,
    },
    /// A remote upstream (SSE / Streamable HTTP), served through the sandboxed url-bridge.
    Url {
        url: String,
        headers: BTreeMap<String, String>,
        transport_type: Option<String>,
    },
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub name: String,
    pub kind: ServerKind,
    /// `Some`: these tokens replace the global list for this server.
    pub auth_tokens: Option<Vec<String>>,
    pub tool_filter: Option<ToolFilter>,
    pub policy: PolicyRef,
    /// False when the config named no policy (`policy` is then `default`; npx/uvx servers get
    /// the runtime base on top, with a warning).
    pub policy_given: bool,
    pub isolation: Isolation,
    /// `None`: no per-server limit (`"maxSessions": 0`); the global budget still applies.
    pub max_sessions: Option<usize>,
    pub idle_timeout: Duration,
    pub timeout: Option<Duration>,
    pub disabled: bool,
    pub log_enabled: bool,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub proxy: Proxy,
    pub servers: BTreeMap<String, ServerConfig>,
    pub state_dir: Option<PathBuf>,
    pub uid_base: Option<u32>,
    pub max_body_bytes: usize,
    pub max_line_bytes: usize,
    pub session_buffer_bytes: usize,
    pub server_input_bytes: usize,
    pub allowed_origins: Vec<String>,
    pub allowed_hosts: Vec<String>,
    /// mcp-proxy keys that are accepted but change nothing under mcpbox, each with the reason:
    /// logged at start and printed by `serve --check`.
    pub warnings: Vec<String>,
    pub limits: ServeLimits,
    pub replica: Replica,
    /// `mcpbox.memoryMerge`: every sandbox's memory may be merged by the host's KSM with
    /// identical pages of other mergeable processes (opt-in: it needs the host's ksmd, and
    /// merged pages are a timing side channel between the processes that share them).
    pub memory_merge: bool,
}

/// Running as one of several replicas behind a proxy (`mcpbox.replicaId`, `mcpbox.drainGrace`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replica {
    /// Carried in every session id (`ID.<random>`) so that a proxy can route on it; `None`:
    /// session ids are bare random hex, as for a single mcpbox.
    pub id: Option<String>,
    /// After SIGTERM: how long open sessions may go on while no new ones are taken (0: end
    /// them at once).
    pub drain_grace: Duration,
}

/// A replica id: 1-63 ASCII letters, digits, `-` and `_` (no `.`: it ends the id in a session id).
pub fn check_replica_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 63 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(format!("replica id {id:?}: use 1-63 ASCII letters, digits, '-' or '_'"));
    }
    Ok(())
}

/// The HTTP edge's timeouts and connection caps, and the global session budget (`mcpbox`
/// section). See README "Configuration" for what each one bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeLimits {
    /// A connection must send a complete request head within this long of being accepted or of
    /// its previous answer (so this is also the keep-alive idle timeout).
    pub header_timeout: Duration,
    /// A request body must arrive in full within this long of its head.
    pub body_timeout: Duration,
    /// Open client connections in all; `None`: sized from the descriptor limit at start.
    pub max_connections: Option<usize>,
    /// Open client connections per client address (IPv6: per /64).
    pub max_connections_per_address: usize,
    /// Open sessions across all servers.
    pub max_sessions_total: usize,
    /// Sandboxes started for sessions across all servers (`isolation: "session"`).
    pub max_sandboxes: usize,
    /// Connections each sandbox's egress proxy serves at once (network mode `proxy`); all the
    /// proxies together get a budget sized from the descriptor limit at start.
    pub max_egress_connections: usize,
    /// Memory the warm pools of all servers may hold together (`mcpbox.warmPoolBytes`): a pool
    /// grows with its server's session arrival rate only while the estimate fits.
    pub warm_pool_bytes: u64,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            max_connections: None,
            max_connections_per_address: DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
            max_sessions_total: DEFAULT_MAX_SESSIONS_TOTAL,
            max_sandboxes: DEFAULT_MAX_SANDBOXES,
            max_egress_connections: DEFAULT_MAX_EGRESS_CONNECTIONS,
            warm_pool_bytes: DEFAULT_WARM_POOL_BYTES,
        }
    }
}

impl Config {
    /// The tokens that guard `server` (per-server tokens replace the global ones).
    pub fn tokens_for(&self, server: Option<&str>) -> &[String] {
        if let Some(s) = server.and_then(|n| self.servers.get(n)) {
            if let Some(t) = &s.auth_tokens {
                return t;
            }
        }
        &self.proxy.auth_tokens
    }

    /// The tokens that open `/status` and `/metrics`: the global ones if any, else every
    /// server's own (a token holder sees the status of every server then), else none (open).
    pub fn admin_tokens(&self) -> Vec<String> {
        if !self.proxy.auth_tokens.is_empty() {
            return self.proxy.auth_tokens.clone();
        }
        let mut all: Vec<String> = self.servers.values().filter_map(|s| s.auth_tokens.clone()).flatten().collect();
        all.sort();
        all.dedup();
        all
    }

    /// Refuse to expose servers without a token on a non-loopback address.
    pub fn check_exposure(&self, allow_unauthenticated: bool) -> Result<(), ConfigError> {
        if allow_unauthenticated || self.proxy.addr.ip().is_loopback() {
            return Ok(());
        }
        let mut open: Vec<&str> = self
            .servers
            .values()
            .filter(|s| !s.disabled && self.tokens_for(Some(&s.name)).is_empty())
            .map(|s| s.name.as_str())
            .collect();
        if self.proxy.auth_tokens.is_empty() && open.is_empty() && self.servers.is_empty() {
            open.push("(status, metrics)");
        }
        if open.is_empty() {
            return Ok(());
        }
        Err(field_err(
            "mcpProxy.addr",
            format!(
                "{} is not a loopback address and these servers have no authTokens: {}; set \
                 mcpProxy.options.authTokens, bind 127.0.0.1, or pass --allow-unauthenticated",
                self.proxy.addr,
                open.join(", ")
            ),
        ))
    }
}

// ---- raw serde model -------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawFile {
    mcp_proxy: Option<RawProxy>,
    #[serde(default)]
    mcp_servers: BTreeMap<String, RawServer>,
    mcpbox: Option<RawMcpbox>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawProxy {
    addr: Option<String>,
    #[serde(rename = "baseURL")]
    base_url: Option<String>,
    name: Option<String>,
    version: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    options: Option<RawOptions>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawOptions {
    auth_tokens: Option<Vec<String>>,
    panic_if_invalid: Option<bool>,
    log_enabled: Option<bool>,
    tool_filter: Option<RawToolFilter>,
    disabled: Option<bool>,
    /// mcp-proxy's metrics settings (`enabled`, `collectInterval`, …): accepted, warned about.
    metrics: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToolFilter {
    mode: Option<String>,
    #[serde(default)]
    list: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawServer {
    command: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    url: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    transport_type: Option<String>,
    timeout: Option<Value>,
    options: Option<RawOptions>,
    policy: Option<Value>,
    isolation: Option<String>,
    max_sessions: Option<usize>,
    idle_timeout: Option<Value>,
    disabled: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawMcpbox {
    state_dir: Option<PathBuf>,
    uid_base: Option<u32>,
    max_body_bytes: Option<usize>,
    max_line_bytes: Option<usize>,
    /// Accepted for old configs and ignored: the session budget is in bytes now.
    #[allow(dead_code)]
    session_queue: Option<usize>,
    session_buffer_bytes: Option<usize>,
    server_input_bytes: Option<usize>,
    #[serde(default)]
    allowed_origins: Vec<String>,
    #[serde(default)]
    allowed_hosts: Vec<String>,
    header_timeout: Option<Value>,
    body_timeout: Option<Value>,
    max_connections: Option<usize>,
    max_connections_per_address: Option<usize>,
    max_sessions_total: Option<usize>,
    max_sandboxes: Option<usize>,
    max_egress_connections: Option<usize>,
    warm_pool_bytes: Option<u64>,
    memory_merge: Option<bool>,
    replica_id: Option<String>,
    drain_grace: Option<Value>,
}

// ---- loading ---------------------------------------------------------------------------

pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    parse(&text, path, &base_dir, &|k| std::env::var(k).ok())
}

/// Parse config text; `getenv` supplies `${VAR}` values.
pub fn parse(
    text: &str,
    path: &Path,
    base_dir: &Path,
    getenv: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let mut value: Value =
        serde_json::from_str(text).map_err(|e| ConfigError::Syntax { path: path.to_owned(), msg: e.to_string() })?;
    strip_comments(&mut value, None);
    if let Some(old) = ["server", "clients"].into_iter().find(|k| value.get(k).is_some()) {
        return Err(field_err(
            old,
            "mcp-proxy's deprecated v1 format (`server`, `clients`): write it as `mcpProxy` and `mcpServers` \
             (each client's `config` keys become the server's own, `globalAuthTokens` becomes mcpProxy.options.authTokens)",
        ));
    }
    expand_tree(&mut value, &mut String::new(), getenv)?;
    let raw: RawFile = serde_path_to_error::deserialize(value).map_err(|e| {
        let p = e.path().to_string();
        let field = if p == "." { "(top level)".to_string() } else { p };
        field_err(field, e.into_inner().to_string())
    })?;
    build(raw, base_dir)
}

/// Keys starting with `_` are comments, at every level of the file (a server whose name starts
/// with `_` is commented out) — except inside the maps whose keys are names the user chose:
/// `env`, `headers` and a policy's `env.set`, where `_NAME` is a name like any other.
fn strip_comments(v: &mut Value, parent: Option<&str>) {
    match v {
        Value::Object(o) => {
            if !matches!(parent, Some("env" | "headers" | "set")) {
                o.retain(|k, _| !k.starts_with('_'));
            }
            for (k, item) in o.iter_mut() {
                strip_comments(item, Some(k));
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|item| strip_comments(item, parent)),
        _ => {}
    }
}

/// Expand `${VAR}` in every string value. Inside inline policies `${DATA}` and `${CACHE}` are
/// left alone (they belong to the policy loader); other names expand from the environment, so
/// that a policy can grant the same directory a server's arguments name.
fn expand_tree(v: &mut Value, path: &mut String, getenv: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
    match v {
        Value::String(s) if s.contains("${") => {
            *s = expand_str(s, path, getenv)?;
        }
        Value::Array(a) => {
            for (i, item) in a.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                expand_tree(item, path, getenv)?;
                path.truncate(len);
            }
        }
        Value::Object(o) => {
            for (k, item) in o.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                let is_policy =
                    path.starts_with("mcpServers.") && path.ends_with(".policy") && path.matches('.').count() == 2;
                if is_policy {
                    let keep = |n: &str| match n {
                        "DATA" | "CACHE" => Some(format!("${{{n}}}")),
                        _ => getenv(n),
                    };
                    expand_tree(item, path, &keep)?;
                } else {
                    expand_tree(item, path, getenv)?;
                }
                path.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

fn expand_str(s: &str, field: &str, getenv: &dyn Fn(&str) -> Option<String>) -> Result<String, ConfigError> {
    crate::policy::expand_vars(s, getenv).map_err(|e| match e {
        crate::policy::ExpandError::Unclosed(_) => field_err(field, "unclosed ${ in value"),
        crate::policy::ExpandError::BadName(name) => {
            field_err(field, format!("${{{name}}} is not a valid variable name"))
        }
        crate::policy::ExpandError::Undefined(name) => {
            field_err(field, format!("environment variable {name} is not set"))
        }
    })
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Some(port) = s.strip_prefix(':') {
        let port: u16 = port.parse().map_err(|_| format!("bad port in {s:?}"))?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port));
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let (host, port) = split_host_port(s)?;
    let port = port.ok_or_else(|| format!("{s:?} has no port"))?;
    if host == "localhost" {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    Err(format!("{s:?} is not an IP address with a port (\":9090\", \"127.0.0.1:9090\")"))
}

/// `300` (seconds), `"300"`, `"500ms"`, `"30s"`, `"5m"`, `"1h"`.
pub fn parse_duration(v: &Value) -> Result<Duration, String> {
    match v {
        // `try_from`: a number of seconds past what a Duration holds (`1e30`) is an error, not a
        // panic (found by fuzzing config::parse).
        Value::Number(n) => n
            .as_f64()
            .filter(|f| *f >= 0.0 && f.is_finite())
            .and_then(|f| Duration::try_from_secs_f64(f).ok())
            .ok_or_else(|| format!("{n} is not a non-negative number of seconds (of a sane size)")),
        Value::String(s) => {
            let s = s.trim();
            let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
            let (num, unit) = s.split_at(split);
            let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a duration"))?;
            let secs = match unit {
                "" | "s" => n,
                "ms" => n / 1000.0,
                "m" => n * 60.0,
                "h" => n * 3600.0,
                _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
            };
            Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} is too long a duration"))
        }
        _ => Err("expected seconds (a number) or a string like \"30s\", \"5m\"".into()),
    }
}

fn tool_filter(raw: Option<RawToolFilter>, field: &str) -> Result<Option<ToolFilter>, ConfigError> {
    let Some(raw) = raw else { return Ok(None) };
    let mode = match raw.mode.as_deref().map(str::to_ascii_lowercase).as_deref() {
        Some("allow") => FilterMode::Allow,
        Some("block") => FilterMode::Block,
        // mcp-proxy ignores a filter without a mode; so do we, rather than block everything.
        None | Some("") => return Ok(None),
        Some(m) => return Err(field_err(format!("{field}.mode"), format!("{m:?} is not allow or block"))),
    };
    Ok(Some(ToolFilter { mode, list: raw.list.into_iter().collect() }))
}

fn tokens(raw: Option<Vec<String>>, field: &str) -> Result<Option<Vec<String>>, ConfigError> {
    let Some(list) = raw else { return Ok(None) };
    if let Some(i) = list.iter().position(|t| t.trim().is_empty()) {
        return Err(field_err(format!("{field}[{i}]"), "empty token (an unset variable?)"));
    }
    Ok(Some(list))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.')
        && !matches!(name, "healthz" | "readyz" | "status" | "metrics")
}

fn build(raw: RawFile, base_dir: &Path) -> Result<Config, ConfigError> {
    let rp = raw.mcp_proxy.unwrap_or(RawProxy {
        addr: None,
        base_url: None,
        name: None,
        version: None,
        kind: None,
        options: None,
    });
    let addr = parse_addr(rp.addr.as_deref().unwrap_or("127.0.0.1:9090")).map_err(|m| field_err("mcpProxy.addr", m))?;
    let base_url = match rp.base_url.as_deref().filter(|s| !s.is_empty()) {
        Some(s) => Some(BaseUrl::parse(s).map_err(|m| field_err("mcpProxy.baseURL", m))?),
        None => None,
    };
    let transport = match rp.kind.as_deref() {
        None | Some("sse") => Transport::Sse,
        Some("streamable-http") | Some("streamableHttp") => Transport::StreamableHttp,
        Some(t) => return Err(field_err("mcpProxy.type", format!("{t:?} is not \"sse\" or \"streamable-http\""))),
    };
    let mut warnings = Vec::new();
    let popts = rp.options.unwrap_or_default();
    if rp.version.is_some() {
        warnings.push("mcpProxy.version: accepted, no effect: clients see each server's own serverInfo (mcpbox passes its initialize answer through)".to_string());
    }
    no_effect_options(&popts, "mcpProxy.options", &mut warnings);
    let global_tokens = tokens(popts.auth_tokens, "mcpProxy.options.authTokens")?.unwrap_or_default();
    let global_filter = tool_filter(popts.tool_filter, "mcpProxy.options.toolFilter")?;
    // As in mcp-proxy: off unless asked for.
    let global_log = popts.log_enabled.unwrap_or(false);
    let proxy = Proxy {
        addr,
        base_url,
        name: rp.name.unwrap_or_else(|| "mcpbox".into()),
        version: rp.version.unwrap_or_else(|| env!("CARGO_PKG_VERSION").into()),
        transport,
        auth_tokens: global_tokens,
        tool_filter: global_filter.clone(),
        log_enabled: global_log,
    };

    let mut servers = BTreeMap::new();
    for (name, rs) in raw.mcp_servers {
        let f = format!("mcpServers.{name}");
        if !valid_name(&name) {
            return Err(field_err(
                &f,
                "server names are 1-64 of [A-Za-z0-9._-], not starting with '.', and not \
                 healthz/readyz/status/metrics",
            ));
        }
        let opts = rs.options.unwrap_or_default();
        no_effect_options(&opts, &format!("{f}.options"), &mut warnings);
        if rs.command.is_some() && !rs.headers.is_empty() {
            warnings.push(format!("{f}.headers: accepted, no effect: headers are for url servers"));
        }
        if rs.url.is_some() && (!rs.args.is_empty() || !rs.env.is_empty()) {
            warnings.push(format!("{f}.args/env: accepted, no effect: a url server runs no command"));
        }
        let kind = match (rs.command, rs.url) {
            (Some(_), Some(_)) => return Err(field_err(&f, "has both command and url; pick one")),
            (None, None) => return Err(field_err(&f, "needs a command (stdio server) or a url")),
            (Some(command), None) => {
                if command.trim().is_empty() {
                    return Err(field_err(format!("{f}.command"), "is empty"));
                }
                ServerKind::Stdio { command, args: rs.args, env: rs.env }
            }
            (None, Some(url)) => {
                BaseUrl::parse(&url).map_err(|m| field_err(format!("{f}.url"), m))?;
                ServerKind::Url { url, headers: rs.headers, transport_type: rs.transport_type }
            }
        };
        let policy_given = !matches!(rs.policy, None | Some(Value::Null));
        let policy = match rs.policy {
            None | Some(Value::Null) => PolicyRef::Named("default".into()),
            Some(Value::String(s)) if s.contains('/') || s.ends_with(".toml") => {
                let p = Path::new(&s);
                let p = if p.is_absolute() { p.to_path_buf() } else { base_dir.join(p) };
                PolicyRef::Named(p.to_string_lossy().into_owned())
            }
            Some(Value::String(s)) => PolicyRef::Named(s),
            Some(v @ Value::Object(_)) => {
                let value: toml::Table = serde_json::from_value(v)
                    .map_err(|e| field_err(format!("{f}.policy"), format!("not a policy object: {e}")))?;
                PolicyRef::Inline { value, base_dir: base_dir.to_path_buf() }
            }
            Some(_) => return Err(field_err(format!("{f}.policy"), "expected a path, a name or an object")),
        };
        let isolation = match rs.isolation.as_deref() {
            None | Some("session") => Isolation::Session,
            Some("shared") => Isolation::Shared,
            Some("principal") => Isolation::Principal,
            Some(i) => {
                return Err(field_err(
                    format!("{f}.isolation"),
                    format!("{i:?} is not \"session\", \"principal\" or \"shared\""),
                ))
            }
        };
        let max_sessions = match rs.max_sessions {
            None => Some(DEFAULT_MAX_SESSIONS),
            Some(0) => None,
            Some(n) => Some(n),
        };
        let idle_timeout = match &rs.idle_timeout {
            Some(v) => parse_duration(v).map_err(|m| field_err(format!("{f}.idleTimeout"), m))?,
            None => DEFAULT_IDLE,
        };
        let timeout = match &rs.timeout {
            Some(v) => Some(parse_duration(v).map_err(|m| field_err(format!("{f}.timeout"), m))?),
            None => None,
        };
        let tool_filter = match tool_filter(opts.tool_filter, &format!("{f}.options.toolFilter"))? {
            Some(t) => Some(t),
            None => global_filter.clone(),
        };
        let sc = ServerConfig {
            name: name.clone(),
            kind,
            auth_tokens: tokens(opts.auth_tokens, &format!("{f}.options.authTokens"))?,
            tool_filter,
            policy,
            policy_given,
            isolation,
            max_sessions,
            idle_timeout,
            timeout,
            disabled: rs.disabled.or(opts.disabled).unwrap_or(false),
            log_enabled: opts.log_enabled.unwrap_or(global_log),
        };
        servers.insert(name, sc);
    }

    let mb = raw.mcpbox;
    let limits = match &mb {
        Some(m) => serve_limits(m)?,
        None => ServeLimits::default(),
    };
    let replica = match &mb {
        Some(m) => replica(m)?,
        None => Replica::default(),
    };
    let memory_merge = mb.as_ref().and_then(|m| m.memory_merge).unwrap_or(false);
    let (state_dir, uid_base, max_body, max_line, session_buffer, server_input, origins, hosts) = match mb {
        Some(m) => (
            m.state_dir,
            m.uid_base,
            m.max_body_bytes,
            m.max_line_bytes,
            m.session_buffer_bytes,
            m.server_input_bytes,
            m.allowed_origins,
            m.allowed_hosts,
        ),
        None => (None, None, None, None, None, None, vec![], vec![]),
    };
    for (k, v) in [
        ("maxBodyBytes", max_body),
        ("maxLineBytes", max_line),
        ("sessionBufferBytes", session_buffer),
        ("serverInputBytes", server_input),
    ] {
        if v == Some(0) {
            return Err(field_err(format!("mcpbox.{k}"), "must be at least 1"));
        }
    }
    Ok(Config {
        proxy,
        servers,
        state_dir,
        uid_base,
        max_body_bytes: max_body.unwrap_or(DEFAULT_MAX_BODY),
        max_line_bytes: max_line.unwrap_or(DEFAULT_MAX_LINE),
        session_buffer_bytes: session_buffer.unwrap_or(DEFAULT_SESSION_BUFFER),
        server_input_bytes: server_input.unwrap_or(DEFAULT_SERVER_INPUT),
        allowed_origins: origins.into_iter().map(|o| o.trim_end_matches('/').to_ascii_lowercase()).collect(),
        allowed_hosts: hosts.into_iter().map(|h| h.to_ascii_lowercase()).collect(),
        warnings,
        limits,
        replica,
        memory_merge,
    })
}

fn replica(m: &RawMcpbox) -> Result<Replica, ConfigError> {
    if let Some(id) = &m.replica_id {
        check_replica_id(id).map_err(|msg| field_err("mcpbox.replicaId", msg))?;
    }
    let drain_grace = match &m.drain_grace {
        Some(v) => parse_duration(v).map_err(|msg| field_err("mcpbox.drainGrace", msg))?,
        None => Duration::ZERO,
    };
    Ok(Replica { id: m.replica_id.clone(), drain_grace })
}

fn serve_limits(m: &RawMcpbox) -> Result<ServeLimits, ConfigError> {
    let d = ServeLimits::default();
    let timeout = |v: &Option<Value>, key: &str, default: Duration| -> Result<Duration, ConfigError> {
        let Some(v) = v else { return Ok(default) };
        let t = parse_duration(v).map_err(|msg| field_err(format!("mcpbox.{key}"), msg))?;
        if t < Duration::from_millis(100) {
            return Err(field_err(
                format!("mcpbox.{key}"),
                "must be at least 100ms (a timeout of 0 would be none at all)",
            ));
        }
        Ok(t)
    };
    let count = |v: Option<usize>, key: &str, default: usize| -> Result<usize, ConfigError> {
        match v {
            Some(0) => Err(field_err(format!("mcpbox.{key}"), "must be at least 1")),
            Some(n) => Ok(n),
            None => Ok(default),
        }
    };
    Ok(ServeLimits {
        header_timeout: timeout(&m.header_timeout, "headerTimeout", d.header_timeout)?,
        body_timeout: timeout(&m.body_timeout, "bodyTimeout", d.body_timeout)?,
        max_connections: match m.max_connections {
            Some(0) => {
                return Err(field_err(
                    "mcpbox.maxConnections",
                    "must be at least 1 (leave it out to size it from the descriptor limit)",
                ))
            }
            v => v,
        },
        max_connections_per_address: count(
            m.max_connections_per_address,
            "maxConnectionsPerAddress",
            d.max_connections_per_address,
        )?,
        max_sessions_total: count(m.max_sessions_total, "maxSessionsTotal", d.max_sessions_total)?,
        max_sandboxes: count(m.max_sandboxes, "maxSandboxes", d.max_sandboxes)?,
        max_egress_connections: count(m.max_egress_connections, "maxEgressConnections", d.max_egress_connections)?,
        warm_pool_bytes: m.warm_pool_bytes.unwrap_or(d.warm_pool_bytes),
    })
}

/// The mcp-proxy options that mcpbox accepts but that change nothing here, said once each.
fn no_effect_options(o: &RawOptions, field: &str, warnings: &mut Vec<String>) {
    if o.panic_if_invalid == Some(true) {
        warnings.push(format!(
            "{field}.panicIfInvalid: accepted, no effect: an invalid config always stops mcpbox, and a server that cannot start is refused alone \
             (in the log and /readyz) while the others serve"
        ));
    }
    if o.metrics.is_some() {
        warnings.push(format!("{field}.metrics: accepted, no effect: mcpbox always serves /metrics (Prometheus text), behind the admin tokens"));
    }
    if o.tool_filter.as_ref().is_some_and(|t| t.mode.as_deref().unwrap_or("").is_empty()) {
        warnings.push(format!("{field}.toolFilter: no mode (allow or block), so no filter, as in mcp-proxy"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    fn p(text: &str) -> Result<Config, ConfigError> {
        parse(text, Path::new("t.json"), Path::new("/etc/mcpbox"), &env(&[("TOK", "s3cret"), ("KEY", "k")]))
    }

    #[test]
    fn reference_example_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/reference/mcp-proxy-example-config.json");
        let path =
            if path.exists() { path } else { PathBuf::from("/work/shared/reference/mcp-proxy-example-config.json") };
        let c = load(&path).expect("the mcp-proxy example config must load");
        assert_eq!(c.proxy.addr, "0.0.0.0:9090".parse().unwrap());
        assert_eq!(c.proxy.transport, Transport::StreamableHttp);
        assert_eq!(c.proxy.base_url.as_ref().unwrap().origin(), "https://mcp.example.com");
        assert_eq!(c.servers.len(), 3);
        assert!(matches!(c.servers["amap"].kind, ServerKind::Url { .. }));
        assert_eq!(c.tokens_for(Some("fetch")), ["SpecificTokens".to_string()]);
        assert_eq!(c.tokens_for(Some("github")), ["DefaultTokens".to_string()]);
        let f = c.servers["github"].tool_filter.as_ref().unwrap();
        assert!(!f.allows("create_or_update_file") && f.allows("search_code"));
        c.check_exposure(false).unwrap();
        let w = c.warnings.join("\n");
        assert!(w.contains("mcpProxy.version") && w.contains("mcpServers.fetch.options.panicIfInvalid"), "{w}");
        assert!(c.proxy.log_enabled && !c.servers["fetch"].log_enabled && c.servers["github"].log_enabled);
    }

    #[test]
    fn env_expansion_and_missing_var_names_field() {
        let c = p(r#"{"mcpServers":{"a":{"command":"x","env":{"K":"pre-${KEY}-post"}}}}"#).unwrap();
        match &c.servers["a"].kind {
            ServerKind::Stdio { env, .. } => assert_eq!(env["K"], "pre-k-post"),
            _ => panic!(),
        }
        let e = p(r#"{"mcpServers":{"fetch":{"command":"x","env":{"API_KEY":"${NOPE}"}}}}"#).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("mcpServers.fetch.env.API_KEY") && s.contains("NOPE"), "{s}");
    }

    #[test]
    fn inline_policy_expands_env_but_not_data_or_cache() {
        let c = parse(
            r#"{"mcpServers":{"a":{"command":"x","args":["${DEMO}"],"policy":{"filesystem":{"write":["${DEMO}","${DATA}/x"],"read":["${CACHE}"]}}}}}"#,
            Path::new("t.json"),
            Path::new("/cfg"),
            &env(&[("DEMO", "/srv/demo")]),
        )
        .unwrap();
        let PolicyRef::Inline { value, .. } = &c.servers["a"].policy else { panic!() };
        let fs = value["filesystem"].as_table().unwrap();
        assert_eq!(fs["write"].as_array().unwrap()[0].as_str(), Some("/srv/demo"));
        assert_eq!(fs["write"].as_array().unwrap()[1].as_str(), Some("${DATA}/x"));
        assert_eq!(fs["read"].as_array().unwrap()[0].as_str(), Some("${CACHE}"));
    }

    #[test]
    fn inline_policy_is_not_expanded() {
        let c = p(r#"{"mcpServers":{"a":{"command":"x","policy":{"filesystem":{"write":["${DATA}"]}}}}}"#).unwrap();
        assert!(matches!(c.servers["a"].policy, PolicyRef::Inline { .. }));
    }

    #[test]
    fn errors_name_fields() {
        let cases = [
            (r#"{"mcpServers":{"a":{"command":"x","isolation":"sometimes"}}}"#, "mcpServers.a.isolation"),
            (r#"{"mcpServers":{"a":{"command":"x","idleTimeout":"5 fortnights"}}}"#, "mcpServers.a.idleTimeout"),
            // Found by fuzzing: these panicked (a Duration cannot hold 7e29 seconds).
            (r#"{"mcpServers":{"a":{"command":"x","idleTimeout":7E29}}}"#, "mcpServers.a.idleTimeout"),
            (r#"{"mcpServers":{"a":{"command":"x","timeout":"99999999999999999999999h"}}}"#, "mcpServers.a.timeout"),
            (r#"{"mcpServers":{"a":{"command":"x","bogus":1}}}"#, "mcpServers.a"),
            (r#"{"mcpServers":{"a":{"command":"x","args":[1]}}}"#, "mcpServers.a.args"),
            (r#"{"mcpServers":{"a":{}}}"#, "mcpServers.a"),
            (r#"{"mcpProxy":{"addr":"nowhere"}}"#, "mcpProxy.addr"),
            (r#"{"mcpProxy":{"type":"carrier-pigeon"}}"#, "mcpProxy.type"),
            (
                r#"{"mcpServers":{"a":{"command":"x","options":{"toolFilter":{"mode":"maybe"}}}}}"#,
                "mcpServers.a.options.toolFilter.mode",
            ),
        ];
        for (text, field) in cases {
            let e = p(text).unwrap_err().to_string();
            assert!(e.contains(field), "{text}: {e}");
        }
    }

    #[test]
    fn durations_and_defaults() {
        let c = p(r#"{"mcpServers":{"a":{"command":"x","idleTimeout":"5m","isolation":"shared"},"b":{"command":"y","idleTimeout":30}}}"#).unwrap();
        assert_eq!(c.servers["a"].idle_timeout, Duration::from_secs(300));
        assert_eq!(c.servers["a"].isolation, Isolation::Shared);
        assert_eq!(c.servers["b"].idle_timeout, Duration::from_secs(30));
        assert_eq!(c.proxy.addr, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(c.max_body_bytes, DEFAULT_MAX_BODY);
    }

    #[test]
    fn non_loopback_without_tokens_is_refused() {
        let open = r#"{"mcpProxy":{"addr":":9090"},"mcpServers":{"a":{"command":"x"}}}"#;
        let c = p(open).unwrap();
        let e = c.check_exposure(false).unwrap_err().to_string();
        assert!(e.contains("mcpProxy.addr") && e.contains("--allow-unauthenticated"), "{e}");
        c.check_exposure(true).unwrap();
        // per-server tokens on every server are enough
        let c = p(
            r#"{"mcpProxy":{"addr":":9090"},"mcpServers":{"a":{"command":"x","options":{"authTokens":["${TOK}"]}}}}"#,
        )
        .unwrap();
        c.check_exposure(false).unwrap();
        // loopback needs nothing
        p(r#"{"mcpProxy":{"addr":"127.0.0.1:1"},"mcpServers":{"a":{"command":"x"}}}"#)
            .unwrap()
            .check_exposure(false)
            .unwrap();
        // an empty token is an error, not an open door
        let e = parse(
            r#"{"mcpProxy":{"options":{"authTokens":["${E}"]}}}"#,
            Path::new("t"),
            Path::new("/"),
            &env(&[("E", "")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("mcpProxy.options.authTokens[0]"), "{e}");
    }

    #[test]
    fn underscore_keys_are_comments_at_every_level() {
        let c = p(r#"{
            "_comment": "top level",
            "mcpProxy": {"_note": 1, "addr": "127.0.0.1:9", "options": {"_why": "x", "authTokens": ["${TOK}"]}},
            "mcpServers": {
                "_disabled-server": {"command": "whatever", "bogus": true},
                "a": {"_comment": "a server", "command": "x", "env": {"_UNDERSCORE": "kept", "K": "v"},
                      "options": {"_c": 0, "toolFilter": {"_c": "", "mode": "block", "list": ["t"]}},
                      "policy": {"_c": "", "extends": "node", "env": {"set": {"_KEEP": "1"}}}}
            },
            "mcpbox": {"_comment": "extensions", "maxBodyBytes": 8}
        }"#)
        .unwrap();
        assert_eq!(c.servers.keys().collect::<Vec<_>>(), ["a"], "a server named _… is commented out");
        let ServerKind::Stdio { env, .. } = &c.servers["a"].kind else { panic!() };
        assert_eq!(env["_UNDERSCORE"], "kept", "env names are not config keys");
        let PolicyRef::Inline { value, .. } = &c.servers["a"].policy else { panic!() };
        assert!(!value.contains_key("_c") && value["env"]["set"].as_table().unwrap().contains_key("_KEEP"));
        assert_eq!(c.max_body_bytes, 8);
        assert_eq!(c.proxy.auth_tokens, ["s3cret".to_string()]);
        // A comment never needs its ${…} set.
        p(r#"{"_comment": "set ${UNSET_VAR} first", "mcpServers": {}}"#).unwrap();
    }

    #[test]
    fn unknown_keys_stay_errors_naming_them() {
        for (text, field, key) in [
            (r#"{"mcpProxy":{"adress":":1"}}"#, "mcpProxy", "adress"),
            (r#"{"mcpServers":{"a":{"command":"x","comment":"not a comment"}}}"#, "mcpServers.a", "comment"),
            (
                r#"{"mcpServers":{"a":{"command":"x","options":{"logEnable":true}}}}"#,
                "mcpServers.a.options",
                "logEnable",
            ),
            (r#"{"mcpservers":{}}"#, "expected one of", "mcpservers"),
        ] {
            let e = p(text).unwrap_err().to_string();
            assert!(e.contains(field) && e.contains(key), "{text}: {e}");
        }
        let e = p(r#"{"server":{"addr":":1"},"clients":{}}"#).unwrap_err().to_string();
        assert!(e.contains("v1 format") && e.contains("mcpServers"), "{e}");
    }

    #[test]
    fn mcp_proxy_keys_without_effect_are_warned_about() {
        let c = p(r#"{"mcpProxy":{"name":"n","version":"1.0.0","type":"sse","options":{"panicIfInvalid":true,"logEnabled":true,
            "metrics":{"enabled":true,"collectInterval":"15s"}}},
            "mcpServers":{"a":{"command":"x","headers":{"H":"v"},"timeout":"30s","options":{"panicIfInvalid":false,"logEnabled":false,"toolFilter":{"list":["t"]}}},
                          "b":{"url":"https://up.example.test/mcp","transportType":"streamable-http","args":["y"]}}}"#)
        .unwrap();
        let w = c.warnings.join("\n");
        for said in [
            "mcpProxy.version",
            "mcpProxy.options.panicIfInvalid",
            "mcpProxy.options.metrics",
            "mcpServers.a.headers",
            "mcpServers.a.options.toolFilter",
            "mcpServers.b.args/env",
        ] {
            assert!(w.contains(said), "no warning for {said}:\n{w}");
        }
        assert_eq!(c.warnings.len(), 6, "{w}");
        // Honoured: logEnabled per server over the global one, timeout, name.
        assert!(!c.servers["a"].log_enabled && c.servers["b"].log_enabled);
        assert_eq!(c.servers["a"].timeout, Some(Duration::from_secs(30)));
        assert_eq!(c.proxy.name, "n");
        // A plain config has nothing to warn about; logging is off unless asked for.
        let c = p(r#"{"mcpServers":{"a":{"command":"x"}}}"#).unwrap();
        assert!(c.warnings.is_empty() && !c.servers["a"].log_enabled);
    }

    #[test]
    fn serve_limits_and_max_sessions() {
        let c = p(r#"{"mcpServers":{"a":{"command":"x"},"b":{"command":"x","maxSessions":0},"c":{"command":"x","maxSessions":3}}}"#).unwrap();
        assert_eq!(c.servers["a"].max_sessions, Some(DEFAULT_MAX_SESSIONS));
        assert_eq!(c.servers["b"].max_sessions, None);
        assert_eq!(c.servers["c"].max_sessions, Some(3));
        assert_eq!(c.limits, ServeLimits::default());
        let c =
            p(r#"{"mcpbox":{"headerTimeout":"2s","bodyTimeout":1.5,"maxConnections":100,"maxConnectionsPerAddress":8,
                     "maxSessionsTotal":9,"maxSandboxes":4,"warmPoolBytes":1000,"maxEgressConnections":5}}"#)
            .unwrap();
        let l = &c.limits;
        assert_eq!(l.warm_pool_bytes, 1000);
        assert_eq!(l.max_egress_connections, 5);
        assert_eq!((l.header_timeout, l.body_timeout), (Duration::from_secs(2), Duration::from_millis(1500)));
        assert_eq!(
            (l.max_connections, l.max_connections_per_address, l.max_sessions_total, l.max_sandboxes),
            (Some(100), 8, 9, 4)
        );
        for (text, field) in [
            (r#"{"mcpbox":{"headerTimeout":0}}"#, "mcpbox.headerTimeout"),
            (r#"{"mcpbox":{"bodyTimeout":"soon"}}"#, "mcpbox.bodyTimeout"),
            (r#"{"mcpbox":{"maxConnections":0}}"#, "mcpbox.maxConnections"),
            (r#"{"mcpbox":{"maxConnectionsPerAddress":0}}"#, "mcpbox.maxConnectionsPerAddress"),
            (r#"{"mcpbox":{"maxSandboxes":0}}"#, "mcpbox.maxSandboxes"),
            (r#"{"mcpbox":{"maxEgressConnections":0}}"#, "mcpbox.maxEgressConnections"),
        ] {
            let e = p(text).unwrap_err().to_string();
            assert!(e.contains(field), "{text}: {e}");
        }
    }

    #[test]
    fn base_url_prefix() {
        let b = BaseUrl::parse("https://Example.com:8443/mcp/").unwrap();
        assert_eq!(b.path, "/mcp");
        assert_eq!(b.origin(), "https://example.com:8443");
        assert_eq!(BaseUrl::parse("http://[::1]:9").unwrap().host, "[::1]");
        // Found by fuzzing (fuzz/fuzz_targets/decide.rs): a prefix the edge could only be reached
        // through in a non-canonical form.
        for bad in ["http://h/a/../b", "http://h/./mcp", "http://h/%6dcp", "http://h/a//b"] {
            let e = BaseUrl::parse(bad).unwrap_err();
            assert!(e.contains("must be plain"), "{bad}: {e}");
        }
        assert_eq!(BaseUrl::parse("http://h/a.b/c..d/").unwrap().path, "/a.b/c..d");
    }

    #[test]
    fn memory_merge_is_off_unless_asked() {
        assert!(!p(r#"{"mcpServers":{}}"#).unwrap().memory_merge);
        assert!(!p(r#"{"mcpbox":{"memoryMerge":false},"mcpServers":{}}"#).unwrap().memory_merge);
        assert!(p(r#"{"mcpbox":{"memoryMerge":true},"mcpServers":{}}"#).unwrap().memory_merge);
        let e = p(r#"{"mcpbox":{"memoryMerge":"yes"},"mcpServers":{}}"#).unwrap_err().to_string();
        assert!(e.contains("memoryMerge") || e.contains("boolean"), "{e}");
    }

    #[test]
    fn replica_id_and_drain_grace() {
        let c = p(r#"{"mcpbox":{"replicaId":"mcpbox-2","drainGrace":"90s"},"mcpServers":{}}"#).unwrap();
        assert_eq!(c.replica, Replica { id: Some("mcpbox-2".into()), drain_grace: Duration::from_secs(90) });
        assert_eq!(p(r#"{"mcpServers":{}}"#).unwrap().replica, Replica::default());
        for bad in ["a.b", "", "r 1"] {
            let e = p(&format!(r#"{{"mcpbox":{{"replicaId":"{bad}"}},"mcpServers":{{}}}}"#)).unwrap_err().to_string();
            assert!(e.contains("mcpbox.replicaId"), "{e}");
        }
    }
}

//! Edge security: bearer tokens, Host and Origin checks.

use std::net::IpAddr;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use super::Shared;
pub use crate::bridge::Principal;
use crate::config::{split_host_port, Config};

pub struct Edge {
    loopback: bool,
    unspecified: bool,
    bind_host: String,
    base_host: Option<String>,
    base_origin: Option<String>,
    hosts: Vec<String>,
    origins: Vec<String>,
    /// The tokens that open `/status` and `/metrics`: the global ones, or, where only servers
    /// have tokens, any server's (those endpoints are never open while any token exists).
    pub admin_tokens: Vec<String>,
}

fn is_loopback_name(h: &str) -> bool {
    matches!(h, "localhost" | "127.0.0.1" | "[::1]") || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl Edge {
    pub fn new(cfg: &Config) -> Self {
        let ip = cfg.proxy.addr.ip();
        let bind_host = match ip {
            IpAddr::V6(v6) => format!("[{v6}]"),
            IpAddr::V4(v4) => v4.to_string(),
        };
        Edge {
            loopback: ip.is_loopback(),
            unspecified: ip.is_unspecified(),
            bind_host,
            base_host: cfg.proxy.base_url.as_ref().map(|b| b.host.clone()),
            base_origin: cfg.proxy.base_url.as_ref().map(|b| b.origin()),
            hosts: cfg.allowed_hosts.clone(),
            origins: cfg.allowed_origins.clone(),
            admin_tokens: cfg.admin_tokens(),
        }
    }

    /// DNS-rebinding defence: the Host must be one we are reachable as.
    pub fn host_ok(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        if self.hosts.contains(&host) {
            return true;
        }
        let Ok((name, _port)) = split_host_port(&host) else { return false };
        if self.hosts.contains(&name) || self.base_host.as_deref() == Some(name.as_str()) {
            return true;
        }
        if name == self.bind_host || is_loopback_name(&name) && (self.loopback || self.unspecified) {
            return true;
        }
        // Bound to every address: any IP literal is fine; a DNS name must be configured
        // (baseURL or allowedHosts), which is what rebinding needs.
        self.unspecified && name.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().is_ok()
    }

    pub fn origin_ok(&self, origin: &str) -> bool {
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        if self.base_origin.as_deref() == Some(origin.as_str()) || self.origins.contains(&origin) {
            return true;
        }
        if self.loopback {
            if let Some((scheme, rest)) = origin.split_once("://") {
                if scheme == "http" || scheme == "https" {
                    if let Ok((h, _)) = split_host_port(rest) {
                        return is_loopback_name(&h);
                    }
                }
            }
        }
        false
    }
}

/// DNS rebinding and cross-site requests: the Host must be one we are reachable as, and an
/// Origin, when sent, one we serve.
#[allow(clippy::result_large_err)]
fn host_origin_ok(st: &Shared, uri: &Uri, headers: &HeaderMap) -> Result<(), Response> {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).or_else(|| uri.authority().map(|a| a.as_str()));
    if !host.is_some_and(|h| st.edge.host_ok(h)) {
        tracing::warn!(host = ?host, "request refused: Host not allowed");
        return Err((StatusCode::FORBIDDEN, "Host not allowed\n").into_response());
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        if !origin.to_str().is_ok_and(|o| st.edge.origin_ok(o)) {
            tracing::warn!(origin = ?origin, "request refused: Origin not allowed");
            return Err((StatusCode::FORBIDDEN, "Origin not allowed\n").into_response());
        }
    }
    Ok(())
}

/// The endpoint of a server a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET /NAME/sse`: legacy SSE stream.
    Sse,
    /// `POST /NAME/message?sessionId=…`: legacy SSE message.
    Message,
    /// `/NAME/mcp`: Streamable HTTP.
    Mcp,
}

/// What a request is for: decided once, from the raw path, by [`decide`]; auth, routing, logs and
/// metrics all use this value and nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Health,
    Ready,
    Status,
    Metrics,
    Server { name: String, endpoint: Endpoint },
}

/// The one decision of which endpoint (and server) a request path names, or `None` (404).
///
/// `path` is the path as it arrived, before any percent-decoding. Only canonical paths are
/// accepted: `/healthz`, `/readyz`, `/status`, `/metrics`, and `PREFIX/NAME/{sse,message,mcp}`
/// where `NAME` is byte for byte a configured server name. Percent-encoding, dot segments,
/// empty segments, trailing slashes and case variants name nothing, so they cannot reach a
/// server under another server's (or no) token list.
pub fn decide(prefix: &str, path: &str, is_server: impl Fn(&str) -> bool) -> Option<Target> {
    match path {
        "/healthz" => return Some(Target::Health),
        "/readyz" => return Some(Target::Ready),
        "/status" => return Some(Target::Status),
        "/metrics" => return Some(Target::Metrics),
        _ => {}
    }
    let rest = path.strip_prefix(prefix)?.strip_prefix('/')?;
    let (name, endpoint) = rest.split_once('/')?;
    let endpoint = match endpoint {
        "sse" => Endpoint::Sse,
        "message" => Endpoint::Message,
        "mcp" => Endpoint::Mcp,
        _ => return None,
    };
    // Server names are [A-Za-z0-9._-] (config validation); this keeps the decision independent
    // of that rule all the same.
    if name.is_empty() || name == "." || name == ".." || name.contains('%') || !is_server(name) {
        return None;
    }
    Some(Target::Server { name: name.to_owned(), endpoint })
}

/// Check `Authorization` against `tokens` (`scope` names the list: "global", "server NAME").
/// `Ok` carries the principal; with no tokens the endpoint is open and the principal anonymous.
pub fn authenticate(headers: &HeaderMap, scope: &str, tokens: &[String]) -> Option<Principal> {
    if tokens.is_empty() {
        return Some(Principal::anonymous());
    }
    let given = headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes)?;
    let given = match given.get(..7) {
        Some(p) if p.eq_ignore_ascii_case(b"bearer ") => &given[7..],
        _ => given,
    };
    let given = given.trim_ascii();
    // Constant time over every token: which one matched is selected, not branched on.
    let mut found = subtle::Choice::from(0);
    let mut index = 0u32;
    for (i, t) in tokens.iter().enumerate() {
        let eq = given.ct_eq(t.as_bytes());
        index = u32::conditional_select(&index, &(i as u32), eq);
        found |= eq;
    }
    bool::from(found).then(|| Principal(format!("{scope} token #{}", index + 1).into()))
}

/// `Authorization: Bearer T` or a bare `T`; true when `tokens` is empty (open).
pub fn authorized(headers: &HeaderMap, tokens: &[String]) -> bool {
    authenticate(headers, "", tokens).is_some()
}

/// The request as the edge decided it: what it is for and who sent it.
#[derive(Debug, Clone)]
pub struct Routed {
    pub target: Target,
    pub principal: Principal,
}

/// Decide, check Host/Origin, authenticate: the response to give, or the decision.
#[allow(clippy::result_large_err)]
pub fn admit(st: &Shared, uri: &Uri, headers: &HeaderMap) -> Result<Routed, Response> {
    let Some(target) = decide(&st.prefix, uri.path(), |n| st.cfg.servers.contains_key(n)) else {
        return Err((StatusCode::NOT_FOUND, "not found\n").into_response());
    };
    if matches!(target, Target::Health | Target::Ready) {
        return Ok(Routed { target, principal: Principal::anonymous() });
    }
    host_origin_ok(st, uri, headers)?;
    let (scope, tokens) = match &target {
        Target::Server { name, .. } => (format!("server {name}"), st.cfg.tokens_for(Some(name))),
        _ => ("admin".to_owned(), st.edge.admin_tokens.as_slice()),
    };
    match authenticate(headers, &scope, tokens) {
        Some(principal) => Ok(Routed { target, principal }),
        None => {
            tracing::debug!(target = ?target, "request refused: no valid token");
            Err((StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], "unauthorized\n").into_response())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn h(v: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        m
    }

    #[test]
    fn bearer_bare_wrong_and_open() {
        let t = vec!["tok-1".to_string(), "tok-2".to_string()];
        assert!(authorized(&h("Bearer tok-1"), &t));
        assert!(authorized(&h("bearer tok-2"), &t));
        assert!(authorized(&h("tok-2"), &t));
        assert!(!authorized(&h("Bearer tok-3"), &t));
        assert!(!authorized(&h("Bearer tok-"), &t));
        assert!(!authorized(&HeaderMap::new(), &t));
        assert!(authorized(&HeaderMap::new(), &[]));
    }

    #[test]
    fn per_server_tokens_replace_global() {
        let c = crate::config::parse(
            r#"{"mcpProxy":{"options":{"authTokens":["G"]}},"mcpServers":{"a":{"command":"x","options":{"authTokens":["A"]}},"b":{"command":"y"}}}"#,
            Path::new("t"), Path::new("/"), &|_| None).unwrap();
        assert!(authorized(&h("A"), c.tokens_for(Some("a"))));
        assert!(!authorized(&h("G"), c.tokens_for(Some("a"))));
        assert!(authorized(&h("G"), c.tokens_for(Some("b"))));
        assert!(authorized(&h("G"), c.tokens_for(None)));
    }

    #[test]
    fn decide_accepts_only_canonical_paths() {
        let is = |n: &str| n == "a" || n == "b.c";
        assert_eq!(decide("", "/a/mcp", is), Some(Target::Server { name: "a".into(), endpoint: Endpoint::Mcp }));
        assert_eq!(decide("", "/b.c/sse", is), Some(Target::Server { name: "b.c".into(), endpoint: Endpoint::Sse }));
        assert_eq!(
            decide("", "/a/message", is),
            Some(Target::Server { name: "a".into(), endpoint: Endpoint::Message })
        );
        assert_eq!(decide("/p", "/p/a/mcp", is), Some(Target::Server { name: "a".into(), endpoint: Endpoint::Mcp }));
        assert_eq!(decide("/p", "/status", is), Some(Target::Status));
        for bad in [
            "/%61/mcp",
            "//a/mcp",
            "/a//mcp",
            "/./a/mcp",
            "/a/../a/mcp",
            "/A/mcp",
            "/a/MCP",
            "/a/mcp/",
            "/a",
            "/a/",
            "a/mcp",
            "/x/a/mcp",
            "/a%2Fmcp",
            "/../mcp",
            "/./mcp",
            "/c/mcp",
            "",
            "/",
            "/status/",
            "/%73tatus",
        ] {
            assert_eq!(decide("", bad, is), None, "{bad}");
        }
        for bad in ["/a/mcp", "/P/a/mcp", "/p/%61/mcp", "/p//a/mcp", "/pa/mcp", "/p/../a/mcp"] {
            assert_eq!(decide("/p", bad, is), None, "{bad} under /p");
        }
        // Even a configured name that would need decoding or is a dot segment names nothing.
        assert_eq!(decide("", "/../mcp", |_| true), None);
        assert_eq!(decide("", "/%61/mcp", |_| true), None);
    }

    #[test]
    fn the_principal_names_the_token_not_its_value() {
        let t = vec!["tok-1".to_string(), "tok-2".to_string()];
        assert_eq!(authenticate(&h("Bearer tok-2"), "global", &t).unwrap().to_string(), "global token #2");
        assert_eq!(authenticate(&h("tok-1"), "global", &t).unwrap().to_string(), "global token #1");
        assert_eq!(authenticate(&HeaderMap::new(), "global", &[]), Some(Principal::anonymous()));
        assert_eq!(authenticate(&h("tok-3"), "global", &t), None);
    }

    #[test]
    fn admin_tokens_exist_whenever_any_token_does() {
        let parse = |t: &str| crate::config::parse(t, Path::new("t"), Path::new("/"), &|_| None).unwrap();
        let c = parse(
            r#"{"mcpProxy":{"options":{"authTokens":["G"]}},"mcpServers":{"a":{"command":"x","options":{"authTokens":["A"]}}}}"#,
        );
        assert_eq!(c.admin_tokens(), ["G"]);
        let c = parse(
            r#"{"mcpServers":{"a":{"command":"x","options":{"authTokens":["A"]}},"b":{"command":"x","options":{"authTokens":["B","A"]}}}}"#,
        );
        assert_eq!(c.admin_tokens(), ["A", "B"]);
        let c = parse(r#"{"mcpServers":{"a":{"command":"x"}}}"#);
        assert!(c.admin_tokens().is_empty());
    }

    fn edge(text: &str) -> Edge {
        Edge::new(&crate::config::parse(text, Path::new("t"), Path::new("/"), &|_| None).unwrap())
    }

    #[test]
    fn host_and_origin() {
        let e = edge(r#"{"mcpProxy":{"addr":"127.0.0.1:9090"}}"#);
        for ok in ["127.0.0.1:9090", "localhost:9090", "localhost", "[::1]:9090"] {
            assert!(e.host_ok(ok), "{ok}");
        }
        assert!(!e.host_ok("evil.example:9090"));
        assert!(e.origin_ok("http://localhost:3000") && e.origin_ok("http://127.0.0.1:9090"));
        assert!(!e.origin_ok("https://evil.example") && !e.origin_ok("null"));

        let e = edge(
            r#"{"mcpProxy":{"addr":":9090","baseURL":"https://mcp.example.com/x","options":{"authTokens":["t"]}},"mcpbox":{"allowedHosts":["alt.example"],"allowedOrigins":["https://app.example"]}}"#,
        );
        assert!(e.host_ok("mcp.example.com") && e.host_ok("alt.example:9090") && e.host_ok("203.0.113.5:9090"));
        assert!(!e.host_ok("rebind.evil.example"));
        assert!(e.origin_ok("https://mcp.example.com") && e.origin_ok("https://app.example"));
        assert!(!e.origin_ok("http://localhost:3000"), "loopback origins only when bound to loopback");
    }
}

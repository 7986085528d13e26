//! Edge security: bearer tokens, Host and Origin checks.

use std::net::IpAddr;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::Shared;
use crate::config::{split_host_port, Config};

pub struct Edge {
    loopback: bool,
    unspecified: bool,
    bind_host: String,
    base_host: Option<String>,
    base_origin: Option<String>,
    hosts: Vec<String>,
    origins: Vec<String>,
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

pub async fn host_origin(State(st): State<Shared>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path == "/healthz" || path == "/readyz" {
        return next.run(req).await;
    }
    let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).or_else(|| req.uri().authority().map(|a| a.as_str()));
    if !host.is_some_and(|h| st.edge.host_ok(h)) {
        tracing::warn!(host = ?host, "request refused: Host not allowed");
        return (StatusCode::FORBIDDEN, "Host not allowed\n").into_response();
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let ok = origin.to_str().is_ok_and(|o| st.edge.origin_ok(o));
        if !ok {
            tracing::warn!(origin = ?origin, "request refused: Origin not allowed");
            return (StatusCode::FORBIDDEN, "Origin not allowed\n").into_response();
        }
    }
    next.run(req).await
}

/// `Authorization: Bearer T` or a bare `T`; true when `tokens` is empty (open).
pub fn authorized(headers: &HeaderMap, tokens: &[String]) -> bool {
    if tokens.is_empty() {
        return true;
    }
    let Some(given) = headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes) else { return false };
    let given = match given.get(..7) {
        Some(p) if p.eq_ignore_ascii_case(b"bearer ") => &given[7..],
        _ => given,
    };
    let given = given.trim_ascii();
    let mut ok = subtle::Choice::from(0);
    for t in tokens {
        ok |= given.ct_eq(t.as_bytes());
    }
    ok.into()
}

/// The server a path names (first segment after the prefix), if any.
fn server_of<'a>(st: &Shared, path: &'a str) -> Option<&'a str> {
    let rest = path.strip_prefix(st.prefix.as_str()).unwrap_or(path);
    let seg = rest.trim_start_matches('/').split('/').next()?;
    st.cfg.servers.contains_key(seg).then_some(seg)
}

pub async fn auth(State(st): State<Shared>, req: Request, next: Next) -> Response {
    let path = req.extensions().get::<axum::extract::OriginalUri>().map(|u| u.path().to_owned()).unwrap_or_else(|| req.uri().path().to_owned());
    let tokens = st.cfg.tokens_for(server_of(&st, &path));
    if !authorized(req.headers(), tokens) {
        return (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], "unauthorized\n").into_response();
    }
    next.run(req).await
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

        let e = edge(r#"{"mcpProxy":{"addr":":9090","baseURL":"https://mcp.example.com/x","options":{"authTokens":["t"]}},"mcpbox":{"allowedHosts":["alt.example"],"allowedOrigins":["https://app.example"]}}"#);
        assert!(e.host_ok("mcp.example.com") && e.host_ok("alt.example:9090") && e.host_ok("203.0.113.5:9090"));
        assert!(!e.host_ok("rebind.evil.example"));
        assert!(e.origin_ok("https://mcp.example.com") && e.origin_ok("https://app.example"));
        assert!(!e.origin_ok("http://localhost:3000"), "loopback origins only when bound to loopback");
    }
}

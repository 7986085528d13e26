//! `config::parse` (mcpbox.json): any text is a config or an error, never a panic; and a config
//! that parses is one the edge can be built from, whose own `baseURL` passes its Host and Origin
//! checks.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mcpbox::config;
use mcpbox::http::edge::Edge;

fn getenv(k: &str) -> Option<String> {
    match k {
        "MCPBOX_TOKEN" => Some("fuzz-token".into()),
        "MCPBOX_DEMO_DIR" => Some("/tmp/mcpbox-fuzz-demo".into()),
        "HOME" => Some("/root".into()),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(cfg) = config::parse(text, Path::new("fuzz.json"), Path::new("/nonexistent-fuzz-dir"), &getenv) else { return };
    let _ = cfg.check_exposure(false);
    let _ = cfg.check_exposure(true);
    for name in cfg.servers.keys() {
        let _ = cfg.tokens_for(Some(name));
    }
    let edge = Edge::new(&cfg);
    if let Some(b) = &cfg.proxy.base_url {
        let host = match b.port {
            Some(p) => format!("{}:{p}", b.host),
            None => b.host.clone(),
        };
        assert!(edge.host_ok(&host), "Host {host:?} of baseURL {b:?} refused");
        assert!(edge.origin_ok(&b.origin()), "Origin {:?} of baseURL {b:?} refused", b.origin());
    }
});

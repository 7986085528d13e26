//! `http::edge::decide`, the one decision of which server a request path is for: a decided server
//! is exactly a configured name, reached only by its canonical path; a path with `%`, a dot
//! segment or an empty segment decides nothing.
//!
//! Input: line 1 the `baseURL` (its path is the prefix; empty: none), line 2 the configured server
//! names, comma-separated, the rest the request path as it arrived.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mcpbox::config::BaseUrl;
use mcpbox::http::edge::{decide, Endpoint, Target};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut parts = text.splitn(3, '\n');
    let (Some(base), Some(names), Some(path)) = (parts.next(), parts.next(), parts.next()) else { return };
    let prefix = if base.is_empty() {
        String::new()
    } else {
        match BaseUrl::parse(base) {
            Ok(b) => b.path,
            Err(_) => return,
        }
    };
    let names: Vec<&str> = names.split(',').collect();
    let Some(target) = decide(&prefix, path, |n| names.contains(&n)) else { return };

    let fixed = matches!(target, Target::Health | Target::Ready | Target::Status | Target::Metrics);
    if fixed {
        assert!(matches!(path, "/healthz" | "/readyz" | "/status" | "/metrics"), "{path:?} decided {target:?}");
        return;
    }
    let Target::Server { name, endpoint } = &target else { unreachable!() };
    assert!(names.contains(&name.as_str()), "{path:?} decided server {name:?}, not one of {names:?}");
    let ep = match endpoint {
        Endpoint::Sse => "sse",
        Endpoint::Message => "message",
        Endpoint::Mcp => "mcp",
    };
    assert_eq!(path, format!("{prefix}/{name}/{ep}"), "decided from a non-canonical path (prefix {prefix:?})");
    assert!(!path.contains('%'), "{path:?} (prefix {prefix:?}) has a %, decided {target:?}");
    assert!(!path.contains("//"), "{path:?} (prefix {prefix:?}) has an empty segment, decided {target:?}");
    assert!(
        !path.split('/').any(|s| s == "." || s == ".."),
        "{path:?} (prefix {prefix:?}) has a dot segment, decided {target:?}"
    );
});

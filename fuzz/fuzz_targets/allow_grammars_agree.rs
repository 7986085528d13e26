//! The two `[network] allow` grammars agree: an entry the policy loader accepts is one the egress
//! proxy's allow-list parser (`netproxy::AllowList::parse`, used at launch) accepts, and the
//! other way round. A disagreement is a policy that `mcpbox policy check` passes and that then
//! fails at launch, or a proxy entry no policy can express.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mcpbox::netproxy::AllowList;
use mcpbox::policy::{self, LoadContext};

fuzz_target!(|data: &[u8]| {
    let Ok(entry) = std::str::from_utf8(data) else { return };
    let mut network = toml::Table::new();
    network.insert("mode".into(), "proxy".into());
    network.insert("allow".into(), toml::Value::Array(vec![entry.into()]));
    let mut table = toml::Table::new();
    table.insert("network".into(), network.into());
    let by_policy = policy::load_inline(table, Path::new("/nonexistent-fuzz-dir"), &LoadContext::default());
    if let Err(e) = &by_policy {
        let msg = e.to_string();
        assert!(msg.contains("allow"), "the policy failed for a reason other than its allow entry: {msg}");
    }
    let by_proxy = AllowList::parse(&[entry.to_string()]);
    assert_eq!(
        by_policy.is_ok(),
        by_proxy.is_ok(),
        "allow entry {entry:?}: policy says {:?}, proxy says {:?}",
        by_policy.as_ref().map(|_| "ok").map_err(|e| e.to_string()),
        by_proxy.as_ref().map(|_| "ok").map_err(|e| e.to_string()),
    );
});

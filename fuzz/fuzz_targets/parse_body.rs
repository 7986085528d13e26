//! `http::parse_body`: any request body is either messages that are JSON-RPC 2.0, or a JSON-RPC
//! error response to send back; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mcpbox::http::{parse_body, Parsed};
use serde_json::Value;

fn is_message(v: &Value) -> bool {
    let Some(o) = v.as_object() else { return false };
    let id_ok = match o.get("id") {
        None => true,
        Some(id) => id.is_string() || id.is_number() || (id.is_null() && !o.contains_key("method")),
    };
    id_ok
        && o.get("jsonrpc").and_then(Value::as_str) == Some("2.0")
        && (o.get("method").is_some_and(Value::is_string) || (o.contains_key("id") && (o.contains_key("result") || o.contains_key("error"))))
}

fuzz_target!(|body: &[u8]| {
    match parse_body(body) {
        Ok(Parsed::One(v)) => assert!(is_message(&v), "accepted {v}"),
        Ok(Parsed::Batch(items)) => {
            assert!(!items.is_empty(), "an empty batch was accepted");
            for v in &items {
                assert!(is_message(v), "accepted {v} in a batch");
            }
        }
        Err(e) => {
            assert_eq!(e["jsonrpc"], "2.0", "error response {e}");
            let code = e["error"]["code"].as_i64();
            assert!(matches!(code, Some(-32700 | -32600)), "error response {e}");
            let id = &e["id"];
            assert!(id.is_null() || id.is_string() || id.is_number(), "error response id {id}");
            // The response must itself serialise (it is written back to the client).
            serde_json::to_vec(&e).unwrap();
        }
    }
});

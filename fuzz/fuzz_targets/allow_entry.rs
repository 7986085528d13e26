//! `netproxy::AllowList::parse`, one `[network] allow` entry: never a panic; an entry it accepts
//! is matched by the very host and port it names (and a wildcard by a subdomain of it), in any
//! ASCII case.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use mcpbox::netproxy::{AllowList, Host, Match};

fuzz_target!(|data: &[u8]| {
    let Ok(entry) = std::str::from_utf8(data) else { return };
    let Ok(list) = AllowList::parse(&[entry.to_string()]) else { return };
    assert!(!list.is_empty(), "`{entry}` parsed to an empty list");
    let upper = AllowList::parse(&[entry.to_ascii_uppercase()]);
    assert!(upper.is_ok(), "`{entry}` is accepted, its upper case is not: {upper:?}");

    let e = entry.trim();
    let (host, port) = e.rsplit_once(':').expect("an accepted entry has a port");
    let port: u16 = port.parse().expect("an accepted entry has a numeric port");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let (target, want) = match host.strip_prefix("*.") {
        Some(suffix) => (format!("x.{suffix}"), Match::Wildcard),
        None => (host.to_string(), Match::Exact),
    };
    let target = match target.parse::<IpAddr>() {
        Ok(ip) => Host::Ip(ip),
        Err(_) => Host::Name(target.strip_suffix('.').unwrap_or(&target).to_ascii_lowercase()),
    };
    assert_eq!(list.check(&target, port), Some(want), "`{entry}` does not match {target:?} port {port}");
    if port > 1 {
        assert_eq!(list.check(&target, port - 1), None, "`{entry}` matches port {}", port - 1);
    }
});

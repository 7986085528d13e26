//! The grammar of `[network] allow` entries and of `host[:port]` authorities: the one place that
//! parses them. `policy check`, `serve --check`, `/readyz` and the egress proxy
//! (`crate::netproxy`, which takes the typed entries) all see what this module accepts.
//!
//! An entry is `host:port`, `*.example.com:443`, `127.0.0.1:8080` or `[::1]:8080`; the port is
//! always required. Names are case-folded and lose a trailing dot; `*` is only a whole first
//! label, over at least two labels (`*.com` is too broad).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// A host as written in an allow-list entry or a request target.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name, lowercased, without a trailing dot.
    Name(String),
    /// An IPv4 or IPv6 literal.
    Ip(IpAddr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
        }
    }
}

/// The host part of an allow-list entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// This host exactly.
    Exact(Host),
    /// Any strict subdomain of this name (`*.example.com` → `a.example.com`, `a.b.example.com`,
    /// not `example.com`).
    Subdomains(String),
}

/// One `[network] allow` entry: a host pattern and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AllowEntry {
    pub host: HostPattern,
    pub port: u16,
}

impl fmt::Display for AllowEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            HostPattern::Exact(h) => write!(f, "{h}:{}", self.port),
            HostPattern::Subdomains(s) => write!(f, "*.{s}:{}", self.port),
        }
    }
}

/// Why an allow-list entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllowEntryError {
    #[error("[network] allow `{entry}`: a port is required, e.g. `{entry}:443`")]
    MissingPort { entry: String },
    #[error("[network] allow `{entry}`: the port must be a number from 1 to 65535")]
    BadPort { entry: String },
    #[error("[network] allow `{entry}`: {reason}")]
    BadHost { entry: String, reason: &'static str },
    #[error("[network] allow `{entry}`: {reason}")]
    BadWildcard { entry: String, reason: &'static str },
}

impl FromStr for AllowEntry {
    type Err = AllowEntryError;

    fn from_str(raw: &str) -> Result<AllowEntry, AllowEntryError> {
        let entry = raw.trim();
        let bad_host = |reason| AllowEntryError::BadHost { entry: entry.to_string(), reason };
        if entry.is_empty() {
            return Err(bad_host("empty entry"));
        }
        if entry.contains("://") || entry.contains('/') {
            return Err(bad_host("write `host:port`, without a scheme or a path"));
        }
        let (host_part, port) = split_host_port(entry).map_err(|e| match e {
            AuthorityError::MissingPort => AllowEntryError::MissingPort { entry: entry.to_string() },
            AuthorityError::BadPort => AllowEntryError::BadPort { entry: entry.to_string() },
            AuthorityError::BadHost(reason) => bad_host(reason),
        })?;
        let port = match port {
            None => return Err(AllowEntryError::MissingPort { entry: entry.to_string() }),
            Some(0) => return Err(AllowEntryError::BadPort { entry: entry.to_string() }),
            Some(p) => p,
        };

        if let Some(suffix) = host_part.strip_prefix("*.") {
            let bad_wild = |reason| AllowEntryError::BadWildcard { entry: entry.to_string(), reason };
            let name = match parse_host(suffix) {
                Ok(Host::Name(n)) => n,
                Ok(Host::Ip(_)) => return Err(bad_wild("a wildcard applies to names, not IP addresses")),
                Err(reason) => return Err(bad_wild(reason)),
            };
            if !name.contains('.') {
                return Err(bad_wild(
                    "a wildcard over a whole top-level domain is too broad; name at least two labels (`*.example.com`)",
                ));
            }
            return Ok(AllowEntry { host: HostPattern::Subdomains(name), port });
        }
        if host_part.contains('*') {
            return Err(AllowEntryError::BadWildcard {
                entry: entry.to_string(),
                reason: "`*` is only allowed as the whole first label: `*.example.com:443`",
            });
        }
        let host = parse_host(host_part).map_err(bad_host)?;
        Ok(AllowEntry { host: HostPattern::Exact(host), port })
    }
}

// A policy travels as JSON (to sandbox-init, in tests): an entry is its text there too.
impl serde::Serialize for AllowEntry {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for AllowEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Why a `host[:port]` authority could not be split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    #[error("a port is required after `:`")]
    MissingPort,
    #[error("the port must be a number from 0 to 65535")]
    BadPort,
    #[error("{0}")]
    BadHost(&'static str),
}

/// Splits `host:port`, `[v6]:port`, `host`, `[v6]`. The host comes back as written (not yet
/// checked as a name; the brackets of an IPv6 address stripped, the address checked); the port
/// is 0..=65535 in decimal digits, absent when there is no `:`.
pub fn split_host_port(s: &str) -> Result<(&str, Option<u16>), AuthorityError> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let close = rest.find(']').ok_or(AuthorityError::BadHost("unclosed `[` in an IPv6 address"))?;
        let host = &rest[..close];
        let after = &rest[close + 1..];
        if host.parse::<Ipv6Addr>().is_err() {
            return Err(AuthorityError::BadHost("not an IPv6 address inside `[…]`"));
        }
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(p) => (host, Some(p)),
                None => return Err(AuthorityError::BadHost("unexpected text after `]`")),
            },
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, _)) if h.contains(':') => {
                return Err(AuthorityError::BadHost("IPv6 addresses go in brackets: `[::1]:8080`"))
            }
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let port = match port {
        None => None,
        Some("") => return Err(AuthorityError::MissingPort),
        Some(p) if !p.bytes().all(|b| b.is_ascii_digit()) || p.len() > 5 => return Err(AuthorityError::BadPort),
        Some(p) => Some(p.parse::<u16>().map_err(|_| AuthorityError::BadPort)?),
    };
    Ok((host, port))
}

/// Parses a host (no port, no brackets) into a name or an IP literal.
///
/// Names whose last label looks numeric (`127.1`, `2130706433`, `0x7f`) are refused: resolvers
/// read them as IPv4 addresses, which would let a "name" smuggle in an address.
pub fn parse_host(s: &str) -> Result<Host, &'static str> {
    if s.is_empty() {
        return Err("empty host");
    }
    if let Ok(ip) = s.parse::<Ipv4Addr>() {
        return Ok(Host::Ip(IpAddr::V4(ip)));
    }
    if let Ok(ip) = s.parse::<Ipv6Addr>() {
        return Ok(Host::Ip(IpAddr::V6(ip)));
    }
    let name = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
    if name.is_empty() || name.len() > 253 {
        return Err("a host name must be 1 to 253 characters long");
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("every label of a host name must be 1 to 63 characters long");
        }
        if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err("a host name may contain only letters, digits, `-`, `_` and dots");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label of a host name cannot start or end with `-`");
        }
    }
    let last = name.rsplit('.').next().unwrap_or_default();
    let hex = last.strip_prefix("0x").is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
    if last.bytes().all(|b| b.is_ascii_digit()) || hex {
        return Err("not a valid IP address, and not a host name (the last label is numeric)");
    }
    Ok(Host::Name(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(s: &str) -> Result<AllowEntry, AllowEntryError> {
        s.parse()
    }

    #[test]
    fn the_documented_forms_parse_and_print_back_canonically() {
        for (raw, canonical) in [
            ("api.example.com:443", "api.example.com:443"),
            ("*.Example.org:443", "*.example.org:443"),
            ("127.0.0.1:8080", "127.0.0.1:8080"),
            ("[::1]:8080", "[::1]:8080"),
            ("Mixed.Case.COM.:80", "mixed.case.com:80"),
        ] {
            let e = entry(raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
            assert_eq!(e.to_string(), canonical);
            assert_eq!(entry(canonical).unwrap(), e, "{canonical} parses back to the same entry");
        }
        assert_eq!(entry("[::1]:8080").unwrap().host, HostPattern::Exact(Host::Ip("::1".parse().unwrap())));
    }

    #[test]
    fn a_wildcard_over_a_top_level_domain_is_refused() {
        assert!(matches!(entry("*.com:443"), Err(AllowEntryError::BadWildcard { .. })));
        assert!(matches!(entry("*.1.2.3:443"), Err(AllowEntryError::BadWildcard { .. })));
        assert!(matches!(entry("a*.example.com:443"), Err(AllowEntryError::BadWildcard { .. })));
    }

    #[test]
    fn ports_are_required_and_in_range() {
        assert!(matches!(entry("example.com"), Err(AllowEntryError::MissingPort { .. })));
        assert!(matches!(entry("example.com:"), Err(AllowEntryError::MissingPort { .. })));
        for bad in ["example.com:0", "example.com:65536", "example.com:https", "example.com:+80"] {
            assert!(matches!(entry(bad), Err(AllowEntryError::BadPort { .. })), "{bad}");
        }
    }

    #[test]
    fn authorities_split_with_and_without_a_port() {
        assert_eq!(split_host_port("example.com:8080").unwrap(), ("example.com", Some(8080)));
        assert_eq!(split_host_port("example.com").unwrap(), ("example.com", None));
        assert_eq!(split_host_port("[::1]:0").unwrap(), ("::1", Some(0)));
        assert_eq!(split_host_port("[::1]").unwrap(), ("::1", None));
        assert_eq!(
            split_host_port("::1:80"),
            Err(AuthorityError::BadHost("IPv6 addresses go in brackets: `[::1]:8080`"))
        );
        assert_eq!(split_host_port("[zz]:80"), Err(AuthorityError::BadHost("not an IPv6 address inside `[…]`")));
        assert_eq!(split_host_port("h:99999"), Err(AuthorityError::BadPort));
    }

    #[test]
    fn entries_travel_as_their_text() {
        let e = entry("*.example.com:443").unwrap();
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(json, "\"*.example.com:443\"");
        assert_eq!(serde_json::from_str::<AllowEntry>(&json).unwrap(), e);
        assert!(serde_json::from_str::<AllowEntry>("\"*.com:443\"").is_err());
    }
}

//! The policy file as written: serde structs with spans, before `extends`, `${…}` and checks.
//! Every table refuses unknown keys.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use toml::Spanned;

use super::Level;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPolicy {
    pub extends: Option<Spanned<Extends>>,
    #[serde(default)]
    pub filesystem: RawFilesystem,
    #[serde(default)]
    pub network: RawNetwork,
    #[serde(default)]
    pub env: RawEnv,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub seccomp: RawSeccomp,
    #[serde(default)]
    pub sandbox: RawSandbox,
    #[serde(default)]
    pub runtime: RawRuntime,
}

/// Keys of each table, for "expected one of" hints (kept next to the structs they describe).
pub(crate) const KEYS: &[(&str, &[&str])] = &[
    ("", &["extends", "filesystem", "network", "env", "limits", "seccomp", "sandbox", "runtime"]),
    ("filesystem", &["read", "write", "exec"]),
    ("network", &["mode", "allow", "connect_ports", "bind_ports"]),
    ("env", &["pass", "set"]),
    ("limits", &["memory", "pids", "open_files", "tmp", "file_size", "cpu", "disk"]),
    ("seccomp", &["extra_deny", "extra_allow"]),
    ("sandbox", &["level", "landlock_min_abi", "relax"]),
    ("runtime", &["node_flags"]),
];

#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a policy name or path, or a list of them")]
pub(crate) enum Extends {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFilesystem {
    #[serde(default)]
    pub read: Vec<Spanned<RawPath>>,
    #[serde(default)]
    pub write: Vec<Spanned<RawPath>>,
    #[serde(default)]
    pub exec: Vec<Spanned<RawPath>>,
}

/// `"/path"` or `{ path = "/path", optional = true }`.
#[derive(Debug)]
pub(crate) struct RawPath {
    pub path: String,
    pub optional: bool,
}

impl<'de> Deserialize<'de> for RawPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawPath;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a path string or { path = \"…\", optional = true }")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<RawPath, E> {
                Ok(RawPath { path: s.to_owned(), optional: false })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<RawPath, A::Error> {
                let (mut path, mut optional) = (None, None);
                while let Some(k) = m.next_key::<String>()? {
                    match k.as_str() {
                        "path" if path.is_none() => path = Some(m.next_value::<String>()?),
                        "optional" if optional.is_none() => optional = Some(m.next_value::<bool>()?),
                        "path" | "optional" => return Err(de::Error::duplicate_field("path")),
                        other => return Err(de::Error::unknown_field(other, &["path", "optional"])),
                    }
                }
                let path = path.ok_or_else(|| de::Error::missing_field("path"))?;
                Ok(RawPath { path, optional: optional.unwrap_or(false) })
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Mode {
    None,
    Host,
    Proxy,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Host => "host",
            Mode::Proxy => "proxy",
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNetwork {
    pub mode: Option<Spanned<Mode>>,
    #[serde(default)]
    pub allow: Vec<Spanned<String>>,
    pub connect_ports: Option<Spanned<Vec<u16>>>,
    pub bind_ports: Option<Spanned<Vec<u16>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEnv {
    #[serde(default)]
    pub pass: Vec<Spanned<String>>,
    #[serde(default)]
    pub set: BTreeMap<String, Spanned<String>>,
}

/// A size: integer bytes or a string with a unit.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a size: integer bytes or a string such as \"512M\"")]
pub(crate) enum RawSize {
    Bytes(i64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    pub memory: Option<Spanned<RawSize>>,
    pub pids: Option<Spanned<i64>>,
    pub open_files: Option<Spanned<i64>>,
    pub tmp: Option<Spanned<RawSize>>,
    pub file_size: Option<Spanned<RawSize>>,
    pub cpu: Option<Spanned<RawCpu>>,
    pub disk: Option<Spanned<RawSize>>,
}

/// Cores' worth of CPU time: `"1.5"`, `1.5` or `2`.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a number of cores, such as \"1.0\" or 0.5")]
pub(crate) enum RawCpu {
    Int(i64),
    Float(f64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSeccomp {
    #[serde(default)]
    pub extra_deny: Vec<Spanned<String>>,
    #[serde(default)]
    pub extra_allow: Vec<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSandbox {
    pub level: Option<Spanned<Level>>,
    pub landlock_min_abi: Option<Spanned<i64>>,
    pub relax: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRuntime {
    pub node_flags: Option<Spanned<Vec<Spanned<String>>>>,
}

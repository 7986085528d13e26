//! [`PolicyError`]: every message names the policy file, and the line where it is known.

use std::fmt;
use std::path::PathBuf;

/// Where something was written: a policy file (or `shipped:NAME.toml`, or `inline policy`) and,
/// when known, a 1-based line number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loc {
    pub file: String,
    pub line: Option<usize>,
}

impl Loc {
    pub fn new(file: impl Into<String>, line: Option<usize>) -> Self {
        Loc { file: file.into(), line }
    }
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{} line {}", self.file, line),
            None => f.write_str(&self.file),
        }
    }
}

/// Why a policy could not be loaded. `Display` always names the file (and line where known).
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy file {file}: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },

    #[error("policy `{reference}` not found (referenced from {from}); looked in: {}", searched.join(", "))]
    NotFound { reference: String, from: Loc, searched: Vec<String> },

    /// TOML syntax errors and type errors (a string where a list is expected, …).
    #[error("{message} ({loc})")]
    Toml { message: String, loc: Loc },

    #[error("unknown key `{key}` in {table} ({loc}){}", hint(expected))]
    UnknownKey { key: String, table: String, loc: Loc, expected: Vec<String> },

    #[error("undefined variable ${{{name}}} ({loc}); defined: {}", if defined.is_empty() { "none".to_string() } else { defined.join(", ") })]
    UndefinedVar { name: String, loc: Loc, defined: Vec<String> },

    /// A variable that names something of this host (a runtime's path) that was not found.
    #[error("${{{name}}} has no value on this host ({loc}): {why}")]
    Unavailable { name: String, why: String, loc: Loc },

    #[error("path {} does not exist ({loc}); write {{ path = \"{}\", optional = true }} if it may be absent", path.display(), path.display())]
    MissingPath { path: PathBuf, loc: Loc },

    #[error("`extends` cycle: {} ({loc})", chain.join(" -> "))]
    Cycle { chain: Vec<String>, loc: Loc },

    /// Any other validation error: bad path, size, port, name, conflicting settings.
    #[error("{message} ({loc})")]
    Invalid { message: String, loc: Loc },
}

fn hint(expected: &[String]) -> String {
    if expected.is_empty() {
        String::new()
    } else {
        format!("; expected one of: {}", expected.join(", "))
    }
}

impl PolicyError {
    pub(crate) fn invalid(message: impl Into<String>, loc: Loc) -> Self {
        PolicyError::Invalid { message: message.into(), loc }
    }
}

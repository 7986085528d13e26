//! How a configured server names its policy: a name or path, or an inline table from mcpbox.json.

use std::path::{Path, PathBuf};

use super::{
    load_detailed, load_inline_detailed, load_inline_with_notes, load_with_notes, LoadContext, Loaded, Policy,
    PolicyError,
};

/// Which policy a server uses.
#[derive(Debug, Clone)]
pub enum PolicyRef {
    /// A shipped policy name (`default`, `node`, …) or a path to a TOML file.
    Named(String),
    /// An inline policy (from `mcpbox.json`), in the TOML data model; relative `extends` are
    /// resolved against `base_dir`.
    Inline { value: toml::Table, base_dir: PathBuf },
}

impl PolicyRef {
    /// Load, resolve and validate the policy; notes say what was dropped (optional paths).
    pub fn load(&self, ctx: &LoadContext) -> Result<(Policy, Vec<String>), PolicyError> {
        match self {
            PolicyRef::Named(r) => load_with_notes(r, ctx),
            PolicyRef::Inline { value, base_dir } => load_inline_with_notes(value.clone(), Path::new(base_dir), ctx),
        }
    }

    /// [`PolicyRef::load`] without requiring paths under `unchecked_under` to exist when those
    /// directories do not exist yet (a server that never ran has no DATA or CACHE).
    pub fn load_detailed(&self, ctx: &LoadContext, unchecked_under: &[PathBuf]) -> Result<Loaded, PolicyError> {
        match self {
            PolicyRef::Named(r) => load_detailed(r, ctx, unchecked_under),
            PolicyRef::Inline { value, base_dir } => {
                load_inline_detailed(value.clone(), Path::new(base_dir), ctx, unchecked_under)
            }
        }
    }
}

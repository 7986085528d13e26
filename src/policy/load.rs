//! Loading: find the file, parse it, resolve `extends`, expand `${…}`, merge, validate.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use toml::Spanned;

use super::error::{Loc, PolicyError};
use super::raw::{self, Extends, Mode, RawCpu, RawPath, RawPolicy, RawSize};
use super::size::{parse_cpu, parse_size};
use super::{
    reserved_conflict, syscalls, AllowEntry, Env, ExpandError, Filesystem, Level, Limits, Network, PathRule, Policy,
    Relax, RuntimeFlags, SandboxReq, Seccomp,
};

/// The shipped policies, embedded in the binary. A new shipped policy is one line here.
pub const SHIPPED: &[(&str, &str)] = &[
    ("default", include_str!("../../policies/default.toml")),
    ("node", include_str!("../../policies/node.toml")),
    ("python", include_str!("../../policies/python.toml")),
    ("prepare-npm", include_str!("../../policies/prepare-npm.toml")),
    ("prepare-uv", include_str!("../../policies/prepare-uv.toml")),
    ("server-everything", include_str!("../../policies/server-everything.toml")),
    ("server-filesystem", include_str!("../../policies/server-filesystem.toml")),
    ("server-memory", include_str!("../../policies/server-memory.toml")),
    ("server-sequential-thinking", include_str!("../../policies/server-sequential-thinking.toml")),
    ("mcp-server-fetch", include_str!("../../policies/mcp-server-fetch.toml")),
    ("mcp-server-git", include_str!("../../policies/mcp-server-git.toml")),
    ("mcp-server-time", include_str!("../../policies/mcp-server-time.toml")),
];

/// Defaults applied after merging, for whatever no policy in the chain set. The one place they
/// are written down.
pub const DEFAULT_LIMITS: Limits = Limits {
    memory: Some(1 << 30), // 1G
    pids: Some(256),
    open_files: Some(1024),
    tmp: Some(64 << 20),      // 64M
    file_size: Some(1 << 30), // 1G
    // No CPU or disk limit unless a policy sets one: the shipped base policies do
    // (policies/default.toml: cpu = "1.0", disk = "1G", relaxed where the host cannot enforce
    // them), so that a policy written from scratch never fails to start for a limit it did not ask for.
    cpu: None,
    disk: None,
};
/// Network when no policy in the chain sets `[network] mode`: a namespace with only loopback.
pub const DEFAULT_NETWORK_MODE: &str = "none";
pub const DEFAULT_LEVEL: Level = Level::Full;
pub const DEFAULT_LANDLOCK_MIN_ABI: u8 = 1;

/// What loading needs from the caller.
#[derive(Debug, Clone, Default)]
pub struct LoadContext {
    /// What `${NAME}` may expand to (at least DATA and CACHE). Anything else is an error.
    pub vars: BTreeMap<String, String>,
    /// User policy directories, searched (in order) for bare names before the shipped policies.
    pub search_dirs: Vec<PathBuf>,
    /// Variables worked out only when a policy uses one (the runtimes' paths, `${PYTHON_STDLIB}`
    /// …: finding them runs the interpreter), asked after `vars`.
    pub lazy: Option<LazyVars>,
}

/// A lookup for variables that cost something to compute. `None`: not a name it knows;
/// `Some(Err(why))`: a name it knows that has no value on this host (the policy is refused,
/// saying why); `Some(Ok(value))`.
#[derive(Clone)]
pub struct LazyVars(pub std::sync::Arc<LazyFn>);

/// See [`LazyVars`].
pub type LazyFn = dyn Fn(&str) -> Option<Result<String, String>> + Send + Sync;

impl std::fmt::Debug for LazyVars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LazyVars(..)")
    }
}

/// The directories searched for a bare policy name before the shipped policies: the one place
/// that decides them, for every command (`serve`, `prepare`, and `run`, `policy check`,
/// `learn`, `suggest`, `diff` with `--config`).
///
/// A bare name `NAME` (letters, digits, `-`, `_`, `.`) is looked up, in order:
///  1. `policies/NAME.toml` in the directory of the config file, when there is one (`serve
///     --config FILE`, or `--config FILE` on the other commands); a `NAME.toml` there that
///     extends `NAME` extends the shipped one;
///  2. the shipped policy `NAME` (embedded in the binary).
///
/// Nothing else is searched, the working directory least of all: MCP clients start `mcpbox
/// run` from wherever they are, a cloned repository with a `policies/` of its own included. A
/// reference with a `/` or ending in `.toml` is a file and is never searched for: relative to
/// the config's directory when a config names it, to the working directory on the command line.
pub fn search_dirs(config: Option<&Path>) -> Vec<PathBuf> {
    let Some(config) = config else { return Vec::new() };
    let dir = match config.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // Absolute, so that every message and `files read` line names the same file whatever the
    // command's working directory (lexically: no symlink is resolved).
    let dir: PathBuf = std::path::absolute(dir)
        .unwrap_or_else(|_| dir.to_path_buf())
        .components()
        .filter(|c| *c != Component::CurDir)
        .collect();
    vec![dir.join("policies")]
}

/// Names of the shipped policies, in table order.
pub fn shipped_names() -> Vec<&'static str> {
    SHIPPED.iter().map(|(n, _)| *n).collect()
}

/// Load a policy by shipped/user name (`node`) or path (contains `/` or ends with `.toml`).
pub fn load(reference: &str, ctx: &LoadContext) -> Result<Policy, PolicyError> {
    load_with_notes(reference, ctx).map(|(p, _)| p)
}

/// [`load`], also returning notes: optional paths that do not exist and were dropped, and other
/// things the operator should see at start.
pub fn load_with_notes(reference: &str, ctx: &LoadContext) -> Result<(Policy, Vec<String>), PolicyError> {
    let l = Loader::new(ctx, &[]);
    l.run(Start::Reference(reference)).map(|d| (d.policy, d.notes))
}

/// An inline policy (from `mcpbox.json`) in the TOML data model. Relative `extends` resolve
/// against `base_dir`. Errors carry no line numbers (there is no file).
pub fn load_inline(table: toml::Table, base_dir: &Path, ctx: &LoadContext) -> Result<Policy, PolicyError> {
    load_inline_with_notes(table, base_dir, ctx).map(|(p, _)| p)
}

/// [`load_inline`] with notes, like [`load_with_notes`].
pub fn load_inline_with_notes(
    table: toml::Table,
    base_dir: &Path,
    ctx: &LoadContext,
) -> Result<(Policy, Vec<String>), PolicyError> {
    let l = Loader::new(ctx, &[]);
    l.run(Start::Inline(table, base_dir)).map(|d| (d.policy, d.notes))
}

/// The result of [`load_detailed`]: the policy, notes, and every file read (in `extends` order).
#[derive(Debug, Clone)]
pub struct Loaded {
    pub policy: Policy,
    pub notes: Vec<String>,
    pub files: Vec<String>,
}

/// [`load_with_notes`], also listing the files read, and not checking existence of paths under
/// `unchecked_under` when that directory itself does not exist (for `mcpbox policy check`, where
/// the server's DATA/CACHE dirs may not have been made yet). Such paths are kept, with a note.
pub fn load_detailed(reference: &str, ctx: &LoadContext, unchecked_under: &[PathBuf]) -> Result<Loaded, PolicyError> {
    Loader::new(ctx, unchecked_under).run(Start::Reference(reference))
}

/// [`load_inline_with_notes`] with the files read and `unchecked_under` as in [`load_detailed`].
pub fn load_inline_detailed(
    table: toml::Table,
    base_dir: &Path,
    ctx: &LoadContext,
    unchecked_under: &[PathBuf],
) -> Result<Loaded, PolicyError> {
    Loader::new(ctx, unchecked_under).run(Start::Inline(table, base_dir))
}

// ---------------------------------------------------------------------------------------------

enum Start<'a> {
    Reference(&'a str),
    Inline(toml::Table, &'a Path),
}

/// One policy document.
struct Doc {
    /// For messages: the path as given, `shipped:NAME.toml`, or `inline policy`.
    name: String,
    /// For cycle detection: canonical path or `shipped:NAME`.
    id: String,
    text: String,
    /// Where relative `extends` resolve from; None for shipped policies.
    base_dir: Option<PathBuf>,
    /// False when `text` was rendered from an inline table: its line numbers mean nothing.
    lines: bool,
}

impl Doc {
    fn loc(&self, span: std::ops::Range<usize>) -> Loc {
        let line = self.lines.then(|| line_of(&self.text, span.start));
        Loc::new(self.name.clone(), line)
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end].iter().filter(|b| **b == b'\n').count() + 1
}

#[derive(Debug, Clone)]
struct Rule {
    path: PathBuf,
    optional: bool,
    loc: Loc,
    /// The lazily computed variable (a runtime's path) this path came from, if any.
    lazy_var: Option<String>,
}

/// One file's contribution (already expanded), or the merge of several.
#[derive(Debug, Default)]
struct Layer {
    read: Vec<Rule>,
    write: Vec<Rule>,
    exec: Vec<Rule>,
    mode: Option<(Mode, Loc)>,
    allow: Vec<(AllowEntry, Loc)>,
    connect_ports: Option<(Vec<u16>, Loc)>,
    bind_ports: Option<(Vec<u16>, Loc)>,
    pass: Vec<String>,
    set: BTreeMap<String, String>,
    memory: Option<u64>,
    pids: Option<u64>,
    open_files: Option<u64>,
    tmp: Option<u64>,
    file_size: Option<u64>,
    cpu: Option<u32>,
    disk: Option<u64>,
    relax: Option<Relax>,
    extra_deny: Vec<(String, Loc)>,
    extra_allow: Vec<(String, Loc)>,
    level: Option<Level>,
    landlock_min_abi: Option<u8>,
    node_flags: Option<Vec<String>>,
}

impl Layer {
    /// Apply `child` on top of `self` (parents first, child last).
    fn apply(&mut self, child: Layer) {
        fn cat_rules(into: &mut Vec<Rule>, from: Vec<Rule>) {
            for r in from {
                match into.iter_mut().find(|e| e.path == r.path) {
                    // Required anywhere means required.
                    Some(e) => e.optional &= r.optional,
                    None => into.push(r),
                }
            }
        }
        fn cat<T: PartialEq>(into: &mut Vec<T>, from: Vec<T>, same: impl Fn(&T, &T) -> bool) {
            for x in from {
                if !into.iter().any(|e| same(e, &x)) {
                    into.push(x);
                }
            }
        }
        cat_rules(&mut self.read, child.read);
        cat_rules(&mut self.write, child.write);
        cat_rules(&mut self.exec, child.exec);
        self.mode = child.mode.or(self.mode.take());
        cat(&mut self.allow, child.allow, |a, b| a.0 == b.0);
        self.connect_ports = child.connect_ports.or(self.connect_ports.take());
        self.bind_ports = child.bind_ports.or(self.bind_ports.take());
        cat(&mut self.pass, child.pass, |a, b| a == b);
        self.set.extend(child.set);
        self.memory = child.memory.or(self.memory);
        self.pids = child.pids.or(self.pids);
        self.open_files = child.open_files.or(self.open_files);
        self.tmp = child.tmp.or(self.tmp);
        self.file_size = child.file_size.or(self.file_size);
        self.cpu = child.cpu.or(self.cpu);
        self.disk = child.disk.or(self.disk);
        self.relax = child.relax.or(self.relax);
        cat(&mut self.extra_deny, child.extra_deny, |a, b| a.0 == b.0);
        cat(&mut self.extra_allow, child.extra_allow, |a, b| a.0 == b.0);
        self.level = child.level.or(self.level);
        self.landlock_min_abi = child.landlock_min_abi.or(self.landlock_min_abi);
        // A list, replaced as a whole: `node_flags = []` turns the base's off.
        self.node_flags = child.node_flags.or(self.node_flags.take());
    }
}

struct Loader<'a> {
    ctx: &'a LoadContext,
    unchecked_under: &'a [PathBuf],
    files: std::cell::RefCell<Vec<String>>,
}

impl<'a> Loader<'a> {
    fn new(ctx: &'a LoadContext, unchecked_under: &'a [PathBuf]) -> Self {
        Loader { ctx, unchecked_under, files: Default::default() }
    }

    fn run(self, start: Start<'_>) -> Result<Loaded, PolicyError> {
        let top = match start {
            Start::Reference(r) => self.find(r, None, Loc::new("command line", None))?,
            Start::Inline(table, base) => {
                let text = toml::to_string(&table).map_err(|e| PolicyError::Toml {
                    message: format!("cannot read inline policy: {e}"),
                    loc: Loc::new("inline policy", None),
                })?;
                Doc {
                    name: "inline policy".into(),
                    id: "inline".into(),
                    text,
                    base_dir: Some(base.to_path_buf()),
                    lines: false,
                }
            }
        };
        let source = top.name.clone();
        let merged = self.resolve(top, &mut Vec::new())?;
        let mut notes = Vec::new();
        let policy = self.finish(source, merged, &mut notes)?;
        Ok(Loaded { policy, notes, files: self.files.into_inner() })
    }

    /// Find a referenced policy: a path (contains `/` or ends in `.toml`) or a bare name.
    fn find(&self, reference: &str, from: Option<&Doc>, at: Loc) -> Result<Doc, PolicyError> {
        if reference.contains('/') || reference.ends_with(".toml") {
            let p = Path::new(reference);
            let path = if p.is_absolute() {
                p.to_path_buf()
            } else {
                match from {
                    None => p.to_path_buf(),
                    // Lexically drop `.` components so messages read `dir/b.toml`, not `dir/./b.toml`.
                    Some(Doc { base_dir: Some(b), .. }) => {
                        b.join(p).components().filter(|c| *c != Component::CurDir).collect()
                    }
                    Some(Doc { base_dir: None, .. }) => {
                        return Err(PolicyError::invalid(
                            format!("a shipped policy cannot extend the relative path `{reference}`"),
                            at,
                        ))
                    }
                }
            };
            return read_file(&path, at);
        }
        if reference.is_empty() || !reference.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(PolicyError::invalid(
                format!("`{reference}` is not a policy name (letters, digits, - _ .) nor a path"),
                at,
            ));
        }
        let mut searched = Vec::new();
        for dir in &self.ctx.search_dirs {
            let cand = dir.join(format!("{reference}.toml"));
            searched.push(cand.display().to_string());
            if cand.is_file() {
                let doc = read_file(&cand, at.clone())?;
                // A user `node.toml` that extends "node" means the next one (e.g. the shipped one).
                if from.is_some_and(|f| f.id == doc.id) {
                    continue;
                }
                return Ok(doc);
            }
        }
        if let Some((name, text)) = SHIPPED.iter().find(|(n, _)| *n == reference) {
            return Ok(Doc {
                name: format!("shipped:{name}.toml"),
                id: format!("shipped:{name}"),
                text: (*text).to_string(),
                base_dir: None,
                lines: true,
            });
        }
        searched.push(format!("shipped policies ({})", shipped_names().join(", ")));
        if self.ctx.search_dirs.is_empty() {
            // On the command line: the name may be one of a config's (see `search_dirs`).
            searched.push("no config's policies/ directory (--config FILE searches its policies/ first)".into());
        }
        Err(PolicyError::NotFound { reference: reference.into(), from: at, searched })
    }

    /// Parse `doc`, resolve its parents, and return the merge (parents first, `doc` last).
    fn resolve(&self, doc: Doc, stack: &mut Vec<(String, String)>) -> Result<Layer, PolicyError> {
        self.files.borrow_mut().push(doc.name.clone());
        let raw = parse(&doc)?;
        let mut merged = Layer::default();
        if let Some(ext) = &raw.extends {
            let at = doc.loc(ext.span());
            let refs: Vec<&str> = match ext.get_ref() {
                Extends::One(s) => vec![s.as_str()],
                Extends::Many(v) => v.iter().map(String::as_str).collect(),
            };
            stack.push((doc.id.clone(), doc.name.clone()));
            for r in refs {
                let parent = self.find(r, Some(&doc), at.clone())?;
                if let Some(i) = stack.iter().position(|(id, _)| *id == parent.id) {
                    let mut chain: Vec<String> = stack[i..].iter().map(|(_, n)| n.clone()).collect();
                    chain.push(parent.name.clone());
                    return Err(PolicyError::Cycle { chain, loc: at });
                }
                let layer = self.resolve(parent, stack)?;
                merged.apply(layer);
            }
            stack.pop();
        }
        merged.apply(self.layer(&doc, raw)?);
        Ok(merged)
    }

    /// One document's own settings, expanded and checked (existence is checked after merging).
    fn layer(&self, doc: &Doc, raw: RawPolicy) -> Result<Layer, PolicyError> {
        let mut l = Layer::default();
        let paths = |v: Vec<Spanned<RawPath>>| -> Result<Vec<Rule>, PolicyError> {
            v.into_iter()
                .map(|s| {
                    let loc = doc.loc(s.span());
                    let rp = s.into_inner();
                    let expanded = self.expand(&rp.path, &loc)?;
                    let path = normalise(&expanded).map_err(|m| PolicyError::invalid(m, loc.clone()))?;
                    let lazy_var = rp
                        .path
                        .split("${")
                        .skip(1)
                        .filter_map(|r| r.split_once('}'))
                        .map(|(n, _)| n)
                        .find(|n| !self.ctx.vars.contains_key(*n))
                        .map(str::to_string);
                    Ok(Rule { path, optional: rp.optional, loc, lazy_var })
                })
                .collect()
        };
        l.read = paths(raw.filesystem.read)?;
        l.write = paths(raw.filesystem.write)?;
        l.exec = paths(raw.filesystem.exec)?;

        let n = raw.network;
        l.mode = n.mode.map(|m| (*m.get_ref(), doc.loc(m.span())));
        for a in n.allow {
            let loc = doc.loc(a.span());
            let entry =
                a.get_ref().parse::<AllowEntry>().map_err(|e| PolicyError::invalid(e.to_string(), loc.clone()))?;
            l.allow.push((entry, loc));
        }
        let ports = |p: Option<Spanned<Vec<u16>>>, key: &str| -> Result<Option<(Vec<u16>, Loc)>, PolicyError> {
            let Some(p) = p else { return Ok(None) };
            let loc = doc.loc(p.span());
            let mut v = p.into_inner();
            if v.contains(&0) {
                return Err(PolicyError::invalid(format!("[network] {key}: port 0 is not a port"), loc));
            }
            v.sort_unstable();
            v.dedup();
            Ok(Some((v, loc)))
        };
        l.connect_ports = ports(n.connect_ports, "connect_ports")?;
        l.bind_ports = ports(n.bind_ports, "bind_ports")?;

        for p in raw.env.pass {
            let loc = doc.loc(p.span());
            check_env_name(p.get_ref()).map_err(|m| PolicyError::invalid(m, loc))?;
            if !l.pass.contains(p.get_ref()) {
                l.pass.push(p.into_inner());
            }
        }
        for (k, v) in raw.env.set {
            let loc = doc.loc(v.span());
            check_env_name(&k).map_err(|m| PolicyError::invalid(m, loc.clone()))?;
            let val = self.expand(v.get_ref(), &loc)?;
            l.set.insert(k, val);
        }
        if let Some(flags) = raw.runtime.node_flags {
            let mut v = Vec::new();
            for f in flags.into_inner() {
                let loc = doc.loc(f.span());
                super::check_node_flag(f.get_ref()).map_err(|m| PolicyError::invalid(m, loc))?;
                if !v.contains(f.get_ref()) {
                    v.push(f.into_inner());
                }
            }
            l.node_flags = Some(v);
        }

        let lim = raw.limits;
        let size = |s: Option<Spanned<RawSize>>, key: &str| -> Result<Option<u64>, PolicyError> {
            let Some(s) = s else { return Ok(None) };
            let loc = doc.loc(s.span());
            let n = match s.get_ref() {
                RawSize::Bytes(n) if *n > 0 => *n as u64,
                RawSize::Bytes(n) => {
                    return Err(PolicyError::invalid(format!("[limits] {key} must be positive, not {n}"), loc))
                }
                RawSize::Text(t) => {
                    parse_size(t).map_err(|m| PolicyError::invalid(format!("[limits] {key}: {m}"), loc.clone()))?
                }
            };
            if n == 0 {
                return Err(PolicyError::invalid(format!("[limits] {key} must be positive"), loc));
            }
            Ok(Some(n))
        };
        let count = |c: Option<Spanned<i64>>, key: &str| -> Result<Option<u64>, PolicyError> {
            let Some(c) = c else { return Ok(None) };
            match *c.get_ref() {
                n if n > 0 => Ok(Some(n as u64)),
                n => Err(PolicyError::invalid(format!("[limits] {key} must be positive, not {n}"), doc.loc(c.span()))),
            }
        };
        l.memory = size(lim.memory, "memory")?;
        l.tmp = size(lim.tmp, "tmp")?;
        l.file_size = size(lim.file_size, "file_size")?;
        l.disk = size(lim.disk, "disk")?;
        if let Some(c) = lim.cpu {
            let loc = doc.loc(c.span());
            let text = match c.get_ref() {
                RawCpu::Int(n) => n.to_string(),
                // A float as written in TOML (0.5, 1.25); the text form is checked below.
                RawCpu::Float(f) => format!("{f}"),
                RawCpu::Text(t) => t.clone(),
            };
            l.cpu = Some(parse_cpu(&text).map_err(|m| PolicyError::invalid(format!("[limits] {m}"), loc))?);
        }
        l.pids = count(lim.pids, "pids")?;
        l.open_files = count(lim.open_files, "open_files")?;

        let syscalls = |v: Vec<Spanned<String>>, key: &str| -> Result<Vec<(String, Loc)>, PolicyError> {
            let mut out: Vec<(String, Loc)> = Vec::new();
            for s in v {
                let loc = doc.loc(s.span());
                let name = s.into_inner();
                let ok = name.len() <= 64
                    && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                    && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
                if !ok {
                    return Err(PolicyError::invalid(
                        format!("[seccomp] {key}: `{name}` is not a syscall name (lowercase letters, digits, _)"),
                        loc,
                    ));
                }
                if syscalls::number(&name).is_none() {
                    return Err(PolicyError::invalid(
                        format!("[seccomp] {key}: `{name}` is not an x86_64 syscall (see `man 2 syscalls`)"),
                        loc,
                    ));
                }
                if !out.iter().any(|(n, _)| *n == name) {
                    out.push((name, loc));
                }
            }
            Ok(out)
        };
        l.extra_deny = syscalls(raw.seccomp.extra_deny, "extra_deny")?;
        l.extra_allow = syscalls(raw.seccomp.extra_allow, "extra_allow")?;

        l.level = raw.sandbox.level.map(|s| s.into_inner());
        if let Some(abi) = raw.sandbox.landlock_min_abi {
            let v = *abi.get_ref();
            let v = u8::try_from(v).ok().filter(|v| *v <= 64).ok_or_else(|| {
                PolicyError::invalid(format!("[sandbox] landlock_min_abi must be 0..=64, not {v}"), doc.loc(abi.span()))
            })?;
            l.landlock_min_abi = Some(v);
        }
        if let Some(relax) = raw.sandbox.relax {
            let mut r = Relax::default();
            for item in relax.into_inner() {
                match item.get_ref().as_str() {
                    "cpu" => r.cpu = true,
                    "disk" => r.disk = true,
                    other => {
                        return Err(PolicyError::invalid(
                            format!("[sandbox] relax: `{other}` is not a limit that may be relaxed (expected \"cpu\" or \"disk\")"),
                            doc.loc(item.span()),
                        ))
                    }
                }
            }
            l.relax = Some(r);
        }
        Ok(l)
    }

    /// Expand `${NAME}` from the context; anything undefined is an error.
    fn expand(&self, s: &str, loc: &Loc) -> Result<String, PolicyError> {
        // A lazily computed name without a value on this host is remembered, to say why.
        let unavailable = std::cell::RefCell::new(None::<(String, String)>);
        let lookup = |n: &str| match self
            .ctx
            .vars
            .get(n)
            .map(|v| Ok(v.clone()))
            .or_else(|| self.ctx.lazy.as_ref().and_then(|l| (l.0)(n)))
        {
            Some(Ok(v)) => Some(v),
            Some(Err(why)) => {
                *unavailable.borrow_mut() = Some((n.to_string(), why));
                None
            }
            None => None,
        };
        super::expand_vars(s, lookup).map_err(|e| match e {
            ExpandError::Undefined(name) if unavailable.borrow().as_ref().is_some_and(|(n, _)| *n == name) => {
                let (name, why) = unavailable.borrow_mut().take().unwrap_or_default();
                PolicyError::Unavailable { name, why, loc: loc.clone() }
            }
            ExpandError::Undefined(name) | ExpandError::BadName(name) => {
                PolicyError::UndefinedVar { name, loc: loc.clone(), defined: self.ctx.vars.keys().cloned().collect() }
            }
            ExpandError::Unclosed(_) => PolicyError::invalid(format!("unterminated `${{` in `{s}`"), loc.clone()),
        })
    }

    /// Defaults, cross-field checks, existence of paths.
    fn finish(&self, source: String, m: Layer, notes: &mut Vec<String>) -> Result<Policy, PolicyError> {
        let mode = m.mode.as_ref().map(|(md, _)| *md).unwrap_or(Mode::None);
        let mode_at = |m: &Layer| match &m.mode {
            Some((md, loc)) => format!("mode = \"{}\" set at {loc}", md.as_str()),
            None => format!("mode defaults to \"{DEFAULT_NETWORK_MODE}\""),
        };
        if let (Some((a, loc)), true) = (m.allow.first(), mode != Mode::Proxy) {
            return Err(PolicyError::invalid(
                format!("[network] allow (`{a}`) needs mode = \"proxy\", but {}", mode_at(&m)),
                loc.clone(),
            ));
        }
        for (key, ports) in [("connect_ports", &m.connect_ports), ("bind_ports", &m.bind_ports)] {
            if let (Some((_, loc)), true) = (ports, mode != Mode::Host) {
                return Err(PolicyError::invalid(
                    format!("[network] {key} needs mode = \"host\", but {}", mode_at(&m)),
                    loc.clone(),
                ));
            }
        }
        let network = match mode {
            Mode::None => Network::None,
            Mode::Host => Network::Host {
                connect_ports: m.connect_ports.map(|(v, _)| v),
                bind_ports: m.bind_ports.map(|(v, _)| v),
            },
            Mode::Proxy => Network::Proxy { allow: m.allow.into_iter().map(|(a, _)| a).collect() },
        };

        // A syscall denied anywhere in the chain stays denied.
        let deny: Vec<String> = m.extra_deny.into_iter().map(|(n, _)| n).collect();
        let mut allow = Vec::new();
        for (n, loc) in m.extra_allow {
            if deny.contains(&n) {
                notes.push(format!("syscall {n} is both allowed ({loc}) and denied in the policy chain; denied"));
            } else if let Some(why) = syscalls::never_allowed(&n) {
                return Err(PolicyError::invalid(
                    format!("[seccomp] extra_allow: syscall `{n}` can never be allowed: {why}"),
                    loc,
                ));
            } else {
                allow.push(n);
            }
        }

        let filesystem = Filesystem {
            read: self.existing(m.read, notes)?,
            write: self.existing(m.write, notes)?,
            exec: self.existing(m.exec, notes)?,
        };
        let d = DEFAULT_LIMITS;
        Ok(Policy {
            source,
            filesystem,
            network,
            env: Env { pass: m.pass, set: m.set },
            limits: Limits {
                memory: m.memory.or(d.memory),
                pids: m.pids.or(d.pids),
                open_files: m.open_files.or(d.open_files),
                tmp: m.tmp.or(d.tmp),
                file_size: m.file_size.or(d.file_size),
                cpu: m.cpu.or(d.cpu),
                disk: m.disk.or(d.disk),
            },
            seccomp: Seccomp { extra_deny: deny, extra_allow: allow },
            sandbox: SandboxReq {
                level: m.level.unwrap_or(DEFAULT_LEVEL),
                landlock_min_abi: m.landlock_min_abi.unwrap_or(DEFAULT_LANDLOCK_MIN_ABI),
                relax: m.relax.unwrap_or_default(),
            },
            runtime: RuntimeFlags { node_flags: m.node_flags.unwrap_or_default() },
        })
    }

    /// Keep paths that exist; drop optional ones that do not (with a note); fail on the rest.
    fn existing(&self, rules: Vec<Rule>, notes: &mut Vec<String>) -> Result<Vec<PathRule>, PolicyError> {
        let mut out = Vec::new();
        for r in rules {
            if let Some(why) = reserved_conflict(&r.path) {
                return Err(PolicyError::invalid(why, r.loc));
            }
            if let Some(dir) = self.unchecked_under.iter().find(|d| r.path.starts_with(d) && !d.exists()) {
                notes.push(format!(
                    "path {} ({}) not checked: {} does not exist yet",
                    r.path.display(),
                    r.loc,
                    dir.display()
                ));
                out.push(PathRule { path: r.path, optional: r.optional });
                continue;
            }
            match r.path.try_exists() {
                Ok(true) => out.push(PathRule {
                    path: r.path,
                    optional: r.optional,
                }),
                Ok(false) if r.optional => notes.push(format!(
                    "optional path {} does not exist ({}); not granted",
                    r.path.display(),
                    r.loc
                )),
                Ok(false) if r.lazy_var.is_some() => {
                    return Err(PolicyError::invalid(
                        format!(
                            "runtime path {} (${{{}}}) does not exist: the runtime cannot work without it, so the server is not started; reinstall the runtime or run the server on another",
                            r.path.display(),
                            r.lazy_var.as_deref().unwrap_or_default()
                        ),
                        r.loc,
                    ))
                }
                Ok(false) => {
                    return Err(PolicyError::MissingPath {
                        path: r.path,
                        loc: r.loc,
                    })
                }
                Err(e) => {
                    return Err(PolicyError::invalid(
                        format!("cannot check path {}: {e}", r.path.display()),
                        r.loc,
                    ))
                }
            }
        }
        Ok(out)
    }
}

fn read_file(path: &Path, at: Loc) -> Result<Doc, PolicyError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => {
            PolicyError::NotFound { reference: name.clone(), from: at, searched: vec![name.clone()] }
        }
        _ => PolicyError::Io { file: name.clone(), source },
    })?;
    let id = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()).display().to_string();
    let base_dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok(Doc { name, id, text, base_dir: Some(base_dir), lines: true })
}

/// Parse a document; turn toml/serde errors into located [`PolicyError`]s.
fn parse(doc: &Doc) -> Result<RawPolicy, PolicyError> {
    toml::from_str::<RawPolicy>(&doc.text).map_err(|e| {
        let loc = match e.span() {
            Some(s) => doc.loc(s),
            None => Loc::new(doc.name.clone(), None),
        };
        let msg = e.message().trim_end().to_string();
        if let Some(key) = msg.strip_prefix("unknown field `").and_then(|r| r.split('`').next()) {
            let (table, expected) = e
                .span()
                .and_then(|s| key_table(&doc.text, key, s))
                .unwrap_or_else(|| ("the policy".into(), Vec::new()));
            return PolicyError::UnknownKey { key: key.into(), table, loc, expected };
        }
        PolicyError::Toml { message: msg, loc }
    })
}

/// Find the table holding an unknown `key` whose span overlaps the error's: returns a name such
/// as `[filesystem]` and the keys that table accepts.
fn key_table(text: &str, key: &str, span: std::ops::Range<usize>) -> Option<(String, Vec<String>)> {
    use toml::de::{DeTable, DeValue};
    fn overlaps(a: &std::ops::Range<usize>, b: &std::ops::Range<usize>) -> bool {
        a.start <= b.end && b.start <= a.end
    }
    fn walk(
        t: &DeTable<'_>,
        key: &str,
        span: &std::ops::Range<usize>,
        path: &mut Vec<String>,
        in_array: bool,
    ) -> Option<(Vec<String>, bool)> {
        for (k, v) in t.iter() {
            if k.get_ref() == key && overlaps(&k.span(), span) {
                return Some((path.clone(), in_array));
            }
            path.push(k.get_ref().to_string());
            let found = match v.get_ref() {
                DeValue::Table(inner) => walk(inner, key, span, path, false),
                DeValue::Array(items) => items.iter().find_map(|i| match i.get_ref() {
                    DeValue::Table(inner) => walk(inner, key, span, path, true),
                    _ => None,
                }),
                _ => None,
            };
            path.pop();
            if found.is_some() {
                return found;
            }
        }
        None
    }
    let doc = DeTable::parse(text).ok()?;
    let (path, in_array) = walk(doc.get_ref(), key, &span, &mut Vec::new(), false)?;
    if in_array {
        let name = format!("a [{}] entry", path.join("."));
        return Some((name, vec!["path".into(), "optional".into()]));
    }
    let dotted = path.join(".");
    let expected = raw::KEYS
        .iter()
        .find(|(t, _)| *t == dotted)
        .map(|(_, ks)| ks.iter().map(|k| k.to_string()).collect())
        .unwrap_or_default();
    let name = if path.is_empty() { "the top level".to_string() } else { format!("[{dotted}]") };
    Some((name, expected))
}

/// Absolute, no `..`; `.` and repeated or trailing slashes are dropped.
fn normalise(s: &str) -> Result<PathBuf, String> {
    if s.contains('\0') {
        return Err(format!("path `{}` contains a NUL byte", s.escape_debug()));
    }
    let p = Path::new(s);
    if !p.is_absolute() {
        return Err(format!("path `{s}` is not absolute"));
    }
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => return Err(format!("path `{s}` contains `..`")),
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    Ok(out)
}

fn check_env_name(n: &str) -> Result<(), String> {
    let ok = n.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!("`{n}` is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*)"))
    }
}

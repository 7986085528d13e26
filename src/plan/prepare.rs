//! npx and uvx servers in two sandboxed phases.
//!
//! *Prepare* runs the package manager alone — npm for `npx`, uv for `uvx` — in a sandbox whose
//! only writable place is the server's cache dir and whose only way out is mcpbox's egress
//! proxy, to the registries npm's or uv's own configuration names (nothing here names one) and
//! the hosts they serve files from, never an internal address. Install scripts run in that sandbox
//! too, and no registry credentials reach it. The result is recorded in `CACHE/prepared.json`.
//!
//! *Run* never starts a package manager: the server's entry point is executed directly (node on
//! the package's `bin` file, or the console script of a virtualenv built on the system Python),
//! with the installed tree granted read/exec and nothing of the cache writable.
//!
//! The command lines taken for packages — npx, `npm exec`, `pnpm dlx`, uvx, `uv tool run`,
//! `uv run --with` — are read by [`parse`] (what each option means here: README, "npx and uvx
//! servers"). `npx --prefix DIR` names an install the user made: nothing is prepared, node runs
//! its bin from DIR.
//!
//! Cache layout: `npm-N/` (an install prefix) or `venv-N/` (a virtualenv), the installed trees;
//! `npm-cache/`, `uv-cache/` and whatever npm, uv and install scripts keep in HOME (the cache
//! itself); `prepared.json`, naming the tree the run phase starts from. (`npm/` and `venv/`, the
//! single tree of earlier versions, count as generation 0.)
//!
//! Preparing again — `--force`, or a record that no longer matches — never touches the tree the
//! record names: a sandbox running from it has it bind-mounted (or granted by Landlock), and
//! node or python would fail at its next `require`/`import` if the files went. The new install
//! goes into the next generation's name, and only once it is complete is the record replaced
//! (written aside, renamed over), so that new starts take the new tree and running sandboxes
//! keep theirs. A failed prepare removes what it made and leaves the record and its tree as
//! they were. After a successful one, every tree but the new one and the one the record named
//! before it is removed: a sandbox started before the previous switch, still running across a
//! second prepare, loses its files — the one case this does not cover — and the disk holds at
//! most two trees. `--force` empties the cache except the trees and the record before it
//! installs: the download caches, npm's and uv's configuration and anything else an install
//! script left in HOME are gone for the new install, which reads no tree but its own.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use super::spec::{self as launch, Extra, ServerDirs, ServerLaunch, StateDir, DEFAULT_PATH};
use crate::policy::PolicyRef;
use crate::sandbox::Access;

/// Which package manager a command stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Manager {
    Npm,
    Uv,
}

impl Manager {
    /// The runtime base policy a server of this kind needs.
    pub fn runtime_policy(self) -> &'static str {
        match self {
            Manager::Npm => "node",
            Manager::Uv => "python",
        }
    }
    fn prepare_policy(self) -> &'static str {
        match self {
            Manager::Npm => "prepare-npm",
            Manager::Uv => "prepare-uv",
        }
    }
    fn command(self) -> &'static str {
        match self {
            Manager::Npm => "npx",
            Manager::Uv => "uvx",
        }
    }
}

/// An npx, `npm exec`, `pnpm dlx`, uvx, `uv tool run` or `uv run --with` command line, taken apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    pub manager: Manager,
    /// What the package manager installs, in order: npm package specs (`name@version`, a
    /// tarball path, …) or Python requirements (`name==version`).
    pub install: Vec<String>,
    /// The executable to run: npx's command after `--package`, uvx's command name. None for a
    /// plain `npx PKG`: the package's own bin.
    pub bin: Option<String>,
    /// The registry the command line names (`npx --registry=URL`, `uvx --index-url URL`): the
    /// config's explicit choice, used by this server's prepare in place of the configured
    /// default registry, and allowed in its prepare sandbox's egress. Never with credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<String>,
    /// `uvx --python X`: the host interpreter the virtualenv is built on (a version such as
    /// `3.12`, a `pythonX.Y` name, or an absolute path); never downloaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub python: Option<String>,
    /// `npx --prefix DIR`: a package the user installed there. Nothing is prepared; the run
    /// phase executes its bin from DIR (read-only) with node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<PathBuf>,
    /// The server's own arguments.
    #[serde(skip)]
    pub args: Vec<String>,
}

impl Package {
    /// Same packages and command: the server's own arguments do not matter to prepare.
    pub fn same_install(&self, other: &Package) -> bool {
        self.manager == other.manager
            && self.install == other.install
            && self.bin == other.bin
            && self.registry == other.registry
            && self.python == other.python
            && self.local == other.local
    }

    fn new(manager: Manager, install: Vec<String>, bin: Option<String>, args: Vec<String>) -> Package {
        Package { manager, install, bin, registry: None, python: None, local: None, args }
    }
}

/// The command lines mcpbox prepares and runs as packages (named in every parse error).
pub const SUPPORTED_FORMS: &str = "supported: `npx`, `npm exec`/`npm x`, `pnpm dlx`, `pnpx` with -y/--yes, -q/--quiet/--silent, \
--loglevel, --offline/--prefer-offline/--prefer-online, --registry URL, --prefix DIR, -p/--package PKG, --, then PKG or BIN and its \
arguments; `uvx` and `uv tool run` with --from, --with, -p/--python VERSION|PATH, -i/--index-url/--default-index URL, \
-q/-v/--isolated/--no-cache/--refresh/--offline/--no-progress/--native-tls, --, then CMD[@VERSION] and its arguments; \
`uv run --with REQ… [--no-project] [--python …] [--] CMD ARGS…`; `uv --directory DIR run [python] SCRIPT.py|CMD ARGS…` for a synced local project";

/// `Some` when `command` (by name or path) installs a package and runs it: npx, `npm exec`,
/// `pnpm dlx`, pnpx, uvx, `uv tool run`, `uv run --with`. Other commands — `node FILE`,
/// `python -m MOD`, `npm run …` — are not package managers fetching code: `None`, they run as
/// they are under their policy.
pub fn parse(command: &str, args: &[String]) -> Option<anyhow::Result<Package>> {
    let base = command.rsplit('/').next().unwrap_or(command);
    let sub = args.first().map(String::as_str);
    match (base, sub) {
        ("npx", _) => Some(parse_npx("npx", args)),
        ("pnpx", _) => Some(parse_npx("pnpx", args)),
        ("npm", Some("exec" | "x")) => Some(parse_npx("npm exec", &args[1..])),
        ("pnpm", Some("dlx")) => Some(parse_npx("pnpm dlx", &args[1..])),
        ("uvx", _) => Some(parse_uvx("uvx", args)),
        ("uv", _) => parse_uv(args),
        _ => None,
    }
}

/// The value of option `a` at `args[*i]`: `--opt=VALUE` or `--opt VALUE`; advances `i`.
fn option_value(tool: &str, args: &[String], i: &mut usize, name: &str) -> anyhow::Result<String> {
    let a = &args[*i];
    if let Some(v) = a.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
        *i += 1;
        return Ok(v.to_string());
    }
    let v = args.get(*i + 1).filter(|v| !v.starts_with('-')).with_context(|| format!("{tool} {name} needs a value"))?;
    *i += 2;
    Ok(v.clone())
}

/// A registry URL from a command line: http(s), without credentials (they would end up in the
/// prepare sandbox, where install scripts run; npm's and uv's own configuration hold them).
fn registry_url(tool: &str, opt: &str, url: &str) -> anyhow::Result<String> {
    let u = reqwest::Url::parse(url).with_context(|| format!("{tool} {opt} {url}: not a URL"))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        bail!("{tool} {opt} {url}: only http(s) registries are supported");
    }
    if without_credentials(url).1 {
        bail!("{tool} {opt}: the URL carries credentials; mcpbox never hands them to a prepare sandbox — keep them in npm's or uv's own configuration, which mcpbox reads");
    }
    Ok(url.to_string())
}

fn parse_npx(tool: &str, args: &[String]) -> anyhow::Result<Package> {
    let mut packages = Vec::new();
    let mut registry = None;
    let mut local = None;
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        let name = a.split('=').next().unwrap_or(a);
        match name {
            // Prepare happens ahead of time and the run phase is always offline: the offline
            // flags and npm's output settings change nothing.
            _ if a == "--no-install=false" => i += 1,
            "-y" | "--yes" | "-q" | "--quiet" | "-s" | "--silent" | "--offline" | "--prefer-offline" | "--prefer-online" | "--ignore-existing" if !a.contains('=') => i += 1,
            "--loglevel" => {
                option_value(tool, args, &mut i, name)?;
            }
            "-p" | "--package" if !(name == "-p" && a.contains('=')) => packages.push(option_value(tool, args, &mut i, name)?),
            "--registry" => registry = Some(registry_url(tool, name, &option_value(tool, args, &mut i, name)?)?),
            "--prefix" => {
                let dir = PathBuf::from(option_value(tool, args, &mut i, name)?);
                if !dir.is_absolute() {
                    bail!("{tool} --prefix {}: give the install directory as an absolute path", dir.display());
                }
                local = Some(dir);
            }
            "--" => {
                i += 1;
                break;
            }
            "-c" | "--call" | "--shell-mode" => bail!("{tool} {a} (a shell command line) is not supported: name the package and its command ({SUPPORTED_FORMS})"),
            "--no" | "--no-install" => bail!("{tool} {a} runs only what is already installed: say where with --prefix DIR, or drop it to let mcpbox prepare the package"),
            _ if a.starts_with('-') => bail!("{tool} option {a} is not supported by mcpbox ({SUPPORTED_FORMS})"),
            _ => break,
        }
    }
    let rest = &args[i..];
    let Some(first) = rest.first() else { bail!("{tool}: no package given ({SUPPORTED_FORMS})") };
    let mut p = if packages.is_empty() {
        Package::new(Manager::Npm, vec![first.clone()], None, rest[1..].to_vec())
    } else {
        Package::new(Manager::Npm, packages, Some(first.clone()), rest[1..].to_vec())
    };
    if local.is_some() && registry.is_some() {
        bail!("{tool} --prefix with --registry: a --prefix install is run from its directory and nothing is fetched; drop --registry");
    }
    p.registry = registry;
    p.local = local;
    Ok(p)
}

/// `uv [GLOBAL…] run …` and `uv [GLOBAL…] tool run …`; other uv commands are not package
/// launches (`None`).
fn parse_uv(args: &[String]) -> Option<anyhow::Result<Package>> {
    let mut i = 0;
    let mut project = None;
    while i < args.len() {
        let a = args[i].as_str();
        let name = a.split('=').next().unwrap_or(a);
        match name {
            "-q" | "--quiet" | "-v" | "--verbose" | "--offline" | "--no-cache" | "-n" | "--no-progress"
            | "--native-tls"
                if !a.contains('=') =>
            {
                i += 1
            }
            "--directory" | "--project" => match option_value("uv", args, &mut i, name) {
                Ok(d) => project = Some(d),
                Err(e) => return Some(Err(e)),
            },
            "run" => return Some(parse_uv_run(&args[i + 1..], project)),
            "tool" if args.get(i + 1).map(String::as_str) == Some("run") && project.is_none() => {
                return Some(parse_uvx("uv tool run", &args[i + 2..]))
            }
            _ if a.starts_with('-') => {
                return Some(Err(anyhow::anyhow!("uv option {a} is not supported by mcpbox ({SUPPORTED_FORMS})")))
            }
            _ => return None,
        }
    }
    None
}

/// The uv options `uvx`, `uv tool run` and `uv run` share; `Ok(false)` when `args[*i]` is not one.
fn uv_common(
    tool: &str,
    args: &[String],
    i: &mut usize,
    python: &mut Option<String>,
    registry: &mut Option<String>,
) -> anyhow::Result<bool> {
    let a = args[*i].as_str();
    let name = a.split('=').next().unwrap_or(a);
    match name {
        "-q" | "--quiet" | "-v" | "--verbose" | "--isolated" | "--no-cache" | "-n" | "--refresh" | "--offline"
        | "--no-progress" | "--native-tls"
            if !a.contains('=') =>
        {
            *i += 1
        }
        "-p" | "--python" => {
            let v = option_value(tool, args, i, name)?;
            check_python_request(tool, &v)?;
            *python = Some(v);
        }
        "-i" | "--index-url" | "--default-index" => {
            *registry = Some(registry_url(tool, name, &option_value(tool, args, i, name)?)?)
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// What the options of `uvx` (`uv tool run`) and `uv run` say in common.
#[derive(Default)]
struct UvOptions {
    with: Vec<String>,
    python: Option<String>,
    registry: Option<String>,
}

/// The option loop `uvx` and `uv run` share: the options of [`uv_common`], `--with`/`-w`, `--`,
/// and a refusal of any other option; it ends at the first argument that is not an option.
/// `own(name, arg, i)` takes the options of one tool only (`Ok(true)`: taken, `i` moved past
/// it). Returns what was read and the index of the command.
fn uv_options(
    tool: &str,
    args: &[String],
    mut own: impl FnMut(&str, &str, &mut usize) -> anyhow::Result<bool>,
) -> anyhow::Result<(UvOptions, usize)> {
    let mut o = UvOptions::default();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        let name = a.split('=').next().unwrap_or(a);
        if uv_common(tool, args, &mut i, &mut o.python, &mut o.registry)? {
            continue;
        }
        match name {
            "--with" | "-w" => o.with.push(option_value(tool, args, &mut i, name)?),
            "--" => {
                i += 1;
                break;
            }
            _ if own(name, a, &mut i)? => {}
            _ if a.starts_with('-') => bail!("{tool} option {a} is not supported by mcpbox ({SUPPORTED_FORMS})"),
            _ => break,
        }
    }
    Ok((o, i))
}

/// `--python X` as mcpbox takes it: an interpreter installed on this host (never a download),
/// named by version (`3`, `3.12`), by command (`python3.12`) or by absolute path.
fn check_python_request(tool: &str, v: &str) -> anyhow::Result<()> {
    let version = |s: &str| {
        let parts: Vec<&str> = s.split('.').collect();
        (1..=2).contains(&parts.len()) && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
    };
    let ok = version(v)
        || v.strip_prefix("python").is_some_and(|r| r.is_empty() || version(r))
        || (v.starts_with('/') && !v.contains("/../"));
    if !ok {
        bail!(
            "{tool} --python {v}: mcpbox builds the virtualenv on an interpreter installed on this host (uv downloads none: UV_PYTHON_DOWNLOADS=never); \
             give a version (3.12), a command (python3.12) or an absolute path"
        );
    }
    Ok(())
}

/// The host interpreter a uv package is prepared on: `python3`, or what `--python` asked for.
/// The interpreter uv builds a package's virtualenv on: the host interpreter `--python` names,
/// else the runtime mcpbox is told to use (`MCPBOX_PYTHON`, else `python3` on the sandbox's PATH).
pub(crate) fn python_for(pkg: &Package) -> anyhow::Result<PathBuf> {
    let want = match pkg.python.as_deref() {
        None => return find_python(),
        Some(v) if v.starts_with('/') || v.starts_with("python") => v.to_string(),
        Some(v) => format!("python{v}"),
    };
    launch::resolve_command(&want, DEFAULT_PATH).with_context(|| {
        format!("uvx servers need {want} on PATH ({DEFAULT_PATH}): install that interpreter (mcpbox never downloads one), or change --python")
    })
}

fn parse_uvx(tool: &str, args: &[String]) -> anyhow::Result<Package> {
    let mut from = None;
    let (UvOptions { with, python, registry }, i) = uv_options(tool, args, |name, _, i| {
        Ok(match name {
            "--from" => {
                from = Some(option_value(tool, args, i, name)?);
                true
            }
            _ => false,
        })
    })?;
    let rest = &args[i..];
    let Some(first) = rest.first() else { bail!("{tool}: no command given ({SUPPORTED_FORMS})") };
    let (name, version) = match first.split_once('@') {
        // `@latest`: the newest release, which is what an unpinned install gets.
        Some((n, "latest")) => (n.to_string(), None),
        Some((n, v)) => (n.to_string(), Some(v.to_string())),
        None => (first.clone(), None),
    };
    check_command_name(tool, &name, first)?;
    let mut install = vec![match (&from, version) {
        (Some(f), _) => f.clone(),
        (None, Some(v)) => format!("{name}=={v}"),
        (None, None) => name.clone(),
    }];
    install.extend(with);
    let mut p = Package::new(Manager::Uv, install, Some(name), rest[1..].to_vec());
    p.python = python;
    p.registry = registry;
    Ok(p)
}

fn check_command_name(tool: &str, name: &str, written: &str) -> anyhow::Result<()> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        bail!("{tool}: `{written}` is not a command name");
    }
    Ok(())
}

/// `uv run --with REQ… [--] CMD ARGS…`: outside a project, uv installs the `--with`
/// requirements into a throwaway environment and runs CMD from it — the same as
/// `uvx --from REQ --with REQ… CMD`.
///
/// `uv --directory DIR run [python] SCRIPT.py|CMD ARGS…` (`project`: DIR): a local project the
/// user has synced. Like `npx --prefix`, nothing is prepared: its `DIR/.venv` runs as it is.
fn parse_uv_run(args: &[String], mut project: Option<String>) -> anyhow::Result<Package> {
    let tool = "uv run";
    let (UvOptions { with, python, registry }, i) = uv_options(tool, args, |name, a, i| {
        Ok(match name {
            "--no-project" | "--no-sync" | "--frozen" | "--locked" if !a.contains('=') => {
                *i += 1;
                true
            }
            "--directory" | "--project" => {
                project = Some(option_value(tool, args, i, name)?);
                true
            }
            "-m" | "--module" | "--script" | "-s" => {
                bail!("uv run {a} is not supported: name the command or the script file instead ({SUPPORTED_FORMS})")
            }
            _ => false,
        })
    })?;
    let rest = &args[i..];
    let Some(cmd) = rest.first() else { bail!("uv run: no command given ({SUPPORTED_FORMS})") };
    if let Some(dir) = project {
        return local_project(dir, rest, !with.is_empty() || python.is_some() || registry.is_some());
    }
    if with.is_empty() {
        bail!("uv run {cmd} without --with runs a local project or script; mcpbox prepares only published packages: use `uv run --with PKG CMD`, uvx, `uv --directory DIR run …` for a synced project, or the command itself under a policy");
    }
    if cmd.starts_with("python") || cmd.ends_with(".py") {
        bail!("uv run … {cmd}: an interpreter or a script, not a package's command; name the command the --with package installs ({SUPPORTED_FORMS})");
    }
    check_command_name(tool, cmd, cmd)?;
    let mut p = Package::new(Manager::Uv, with, Some(cmd.clone()), rest[1..].to_vec());
    p.python = python;
    p.registry = registry;
    Ok(p)
}

/// `uv --directory DIR run …`: `bin` is the script (`SCRIPT.py`, after an optional `python`) or
/// the console script of `DIR/.venv`; nothing is installed.
fn local_project(dir: String, rest: &[String], installs: bool) -> anyhow::Result<Package> {
    let dir = PathBuf::from(dir);
    if !dir.is_absolute() {
        bail!("uv --directory {}: give the project directory as an absolute path", dir.display());
    }
    if installs {
        bail!("uv --directory {} run with --with/--python/--index-url: mcpbox runs a project's .venv as it is and installs nothing; add the packages to the project and `uv sync` it", dir.display());
    }
    let rest = match rest.first().map(String::as_str) {
        Some("python" | "python3") => &rest[1..],
        _ => rest,
    };
    let Some(cmd) = rest.first().filter(|c| !c.starts_with('-')) else {
        bail!(
            "uv --directory {} run: name a script file or the project's command (not python's options)",
            dir.display()
        )
    };
    if !cmd.ends_with(".py") {
        check_command_name("uv run", cmd, cmd)?;
    }
    let mut p = Package::new(Manager::Uv, vec![], Some(cmd.clone()), rest[1..].to_vec());
    p.local = Some(dir);
    Ok(p)
}

/// Apply a command line's `--registry`/`--index-url` to a prepare: it replaces the configured
/// default registry for this server (scoped npm registries and uv's extra indexes stay), and its
/// host joins the prepare sandbox's egress. (Internal addresses stay refused by the proxy.)
fn explicit_registry(pkg: &Package, extra: &mut Extra, egress: &mut Egress) {
    let Some(url) = &pkg.registry else { return };
    let key = match pkg.manager {
        Manager::Npm => "npm_config_registry",
        Manager::Uv => "UV_DEFAULT_INDEX",
    };
    if let Some(old) = extra.env.insert(key.into(), url.clone()) {
        egress.indexes.retain(|i| *i != old);
        if let Some(hp) = host_port(&old).filter(|hp| !egress.indexes.iter().any(|i| host_port(i).as_ref() == Some(hp)))
        {
            egress.allow.remove(&hp);
        }
    }
    egress.add_url(url);
    egress.indexes.push(url.clone());
}

/// `npx --prefix DIR`: the installed package's bin under DIR — `node_modules/.bin/BIN`, or the
/// bin of `node_modules/PKG` by npx's rule — resolved inside `DIR`. Returns (DIR resolved, entry).
fn local_npm_entry(pkg: &Package, dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let root = launch::resolve(dir).with_context(|| format!("npx --prefix {}: no such directory", dir.display()))?.0;
    let modules = root.join("node_modules");
    let spec = pkg.install.first().cloned().unwrap_or_default();
    let bin = pkg.bin.clone().unwrap_or_else(|| spec.clone());
    let mut candidates = vec![modules.join(".bin").join(&bin)];
    if pkg.bin.is_none() {
        if let Some(name) = package_name(Manager::Npm, &spec) {
            let pj: Option<serde_json::Value> = std::fs::read_to_string(modules.join(&name).join("package.json"))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok());
            let unscoped = name.rsplit('/').next().unwrap_or(&name).to_string();
            let rel = match pj.as_ref().and_then(|p| p.get("bin")) {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Object(m)) if m.len() == 1 => {
                    m.values().next().and_then(|v| v.as_str()).map(str::to_string)
                }
                Some(serde_json::Value::Object(m)) => m.get(&unscoped).and_then(|v| v.as_str()).map(str::to_string),
                _ => None,
            };
            candidates.extend(rel.map(|r| modules.join(&name).join(r)));
        }
    }
    for c in candidates {
        let Ok((real, _)) = launch::resolve(&c) else { continue };
        if real.starts_with(&root) && real.is_file() {
            return Ok((root, real));
        }
    }
    bail!(
        "npx --prefix {}: `{bin}` is not installed there (node_modules/.bin/{bin}); mcpbox runs a --prefix install as it is and fetches nothing — install it there, or drop --prefix to let mcpbox prepare the package",
        dir.display()
    )
}

/// What a local install or project runs, and what the run phase is granted: DIR, and for a uv
/// project the base interpreter its `.venv` was made from when it lies outside the system
/// prefixes (a uv-managed Python).
#[derive(Debug)]
struct Local {
    interpreter: PathBuf,
    entry: PathBuf,
    grants: Vec<PathBuf>,
}

fn local_entry(pkg: &Package, dir: &Path) -> anyhow::Result<Local> {
    match pkg.manager {
        Manager::Npm => {
            let (root, entry) = local_npm_entry(pkg, dir)?;
            Ok(Local { grants: vec![root], interpreter: find_node()?, entry })
        }
        Manager::Uv => local_uv_entry(pkg, dir),
    }
}

/// `uv --directory DIR run SCRIPT.py|CMD`: `DIR/.venv/bin/python` on the script (inside DIR) or
/// on the console script `DIR/.venv/bin/CMD`.
fn local_uv_entry(pkg: &Package, dir: &Path) -> anyhow::Result<Local> {
    let root = launch::resolve(dir).with_context(|| format!("uv --directory {}: no such directory", dir.display()))?.0;
    let venv = root.join(".venv");
    let interpreter = venv.join("bin/python");
    if !interpreter.exists() {
        bail!(
            "uv --directory {}: no .venv/bin/python there; mcpbox runs a project as it is: run `uv sync` in it first",
            dir.display()
        );
    }
    let bin = pkg.bin.clone().unwrap_or_default();
    let entry = if bin.ends_with(".py") { root.join(&bin) } else { venv.join("bin").join(&bin) };
    let real = launch::resolve(&entry).ok().map(|r| r.0).filter(|r| r.starts_with(&root) && r.is_file());
    let Some(entry) = real else {
        bail!("uv --directory {}: `{bin}` is not a file of the project (a script inside it, or a command of its .venv); mcpbox runs the project as it is", dir.display());
    };
    let mut grants = vec![root.clone()];
    // `home = …/bin` of the interpreter the venv was made from.
    let cfg = std::fs::read_to_string(venv.join("pyvenv.cfg")).unwrap_or_default();
    let home = cfg
        .lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == "home")
        .map(|(_, v)| PathBuf::from(v.trim()));
    if let Some(prefix) = home
        .as_deref()
        .and_then(Path::parent)
        .filter(|p| p.is_absolute() && !matches!(p.to_str(), Some("/" | "/usr" | "/usr/local")))
    {
        grants.push(prefix.to_path_buf());
    }
    Ok(Local { interpreter, entry, grants })
}

/// What a local install or project runs (nothing is prepared or recorded).
fn local_prepared(pkg: &Package, dir: &Path) -> anyhow::Result<Prepared> {
    let l = local_entry(pkg, dir)?;
    let package = pkg
        .install
        .first()
        .and_then(|s| package_name(Manager::Npm, s))
        .unwrap_or_else(|| pkg.bin.clone().unwrap_or_default());
    let runtime = launch::resolve(&l.interpreter).ok().map(|r| r.0);
    Ok(Prepared {
        request: pkg.clone(),
        package,
        version: "local".into(),
        interpreter: l.interpreter,
        entry: l.entry,
        prepared_at: 0,
        runtime,
    })
}

/// The run phase of a local install or project: its interpreter on its entry, DIR granted read
/// and exec (never write).
fn run_local(launch: &ServerLaunch, pkg: &Package, dir: &Path) -> anyhow::Result<(ServerLaunch, Extra)> {
    let local = local_entry(pkg, dir)?;
    let mut extra = Extra::default();
    for g in local.grants {
        extra.grants.push((g, Access::Exec));
    }
    extra.env.insert("npm_config_offline".into(), "true".into());
    extra.env.insert("UV_OFFLINE".into(), "1".into());
    let mut l = launch.clone();
    l.command = local.interpreter.to_string_lossy().into_owned();
    l.args = std::iter::once(local.entry.to_string_lossy().into_owned()).chain(pkg.args.iter().cloned()).collect();
    Ok((l, extra))
}

/// What `CACHE/prepared.json` records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepared {
    /// The request this was prepared for (manager, install list, bin): a changed command line
    /// means prepare again.
    pub request: Package,
    /// The installed package's name and version.
    pub package: String,
    pub version: String,
    /// What the run phase executes: `interpreter entry ARGS…`.
    pub interpreter: PathBuf,
    pub entry: PathBuf,
    /// The runtime the package was installed for, every symlink resolved: the node that ran
    /// npm, the python uv built the virtualenv on. The run phase runs on it (the runtime base
    /// policy is filled in from it); a record without one, or whose interpreter no longer
    /// leads to it, is prepared again.
    #[serde(default)]
    pub runtime: Option<PathBuf>,
    /// Seconds since the epoch.
    pub prepared_at: u64,
}

const RECORD: &str = "prepared.json";

/// The install trees are generations in the cache: `npm-N` (an npm prefix) or `venv-N` (a uv
/// virtualenv), N counting up from 1 per server. `npm` and `venv`, the single tree of earlier
/// versions, are generation 0. A prepare installs into a fresh name and only a successful one
/// switches the record to it (see [`prepare_blocking`]): a sandbox started from the previous
/// record keeps its tree.
fn tree_prefix(manager: Manager) -> &'static str {
    match manager {
        Manager::Npm => "npm",
        Manager::Uv => "venv",
    }
}

/// The manager and generation of a cache entry named like an install tree; None for any other
/// name (`npm-cache`, `uv-cache`, `.npmrc`, …).
fn tree_name(name: &str) -> Option<(Manager, u32)> {
    [Manager::Npm, Manager::Uv].into_iter().find_map(|m| {
        let rest = name.strip_prefix(tree_prefix(m))?;
        if rest.is_empty() {
            return Some((m, 0));
        }
        let n = rest.strip_prefix('-')?;
        // Canonical decimal only: one spelling per generation.
        if n.is_empty() || n.len() > 10 || !n.bytes().all(|b| b.is_ascii_digit()) || n.starts_with('0') {
            return None;
        }
        Some((m, n.parse().ok()?))
    })
}

/// The tree a record names: the first component of its entry below `cache`, which must be a
/// tree of the record's manager. Says nothing of the tree's contents ([`check_record`] does).
fn record_tree(cache: &Path, p: &Prepared) -> anyhow::Result<PathBuf> {
    // Plain names below the cache only: no `..` stepping out of the tree it starts in.
    let rel = p.entry.strip_prefix(cache).ok().filter(|rel| {
        rel.components().count() > 1 && rel.components().all(|c| matches!(c, std::path::Component::Normal(_)))
    });
    let name = match rel.and_then(|rel| rel.components().next()) {
        Some(std::path::Component::Normal(n)) => n.to_str(),
        _ => None,
    };
    match name.and_then(|n| Some((n, tree_name(n)?))) {
        Some((n, (m, _))) if m == p.request.manager => Ok(cache.join(n)),
        _ => bail!("{} names no install tree of {}", cache.join(RECORD).display(), cache.display()),
    }
}

/// The record in `cache`, whatever request it was made for and whether or not it is still
/// valid: which tree it names (kept by a prepare until the one after the next, since a sandbox
/// may run from it) and its generation.
fn recorded_tree_name(cache: &Path) -> Option<(String, u32)> {
    let p: Prepared = serde_json::from_str(&read_inside(cache, Path::new(RECORD)).ok()?).ok()?;
    let tree = record_tree(cache, &p).ok()?;
    let name = tree.file_name()?.to_str()?.to_string();
    let (_, generation) = tree_name(&name)?;
    Some((name, generation))
}

/// The install trees in `cache` (by name; links and files named like one included).
fn trees_in(cache: &Path) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(cache).with_context(|| format!("reading {}", cache.display()))? {
        let name = e?.file_name();
        if let Some(n) = name.to_str().filter(|n| tree_name(n).is_some()) {
            out.push(n.to_string());
        }
    }
    Ok(out)
}

/// A name for the next tree of `manager`: the generation after the recorded one (or after the
/// highest found, without a record) that nothing in `cache` is named yet. Never an existing
/// entry, so never a tree a sandbox may be running from.
fn next_tree(cache: &Path, manager: Manager) -> anyhow::Result<PathBuf> {
    let after = match recorded_tree_name(cache) {
        Some((_, g)) => g,
        None => trees_in(cache)?.iter().filter_map(|n| tree_name(n)).map(|(_, g)| g).max().unwrap_or(0),
    };
    let mut g = after;
    for _ in 0..1000 {
        g = g.checked_add(1).unwrap_or(1);
        let candidate = cache.join(format!("{}-{g}", tree_prefix(manager)));
        match std::fs::symlink_metadata(&candidate) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(candidate),
            _ => continue,
        }
    }
    bail!("no free name for a new install tree in {}; prepare with --force", cache.display())
}

/// Remove an entry of the cache: a directory with everything in it, anything else (a link
/// included) itself. Never follows a link.
fn remove_entry(p: &Path) -> anyhow::Result<()> {
    let r = match std::fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    r.with_context(|| format!("removing {}", p.display()))
}

/// After a successful prepare: every install tree but `keep` (the new one and the one the
/// record named before it) is removed. A sandbox started before the previous switch (one that
/// has run across two prepares) loses its files; any other keeps them.
fn remove_old_trees(cache: &Path, keep: &[&str]) -> anyhow::Result<()> {
    for name in trees_in(cache)? {
        if !keep.contains(&name.as_str()) {
            remove_entry(&cache.join(&name))?;
        }
    }
    Ok(())
}

/// The prepared record, if present, valid and for this request.
pub fn load_prepared(cache: &Path, pkg: &Package) -> Option<Prepared> {
    let text = read_inside(cache, Path::new(RECORD)).ok()?;
    let p: Prepared = serde_json::from_str(&text).ok()?;
    (p.request.same_install(pkg) && check_record(cache, &p).is_ok()).then_some(p)
}

/// The cache is written by the package manager and install scripts, which we do not trust: a
/// record must point into the installed tree it names (a directory of the cache, not a link)
/// and at an interpreter we chose.
fn check_record(cache: &Path, p: &Prepared) -> anyhow::Result<()> {
    let cache_real = launch::resolve(cache)?.0;
    let tree = record_tree(cache, p)?;
    let tree_real = launch::resolve(&tree)?.0;
    if Some(tree_real.as_path()) != tree.file_name().map(|n| cache_real.join(n)).as_deref() || !tree_real.is_dir() {
        bail!("{} is not an install tree inside {}", tree.display(), cache.display());
    }
    let interp_ok = match p.request.manager {
        Manager::Npm => p.interpreter == find_node()?,
        // A virtualenv built on another python than the one chosen now is built again.
        Manager::Uv => {
            p.interpreter == tree.join("bin/python") && p.runtime == Some(launch::resolve(&find_python()?)?.0)
        }
    };
    let entry = launch::resolve(&p.entry)?.0;
    if !interp_ok || !entry.starts_with(&tree_real) || !entry.is_file() {
        bail!("{} does not describe an installed package", cache.join(RECORD).display());
    }
    // The interpreter (for uv, the virtualenv's python, a link the prepare sandbox wrote) must
    // still lead to the runtime it was prepared on.
    let runs_on = launch::resolve(&p.interpreter)?.0;
    if p.runtime.as_deref() != Some(runs_on.as_path()) {
        bail!(
            "{} was prepared on {}, but {} now leads to {}; prepare again",
            cache.join(RECORD).display(),
            p.runtime.as_deref().map(|r| r.display().to_string()).unwrap_or_else(|| "an unrecorded runtime".into()),
            p.interpreter.display(),
            runs_on.display()
        );
    }
    Ok(())
}

/// Read a small file that must really lie inside `base` (no symlink leading out).
fn read_inside(base: &Path, rel: &Path) -> anyhow::Result<String> {
    let base_real = launch::resolve(base)?.0;
    let real = launch::resolve(&base.join(rel))?.0;
    if !real.starts_with(&base_real) {
        bail!("{} leads outside {}", rel.display(), base.display());
    }
    let mut s = String::new();
    std::fs::File::open(&real)?.take(4 << 20).read_to_string(&mut s)?;
    Ok(s)
}

/// The node npx servers are prepared and run on: `MCPBOX_NODE`, else `node` on the sandbox's PATH.
/// The program that runs a prepared package's entry point: node for npm, the interpreter its
/// virtualenv is built on for uv (its `bin/python` leads there). Known before anything is
/// prepared, so that a policy that cannot execute it refuses the server first.
pub(crate) fn runtime_of(pkg: &Package) -> anyhow::Result<PathBuf> {
    match pkg.manager {
        Manager::Npm => find_node(),
        Manager::Uv => python_for(pkg),
    }
}

fn find_node() -> anyhow::Result<PathBuf> {
    super::runtime::default_interpreter(super::runtime::Kind::Node, DEFAULT_PATH).context("npx servers need node")
}

/// The python uvx servers' virtualenvs are built on: `MCPBOX_PYTHON`, else `python3` on the
/// sandbox's PATH.
fn find_python() -> anyhow::Result<PathBuf> {
    super::runtime::default_interpreter(super::runtime::Kind::Python, DEFAULT_PATH).context("uvx servers need python3")
}

/// npm's CLI script and the npm package directory it lives in.
fn find_npm() -> anyhow::Result<(PathBuf, PathBuf)> {
    let npm = launch::resolve_command("npm", DEFAULT_PATH).context("npx servers need npm on PATH")?;
    let real = std::fs::canonicalize(&npm)?;
    let dir = real
        .ancestors()
        .find(|a| {
            a.file_name().is_some_and(|n| n == "npm")
                && a.parent().and_then(|p| p.file_name()).is_some_and(|n| n == "node_modules")
        })
        .with_context(|| format!("{} is not inside an npm installation (…/node_modules/npm)", real.display()))?
        .to_path_buf();
    Ok((dir.join("bin/npm-cli.js"), dir))
}

/// uv's binary: `MCPBOX_UV`, else an executable `uv` on mcpbox's PATH that is a real binary (not
/// a version-manager shim), else where the `uv` Python package says it put it.
fn find_uv() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("MCPBOX_UV").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let is_elf = |p: &Path| {
        let mut magic = [0u8; 4];
        std::fs::File::open(p).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && magic == *b"\x7fELF"
    };
    let path = std::env::var("PATH").unwrap_or_default();
    for dir in path.split(':').chain(DEFAULT_PATH.split(':')).filter(|d| d.starts_with('/')) {
        let c = Path::new(dir).join("uv");
        if c.is_file() && is_elf(&c) {
            return Ok(c);
        }
    }
    let out = std::process::Command::new("python3")
        .args(["-c", "import uv; print(uv.find_uv_bin())"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    if let Ok(o) = out {
        let p = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        if o.status.success() && p.is_absolute() && is_elf(&p) {
            return Ok(p);
        }
    }
    bail!("uvx servers need uv (`pip install uv`); none found on PATH or through python3 -m uv (set MCPBOX_UV to its path)")
}

/// A server runs under its own uid and must be able to reach the binary: one installed under a
/// private home (`pip install --user`, pyenv under /root) is copied once into `STATE/.tools`.
pub(crate) fn stage_for_others(state: &StateDir, bin: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let real = std::fs::canonicalize(bin)?;
    let open = |p: &Path, bits: u32| std::fs::metadata(p).map(|m| m.mode() & bits == bits).unwrap_or(false);
    let reachable = open(&real, 0o005) && real.ancestors().skip(1).all(|a| open(a, 0o001));
    if reachable || !nix::unistd::geteuid().is_root() {
        return Ok(real);
    }
    let dir = state.root.join(".tools");
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let name = real.file_name().context("binary without a name")?;
    let dst = dir.join(name);
    let same = match (std::fs::metadata(&real), std::fs::metadata(&dst)) {
        (Ok(a), Ok(b)) => a.len() == b.len() && a.mtime() <= b.mtime(),
        _ => false,
    };
    if !same {
        let tmp = dir.join(format!(".{}.new", name.to_string_lossy()));
        std::fs::copy(&real, &tmp).with_context(|| format!("copying {} to {}", real.display(), tmp.display()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&tmp, &dst)?;
        tracing::info!("{} is not reachable by server uids; using a copy at {}", real.display(), dst.display());
    }
    Ok(dst)
}

/// Names of mcpbox's environment handed to a prepare sandbox: which CAs the host trusts, and
/// uv's own settings. (Its way out is mcpbox's egress proxy, which sets the proxy variables.)
const PASS_ALWAYS: &[&str] = &["SSL_CERT_FILE", "SSL_CERT_DIR"];
const PASS_NPM: &[&str] = &["NODE_EXTRA_CA_CERTS"];
/// uv's settings that carry no credentials; the indexes are read by [`uv_settings`] and handed
/// over without them.
const PASS_UV: &[&str] =
    &["UV_NATIVE_TLS", "UV_INSECURE_HOST", "UV_INDEX_STRATEGY", "UV_HTTP_TIMEOUT", "UV_CONCURRENT_DOWNLOADS"];

fn passed_env(names: &[&str], extra: &mut Extra) {
    for n in PASS_ALWAYS.iter().chain(names) {
        if let Ok(v) = std::env::var(n) {
            // CA files must be readable inside, too.
            if n.contains("CERT") && Path::new(&v).is_absolute() && Path::new(&v).exists() {
                extra.grants.push((PathBuf::from(&v), Access::Read));
            }
            extra.env.insert(n.to_string(), v);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Egress: the registries the package manager's configuration names, and nothing else
// ---------------------------------------------------------------------------------------------

/// Where a prepare sandbox may connect, through mcpbox's egress proxy (never an internal address):
/// `host:port` of the registries npm's or uv's configuration names, of the hosts those
/// registries serve package files from (read from their answers), of URLs named on the command
/// line, and what the operator lists in [`EXTRA_ALLOW_ENV`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Egress {
    pub allow: std::collections::BTreeSet<String>,
    /// Index/registry URLs (without credentials) whose answers name the download hosts.
    pub indexes: Vec<String>,
}

/// Extra `host:port` entries (comma or space separated, wildcards as in `network.allow`) that
/// prepare sandboxes may reach: e.g. where a package's install script downloads a prebuilt
/// binary from.
pub const EXTRA_ALLOW_ENV: &str = "MCPBOX_PREPARE_ALLOW";

impl Egress {
    fn add_url(&mut self, url: &str) {
        if let Some(hp) = host_port(url) {
            self.allow.insert(hp);
        }
    }
}

/// `host:port` of an http(s) URL (the scheme's port when none is written).
fn host_port(url: &str) -> Option<String> {
    let u = reqwest::Url::parse(url).ok()?;
    if !matches!(u.scheme(), "http" | "https") {
        return None;
    }
    Some(format!("{}:{}", u.host_str()?, u.port_or_known_default()?))
}

/// The URL without user info, and whether it had some (credentials never enter a sandbox
/// that runs install scripts).
fn without_credentials(url: &str) -> (String, bool) {
    match reqwest::Url::parse(url) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            (u.to_string(), true)
        }
        _ => (url.to_string(), false),
    }
}

/// npm's configuration on this host (global and user npmrc, npm_config_* variables) as npm
/// itself reports it, asked outside any sandbox: no package code runs. The sandbox gets the
/// registries (the default and scoped ones) and the CA file as variables, and reads no npmrc at
/// all: neither the user's nor the global one (which may hold tokens), nor one that an earlier
/// install left in the cache.
///
/// Returns the credential lines of the npmrc files npm read (for the download step only, see
/// [`prepare_npm`]).
fn npm_settings(npm_cli: &Path, node: &Path, extra: &mut Extra, egress: &mut Egress) -> anyhow::Result<Vec<String>> {
    // The text form, not --json: only it shows that credentials exist (as `(protected)`).
    let out = std::process::Command::new(node)
        .arg(npm_cli)
        .args(["config", "list", "--long"])
        // Not mcpbox's working directory: a project .npmrc there is not the host's configuration.
        .current_dir("/")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .context("running `npm config list --long`")?;
    if !out.status.success() {
        bail!("`npm config list --long` failed ({}): fix npm's configuration", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let cfg = parse_npm_config_list(&text);
    let auth = npm_auth_lines(&npm_config_files(&text), |k| std::env::var(k).ok());
    let mut notes = Vec::new();
    let env = npm_env(&cfg, &mut notes)?;
    for n in notes {
        tracing::warn!("prepare: {n}");
    }
    for (k, v) in env {
        if k.starts_with("npm_config_") && k.ends_with("registry") {
            egress.add_url(&v);
            egress.indexes.push(v.clone());
        }
        if k == "npm_config_cafile" {
            extra.grants.push((PathBuf::from(&v), Access::Read));
        }
        extra.env.insert(k, v);
    }
    Ok(auth)
}

/// The npmrc files `npm config list --long` says it read (`; "user" config from PATH`).
fn npm_config_files(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| {
            l.trim().strip_prefix("; \"")?.split_once("\" config from ").map(|(_, p)| PathBuf::from(p.trim()))
        })
        .filter(|p| p.is_absolute())
        .collect()
}

/// The credential lines of npmrc files (`//host/path/:_authToken=…`, `_auth`, …), with
/// `${VAR}` expanded from mcpbox's environment as npm would.
fn npm_auth_lines(files: &[PathBuf], var: impl Fn(&str) -> Option<String>) -> Vec<String> {
    let mut out = Vec::new();
    for f in files {
        let Ok(text) = std::fs::read_to_string(f) else { continue };
        for line in text.lines().map(str::trim) {
            let Some((k, v)) = line.split_once('=') else { continue };
            let k = k.trim();
            let key = k.rsplit(':').next().unwrap_or(k);
            if line.starts_with(['#', ';'])
                || !(k.starts_with("//") || k.starts_with('_'))
                || !matches!(key, "_auth" | "_authToken" | "_password" | "username")
            {
                continue;
            }
            let mut value = String::new();
            let mut rest = v.trim();
            while let Some(i) = rest.find("${") {
                value.push_str(&rest[..i]);
                match rest[i + 2..].find('}') {
                    Some(j) => {
                        value.push_str(&var(&rest[i + 2..i + 2 + j]).unwrap_or_default());
                        rest = &rest[i + 3 + j..];
                    }
                    None => {
                        value.push_str(&rest[i..]);
                        rest = "";
                    }
                }
            }
            value.push_str(rest);
            out.push(format!("{k}={value}"));
        }
    }
    out
}

/// `npm config list --long`: `key = JSON value` lines in sections (`; "user" config from …`);
/// overridden entries are commented out. A credential shows as `(protected)`, kept as that
/// string, except in the defaults section (where npm lists its unset auth keys that way).
fn parse_npm_config_list(text: &str) -> serde_json::Map<String, serde_json::Value> {
    let mut cfg = serde_json::Map::new();
    let mut defaults = false;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("; \"") {
            defaults = rest.starts_with("default\"");
            continue;
        }
        if line.starts_with(';') {
            continue;
        }
        let Some((k, v)) = line.split_once(" = ") else { continue };
        let v = v.trim();
        if v == "(protected)" && defaults {
            continue;
        }
        let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_string()));
        cfg.insert(k.trim().to_string(), value);
    }
    cfg
}

/// What a prepare sandbox's npm is told, from npm's effective configuration: the registry and
/// scoped registries without credentials, the CA file, and no config files. Credentials found
/// are named in `notes`, never passed.
fn npm_env(
    cfg: &serde_json::Map<String, serde_json::Value>,
    notes: &mut Vec<String>,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut env = vec![
        ("npm_config_userconfig".to_string(), "/dev/null".to_string()),
        ("npm_config_globalconfig".to_string(), "/dev/null/npmrc".to_string()),
    ];
    let registry = cfg
        .get("registry")
        .and_then(|v| v.as_str())
        .filter(|v| !v.is_empty())
        .context("npm's configuration names no registry (`npm config get registry`)")?;
    let mut with_creds = Vec::new();
    let mut registries = vec![("registry".to_string(), registry.to_string())];
    for (k, v) in cfg {
        if k.starts_with('@') && k.ends_with(":registry") {
            if let Some(url) = v.as_str().filter(|u| !u.is_empty()) {
                registries.push((k.clone(), url.to_string()));
            }
        }
        let secret = k.starts_with("//") || matches!(k.as_str(), "_auth" | "_authToken" | "_password" | "username");
        if secret && !v.is_null() && v.as_str() != Some("") {
            with_creds.push(k.rsplit(':').next().unwrap_or(k).to_string());
        }
    }
    for (key, url) in registries {
        let (clean, had) = without_credentials(&url);
        if had {
            with_creds.push(key.clone());
        }
        env.push((format!("npm_config_{key}"), clean));
    }
    if let Some(ca) = cfg.get("cafile").and_then(|v| v.as_str()).filter(|v| Path::new(v).is_file()) {
        env.push(("npm_config_cafile".into(), ca.into()));
    }
    if !with_creds.is_empty() {
        with_creds.sort();
        with_creds.dedup();
        notes.push(format!(
            "npm's configuration holds registry credentials ({}): they are not given to the prepare sandbox where install scripts run, only to npm while it downloads and unpacks with scripts off",
            with_creds.join(", ")
        ));
    }
    Ok(env)
}

/// uv's indexes as its configuration on this host says, read here (outside any sandbox):
/// `UV_DEFAULT_INDEX`/`UV_INDEX_URL`, `UV_INDEX`/`UV_EXTRA_INDEX_URL`, `UV_FIND_LINKS`, and the
/// system and user `uv.toml` (`index-url`, `extra-index-url`, `find-links`, `[[index]]`, at the
/// top or under `[pip]`); uv's own default when nothing is configured (from `uv --help`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct UvIndexes {
    default: Option<String>,
    extra: Vec<String>,
    find_links: Vec<String>,
}

impl UvIndexes {
    /// Merge one uv.toml (a later file overrides the default index, adds to the rest).
    fn add_toml(&mut self, table: &toml::Table) {
        for t in [Some(table), table.get("pip").and_then(|p| p.as_table())].into_iter().flatten() {
            let strs = |k: &str| -> Vec<String> {
                match t.get(k) {
                    Some(toml::Value::String(s)) => vec![s.clone()],
                    Some(toml::Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
                    _ => vec![],
                }
            };
            if let Some(u) = strs("index-url").pop() {
                self.default = Some(u);
            }
            self.extra.extend(strs("extra-index-url"));
            self.find_links.extend(strs("find-links"));
            for idx in t.get("index").and_then(|v| v.as_array()).into_iter().flatten() {
                let Some(url) = idx.get("url").and_then(|u| u.as_str()) else { continue };
                if idx.get("default").and_then(|d| d.as_bool()) == Some(true) {
                    self.default = Some(url.to_string());
                } else {
                    // Named, as uv matches UV_INDEX_{NAME}_USERNAME/PASSWORD by name.
                    match idx.get("name").and_then(|n| n.as_str()) {
                        Some(n) => self.extra.push(format!("{n}={url}")),
                        None => self.extra.push(url.to_string()),
                    }
                }
            }
        }
    }

    /// The variables uv reads, over the files.
    fn add_env(&mut self, var: impl Fn(&str) -> Option<String>) {
        if let Some(u) = var("UV_DEFAULT_INDEX").or_else(|| var("UV_INDEX_URL")) {
            self.default = Some(u);
        }
        for k in ["UV_INDEX", "UV_EXTRA_INDEX_URL"] {
            self.extra.extend(var(k).unwrap_or_default().split_whitespace().map(str::to_string));
        }
        if let Some(f) = var("UV_FIND_LINKS") {
            self.find_links.extend(f.split([',', ' ']).filter(|s| !s.is_empty()).map(str::to_string));
        }
    }
}

/// An index as uv takes it, `URL` or `NAME=URL` (a name has neither `:` nor `/`): its name and URL.
fn split_named(item: &str) -> (Option<&str>, &str) {
    match item.split_once('=') {
        Some((name, url)) if !name.contains([':', '/']) => (Some(name), url),
        _ => (None, item),
    }
}

/// The uv.toml files uv reads on this host, system first.
fn uv_config_files() -> Vec<PathBuf> {
    if std::env::var_os("UV_NO_CONFIG").is_some_and(|v| !v.is_empty()) {
        return vec![];
    }
    if let Some(f) = std::env::var_os("UV_CONFIG_FILE").filter(|v| !v.is_empty()) {
        return vec![PathBuf::from(f)];
    }
    let mut files = Vec::new();
    let xdg_dirs = std::env::var("XDG_CONFIG_DIRS").ok().filter(|v| !v.is_empty()).unwrap_or_else(|| "/etc/xdg".into());
    for d in xdg_dirs.split(':').map(PathBuf::from).chain([PathBuf::from("/etc")]) {
        let f = d.join("uv/uv.toml");
        if f.is_file() {
            files.push(f);
            break;
        }
    }
    let user = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
    if let Some(u) = user.map(|c| c.join("uv/uv.toml")).filter(|u| u.is_file()) {
        files.push(u);
    }
    files
}

/// uv's default index, as its own help states it (`--default-index … (by default: <URL>)`):
/// mcpbox names no index itself.
fn uv_default_index(uv: &Path) -> anyhow::Result<String> {
    let out = std::process::Command::new(uv)
        .args(["pip", "install", "--help"])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("running {} pip install --help", uv.display()))?;
    let help = String::from_utf8_lossy(&out.stdout);
    let block = help.split("--default-index").nth(1).unwrap_or("");
    let url = block
        .split("default: ")
        .nth(1)
        .map(|rest| rest.trim_start_matches('<').split(['>', ')', ']', ' ', '\n']).next().unwrap_or(""));
    match url.filter(|u| u.starts_with("http")) {
        Some(u) => Ok(u.to_string()),
        None => {
            bail!("cannot tell uv's default index from `{} pip install --help`; set UV_DEFAULT_INDEX", uv.display())
        }
    }
}

/// uv's indexes for a prepare sandbox: handed over as variables without credentials, with
/// `UV_NO_CONFIG=1` so that no uv.toml is read inside (not the user's, which may hold
/// credentials, nor one an earlier install left in the cache). `UV_INDEX_*_USERNAME` /
/// `_PASSWORD`, netrc and keyrings are not passed either.
///
/// Returns, when there are credentials, the variables that carry them (the index URLs as
/// configured and the credential variables), for the wheels-only step (see [`prepare_uv`]).
fn uv_settings(uv: &Path, extra: &mut Extra, egress: &mut Egress) -> anyhow::Result<Option<BTreeMap<String, String>>> {
    let mut idx = UvIndexes::default();
    for f in uv_config_files() {
        let text =
            std::fs::read_to_string(&f).with_context(|| format!("reading uv's configuration {}", f.display()))?;
        let table: toml::Table =
            toml::from_str(&text).with_context(|| format!("parsing uv's configuration {}", f.display()))?;
        idx.add_toml(&table);
    }
    idx.add_env(|k| std::env::var(k).ok().filter(|v| !v.is_empty()));
    let default = match idx.default.clone() {
        Some(d) => d,
        None => uv_default_index(uv)?,
    };
    let mut with_creds = BTreeMap::from([("UV_DEFAULT_INDEX".to_string(), default.clone())]);
    if !idx.extra.is_empty() {
        with_creds.insert("UV_INDEX".into(), idx.extra.join(" "));
    }
    let mut creds = false;
    let mut clean = |u: &str| {
        let (c, had) = without_credentials(u);
        creds |= had;
        c
    };
    let default = clean(&default);
    let extra_idx: Vec<String> = idx
        .extra
        .iter()
        .map(|item| match split_named(item) {
            (Some(n), url) => format!("{n}={}", clean(url)),
            (None, url) => clean(url),
        })
        .collect();
    let mut links = Vec::new();
    for l in &idx.find_links {
        if l.starts_with("http://") || l.starts_with("https://") {
            links.push(clean(l));
        } else {
            let p = PathBuf::from(l.strip_prefix("file://").unwrap_or(l));
            if p.is_absolute() && p.exists() {
                extra.grants.push((p.clone(), Access::Read));
                links.push(p.to_string_lossy().into_owned());
            }
        }
    }
    let cred_vars: Vec<String> = std::env::vars()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with("UV_INDEX_") && (k.ends_with("_USERNAME") || k.ends_with("_PASSWORD")))
        .collect();
    let with_creds = (creds || !cred_vars.is_empty()).then(|| {
        tracing::warn!(
            "prepare: uv's configuration holds index credentials{}: they are not given to the prepare sandbox where build scripts run, only to uv while it installs wheels with builds off",
            if cred_vars.is_empty() { String::new() } else { format!(" ({})", cred_vars.join(", ")) }
        );
        for k in &cred_vars {
            if let Ok(v) = std::env::var(k) {
                with_creds.insert(k.clone(), v);
            }
        }
        with_creds
    });
    let urls: Vec<&str> = std::iter::once(default.as_str()).chain(extra_idx.iter().map(|i| split_named(i).1)).collect();
    for u in urls.iter().copied().chain(links.iter().map(String::as_str).filter(|l| l.starts_with("http"))) {
        egress.add_url(u);
    }
    egress.indexes.extend(urls.iter().map(|u| u.to_string()));
    extra.env.insert("UV_NO_CONFIG".into(), "1".into());
    extra.env.insert("UV_DEFAULT_INDEX".into(), default);
    if !extra_idx.is_empty() {
        extra.env.insert("UV_INDEX".into(), extra_idx.join(" "));
    }
    if !links.is_empty() {
        extra.env.insert("UV_FIND_LINKS".into(), links.join(","));
    }
    Ok(with_creds)
}

/// The name a registry knows a requested package by: npm `@scope/name@1` → `@scope/name`,
/// Python `name[extra]>=1` → `name`. None for local paths and URLs.
fn package_name(manager: Manager, spec: &str) -> Option<String> {
    if spec.starts_with('/') || spec.starts_with('.') || spec.contains(':') {
        return None;
    }
    let name = match manager {
        Manager::Npm => {
            let (scope, rest) = if let Some(r) = spec.strip_prefix('@') { ("@", r) } else { ("", spec) };
            format!("{scope}{}", rest.split('@').next().unwrap_or(rest))
        }
        Manager::Uv => spec.split(|c: char| "=<>!~[; @".contains(c)).next().unwrap_or(spec).to_string(),
    };
    (!name.is_empty() && !name.ends_with('/')).then_some(name)
}

/// The URL at which `index` describes package `name`.
fn metadata_url(manager: Manager, index: &str, name: &str) -> String {
    let base = index.trim_end_matches('/');
    match manager {
        Manager::Npm => format!("{base}/{}", name.replace('/', "%2f")),
        Manager::Uv => {
            // PEP 503 normalization: lowercase, runs of `-_.` become one `-`.
            let mut norm = String::new();
            for c in name.chars() {
                if "-_.".contains(c) {
                    if !norm.ends_with('-') {
                        norm.push('-');
                    }
                } else {
                    norm.push(c.to_ascii_lowercase());
                }
            }
            format!("{base}/{norm}/")
        }
    }
}

/// Most download hosts taken from one registry answer: more is not a registry's file host.
const MAX_FILE_HOSTS: usize = 8;

/// The hosts a registry's answer names for package files: npm's `dist.tarball`, the Simple
/// API's `files[].url` (JSON) or `href` (HTML), resolved against the page's final URL. (Not
/// every URL in the answer: a packument's `repository.url` is no download.)
fn file_hosts_in(manager: Manager, page: &reqwest::Url, body: &[u8]) -> std::collections::BTreeSet<String> {
    let mut urls = Vec::new();
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        let s = |x: Option<&serde_json::Value>| x.and_then(|u| u.as_str()).map(str::to_string);
        match manager {
            Manager::Npm => {
                for ver in v.get("versions").and_then(|x| x.as_object()).into_iter().flat_map(|m| m.values()) {
                    urls.extend(s(ver.get("dist").and_then(|d| d.get("tarball"))));
                }
            }
            Manager::Uv => {
                for f in v.get("files").and_then(|x| x.as_array()).into_iter().flatten() {
                    urls.extend(s(f.get("url")));
                }
            }
        }
    } else if manager == Manager::Uv {
        let text = String::from_utf8_lossy(body);
        for part in text.split("href=").skip(1) {
            let q = part.chars().next().unwrap_or('"');
            if q == '"' || q == '\'' {
                urls.extend(part[1..].split(q).next().map(str::to_string));
            }
        }
    }
    let mut hosts = std::collections::BTreeSet::new();
    for u in urls {
        if let Some(hp) = page.join(&u).ok().and_then(|abs| host_port(abs.as_str())) {
            hosts.insert(hp);
        }
    }
    hosts
}

/// Ask each registry about each requested package (outside any sandbox, mcpbox's own HTTP
/// client: no package code runs) and collect the hosts its answer serves files from, and the
/// host it redirected to. A registry that does not answer adds nothing (the install then says
/// what it could not reach).
fn discover_file_hosts(manager: Manager, pkg: &Package, egress: &mut Egress) {
    let names: Vec<String> = pkg.install.iter().filter_map(|s| package_name(manager, s)).collect();
    if names.is_empty() {
        return;
    }
    let pages: Vec<String> =
        egress.indexes.iter().flat_map(|i| names.iter().map(move |n| metadata_url(manager, i, n))).collect();
    let accept = match manager {
        Manager::Npm => "application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8",
        Manager::Uv => "application/vnd.pypi.simple.v1+json, text/html; q=0.1",
    };
    let found = on_own_runtime(async move {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut hosts = std::collections::BTreeSet::new();
        // The proxy's rule here too: no loopback, link-local or private address, whatever a
        // name resolves to or a redirect names.
        let redirects = reqwest::redirect::Policy::custom(|a| {
            match a.url().host_str().and_then(|h| h.trim_matches(['[', ']']).parse().ok()) {
                Some(ip) if crate::netproxy::is_internal(ip) => a.stop(),
                _ if a.previous().len() >= 5 => a.stop(),
                _ => a.follow(),
            }
        });
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30))
            .redirect(redirects)
            .dns_resolver(std::sync::Arc::new(ExternalOnly));
        let Ok(client) = client.build() else { return hosts };
        for page in pages {
            let literal = reqwest::Url::parse(&page)
                .ok()
                .and_then(|u| u.host_str()?.trim_matches(['[', ']']).parse::<std::net::IpAddr>().ok());
            if literal.is_some_and(crate::netproxy::is_internal) {
                continue;
            }
            let resp = match client.get(&page).header("accept", accept).send().await {
                Ok(r) if r.status().is_success() => r,
                Ok(r) => {
                    tracing::debug!("prepare: {page}: HTTP {}", r.status());
                    continue;
                }
                Err(e) => {
                    tracing::debug!("prepare: {page}: {e}");
                    continue;
                }
            };
            let final_url = resp.url().clone();
            let mut body = Vec::new();
            let mut stream = resp.bytes_stream();
            while let Some(Ok(chunk)) = futures_util::StreamExt::next(&mut stream).await {
                body.extend_from_slice(&chunk);
                if body.len() > 64 << 20 {
                    break;
                }
            }
            let mut found = file_hosts_in(manager, &final_url, &body);
            if let Some(hp) = host_port(final_url.as_str()) {
                found.insert(hp);
            }
            if found.len() > MAX_FILE_HOSTS {
                tracing::warn!("prepare: {page} names {} download hosts; allowing none of them (list the ones needed in {EXTRA_ALLOW_ENV})", found.len());
                continue;
            }
            hosts.extend(found);
        }
        hosts
    });
    egress.allow.extend(found);
}

/// The system resolver, keeping only addresses that are not [`crate::netproxy::is_internal`].
struct ExternalOnly;

impl reqwest::dns::Resolve for ExternalOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((name.as_str(), 0))
                .await?
                .filter(|a| !crate::netproxy::is_internal(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(format!("{} resolves to no external address", name.as_str()).into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The operator's extra entries ([`EXTRA_ALLOW_ENV`]), checked with the allow-list grammar.
fn operator_allow(egress: &mut Egress) -> anyhow::Result<()> {
    let Ok(v) = std::env::var(EXTRA_ALLOW_ENV) else { return Ok(()) };
    let entries: Vec<String> = v.split([',', ' ']).filter(|s| !s.is_empty()).map(str::to_string).collect();
    crate::netproxy::AllowList::parse(&entries).context(EXTRA_ALLOW_ENV)?;
    egress.allow.extend(entries);
    Ok(())
}

/// Run a future to completion on a runtime of its own, on a thread of its own (callers may be
/// on a runtime's blocking thread already).
fn on_own_runtime<F>(f: F) -> F::Output
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + Default + 'static,
{
    std::thread::spawn(move || match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt.block_on(f),
        Err(_) => F::Output::default(),
    })
    .join()
    .unwrap_or_default()
}

/// Progress and outcome of one prepare.
#[derive(Debug)]
pub enum Outcome {
    /// Already prepared for this request.
    Ready(Prepared),
    /// Installed now.
    Installed(Prepared, Duration),
}

impl Outcome {
    pub fn prepared(&self) -> &Prepared {
        match self {
            Outcome::Ready(p) | Outcome::Installed(p, _) => p,
        }
    }
}

/// Prepare server `name` (blocking: runs sandboxes and waits for them). `force` prepares again
/// even when the record matches.
pub fn prepare_blocking(state: &StateDir, name: &str, pkg: &Package, force: bool) -> anyhow::Result<Outcome> {
    launch::check_name(name)?;
    if let Some(dir) = &pkg.local {
        // A `--prefix` install: the user's own, run as it is; nothing to prepare.
        return local_prepared(pkg, dir).map(Outcome::Ready);
    }
    let dirs = ServerDirs::create(state, name)?;
    // One prepare per server at a time (serve and `mcpbox prepare` may overlap). The lock lives
    // beside the cache, where the sandbox cannot reach it.
    let lock_path = state.root.join(name).join("prepare.lock");
    let lock_file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", lock_path.display()))?;
    if !force {
        if let Some(p) = load_prepared(&dirs.cache, pkg) {
            return Ok(Outcome::Ready(p));
        }
    }
    // The tree the record names now: the one sandboxes start from until the switch below, kept
    // (with the new one) after it.
    let previous = recorded_tree_name(&dirs.cache).map(|(n, _)| n);
    if force {
        // Everything in CACHE was written by earlier installs (install scripts included): an
        // npmrc, uv's config, poisoned npm or uv caches. The new install starts from nothing;
        // only the installed trees (which it never reads) and the record stay, since a sandbox
        // may be running from them.
        clear_for_force(&dirs.cache)?;
    }
    let started = Instant::now();
    tracing::info!(server = %name, "preparing: resolving {} {}", pkg.manager.command(), pkg.install.join(" "));
    let tree = next_tree(&dirs.cache, pkg.manager)?;
    let installed = match pkg.manager {
        Manager::Npm => prepare_npm(state, name, &dirs, pkg, &tree),
        Manager::Uv => prepare_uv(state, name, &dirs, pkg, &tree),
    };
    let p = match installed.and_then(|p| write_record(&dirs.cache, &p).map(|()| p)) {
        Ok(p) => p,
        Err(e) => {
            // The record and the tree it names are as they were; what was half installed goes.
            if let Err(r) = remove_entry(&tree) {
                tracing::warn!(server = %name, "{r:#}");
            }
            return Err(e);
        }
    };
    let new_name = tree.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let keep: Vec<&str> = std::iter::once(new_name).chain(previous.as_deref()).collect();
    if let Err(e) = remove_old_trees(&dirs.cache, &keep) {
        tracing::warn!(server = %name, "removing older install trees: {e:#}");
    }
    let took = started.elapsed();
    tracing::info!(server = %name, "prepared {}@{} in {:.1} s (entry {})", p.package, p.version, took.as_secs_f64(), p.entry.display());
    Ok(Outcome::Installed(p, took))
}

/// Write `CACHE/prepared.json` in one step (a new file renamed over the old one): a sandbox
/// starting meanwhile reads either record, each naming a complete tree.
fn write_record(cache: &Path, p: &Prepared) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(p)?;
    let tmp = cache.join(".prepared.json.new");
    let _ = std::fs::remove_file(&tmp);
    // create_new: never through a link someone left there.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, cache.join(RECORD)).with_context(|| format!("writing {}", cache.join(RECORD).display()))
}

/// The rest of a prepare's egress, once the registries are known: URLs named on the command
/// line, the registries' download hosts, the operator's extra entries.
fn egress_for(name: &str, manager: Manager, pkg: &Package, egress: &mut Egress) -> anyhow::Result<()> {
    for spec in &pkg.install {
        let url = spec.strip_prefix("git+").unwrap_or(spec);
        if url.starts_with("https://") || url.starts_with("http://") {
            egress.add_url(url.split('#').next().unwrap_or(url));
        }
    }
    discover_file_hosts(manager, pkg, egress);
    operator_allow(egress)?;
    tracing::info!(server = %name, "the prepare sandbox reaches only {} (through mcpbox's egress proxy)", egress.allow.iter().cloned().collect::<Vec<_>>().join(", "));
    Ok(())
}

/// `--force`: remove everything inside `cache` (never following a link out of it) but the record
/// and the install trees — directories named like one, not links — and keep `cache` itself with
/// its owner and mode.
fn clear_for_force(cache: &Path) -> anyhow::Result<()> {
    for e in std::fs::read_dir(cache).with_context(|| format!("reading {}", cache.display()))? {
        let e = e?;
        // file_type() does not follow links: a link is removed, not its target.
        let ty = e.file_type()?;
        let name = e.file_name();
        let name = name.to_str();
        let keep =
            (ty.is_dir() && name.is_some_and(|n| tree_name(n).is_some())) || (ty.is_file() && name == Some(RECORD));
        if !keep {
            remove_entry(&e.path())?;
        }
    }
    Ok(())
}

fn local_paths(pkg: &Package, extra: &mut Extra) -> anyhow::Result<Vec<String>> {
    // A local tarball or directory must be readable inside the sandbox: grant it (read only)
    // and hand it over by absolute path.
    let mut out = Vec::new();
    for spec in &pkg.install {
        let path = spec.strip_prefix("file:").unwrap_or(spec);
        let local = path.starts_with('/')
            || path.starts_with("./")
            || path.starts_with("../")
            || path.ends_with(".tgz")
            || path.ends_with(".whl");
        if local {
            let abs = std::fs::canonicalize(path).with_context(|| format!("package {spec}: no such file"))?;
            extra.grants.push((abs.clone(), Access::Read));
            out.push(abs.to_string_lossy().into_owned());
        } else {
            out.push(spec.clone());
        }
    }
    Ok(out)
}

/// Install into `prefix`, a new tree in the cache (see [`next_tree`]).
fn prepare_npm(
    state: &StateDir,
    name: &str,
    dirs: &ServerDirs,
    pkg: &Package,
    prefix: &Path,
) -> anyhow::Result<Prepared> {
    let node = find_node()?;
    let (npm_cli, npm_dir) = find_npm()?;
    let mut extra = Extra::default();
    extra.grants.push((npm_dir, Access::Read));
    passed_env(PASS_NPM, &mut extra);
    let mut egress = Egress::default();
    let auth = npm_settings(&npm_cli, &node, &mut extra, &mut egress)?;
    explicit_registry(pkg, &mut extra, &mut egress);
    let install = local_paths(pkg, &mut extra)?;
    egress_for(name, Manager::Npm, pkg, &mut egress)?;
    let prefix = prefix.to_path_buf();
    // create_dir: a fresh name, never something already there.
    std::fs::create_dir(&prefix).with_context(|| format!("creating {}", prefix.display()))?;
    // Made by mcpbox: the server's uid owns it like the cache around it (the plan's ownership
    // walk only runs on a cache whose top it does not own yet).
    {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&dirs.cache)?;
        std::os::unix::fs::lchown(&prefix, Some(m.uid()), Some(m.gid()))
            .with_context(|| format!("chown {}", prefix.display()))?;
    }
    let c = |p: &str| dirs.cache.join(p).to_string_lossy().into_owned();
    for (k, v) in [
        ("npm_config_cache", c("npm-cache")),
        ("npm_config_update_notifier", "false".into()),
        ("npm_config_fund", "false".into()),
        ("npm_config_audit", "false".into()),
        ("npm_config_yes", "true".into()),
        ("npm_config_loglevel", "warn".into()),
        ("HOME", c("")),
    ] {
        extra.env.insert(k.into(), v);
    }
    // Two steps. 1: npm resolves, downloads and unpacks with every script off: no package code
    // runs, so it may hold the registry credentials (a file beside the cache, granted to this
    // step only and removed after it). 2: `npm rebuild` runs the install scripts, without them.
    let npm = npm_cli.to_string_lossy().into_owned();
    let pfx = prefix.to_string_lossy().into_owned();
    let mut args = vec![
        npm.clone(),
        "install".into(),
        "--prefix".into(),
        pfx.clone(),
        "--omit=dev".into(),
        "--no-package-lock".into(),
        "--ignore-scripts".into(),
    ];
    args.extend(install);
    tracing::info!(server = %name, "installing with npm into {} (scripts off)", prefix.display());
    let mut fetch = extra.clone();
    let auth_file = AuthFile::write(&state.root.join(name).join(NPM_AUTH_FILE), &dirs.cache, &auth)?;
    if let Some(f) = &auth_file {
        fetch.grants.push((f.0.clone(), Access::Read));
        fetch.env.insert("npm_config_userconfig".into(), f.0.to_string_lossy().into_owned());
    }
    run_sandboxed(state, name, Manager::Npm, &node, args, fetch, &egress)?;
    drop(auth_file);
    tracing::info!(server = %name, "running the install scripts (npm rebuild)");
    let args = vec![npm, "rebuild".into(), "--prefix".into(), pfx];
    run_sandboxed(state, name, Manager::Npm, &node, args, extra, &egress)?;

    // Which package was installed: the one dependency of the prefix's package.json.
    let rel = prefix.strip_prefix(&dirs.cache).context("the npm prefix is not in the cache")?.to_path_buf();
    let top: serde_json::Value = serde_json::from_str(&read_inside(&dirs.cache, &rel.join("package.json"))?)?;
    let deps: Vec<String> =
        top.get("dependencies").and_then(|d| d.as_object()).map(|m| m.keys().cloned().collect()).unwrap_or_default();
    // With --package, the command names the bin; pick the package that provides it.
    let mut candidates = Vec::new();
    for d in &deps {
        let pj_rel = rel.join("node_modules").join(d).join("package.json");
        let pj: serde_json::Value = serde_json::from_str(&read_inside(&dirs.cache, &pj_rel)?)?;
        candidates.push((d.clone(), pj));
    }
    let want_bin = pkg.bin.clone();
    for (dep, pj) in &candidates {
        let bins: BTreeMap<String, String> = match pj.get("bin") {
            Some(serde_json::Value::String(s)) => {
                let unscoped = dep.rsplit('/').next().unwrap_or(dep).to_string();
                BTreeMap::from([(unscoped, s.clone())])
            }
            Some(serde_json::Value::Object(m)) => {
                m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect()
            }
            _ => BTreeMap::new(),
        };
        let unscoped = dep.rsplit('/').next().unwrap_or(dep);
        let chosen = match &want_bin {
            Some(b) => bins.get(b),
            // npx's rule: the only bin, or the one named like the package.
            None if bins.len() == 1 => bins.values().next(),
            None => bins.get(unscoped),
        };
        if let Some(rel) = chosen {
            let pkg_dir = prefix.join("node_modules").join(dep);
            let entry = pkg_dir.join(rel);
            let real = launch::resolve(&entry)?.0;
            if !real.starts_with(launch::resolve(&prefix)?.0) || !real.is_file() {
                bail!("package {dep}: bin {rel} is not a file inside the package");
            }
            let version = pj.get("version").and_then(|v| v.as_str()).unwrap_or("?").to_string();
            let runtime = Some(launch::resolve(&node)?.0);
            return Ok(Prepared {
                request: pkg.clone(),
                package: dep.clone(),
                version,
                interpreter: node,
                entry,
                runtime,
                prepared_at: now(),
            });
        }
    }
    match want_bin {
        Some(b) => bail!("none of the installed packages ({}) provides a command `{b}`", deps.join(", ")),
        None => bail!("package {} has no bin to run (or several, none named after the package)", deps.join(", ")),
    }
}

/// Beside (not in) a server's cache: the npm credentials of a download step.
pub const NPM_AUTH_FILE: &str = "prepare-auth.npmrc";
/// Beside (not in) a server's cache: uv's cache while it installs with index credentials.
pub const UV_AUTH_CACHE: &str = "prepare-auth-uv-cache";

/// A directory owned like the cache, removed with everything in it when dropped.
struct AuthDir(PathBuf);

impl AuthDir {
    fn create(path: &Path, owner_like: &Path) -> anyhow::Result<AuthDir> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        if std::fs::symlink_metadata(path).is_ok() {
            let _ = std::fs::remove_dir_all(path).or_else(|_| std::fs::remove_file(path));
        }
        std::fs::create_dir(path).with_context(|| format!("creating {}", path.display()))?;
        let dir = AuthDir(path.to_path_buf());
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
        let m = std::fs::metadata(owner_like)?;
        std::os::unix::fs::lchown(path, Some(m.uid()), Some(m.gid()))
            .with_context(|| format!("chown {}", path.display()))?;
        Ok(dir)
    }
}

impl Drop for AuthDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A credentials file readable by the server's uid only, removed when dropped.
struct AuthFile(PathBuf, Option<usize>);

/// For the commands that prepare with the signals' default actions in place (`run`, `policy
/// learn`, `prepare`): SIGINT, SIGTERM and SIGHUP first remove the registry credentials a
/// download step holds on disk (each [`AuthFile`] while it exists), then end mcpbox as before.
/// A signal with a handler of its own (`serve`'s) is left alone.
pub fn remove_credentials_on_signal() {
    crate::sandbox::remove_files_on_fatal_signals();
}

impl AuthFile {
    /// None when there are no lines to write.
    fn write(path: &Path, owner_like: &Path, lines: &[String]) -> anyhow::Result<Option<AuthFile>> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let _ = std::fs::remove_file(path);
        if lines.is_empty() {
            return Ok(None);
        }
        let mut text = lines.join("\n");
        text.push('\n');
        let file = AuthFile(path.to_path_buf(), crate::sandbox::remove_on_fatal_signal(path));
        // create_new: never through a link someone left there.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        std::io::Write::write_all(&mut f, text.as_bytes())?;
        let m = std::fs::metadata(owner_like)?;
        std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid()))
            .with_context(|| format!("chown {}", path.display()))?;
        Ok(Some(file))
    }
}

impl Drop for AuthFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        if let Some(slot) = self.1 {
            crate::sandbox::keep_on_fatal_signal(slot);
        }
    }
}

/// Build the virtualenv at `venv_dir`, a new tree in the cache (see [`next_tree`]).
fn prepare_uv(
    state: &StateDir,
    name: &str,
    dirs: &ServerDirs,
    pkg: &Package,
    venv_dir: &Path,
) -> anyhow::Result<Prepared> {
    let uv = stage_for_others(state, &find_uv()?)?;
    let python = python_for(pkg)?;
    let mut extra = Extra::default();
    extra.grants.push((uv.clone(), Access::Exec));
    passed_env(PASS_UV, &mut extra);
    let mut egress = Egress::default();
    let mut creds = uv_settings(&uv, &mut extra, &mut egress)?;
    explicit_registry(pkg, &mut extra, &mut egress);
    if let (Some(c), Some(r)) = (creds.as_mut(), &pkg.registry) {
        c.insert("UV_DEFAULT_INDEX".into(), r.clone());
    }
    let install = local_paths(pkg, &mut extra)?;
    egress_for(name, Manager::Uv, pkg, &mut egress)?;
    let c = |p: &str| dirs.cache.join(p).to_string_lossy().into_owned();
    let py = python.to_string_lossy().into_owned();
    for (k, v) in [
        ("UV_CACHE_DIR", c("uv-cache")),
        ("UV_PYTHON_DOWNLOADS", "never".into()),
        ("UV_PYTHON", py.clone()),
        ("UV_NO_PROGRESS", "1".into()),
        ("HOME", c("")),
    ] {
        extra.env.insert(k.into(), v);
    }
    let venv_dir = venv_dir.to_path_buf();
    let v = venv_dir.to_string_lossy().into_owned();
    tracing::info!(server = %name, "creating a virtualenv on {} at {v}", python.display());
    run_sandboxed(
        state,
        name,
        Manager::Uv,
        &uv,
        vec!["venv".into(), "--python".into(), py, v.clone()],
        extra.clone(),
        &egress,
    )?;
    tracing::info!(server = %name, "installing with uv: {}", install.join(" "));
    // Bytecode is compiled here, once: the run phase may not write `.pyc` files, and a server
    // importing from source pays for the compilation at every start (mcp-server-time: 1.1 s
    // from source against 0.67 s from bytecode).
    let mut args =
        vec!["pip".into(), "install".into(), "--compile-bytecode".into(), "--python".into(), format!("{v}/bin/python")];
    args.extend(install);
    // With index credentials: first wheels only (`--no-build`: no package code runs) with the
    // credentials and a cache of its own beside the server's cache, removed after it (what uv
    // keeps of an authenticated index is never shown to a build). Whatever needs a build is
    // installed in the next step, without them.
    let mut done = false;
    if let Some(creds) = creds {
        let scratch = AuthDir::create(&state.root.join(name).join(UV_AUTH_CACHE), &dirs.cache)?;
        let mut with = extra.clone();
        with.env.extend(creds);
        with.env.insert("UV_CACHE_DIR".into(), scratch.0.to_string_lossy().into_owned());
        with.grants.push((scratch.0.clone(), Access::Write));
        let mut a = args.clone();
        a.push("--no-build".into());
        match run_sandboxed(state, name, Manager::Uv, &uv, a, with, &egress) {
            Ok(()) => done = true,
            Err(e) => {
                tracing::warn!(server = %name, "wheels-only install with the index credentials failed; installing without them: {e:#}")
            }
        }
    }
    if !done {
        run_sandboxed(state, name, Manager::Uv, &uv, args, extra, &egress)?;
    }

    let bin = pkg.bin.clone().context("uvx: no command")?;
    let entry = venv_dir.join("bin").join(&bin);
    let real = launch::resolve(&entry).with_context(|| format!("the installed packages provide no command `{bin}`"))?.0;
    if !real.starts_with(launch::resolve(&venv_dir)?.0) || !real.is_file() {
        bail!("the installed packages provide no command `{bin}` inside the virtualenv");
    }
    // The distribution's version, from its .dist-info directory.
    let norm = |s: &str| s.to_ascii_lowercase().replace(['-', '.'], "_");
    let first = &pkg.install[0];
    let dist = if first.starts_with('/') {
        bin.clone()
    } else {
        first.split(|c: char| "=<>!~[; @".contains(c)).next().unwrap_or(first).to_string()
    };
    let mut version = "?".to_string();
    if let Ok(libs) = std::fs::read_dir(venv_dir.join("lib")) {
        for lib in libs.flatten() {
            if let Ok(sp) = std::fs::read_dir(lib.path().join("site-packages")) {
                for e in sp.flatten() {
                    let f = e.file_name().to_string_lossy().into_owned();
                    if let Some(stem) = f.strip_suffix(".dist-info") {
                        if let Some((n, ver)) = stem.rsplit_once('-') {
                            if norm(n) == norm(&dist) {
                                version = ver.to_string();
                            }
                        }
                    }
                }
            }
        }
    }
    // uv was told to build on `python`; the virtualenv's python must lead there.
    let runtime = launch::resolve(&python)?.0;
    let built_on = launch::resolve(&venv_dir.join("bin/python"))?.0;
    if built_on != runtime {
        bail!("uv built the virtualenv on {}, not on {} as asked", built_on.display(), runtime.display());
    }
    Ok(Prepared {
        request: pkg.clone(),
        package: dist,
        version,
        interpreter: venv_dir.join("bin/python"),
        entry,
        runtime: Some(runtime),
        prepared_at: now(),
    })
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// How long one package-manager step may take.
pub const PREPARE_TIMEOUT: Duration = Duration::from_secs(600);

/// Run one package-manager step in the prepare sandbox; its output is logged at debug and the
/// last lines are part of the error when it fails.
///
/// The sandbox's network is `proxy` mode: a namespace of its own whose only way out is mcpbox's
/// egress proxy, served here for as long as the step runs, allowing `egress` and never loopback, link-local or private
/// addresses. At `container` level (no namespaces: a default Docker container) and only when
/// the process allows that level, the step runs on the container's network instead, narrowed
/// by Landlock to the registries' ports, and says so.
fn run_sandboxed(
    state: &StateDir,
    name: &str,
    manager: Manager,
    exe: &Path,
    args: Vec<String>,
    extra: Extra,
    egress: &Egress,
) -> anyhow::Result<()> {
    let launch = ServerLaunch {
        name: name.to_string(),
        command: exe.to_string_lossy().into_owned(),
        args,
        env: BTreeMap::new(),
        policy: PolicyRef::Named(manager.prepare_policy().into()),
    };
    let mut planned = launch::plan_with(state, &launch, &extra)?;
    for n in &planned.notes {
        tracing::debug!(server = %name, "prepare: {n}");
    }
    if !matches!(planned.policy.network, crate::policy::Network::Proxy { .. }) {
        bail!("policy {} must use network mode `proxy`: install scripts reach only the registries (add hosts with {EXTRA_ALLOW_ENV})", planned.policy.source);
    }
    let entries: Vec<String> = egress.allow.iter().cloned().collect();
    let allow = crate::netproxy::AllowList::parse(&entries).map_err(|e| anyhow::anyhow!("prepare egress: {e}"))?;
    let spawned = crate::sandbox::spawn_blocking_std(&planned.spec, Stdio::null(), Stdio::piped(), Stdio::piped());
    let (mut child, report, listener) = match spawned {
        // sandbox-init refuses `proxy` without a network namespace (see sandbox::init).
        Err(crate::sandbox::SandboxError::Setup(m))
            if m.contains("needs a network namespace")
                && planned.spec.outer.min_level <= crate::policy::Level::Container =>
        {
            tracing::warn!(
                server = %name,
                "prepare at `container` level: no network namespace for the egress proxy, so npm/uv and install scripts use the container's network, narrowed to TCP ports {} by Landlock",
                ports_of(&entries).iter().map(u16::to_string).collect::<Vec<_>>().join(", ")
            );
            container_network(&mut planned.spec, &entries);
            crate::sandbox::spawn_blocking_std(&planned.spec, Stdio::null(), Stdio::piped(), Stdio::piped())
                .map_err(|e| anyhow::anyhow!("prepare sandbox: {e}"))?
        }
        other => other.map_err(|e| anyhow::anyhow!("prepare sandbox: {e}"))?,
    };
    // Served until this step ends (dropped at return).
    let _proxy = match listener {
        Some(l) => {
            let mut cfg = crate::netproxy::ProxyConfig::new(allow, planned.policy.source.clone(), name.to_string());
            cfg.refuse_internal = true;
            Some(crate::netproxy::ProxyThread::start(l, cfg)?)
        }
        None if matches!(planned.spec.outer.network, crate::policy::Network::Proxy { .. }) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the prepare sandbox did not hand over its proxy socket");
        }
        None => None,
    };
    for w in &report.warnings {
        tracing::warn!(server = %name, "prepare sandbox weakened: {w}");
    }
    let tail = Arc::new(Mutex::new(std::collections::VecDeque::<String>::new()));
    let mut readers = Vec::new();
    for stream in [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let (tail, name) = (tail.clone(), name.to_string());
        readers.push(std::thread::spawn(move || {
            // Bounded while reading: an install script's endless line costs 500 bytes here.
            crate::bridge::framing::read_log_lines_blocking(stream, 500, |line| {
                let line = line.to_string();
                tracing::debug!(server = %name, "prepare: {line}");
                let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
                if t.len() >= 20 {
                    t.pop_front();
                }
                t.push_back(line);
            });
        }));
    }
    let deadline = Instant::now() + PREPARE_TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    for r in readers {
        let _ = r.join();
    }
    let tail = tail.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect::<Vec<_>>().join("\n  ");
    match status {
        None => bail!("{} did not finish within {:?}; last output:\n  {tail}", exe.display(), PREPARE_TIMEOUT),
        Some(st) if !st.success() => bail!("{} failed ({st}); last output:\n  {tail}", exe.display()),
        Some(_) => Ok(()),
    }
}

/// The TCP ports of `host:port` entries.
fn ports_of(entries: &[String]) -> Vec<u16> {
    let mut ports: Vec<u16> =
        entries.iter().filter_map(|e| e.parse::<crate::policy::AllowEntry>().ok()).map(|e| e.port).collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// `container` level: the container's network, TCP connect narrowed by Landlock to the
/// registries' ports, and no proxy variables pointing at a proxy that is not there.
fn container_network(spec: &mut crate::sandbox::SandboxSpec, entries: &[String]) {
    spec.outer.network =
        crate::policy::Network::Host { connect_ports: Some(ports_of(entries)), bind_ports: Some(vec![]) };
    for k in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
        "NODE_USE_ENV_PROXY",
    ] {
        spec.env.remove(k);
    }
}

/// The run phase: rewrite an npx/uvx launch to execute the prepared entry point directly
/// (the policy stays what [`super::effective`] chose). Returns None for other commands.
pub fn for_run(state: &StateDir, launch: &ServerLaunch) -> Option<anyhow::Result<(ServerLaunch, Extra)>> {
    let pkg = match parse(&launch.command, &launch.args)? {
        Ok(p) => p,
        Err(e) => return Some(Err(e)),
    };
    Some(run_launch(state, launch, pkg))
}

fn run_launch(state: &StateDir, launch: &ServerLaunch, pkg: Package) -> anyhow::Result<(ServerLaunch, Extra)> {
    if let Some(dir) = &pkg.local {
        return run_local(launch, &pkg, dir);
    }
    let cache = state.root.join(&launch.name).join("cache");
    let Some(p) = load_prepared(&cache, &pkg) else {
        bail!(
            "{} {} is not prepared for server {} (run `mcpbox prepare --config …`, or let `mcpbox serve` prepare it at start)",
            pkg.manager.command(),
            pkg.install.join(" "),
            launch.name
        );
    };
    let mut extra = Extra::default();
    // The tree this record names (the newest one that installed completely).
    let tree = record_tree(&cache, &p)?;
    // The tree was written by the package manager and install scripts: a symlink there must not
    // turn into a grant of something outside the cache.
    let cache_real = launch::resolve(&cache)?.0;
    let tree_real = launch::resolve(&tree)?.0;
    if !tree_real.starts_with(&cache_real) || tree_real == cache_real {
        bail!("{} leads outside the cache of server {}; prepare again (--force)", tree.display(), launch.name);
    }
    // The installed tree: read and exec (console scripts, native addons), never write.
    extra.grants.push((tree_real, Access::Exec));
    // Should anything still call a package manager, it is told to stay offline.
    extra.env.insert("npm_config_offline".into(), "true".into());
    extra.env.insert("UV_OFFLINE".into(), "1".into());
    let mut l = launch.clone();
    l.command = p.interpreter.to_string_lossy().into_owned();
    l.args = std::iter::once(p.entry.to_string_lossy().into_owned()).chain(pkg.args.iter().cloned()).collect();
    Ok((l, extra))
}

/// Prepare every enabled npx/uvx server of `cfg`, one after another (they compete for the same
/// network and disk). Returns the servers whose prepare failed, with the reason.
/// Servers in `refused` (their policy would refuse them at launch) are not prepared.
pub async fn prepare_config(
    state: &StateDir,
    cfg: &crate::config::Config,
    force: bool,
    refused: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut failed = BTreeMap::new();
    for (name, server) in &cfg.servers {
        let crate::config::ServerKind::Stdio { command, args, .. } = &server.kind else { continue };
        if server.disabled || refused.contains_key(name) {
            continue;
        }
        let pkg = match parse(command, args) {
            None => continue,
            Some(Ok(p)) => p,
            Some(Err(e)) => {
                tracing::error!(server = %name, "cannot prepare: {e:#}");
                failed.insert(name.clone(), format!("{e:#}"));
                continue;
            }
        };
        let (st, n) = (state.clone(), name.clone());
        let r = tokio::task::spawn_blocking(move || prepare_blocking(&st, &n, &pkg, force)).await;
        match r {
            Ok(Ok(Outcome::Ready(p))) => {
                tracing::info!(server = %name, "already prepared: {}@{}", p.package, p.version);
            }
            Ok(Ok(Outcome::Installed(..))) => {}
            Ok(Err(e)) => {
                tracing::error!(server = %name, "prepare failed: {e:#}");
                failed.insert(name.clone(), format!("{e:#}"));
            }
            Err(e) => {
                failed.insert(name.clone(), format!("prepare task: {e}"));
            }
        }
    }
    failed
}

/// `mcpbox prepare --config FILE`: 0 when every npx/uvx server is prepared, 1 otherwise.
pub fn cli(
    config: &Path,
    state_dir: Option<PathBuf>,
    force: bool,
    min_level: crate::policy::Level,
) -> std::process::ExitCode {
    remove_credentials_on_signal();
    let cfg = match crate::config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mcpbox: {}: {e}", config.display());
            return std::process::ExitCode::from(2);
        }
    };
    let state = StateDir::for_config(&cfg, config, state_dir, min_level);
    let rt = match crate::runtime("prepare", false) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let planner = super::Planner::new(state.clone(), &cfg);
    let refused = planner.refusals(&cfg);
    let mut failed = rt.block_on(prepare_config(&state, &cfg, force, &refused));
    failed.extend(refused);
    if failed.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        eprintln!("mcpbox: prepare failed for {}", failed.keys().cloned().collect::<Vec<_>>().join(", "));
        std::process::ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn npx_lines() {
        let p =
            parse("npx", &v(&["-y", "@modelcontextprotocol/server-filesystem@1.0.0", "/srv", "--x"])).unwrap().unwrap();
        assert_eq!(p.install, v(&["@modelcontextprotocol/server-filesystem@1.0.0"]));
        assert_eq!(p.bin, None);
        assert_eq!(p.args, v(&["/srv", "--x"]));
        let p = parse("/usr/bin/npx", &v(&["--yes", "--package", "a", "-p=b", "cmd"])).unwrap();
        assert!(p.is_err(), "-p=b is not an npx form");
        let p = parse("npx", &v(&["--package=a", "--package", "b", "cmd", "arg"])).unwrap().unwrap();
        assert_eq!((p.install, p.bin, p.args), (v(&["a", "b"]), Some("cmd".into()), v(&["arg"])));
        assert!(parse("npx", &v(&["-y"])).unwrap().is_err());
        assert!(parse("npx", &v(&["-c", "echo"])).unwrap().is_err());
        assert!(parse("node", &v(&["x"])).is_none());
    }

    #[test]
    fn shipped_server_policies_say_what_the_servers_need() {
        use crate::policy::{load, LoadContext, Network};
        let d = tempfile::tempdir().unwrap();
        let (data, cache) = (d.path().join("data"), d.path().join("cache"));
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(&cache).unwrap();
        let mut ctx = LoadContext {
            lazy: Some(
                crate::plan::runtime::Lazy::new(None, DEFAULT_PATH, crate::plan::runtime::Untrusted::dir(d.path()))
                    .vars(),
            ),
            ..LoadContext::default()
        };
        ctx.vars.insert("DATA".into(), data.to_string_lossy().into_owned());
        ctx.vars.insert("CACHE".into(), cache.to_string_lossy().into_owned());
        let mem = load("server-memory", &ctx).unwrap();
        assert!(mem.env.set["MEMORY_FILE_PATH"].starts_with(&*data.to_string_lossy()));
        assert!(mem.filesystem.write.iter().any(|r| r.path == data));
        assert_eq!(load("mcp-server-fetch", &ctx).unwrap().network, Network::Proxy { allow: vec![] });
        let git = load("mcp-server-git", &ctx).unwrap();
        assert_eq!(git.env.set["GIT_CONFIG_KEY_0"], "safe.directory");
        assert!(git.filesystem.exec.iter().any(|r| r.path == Path::new("/usr/bin/git")));
        assert_eq!(load("mcp-server-time", &ctx).unwrap().env.set["TZ"], "UTC");
        for p in ["server-everything", "server-sequential-thinking", "mcp-server-time", "mcp-server-git"] {
            assert_eq!(load(p, &ctx).unwrap().network, Network::None, "{p}");
        }
        for p in ["prepare-npm", "prepare-uv"] {
            let pol = load(p, &ctx).unwrap();
            assert_eq!(
                pol.filesystem.write.iter().map(|r| r.path.clone()).collect::<Vec<_>>(),
                vec![cache.clone()],
                "{p}"
            );
            assert_eq!(pol.network, Network::Proxy { allow: vec![] }, "{p}");
        }
    }

    #[test]
    fn run_phase_execs_the_recorded_entry_with_the_runtime_base_when_no_policy() {
        let Ok(node) = find_node() else { return };
        let d = tempfile::tempdir().unwrap();
        let state = StateDir::new(d.path().to_path_buf());
        let cache = d.path().join("srv/cache");
        let pkg_dir = cache.join("npm/node_modules/x");
        std::fs::create_dir_all(&pkg_dir).unwrap();
        std::fs::write(pkg_dir.join("bin.js"), "").unwrap();
        let pkg = parse("npx", &v(&["-y", "x@1", "--flag"])).unwrap().unwrap();
        let launch = ServerLaunch {
            name: "srv".into(),
            command: "npx".into(),
            args: v(&["-y", "x@1", "--flag"]),
            env: BTreeMap::new(),
            policy: PolicyRef::Named("default".into()),
        };
        let (launch, choice) = super::super::effective(launch, false);
        assert!(matches!(&choice, super::super::PolicyChoice::RuntimeBase(m) if m.contains("no policy")), "{choice:?}");
        assert!(for_run(&state, &launch).unwrap().is_err(), "not prepared yet");
        let runtime = Some(launch::resolve(&node).unwrap().0);
        // A record without the runtime it was prepared on is prepared again.
        let old = Prepared {
            request: pkg.clone(),
            package: "x".into(),
            version: "1".into(),
            interpreter: node.clone(),
            entry: pkg_dir.join("bin.js"),
            runtime: None,
            prepared_at: 0,
        };
        std::fs::write(cache.join(RECORD), serde_json::to_string(&old).unwrap()).unwrap();
        assert!(for_run(&state, &launch).unwrap().is_err(), "a record without its runtime");
        let rec = Prepared { runtime, ..old };
        std::fs::write(cache.join(RECORD), serde_json::to_string(&rec).unwrap()).unwrap();
        let (l, extra) = for_run(&state, &launch).unwrap().unwrap();
        assert_eq!(l.command, node.to_string_lossy());
        assert_eq!(l.args, v(&[&pkg_dir.join("bin.js").to_string_lossy(), "--flag"]));
        assert!(matches!(&l.policy, PolicyRef::Named(n) if n == "node"));
        assert!(extra.grants.iter().any(|(p, a)| *p == cache.join("npm") && *a == Access::Exec));
        // A record pointing outside the installed tree is not trusted.
        let bad = Prepared { entry: PathBuf::from("/etc/passwd"), ..rec };
        std::fs::write(cache.join(RECORD), serde_json::to_string(&bad).unwrap()).unwrap();
        assert!(for_run(&state, &launch).unwrap().is_err());
        // An install tree replaced by a link to somewhere else is not granted.
        let elsewhere = d.path().join("elsewhere");
        std::fs::rename(cache.join("npm"), &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, cache.join("npm")).unwrap();
        std::fs::write(
            cache.join(RECORD),
            serde_json::to_string(&Prepared { entry: pkg_dir.join("bin.js"), ..bad }).unwrap(),
        )
        .unwrap();
        assert!(for_run(&state, &launch).unwrap().is_err());
    }

    #[test]
    fn npm_config_list_is_read_with_its_protected_keys() {
        let text = "; \"default\" config from default values\n_auth = (protected)\nregistry = \"https://npm.example.test/\"\n; cafile = null ; overridden by global\n\n\
                    ; \"global\" config from /usr/etc/npmrc\ncafile = \"/etc/ssl/ca.pem\"\n; \"user\" config from /root/.npmrc\n\
                    //npm.example.test/:_authToken = (protected)\n@corp:registry = \"https://corp.example.test/\"\n";
        let cfg = parse_npm_config_list(text);
        assert_eq!(cfg["registry"], "https://npm.example.test/");
        assert_eq!(cfg["cafile"], "/etc/ssl/ca.pem");
        assert_eq!(cfg["@corp:registry"], "https://corp.example.test/");
        assert_eq!(cfg["//npm.example.test/:_authToken"], "(protected)");
        assert!(!cfg.contains_key("_auth"), "an unset default is not a credential");
    }

    #[test]
    fn npm_credentials_are_taken_from_the_files_npm_read() {
        let d = tempfile::tempdir().unwrap();
        let user = d.path().join("npmrc");
        std::fs::write(&user, "registry=https://npm.example.test/\n//npm.example.test/:_authToken=${TOKEN_VAR}\n# //x/:_authToken=commented\n//corp.example.test/npm/:_password=cGFzcw==\n//corp.example.test/npm/:username=bob\n//npm.example.test/:certfile=/x\nemail=a@b\n").unwrap();
        let text = format!("; \"default\" config from default values\n_auth = (protected)\n; \"user\" config from {}\n//npm.example.test/:_authToken = (protected)\n", user.display());
        let files = npm_config_files(&text);
        assert_eq!(files, vec![user.clone()]);
        let lines = npm_auth_lines(&files, |k| (k == "TOKEN_VAR").then(|| "tok123".to_string()));
        assert_eq!(
            lines,
            vec![
                "//npm.example.test/:_authToken=tok123",
                "//corp.example.test/npm/:_password=cGFzcw==",
                "//corp.example.test/npm/:username=bob"
            ]
        );
        // The file holding them: the server's uid alone reads it, and it goes when dropped.
        let path = d.path().join(NPM_AUTH_FILE);
        let f = AuthFile::write(&path, d.path(), &lines).unwrap().unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o400);
        assert!(std::fs::read_to_string(&path).unwrap().contains("tok123"));
        drop(f);
        assert!(!path.exists());
        assert!(AuthFile::write(&path, d.path(), &[]).unwrap().is_none());
    }

    #[test]
    fn npm_gets_registries_without_credentials_and_reads_no_npmrc() {
        let cfg: serde_json::Map<String, serde_json::Value> = serde_json::from_value(serde_json::json!({
            "registry": "https://npm.example.test/",
            "@corp:registry": "https://bob:hunter2@corp.example.test/npm/",
            "//npm.example.test/:_authToken": "NPM-TOKEN-CANARY",
            "cafile": "/nonexistent/ca.pem",
            "fund": false,
        }))
        .unwrap();
        let mut notes = Vec::new();
        let env: BTreeMap<String, String> = npm_env(&cfg, &mut notes).unwrap().into_iter().collect();
        assert_eq!(env["npm_config_registry"], "https://npm.example.test/");
        assert_eq!(env["npm_config_@corp:registry"], "https://corp.example.test/npm/");
        assert_eq!(env["npm_config_userconfig"], "/dev/null");
        assert!(!env.contains_key("npm_config_cafile"), "a CA file that does not exist is not handed over");
        let all = format!("{env:?}");
        assert!(!all.contains("NPM-TOKEN-CANARY") && !all.contains("hunter2"), "{all}");
        assert!(
            notes.iter().any(|n| n.contains("credentials") && n.contains("_authToken") && n.contains("@corp:registry")),
            "{notes:?}"
        );
        assert!(npm_env(&serde_json::Map::new(), &mut notes).is_err(), "no registry configured");
    }

    #[test]
    fn uv_indexes_come_from_its_files_then_its_variables() {
        let mut idx = UvIndexes::default();
        let system: toml::Table = toml::from_str("index-url = \"https://sys.example.test/simple\"\n[pip]\nextra-index-url = [\"https://x.example.test/simple\"]").unwrap();
        idx.add_toml(&system);
        let user: toml::Table = toml::from_str("find-links = [\"https://links.example.test/\"]\n[[index]]\nurl = \"https://u:pw@user.example.test/simple\"\ndefault = true\n[[index]]\nname = \"extra\"\nurl = \"https://more.example.test/simple\"").unwrap();
        idx.add_toml(&user);
        assert_eq!(idx.default.as_deref(), Some("https://u:pw@user.example.test/simple"));
        assert_eq!(
            idx.extra,
            vec!["https://x.example.test/simple".to_string(), "extra=https://more.example.test/simple".to_string()]
        );
        let vars = BTreeMap::from([
            ("UV_INDEX_URL", "https://env.example.test/simple"),
            ("UV_INDEX", "named=https://n.example.test/simple https://plain.example.test/simple"),
            ("UV_FIND_LINKS", "https://f.example.test/a,/srv/wheels"),
        ]);
        idx.add_env(|k| vars.get(k).map(|v| v.to_string()));
        assert_eq!(idx.default.as_deref(), Some("https://env.example.test/simple"));
        assert!(
            idx.extra.contains(&"named=https://n.example.test/simple".to_string())
                && idx.extra.contains(&"https://plain.example.test/simple".to_string())
        );
        assert_eq!(
            split_named("named=https://n.example.test/simple"),
            (Some("named"), "https://n.example.test/simple")
        );
        assert_eq!(split_named("https://n.example.test/simple?a=b"), (None, "https://n.example.test/simple?a=b"));
        assert_eq!(
            idx.find_links,
            vec!["https://links.example.test/".to_string(), "https://f.example.test/a".into(), "/srv/wheels".into()]
        );
        assert_eq!(
            without_credentials("https://u:pw@user.example.test/simple"),
            ("https://user.example.test/simple".to_string(), true)
        );
        assert!(!without_credentials("https://user.example.test/simple").1);
        assert_eq!(host_port("https://user.example.test/simple").as_deref(), Some("user.example.test:443"));
        assert_eq!(host_port("http://[::1]:8080/x").as_deref(), Some("[::1]:8080"));
        assert_eq!(host_port("file:///srv/wheels"), None);
    }

    #[test]
    fn download_hosts_are_read_from_the_registrys_answer() {
        let page = reqwest::Url::parse("https://idx.example.test/simple/pkg/").unwrap();
        let json = br#"{"files":[{"url":"https://files.example.test/p/a.whl"},{"url":"../../p/b.tar.gz"}],"meta":{"url":"https://not.example.test/"}}"#;
        let hosts: Vec<String> = file_hosts_in(Manager::Uv, &page, json).into_iter().collect();
        assert_eq!(hosts, vec!["files.example.test:443".to_string(), "idx.example.test:443".into()]);
        let html = b"<a href=\"https://dl.example.test:8443/a.whl#sha256=00\">a</a><a href='/rel/b.whl'>b</a>";
        let hosts: Vec<String> = file_hosts_in(Manager::Uv, &page, html).into_iter().collect();
        assert_eq!(hosts, vec!["dl.example.test:8443".to_string(), "idx.example.test:443".into()]);
        let npm = br#"{"versions":{"1.0.0":{"dist":{"tarball":"https://tar.example.test/p/-/p-1.0.0.tgz"}}},"repository":{"url":"git+https://code.example.test/p.git"}}"#;
        let page = reqwest::Url::parse("https://npm.example.test/p").unwrap();
        assert_eq!(
            file_hosts_in(Manager::Npm, &page, npm).into_iter().collect::<Vec<_>>(),
            vec!["tar.example.test:443".to_string()]
        );
        assert_eq!(package_name(Manager::Npm, "@scope/name@1.2").as_deref(), Some("@scope/name"));
        assert_eq!(package_name(Manager::Npm, "name@latest").as_deref(), Some("name"));
        assert_eq!(package_name(Manager::Npm, "/tmp/x.tgz"), None);
        assert_eq!(package_name(Manager::Uv, "Mcp_Server.Time[cli]>=1").as_deref(), Some("Mcp_Server.Time"));
        assert_eq!(package_name(Manager::Uv, "git+https://h.example.test/r"), None);
        assert_eq!(
            metadata_url(Manager::Uv, "https://idx.example.test/simple/", "Mcp_Server..Time"),
            "https://idx.example.test/simple/mcp-server-time/"
        );
        assert_eq!(
            metadata_url(Manager::Npm, "https://npm.example.test/", "@scope/name"),
            "https://npm.example.test/@scope%2fname"
        );
    }

    #[test]
    fn force_empties_the_cache_without_following_links() {
        let d = tempfile::tempdir().unwrap();
        let (cache, outside) = (d.path().join("cache"), d.path().join("outside"));
        std::fs::create_dir_all(cache.join("npm-cache/x")).unwrap();
        std::fs::create_dir_all(cache.join("npm-2/node_modules")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("keep"), "k").unwrap();
        std::fs::write(cache.join(".npmrc"), "registry=poisoned").unwrap();
        std::fs::write(cache.join(RECORD), "{}").unwrap();
        std::os::unix::fs::symlink(&outside, cache.join("link")).unwrap();
        // Named like a tree, but a link: removed, never followed, never kept.
        std::os::unix::fs::symlink(&outside, cache.join("npm-3")).unwrap();
        // Named like a tree, but a file.
        std::fs::write(cache.join("venv-1"), "").unwrap();
        clear_for_force(&cache).unwrap();
        let mut left: Vec<String> =
            std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, v(&["npm-2", RECORD]), "only the installed trees and the record stay");
        assert!(outside.join("keep").is_file(), "a link's target was removed");
        // The trees go the same way when they are old: nothing behind a link is touched.
        std::os::unix::fs::symlink(&outside, cache.join("npm-4")).unwrap();
        std::fs::create_dir_all(cache.join("npm-5/x")).unwrap();
        std::os::unix::fs::symlink(&outside, cache.join("npm-5/x/out")).unwrap();
        remove_old_trees(&cache, &["npm-2"]).unwrap();
        let mut left: Vec<String> =
            std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, v(&["npm-2", RECORD]));
        assert!(outside.join("keep").is_file(), "a link's target was removed");
    }

    #[test]
    fn install_trees_are_generations_and_the_record_names_one() {
        assert_eq!(tree_name("npm"), Some((Manager::Npm, 0)));
        assert_eq!(tree_name("npm-12"), Some((Manager::Npm, 12)));
        assert_eq!(tree_name("venv"), Some((Manager::Uv, 0)));
        assert_eq!(tree_name("venv-1"), Some((Manager::Uv, 1)));
        for other in
            ["npm-cache", "uv-cache", "npm-", "npm-01", "npm-+1", "npm-99999999999", "venv-1/x", ".npmrc", "npmx"]
        {
            assert_eq!(tree_name(other), None, "{other}");
        }
        let Ok(node) = find_node() else { return };
        let d = tempfile::tempdir().unwrap();
        let state = StateDir::new(d.path().to_path_buf());
        let cache = d.path().join("srv/cache");
        std::fs::create_dir_all(&cache).unwrap();
        // No record: after the highest tree found.
        std::fs::create_dir_all(cache.join("npm-cache")).unwrap();
        assert_eq!(next_tree(&cache, Manager::Npm).unwrap(), cache.join("npm-1"));
        std::fs::create_dir_all(cache.join("npm-7")).unwrap();
        assert_eq!(next_tree(&cache, Manager::Uv).unwrap(), cache.join("venv-8"));
        // A record naming npm-2: the next is 3, or the first free name after it.
        let pkg_dir = cache.join("npm-2/node_modules/x");
        std::fs::create_dir_all(&pkg_dir).unwrap();
        std::fs::write(pkg_dir.join("bin.js"), "").unwrap();
        let pkg = parse("npx", &v(&["-y", "x@1"])).unwrap().unwrap();
        let rec = Prepared {
            request: pkg.clone(),
            package: "x".into(),
            version: "1".into(),
            interpreter: node.clone(),
            entry: pkg_dir.join("bin.js"),
            runtime: Some(launch::resolve(&node).unwrap().0),
            prepared_at: 0,
        };
        std::fs::write(cache.join(RECORD), serde_json::to_string(&rec).unwrap()).unwrap();
        assert_eq!(recorded_tree_name(&cache), Some(("npm-2".into(), 2)));
        assert_eq!(next_tree(&cache, Manager::Npm).unwrap(), cache.join("npm-3"));
        std::os::unix::fs::symlink("/nonexistent", cache.join("npm-3")).unwrap();
        assert_eq!(next_tree(&cache, Manager::Npm).unwrap(), cache.join("npm-4"), "a dangling link is not free");
        let launch = ServerLaunch {
            name: "srv".into(),
            command: "npx".into(),
            args: v(&["-y", "x@1"]),
            env: BTreeMap::new(),
            policy: PolicyRef::Named("node".into()),
        };
        let (l, extra) = for_run(&state, &launch).unwrap().unwrap();
        assert_eq!(l.args, v(&[&pkg_dir.join("bin.js").to_string_lossy()]));
        assert_eq!(extra.grants.iter().filter(|(_, a)| *a == Access::Exec).count(), 1, "{:?}", extra.grants);
        assert!(extra.grants.contains(&(launch::resolve(&cache.join("npm-2")).unwrap().0, Access::Exec)));
        // An entry in something that is not a tree of this manager is refused: the download
        // cache, a virtualenv, the cache itself.
        for bad in ["npm-cache/x/bin.js", "venv-1/x/bin.js", "bin.js"] {
            let f = cache.join(bad);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(&f, "").unwrap();
            let r = Prepared { entry: f, ..rec.clone() };
            std::fs::write(cache.join(RECORD), serde_json::to_string(&r).unwrap()).unwrap();
            assert!(for_run(&state, &launch).unwrap().is_err(), "{bad}");
            assert!(load_prepared(&cache, &pkg).is_none(), "{bad}");
        }
        // An entry stepping out of its tree with `..`, or the tree itself.
        for bad in ["npm-2/../npm-cache/x/bin.js", "npm-2/node_modules/../../npm-cache/x/bin.js", "npm-2"] {
            let r = Prepared { entry: cache.join(bad), ..rec.clone() };
            assert!(record_tree(&cache, &r).is_err(), "{bad}");
        }
        // A tree that is a link to another tree of the cache is not one.
        std::fs::remove_file(cache.join("npm-3")).unwrap();
        std::os::unix::fs::symlink("npm-2", cache.join("npm-3")).unwrap();
        let r = Prepared { entry: cache.join("npm-3/node_modules/x/bin.js"), ..rec.clone() };
        std::fs::write(cache.join(RECORD), serde_json::to_string(&r).unwrap()).unwrap();
        assert!(load_prepared(&cache, &pkg).is_none());
        std::fs::write(cache.join(RECORD), serde_json::to_string(&rec).unwrap()).unwrap();
        assert_eq!(load_prepared(&cache, &pkg), Some(rec));
    }

    #[test]
    fn uvx_lines() {
        let p = parse("uvx", &v(&["mcp-server-fetch", "--ignore-robots-txt"])).unwrap().unwrap();
        assert_eq!(
            (p.install.clone(), p.bin.clone(), p.args.clone()),
            (v(&["mcp-server-fetch"]), Some("mcp-server-fetch".into()), v(&["--ignore-robots-txt"]))
        );
        let p = parse("uvx", &v(&["mcp-server-time@0.6.2", "--local-timezone", "UTC"])).unwrap().unwrap();
        assert_eq!(p.install, v(&["mcp-server-time==0.6.2"]));
        assert_eq!(p.bin.as_deref(), Some("mcp-server-time"));
        let p = parse("uvx", &v(&["--from", "git-tools==1", "--with", "x", "tool"])).unwrap().unwrap();
        assert_eq!(p.install, v(&["git-tools==1", "x"]));
        assert!(parse("uvx", &v(&["../x"])).unwrap().is_err());
    }

    fn ok(cmd: &str, a: &[&str]) -> Package {
        parse(cmd, &v(a))
            .unwrap_or_else(|| panic!("{cmd} {a:?} is a package launch"))
            .unwrap_or_else(|e| panic!("{cmd} {a:?}: {e:#}"))
    }

    fn refused(cmd: &str, a: &[&str]) -> String {
        format!("{:#}", parse(cmd, &v(a)).expect("a package launch").unwrap_err())
    }

    #[test]
    fn npx_lines_as_real_configs_write_them() {
        // The form of the issue: a bin installed under --prefix, run offline: nothing to fetch.
        let p = ok("npx", &["--offline", "--prefix", "/opt/mcp", "--", "some-bin", "stdio"]);
        assert_eq!(
            (p.local.clone(), p.install.clone(), p.bin.clone(), p.args.clone()),
            (Some(PathBuf::from("/opt/mcp")), v(&["some-bin"]), None, v(&["stdio"]))
        );
        let p = ok(
            "npx",
            &[
                "--yes",
                "--prefer-offline",
                "-q",
                "--package=@modelcontextprotocol/server-sequential-thinking",
                "--",
                "mcp-server-sequential-thinking",
            ],
        );
        assert_eq!(
            (p.install.clone(), p.bin.clone(), p.local.clone(), p.registry.clone()),
            (
                v(&["@modelcontextprotocol/server-sequential-thinking"]),
                Some("mcp-server-sequential-thinking".into()),
                None,
                None
            )
        );
        let p = ok("npx", &["-y", "--registry=https://npm.example.test/", "--loglevel", "error", "pkg@1", "--flag"]);
        assert_eq!(
            (p.registry.as_deref(), p.install.clone(), p.args.clone()),
            (Some("https://npm.example.test/"), v(&["pkg@1"]), v(&["--flag"]))
        );
        assert_eq!(
            ok("npx", &["--registry", "https://npm.example.test/", "pkg"]).registry.as_deref(),
            Some("https://npm.example.test/")
        );
        assert_eq!(ok("npx", &["--prefix=/srv/x", "-p", "a", "bin"]).local, Some(PathBuf::from("/srv/x")));
        assert_eq!(ok("npx", &["-s", "--prefer-online", "--no-install=false", "pkg"]).install, v(&["pkg"]));
        // npm exec / npm x, pnpm dlx, pnpx: the same grammar, prepared with npm.
        for (cmd, a) in [
            ("npm", vec!["exec", "--yes", "--package=a", "--", "cmd", "arg"]),
            ("npm", vec!["x", "-p", "a", "cmd", "arg"]),
            ("/usr/bin/pnpm", vec!["dlx", "--package", "a", "cmd", "arg"]),
            ("pnpx", vec!["--package=a", "cmd", "arg"]),
        ] {
            let p = ok(cmd, &a);
            assert_eq!(
                (p.manager, p.install, p.bin, p.args),
                (Manager::Npm, v(&["a"]), Some("cmd".into()), v(&["arg"])),
                "{cmd} {a:?}"
            );
        }
        // Not package launches: they run as they are, under their policy.
        assert!(parse("npm", &v(&["run", "start"])).is_none());
        assert!(parse("pnpm", &v(&["start"])).is_none());
        // Refused, naming the option and the supported forms.
        let e = refused("npx", &["--workspace", "w", "pkg"]);
        assert!(e.contains("--workspace") && e.contains("supported: `npx`") && e.contains("uv run --with"), "{e}");
        assert!(refused("npx", &["--prefix", "rel/dir", "bin"]).contains("absolute"));
        assert!(refused("npx", &["--registry=https://u:secret@npm.example.test/", "pkg"]).contains("credentials"));
        assert!(refused("npx", &["--registry=file:///srv", "pkg"]).contains("http(s)"));
        assert!(refused("npx", &["--no-install", "pkg"]).contains("--prefix"));
        assert!(refused("npm", &["exec", "-c", "echo hi"]).contains("shell"));
        assert!(refused("npx", &["--registry"]).contains("needs a value"));
    }

    #[test]
    fn uv_lines_as_real_configs_write_them() {
        let p = ok("uvx", &["--python", "3.12", "--with", "x", "mcp-server-fetch@latest", "--a"]);
        assert_eq!(
            (p.python.as_deref(), p.install.clone(), p.bin.as_deref(), p.args.clone()),
            (Some("3.12"), v(&["mcp-server-fetch", "x"]), Some("mcp-server-fetch"), v(&["--a"]))
        );
        assert_eq!(ok("uvx", &["-p=python3.11", "t"]).python.as_deref(), Some("python3.11"));
        assert_eq!(ok("uvx", &["--python=/usr/bin/python3", "t"]).python.as_deref(), Some("/usr/bin/python3"));
        let p = ok("uvx", &["--index-url", "https://idx.example.test/simple", "-q", "--isolated", "--", "t", "a"]);
        assert_eq!((p.registry.as_deref(), p.args.clone()), (Some("https://idx.example.test/simple"), v(&["a"])));
        assert_eq!(ok("uvx", &["--with=y", "--from=git-tools==1", "tool"]).install, v(&["git-tools==1", "y"]));
        // uv tool run is uvx; uv run --with installs the requirements and runs the command.
        assert_eq!(
            ok("uv", &["tool", "run", "--from", "a==1", "cmd", "x"]),
            Package::new(Manager::Uv, v(&["a==1"]), Some("cmd".into()), v(&["x"]))
        );
        assert_eq!(ok("/usr/local/bin/uv", &["-q", "tool", "run", "t"]).bin.as_deref(), Some("t"));
        let p = ok(
            "uv",
            &[
                "run",
                "--with",
                "mcp-server-time==0.6.2",
                "--with=tzdata",
                "--no-project",
                "--python",
                "3",
                "--",
                "mcp-server-time",
                "--local-timezone",
                "UTC",
            ],
        );
        assert_eq!(
            (p.install.clone(), p.bin.as_deref(), p.python.as_deref(), p.args.clone()),
            (
                v(&["mcp-server-time==0.6.2", "tzdata"]),
                Some("mcp-server-time"),
                Some("3"),
                v(&["--local-timezone", "UTC"])
            )
        );
        // What the Python SDK's `mcp install` writes into Claude Desktop's config: the SDK's CLI,
        // prepared, running the user's script (which the server's policy must grant).
        let p = ok("/home/u/.local/bin/uv", &["run", "--with", "mcp[cli]", "mcp", "run", "/srv/server.py"]);
        assert_eq!(
            (p.install.clone(), p.bin.as_deref(), p.args.clone()),
            (v(&["mcp[cli]"]), Some("mcp"), v(&["run", "/srv/server.py"]))
        );
        // Not package launches.
        assert!(parse("uv", &v(&["pip", "list"])).is_none());
        assert!(parse("python", &v(&["-m", "mcp_server_fetch"])).is_none());
        assert!(parse("/usr/bin/python3", &v(&["-m", "pkg"])).is_none());
        // Refused, with the reason.
        for py in ["pypy", ">=3.11", "cpython-3.12", "3.12.1"] {
            assert!(refused("uvx", &["--python", py, "t"]).contains("UV_PYTHON_DOWNLOADS=never"), "{py}");
        }
        // A synced local project, as Claude Desktop configs run one: nothing to prepare.
        for a in [
            vec!["--directory", "/srv/proj", "run", "server.py", "--x"],
            vec!["run", "--directory=/srv/proj", "python", "server.py", "--x"],
        ] {
            let p = ok("uv", &a);
            assert_eq!(
                (p.local.clone(), p.install.clone(), p.bin.as_deref(), p.args.clone()),
                (Some(PathBuf::from("/srv/proj")), vec![], Some("server.py"), v(&["--x"])),
                "{a:?}"
            );
        }
        assert_eq!(ok("uv", &["--project", "/srv/proj", "run", "my-server"]).bin.as_deref(), Some("my-server"));
        assert!(refused("uv", &["--directory", "proj", "run", "server.py"]).contains("absolute"));
        assert!(refused("uv", &["--directory", "/srv/proj", "run", "--with", "x", "server.py"]).contains("uv sync"));
        assert!(refused("uv", &["--directory", "/srv/proj", "run", "python", "-c", "0"]).contains("script file"));
        assert!(refused("uv", &["run", "server.py"]).contains("--with"));
        assert!(refused("uv", &["run", "--with", "mcp-server-fetch", "python", "-m", "mcp_server_fetch"])
            .contains("interpreter"));
        let e = refused("uvx", &["--prerelease", "allow", "t"]);
        assert!(e.contains("--prerelease") && e.contains("supported:"), "{e}");
        assert!(refused("uvx", &["--index-url", "https://u:p@idx.example.test/simple", "t"]).contains("credentials"));
    }

    #[test]
    fn a_changed_registry_python_or_prefix_means_prepare_again() {
        let a = ok("uvx", &["t"]);
        assert!(a.same_install(&ok("uvx", &["t", "--other-args"])));
        assert!(!a.same_install(&ok("uvx", &["--python", "3.12", "t"])));
        assert!(!a.same_install(&ok("uvx", &["--index-url", "https://idx.example.test/simple", "t"])));
        assert!(!ok("npx", &["p"]).same_install(&ok("npx", &["--prefix", "/x", "p"])));
        // Records written before these fields existed still load.
        let old = r#"{"manager":"npm","install":["p"],"bin":null}"#;
        assert_eq!(serde_json::from_str::<Package>(old).unwrap(), ok("npx", &["p"]));
    }

    #[test]
    fn uvx_python_is_a_host_interpreter() {
        let py3 = launch::resolve_command("python3", DEFAULT_PATH).expect("python3 on PATH");
        assert_eq!(python_for(&ok("uvx", &["t"])).unwrap(), py3);
        assert_eq!(python_for(&ok("uvx", &["--python", "3", "t"])).unwrap(), py3);
        assert_eq!(python_for(&ok("uvx", &["--python", &py3.to_string_lossy(), "t"])).unwrap(), py3);
        let e = format!("{:#}", python_for(&ok("uvx", &["--python", "3.99", "t"])).unwrap_err());
        assert!(e.contains("python3.99") && e.contains("never downloads"), "{e}");
    }

    #[test]
    fn an_explicit_registry_replaces_the_configured_one_for_this_prepare() {
        let mut extra = Extra::default();
        let mut egress = Egress::default();
        extra.env.insert("npm_config_registry".into(), "https://conf.example.test/".into());
        egress.add_url("https://conf.example.test/");
        egress.indexes.push("https://conf.example.test/".into());
        egress.add_url("https://corp.example.test/npm/");
        egress.indexes.push("https://corp.example.test/npm/".into());
        explicit_registry(&ok("npx", &["--registry=https://mine.example.test:8443/", "p"]), &mut extra, &mut egress);
        assert_eq!(extra.env["npm_config_registry"], "https://mine.example.test:8443/");
        assert_eq!(egress.indexes, v(&["https://corp.example.test/npm/", "https://mine.example.test:8443/"]));
        assert_eq!(
            egress.allow.iter().cloned().collect::<Vec<_>>(),
            v(&["corp.example.test:443", "mine.example.test:8443"])
        );
        // None on the command line: nothing changes.
        let before = (extra.env.clone(), egress.clone());
        explicit_registry(&ok("npx", &["p"]), &mut extra, &mut egress);
        assert_eq!((extra.env, egress), before);
    }

    #[test]
    fn a_synced_uv_project_runs_from_its_venv_and_nothing_outside() {
        let d = tempfile::tempdir().unwrap();
        let proj = d.path().join("proj");
        std::fs::create_dir_all(proj.join(".venv/bin")).unwrap();
        let py3 = launch::resolve_command("python3", DEFAULT_PATH).expect("python3 on PATH");
        std::os::unix::fs::symlink(&py3, proj.join(".venv/bin/python")).unwrap();
        std::fs::write(proj.join(".venv/pyvenv.cfg"), "home = /opt/uvpython/cpython-3.12/bin\nversion = 3.12.0\n")
            .unwrap();
        std::fs::write(proj.join("server.py"), "").unwrap();
        std::fs::write(proj.join(".venv/bin/my-server"), "").unwrap();
        let ps = proj.to_string_lossy().into_owned();
        let args = v(&["--directory", &ps, "run", "server.py", "--flag"]);
        let launch = ServerLaunch {
            name: "srv".into(),
            command: "uv".into(),
            args: args.clone(),
            env: BTreeMap::new(),
            policy: PolicyRef::Named("python".into()),
        };
        let state = StateDir::new(d.path().join("state"));
        let (l, extra) = for_run(&state, &launch).unwrap().unwrap();
        let real = std::fs::canonicalize(&proj).unwrap();
        assert_eq!(l.command, real.join(".venv/bin/python").to_string_lossy());
        assert_eq!(l.args, v(&[&real.join("server.py").to_string_lossy(), "--flag"]));
        assert_eq!(
            extra.grants,
            vec![(real.clone(), Access::Exec), (PathBuf::from("/opt/uvpython/cpython-3.12"), Access::Exec)]
        );
        assert!(matches!(
            prepare_blocking(&state, "srv", &parse("uv", &args).unwrap().unwrap(), false).unwrap(),
            Outcome::Ready(_)
        ));
        assert!(!state.root.join("srv").exists(), "nothing prepared");
        let l2 = local_entry(&ok("uv", &["--directory", &ps, "run", "my-server"]), &proj).unwrap();
        assert_eq!(l2.entry, real.join(".venv/bin/my-server"));
        // A system interpreter is the policy's business: no grant of /usr.
        std::fs::write(proj.join(".venv/pyvenv.cfg"), "home = /usr/bin\n").unwrap();
        assert_eq!(
            local_entry(&ok("uv", &["--directory", &ps, "run", "my-server"]), &proj).unwrap().grants,
            vec![real.clone()]
        );
        // Not in the project, or leading out of it: refused.
        assert!(local_entry(&ok("uv", &["--directory", &ps, "run", "other.py"]), &proj).is_err());
        std::os::unix::fs::symlink("/etc/passwd", proj.join("escape.py")).unwrap();
        assert!(local_entry(&ok("uv", &["--directory", &ps, "run", "escape.py"]), &proj).is_err());
        // Not synced: says how.
        std::fs::remove_file(proj.join(".venv/bin/python")).unwrap();
        let e =
            format!("{:#}", local_entry(&ok("uv", &["--directory", &ps, "run", "server.py"]), &proj).err().unwrap());
        assert!(e.contains("uv sync"), "{e}");
    }

    #[test]
    fn a_prefix_install_runs_its_bin_from_there_and_nothing_outside() {
        let node = find_node().expect("node on PATH (scripts/install-test-deps.sh installs it)");
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("inst");
        let pkg_dir = dir.join("node_modules/some-pkg");
        std::fs::create_dir_all(pkg_dir.join("bin")).unwrap();
        std::fs::create_dir_all(dir.join("node_modules/.bin")).unwrap();
        std::fs::write(pkg_dir.join("bin/cli.js"), "#!/usr/bin/env node\n").unwrap();
        std::fs::write(pkg_dir.join("package.json"), r#"{"name":"some-pkg","bin":{"some-bin":"bin/cli.js"}}"#).unwrap();
        std::os::unix::fs::symlink("../some-pkg/bin/cli.js", dir.join("node_modules/.bin/some-bin")).unwrap();
        let dir_s = dir.to_string_lossy().into_owned();
        let args = v(&["--offline", "--prefix", &dir_s, "--", "some-bin", "stdio"]);
        let launch = ServerLaunch {
            name: "srv".into(),
            command: "npx".into(),
            args: args.clone(),
            env: BTreeMap::new(),
            policy: PolicyRef::Named("node".into()),
        };
        let state = StateDir::new(d.path().join("state"));
        let (l, extra) = for_run(&state, &launch).unwrap().unwrap();
        let real = std::fs::canonicalize(pkg_dir.join("bin/cli.js")).unwrap();
        assert_eq!(l.command, node.to_string_lossy());
        assert_eq!(l.args, v(&[&real.to_string_lossy(), "stdio"]));
        assert_eq!(extra.grants, vec![(std::fs::canonicalize(&dir).unwrap(), Access::Exec)]);
        // Prepare has nothing to do (and creates nothing).
        let pkg = parse("npx", &args).unwrap().unwrap();
        assert!(matches!(prepare_blocking(&state, "srv", &pkg, false).unwrap(), Outcome::Ready(_)));
        assert!(!state.root.join("srv").exists());
        // By package name: the package's own bin.
        assert_eq!(local_entry(&ok("npx", &["--prefix", &dir_s, "some-pkg"]), &dir).unwrap().entry, real);
        // Not installed there: refused, never fetched.
        let e = format!("{:#}", local_entry(&ok("npx", &["--prefix", &dir_s, "other"]), &dir).unwrap_err());
        assert!(e.contains("not installed there"), "{e}");
        // A bin leading out of DIR is not run.
        std::os::unix::fs::symlink("/bin/sh", dir.join("node_modules/.bin/escape")).unwrap();
        assert!(local_entry(&ok("npx", &["--prefix", &dir_s, "--", "escape"]), &dir).is_err());
    }
}

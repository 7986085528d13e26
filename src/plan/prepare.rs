//! npx and uvx servers in two sandboxed phases.
//!
//! *Prepare* runs the package manager alone — npm for `npx`, uv for `uvx` — in a sandbox whose
//! only writable place is the server's cache dir, with the host network (the registry is
//! whatever npm's or uv's own configuration says; nothing here names one). Install scripts run
//! in that sandbox too. The result is recorded in `CACHE/prepared.json`.
//!
//! *Run* never starts a package manager: the server's entry point is executed directly (node on
//! the package's `bin` file, or the console script of a virtualenv built on the system Python),
//! with the installed tree granted read/exec and nothing of the cache writable.
//!
//! Cache layout: `npm/` (the install prefix), `npm-cache/`, `venv/`, `uv-cache/`, `prepared.json`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
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

/// An `npx …` or `uvx …` command line, taken apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    pub manager: Manager,
    /// What the package manager installs, in order: npm package specs (`name@version`, a
    /// tarball path, …) or Python requirements (`name==version`).
    pub install: Vec<String>,
    /// The executable to run: npx's command after `--package`, uvx's command name. None for a
    /// plain `npx PKG`: the package's own bin.
    pub bin: Option<String>,
    /// The server's own arguments.
    #[serde(skip)]
    pub args: Vec<String>,
}

impl Package {
    /// Same packages and command: the server's own arguments do not matter to prepare.
    pub fn same_install(&self, other: &Package) -> bool {
        self.manager == other.manager && self.install == other.install && self.bin == other.bin
    }
}

/// `Some` when `command` is npx or uvx (by name or path).
pub fn parse(command: &str, args: &[String]) -> Option<anyhow::Result<Package>> {
    let base = command.rsplit('/').next().unwrap_or(command);
    match base {
        "npx" => Some(parse_npx(args)),
        "uvx" => Some(parse_uvx(args)),
        _ => None,
    }
}

fn parse_npx(args: &[String]) -> anyhow::Result<Package> {
    let mut packages = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        match a {
            "-y" | "--yes" | "-q" | "--quiet" | "--silent" | "--no-install=false" => i += 1,
            "-p" | "--package" => {
                let v = args.get(i + 1).with_context(|| format!("npx {a} needs a package"))?;
                packages.push(v.clone());
                i += 2;
            }
            "--" => {
                i += 1;
                break;
            }
            "-c" | "--call" => bail!("npx {a} (a shell command line) is not supported: name the package and its command"),
            _ if a.starts_with("--package=") => {
                packages.push(a["--package=".len()..].to_string());
                i += 1;
            }
            _ if a.starts_with('-') => bail!("npx option {a} is not supported by mcpbox (supported: -y/--yes, -p/--package)"),
            _ => break,
        }
    }
    let rest = &args[i..];
    let Some(first) = rest.first() else { bail!("npx: no package given") };
    if packages.is_empty() {
        Ok(Package { manager: Manager::Npm, install: vec![first.clone()], bin: None, args: rest[1..].to_vec() })
    } else {
        Ok(Package { manager: Manager::Npm, install: packages, bin: Some(first.clone()), args: rest[1..].to_vec() })
    }
}

fn parse_uvx(args: &[String]) -> anyhow::Result<Package> {
    let mut from = None;
    let mut with = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        match a {
            "-q" | "--quiet" | "-v" | "--verbose" | "--isolated" | "--no-cache" | "--refresh" | "--offline" => i += 1,
            "--from" | "--with" => {
                let v = args.get(i + 1).with_context(|| format!("uvx {a} needs a value"))?.clone();
                if a == "--from" { from = Some(v) } else { with.push(v) }
                i += 2;
            }
            "-p" | "--python" => bail!("uvx {a}: mcpbox builds on the python it is told to use (MCPBOX_PYTHON, else python3 on the sandbox's PATH; no interpreter downloads); drop the option"),
            "--" => {
                i += 1;
                break;
            }
            _ if a.starts_with("--from=") => {
                from = Some(a["--from=".len()..].to_string());
                i += 1;
            }
            _ if a.starts_with("--with=") => {
                with.push(a["--with=".len()..].to_string());
                i += 1;
            }
            _ if a.starts_with('-') => bail!("uvx option {a} is not supported by mcpbox (supported: --from, --with)"),
            _ => break,
        }
    }
    let rest = &args[i..];
    let Some(first) = rest.first() else { bail!("uvx: no command given") };
    let (name, version) = match first.split_once('@') {
        Some((n, v)) => (n.to_string(), Some(v.to_string())),
        None => (first.clone(), None),
    };
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        bail!("uvx: `{first}` is not a command name");
    }
    let mut install = vec![match (&from, version) {
        (Some(f), _) => f.clone(),
        (None, Some(v)) => format!("{name}=={v}"),
        (None, None) => name.clone(),
    }];
    install.extend(with);
    Ok(Package { manager: Manager::Uv, install, bin: Some(name), args: rest[1..].to_vec() })
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

fn npm_prefix(cache: &Path) -> PathBuf {
    cache.join("npm")
}
fn venv(cache: &Path) -> PathBuf {
    cache.join("venv")
}

/// The prepared record, if present, valid and for this request.
pub fn load_prepared(cache: &Path, pkg: &Package) -> Option<Prepared> {
    let text = read_inside(cache, Path::new(RECORD)).ok()?;
    let p: Prepared = serde_json::from_str(&text).ok()?;
    (p.request.same_install(pkg) && check_record(cache, &p).is_ok()).then_some(p)
}

/// The cache is written by the package manager and install scripts, which we do not trust: a
/// record must point into the installed tree and at an interpreter we chose.
fn check_record(cache: &Path, p: &Prepared) -> anyhow::Result<()> {
    let cache_real = launch::resolve(cache)?.0;
    let (tree, interp_ok) = match p.request.manager {
        Manager::Npm => (npm_prefix(&cache_real), p.interpreter == find_node()?),
        // A virtualenv built on another python than the one chosen now is built again.
        Manager::Uv => (venv(&cache_real), p.interpreter == venv(cache).join("bin/python") && p.runtime == Some(launch::resolve(&find_python()?)?.0)),
    };
    let entry = launch::resolve(&p.entry)?.0;
    if !interp_ok || !entry.starts_with(&tree) || !entry.is_file() {
        bail!("{} does not describe an installed package", cache.join(RECORD).display());
    }
    // The interpreter (for uv, the virtualenv's python, a link the prepare sandbox wrote) must
    // still lead to the runtime it was prepared on.
    let runs_on = launch::resolve(&p.interpreter)?.0;
    if p.runtime.as_deref() != Some(runs_on.as_path()) {
        bail!("{} was prepared on {}, but {} now leads to {}; prepare again", cache.join(RECORD).display(), p.runtime.as_deref().map(|r| r.display().to_string()).unwrap_or_else(|| "an unrecorded runtime".into()), p.interpreter.display(), runs_on.display());
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
        .find(|a| a.file_name().is_some_and(|n| n == "npm") && a.parent().and_then(|p| p.file_name()).is_some_and(|n| n == "node_modules"))
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

/// Names of mcpbox's environment handed to a prepare sandbox: how the host reaches the network
/// and which CAs it trusts, and uv's own settings. Package registries come from here and from
/// the package managers' config files, never from mcpbox.
const PASS_ALWAYS: &[&str] = &[
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "no_proxy", "all_proxy",
    "SSL_CERT_FILE", "SSL_CERT_DIR",
];
const PASS_NPM: &[&str] = &["NODE_EXTRA_CA_CERTS"];
const PASS_UV: &[&str] = &[
    "UV_INDEX_URL", "UV_DEFAULT_INDEX", "UV_INDEX", "UV_EXTRA_INDEX_URL", "UV_FIND_LINKS", "UV_NATIVE_TLS",
    "UV_INSECURE_HOST", "UV_INDEX_STRATEGY", "UV_HTTP_TIMEOUT", "UV_CONCURRENT_DOWNLOADS",
];

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

/// npm's registry and CA file as npm's configuration on this host says (global and user npmrc,
/// npm_config_* variables), asked of npm itself outside any sandbox: no package code runs, and
/// the user's npmrc (which may hold tokens) is not shown to install scripts.
fn npm_settings(npm_cli: &Path, node: &Path, extra: &mut Extra) {
    let out = std::process::Command::new(node)
        .arg(npm_cli)
        .args(["config", "get", "registry", "cafile"])
        // Not mcpbox's working directory: a project .npmrc there is not the host's configuration.
        .current_dir("/")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    let Ok(out) = out else { return };
    if !out.status.success() {
        return;
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((k, v)) = line.split_once('=') else { continue };
        let v = v.trim();
        if v.is_empty() || v == "null" || v == "undefined" {
            continue;
        }
        match k.trim() {
            "registry" => {
                extra.env.insert("npm_config_registry".into(), v.into());
            }
            "cafile" if Path::new(v).is_file() => {
                extra.env.insert("npm_config_cafile".into(), v.into());
                extra.grants.push((PathBuf::from(v), Access::Read));
            }
            _ => {}
        }
    }
}

/// uv's config files: the system one and the user's (handed over explicitly, since HOME is the
/// cache inside).
fn uv_settings(extra: &mut Extra) {
    for p in ["/etc/uv", "/etc/xdg/uv"] {
        if Path::new(p).is_dir() {
            extra.grants.push((PathBuf::from(p), Access::Read));
        }
    }
    let user = std::env::var_os("UV_CONFIG_FILE").map(PathBuf::from).or_else(|| {
        let cfg = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
        Some(cfg.join("uv/uv.toml"))
    });
    if let Some(u) = user.filter(|u| u.is_file()) {
        extra.grants.push((u.clone(), Access::Read));
        extra.env.insert("UV_CONFIG_FILE".into(), u.to_string_lossy().into_owned());
    }
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
    let dirs = ServerDirs::create(state, name)?;
    // One prepare per server at a time (serve and `mcpbox prepare` may overlap). The lock lives
    // beside the cache, where the sandbox cannot reach it.
    let lock_path = state.root.join(name).join("prepare.lock");
    let lock_file = std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(&lock_path).with_context(|| format!("opening {}", lock_path.display()))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", lock_path.display()))?;
    if !force {
        if let Some(p) = load_prepared(&dirs.cache, pkg) {
            return Ok(Outcome::Ready(p));
        }
    }
    let started = Instant::now();
    tracing::info!(server = %name, "preparing: resolving {} {}", pkg.manager.command(), pkg.install.join(" "));
    let _ = std::fs::remove_file(dirs.cache.join(RECORD));
    let tree = match pkg.manager {
        Manager::Npm => npm_prefix(&dirs.cache),
        Manager::Uv => venv(&dirs.cache),
    };
    if tree.exists() {
        std::fs::remove_dir_all(&tree).with_context(|| format!("removing the old install {}", tree.display()))?;
    }
    let p = match pkg.manager {
        Manager::Npm => prepare_npm(state, name, &dirs, pkg)?,
        Manager::Uv => prepare_uv(state, name, &dirs, pkg)?,
    };
    let text = serde_json::to_string_pretty(&p)?;
    let tmp = dirs.cache.join(".prepared.json.new");
    let _ = std::fs::remove_file(&tmp);
    // create_new: never through a link someone left there.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dirs.cache.join(RECORD))?;
    let took = started.elapsed();
    tracing::info!(server = %name, "prepared {}@{} in {:.1} s (entry {})", p.package, p.version, took.as_secs_f64(), p.entry.display());
    Ok(Outcome::Installed(p, took))
}

fn local_paths(pkg: &Package, extra: &mut Extra) -> anyhow::Result<Vec<String>> {
    // A local tarball or directory must be readable inside the sandbox: grant it (read only)
    // and hand it over by absolute path.
    let mut out = Vec::new();
    for spec in &pkg.install {
        let path = spec.strip_prefix("file:").unwrap_or(spec);
        let local = path.starts_with('/') || path.starts_with("./") || path.starts_with("../") || path.ends_with(".tgz") || path.ends_with(".whl");
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

fn prepare_npm(state: &StateDir, name: &str, dirs: &ServerDirs, pkg: &Package) -> anyhow::Result<Prepared> {
    let node = find_node()?;
    let (npm_cli, npm_dir) = find_npm()?;
    let mut extra = Extra::default();
    extra.grants.push((npm_dir, Access::Read));
    passed_env(PASS_NPM, &mut extra);
    npm_settings(&npm_cli, &node, &mut extra);
    let install = local_paths(pkg, &mut extra)?;
    let prefix = npm_prefix(&dirs.cache);
    std::fs::create_dir_all(&prefix)?;
    let c = |p: &str| dirs.cache.join(p).to_string_lossy().into_owned();
    for (k, v) in [
        ("npm_config_cache", c("npm-cache")),
        ("npm_config_userconfig", c(".npmrc")),
        ("npm_config_update_notifier", "false".into()),
        ("npm_config_fund", "false".into()),
        ("npm_config_audit", "false".into()),
        ("npm_config_yes", "true".into()),
        ("npm_config_loglevel", "warn".into()),
        ("HOME", c("")),
    ] {
        extra.env.insert(k.into(), v);
    }
    let mut args = vec![npm_cli.to_string_lossy().into_owned(), "install".into(), "--prefix".into(), prefix.to_string_lossy().into_owned(), "--omit=dev".into(), "--no-package-lock".into()];
    args.extend(install);
    tracing::info!(server = %name, "installing with npm into {}", prefix.display());
    run_sandboxed(state, name, Manager::Npm, &node, args, extra)?;

    // Which package was installed: the one dependency of the prefix's package.json.
    let top: serde_json::Value = serde_json::from_str(&read_inside(&dirs.cache, Path::new("npm/package.json"))?)?;
    let deps: Vec<String> = top.get("dependencies").and_then(|d| d.as_object()).map(|m| m.keys().cloned().collect()).unwrap_or_default();
    // With --package, the command names the bin; pick the package that provides it.
    let mut candidates = Vec::new();
    for d in &deps {
        let rel = Path::new("npm/node_modules").join(d).join("package.json");
        let pj: serde_json::Value = serde_json::from_str(&read_inside(&dirs.cache, &rel)?)?;
        candidates.push((d.clone(), pj));
    }
    let want_bin = pkg.bin.clone();
    for (dep, pj) in &candidates {
        let bins: BTreeMap<String, String> = match pj.get("bin") {
            Some(serde_json::Value::String(s)) => {
                let unscoped = dep.rsplit('/').next().unwrap_or(dep).to_string();
                BTreeMap::from([(unscoped, s.clone())])
            }
            Some(serde_json::Value::Object(m)) => m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect(),
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
            return Ok(Prepared { request: pkg.clone(), package: dep.clone(), version, interpreter: node, entry, runtime, prepared_at: now() });
        }
    }
    match want_bin {
        Some(b) => bail!("none of the installed packages ({}) provides a command `{b}`", deps.join(", ")),
        None => bail!("package {} has no bin to run (or several, none named after the package)", deps.join(", ")),
    }
}

fn prepare_uv(state: &StateDir, name: &str, dirs: &ServerDirs, pkg: &Package) -> anyhow::Result<Prepared> {
    let uv = stage_for_others(state, &find_uv()?)?;
    let python = find_python()?;
    let mut extra = Extra::default();
    extra.grants.push((uv.clone(), Access::Exec));
    passed_env(PASS_UV, &mut extra);
    uv_settings(&mut extra);
    let install = local_paths(pkg, &mut extra)?;
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
    let venv_dir = venv(&dirs.cache);
    let v = venv_dir.to_string_lossy().into_owned();
    tracing::info!(server = %name, "creating a virtualenv on {} at {v}", python.display());
    run_sandboxed(state, name, Manager::Uv, &uv, vec!["venv".into(), "--python".into(), py, v.clone()], extra.clone())?;
    tracing::info!(server = %name, "installing with uv: {}", install.join(" "));
    let mut args = vec!["pip".into(), "install".into(), "--python".into(), format!("{v}/bin/python")];
    args.extend(install);
    run_sandboxed(state, name, Manager::Uv, &uv, args, extra)?;

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
    Ok(Prepared { request: pkg.clone(), package: dist, version, interpreter: venv_dir.join("bin/python"), entry, runtime: Some(runtime), prepared_at: now() })
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// How long one package-manager step may take.
pub const PREPARE_TIMEOUT: Duration = Duration::from_secs(600);

/// Run one package-manager step in the prepare sandbox; its output is logged at debug and the
/// last lines are part of the error when it fails.
fn run_sandboxed(state: &StateDir, name: &str, manager: Manager, exe: &Path, args: Vec<String>, extra: Extra) -> anyhow::Result<()> {
    let launch = ServerLaunch {
        name: name.to_string(),
        command: exe.to_string_lossy().into_owned(),
        args,
        env: BTreeMap::new(),
        policy: PolicyRef::Named(manager.prepare_policy().into()),
    };
    let planned = launch::plan_with(state, &launch, &extra)?;
    for n in &planned.notes {
        tracing::debug!(server = %name, "prepare: {n}");
    }
    let (mut child, report, _) = crate::sandbox::spawn_blocking_std(&planned.spec, Stdio::null(), Stdio::piped(), Stdio::piped())
        .map_err(|e| anyhow::anyhow!("prepare sandbox: {e}"))?;
    for w in &report.warnings {
        tracing::warn!(server = %name, "prepare sandbox weakened: {w}");
    }
    let tail = Arc::new(Mutex::new(std::collections::VecDeque::<String>::new()));
    let mut readers = Vec::new();
    for stream in [child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>), child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>)].into_iter().flatten() {
        let (tail, name) = (tail.clone(), name.to_string());
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let line: String = line.chars().take(500).collect();
                tracing::debug!(server = %name, "prepare: {line}");
                let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
                if t.len() >= 20 {
                    t.pop_front();
                }
                t.push_back(line);
            }
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
    let tree = match pkg.manager {
        Manager::Npm => npm_prefix(&cache),
        Manager::Uv => venv(&cache),
    };
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
pub async fn prepare_config(state: &StateDir, cfg: &crate::config::Config, force: bool, refused: &BTreeMap<String, String>) -> BTreeMap<String, String> {
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
pub fn cli(config: &Path, state_dir: Option<PathBuf>, force: bool, min_level: crate::policy::Level) -> std::process::ExitCode {
    let cfg = match crate::config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mcpbox: {}: {e}", config.display());
            return std::process::ExitCode::from(2);
        }
    };
    let state = StateDir::for_config(&cfg, config, state_dir, min_level);
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mcpbox: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let planner = super::Planner::new(state.clone());
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
        let p = parse("npx", &v(&["-y", "@modelcontextprotocol/server-filesystem@1.0.0", "/srv", "--x"])).unwrap().unwrap();
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
        let mut ctx = LoadContext { lazy: Some(crate::plan::runtime::Lazy::new(None, DEFAULT_PATH, crate::plan::runtime::Untrusted::dir(d.path())).vars()), ..LoadContext::default() };
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
            assert_eq!(pol.filesystem.write.iter().map(|r| r.path.clone()).collect::<Vec<_>>(), vec![cache.clone()], "{p}");
            assert!(matches!(pol.network, Network::Host { .. }), "{p}");
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
        let launch = ServerLaunch { name: "srv".into(), command: "npx".into(), args: v(&["-y", "x@1", "--flag"]), env: BTreeMap::new(), policy: PolicyRef::Named("default".into()) };
        let (launch, choice) = super::super::effective(launch, false);
        assert!(matches!(&choice, super::super::PolicyChoice::RuntimeBase(m) if m.contains("no policy")), "{choice:?}");
        assert!(for_run(&state, &launch).unwrap().is_err(), "not prepared yet");
        let runtime = Some(launch::resolve(&node).unwrap().0);
        // A record without the runtime it was prepared on is prepared again.
        let old = Prepared { request: pkg.clone(), package: "x".into(), version: "1".into(), interpreter: node.clone(), entry: pkg_dir.join("bin.js"), runtime: None, prepared_at: 0 };
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
        std::fs::write(cache.join(RECORD), serde_json::to_string(&Prepared { entry: pkg_dir.join("bin.js"), ..bad }).unwrap()).unwrap();
        assert!(for_run(&state, &launch).unwrap().is_err());
    }

    #[test]
    fn uvx_lines() {
        let p = parse("uvx", &v(&["mcp-server-fetch", "--ignore-robots-txt"])).unwrap().unwrap();
        assert_eq!((p.install.clone(), p.bin.clone(), p.args.clone()), (v(&["mcp-server-fetch"]), Some("mcp-server-fetch".into()), v(&["--ignore-robots-txt"])));
        let p = parse("uvx", &v(&["mcp-server-time@0.6.2", "--local-timezone", "UTC"])).unwrap().unwrap();
        assert_eq!(p.install, v(&["mcp-server-time==0.6.2"]));
        assert_eq!(p.bin.as_deref(), Some("mcp-server-time"));
        let p = parse("uvx", &v(&["--from", "git-tools==1", "--with", "x", "tool"])).unwrap().unwrap();
        assert_eq!(p.install, v(&["git-tools==1", "x"]));
        assert!(parse("uvx", &v(&["--python", "3.12", "x"])).unwrap().is_err());
        assert!(parse("uvx", &v(&["../x"])).unwrap().is_err());
    }
}

//! The node and python interpreters servers run on, described by the interpreters themselves.
//!
//! A runtime base policy (`node`, `python`) does not name paths of one distribution: it names
//! variables (`${PYTHON_STDLIB}`, `${NODE_EXE}`, …) that this module fills in by running the
//! interpreter once, outside any sandbox, with a fixed program that prints its own facts:
//! sysconfig's paths and `lib-dynload` for Python, the binary and its prefix for Node, and for
//! both the shared libraries the process mapped (`/proc/self/maps`), so that a runtime linking a
//! library outside the system directories gets that library, and only that file, granted.
//!
//! Which interpreter: the one the server's command resolves to (symlinks followed: a uv
//! virtualenv's `bin/python` leads to the interpreter uv built it on), else `node` / `python3`
//! on the sandbox's PATH (or `MCPBOX_NODE` / `MCPBOX_PYTHON`). Running it is running a program
//! outside any sandbox, so only a binary that looks like the interpreter (by name), lies outside
//! the state dir, is owned by no server uid, and that neither it nor any directory above it lets
//! anyone but root, mcpbox's own user or the binary's owner change, is run — as its owner when
//! that is another user: a server cannot plant an "interpreter" for mcpbox to start. Python
//! runs with `-I -S`
//! (no environment, no user site, no `site` module, hence no `.pth` code); both run with an
//! empty environment.
//!
//! What comes back is checked before it becomes a grant: absolute, no `..`, shaped like what it
//! claims to be (a standard library directory is named `pythonX.Y`, …), and never a home
//! directory or `/` itself. Results are remembered per binary (path, inode, size, mtime) for the
//! life of the process.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// The interpreters mcpbox knows how to describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Node,
    Python,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Node, Kind::Python];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Node => "node",
            Kind::Python => "python",
        }
    }

    /// The command looked up on the sandbox's PATH when the server's own command is not this
    /// interpreter.
    pub fn default_command(self) -> &'static str {
        match self {
            Kind::Node => "node",
            Kind::Python => "python3",
        }
    }

    /// The environment variable naming the interpreter to use instead of the PATH's.
    pub fn env_var(self) -> &'static str {
        match self {
            Kind::Node => "MCPBOX_NODE",
            Kind::Python => "MCPBOX_PYTHON",
        }
    }

    /// The prefix of the policy variables this runtime fills in.
    fn var_prefix(self) -> &'static str {
        match self {
            Kind::Node => "NODE_",
            Kind::Python => "PYTHON_",
        }
    }

    /// Whether a binary's file name is this interpreter's: `node`, `nodejs`; `python`,
    /// `python3`, `python3.12`, `python3.13t`.
    pub fn matches_name(self, file_name: &str) -> bool {
        match self {
            Kind::Node => file_name == "node" || file_name == "nodejs",
            Kind::Python => {
                let Some(v) = file_name.strip_prefix("python") else { return false };
                // A free-threaded build: python3.13t.
                let v = v.strip_suffix('t').filter(|r| !r.is_empty()).unwrap_or(v);
                v.is_empty() || v.split('.').all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
            }
        }
    }

    /// Which runtime a policy variable belongs to.
    pub fn of_var(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| name.starts_with(k.var_prefix()))
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    #[error("no {kind} runtime: `{command}` is not on the sandbox's PATH ({path}); install it there, name it in {}, or run the server with the interpreter's absolute path as its command", kind.env_var())]
    NotFound { kind: Kind, command: String, path: String },
    #[error("{kind} runtime {path}: {why}")]
    Untrusted { kind: Kind, path: PathBuf, why: String },
    #[error("{kind} runtime {path} could not describe itself: {why}")]
    Probe { kind: Kind, path: PathBuf, why: String },
    #[error("{kind} runtime {exe}: {what} {path} {why}")]
    BadPath { kind: Kind, exe: PathBuf, what: &'static str, path: PathBuf, why: String },
}

/// One interpreter, as it described itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runtime {
    pub kind: Kind,
    /// The real binary (every symlink resolved).
    pub exe: PathBuf,
    pub version: String,
    /// Policy variables (`PYTHON_STDLIB` → path), each checked.
    pub vars: BTreeMap<String, PathBuf>,
    /// Shared libraries the interpreter mapped at start (real paths, the binary excluded).
    pub libs: Vec<PathBuf>,
}

impl Runtime {
    /// One line for `policy check` and `doctor`.
    pub fn describe(&self) -> String {
        let vars: Vec<String> = self.vars.iter().map(|(k, v)| format!("{k}={}", v.display())).collect();
        let libs: Vec<String> = self.libs.iter().map(|l| l.display().to_string()).collect();
        format!(
            "{} {} at {}: {}; links {}",
            self.kind,
            self.version,
            self.exe.display(),
            vars.join(" "),
            if libs.is_empty() { "nothing".into() } else { libs.join(" ") }
        )
    }
}

/// What servers can write: nothing here is ever run to describe a runtime.
#[derive(Debug, Clone)]
pub struct Untrusted {
    /// The state dir (every server's DATA and CACHE).
    pub root: PathBuf,
    /// The host uids servers run under (as root): a binary, or a directory above it, that one of
    /// them owns may have been written by a server, wherever it lies.
    pub uids: std::ops::Range<u32>,
}

impl Untrusted {
    /// Only a state dir (no server uids: mcpbox not root, or none allocated).
    pub fn dir(root: &Path) -> Untrusted {
        Untrusted { root: root.to_path_buf(), uids: 0..0 }
    }
}

/// Find the `kind` runtime for a server whose command resolves to `command_real` (None, or
/// another program: the configured or PATH default, see [`default_interpreter`]).
pub fn discover(
    kind: Kind,
    command_real: Option<&Path>,
    search_path: &str,
    untrusted: &Untrusted,
) -> Result<Runtime, RuntimeError> {
    let exe = match command_real
        .filter(|c| c.file_name().and_then(|n| n.to_str()).is_some_and(|n| kind.matches_name(n)))
    {
        Some(c) => c.to_path_buf(),
        None => {
            let found = default_interpreter(kind, search_path)?;
            std::fs::canonicalize(&found).map_err(|e| RuntimeError::Probe { kind, path: found, why: e.to_string() })?
        }
    };
    describe(kind, &exe, untrusted)
}

/// The interpreter servers of this kind run on unless their command names one, as found (not
/// resolved): `MCPBOX_NODE` / `MCPBOX_PYTHON` from mcpbox's environment (an absolute path), else
/// `node` / `python3` on `search_path`. npx/uvx servers are prepared on it.
pub fn default_interpreter(kind: Kind, search_path: &str) -> Result<PathBuf, RuntimeError> {
    if let Some(v) = std::env::var_os(kind.env_var()).filter(|v| !v.is_empty()) {
        let p = PathBuf::from(v);
        if !p.is_absolute() || !p.is_file() {
            return Err(RuntimeError::Untrusted {
                kind,
                path: p,
                why: format!("({} in mcpbox's environment) is not an absolute path to a file", kind.env_var()),
            });
        }
        return Ok(p);
    }
    let cmd = kind.default_command();
    which_as_found(cmd, search_path).ok_or_else(|| RuntimeError::NotFound {
        kind,
        command: cmd.into(),
        path: search_path.into(),
    })
}

/// The first executable `cmd` on `search_path`, as found (`/usr/bin/python3`, often a link).
fn which_as_found(cmd: &str, search_path: &str) -> Option<PathBuf> {
    search_path.split(':').filter(|d| d.starts_with('/')).find_map(|d| {
        let c = Path::new(d).join(cmd);
        let m = std::fs::metadata(&c).ok()?;
        (m.is_file() && m.mode() & 0o111 != 0).then_some(c)
    })
}

/// Describe the interpreter at `exe` (a real path), remembering the answer per binary.
pub fn describe(kind: Kind, exe: &Path, untrusted: &Untrusted) -> Result<Runtime, RuntimeError> {
    let meta = check_trusted(kind, exe, untrusted)?;
    type Key = (PathBuf, u64, u64, u64, i64, i64);
    static SEEN: OnceLock<Mutex<HashMap<Key, Runtime>>> = OnceLock::new();
    let key = (exe.to_path_buf(), meta.dev(), meta.ino(), meta.size(), meta.mtime(), meta.mtime_nsec());
    let seen = SEEN.get_or_init(Default::default);
    if let Some(r) = seen.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(r.clone());
    }
    let out = probe(kind, exe, &meta)?;
    let r = match kind {
        Kind::Python => from_python(exe, &out)?,
        Kind::Node => from_node(exe, &out)?,
    };
    seen.lock().unwrap_or_else(|e| e.into_inner()).insert(key, r.clone());
    Ok(r)
}

/// The binary must be the interpreter by name, a regular executable file outside the state
/// dir, and only root or mcpbox's own user may change it or any directory above it.
fn check_trusted(kind: Kind, exe: &Path, untrusted: &Untrusted) -> Result<std::fs::Metadata, RuntimeError> {
    let untrusted_root = untrusted.root.as_path();
    let bad = |why: String| RuntimeError::Untrusted { kind, path: exe.to_path_buf(), why };
    let name = exe.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if !exe.is_absolute() || !kind.matches_name(name) {
        return Err(bad(format!("not named like a {kind} interpreter; mcpbox runs only those to learn their paths")));
    }
    let root_real = std::fs::canonicalize(untrusted_root).unwrap_or_else(|_| untrusted_root.to_path_buf());
    if exe.starts_with(&root_real) || exe.starts_with(untrusted_root) {
        return Err(bad(format!(
            "lies under the state dir {}, where servers write; it is not run",
            untrusted_root.display()
        )));
    }
    let me = nix::unistd::geteuid().as_raw();
    let meta = std::fs::metadata(exe).map_err(|e| bad(format!("{e}")))?;
    if !meta.is_file() || meta.mode() & 0o111 == 0 {
        return Err(bad("is not an executable file".into()));
    }
    // A runtime a user installed in their home (nvm, pyenv) belongs to that user: it is run as
    // them (see `probe`), and besides root and mcpbox's user only they may own the way to it.
    let owner = meta.uid();
    for p in exe.ancestors() {
        let m = std::fs::metadata(p).map_err(|e| bad(format!("{}: {e}", p.display())))?;
        if untrusted.uids.contains(&m.uid()) {
            return Err(bad(format!("{} belongs to uid {}, a server's: it is not run", p.display(), m.uid())));
        }
        if m.uid() != 0 && m.uid() != me && m.uid() != owner {
            return Err(bad(format!("{} belongs to uid {}: only root, mcpbox's own user or the runtime's owner may own the runtime and the directories above it", p.display(), m.uid())));
        }
        let sticky = m.is_dir() && m.mode() & 0o1000 != 0;
        if m.mode() & 0o022 != 0 && !sticky {
            return Err(bad(format!("{} is writable by its group or by everyone", p.display())));
        }
    }
    Ok(meta)
}

const PYTHON_PROBE: &str = r#"import sys, sysconfig, json, os
p = sysconfig.get_paths()
dyn = [d for d in sys.path if os.path.basename(d) == "lib-dynload"]
maps = set()
with open("/proc/self/maps") as f:
    for line in f:
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith("/"):
            maps.add(parts[5].rstrip("\n"))
print(json.dumps({"version": "%d.%d.%d" % sys.version_info[:3], "prefix": sys.prefix, "base_prefix": sys.base_prefix,
    "stdlib": p["stdlib"], "platstdlib": p["platstdlib"], "purelib": p["purelib"], "platlib": p["platlib"],
    "dynload": dyn[0] if dyn else None, "maps": sorted(maps)}))
"#;

const NODE_PROBE: &str = r#"const maps = new Set();
for (const line of require("fs").readFileSync("/proc/self/maps", "utf8").split("\n")) {
  const i = line.indexOf("/");
  if (i > 0 && line.slice(0, i).trim().split(/\s+/).length >= 5) maps.add(line.slice(i));
}
console.log(JSON.stringify({ version: process.version, maps: [...maps].sort() }));
"#;

/// How long an interpreter may take to describe itself (a cold start on a busy disk).
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// Run the interpreter on its probe program with an empty environment; its stdout. A binary
/// that belongs to another user than mcpbox's (and not to root) runs as that user: mcpbox as
/// root never runs code a user could have changed with root's rights.
fn probe(kind: Kind, exe: &Path, meta: &std::fs::Metadata) -> Result<String, RuntimeError> {
    let fail = |why: String| RuntimeError::Probe { kind, path: exe.to_path_buf(), why };
    let mut cmd = Command::new(exe);
    match kind {
        Kind::Python => cmd.args(["-I", "-S", "-c", PYTHON_PROBE]),
        Kind::Node => cmd.args(["-e", NODE_PROBE]),
    };
    cmd.env_clear().env("PATH", "/usr/bin:/bin").env("LANG", "C.UTF-8").current_dir("/");
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != me {
        if me != 0 {
            return Err(fail(format!(
                "it belongs to uid {}, and mcpbox (uid {me}) runs only its own or root's binaries",
                meta.uid()
            )));
        }
        // std drops the supplementary groups too when root sets the uid.
        std::os::unix::process::CommandExt::uid(&mut cmd, meta.uid());
        std::os::unix::process::CommandExt::gid(&mut cmd, meta.gid());
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot start it: {e}")))?;
    let (mut out, mut err) = (child.stdout.take().expect("piped"), child.stderr.take().expect("piped"));
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = (&mut out).take(1 << 20).read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = (&mut err).take(64 << 10).read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + PROBE_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(format!("no answer within {PROBE_TIMEOUT:?}")));
            }
            Err(e) => return Err(fail(format!("waiting for it: {e}"))),
        }
    };
    let stdout = reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    if !status.success() {
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
        return Err(fail(format!("{status}: {last}")));
    }
    Ok(stdout)
}

#[derive(Deserialize)]
struct PythonFacts {
    version: String,
    base_prefix: String,
    stdlib: String,
    platstdlib: String,
    purelib: String,
    platlib: String,
    dynload: Option<String>,
    maps: Vec<String>,
}

#[derive(Deserialize)]
struct NodeFacts {
    version: String,
    maps: Vec<String>,
}

fn from_python(exe: &Path, out: &str) -> Result<Runtime, RuntimeError> {
    let kind = Kind::Python;
    let f: PythonFacts = serde_json::from_str(out.trim()).map_err(|e| RuntimeError::Probe {
        kind,
        path: exe.into(),
        why: format!("unreadable answer ({e}): {}", out.trim()),
    })?;
    let c = Checker { kind, exe };
    let mut vars = BTreeMap::new();
    vars.insert("PYTHON_EXE".into(), exe.to_path_buf());
    vars.insert("PYTHON_PREFIX".into(), c.path("prefix", &f.base_prefix, |_| true, "")?);
    let stdlib_shaped = |p: &Path| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| Kind::Python.matches_name(n));
    let stdlib = c.path("standard library", &f.stdlib, stdlib_shaped, "is not a pythonX.Y directory")?;
    let platstdlib =
        c.path("platform standard library", &f.platstdlib, stdlib_shaped, "is not a pythonX.Y directory")?;
    // lib-dynload is where sys.path says; a build without one (everything built in) has its
    // extension modules, if any, in the platform standard library.
    let dynload = match &f.dynload {
        Some(d) => c.path("lib-dynload", d, |p| p.ends_with("lib-dynload"), "is not a lib-dynload directory")?,
        None => platstdlib.clone(),
    };
    let site_shaped = |p: &Path| p.file_name().is_some_and(|n| n == "site-packages" || n == "dist-packages");
    vars.insert("PYTHON_STDLIB".into(), stdlib);
    vars.insert("PYTHON_PLATSTDLIB".into(), platstdlib);
    vars.insert("PYTHON_DYNLOAD".into(), dynload);
    vars.insert(
        "PYTHON_SITE".into(),
        c.path("site-packages", &f.purelib, site_shaped, "is not a site-packages directory")?,
    );
    vars.insert(
        "PYTHON_PLATSITE".into(),
        c.path("platform site-packages", &f.platlib, site_shaped, "is not a site-packages directory")?,
    );
    Ok(Runtime { kind, exe: exe.into(), version: f.version, vars, libs: libs(exe, &f.maps) })
}

fn from_node(exe: &Path, out: &str) -> Result<Runtime, RuntimeError> {
    let kind = Kind::Node;
    let f: NodeFacts = serde_json::from_str(out.trim()).map_err(|e| RuntimeError::Probe {
        kind,
        path: exe.into(),
        why: format!("unreadable answer ({e}): {}", out.trim()),
    })?;
    let c = Checker { kind, exe };
    // Node finds its own prefix the same way: the directory above `bin/node`.
    let prefix =
        exe.parent().filter(|b| b.ends_with("bin")).and_then(Path::parent).ok_or_else(|| RuntimeError::BadPath {
            kind,
            exe: exe.into(),
            what: "binary",
            path: exe.into(),
            why: "is not in a bin/ directory, so it has no prefix".into(),
        })?;
    let prefix_s = prefix.to_string_lossy();
    let mut vars = BTreeMap::new();
    vars.insert("NODE_EXE".into(), exe.to_path_buf());
    vars.insert("NODE_PREFIX".into(), c.path("prefix", &prefix_s, |_| true, "")?);
    vars.insert(
        "NODE_MODULES".into(),
        c.path("global modules", &format!("{prefix_s}/lib/node_modules"), |_| true, "")?,
    );
    Ok(Runtime { kind, exe: exe.into(), version: f.version, vars, libs: libs(exe, &f.maps) })
}

/// Shared objects among the mapped files: real paths, the binary and deleted files left out.
fn libs(exe: &Path, maps: &[String]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = maps
        .iter()
        .filter(|m| !m.ends_with(" (deleted)"))
        .map(PathBuf::from)
        .filter(|p| {
            p.is_absolute() && p != exe && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.contains(".so"))
        })
        .filter(|p| p.components().all(|c| !matches!(c, Component::ParentDir)) && p.is_file())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Checks a path an interpreter reported before it may become a grant.
struct Checker<'a> {
    kind: Kind,
    exe: &'a Path,
}

impl Checker<'_> {
    fn path(
        &self,
        what: &'static str,
        s: &str,
        shaped: impl Fn(&Path) -> bool,
        shape: &str,
    ) -> Result<PathBuf, RuntimeError> {
        let bad = |why: String| RuntimeError::BadPath {
            kind: self.kind,
            exe: self.exe.into(),
            what,
            path: PathBuf::from(s),
            why,
        };
        let p = Path::new(s);
        if !p.is_absolute() || s.contains('\0') {
            return Err(bad("is not an absolute path".into()));
        }
        let mut clean = PathBuf::new();
        for c in p.components() {
            match c {
                Component::ParentDir => return Err(bad("contains `..`".into())),
                Component::CurDir => {}
                other => clean.push(other),
            }
        }
        if !shaped(&clean) {
            return Err(bad(shape.into()));
        }
        if clean == Path::new("/") || is_home(&clean) {
            return Err(bad("is / or a home directory: never granted wholesale".into()));
        }
        Ok(clean)
    }
}

/// A home directory of some account (`/etc/passwd`), `/root`, or a directory right under /home.
fn is_home(p: &Path) -> bool {
    if p == Path::new("/root") || p.parent() == Some(Path::new("/home")) || p == Path::new("/home") {
        return true;
    }
    std::fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(':').nth(5))
        .any(|h| !h.is_empty() && h != "/" && Path::new(h) == p)
}

/// The runtimes a launch's policy may name, found when a policy first uses one of their
/// variables, and remembered for the grants and notes that follow.
#[derive(Clone)]
pub struct Lazy {
    command_real: Option<PathBuf>,
    search_path: String,
    untrusted: Untrusted,
    found: Arc<Mutex<BTreeMap<Kind, Result<Runtime, RuntimeError>>>>,
}

impl Lazy {
    pub fn new(command_real: Option<PathBuf>, search_path: &str, untrusted: Untrusted) -> Lazy {
        Lazy { command_real, search_path: search_path.into(), untrusted, found: Default::default() }
    }

    /// The runtime of `kind`, discovered on first use.
    pub fn get(&self, kind: Kind) -> Result<Runtime, RuntimeError> {
        let mut found = self.found.lock().unwrap_or_else(|e| e.into_inner());
        found
            .entry(kind)
            .or_insert_with(|| discover(kind, self.command_real.as_deref(), &self.search_path, &self.untrusted))
            .clone()
    }

    /// A policy variable's value: None when it is not a runtime variable.
    pub fn var(&self, name: &str) -> Option<Result<String, String>> {
        let kind = Kind::of_var(name)?;
        Some(match self.get(kind) {
            Ok(r) => match r.vars.get(name) {
                Some(p) => Ok(p.to_string_lossy().into_owned()),
                None => Err(format!(
                    "the {kind} runtime has no such path; known: {}",
                    r.vars.keys().cloned().collect::<Vec<_>>().join(", ")
                )),
            },
            Err(e) => Err(e.to_string()),
        })
    }

    /// The loader's view of [`Lazy::var`].
    pub fn vars(&self) -> crate::policy::LazyVars {
        let me = self.clone();
        crate::policy::LazyVars(Arc::new(move |name: &str| me.var(name)))
    }

    /// The runtimes the policy used (those found; failures were already errors).
    pub fn used(&self) -> Vec<Runtime> {
        self.found.lock().unwrap_or_else(|e| e.into_inner()).values().filter_map(|r| r.as_ref().ok().cloned()).collect()
    }

    /// The names programs call the used runtimes by: `node`/`python3` on the sandbox's PATH
    /// when that is the same binary (usually a link, such as /usr/bin/python3 -> python3.11,
    /// which the sandbox then recreates: uv, build backends and `#!/usr/bin/env python3`
    /// scripts find the interpreter under its usual name).
    pub fn commands(&self) -> Vec<PathBuf> {
        self.used()
            .iter()
            .filter_map(|r| {
                let c = default_interpreter(r.kind, &self.search_path).ok()?;
                (std::fs::canonicalize(&c).ok()? == r.exe && c != r.exe).then_some(c)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpreter_names() {
        for n in ["python", "python3", "python3.11", "python3.13t"] {
            assert!(Kind::Python.matches_name(n), "{n}");
        }
        for n in ["python3-config", "pythonx", "pythont", "python3.", "perl", "python3.11.bak", "node"] {
            assert!(!Kind::Python.matches_name(n), "{n}");
        }
        assert!(
            Kind::Node.matches_name("node") && Kind::Node.matches_name("nodejs") && !Kind::Node.matches_name("node.sh")
        );
        assert_eq!(Kind::of_var("PYTHON_STDLIB"), Some(Kind::Python));
        assert_eq!(Kind::of_var("NODE_EXE"), Some(Kind::Node));
        assert_eq!(Kind::of_var("DATA"), None);
    }

    #[test]
    fn reported_paths_are_checked_before_they_become_grants() {
        let c = Checker { kind: Kind::Python, exe: Path::new("/x/bin/python3") };
        let any = |_: &Path| true;
        assert_eq!(c.path("p", "/opt/py/lib/./python3.12", any, "").unwrap(), PathBuf::from("/opt/py/lib/python3.12"));
        assert!(c.path("p", "lib/python3.12", any, "").is_err());
        assert!(c.path("p", "/opt/../etc", any, "").is_err());
        assert!(c.path("p", "/", any, "").is_err());
        assert!(c.path("p", "/root", any, "").is_err());
        assert!(c.path("p", "/home/someone", any, "").is_err());
        assert!(c
            .path("p", "/usr/lib", |p| p.ends_with("lib-dynload"), "not lib-dynload")
            .unwrap_err()
            .to_string()
            .contains("not lib-dynload"));
    }

    #[test]
    fn a_python_answer_becomes_variables() {
        let out = r#"{"version": "3.12.1", "prefix": "/opt/py", "base_prefix": "/opt/py", "stdlib": "/opt/py/lib/python3.12",
            "platstdlib": "/opt/py/lib/python3.12", "purelib": "/opt/py/lib/python3.12/site-packages",
            "platlib": "/opt/py/lib/python3.12/site-packages", "dynload": "/opt/py/lib/python3.12/lib-dynload",
            "maps": ["/opt/py/bin/python3.12", "/etc/passwd", "/nonexistent/libx.so.1"]}"#;
        let r = from_python(Path::new("/opt/py/bin/python3.12"), out).unwrap();
        assert_eq!(r.vars["PYTHON_STDLIB"], PathBuf::from("/opt/py/lib/python3.12"));
        assert_eq!(r.vars["PYTHON_DYNLOAD"], PathBuf::from("/opt/py/lib/python3.12/lib-dynload"));
        assert_eq!(r.vars["PYTHON_SITE"], PathBuf::from("/opt/py/lib/python3.12/site-packages"));
        assert_eq!(r.vars["PYTHON_EXE"], PathBuf::from("/opt/py/bin/python3.12"));
        // The binary itself, files that are not libraries and files that are gone are not libs.
        assert!(r.libs.is_empty(), "{:?}", r.libs);
        // A standard library that is not a pythonX.Y directory is refused, not granted.
        let bad = out.replace("\"stdlib\": \"/opt/py/lib/python3.12\"", "\"stdlib\": \"/usr/lib\"");
        assert!(from_python(Path::new("/opt/py/bin/python3.12"), &bad).unwrap_err().to_string().contains("/usr/lib"));
    }

    #[test]
    fn node_prefix_is_above_bin() {
        let r = from_node(Path::new("/opt/node-v24/bin/node"), r#"{"version": "v24.1.0", "maps": []}"#).unwrap();
        assert_eq!(r.vars["NODE_PREFIX"], PathBuf::from("/opt/node-v24"));
        assert_eq!(r.vars["NODE_MODULES"], PathBuf::from("/opt/node-v24/lib/node_modules"));
        assert!(from_node(Path::new("/opt/node"), r#"{"version": "v24.1.0", "maps": []}"#).is_err());
    }

    #[test]
    fn nothing_under_the_state_dir_or_misnamed_is_run() {
        let d = tempfile::tempdir().unwrap();
        let fake = d.path().join("python3");
        std::fs::write(&fake, "#!/bin/sh\necho pwned\n").unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let e = describe(Kind::Python, &fake, &Untrusted::dir(d.path())).unwrap_err();
        assert!(matches!(e, RuntimeError::Untrusted { .. }) && e.to_string().contains("state dir"), "{e}");
        let e = describe(Kind::Python, Path::new("/usr/bin/true"), &Untrusted::dir(d.path())).unwrap_err();
        assert!(e.to_string().contains("not named like a python interpreter"), "{e}");
        // World-writable directory above it: refused.
        let open = d.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        std::fs::copy(&fake, open.join("python3")).unwrap();
        let e = describe(Kind::Python, &open.join("python3"), &Untrusted::dir(Path::new("/nonexistent-state")))
            .unwrap_err();
        assert!(e.to_string().contains("writable by its group or by everyone"), "{e}");
        // Owned by a server's uid, wherever it lies: refused.
        let mine = nix::unistd::geteuid().as_raw();
        let servers = Untrusted { root: PathBuf::from("/nonexistent-state"), uids: mine..mine + 1 };
        let e = describe(Kind::Python, &fake, &servers).unwrap_err();
        assert!(e.to_string().contains("a server's"), "{e}");
    }

    #[test]
    fn the_system_python_describes_itself() {
        let r = discover(
            Kind::Python,
            None,
            "/usr/local/bin:/usr/bin:/bin",
            &Untrusted::dir(Path::new("/nonexistent-state")),
        )
        .unwrap_or_else(|e| {
            panic!("python3 on the sandbox PATH is needed by this test (scripts/test.sh installs it): {e}")
        });
        assert!(r.vars["PYTHON_STDLIB"].join("os.py").is_file(), "{}", r.describe());
        assert!(r.vars["PYTHON_DYNLOAD"].is_dir(), "{}", r.describe());
        assert!(r.exe.is_file() && !r.exe.is_symlink());
    }
}

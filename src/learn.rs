//! `mcpbox policy learn`: what a server did while it ran under observation, the sandbox view it
//! ran in, and the policy TOML written from the two.
//!
//! - [`Observations`]: filled by the seccomp listener (`sandbox::notify`, path syscalls) and the
//!   egress proxy in record mode (`netproxy`, connects); one per process ([`start_learning`]).
//! - [`learn_view`]: the base policy's grants plus the host's system directories (read, exec)
//!   and `/etc` minus its secrets, never the state dir, the config's directory, homes or /root.
//! - [`write_policy`]: the smallest grants that cover what was used and the base does not
//!   already grant, collapsed to directories by [`collapse`], every line commented.
//!
//! Nothing here decides what a server may do while it runs: the view is enforced by the mount
//! namespace and Landlock as for any server. What a server asks for is untrusted input to the
//! writer, which keeps only paths that lay inside the view and exist on the host.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::policy::{path_covered, Network, Policy};
use crate::sandbox::Access;

/// What an observed syscall did with a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Use {
    /// stat, access, readlink, `O_PATH`: needs the path to exist in the view.
    Look,
    Read,
    Exec,
    Write,
}

/// Distinct paths kept at most, and their bytes; beyond, paths are counted but not kept (a
/// server cannot make mcpbox's memory grow without bound by naming random paths).
const MAX_PATHS: usize = 50_000;
const MAX_PATH_BYTES: usize = 16 << 20;
/// Distinct connect targets kept at most.
const MAX_TARGETS: usize = 1_000;
/// Distinct denied syscalls kept at most (a server calling every unknown number would
/// otherwise grow the map, and the written file, by one entry per number).
const MAX_DENIED: usize = 512;

#[derive(Debug, Clone, Default)]
pub struct PathSeen {
    /// Times seen per [`Use`] (Look, Read, Exec, Write).
    pub count: [u64; 4],
    /// The syscalls that named it.
    pub syscalls: BTreeSet<&'static str>,
}

#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub paths: BTreeMap<PathBuf, PathSeen>,
    /// `host:port` → connections the proxy made.
    pub connects: BTreeMap<String, u64>,
    /// Syscalls the filter refused → times.
    pub denied: BTreeMap<String, u64>,
    /// Observations not kept (over [`MAX_PATHS`] / [`MAX_TARGETS`]).
    pub dropped: u64,
    /// Path syscalls observed, kept or not.
    pub observed: u64,
    /// Bytes of the paths kept.
    bytes: usize,
}

/// Everything observed of one server while it was learned.
#[derive(Debug, Default)]
pub struct Observations {
    inner: Mutex<Snapshot>,
    listening: AtomicBool,
    /// The syscall numbers the sandbox's filter allows (set before it starts). A notification
    /// for one of these that names a path is an observation; any other is a denial.
    allowed: OnceLock<BTreeSet<i64>>,
}

impl Observations {
    /// What the learned sandbox's filter allows (`sandbox::seccomp::allowed`), before it starts.
    pub fn set_allowed(&self, allowed: BTreeSet<i64>) {
        let _ = self.allowed.set(allowed);
    }

    /// Whether a notification of syscall `nr` is an observation to let continue: only a syscall
    /// the filter allows (one the policy denies, `extra_deny`, arrives here as well and must get
    /// its EPERM). Nothing continues before [`Observations::set_allowed`].
    pub fn continues(&self, nr: i64) -> bool {
        self.allowed.get().is_some_and(|a| a.contains(&nr))
    }

    /// The seccomp listener is being served: path syscalls will be observed.
    pub fn listening(&self) {
        self.listening.store(true, Ordering::SeqCst);
    }

    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::SeqCst)
    }

    pub fn path(&self, kind: Use, path: PathBuf, syscall: &'static str) {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        s.observed += 1;
        let len = path.as_os_str().len();
        if !s.paths.contains_key(&path) {
            if s.paths.len() >= MAX_PATHS || s.bytes + len > MAX_PATH_BYTES {
                s.dropped += 1;
                return;
            }
            s.bytes += len;
        }
        let seen = s.paths.entry(path).or_default();
        seen.count[kind as usize] += 1;
        seen.syscalls.insert(syscall);
    }

    pub fn connect(&self, target: &str) {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if s.connects.len() >= MAX_TARGETS && !s.connects.contains_key(target) {
            s.dropped += 1;
            return;
        }
        *s.connects.entry(target.to_string()).or_default() += 1;
    }

    pub fn denied_syscall(&self, name: &str) {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if s.denied.len() >= MAX_DENIED && !s.denied.contains_key(name) {
            s.dropped += 1;
            return;
        }
        *s.denied.entry(name.to_string()).or_default() += 1;
    }

    pub fn snapshot(&self) -> Snapshot {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

static LEARNING: OnceLock<Arc<Observations>> = OnceLock::new();

/// Makes this process a learning one: the seccomp listener of every sandbox it starts from now
/// on observes (only `mcpbox policy learn` calls it; it starts one sandbox).
pub fn start_learning() -> Arc<Observations> {
    LEARNING.get_or_init(|| Arc::new(Observations::default())).clone()
}

/// The observations of this process, if it is learning.
pub fn learning() -> Option<&'static Arc<Observations>> {
    LEARNING.get()
}

/// `path` without `.` and `..` (lexically: the server's own symlinks are not followed here).
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The learn view
// ---------------------------------------------------------------------------------------------

/// The host's system directories, read and exec in the learn view (those that exist).
pub const SYSTEM_ROOTS: &[&str] = &["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/opt"];

/// Under `/etc`, never in the view: password hashes, sudo rules, SSH and TLS keys, credential
/// stores, VPN and Wi-Fi secrets, Kerberos keys, mcpbox's own config.
pub const ETC_SECRETS: &[&str] = &[
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/sudoers",
    "/etc/sudoers.d",
    "/etc/ssh",
    "/etc/ssl/private",
    "/etc/security",
    "/etc/credstore",
    "/etc/credstore.encrypted",
    "/etc/wireguard",
    "/etc/NetworkManager",
    "/etc/ppp",
    "/etc/krb5.keytab",
    "/etc/mcpbox",
    "/etc/subuid",
    "/etc/subgid",
    "/etc/docker",
    "/etc/containers",
    "/etc/letsencrypt",
    "/etc/pki",
    "/etc/libvirt",
    "/etc/cron.d",
    "/etc/crontab",
];

/// What the learn view grants on top of the base policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    pub grants: Vec<(PathBuf, Access)>,
    /// What the view leaves out (as named and as real paths): no learned grant leads into it.
    pub never: Vec<PathBuf>,
}

impl View {
    /// Whether `path` lies in the view: under one of its grants as the server named it, and its
    /// real path on the host (symlinks followed; for a path that does not exist, its
    /// directory's) under one too and in nothing the view leaves out. A name that only leads
    /// into the view through a symlink (`/usr/lib/ssl/private` -> `/etc/ssl/private`) is not
    /// in it. Nothing outside the grants as named is looked up on the host (a path the server
    /// made up may sit on an automounter or a hung network filesystem).
    pub fn contains(&self, path: &Path) -> bool {
        if !self.covers(path) {
            return false;
        }
        let real = std::fs::canonicalize(path).ok().or_else(|| {
            let dir = std::fs::canonicalize(path.parent()?).ok()?;
            Some(dir.join(path.file_name()?))
        });
        real.is_some_and(|r| self.covers(&r) && !self.never.iter().any(|n| r.starts_with(n)))
    }

    /// `path` lies under one of the grants as named (no filesystem access). A directory under
    /// a grant holds nothing the view leaves out: grants are carved around those.
    pub fn covers(&self, path: &Path) -> bool {
        self.grants.iter().any(|(g, _)| path.starts_with(g))
    }
}

/// The learn view: [`SYSTEM_ROOTS`] (exec) and `/etc` (read), with every path of `hidden`,
/// [`ETC_SECRETS`], `/root` and `/home` carved out: a root that contains one of them is granted
/// child by child instead. An entry whose real path (symlinks followed) leaves the view's roots
/// or lands in a hidden path is left out.
pub fn learn_view(hidden: &[PathBuf]) -> View {
    let mut never: Vec<PathBuf> =
        hidden.iter().map(|h| std::fs::canonicalize(h).unwrap_or_else(|_| h.clone())).collect();
    never.extend(hidden.iter().cloned());
    never.extend(ETC_SECRETS.iter().map(PathBuf::from));
    never.extend(["/root", "/home"].iter().map(PathBuf::from));
    let roots: Vec<(PathBuf, Access)> = SYSTEM_ROOTS
        .iter()
        .map(|r| (PathBuf::from(r), Access::Exec))
        .chain(std::iter::once((PathBuf::from("/etc"), Access::Read)))
        .filter(|(r, _)| std::fs::symlink_metadata(r).is_ok())
        .collect();
    let real_roots: Vec<PathBuf> = roots.iter().filter_map(|(r, _)| std::fs::canonicalize(r).ok()).collect();
    let mut view = View { grants: Vec::new(), never: never.clone() };
    for (root, access) in &roots {
        for p in carve(root, &never, 0) {
            let Ok(real) = std::fs::canonicalize(&p) else { continue };
            let inside_roots = real_roots.iter().any(|r| real.starts_with(r));
            let hidden = never.iter().any(|n| real.starts_with(n) || n.starts_with(&real));
            if inside_roots && !hidden && crate::policy::reserved_conflict(&real).is_none() {
                view.grants.push((p, *access));
            }
        }
    }
    view
}

/// `dir` whole if no path of `never` lies in or above it, else its entries carved one by one.
fn carve(dir: &Path, never: &[PathBuf], depth: usize) -> Vec<PathBuf> {
    if never.iter().any(|n| dir.starts_with(n)) {
        return vec![];
    }
    if !never.iter().any(|n| n.starts_with(dir)) || depth > 8 {
        return vec![dir.to_path_buf()];
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return vec![] };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        // A symlink is kept whole (its real path is judged by the caller); a directory is carved.
        match e.file_type() {
            Ok(t) if t.is_dir() => out.extend(carve(&p, never, depth + 1)),
            Ok(_) if !never.iter().any(|n| p.starts_with(n)) => out.push(p),
            _ => {}
        }
    }
    out.sort();
    out
}

// ---------------------------------------------------------------------------------------------
// The policy writer
// ---------------------------------------------------------------------------------------------

/// A directory never granted wholesale by a learned policy: `/`, a top-level directory, a home
/// (`/home/NAME`, `/root`), and the broad system directories below.
pub fn too_broad(dir: &Path) -> bool {
    const BROAD: &[&str] = &[
        "/usr/lib",
        "/usr/lib64",
        "/usr/lib32",
        "/usr/share",
        "/usr/local",
        "/usr/local/lib",
        "/usr/local/share",
        "/usr/include",
        "/etc/ssl",
        "/var/lib",
        "/var/cache",
        "/run/user",
    ];
    let depth = dir.components().filter(|c| matches!(c, Component::Normal(_))).count();
    depth <= 1
        || dir == Path::new("/root")
        || (dir.starts_with("/home") && depth <= 2)
        || BROAD.iter().any(|b| dir == Path::new(b))
}

/// Paths the sandbox provides itself: never granted, never worth a line.
fn sandbox_own(path: &Path) -> bool {
    ["/proc", "/dev", "/tmp", "/sys"].iter().any(|o| path.starts_with(o))
}

/// One grant of the learned policy and what used it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub path: PathBuf,
    pub files: usize,
    pub times: u64,
    pub syscalls: BTreeSet<&'static str>,
    pub example: PathBuf,
}

/// A path for a comment line: control characters escaped, so that a name the server made up
/// (`x\nexec = ["/"]`) cannot end the comment and add a line of its own, and so are the
/// invisible ones that reorder or hide text on a terminal (bidi overrides, zero-width marks).
pub fn shown(p: &Path) -> String {
    crate::denials::printable(&p.to_string_lossy())
}

impl Line {
    fn comment(&self) -> String {
        if self.syscalls.is_empty() {
            // ${DATA}: the example says what.
            return format!("{} path(s) in {}", self.files, shown(&self.example));
        }
        let calls: Vec<&str> = self.syscalls.iter().copied().collect();
        let what = if self.files == 1 { "1 path".to_string() } else { format!("{} paths", self.files) };
        let times = if self.times == 1 { "once".to_string() } else { format!("{} times", self.times) };
        if self.files == 1 && self.example == self.path {
            format!("{what}, {times} ({})", calls.join(", "))
        } else {
            format!("{what}, {times} ({}), e.g. {}", calls.join(", "), shown(&self.example))
        }
    }
}

/// Paths (with their use) grouped into few grants, none [`too_broad`]: two or more files of
/// one directory stand for that directory (a single file stays itself), and at least three
/// lines under one directory are merged into it, while it is not too broad. `exact` keeps
/// every path as it is (exec grants).
pub fn collapse(used: &BTreeMap<PathBuf, PathSeen>, exact: bool, whole: impl Fn(&Path) -> bool) -> Vec<Line> {
    let mut lines: BTreeMap<PathBuf, Line> = BTreeMap::new();
    let add = |lines: &mut BTreeMap<PathBuf, Line>, at: PathBuf, from: &Line| {
        let l = lines.entry(at.clone()).or_insert(Line {
            path: at,
            files: 0,
            times: 0,
            syscalls: BTreeSet::new(),
            example: from.example.clone(),
        });
        l.files += from.files;
        l.times += from.times;
        l.syscalls.extend(from.syscalls.iter().copied());
    };
    let is_dir = |p: &Path| std::fs::metadata(p).map(|m| m.is_dir()).unwrap_or(false);
    let mut files_in: BTreeMap<&Path, usize> = BTreeMap::new();
    for p in used.keys().filter(|p| !is_dir(p)) {
        if let Some(d) = p.parent() {
            *files_in.entry(d).or_default() += 1;
        }
    }
    for (p, seen) in used {
        let at = match p.parent() {
            Some(d)
                if !exact && !is_dir(p) && !too_broad(d) && files_in.get(d).copied().unwrap_or(0) >= 2 && whole(d) =>
            {
                d.to_path_buf()
            }
            _ => p.clone(),
        };
        if too_broad(&at) {
            // A top-level directory looked at (stat "/usr"): the view's parents of every grant
            // exist anyway; nothing to grant.
            continue;
        }
        let one = Line {
            path: p.clone(),
            files: 1,
            times: seen.count.iter().sum(),
            syscalls: seen.syscalls.clone(),
            example: p.clone(),
        };
        add(&mut lines, at, &one);
    }
    if !exact {
        loop {
            let mut by_parent: BTreeMap<PathBuf, Vec<PathBuf>> = BTreeMap::new();
            for p in lines.keys() {
                if let Some(d) = p.parent().filter(|d| !too_broad(d) && whole(d)) {
                    by_parent.entry(d.to_path_buf()).or_default().push(p.clone());
                }
            }
            let Some((dir, kids)) = by_parent.into_iter().find(|(_, k)| k.len() >= 3) else { break };
            for k in kids {
                let l = lines.remove(&k).expect("a key");
                add(&mut lines, dir.clone(), &l);
            }
        }
        // Drop what a broader line covers.
        let keys: Vec<PathBuf> = lines.keys().cloned().collect();
        for k in &keys {
            if let Some(outer) = keys.iter().find(|o| *o != k && k.starts_with(o)) {
                let l = lines.remove(k).expect("a key");
                add(&mut lines, outer.clone(), &l);
            }
        }
    }
    lines.into_values().collect()
}

/// A path only looked at (stat, readlink) that the base's grants make exist anyway: a directory
/// above one of its grants (the view has the parents of every grant), or a symlink whose real
/// path it grants (a launch recreates the links of what it resolves: the runtime's names).
fn only_looked_and_given(base: &Policy, p: &Path) -> bool {
    let f = &base.filesystem;
    let mut granted = f.read.iter().chain(&f.write).chain(&f.exec).map(|r| &r.path);
    if granted.any(|g| g.starts_with(p)) {
        return true;
    }
    let is_link = std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink());
    is_link && std::fs::canonicalize(p).is_ok_and(|real| path_covered(base, "read", &real))
}

/// What the writer needs besides the observations.
pub struct Learned<'a> {
    /// The `extends` value: a shipped name or a policy file's absolute path.
    pub extends: String,
    /// That policy, loaded for this server (its grants are not repeated).
    pub base: &'a Policy,
    /// What mcpbox grants at launch beyond the policy (the prepared package, the runtime's
    /// libraries) and the server's state: never written.
    pub launch_grants: &'a [PathBuf],
    pub view: &'a View,
    /// The command line learned, for the header.
    pub command: String,
    /// The server's data dir (`${DATA}`), writable while learning.
    pub data: Option<PathBuf>,
    /// The command's executable as run: a launch recreates its symlinks in the view, so it
    /// needs no grant of its own when the base covers where it leads.
    pub executable: Option<PathBuf>,
    /// Environment variable names the server was configured with (`--config`).
    pub env_names: Vec<String>,
}

fn quoted(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn section(out: &mut String, key: &str, lines: &[Line], commented: bool) {
    if lines.is_empty() {
        return;
    }
    let c = if commented { "# " } else { "" };
    let _ = writeln!(out, "{c}{key} = [");
    for l in lines {
        let _ = writeln!(out, "{c}    # {}", l.comment());
        let _ = writeln!(out, "{c}    {},", quoted(&l.path.to_string_lossy()));
    }
    let _ = writeln!(out, "{c}]");
}

/// The learned policy, as TOML with a comment on every grant. What the base policy or the
/// launch already grants is not repeated; a path outside the learn view, one that does not
/// exist on the host, and anything under the sandbox's own /proc, /dev, /tmp are never written.
/// Writes outside the base's grants were refused while learning: they are written commented
/// out, for the reader to decide.
pub fn write_policy(l: &Learned, obs: &Snapshot) -> String {
    let base = l.base;
    let (mut reads, mut execs, mut writes) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    let mut left_out = 0usize;
    // ${DATA}: (paths read, paths written) under it.
    let (mut data_read, mut data_written) = (0usize, 0usize);
    for (p, seen) in &obs.paths {
        if let Some(d) = l.data.as_deref().filter(|d| p.starts_with(d)) {
            if seen.count[Use::Write as usize] > 0 && !path_covered(base, "write", d) {
                data_written += 1;
            } else if seen.count[Use::Read as usize] > 0
                && p != d
                && std::fs::symlink_metadata(p).is_ok()
                && !path_covered(base, "read", d)
            {
                // Files that were there to read (HOME is DATA: a missing ~/.gitconfig is no use).
                data_read += 1;
            }
            continue;
        }
        if sandbox_own(p) || l.launch_grants.iter().any(|g| p.starts_with(g)) {
            continue;
        }
        let [look, read, exec, write] = seen.count;
        if look > 0 && read + exec + write == 0 && only_looked_and_given(base, p) {
            continue;
        }
        let wants_write = write > 0 && !path_covered(base, "write", p);
        let launched = l.executable.as_deref() == Some(p.as_path())
            && std::fs::canonicalize(p).is_ok_and(|real| path_covered(base, "exec", &real));
        if launched && write == 0 {
            continue;
        }
        let wants_exec = exec > 0 && !path_covered(base, "exec", p);
        let wants_read = (look + read) > 0 && !path_covered(base, "read", p);
        if !(wants_write || wants_exec || wants_read) {
            continue;
        }
        // Only what the server could see: in the view, and there on the host.
        let exists = std::fs::symlink_metadata(p).is_ok();
        if wants_write {
            // A file it tried to create: its directory must be in the view and exist, and its
            // name show as it is (no control or invisible characters in a line to uncomment).
            let dir_ok = p.parent().is_some_and(|d| l.view.contains(d) && d.exists());
            let plain = !crate::denials::has_unprintable(&p.to_string_lossy());
            if dir_ok && plain && l.view.contains(p) {
                writes.insert(p.clone(), seen.clone());
            } else {
                left_out += 1;
            }
        }
        if !exists || !l.view.contains(p) {
            if wants_exec || wants_read {
                left_out += 1;
            }
            continue;
        }
        if wants_exec {
            execs.insert(p.clone(), seen.clone());
        } else if wants_read {
            reads.insert(p.clone(), seen.clone());
        }
    }
    // A directory stands for its files only where the whole of it is in the view.
    let whole = |d: &Path| l.view.contains(d);
    let exec_lines = collapse(&execs, true, whole);
    let mut read_lines = collapse(&reads, false, whole);
    read_lines.retain(|r| !exec_lines.iter().any(|e| r.path.starts_with(&e.path)));
    let write_lines = collapse(&writes, false, whole);

    let mut out = String::new();
    let _ = writeln!(out, "# Learned by `mcpbox policy learn` from: {}", shown(Path::new(&l.command)));
    let _ = writeln!(
        out,
        "# What the server used while it ran, beyond what `{}` grants. Review every line: it says what the",
        l.extends
    );
    let _ = writeln!(out, "# server did, not what it should be allowed to do.");
    if left_out > 0 {
        let _ = writeln!(
            out,
            "# {left_out} path(s) it named lay outside the learn view or did not exist: not granted here."
        );
    }
    if obs.dropped > 0 {
        let _ = writeln!(out, "# {} observation(s) were over the learner's limits and not kept.", obs.dropped);
    }
    let _ = writeln!(out, "extends = {}", quoted(&l.extends));
    let data = |n: usize, what: &str| Line {
        path: "${DATA}".into(),
        files: n,
        times: 0,
        syscalls: BTreeSet::new(),
        example: PathBuf::from(format!("the server's own data dir ({what})")),
    };
    if data_read > 0 {
        read_lines.insert(0, data(data_read, "read"));
    }
    let data_write: Vec<Line> = (data_written > 0).then(|| data(data_written, "written")).into_iter().collect();
    if !(read_lines.is_empty() && exec_lines.is_empty() && write_lines.is_empty() && data_write.is_empty()) {
        let _ = writeln!(out, "\n[filesystem]");
        section(&mut out, "read", &read_lines, false);
        section(&mut out, "exec", &exec_lines, false);
        section(&mut out, "write", &data_write, false);
        if !write_lines.is_empty() {
            let _ = writeln!(
                out,
                "# Refused while learning (the learn view is read-only outside DATA and /tmp); uncomment\n\
                 # only what the server must write, and prefer pointing it into ${{DATA}}:"
            );
            section(&mut out, "write", &write_lines, true);
        }
    }

    // Network: hosts the proxy let through in record mode that the base does not allow.
    let new_targets: Vec<(&String, &u64)> = obs
        .connects
        .iter()
        .filter(|(t, _)| match &base.network {
            Network::Host { .. } => false,
            Network::None => true,
            Network::Proxy { allow } => {
                let list = crate::netproxy::AllowList::new(allow);
                crate::netproxy::parse_target(t).is_none_or(|(h, p)| list.check(&h, p).is_none())
            }
        })
        .collect();
    if !new_targets.is_empty() {
        let _ = writeln!(out, "\n[network]\nmode = \"proxy\"\nallow = [");
        let _ = writeln!(
            out,
            "    # Names the server chose: whoever runs a name's DNS decides where it leads later (never to\n    \
             # loopback or link-local addresses, but to private ones too); `*.domain:port` is public-only."
        );
        for (t, n) in new_targets {
            let _ = writeln!(out, "    # {n} connection(s) through the proxy\n    {},", quoted(t));
        }
        let _ = writeln!(out, "]");
    } else if matches!(base.network, Network::Proxy { .. }) && obs.connects.is_empty() {
        let _ = writeln!(out, "\n# [network]: the base allows a proxy; nothing connected while learning.");
    }
    let pass: Vec<&String> = l.env_names.iter().filter(|n| !base.env.pass.contains(n)).collect();
    if !pass.is_empty() {
        let _ = writeln!(out, "\n[env]\npass = [");
        for n in pass {
            let _ = writeln!(
                out,
                "    # in the server's configured env (the value stays in the config)\n    {},",
                quoted(n)
            );
        }
        let _ = writeln!(out, "]");
    }
    if !obs.denied.is_empty() {
        let _ = writeln!(out, "\n# Refused by the seccomp allow-list (answered EPERM), not granted here:");
        for (name, n) in &obs.denied {
            let _ = writeln!(out, "#   {name}: {n} time(s)");
        }
    }
    out
}

/// The egress proxy's record mode writes here.
impl crate::netproxy::RecordConnect for Observations {
    fn connect(&self, target: &str) {
        Observations::connect(self, target);
    }
}

#[cfg(test)]
mod tests;

//! Helpers shared by every integration test module: the mcpbox binary, temp dirs the sandbox's
//! uid can traverse, policy files, the probe program, running things with a timeout, the /proc
//! scanner and a raw HTTP/1.1 client. One of each: test modules use these, not their own.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The mcpbox binary cargo built for this test run.
pub fn mcpbox() -> &'static str {
    env!("CARGO_BIN_EXE_mcpbox")
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A temp dir with mode 0755: as root the server runs under its own host uid, which must be
/// able to traverse whatever a test grants.
pub fn tempdir() -> tempfile::TempDir {
    let d = tempfile::Builder::new().prefix("mcpbox-test-").tempdir().expect("creating a temp dir");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod 0755");
    d
}

pub fn mkdir_755(p: &Path) {
    std::fs::create_dir_all(p).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Write `body` as a policy file `NAME.toml` in `dir`.
pub fn write_policy(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, body).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    p
}

/// A name unique in this test run (server names become uids, cgroups and state dirs).
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// What is built once per test run: the probe (dynamic and static) and a shared state dir (one
/// state dir, so that each server name gets its own host uid as root).
pub struct Shared {
    pub dir: PathBuf,
    pub state: PathBuf,
    pub probe: PathBuf,
    pub probe_static: PathBuf,
    /// mcpbox's own config, beside the state dir, with a canary inside.
    pub config: PathBuf,
    /// A fake HOME with a planted secret.
    pub home: PathBuf,
    pub secret: PathBuf,
}

pub const CANARY: &str = "CANARYb7e1d0c4a9";
pub const ENV_CANARY: &str = "ENVCANARY5f3a2c71";

pub fn shared() -> &'static Shared {
    static S: OnceLock<Shared> = OnceLock::new();
    S.get_or_init(|| {
        // Kept for the whole run (statics are never dropped); scripts/test.sh points TMPDIR
        // at a directory it removes afterwards.
        let dir = tempdir().keep();
        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/probe/probe.c");
        let probe = dir.join("probe");
        let probe_static = dir.join("probe-static");
        for (out, extra) in [(&probe, None), (&probe_static, Some("-static"))] {
            let mut c = Command::new("cc");
            c.args(["-O1", "-Wall", "-Werror", "-o"]).arg(out).arg(src);
            if let Some(x) = extra {
                c.arg(x);
            }
            let st = c.status().expect("running cc: a C compiler is required to build the probe");
            assert!(st.success(), "compiling the probe failed");
        }
        let state = dir.join("state");
        let config = dir.join("mcpbox.json");
        std::fs::write(&config, format!("{{\"mcpProxy\": {{\"options\": {{\"authTokens\": [\"{CANARY}\"]}}}}}}"))
            .unwrap();
        let home = dir.join("home");
        mkdir_755(&home.join(".ssh"));
        std::fs::set_permissions(home.join(".ssh"), std::fs::Permissions::from_mode(0o700)).unwrap();
        let secret = home.join(".ssh/id_rsa");
        std::fs::write(&secret, format!("-----BEGIN OPENSSH PRIVATE KEY-----\n{CANARY}\n")).unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        Shared { dir, state, probe, probe_static, config, home, secret }
    })
}

/// A policy extending `default` that lets the probe run, plus `extra` TOML (appended to the
/// `[filesystem]` table unless it starts another table).
pub fn probe_policy(name: &str, filesystem_extra: &str, tables: &str) -> PathBuf {
    let s = shared();
    let pdir = s.dir.join("policies");
    mkdir_755(&pdir);
    let body = format!(
        "extends = \"default\"\n[filesystem]\nexec = [\"{}\", \"{}\"]\n{filesystem_extra}\n{tables}\n",
        s.probe.display(),
        s.probe_static.display()
    );
    write_policy(&pdir, name, &body)
}

#[derive(Debug)]
pub struct Output {
    /// Exit code, or 128+N for a signal (as a shell reports it).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Output {
    /// The probe's `RESULT <check> <ok|denied> <detail>` for `check`: (ok?, detail).
    pub fn result(&self, check: &str) -> (bool, String) {
        self.try_result(check).unwrap_or_else(|| panic!("no RESULT for `{check}` in:\n{self}"))
    }

    pub fn try_result(&self, check: &str) -> Option<(bool, String)> {
        let prefix = format!("RESULT {check} ");
        let line = self.stdout.lines().find(|l| l.starts_with(&prefix))?;
        let rest = &line[prefix.len()..];
        let (verdict, detail) = rest.split_once(' ').unwrap_or((rest, ""));
        Some((verdict == "ok", detail.to_string()))
    }

    /// The errno name of a denied check (panics if it was not denied).
    pub fn denied(&self, check: &str) -> String {
        let (ok, detail) = self.result(check);
        assert!(!ok, "`{check}` was allowed ({detail}); output:\n{self}");
        detail.split_whitespace().next().unwrap_or("").to_string()
    }

    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}\n--- stdout\n{}--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

fn reader<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut s);
        }
        String::from_utf8_lossy(&s).into_owned()
    })
}

/// Run `cmd` with piped output; SIGKILL it (and fail) if it takes longer than `timeout`.
pub fn run_timeout(mut cmd: Command, timeout: Duration) -> Output {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let out = reader(child.stdout.take());
    let err = reader(child.stderr.take());
    let status = wait_timeout(&mut child, timeout);
    let elapsed = started.elapsed();
    let stdout = out.join().unwrap();
    let stderr = err.join().unwrap();
    let Some(status) = status else {
        panic!("{cmd:?} did not finish within {timeout:?}; stdout:\n{stdout}\nstderr:\n{stderr}");
    };
    use std::os::unix::process::ExitStatusExt;
    let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Output { code, stdout, stderr, elapsed }
}

pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The environment mcpbox runs with in tests: the fake HOME and a canary variable that must
/// never reach the server.
pub fn test_env(cmd: &mut Command) {
    let s = shared();
    cmd.env("HOME", &s.home).env("MCPBOX_CANARY", ENV_CANARY).env("MCPBOX_TOKEN", ENV_CANARY);
}

/// `mcpbox run --policy POLICY --state-dir STATE --name NAME [extra] -- PROG ARGS`.
pub fn mcpbox_cmd(policy: &Path, name: &str, extra: &[&str], prog: &Path, args: &[&str]) -> Command {
    let s = shared();
    let mut cmd = Command::new(mcpbox());
    cmd.arg("run").arg("--policy").arg(policy).arg("--state-dir").arg(&s.state).arg("--name").arg(name);
    cmd.args(extra).arg("--").arg(prog).args(args);
    test_env(&mut cmd);
    cmd
}

/// Run the probe confined.
pub fn confined(policy: &Path, name: &str, args: &[&str]) -> Output {
    run_timeout(mcpbox_cmd(policy, name, &[], &shared().probe, args), Duration::from_secs(60))
}

/// Run the probe directly, with the same environment: what the checks see without a sandbox.
pub fn unconfined(args: &[&str]) -> Output {
    let mut cmd = Command::new(&shared().probe);
    cmd.args(args);
    test_env(&mut cmd);
    run_timeout(cmd, Duration::from_secs(60))
}

// ---- /proc: the one scanner every test module uses --------------------------------------

/// One process, as the host's /proc shows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Proc {
    pub pid: u32,
    pub ppid: u32,
    /// The state letter of /proc/PID/stat (`Z` for a zombie).
    pub state: char,
    /// Start time in clock ticks since boot: tells a pid apart from a later reuse.
    pub start: u64,
    /// The command line, one entry per argument (NUL-separated in /proc).
    pub argv: Vec<String>,
    /// The arguments joined by spaces.
    pub cmdline: String,
}

pub fn read_proc(pid: u32) -> Option<Proc> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let state = f.first()?.chars().next()?;
    let ppid = f.get(1)?.parse().ok()?;
    let start = f.get(19)?.parse().ok()?;
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let raw = String::from_utf8_lossy(&raw);
    let mut argv: Vec<String> = raw.split('\0').map(str::to_owned).collect();
    if argv.last().is_some_and(String::is_empty) {
        argv.pop();
    }
    let cmdline = raw.replace('\0', " ").trim_end().to_string();
    Some(Proc { pid, ppid, state, start, argv, cmdline })
}

/// Every process the host's /proc lists now.
pub fn all_procs() -> Vec<Proc> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
            if let Some(p) = read_proc(pid) {
                out.push(p);
            }
        }
    }
    out
}

/// Every process below `root` (children, their children, …).
pub fn descendants(root: u32) -> Vec<Proc> {
    let procs = all_procs();
    let mut found: std::collections::HashSet<u32> = std::collections::HashSet::from([root]);
    let mut out = Vec::new();
    loop {
        let before = found.len();
        for p in &procs {
            if found.contains(&p.ppid) && !found.contains(&p.pid) {
                found.insert(p.pid);
                out.push(p.clone());
            }
        }
        if found.len() == before {
            return out;
        }
    }
}

/// Whether this very process (same pid and start time) still exists.
pub fn alive(p: &Proc) -> bool {
    read_proc(p.pid).is_some_and(|q| q.start == p.start)
}

/// Live (not zombie) children of `pid`.
pub fn children_of(pid: i32) -> Vec<i32> {
    all_procs().into_iter().filter(|p| p.ppid as i32 == pid && p.state != 'Z').map(|p| p.pid as i32).collect()
}

/// Pids of probes started as `probe CHECK MARKER` (not mcpbox, whose argv holds it too).
pub fn pids_with_marker(marker: &str) -> Vec<i32> {
    let me = std::process::id();
    all_procs()
        .into_iter()
        .filter(|p| p.pid != me && p.argv.get(2).map(String::as_str) == Some(marker))
        .map(|p| p.pid as i32)
        .collect()
}

/// Pids whose real uid is `uid`.
pub fn pids_of_uid(uid: u32) -> Vec<i32> {
    all_procs().into_iter().map(|p| p.pid as i32).filter(|pid| proc_uid(*pid) == Some(uid)).collect()
}

/// Host processes whose command line mentions `needle`, as (pid, argv).
pub fn processes_mentioning(needle: &str) -> Vec<(u32, Vec<String>)> {
    all_procs().into_iter().filter(|p| p.argv.iter().any(|a| a.contains(needle))).map(|p| (p.pid, p.argv)).collect()
}

/// The real uid of a process, from the host's /proc.
pub fn proc_uid(pid: i32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The host uid mcpbox recorded for server `name` (root only).
pub fn allocated_uid(name: &str) -> u32 {
    let s = std::fs::read_to_string(shared().state.join("uids")).expect("reading STATE/uids");
    s.lines()
        .find_map(|l| {
            let mut it = l.split_whitespace();
            (it.next() == Some(name)).then(|| it.next().unwrap().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no uid recorded for {name}"))
}

pub fn kill_all(pids: &[i32]) {
    for p in pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p), nix::sys::signal::Signal::SIGKILL);
    }
}

/// Poll `f` until it is true or `timeout` passes; returns the last value.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- raw HTTP/1.1 ---------------------------------------------------------------------------

/// One HTTP/1.1 request to 127.0.0.1:`port` on a fresh connection: (status, headers, body).
/// A chunked body is decoded.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Vec<(String, String)>, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to mcpbox");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("reading the response");
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("no end of headers");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut rest = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect();
    if headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked")) {
        rest = dechunk(&rest);
    }
    (status, headers, String::from_utf8_lossy(&rest).into_owned())
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).split(';').next().unwrap().trim(), 16)
            .unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = eol + 2;
        out.extend_from_slice(&b[start..(start + size).min(b.len())]);
        b = &b[(start + size + 2).min(b.len())..];
    }
    out
}

/// The install tree a server's prepared record names (`CACHE/npm-N` or `CACHE/venv-N`): the
/// first directory of its entry below the cache.
pub fn prepared_tree(cache: &Path) -> PathBuf {
    let text = std::fs::read_to_string(cache.join("prepared.json"))
        .unwrap_or_else(|e| panic!("{}/prepared.json: {e}", cache.display()));
    let rec: serde_json::Value = serde_json::from_str(&text).unwrap();
    let entry = PathBuf::from(rec["entry"].as_str().expect("the record names an entry"));
    let first = entry.strip_prefix(cache).expect("the entry lies in the cache").components().next().unwrap();
    cache.join(first)
}

/// `npm pack` of the package in `pkg` into `dest` (its own npm cache there, no registry asked):
/// the tarball `dest/NAME-VERSION.tgz`, readable by every uid (the sandbox's reads it).
pub fn npm_pack(pkg: &Path, dest: &Path, tarball: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let out = std::process::Command::new("npm")
        .args(["pack", "--silent", "--pack-destination"])
        .arg(dest)
        .current_dir(pkg)
        .env("npm_config_cache", dest.join("npm-cache"))
        .output()
        .expect("running npm (scripts/test.sh installs it)");
    assert!(out.status.success(), "npm pack: {}", String::from_utf8_lossy(&out.stderr));
    let tgz = dest.join(tarball);
    assert!(tgz.is_file(), "npm pack made no {}", tgz.display());
    std::fs::set_permissions(&tgz, std::fs::Permissions::from_mode(0o644)).unwrap();
    tgz
}

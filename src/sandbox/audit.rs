//! Landlock's refusals, read from the kernel's audit records and recorded as denials of the
//! server whose sandbox they happened in ([`crate::denials`], [`Layer::Landlock`]).
//!
//! Landlock (ABI 7 on) reports what a domain refuses as audit records: `LANDLOCK_ACCESS` (1423:
//! `domain=ID blockers=fs.execute path="/x" …`) and, after the first one of a domain in the same
//! event, `LANDLOCK_DOMAIN` (1424: `domain=ID status=allocated … pid=P …`, `P` being the host
//! pid of the process that created the domain). Each server applies Landlock to itself just
//! before its `execve`, and mcpbox learns that process's host pid from the credentials the
//! kernel attaches to its last report message (see `launch`): so a domain record maps its
//! domain to one sandbox, and the access records of that domain to its server. A domain that
//! mcpbox did not create (one a server made for itself, another program's) is ignored: a server
//! cannot have its denials recorded under another server's name, nor forge records (records of
//! these types come from the kernel only: user space may send only the `AUDIT_USER…` types, and
//! only with `CAP_AUDIT_WRITE` in the host's user namespace). The names in a record (paths,
//! `comm`) are the kernel's quoted or hex-encoded form, so a file name cannot add fields.
//!
//! The reader is a `NETLINK_AUDIT` socket bound to the read-only log group
//! (`AUDIT_NLGRP_READLOG`), beside auditd if one runs. It needs:
//! - `CAP_AUDIT_READ` in the host's user namespace (mcpbox as root, outside a container);
//! - mcpbox in the host's PID namespace (the records' pids are host pids);
//! - the audit subsystem enabled. It is off unless auditd (or `auditctl -e 1`, or the `audit=1`
//!   boot parameter) turned it on. Turning it on is a host-wide change, so mcpbox does it only
//!   when told to (`--enable-audit`), says so in its log, and leaves it on (another reader may
//!   have started meanwhile); without auditd the kernel then also prints the records it
//!   produces to its own log (rate-limited).
//!
//! Whatever is missing, mcpbox logs it once at start and `mcpbox doctor` shows it; the servers
//! are refused exactly as before, only their Landlock denials are not reported.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::socket::{self, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType};

use crate::denials::{Denial, Layer};

const AUDIT_GET: u16 = 1000;
const AUDIT_SET: u16 = 1001;
const AUDIT_STATUS_ENABLED: u32 = 1;
const NLMSG_ERROR: u16 = 2;
pub const AUDIT_LANDLOCK_ACCESS: u16 = 1423;
pub const AUDIT_LANDLOCK_DOMAIN: u16 = 1424;
/// `AUDIT_NLGRP_READLOG` (group 1) as a bind mask.
const READLOG_GROUPS: u32 = 1;

/// Sandboxes remembered by their server process's host pid, and domains by their id: bounded,
/// the oldest forgotten first.
const MAX_CREATORS: usize = 4096;
const MAX_DOMAINS: usize = 4096;
/// Access records waiting for their domain record (which follows them in the same event).
const MAX_PENDING: usize = 64;

/// What `--enable-audit` asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enable {
    /// Read the records if the audit subsystem is on; never turn it on.
    IfOn,
    /// Turn the audit subsystem on if it is off (host-wide), then read.
    Yes,
}

/// Whether Landlock denials are reported by this process, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Reading { enabled_by_us: bool },
    Unavailable(String),
}

impl Status {
    pub fn describe(&self) -> String {
        match self {
            Status::Reading { enabled_by_us: false } => {
                "every path a server's Landlock domain refuses is read from the kernel's audit records, logged, counted and recorded".into()
            }
            Status::Reading { enabled_by_us: true } => "every path a server's Landlock domain refuses is read from the kernel's audit records (mcpbox turned the audit subsystem on: --enable-audit), logged, counted and recorded".into(),
            Status::Unavailable(why) => format!("not reported: {why}"),
        }
    }
}

/// Whose a sandbox is: the server's name and, when it was started for one, the session's id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub server: String,
    pub session: Option<String>,
}

#[derive(Default)]
struct Watch {
    /// Host pid of a server process that applied Landlock → its server (and session).
    creators: HashMap<u32, Owner>,
    creator_order: VecDeque<u32>,
    /// When the sandbox of a creator pid ended (seconds since the epoch, the audit clock): a
    /// domain that pid creates after that is another process's that got the pid again.
    ended: HashMap<u32, f64>,
    /// Domain id → its server (and session).
    domains: HashMap<String, Owner>,
    domain_order: VecDeque<String>,
    /// Access records of domains not known yet: (event serial, domain, denials).
    pending: VecDeque<(String, String, Vec<Denial>)>,
    running: bool,
    /// When a record of one of our sandboxes' domains last arrived.
    last_record: Option<Instant>,
    /// Domains whose creator was not (yet) one of our sandboxes: (creator pid, domain, when).
    unclaimed: VecDeque<(u32, String, Instant)>,
    /// Settle marks sent, and the highest one the reader has seen come back (see [`settle`]).
    marks_sent: u64,
    marks_seen: u64,
}

fn watch() -> &'static (Mutex<Watch>, Condvar) {
    static W: OnceLock<(Mutex<Watch>, Condvar)> = OnceLock::new();
    W.get_or_init(Default::default)
}

fn lock() -> std::sync::MutexGuard<'static, Watch> {
    watch().0.lock().unwrap_or_else(|e| e.into_inner())
}

/// The server process of a sandbox of `server` applied Landlock as host pid `pid`: its domain's
/// denials are `server`'s. Called for every sandbox started, whether a reader runs or not
/// (cheap, bounded); again with the session by the supervisor, once it knows it.
pub fn sandbox_started(pid: u32, server: &str, session: Option<&str>) {
    if server.is_empty() || pid == 0 {
        return;
    }
    let owner = Owner { server: server.to_string(), session: session.map(str::to_owned) };
    let mut w = lock();
    w.ended.remove(&pid);
    if w.creators.insert(pid, owner.clone()).is_none() {
        w.creator_order.push_back(pid);
        while w.creator_order.len() > MAX_CREATORS {
            if let Some(old) = w.creator_order.pop_front() {
                w.creators.remove(&old);
                w.ended.remove(&old);
            }
        }
    }
    // A domain this server created, read before its start was (see `handle`): its records are
    // the server's. Only a recent one: an old record of the same pid was another process's.
    let recent = Duration::from_secs(5);
    let mut claimed = Vec::new();
    w.unclaimed.retain(|(p, domain, at)| {
        if *p == pid && at.elapsed() < recent {
            claimed.push(domain.clone());
            false
        } else {
            at.elapsed() < recent
        }
    });
    let mut denials = Vec::new();
    for domain in claimed {
        if w.domains.insert(domain.clone(), owner.clone()).is_none() {
            w.domain_order.push_back(domain.clone());
        }
        w.pending.retain(|(_, d, waiting)| {
            if *d == domain {
                denials.extend(waiting.iter().cloned());
                false
            } else {
                true
            }
        });
    }
    drop(w);
    for d in denials {
        crate::denials::registry().server(&owner.server, None).record(owner.session.as_deref(), None, d);
    }
}

/// The sandbox whose server process was host pid `pid` has ended, every process of it gone: a
/// Landlock domain created by a process with that pid from now on is not its (the pid may be
/// reused, by anything, another server's process included). Records made before the end and
/// read after it still count.
pub fn sandbox_ended(pid: u32) {
    let mut w = lock();
    if w.creators.contains_key(&pid) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        w.ended.insert(pid, now);
    }
}

/// Whether a reader runs in this process.
pub fn reading() -> bool {
    lock().running
}

/// Waits (at most `max`) until every record the kernel produced before this call has been
/// read: the records of a server that just exited are then recorded before `mcpbox run` exits.
/// The kernel hands records to readers in the order it made them, from one queue, so mcpbox
/// sends a message of its own (a user-space audit message, `AUDIT_TRUSTED_APP`, with a number
/// of this process) and waits until the reader sees it come back. A fixed quiet time is not
/// enough: on a loaded host the kernel's audit thread may take longer than any short wait.
/// Where the message cannot be sent, it waits until no record of our sandboxes has come for
/// 50 ms. Returns at once when no reader runs. False when `max` ran out first.
pub fn settle(max: Duration) -> bool {
    if !reading() {
        return true;
    }
    let start = Instant::now();
    let mark = {
        let mut w = lock();
        w.marks_sent += 1;
        w.marks_sent
    };
    if send_mark(mark).is_ok() {
        let mut w = lock();
        while w.running && w.marks_seen < mark {
            let Some(left) = max.checked_sub(start.elapsed()) else { return false };
            w = watch().1.wait_timeout(w, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        return true;
    }
    let quiet = Duration::from_millis(50);
    while reading() && start.elapsed() < max {
        let last = lock().last_record;
        let since = last.map_or(start.elapsed(), |l| l.elapsed().min(start.elapsed()));
        if since >= quiet {
            return true;
        }
        std::thread::sleep(quiet - since);
    }
    !reading()
}

/// `AUDIT_TRUSTED_APP`: a user-space message of free text (root may send it: CAP_AUDIT_WRITE).
const AUDIT_TRUSTED_APP: u16 = 1121;

fn mark_text(mark: u64) -> String {
    format!("mcpbox-settle={}-{mark}", std::process::id())
}

fn send_mark(mark: u64) -> Result<(), nix::errno::Errno> {
    let fd = socket::socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkAudit)?;
    ask(&fd, &nlmsg(AUDIT_TRUSTED_APP, NLM_F_REQUEST | NLM_F_ACK, &mark_payload(mark)), NLMSG_ERROR).map(|_| ())
}

/// The text of a settle mark as the kernel takes it: a C string. The kernel drops the last byte
/// of a user message's text as its terminator, whatever it is; without one, the mark's last
/// digit was lost, the reader never saw the mark come back, and `mcpbox run` waited out the
/// whole settle time at every exit on a host with audit on.
fn mark_payload(mark: u64) -> Vec<u8> {
    let mut text = mark_text(mark).into_bytes();
    text.push(0);
    text
}

/// The number of this process's settle mark in the text of a user-space message, if it is one.
fn mark_in(text: &str) -> Option<u64> {
    let prefix = format!("mcpbox-settle={}-", std::process::id());
    let rest = &text[text.find(&prefix)? + prefix.len()..];
    rest[..rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len())].parse().ok()
}

/// What this host and process allow, without starting anything (for `mcpbox doctor`):
/// `enable` says whether mcpbox would turn audit on.
pub fn probe(enable: Enable) -> Status {
    match open(enable, false) {
        Ok((_, enabled_by_us)) => Status::Reading { enabled_by_us },
        Err(why) => Status::Unavailable(why),
    }
}

/// Starts the reader thread (once per process). The caller logs why not, at its own level.
pub fn start(enable: Enable) -> Status {
    if reading() {
        return Status::Reading { enabled_by_us: false };
    }
    let status = match open(enable, true) {
        Ok((sock, enabled_by_us)) => {
            if enabled_by_us {
                tracing::warn!(
                    "turned the kernel's audit subsystem on (--enable-audit), host-wide, so that Landlock denials are \
                     reported; it stays on after mcpbox exits (`auditctl -e 0` turns it off), without auditd \
                     the kernel also prints its audit records to the kernel log, and it keeps per-syscall audit \
                     state for processes started meanwhile (a cost on the whole host)"
                );
            }
            lock().running = true;
            let spawned = std::thread::Builder::new().name("mcpbox-audit".into()).spawn(move || read_loop(sock));
            match spawned {
                Ok(_) => Status::Reading { enabled_by_us },
                Err(e) => {
                    lock().running = false;
                    Status::Unavailable(format!("cannot start the audit reader thread: {e}"))
                }
            }
        }
        Err(why) => Status::Unavailable(why),
    };
    if let Status::Reading { .. } = &status {
        tracing::info!("Landlock denials: {}", status.describe());
    }
    status
}

/// The multicast socket (when `bind`), after checking the ABI, the PID namespace and the audit
/// state (turning it on if `enable` says so and `bind`: a probe changes nothing).
fn open(enable: Enable, bind: bool) -> Result<(Option<OwnedFd>, bool), String> {
    let abi = super::sys::landlock_abi();
    if abi < super::landlock::LOG_ABI {
        return Err(format!("Landlock ABI {abi} logs no denials (needs ABI {}, Linux 6.15)", super::landlock::LOG_ABI));
    }
    if !in_host_pid_namespace() {
        return Err("mcpbox is not in the host's PID namespace, where the audit records name processes".into());
    }
    let nl = || {
        socket::socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkAudit)
            .map_err(|e| format!("cannot open an audit netlink socket: {e}"))
    };
    let ctl = nl()?;
    let enabled = match audit_enabled(&ctl) {
        Ok(e) => e,
        Err(nix::errno::Errno::EPERM) | Err(nix::errno::Errno::ECONNREFUSED) => {
            return Err("mcpbox may not read the kernel's audit state (needs root with CAP_AUDIT_CONTROL and CAP_AUDIT_READ in the host's user namespace: not rootless, not in a container)".into())
        }
        Err(e) => return Err(format!("cannot read the kernel's audit state: {e}")),
    };
    let mut enabled_by_us = false;
    if enabled == 0 {
        if enable != Enable::Yes {
            return Err("the kernel's audit subsystem is off (no auditd runs); `--enable-audit` lets mcpbox turn it on (host-wide), or run auditd / `auditctl -e 1`".into());
        }
        if bind {
            set_enabled(&ctl).map_err(|e| format!("cannot turn the kernel's audit subsystem on: {e}"))?;
        }
        enabled_by_us = true;
    }
    let sock = nl()?;
    socket::bind(sock.as_raw_fd(), &NetlinkAddr::new(0, READLOG_GROUPS)).map_err(|e| match e {
        nix::errno::Errno::EPERM => "mcpbox may not read the audit log (needs CAP_AUDIT_READ)".to_string(),
        e => format!("cannot join the audit log's netlink group: {e}"),
    })?;
    // Bound only to check that it can be; a probe drops it.
    Ok((bind.then_some(sock), enabled_by_us))
}

fn in_host_pid_namespace() -> bool {
    // `NSpid:` lists one pid per namespace level: one means the initial namespace.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("NSpid:")).map(|l| l.split_whitespace().count() == 2))
        .unwrap_or(false)
}

fn nlmsg(ty: u16, flags: u16, payload: &[u8]) -> Vec<u8> {
    let len = 16 + payload.len();
    let mut m = Vec::with_capacity(len);
    m.extend((len as u32).to_ne_bytes());
    m.extend(ty.to_ne_bytes());
    m.extend(flags.to_ne_bytes());
    m.extend(1u32.to_ne_bytes()); // seq
    m.extend(0u32.to_ne_bytes()); // port id: the kernel
    m.extend(payload);
    m
}

const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;

/// Sends `msg` to the kernel and returns the answers' (type, payload) until the one wanted.
fn ask(fd: &OwnedFd, msg: &[u8], want: u16) -> Result<Vec<u8>, nix::errno::Errno> {
    let _ = socket::setsockopt(fd, socket::sockopt::ReceiveTimeout, &nix::sys::time::TimeVal::new(2, 0));
    socket::sendto(fd.as_raw_fd(), msg, &NetlinkAddr::new(0, 0), MsgFlags::empty())?;
    let mut buf = vec![0u8; 8192];
    for _ in 0..8 {
        let n = socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        for (ty, payload) in messages(&buf[..n]) {
            if ty == NLMSG_ERROR && payload.len() >= 4 {
                let err = i32::from_ne_bytes(payload[..4].try_into().unwrap());
                if err != 0 {
                    return Err(nix::errno::Errno::from_raw(-err));
                }
                if want == NLMSG_ERROR {
                    return Ok(Vec::new());
                }
            } else if ty == want {
                return Ok(payload.to_vec());
            }
        }
    }
    Err(nix::errno::Errno::EIO)
}

/// The netlink messages in `buf` as (type, payload); stops at the first malformed header.
fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut off = 0;
    std::iter::from_fn(move || {
        let head = buf.get(off..off + 16)?;
        let len = u32::from_ne_bytes(head[..4].try_into().unwrap()) as usize;
        let ty = u16::from_ne_bytes(head[4..6].try_into().unwrap());
        if len < 16 || off + len > buf.len() {
            return None;
        }
        let payload = &buf[off + 16..off + len];
        off += (len + 3) & !3;
        Some((ty, payload))
    })
}

/// `struct audit_status.enabled`: 0 off, 1 on, 2 on and locked.
fn audit_enabled(fd: &OwnedFd) -> Result<u32, nix::errno::Errno> {
    let status = ask(fd, &nlmsg(AUDIT_GET, NLM_F_REQUEST, &[]), AUDIT_GET)?;
    if status.len() < 8 {
        return Err(nix::errno::Errno::EIO);
    }
    Ok(u32::from_ne_bytes(status[4..8].try_into().unwrap()))
}

fn set_enabled(fd: &OwnedFd) -> Result<(), nix::errno::Errno> {
    // struct audit_status: mask, enabled, then fields the mask leaves alone.
    let mut status = [0u8; 40];
    status[..4].copy_from_slice(&AUDIT_STATUS_ENABLED.to_ne_bytes());
    status[4..8].copy_from_slice(&1u32.to_ne_bytes());
    ask(fd, &nlmsg(AUDIT_SET, NLM_F_REQUEST | NLM_F_ACK, &status), NLMSG_ERROR).map(|_| ())
}

/// Landlock denials recorded per second at most, over all servers: each distinct one rewrites a
/// record file, and a server can make the kernel refuse as fast as it can ask (unlike seccomp's,
/// the reader cannot make it wait). The rest are dropped, counted in one log line per second.
const MAX_PER_SECOND: u32 = 1000;
/// Denials recorded per second for one server: a server that floods cannot use up the whole
/// budget and hide the others'.
const MAX_PER_SECOND_PER_SERVER: u32 = 200;
/// Landlock domains one server may have known at once (a server that makes domains of its own
/// without end cannot push other servers' out of the map).
const MAX_DOMAINS_PER_SERVER: usize = 256;

fn read_loop(sock: Option<OwnedFd>) {
    let Some(sock) = sock else { return };
    let mut buf = vec![0u8; 16 * 1024];
    let mut lost_logged = false;
    let (mut window, mut in_window, mut dropped) = (Instant::now(), 0u32, 0u64);
    let mut per_server: HashMap<String, u32> = HashMap::new();
    loop {
        let n = match socket::recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::ENOBUFS) => {
                if !lost_logged {
                    tracing::warn!(
                        "audit records were lost (the reader fell behind): some Landlock denials are not reported"
                    );
                    lost_logged = true;
                }
                continue;
            }
            Err(e) => {
                tracing::warn!("the audit reader stopped: {e}; Landlock denials are no longer reported");
                lock().running = false;
                watch().1.notify_all();
                return;
            }
        };
        for (ty, payload) in messages(&buf[..n]) {
            if ty == AUDIT_TRUSTED_APP {
                let text = String::from_utf8_lossy(payload);
                if let Some(mark) = mark_in(&text) {
                    let mut w = lock();
                    w.marks_seen = w.marks_seen.max(mark);
                    drop(w);
                    watch().1.notify_all();
                }
            } else if ty == AUDIT_LANDLOCK_ACCESS || ty == AUDIT_LANDLOCK_DOMAIN {
                let text = String::from_utf8_lossy(payload);
                for (owner, d) in handle(ty, text.trim_end_matches('\0')) {
                    if window.elapsed() >= Duration::from_secs(1) {
                        if dropped > 0 {
                            tracing::warn!(
                                "{dropped} Landlock denials were not recorded (at most {MAX_PER_SECOND} per second, {MAX_PER_SECOND_PER_SERVER} per server)"
                            );
                        }
                        (window, in_window, dropped) = (Instant::now(), 0, 0);
                        per_server.clear();
                    }
                    let mine = per_server.entry(owner.server.clone()).or_insert(0u32);
                    if in_window >= MAX_PER_SECOND || *mine >= MAX_PER_SECOND_PER_SERVER {
                        dropped += 1;
                        continue;
                    }
                    in_window += 1;
                    *mine += 1;
                    crate::denials::registry().server(&owner.server, None).record(owner.session.as_deref(), None, d);
                }
            }
        }
    }
}

/// One record: the denials it attributes (now, or with the access records that waited for it).
fn handle(ty: u16, text: &str) -> Vec<(Owner, Denial)> {
    let Some(rec) = parse(text) else { return Vec::new() };
    let mut w = lock();
    let Some(domain) = rec.get("domain").map(str::to_owned) else { return Vec::new() };
    if w.domains.contains_key(&domain) {
        w.last_record = Some(Instant::now());
    }
    if ty == AUDIT_LANDLOCK_DOMAIN {
        match rec.get("status") {
            Some("allocated") => {
                let pid = rec.get("pid").and_then(|p| p.parse::<u32>().ok());
                // The audit clock is the coarse wall clock: a few ms of slack.
                let after_end =
                    pid.and_then(|p| w.ended.get(&p)).is_some_and(|end| rec.time.is_none_or(|t| t > end + 0.05));
                let Some(owner) = pid.filter(|_| !after_end).and_then(|p| w.creators.get(&p)) else {
                    // Not one of ours, or one whose start mcpbox has not read yet: the server
                    // may be refused before mcpbox has its pid (it applies Landlock, reports and
                    // execs at once). Kept a few seconds for `sandbox_started`; then its
                    // waiting records go.
                    if let Some(pid) = rec.get("pid").and_then(|p| p.parse::<u32>().ok()) {
                        w.unclaimed.push_back((pid, domain, Instant::now()));
                        while w.unclaimed.len() > MAX_PENDING {
                            if let Some((_, old, _)) = w.unclaimed.pop_front() {
                                w.pending.retain(|(_, d, _)| *d != old);
                            }
                        }
                    }
                    return Vec::new();
                };
                let owner = owner.clone();
                w.last_record = Some(Instant::now());
                if !w.domains.contains_key(&domain)
                    && w.domains.values().filter(|o| o.server == owner.server).count() >= MAX_DOMAINS_PER_SERVER
                {
                    // This server has made domains without end: its new one is not followed
                    // (nor its waiting records), rather than another server's being forgotten.
                    w.pending.retain(|(_, d, _)| *d != domain);
                    return Vec::new();
                }
                if w.domains.insert(domain.clone(), owner.clone()).is_none() {
                    w.domain_order.push_back(domain.clone());
                    while w.domain_order.len() > MAX_DOMAINS {
                        if let Some(old) = w.domain_order.pop_front() {
                            w.domains.remove(&old);
                        }
                    }
                }
                let mut out = Vec::new();
                w.pending.retain(|(_, d, denials)| {
                    if *d == domain {
                        out.extend(denials.iter().map(|x| (owner.clone(), x.clone())));
                        false
                    } else {
                        true
                    }
                });
                out
            }
            Some("deallocated") => {
                w.domains.remove(&domain);
                w.domain_order.retain(|d| *d != domain);
                Vec::new()
            }
            _ => Vec::new(),
        }
    } else {
        let denials = denials_of(&rec);
        if let Some(owner) = w.domains.get(&domain) {
            let owner = owner.clone();
            return denials.into_iter().map(|d| (owner.clone(), d)).collect();
        }
        w.pending.push_back((rec.serial.clone(), domain, denials));
        while w.pending.len() > MAX_PENDING {
            w.pending.pop_front();
        }
        Vec::new()
    }
}

/// A record's text: `audit(SECONDS.MS:SERIAL): key=value …`.
#[derive(Debug)]
struct Record {
    serial: String,
    /// When the kernel made it (seconds since the epoch).
    time: Option<f64>,
    fields: Vec<(String, String)>,
}

impl Record {
    fn get(&self, key: &str) -> Option<&str> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

fn parse(text: &str) -> Option<Record> {
    let rest = text.strip_prefix("audit(")?;
    let (stamp, rest) = rest.split_once("): ")?;
    let serial = stamp.rsplit(':').next()?.to_string();
    let time = stamp.split(':').next().and_then(|t| t.parse::<f64>().ok());
    let fields = rest
        .split_ascii_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), value(k, v)))
        .collect();
    Some(Record { serial, time, fields })
}

/// An audit value: `"quoted"` (printable, no space or quote), or, for a string the kernel
/// considers untrusted (paths, names) that has other bytes, hex; numbers and ids as they are.
fn value(key: &str, v: &str) -> String {
    if let Some(q) = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        return q.to_string();
    }
    let untrusted = matches!(key, "path" | "name" | "exe" | "comm" | "ocomm");
    if untrusted && v.len().is_multiple_of(2) && !v.is_empty() && v.bytes().all(|b| b.is_ascii_hexdigit()) {
        let bytes: Vec<u8> =
            (0..v.len()).step_by(2).filter_map(|i| u8::from_str_radix(&v[i..i + 2], 16).ok()).collect();
        return String::from_utf8_lossy(&bytes).into_owned();
    }
    v.to_string()
}

/// The access a blocker stands for, in a policy's words (`read`, `write`, `exec` for paths).
fn access_of(blocker: &str) -> &str {
    match blocker {
        "fs.execute" => "exec",
        "fs.read_file" | "fs.read_dir" => "read",
        b if b.starts_with("fs.") => "write",
        "net.connect_tcp" | "net.connect_send_udp" => "connect",
        "net.bind_tcp" | "net.bind_udp" => "bind",
        "scope.signal" => "signal",
        "scope.abstract_unix_socket" => "connect-abstract-socket",
        other => other,
    }
}

/// One denial per distinct access of an access record's blockers.
fn denials_of(rec: &Record) -> Vec<Denial> {
    let blockers = rec.get("blockers").unwrap_or("");
    let object = if let Some(p) = rec.get("path") {
        p.to_string()
    } else if let Some(port) = rec.get("dest").or(rec.get("dport")) {
        format!("{}:{port}", rec.get("daddr").unwrap_or("*"))
    } else if let Some(port) = rec.get("src").or(rec.get("lport")) {
        format!("{}:{port}", rec.get("saddr").unwrap_or("*"))
    } else if let Some(pid) = rec.get("opid") {
        format!("pid {pid} ({})", rec.get("ocomm").unwrap_or("?"))
    } else {
        String::new()
    };
    let mut out: Vec<Denial> = Vec::new();
    for b in blockers.split(',').filter(|b| !b.is_empty()) {
        let access = access_of(b);
        if let Some(d) = out.iter_mut().find(|d| d.access == access) {
            if let Some(r) = d.reason.as_mut() {
                r.push(',');
                r.push_str(b);
            }
            continue;
        }
        out.push(Denial {
            layer: Layer::Landlock,
            access: access.to_string(),
            object: object.clone(),
            reason: Some(format!("not granted by the policy; Landlock blockers={b}")),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netlink_messages_stop_at_a_header_that_lies_about_its_length() {
        let mut buf = nlmsg(AUDIT_LANDLOCK_ACCESS, 0, b"abc");
        buf.resize(buf.len().next_multiple_of(4), 0);
        buf.extend(nlmsg(AUDIT_TRUSTED_APP, 0, b"xy"));
        let got: Vec<(u16, Vec<u8>)> = messages(&buf).map(|(t, p)| (t, p.to_vec())).collect();
        assert_eq!(got, vec![(AUDIT_LANDLOCK_ACCESS, b"abc".to_vec()), (AUDIT_TRUSTED_APP, b"xy".to_vec())]);
        let mut bad = nlmsg(AUDIT_LANDLOCK_ACCESS, 0, b"abc");
        bad[..4].copy_from_slice(&4096u32.to_ne_bytes());
        assert_eq!(messages(&bad).count(), 0);
        bad[..4].copy_from_slice(&3u32.to_ne_bytes());
        assert_eq!(messages(&bad).count(), 0);
    }

    #[test]
    fn a_settle_mark_is_sent_as_a_c_string_and_read_back_whole() {
        let payload = mark_payload(12);
        assert_eq!(payload.last(), Some(&0), "the kernel drops the text's last byte as its terminator");
        // What the kernel logs: the text without that byte.
        let logged = format!(
            "audit(1796565033.326:7834): pid=1 uid=0 auid=4294967295 ses=4294967295 msg='{}'",
            String::from_utf8_lossy(&payload[..payload.len() - 1])
        );
        assert_eq!(mark_in(&logged), Some(12));
    }

    #[test]
    fn a_settle_mark_is_read_back_only_from_this_process() {
        let text = format!("pid=1 uid=0 auid=4294967295 ses=4294967295 msg='{}'", mark_text(42));
        assert_eq!(mark_in(&text), Some(42));
        let other = format!("msg='mcpbox-settle={}-42'", std::process::id() + 1);
        assert_eq!(mark_in(&other), None);
        assert_eq!(mark_in("msg='mcpbox-settle='"), None);
    }

    #[test]
    fn records_are_attributed_through_the_domain_record_that_follows_them() {
        sandbox_started(4_000_001, "srv-a", None);
        sandbox_started(4_000_001, "srv-a", Some("sess-1"));
        let access =
            "audit(1729738800.221:33): domain=1a6fdc679 blockers=fs.execute path=\"/opt/tool/run.sh\" dev=\"vda2\" ino=9";
        // The first access record of a domain comes before its domain record: it waits.
        assert!(handle(AUDIT_LANDLOCK_ACCESS, access).is_empty());
        let dom = "audit(1729738800.221:33): domain=1a6fdc679 status=allocated mode=enforcing pid=4000001 uid=0 exe=\"/usr/bin/mcpbox\" comm=\"mcpbox\"";
        let got = handle(AUDIT_LANDLOCK_DOMAIN, dom);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, Owner { server: "srv-a".into(), session: Some("sess-1".into()) });
        assert_eq!((got[0].1.access.as_str(), got[0].1.object.as_str()), ("exec", "/opt/tool/run.sh"));
        assert_eq!(got[0].1.layer, Layer::Landlock);
        // Later records of the domain are attributed at once; two blockers of one access make one denial.
        let got = handle(
            AUDIT_LANDLOCK_ACCESS,
            "audit(1729738801.0:34): domain=1a6fdc679 blockers=fs.make_reg,fs.refer path=2F746D702F61206220 dev=\"x\" ino=1",
        );
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].1.access.as_str(), got[0].1.object.as_str()), ("write", "/tmp/a b "));
        assert!(got[0].1.reason.as_deref().unwrap().contains("fs.make_reg,fs.refer"));
        // Once deallocated, the domain is forgotten.
        handle(AUDIT_LANDLOCK_DOMAIN, "audit(1729738802.0:35): domain=1a6fdc679 status=deallocated denials=2");
        assert!(handle(AUDIT_LANDLOCK_ACCESS, "audit(1.0:36): domain=1a6fdc679 blockers=fs.read_file path=\"/x\"")
            .is_empty());
    }

    #[test]
    fn a_domain_made_by_a_reused_pid_after_its_sandbox_ended_is_not_that_servers() {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        sandbox_started(4_000_010, "srv-b", None);
        // A record the kernel made before the end, read after it: still srv-b's.
        let early = format!(
            "audit({:.3}:50): domain=reuse1 status=allocated mode=enforcing pid=4000010 uid=0 exe=\"/x\" comm=\"x\"",
            now - 1.0
        );
        sandbox_ended(4_000_010);
        handle(AUDIT_LANDLOCK_DOMAIN, &early);
        let got = handle(AUDIT_LANDLOCK_ACCESS, "audit(1.0:51): domain=reuse1 blockers=fs.read_file path=\"/a\"");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.server, "srv-b");
        // Another process that got the pid later (here: another server's child) makes a domain.
        let late = format!(
            "audit({:.3}:52): domain=reuse2 status=allocated mode=enforcing pid=4000010 uid=0 exe=\"/x\" comm=\"x\"",
            now + 1.0
        );
        handle(AUDIT_LANDLOCK_DOMAIN, &late);
        assert!(
            handle(AUDIT_LANDLOCK_ACCESS, "audit(1.0:53): domain=reuse2 blockers=fs.read_file path=\"/b\"").is_empty()
        );
        // A new sandbox of ours that gets the pid is attributed again.
        sandbox_started(4_000_010, "srv-c", None);
        let again = format!(
            "audit({:.3}:54): domain=reuse3 status=allocated mode=enforcing pid=4000010 uid=0 exe=\"/x\" comm=\"x\"",
            now + 2.0
        );
        handle(AUDIT_LANDLOCK_DOMAIN, &again);
        let got = handle(AUDIT_LANDLOCK_ACCESS, "audit(1.0:55): domain=reuse3 blockers=fs.read_file path=\"/c\"");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.server, "srv-c");
    }

    #[test]
    fn a_server_making_domains_without_end_cannot_push_another_servers_out() {
        sandbox_started(4_000_020, "srv-good", None);
        sandbox_started(4_000_021, "srv-evil", None);
        let dom = |d: &str, pid: u32| {
            format!("audit(1.0:60): domain={d} status=allocated mode=enforcing pid={pid} uid=0 exe=\"/x\" comm=\"x\"")
        };
        handle(AUDIT_LANDLOCK_DOMAIN, &dom("600d", 4_000_020));
        for i in 0..(MAX_DOMAINS + 10) {
            handle(AUDIT_LANDLOCK_DOMAIN, &dom(&format!("evil{i}"), 4_000_021));
        }
        let evil = lock().domains.values().filter(|o| o.server == "srv-evil").count();
        assert_eq!(evil, MAX_DOMAINS_PER_SERVER);
        let got = handle(AUDIT_LANDLOCK_ACCESS, "audit(1.0:61): domain=600d blockers=fs.read_file path=\"/g\"");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.server, "srv-good");
    }

    #[test]
    fn domains_mcpbox_did_not_create_are_ignored() {
        sandbox_started(4_000_002, "srv-b", None);
        let access = "audit(1.0:40): domain=2b blockers=fs.read_file path=\"/etc/shadow\" dev=\"vda2\" ino=9";
        assert!(handle(AUDIT_LANDLOCK_ACCESS, access).is_empty());
        // Created by another process (a server's own nested domain, another program).
        let dom = "audit(1.0:40): domain=2b status=allocated mode=enforcing pid=4000003 uid=0 exe=\"/x\" comm=\"x\"";
        assert!(handle(AUDIT_LANDLOCK_DOMAIN, dom).is_empty());
        // Another sandbox's start does not claim it.
        sandbox_started(4_000_002, "srv-b", Some("s"));
        assert!(!lock().domains.contains_key("2b"));
        assert!(handle(AUDIT_LANDLOCK_ACCESS, access).is_empty());
    }

    #[test]
    fn a_domain_read_before_its_sandboxs_start_is_claimed_by_that_start() {
        // The server applied Landlock, reported and was refused at once: the kernel's records
        // reach the reader before mcpbox has read the report with the server's pid.
        let access = "audit(2.0:50): domain=3c blockers=fs.read_file path=\"/srv/secret\" dev=\"vda2\" ino=9";
        assert!(handle(AUDIT_LANDLOCK_ACCESS, access).is_empty());
        let dom = "audit(2.0:50): domain=3c status=allocated mode=enforcing pid=4000004 uid=0 exe=\"/x\" comm=\"x\"";
        assert!(handle(AUDIT_LANDLOCK_DOMAIN, dom).is_empty());
        sandbox_started(4_000_004, "srv-c", None);
        let w = lock();
        assert_eq!(w.domains.get("3c").map(|o| o.server.as_str()), Some("srv-c"));
        assert!(w.pending.iter().all(|(_, d, _)| d != "3c"), "its waiting records were recorded");
        drop(w);
        // Later records of the domain are attributed at once.
        let got = handle(AUDIT_LANDLOCK_ACCESS, access);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.server, "srv-c");
    }

    #[test]
    fn hostile_file_names_cannot_inject_fields() {
        // A name with a space or a quote is printed in hex by the kernel: it stays one value.
        let name = "/tmp/x\" blockers=fs.execute path=\"/etc";
        let hex: String = name.bytes().map(|b| format!("{b:02X}")).collect();
        let rec = parse(&format!("audit(1.0:1): domain=3c blockers=fs.read_file path={hex} dev=\"d\" ino=1")).unwrap();
        let d = denials_of(&rec);
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].access.as_str(), d[0].object.as_str()), ("read", name));
        assert!(parse("garbage").is_none());
        assert!(parse("audit(1.0:1): ").unwrap().fields.is_empty());
    }

    #[test]
    fn network_and_scope_blockers_name_their_object() {
        let rec = parse("audit(1.0:1): domain=4 blockers=net.connect_tcp daddr=127.0.0.1 dest=8080").unwrap();
        let d = denials_of(&rec);
        assert_eq!((d[0].access.as_str(), d[0].object.as_str()), ("connect", "127.0.0.1:8080"));
        let rec = parse("audit(1.0:1): domain=4 blockers=scope.signal opid=1 ocomm=\"systemd\"").unwrap();
        assert_eq!(denials_of(&rec)[0].access, "signal");
    }
}

//! Starting `sandbox-init` from the supervisor side. No privileged work happens here: this file
//! builds a `Command` for our own binary in its hidden mode, hands it the spec on an inherited
//! pipe, and reads back the start report (or the setup error) from a close-on-exec socket.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::init::Msg;
use super::SandboxSpec;
use crate::policy::Level;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot start sandbox-init: {0}")]
    Spawn(#[source] std::io::Error),
    /// Setup failed inside sandbox-init; the message names the layer and the fix.
    #[error("sandbox setup failed: {0}")]
    Setup(String),
    #[error("sandbox-init exited before the server started (status {0})")]
    Died(String),
    #[error("the sandbox spawner thread is gone")]
    SpawnerGone,
}

/// What sandbox-init reports once the server is about to `execve`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartReport {
    pub level: Level,
    /// Landlock ABI actually enforced (0: none).
    pub landlock_abi: u8,
    /// Every weakening, one sentence each; logged by the caller at every start.
    pub warnings: Vec<String>,
    /// How limits are enforced: "cgroup v2", "cgroup v1", "rlimit".
    pub limits: String,
    /// The sandbox's cgroup directories: per-server slots, kept and reused (see
    /// `limits::claim_slot`); nothing to remove when it exits.
    pub cgroups: Vec<std::path::PathBuf>,
    /// Host uid the server runs as.
    pub host_uid: u32,
    #[serde(skip)]
    pub start_latency: Duration,
}

/// A running sandbox started by [`Spawner`].
pub struct Sandboxed {
    /// stdin/stdout/stderr are piped.
    pub child: tokio::process::Child,
    pub report: StartReport,
    /// For network mode `proxy`: the listening socket inside the sandbox's network namespace,
    /// on which the caller serves the egress proxy.
    pub proxy_listener: Option<std::net::TcpListener>,
}

/// Starts sandboxes from one long-lived thread, so that PDEATHSIG (which fires when the parent
/// *thread* exits) only fires when mcpbox itself goes away.
#[derive(Clone)]
pub struct Spawner {
    tx: std::sync::mpsc::Sender<Job>,
}

type Reply = tokio::sync::oneshot::Sender<Result<Sandboxed, SandboxError>>;
struct Job(SandboxSpec, Reply);

impl Spawner {
    /// Must be called inside a tokio runtime.
    pub fn new() -> Self {
        let handle = tokio::runtime::Handle::current();
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("mcpbox-spawner".into())
            .spawn(move || {
                let _guard = handle.enter();
                for Job(spec, reply) in rx {
                    let _ = reply.send(spawn_tokio(&spec));
                }
            })
            .expect("starting the sandbox spawner thread");
        Spawner { tx }
    }

    pub async fn spawn(&self, spec: SandboxSpec) -> Result<Sandboxed, SandboxError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx.send(Job(spec, reply)).map_err(|_| SandboxError::SpawnerGone)?;
        rx.await.map_err(|_| SandboxError::SpawnerGone)?
    }
}

impl Default for Spawner {
    fn default() -> Self {
        Self::new()
    }
}

/// Descriptors handed to sandbox-init; the parent keeps `spec_w` and `report`.
struct Channels {
    spec_r: OwnedFd,
    spec_w: OwnedFd,
    report: OwnedFd,
    child_report: OwnedFd,
}

/// Move a descriptor to number 10 or above, close-on-exec, so that `pre_exec` can dup2 it to
/// 3 or 4 without clobbering anything.
fn high(fd: OwnedFd) -> std::io::Result<OwnedFd> {
    let n = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10))?;
    super::sys::adopt_fd(n)
}

fn channels() -> std::io::Result<Channels> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    // The spec goes down a pipe, written once sandbox-init is already starting (see `Pending`).
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (a, b) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?;
    // A sandbox-init that never reports must not hang the spawner forever.
    nix::sys::socket::setsockopt(&a, nix::sys::socket::sockopt::ReceiveTimeout, &nix::sys::time::TimeVal::new(30, 0))?;
    Ok(Channels { spec_r: high(r)?, spec_w: w, report: a, child_report: high(b)? })
}

fn command(ch: &Channels) -> Command {
    let mut cmd = Command::new("/proc/self/exe");
    cmd.args(["sandbox-init", "--spec-fd", "3", "--report-fd", "4"]).env_clear();
    let parent = std::process::id() as i32;
    let (spec_fd, report_fd): (RawFd, RawFd) = (ch.spec_r.as_raw_fd(), ch.child_report.as_raw_fd());
    // SAFETY: the closure only makes async-signal-safe calls (prctl, getppid, setsid, dup2,
    // _exit) on values captured before the fork; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::_exit(125);
            }
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::dup2(spec_fd, 3) < 0 || libc::dup2(report_fd, 4) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Hand the spec to a started sandbox-init and read its report.
fn send_spec(ch: Channels, spec: &SandboxSpec, started: Instant) -> Result<(StartReport, Option<std::net::TcpListener>), SandboxError> {
    let Channels { spec_r, spec_w, report, child_report } = ch;
    drop(child_report);
    drop(spec_r);
    let bytes = serde_json::to_vec(spec).map_err(|e| SandboxError::Spawn(std::io::Error::other(e)))?;
    // sandbox-init reads until end of file; closing our end is that end.
    std::io::Write::write_all(&mut std::fs::File::from(spec_w), &bytes).map_err(SandboxError::Spawn)?;
    let (mut r, l) = read_report(&report)?;
    r.start_latency = started.elapsed();
    Ok((r, l))
}

/// Read sandbox-init's messages until the socket closes (the server exec'd, or setup died).
fn read_report(sock: &OwnedFd) -> Result<(StartReport, Option<std::net::TcpListener>), SandboxError> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut ready = None;
    let mut failure = None;
    let mut listener = None;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let mut cmsg = nix::cmsg_space!([RawFd; 1]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let (n, fds) = match recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(m) => {
                let mut fds = Vec::new();
                if let Ok(cms) = m.cmsgs() {
                    for c in cms {
                        if let ControlMessageOwned::ScmRights(v) = c {
                            fds.extend(v);
                        }
                    }
                }
                (m.bytes, fds)
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(SandboxError::Setup(format!("reading sandbox-init's report: {e}"))),
        };
        let fds: Vec<OwnedFd> = fds.into_iter().filter_map(|fd| super::sys::adopt_fd(fd).ok()).collect();
        if n == 0 {
            break;
        }
        match serde_json::from_slice::<Msg>(&buf[..n]) {
            Ok(Msg::Proxy) => {
                if let Some(fd) = fds.into_iter().next() {
                    listener = Some(std::net::TcpListener::from(fd));
                }
            }
            Ok(Msg::Ready(r)) => ready = Some(r),
            Ok(Msg::Error { message }) => failure = Some(message),
            Err(e) => failure = Some(format!("unreadable report from sandbox-init: {e}")),
        }
    }
    match (failure, ready) {
        (Some(m), _) => Err(SandboxError::Setup(m)),
        (None, Some(r)) => Ok((r, listener)),
        (None, None) => Err(SandboxError::Died("no report".into())),
    }
}

fn spawn_tokio(spec: &SandboxSpec) -> Result<Sandboxed, SandboxError> {
    let started = Instant::now();
    let ch = channels().map_err(SandboxError::Spawn)?;
    let mut cmd = tokio::process::Command::from(command(&ch));
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let mut child = cmd.spawn().map_err(SandboxError::Spawn)?;
    match send_spec(ch, spec, started) {
        Ok((report, proxy_listener)) => Ok(Sandboxed { child, report, proxy_listener }),
        Err(e) => {
            let _ = child.start_kill();
            Err(e)
        }
    }
}

/// A sandbox-init started before its spec is known (`mcpbox run` starts it first thing, so that
/// loading the binary overlaps with planning). Dropped without [`Pending::send`], it reads an
/// empty spec and exits without doing anything.
pub struct Pending {
    child: Option<std::process::Child>,
    ch: Option<Channels>,
    started: Instant,
}

impl Pending {
    /// Start sandbox-init from the calling thread with the given stdio.
    pub fn start(stdin: Stdio, stdout: Stdio, stderr: Stdio) -> Result<Pending, SandboxError> {
        let started = Instant::now();
        let ch = channels().map_err(SandboxError::Spawn)?;
        let mut cmd = command(&ch);
        cmd.stdin(stdin).stdout(stdout).stderr(stderr);
        let child = cmd.spawn().map_err(SandboxError::Spawn)?;
        Ok(Pending { child: Some(child), ch: Some(ch), started })
    }

    /// Give sandbox-init its spec; returns once the server was exec'd (or setup failed).
    pub fn send(mut self, spec: &SandboxSpec) -> Result<(std::process::Child, StartReport, Option<std::net::TcpListener>), SandboxError> {
        let (mut child, ch) = (self.child.take().expect("sent once"), self.ch.take().expect("sent once"));
        match send_spec(ch, spec, self.started) {
            Ok((report, l)) => Ok((child, report, l)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // Closing the spec pipe unsent makes sandbox-init exit at once; reap it.
        self.ch.take();
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

/// For `doctor` and `prepare`: start sandbox-init and hand it the spec at once.
pub fn spawn_blocking_std(
    spec: &SandboxSpec,
    stdin: Stdio,
    stdout: Stdio,
    stderr: Stdio,
) -> Result<(std::process::Child, StartReport, Option<std::net::TcpListener>), SandboxError> {
    Pending::start(stdin, stdout, stderr)?.send(spec)
}

//! Starting `sandbox-init` from mcpbox's side (process plumbing; planning is `crate::plan`). No
//! privileged work happens here: sandbox-init is either our own binary executed in its hidden
//! mode ([`Spawner`], [`Pending::start`]: `serve`, `prepare`, `doctor`) or, for `mcpbox run`, a
//! child forked first thing in `main` ([`Pending::fork_here`]). Either way it gets the spec on
//! an inherited pipe and answers on a close-on-exec socket (wire types in `spec`).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Instant;

use super::spec::{Msg, OuterSpec, StartReport};
use super::SandboxSpec;

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
                    if let Err(Ok(mut sb)) = reply.send(spawn_tokio(&spec)) {
                        // The caller gave up waiting: the sandbox is nobody's, end it now
                        // (its PID 1 and server follow the outer process: PDEATHSIG).
                        let _ = sb.child.start_kill();
                    }
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
    // The kernel attaches the sender's credentials (its pid translated to ours) to every message:
    // the server's host pid, from its Ready report, is how its Landlock denials find it (`audit`).
    nix::sys::socket::setsockopt(&a, nix::sys::socket::sockopt::PassCred, &true)?;
    Ok(Channels { spec_r: high(r)?, spec_w: w, report: a, child_report: high(b)? })
}

fn command(ch: &Channels) -> Command {
    let mut cmd = Command::new("/proc/self/exe");
    cmd.args(["sandbox-init", "--spec-fd", "3", "--report-fd", "4"]).env_clear();
    let parent = std::process::id() as i32;
    let (spec_fd, report_fd): (RawFd, RawFd) = (ch.spec_r.as_raw_fd(), ch.child_report.as_raw_fd());
    // SAFETY: `child_setup` only makes async-signal-safe calls on values captured before the
    // fork; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || child_setup(parent, spec_fd, report_fd));
    }
    cmd
}

/// In the child, before it becomes sandbox-init (exec'd or not): die with the parent (and exit
/// 125 if it is already gone), a session of its own, the spec at fd 3 and the report socket at 4.
/// Async-signal-safe: prctl, getppid, setsid, dup2, _exit.
fn child_setup(parent: libc::pid_t, spec_fd: RawFd, report_fd: RawFd) -> std::io::Result<()> {
    // SAFETY: plain syscalls on integers.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::getppid() != parent {
            libc::_exit(125);
        }
        if libc::setsid() < 0 || libc::dup2(spec_fd, 3) < 0 || libc::dup2(report_fd, 4) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Hand the spec to a started sandbox-init (both messages, or the second if the first went
/// ahead: see `spec`) and read its report.
fn send_spec(
    ch: Channels,
    spec: &SandboxSpec,
    outer_sent: bool,
    started: Instant,
    exec: bool,
) -> Result<(StartReport, Option<std::net::TcpListener>), SandboxError> {
    let Channels { spec_r, spec_w, report, child_report } = ch;
    drop(child_report);
    drop(spec_r);
    let mut bytes = Vec::new();
    if !outer_sent {
        let mut outer = spec.outer.clone();
        // Read here for a sandbox-init exec'd now; a forked one (`run`) reads it itself while it
        // waits for the spec.
        if exec && outer.cgroup_layout.is_none() && nix::unistd::geteuid().is_root() {
            outer.cgroup_layout = Some(super::cgroup_layout());
        }
        bytes.extend(super::spec::frame(&outer));
    }
    bytes.extend(super::spec::frame(spec));
    // Our end closes after this: sandbox-init needs nothing more.
    if let Err(e) = std::io::Write::write_all(&mut std::fs::File::from(spec_w), &bytes) {
        return Err(write_failed(&report, e));
    }
    let (mut r, l) = read_report(&report, &spec.outer.name)?;
    r.start_latency = started.elapsed();
    Ok((r, l))
}

/// Writing the spec failed: sandbox-init stopped reading it, which it does when it refuses on
/// the part it already had (e.g. no namespaces and `container` level not permitted): it sends
/// its reason on the report socket and exits, possibly before we write the rest (EPIPE).
/// That reason is the error; the write error only when sandbox-init gave none.
fn write_failed(report: &OwnedFd, e: std::io::Error) -> SandboxError {
    match read_report(report, "") {
        Err(SandboxError::Setup(reason)) => SandboxError::Setup(reason),
        _ => SandboxError::Spawn(e),
    }
}

/// Read sandbox-init's messages until the socket closes (the server exec'd, or setup died).
/// A seccomp listener that arrives is served for `server` (see [`super::notify`]).
fn read_report(sock: &OwnedFd, server: &str) -> Result<(StartReport, Option<std::net::TcpListener>), SandboxError> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut ready = None;
    let mut failure = None;
    let mut listener = None;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let mut cmsg = nix::cmsg_space!([RawFd; 1], libc::ucred);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let (n, fds, sender) =
            match recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
                Ok(m) => {
                    let mut fds = Vec::new();
                    let mut sender = None;
                    if let Ok(cms) = m.cmsgs() {
                        for c in cms {
                            match c {
                                ControlMessageOwned::ScmRights(v) => fds.extend(v),
                                ControlMessageOwned::ScmCredentials(c) => sender = u32::try_from(c.pid()).ok(),
                                _ => {}
                            }
                        }
                    }
                    (m.bytes, fds, sender)
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
            Ok(Msg::SeccompNotify) => {
                if let Some(fd) = fds.into_iter().next() {
                    super::notify::start(fd, server);
                }
            }
            Ok(Msg::Ready(r)) => {
                // Sent by the server process itself, Landlock applied, just before its execve.
                if let Some(pid) = sender {
                    super::audit::sandbox_started(pid, server, None);
                }
                ready = Some(StartReport { server_pid: sender, ..r })
            }
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
    match send_spec(ch, spec, false, started, true) {
        Ok((report, proxy_listener)) => Ok(Sandboxed { child, report, proxy_listener }),
        Err(e) => {
            let _ = child.start_kill();
            Err(e)
        }
    }
}

/// The sandbox-init process behind a [`Pending`]: our child, either a fresh image of our binary
/// in its hidden mode or (`mcpbox run`) a fork of ourselves made before anything else ran.
pub enum InitProcess {
    Exec(std::process::Child),
    Forked { pid: nix::unistd::Pid, status: Option<std::process::ExitStatus> },
}

impl InitProcess {
    pub fn id(&self) -> u32 {
        match self {
            InitProcess::Exec(c) => c.id(),
            InitProcess::Forked { pid, .. } => pid.as_raw() as u32,
        }
    }

    /// Its exit status if it has exited (reaping it), `None` while it runs.
    pub fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.wait_flags(Some(nix::sys::wait::WaitPidFlag::WNOHANG))
    }

    pub fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        loop {
            if let Some(s) = self.wait_flags(None)? {
                return Ok(s);
            }
        }
    }

    pub fn kill(&mut self) -> std::io::Result<()> {
        match self {
            InitProcess::Exec(c) => c.kill(),
            InitProcess::Forked { status: Some(_), .. } => Ok(()),
            InitProcess::Forked { pid, .. } => Ok(nix::sys::signal::kill(*pid, nix::sys::signal::Signal::SIGKILL)?),
        }
    }

    fn wait_flags(
        &mut self,
        flags: Option<nix::sys::wait::WaitPidFlag>,
    ) -> std::io::Result<Option<std::process::ExitStatus>> {
        use nix::sys::wait::{waitpid, WaitStatus};
        use std::os::unix::process::ExitStatusExt;
        let (pid, status) = match self {
            InitProcess::Exec(c) => return if flags.is_some() { c.try_wait() } else { c.wait().map(Some) },
            InitProcess::Forked { status: Some(s), .. } => return Ok(Some(*s)),
            InitProcess::Forked { pid, status } => (*pid, status),
        };
        let raw = match waitpid(pid, flags) {
            Ok(WaitStatus::Exited(_, code)) => (code & 0xff) << 8,
            Ok(WaitStatus::Signaled(_, sig, core)) => sig as i32 | if core { 0x80 } else { 0 },
            Ok(_) => return Ok(None),
            Err(nix::errno::Errno::EINTR) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        *status = Some(std::process::ExitStatus::from_raw(raw));
        Ok(*status)
    }
}

/// A sandbox-init started before its spec is known (`mcpbox run` starts it first thing, so that
/// it is ready by the time planning is done). Dropped without [`Pending::send`], it reads an
/// empty spec and exits without doing anything.
pub struct Pending {
    child: Option<InitProcess>,
    ch: Option<Channels>,
    outer_sent: Option<OuterSpec>,
    started: Instant,
}

impl Pending {
    /// Start sandbox-init (a fresh image of our binary) from the calling thread with the given stdio.
    pub fn start(stdin: Stdio, stdout: Stdio, stderr: Stdio) -> Result<Pending, SandboxError> {
        let started = Instant::now();
        let ch = channels().map_err(SandboxError::Spawn)?;
        let mut cmd = command(&ch);
        cmd.stdin(stdin).stdout(stdout).stderr(stderr);
        let child = cmd.spawn().map_err(SandboxError::Spawn)?;
        Ok(Pending { child: Some(InitProcess::Exec(child)), ch: Some(ch), outer_sent: None, started })
    }

    /// Become two processes: the caller goes on, the child is sandbox-init with our stdio.
    ///
    /// Only for `mcpbox run`, first thing in `main`: the process is single-threaded and has
    /// done nothing yet but look at its first argument, so the child holds nothing of mcpbox's
    /// state; it scrubs the environment strings it inherited from its memory before waiting for
    /// the spec, and it never returns. This saves loading our binary a second time (an exec and a
    /// C library start-up: ~0.4 ms of the ~1 ms it took here; `serve`, which has threads, and
    /// `doctor`/`prepare` use [`Pending::start`]).
    pub fn fork_here() -> Result<Pending, SandboxError> {
        let started = Instant::now();
        let ch = channels().map_err(SandboxError::Spawn)?;
        let parent = nix::unistd::getpid();
        let cpus = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).ok();
        match super::sys::fork().map_err(SandboxError::Spawn)? {
            super::sys::Forked::Child => become_init(&ch, parent, cpus),
            super::sys::Forked::Parent(pid) => {
                // The child starts on our CPU and would sit there until we block: on another
                // one, it gets ready while we plan (it takes back `cpus` when the spec comes).
                if let Some(away) = cpus.as_ref().and_then(super::init::other_cpus) {
                    let _ = nix::sched::sched_setaffinity(pid, &away);
                }
                Ok(Pending {
                    child: Some(InitProcess::Forked { pid, status: None }),
                    ch: Some(ch),
                    outer_sent: None,
                    started,
                })
            }
        }
    }

    /// Let sandbox-init start on the namespaces while the rest of the spec is worked out. The
    /// spec given to [`Pending::send`] afterwards must agree with this.
    pub fn send_outer(&mut self, outer: &OuterSpec) -> Result<(), SandboxError> {
        let ch = self.ch.as_ref().expect("not sent yet");
        assert!(self.outer_sent.is_none(), "the outer spec goes once");
        let mut w = std::fs::File::from(ch.spec_w.try_clone().map_err(SandboxError::Spawn)?);
        if let Err(e) = std::io::Write::write_all(&mut w, &super::spec::frame(outer)) {
            return Err(write_failed(&ch.report, e));
        }
        self.outer_sent = Some(outer.clone());
        Ok(())
    }

    /// Give sandbox-init its spec; returns once the server was exec'd (or setup failed).
    pub fn send(
        mut self,
        spec: &SandboxSpec,
    ) -> Result<(InitProcess, StartReport, Option<std::net::TcpListener>), SandboxError> {
        let (mut child, ch) = (self.child.take().expect("sent once"), self.ch.take().expect("sent once"));
        let exec = matches!(child, InitProcess::Exec(_));
        if let Some(sent) = &self.outer_sent {
            debug_assert_eq!(&spec.outer, sent, "the spec disagrees with the outer spec sent ahead of it");
        }
        match send_spec(ch, spec, self.outer_sent.is_some(), self.started, exec) {
            Ok((report, l)) => Ok((child, report, l)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }
}

/// The child side of [`Pending::fork_here`]: what `command`'s pre-exec step does, then
/// sandbox-init itself.
fn become_init(ch: &Channels, parent: nix::unistd::Pid, cpus: Option<nix::sched::CpuSet>) -> ! {
    use super::sys::exit_now;
    if child_setup(parent.as_raw(), ch.spec_r.as_raw_fd(), ch.child_report.as_raw_fd()).is_err()
        || super::sys::close_from(5).is_err()
    {
        exit_now(126);
    }
    scrub_environment();
    exit_now(super::init::main_forked(3, 4, cpus))
}

/// Overwrite what a forked sandbox-init inherited of mcpbox's command line and environment:
/// the environment strings are zeroed and the environment left empty (the server gets the one
/// its policy gives, from the spec), and the command line becomes `mcpbox sandbox-init`, as
/// `ps` shows it for the exec'd mode (the server's arguments belong to the server).
fn scrub_environment() {
    extern "C" {
        static mut environ: *mut *mut libc::c_char;
    }
    // arg_start, arg_end, env_start, env_end: fields 48-51 of /proc/self/stat, counted after the
    // parenthesised command name (which may hold spaces).
    let areas = std::fs::read_to_string("/proc/self/stat").ok().and_then(|st| {
        let f: Vec<usize> =
            st.rsplit_once(')')?.1.split_whitespace().skip(45).take(4).filter_map(|x| x.parse().ok()).collect();
        (f.len() == 4 && f[0] < f[1] && f[2] <= f[3]).then(|| (f[0], f[1], f[2], f[3]))
    });
    // SAFETY: single-threaded (see `Pending::fork_here`). The areas are this process's own
    // command line and environment on its initial stack, writable; `environ` is the C library's
    // NULL-terminated array of NUL-terminated strings, all owned by this process. Nothing reads
    // them afterwards.
    unsafe {
        if let Some((arg_start, arg_end, env_start, env_end)) = areas {
            std::ptr::write_bytes(env_start as *mut u8, 0, env_end - env_start);
            // Keep argv[0]; then "sandbox-init" if it fits, and zeros.
            let argv0 = libc::strlen(arg_start as *const libc::c_char) + 1;
            if arg_start + argv0 < arg_end {
                let rest = (arg_start + argv0) as *mut u8;
                let room = arg_end - arg_start - argv0;
                std::ptr::write_bytes(rest, 0, room);
                let mode = b"sandbox-init";
                if room > mode.len() {
                    std::ptr::copy_nonoverlapping(mode.as_ptr(), rest, mode.len());
                }
            }
        }
        let env = std::ptr::addr_of_mut!(environ).read();
        if !env.is_null() {
            let mut p = env;
            while !(*p).is_null() {
                let s = *p;
                std::ptr::write_bytes(s, 0, libc::strlen(s));
                p = p.add(1);
            }
            *env = std::ptr::null_mut();
        }
    }
    let _ = nix::sys::prctl::set_name(c"sandbox-init");
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
    let (child, report, l) = Pending::start(stdin, stdout, stderr)?.send(spec)?;
    match child {
        InitProcess::Exec(c) => Ok((c, report, l)),
        InitProcess::Forked { .. } => unreachable!("Pending::start execs"),
    }
}

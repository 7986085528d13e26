//! The supervisor side of `SECCOMP_RET_USER_NOTIF`: every syscall the server's filter denies
//! arrives here; it is answered `EPERM` (what the filter itself would have answered) and
//! recorded as a denial of the server ([`crate::denials`]).
//!
//! One thread per sandbox, blocked in `poll` on the listener; it ends when the last process
//! under the filter is gone (`POLLHUP`). If mcpbox goes away first, the kernel answers the
//! server's denied syscalls `ENOSYS` itself: still refused.
//!
//! Under `mcpbox policy learn` ([`crate::learn::learning`]) the filter also sends the path
//! syscalls it allows ([`super::seccomp::OBSERVED`]): their path is read from the process,
//! recorded, and the syscall continues (`SECCOMP_USER_NOTIF_FLAG_CONTINUE`). Continuing is safe
//! here only because nothing is decided: the mount view and Landlock enforce what the server
//! may reach, exactly as without the listener. A path read this way can be changed by another
//! thread before the kernel reads it again: what is recorded is what the server asked for, not
//! necessarily what it got, which only matters to the learned policy, whose paths are checked
//! against the learn view again when it is written.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::denials::{Denial, Layer};

/// Notifications answered per second at most. A server that loops on a denied syscall waits for
/// its answers past this rate, so that it cannot make mcpbox spend more than a sliver of a core
/// (each answer is two ioctls and a record) on its denials.
const MAX_PER_SECOND: u32 = 1000;

/// Answers and records the notifications of `listener` for `server`, on a thread of its own.
pub fn start(listener: OwnedFd, server: &str) {
    let server = server.to_string();
    let spawned =
        std::thread::Builder::new().name("mcpbox-seccomp-notify".into()).spawn(move || serve(listener, &server));
    if let Err(e) = spawned {
        // The listener is closed with the closure: the server's denied syscalls get ENOSYS.
        tracing::warn!("cannot watch the seccomp denials of a sandbox: {e}");
    }
}

fn serve(listener: OwnedFd, server: &str) {
    let record = crate::denials::registry().server(server, None);
    let learn = crate::learn::learning();
    if let Some(l) = learn {
        l.listening();
    }
    let fd = listener.as_raw_fd();
    let mut cannot_continue = false;
    let (mut window, mut in_window) = (Instant::now(), 0u32);
    loop {
        in_window += 1;
        // Learning observes every path syscall: no rate (the server is the user's own, run once).
        if learn.is_none() && in_window > MAX_PER_SECOND {
            let spent = window.elapsed();
            if spent < Duration::from_secs(1) {
                std::thread::sleep(Duration::from_secs(1) - spent);
            }
            (window, in_window) = (Instant::now(), 1);
        } else if window.elapsed() >= Duration::from_secs(1) {
            (window, in_window) = (Instant::now(), 1);
        }
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return;
        }
        if pfd.revents & libc::POLLIN == 0 {
            // POLLHUP: no process is left under the filter.
            return;
        }
        // SAFETY: seccomp_notif is plain data; the kernel requires it zeroed before RECV.
        let mut req: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        // SAFETY: `req` is a seccomp_notif the kernel fills; `fd` is the listener we own.
        if unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_RECV, &mut req) } < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                // The process was killed between poll and recv, or a signal came.
                Some(libc::ENOENT) | Some(libc::EINTR) => continue,
                _ => return,
            }
        }
        let observed = super::seccomp::observed(req.data.nr as i64);
        if let (Some(learn), Some(arg)) = (learn.filter(|l| l.continues(req.data.nr as i64)), observed) {
            let seen = observe(&req, arg);
            // The process may have died and its pid been reused while we read: the path is
            // kept only if the notification is still pending afterwards.
            // SAFETY: `req.id` is a plain u64 the ioctl reads.
            let valid = unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_ID_VALID, &req.id) } == 0;
            // Not a security decision (see the module's opening comment): the syscall goes on to
            // the kernel, where the mount view and Landlock judge it.
            let resp = libc::seccomp_notif_resp {
                id: req.id,
                val: 0,
                error: 0,
                flags: libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
            };
            // SAFETY: as below.
            let sent = unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_SEND, &resp) };
            if sent < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                // A kernel before 5.5 has no CONTINUE: the syscall would wait forever. It fails
                // instead, and learning says why.
                if !cannot_continue {
                    tracing::error!(
                        "this kernel cannot let a notified syscall continue (Linux 5.5 or newer): policy learn cannot observe; the server's path syscalls fail with ENOSYS"
                    );
                    cannot_continue = true;
                }
                let fail = libc::seccomp_notif_resp { id: req.id, val: 0, error: -libc::ENOSYS, flags: 0 };
                // SAFETY: as below.
                unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_SEND, &fail) };
            }
            if let (true, Some((kind, path))) = (valid, seen) {
                let name = super::seccomp::syscall_name(req.data.nr as i64).unwrap_or("?");
                learn.path(kind, path, name);
            }
            continue;
        }
        let resp = libc::seccomp_notif_resp { id: req.id, val: 0, error: -libc::EPERM, flags: 0 };
        // SAFETY: `resp` is a complete seccomp_notif_resp; ENOENT (the task died) is harmless.
        unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_SEND, &resp) };
        let d = denial(&req.data);
        if let Some(learn) = learn {
            learn.denied_syscall(&d.access);
        }
        record.record(None, None, d);
    }
}

/// The path an observed syscall names, made absolute (against its directory descriptor or the
/// working directory, read from `/proc`), and what it does with it. None when it cannot be read
/// (the process is gone) or names no path (an empty path with `AT_EMPTY_PATH`).
fn observe(req: &libc::seccomp_notif, arg: super::seccomp::PathArg) -> Option<(crate::learn::Use, PathBuf)> {
    use super::seccomp::PathUse;
    use crate::learn::Use;
    let pid = req.pid;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).ok()?;
    let raw = read_cstr(&mem, req.data.args[arg.path], libc::PATH_MAX as usize)?;
    if raw.is_empty() {
        return None;
    }
    let kind = match arg.kind {
        PathUse::Look => Use::Look,
        PathUse::Exec => Use::Exec,
        PathUse::Write => Use::Write,
        PathUse::Open { flags } => {
            let flags = match flags {
                Some(i) => req.data.args[i],
                // openat2: the flags are the first field of `struct open_how`.
                None => {
                    let mut b = [0u8; 8];
                    mem.read_exact_at(&mut b, req.data.args[2]).ok()?;
                    u64::from_ne_bytes(b)
                }
            } as i32;
            if flags & libc::O_PATH != 0 {
                Use::Look
            } else if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & (libc::O_CREAT | libc::O_TRUNC) != 0 {
                Use::Write
            } else {
                Use::Read
            }
        }
    };
    let path = PathBuf::from(std::ffi::OsStr::from_bytes(&raw));
    let path = if path.is_absolute() {
        path
    } else {
        let dirfd = arg.dirfd.map_or(libc::AT_FDCWD, |i| req.data.args[i] as i32);
        let base = if dirfd == libc::AT_FDCWD {
            std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?
        } else {
            std::fs::read_link(format!("/proc/{pid}/fd/{dirfd}")).ok()?
        };
        // A pipe or socket (`pipe:[…]`) is no directory.
        if !base.is_absolute() {
            return None;
        }
        base.join(path)
    };
    Some((kind, crate::learn::normalize(&path)))
}

/// A NUL-terminated string of at most `max` bytes at `addr` in the process's memory, read a page
/// at a time (the string may end just before an unmapped page).
fn read_cstr(mem: &std::fs::File, addr: u64, max: usize) -> Option<Vec<u8>> {
    const PAGE: u64 = 4096;
    let mut out = Vec::new();
    let mut at = addr;
    while out.len() < max {
        let chunk = (PAGE - at % PAGE) as usize;
        let mut buf = vec![0u8; chunk.min(max - out.len())];
        let n = mem.read_at(&mut buf, at).ok()?;
        if n == 0 {
            return None;
        }
        if let Some(end) = buf[..n].iter().position(|b| *b == 0) {
            out.extend_from_slice(&buf[..end]);
            return Some(out);
        }
        out.extend_from_slice(&buf[..n]);
        at += n as u64;
    }
    None
}

/// The denial a notification stands for: the syscall's name, its arguments as the object.
fn denial(data: &libc::seccomp_data) -> Denial {
    let nr = data.nr as i64;
    let args: Vec<String> = data.args.iter().map(|a| format!("{a:#x}")).collect();
    // The object is empty: one record per syscall, whatever its arguments (the latest are kept
    // in the reason). Numbers without a name are one record too: a server calling every number
    // in turn would otherwise make a record (and a rewrite of the record file) of each.
    let (access, number) = match super::seccomp::syscall_name(nr) {
        Some(name) => (name.to_owned(), String::new()),
        None => ("unknown syscall".to_owned(), format!("number {nr}, ")),
    };
    Denial {
        layer: Layer::Seccomp,
        access,
        object: String::new(),
        reason: Some(format!("not in the seccomp allow-list; {number}arguments ({})", args.join(", "))),
    }
}

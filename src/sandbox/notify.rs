//! The supervisor side of `SECCOMP_RET_USER_NOTIF`: every syscall the server's filter denies
//! arrives here; it is answered `EPERM` (what the filter itself would have answered) and
//! recorded as a denial of the server ([`crate::denials`]).
//!
//! One thread per sandbox, blocked in `poll` on the listener; it ends when the last process
//! under the filter is gone (`POLLHUP`). If mcpbox goes away first, the kernel answers the
//! server's denied syscalls `ENOSYS` itself: still refused.

use std::os::fd::{AsRawFd, OwnedFd};
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
    let fd = listener.as_raw_fd();
    let (mut window, mut in_window) = (Instant::now(), 0u32);
    loop {
        in_window += 1;
        if in_window > MAX_PER_SECOND {
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
        let resp = libc::seccomp_notif_resp { id: req.id, val: 0, error: -libc::EPERM, flags: 0 };
        // SAFETY: `resp` is a complete seccomp_notif_resp; ENOENT (the task died) is harmless.
        unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_SEND, &resp) };
        record.record(None, None, denial(&req.data));
    }
}

/// The denial a notification stands for: the syscall's name, its arguments as the object.
fn denial(data: &libc::seccomp_data) -> Denial {
    let nr = data.nr as i64;
    let access = super::seccomp::syscall_name(nr).map_or_else(|| format!("syscall {nr}"), str::to_owned);
    let args: Vec<String> = data.args.iter().map(|a| format!("{a:#x}")).collect();
    // The object is empty: one record per syscall, whatever its arguments (the first ones seen
    // are kept in the reason).
    Denial {
        layer: Layer::Seccomp,
        access,
        object: String::new(),
        reason: Some(format!("not in the seccomp allow-list; arguments ({})", args.join(", "))),
    }
}

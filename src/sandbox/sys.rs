//! Thin wrappers around the system calls nix does not cover, or covers only as `unsafe`.
//! Every `unsafe` block of mcpbox lives in this file.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

pub const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub const MOUNT_ATTR_NODEV: u64 = 0x4;
pub const MOUNT_ATTR_NOEXEC: u64 = 0x8;
const AT_RECURSIVE: u32 = 0x8000;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// `mount_setattr(2)`: set mount flags on `path` (and, with `recursive`, every mount below it).
/// Unlike a `MS_REMOUNT`, this works on a whole tree and never needs to restate locked flags.
pub fn mount_setattr(path: &str, set: u64, recursive: bool) -> io::Result<()> {
    let c = CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let attr = MountAttr { attr_set: set, attr_clr: 0, propagation: 0, userns_fd: 0 };
    let flags = if recursive { AT_RECURSIVE } else { 0 };
    // SAFETY: `c` is a valid NUL-terminated string and `attr` a properly sized, initialised
    // struct that outlives the call; the kernel only reads them.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c.as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Close every descriptor from `first` up.
pub fn close_from(first: u32) -> io::Result<()> {
    // SAFETY: close_range only closes descriptors; callers make sure none of the closed ones is
    // owned by a live Rust object that would be used afterwards.
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0u32) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Set FD_CLOEXEC on `fd`.
pub fn set_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_SETFD on an integer descriptor has no memory effects.
    let r = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Adopt a descriptor number inherited from our parent.
pub fn adopt_fd(fd: RawFd) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: F_GETFD only checks that the descriptor is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is open and was handed to this process for it to own; nothing else
    // in this process refers to it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

pub enum Forked {
    Parent(nix::unistd::Pid),
    Child,
}

/// `fork(2)`. Only called from single-threaded processes (sandbox-init; `mcpbox run` before it
/// does anything), so the child may allocate.
pub fn fork() -> io::Result<Forked> {
    // SAFETY: the callers never start threads (sandbox-init checks it at its entry; `run` forks
    // first thing in main), so the child inherits a consistent heap and no held locks.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Parent { child }) => Ok(Forked::Parent(child)),
        Ok(nix::unistd::ForkResult::Child) => Ok(Forked::Child),
        Err(e) => Err(e.into()),
    }
}

/// Number of threads of this process, from /proc/self/status.
pub fn thread_count() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Bring the loopback interface of the current network namespace up.
pub fn loopback_up() -> io::Result<()> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    let sock = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq for SIOCGIFFLAGS/SIOCSIFFLAGS and outlives both calls.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Apply a seccomp program to the calling thread.
pub fn apply_seccomp(prog: &[seccompiler::sock_filter]) -> io::Result<()> {
    seccompiler::apply_filter(prog).map_err(|e| io::Error::other(e.to_string()))
}

/// Restore the default disposition of every signal (ignored signals survive execve).
pub fn reset_signal_dispositions() {
    for sig in 1..libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: installing SIG_DFL involves no handler code and no memory owned by Rust.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
}

/// `_exit(2)`: leave a forked child without running atexit handlers or flushing stdio buffers
/// that belong to the parent.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and has no preconditions.
    unsafe { libc::_exit(code) }
}


/// The Landlock ABI version of the running kernel (0: Landlock unavailable or disabled).
pub fn landlock_abi() -> u8 {
    const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
    // SAFETY: with the VERSION flag, a NULL attr and size 0, the call only returns a number.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if r < 0 { 0 } else { r.min(255) as u8 }
}

/// Write a whole message to a descriptor we do not own (the report socket), ignoring errors:
/// the reader may be gone, and there is nobody else to tell.
pub fn write_fd(fd: RawFd, bytes: &[u8]) {
    // SAFETY: `bytes` is a valid slice for the duration of the call.
    unsafe {
        libc::write(fd, bytes.as_ptr().cast(), bytes.len());
    }
}

/// `dup2(2)`; the new descriptor does not have FD_CLOEXEC.
pub fn dup2(old: RawFd, new: RawFd) -> io::Result<()> {
    // SAFETY: dup2 only manipulates the descriptor table.
    let r = unsafe { libc::dup2(old, new) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Close a descriptor we hold by number only.
pub fn close_fd(fd: RawFd) {
    // SAFETY: closing a number that no Rust object owns (the report socket in the outer
    // sandbox-init) cannot invalidate anything.
    unsafe {
        libc::close(fd);
    }
}

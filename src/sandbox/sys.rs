//! Thin wrappers around the system calls nix does not cover, or covers only as `unsafe`.
//! Every `unsafe` block of mcpbox lives in this file.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

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
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Close every descriptor from `first` up.
pub fn close_from(first: u32) -> io::Result<()> {
    // SAFETY: close_range only closes descriptors; callers make sure none of the closed ones is
    // owned by a live Rust object that would be used afterwards.
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0u32) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Set FD_CLOEXEC on `fd`.
pub fn set_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_SETFD on an integer descriptor has no memory effects.
    let r = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
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
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|v| v.trim().parse().ok()))
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

/// Loads `prog` with `SECCOMP_FILTER_FLAG_NEW_LISTENER`: its `SECCOMP_RET_USER_NOTIF` answers
/// go to the returned descriptor. NO_NEW_PRIVS must be set.
pub fn apply_seccomp_listener(prog: &[seccompiler::sock_filter]) -> io::Result<OwnedFd> {
    let fprog = libc::sock_fprog { len: prog.len() as u16, filter: prog.as_ptr() as *mut libc::sock_filter };
    // SAFETY: `fprog` points at `prog`, which outlives the call; the kernel copies the program.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
            &fprog as *const libc::sock_fprog,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
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
    if r < 0 {
        0
    } else {
        r.min(255) as u8
    }
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
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Close a descriptor we hold by number only.
pub fn close_fd(fd: RawFd) {
    // SAFETY: closing a number that no Rust object owns (the report socket in the outer
    // sandbox-init) cannot invalidate anything.
    unsafe {
        libc::close(fd);
    }
}

/// Take ownership of a descriptor a system call just returned (`r` < 0: the error).
fn owned(r: libc::c_long) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(r as RawFd) })
}

/// `open_tree(fd, "", OPEN_TREE_CLONE | AT_RECURSIVE)`: a detached copy of the mount tree at
/// the object `fd` refers to (an `O_PATH` handle): what a recursive bind mount of it would
/// attach, but taken from the handle, never from a path looked up again.
pub fn open_tree_clone(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<std::os::fd::OwnedFd> {
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    let flags = OPEN_TREE_CLONE
        | libc::OPEN_TREE_CLOEXEC
        | libc::AT_EMPTY_PATH as libc::c_uint
        | libc::AT_RECURSIVE as libc::c_uint;
    // SAFETY: the path is a static empty C string; with AT_EMPTY_PATH the kernel uses `fd`
    // itself. The result is a new descriptor we take ownership of.
    owned(unsafe { libc::syscall(libc::SYS_open_tree, fd.as_raw_fd(), c"".as_ptr(), flags) })
}

/// `move_mount(2)`: attach the detached mount `from` (from `open_tree_clone` or `fsmount`) on
/// the directory or file the handle `to` refers to.
pub fn move_mount_fd(from: std::os::fd::BorrowedFd<'_>, to: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
    let flags = MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_EMPTY_PATH;
    // SAFETY: both paths are static empty C strings (the kernel uses the descriptors); no
    // memory is written.
    let r = unsafe {
        libc::syscall(libc::SYS_move_mount, from.as_raw_fd(), c"".as_ptr(), to.as_raw_fd(), c"".as_ptr(), flags)
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A new, detached mount of the `fstype` filesystem on block device `source` (fsopen,
/// fsconfig, fsmount), with `attrs` (MOUNT_ATTR_*). Attached nowhere: whoever holds the returned
/// descriptor may `move_mount` it into their mount namespace. A device that is mounted already
/// gives the same superblock.
pub fn fsmount_dev(fstype: &str, source: &str, attrs: u64) -> io::Result<std::os::fd::OwnedFd> {
    const FSCONFIG_SET_STRING: libc::c_uint = 1;
    const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
    let fstype = CString::new(fstype).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let source = CString::new(source).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `fstype` is a valid C string that outlives the call; the result is ours.
    let fs = owned(unsafe { libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), libc::FSOPEN_CLOEXEC) })?;
    // SAFETY: key and value are valid C strings that outlive the call; the kernel copies them.
    let r = unsafe {
        libc::syscall(libc::SYS_fsconfig, fs.as_raw_fd(), FSCONFIG_SET_STRING, c"source".as_ptr(), source.as_ptr(), 0)
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: FSCONFIG_CMD_CREATE takes no key or value (NULL, 0).
    let r = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fsmount takes the context descriptor and two integers; the result is ours.
    owned(unsafe { libc::syscall(libc::SYS_fsmount, fs.as_raw_fd(), libc::FSMOUNT_CLOEXEC, attrs) })
}

/// `struct loop_info64` (linux/loop.h).
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` (linux/loop.h).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// The (device, inode) of the file behind the loop device `dev`, if it is bound to one.
pub fn loop_backing(dev: &std::fs::File) -> io::Result<(u64, u64)> {
    // SAFETY: LoopInfo64 is plain old data; all-zero is a valid value.
    let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
    // SAFETY: LOOP_GET_STATUS64 writes one loop_info64 into `info`, which is exactly that
    // struct and outlives the call.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_GET_STATUS64, &mut info as *mut LoopInfo64) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok((info.lo_device, info.lo_inode))
    }
}

/// Bind `image` to a free loop device that detaches by itself once nothing holds it open
/// (LO_FLAGS_AUTOCLEAR: the last unmount of what is mounted from it). Returns the device path
/// and the open device, which keeps it bound until closed.
pub fn loop_attach(image: &std::fs::File) -> io::Result<(String, std::fs::File)> {
    let ctl = std::fs::OpenOptions::new().read(true).write(true).open("/dev/loop-control")?;
    for _ in 0..64 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let path = format!("/dev/loop{n}");
        let dev = std::fs::OpenOptions::new().read(true).write(true).open(&path)?;
        // SAFETY: LoopConfig is plain old data; all-zero is a valid value.
        let mut cfg: LoopConfig = unsafe { std::mem::zeroed() };
        cfg.fd = image.as_raw_fd() as u32;
        cfg.info.lo_flags = LO_FLAGS_AUTOCLEAR;
        // SAFETY: LOOP_CONFIGURE reads one loop_config, which `cfg` is, and outlives the call.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg as *const LoopConfig) };
        if r == 0 {
            return Ok((path, dev));
        }
        let e = io::Error::last_os_error();
        // Another process took this device between GET_FREE and CONFIGURE: take the next.
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(e);
        }
    }
    Err(io::Error::other("no free loop device after 64 tries"))
}

/// What the Rust runtime's start-up did that mcpbox relies on, for a `main` that skips it (see
/// `src/main.rs`): SIGPIPE ignored, so that a write to a closed pipe or socket fails with EPIPE
/// instead of killing mcpbox (servers still start with every disposition reset, see
/// [`reset_signal_dispositions`]); descriptors 0, 1 and 2 open, on /dev/null where they were not,
/// so that no file mcpbox opens lands on one of them. Aborts if /dev/null cannot be opened, as
/// the runtime does.
pub fn process_start() {
    // SAFETY: installing SIG_IGN involves no handler code.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let mut fds = [0, 1, 2].map(|fd| libc::pollfd { fd, events: 0, revents: 0 });
    // SAFETY: `fds` is a valid array of three pollfd for the duration of the call.
    let polled = unsafe { libc::poll(fds.as_mut_ptr(), 3, 0) } >= 0;
    for p in fds {
        let closed = if polled {
            p.revents & libc::POLLNVAL != 0
        } else {
            // SAFETY: F_GETFD only checks that the descriptor is open.
            (unsafe { libc::fcntl(p.fd, libc::F_GETFD) }) < 0
        };
        // SAFETY: a NUL-terminated path; descriptors are numbered lowest first, so the closed
        // one (below any other closed one, as we go up) is what open returns.
        if closed && unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) } != p.fd {
            std::process::abort();
        }
    }
}

/// `prctl(PR_SET_MEMORY_MERGE, 1)` (Linux 6.4+): KSM may merge every anonymous page of this
/// process and of everything it forks or executes (the flag survives both).
pub fn set_memory_merge() -> Result<(), nix::errno::Errno> {
    const PR_SET_MEMORY_MERGE: libc::c_int = 67;
    // SAFETY: a prctl with integer arguments only.
    let r = unsafe {
        libc::prctl(PR_SET_MEMORY_MERGE, 1 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(nix::errno::Errno::last())
    }
}

/// Files that must not outlive mcpbox (the registry credentials a prepare's download step
/// reads), so that a command ended by SIGINT, SIGTERM or SIGHUP removes them first: see
/// [`remove_files_on_fatal_signals`]. At most a few exist at a time.
mod doomed_files {
    use std::ffi::{c_char, CString};
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;
    use std::ptr::null_mut;
    use std::sync::atomic::{AtomicPtr, Ordering};

    const SLOTS: usize = 8;
    static LIVE: [AtomicPtr<c_char>; SLOTS] = [const { AtomicPtr::new(null_mut()) }; SLOTS];

    pub fn register(path: &Path) -> Option<usize> {
        let c = CString::new(path.as_os_str().as_bytes()).ok()?.into_raw();
        for (i, slot) in LIVE.iter().enumerate() {
            if slot.compare_exchange(null_mut(), c, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                return Some(i);
            }
        }
        // SAFETY: `c` came from `into_raw` just above and was stored nowhere.
        drop(unsafe { CString::from_raw(c) });
        None
    }

    pub fn unregister(slot: usize) {
        let p = LIVE[slot].swap(null_mut(), Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: every non-null slot holds a pointer from `CString::into_raw`, taken out
            // of the slot by this swap only.
            drop(unsafe { CString::from_raw(p) });
        }
    }

    /// The signal handler: async-signal-safe (atomic swaps and `unlink` only), then the
    /// signal's default action, as if it had never been caught.
    pub extern "C" fn on_signal(sig: libc::c_int) {
        for slot in &LIVE {
            let p = slot.swap(null_mut(), Ordering::SeqCst);
            if !p.is_null() {
                // SAFETY: a NUL-terminated path from `CString::into_raw`, never freed while
                // in a slot; leaked here, as the process is about to end.
                unsafe { libc::unlink(p) };
            }
        }
        // SAFETY: both are async-signal-safe; the default action of these signals ends us.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
    }
}

/// `path` is removed should a signal installed by [`remove_files_on_fatal_signals`] end
/// mcpbox; `None` if every slot is taken. Give the slot back with [`keep_on_fatal_signal`].
pub fn remove_on_fatal_signal(path: &std::path::Path) -> Option<usize> {
    doomed_files::register(path)
}

/// `slot` (from [`remove_on_fatal_signal`]) is nobody's to remove any more.
pub fn keep_on_fatal_signal(slot: usize) {
    doomed_files::unregister(slot)
}

/// SIGINT, SIGTERM and SIGHUP, where they still have their default action, first remove the
/// files registered with [`remove_on_fatal_signal`], then end the process as before. A signal
/// with a handler of its own (`serve`'s) is left alone.
pub fn remove_files_on_fatal_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: sigaction with a zeroed struct to read, then one we filled; the handler is
        // async-signal-safe (see `doomed_files::on_signal`).
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 || old.sa_sigaction != libc::SIG_DFL {
                continue;
            }
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = doomed_files::on_signal as *const () as usize;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(sig, &act, std::ptr::null_mut());
        }
    }
}

/// Give back what setup left behind in a process that from now on only waits (sandbox-init's
/// outer process and PID 1 hold no other memory for the rest of the session): free heap
/// (`malloc_trim`), and the stack pages below the current frame that the deep calls of setup
/// dirtied (JSON, mounts, seccomp): `MADV_DONTNEED` makes them zero-fill again, should they be
/// touched. The process must be single-threaded. Best effort: nothing here fails a sandbox.
pub fn shed_setup_memory() {
    // What the waiting loop needs below this frame, and then some (the x86-64 red zone is 128 bytes).
    const KEEP: usize = 64 << 10;
    let here = 0u8;
    let sp = std::ptr::addr_of!(here) as usize;
    let page = 4096usize;
    if let Ok(maps) = std::fs::read_to_string("/proc/self/maps") {
        let stack = maps.lines().find_map(|l| {
            let (lo, hi) = l.split_whitespace().next()?.split_once('-')?;
            let (lo, hi) = (usize::from_str_radix(lo, 16).ok()?, usize::from_str_radix(hi, 16).ok()?);
            (lo <= sp && sp < hi && l.ends_with("[stack]")).then_some(lo)
        });
        if let Some(lo) = stack {
            let end = sp.saturating_sub(KEEP) & !(page - 1);
            if end > lo {
                // SAFETY: [lo, end) is the unused part of our own stack (below the live frames
                // by KEEP bytes, single-threaded, no signal handlers run on it meanwhile:
                // sandbox-init takes its signals with sigwait); DONTNEED only drops its pages.
                unsafe { libc::madvise(lo as *mut libc::c_void, end - lo, libc::MADV_DONTNEED) };
            }
        }
    }
    // SAFETY: plain libc call; single-threaded.
    unsafe { libc::malloc_trim(0) };
}

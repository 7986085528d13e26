//! The seccomp allow-list, built by pure functions so it can be tested without a kernel.
//!
//! Shape of the program (classic BPF, evaluated on every syscall of the server):
//! 1. a guard: a foreign architecture (the 32-bit `int 0x80` ABI) or an x32 syscall number
//!    answers `ENOSYS`; `clone3` answers `ENOSYS` too, so that libc falls back to `clone`, whose
//!    flags we can inspect (clone3 passes them in memory, out of BPF's reach);
//! 2. the few syscalls allowed only with certain arguments (clone, ioctl, socket, personality);
//! 3. a binary search over the ranges of allowed syscall numbers: about 20 instructions run per
//!    syscall instead of hundreds for a linear chain, and a program a third the size to load.
//!    Anything not allowed answers `EPERM`; with [`FilterOptions::notify`], the denials go to
//!    mcpbox instead (`SECCOMP_RET_USER_NOTIF`), which answers `EPERM` and records them (see
//!    `sandbox::notify`).
//!
//! Nothing is answered with a kill: a denied syscall is an error the program can report.

use std::collections::BTreeSet;

use crate::policy::syscalls;

pub use seccompiler::sock_filter;

/// A classic-BPF program.
pub type BpfProgram = Vec<sock_filter>;

/// `AUDIT_ARCH_X86_64` from `<linux/audit.h>`.
pub const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
/// `__X32_SYSCALL_BIT`: x32 syscalls arrive with the x86_64 arch and this bit set in `nr`.
pub const X32_SYSCALL_BIT: u32 = 0x4000_0000;

const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;

/// Namespace flags that `clone` must not carry.
pub const CLONE_NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | 0x80/* CLONE_NEWTIME */) as u64;

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("unknown syscall name `{0}` in [seccomp]")]
    UnknownSyscall(String),
    #[error("syscall `{0}` can never be allowed: {1}")]
    HardDenied(String, &'static str),
    #[error("building the seccomp filter: {0}")]
    Build(String),
}

macro_rules! sys {
    ($($name:ident),* $(,)?) => { &[$((stringify!($name), libc::$name as i64)),*] };
}

/// Allowed unconditionally, grouped by what they are for. This follows the set a default
/// container runtime allows to unprivileged processes, minus everything that needs a capability
/// the sandbox never has, minus the kernel attack surface listed in [`hard_deny`].
const ALLOW: &[(&str, i64)] = {
    // Names are `SYS_*` constants; the `SYS_` prefix is stripped when looking names up.
    sys![
        // files and directories (Landlock and the mount view decide which ones)
        SYS_read,
        SYS_write,
        SYS_readv,
        SYS_writev,
        SYS_pread64,
        SYS_pwrite64,
        SYS_preadv,
        SYS_pwritev,
        SYS_preadv2,
        SYS_pwritev2,
        SYS_open,
        SYS_openat,
        SYS_openat2,
        SYS_close,
        SYS_close_range,
        SYS_creat,
        SYS_stat,
        SYS_fstat,
        SYS_lstat,
        SYS_newfstatat,
        SYS_statx,
        SYS_statfs,
        SYS_fstatfs,
        SYS_lseek,
        SYS_access,
        SYS_faccessat,
        SYS_faccessat2,
        SYS_getdents,
        SYS_getdents64,
        SYS_getcwd,
        SYS_chdir,
        SYS_fchdir,
        SYS_rename,
        SYS_renameat,
        SYS_renameat2,
        SYS_mkdir,
        SYS_mkdirat,
        SYS_rmdir,
        SYS_link,
        SYS_linkat,
        SYS_unlink,
        SYS_unlinkat,
        SYS_symlink,
        SYS_symlinkat,
        SYS_readlink,
        SYS_readlinkat,
        SYS_chmod,
        SYS_fchmod,
        SYS_fchmodat,
        SYS_fchmodat2,
        SYS_chown,
        SYS_fchown,
        SYS_lchown,
        SYS_fchownat,
        SYS_umask,
        SYS_truncate,
        SYS_ftruncate,
        SYS_fallocate,
        SYS_fadvise64,
        SYS_readahead,
        SYS_fsync,
        SYS_fdatasync,
        SYS_sync,
        SYS_syncfs,
        SYS_sync_file_range,
        SYS_flock,
        SYS_fcntl,
        SYS_dup,
        SYS_dup2,
        SYS_dup3,
        SYS_utime,
        SYS_utimes,
        SYS_utimensat,
        SYS_futimesat,
        SYS_copy_file_range,
        SYS_sendfile,
        SYS_splice,
        SYS_tee,
        SYS_getxattr,
        SYS_lgetxattr,
        SYS_fgetxattr,
        SYS_listxattr,
        SYS_llistxattr,
        SYS_flistxattr,
        SYS_setxattr,
        SYS_lsetxattr,
        SYS_fsetxattr,
        SYS_removexattr,
        SYS_lremovexattr,
        SYS_fremovexattr,
        SYS_inotify_init,
        SYS_inotify_init1,
        SYS_inotify_add_watch,
        SYS_inotify_rm_watch,
        SYS_memfd_create,
        // memory
        SYS_brk,
        SYS_mmap,
        SYS_munmap,
        SYS_mremap,
        SYS_mprotect,
        SYS_msync,
        SYS_mincore,
        SYS_madvise,
        SYS_mlock,
        SYS_mlock2,
        SYS_munlock,
        SYS_mlockall,
        SYS_munlockall,
        SYS_membarrier,
        SYS_get_mempolicy,
        SYS_set_mempolicy,
        SYS_mbind,
        SYS_pkey_alloc,
        SYS_pkey_free,
        SYS_pkey_mprotect,
        // processes and threads (clone is filtered below)
        SYS_fork,
        SYS_vfork,
        SYS_execve,
        SYS_execveat,
        SYS_exit,
        SYS_exit_group,
        SYS_wait4,
        SYS_waitid,
        SYS_getpid,
        SYS_gettid,
        SYS_getppid,
        SYS_getpgid,
        SYS_getpgrp,
        SYS_getsid,
        SYS_setsid,
        SYS_setpgid,
        SYS_set_tid_address,
        SYS_set_robust_list,
        SYS_get_robust_list,
        SYS_rseq,
        SYS_futex,
        SYS_futex_waitv,
        SYS_arch_prctl,
        SYS_prctl,
        SYS_sched_yield,
        SYS_sched_getaffinity,
        SYS_sched_setaffinity,
        SYS_sched_getparam,
        SYS_sched_getscheduler,
        SYS_sched_get_priority_max,
        SYS_sched_get_priority_min,
        SYS_sched_rr_get_interval,
        SYS_getpriority,
        SYS_setpriority,
        SYS_getrlimit,
        SYS_setrlimit,
        SYS_prlimit64,
        SYS_getrusage,
        SYS_times,
        SYS_pidfd_open,
        SYS_pidfd_send_signal,
        SYS_ioprio_get,
        SYS_ioprio_set,
        SYS_getcpu,
        SYS_restart_syscall,
        // credentials: reading them is harmless
        SYS_getuid,
        SYS_geteuid,
        SYS_getgid,
        SYS_getegid,
        SYS_getresuid,
        SYS_getresgid,
        SYS_getgroups,
        SYS_capget,
        // signals (Landlock scopes them to the sandbox; the pid namespace hides the host)
        SYS_rt_sigaction,
        SYS_rt_sigprocmask,
        SYS_rt_sigreturn,
        SYS_rt_sigpending,
        SYS_rt_sigtimedwait,
        SYS_rt_sigqueueinfo,
        SYS_rt_tgsigqueueinfo,
        SYS_rt_sigsuspend,
        SYS_sigaltstack,
        SYS_kill,
        SYS_tgkill,
        SYS_tkill,
        SYS_pause,
        SYS_signalfd,
        SYS_signalfd4,
        // time
        SYS_nanosleep,
        SYS_clock_nanosleep,
        SYS_clock_gettime,
        SYS_clock_getres,
        SYS_gettimeofday,
        SYS_time,
        SYS_getitimer,
        SYS_setitimer,
        SYS_alarm,
        SYS_timer_create,
        SYS_timer_settime,
        SYS_timer_gettime,
        SYS_timer_getoverrun,
        SYS_timer_delete,
        SYS_timerfd_create,
        SYS_timerfd_settime,
        SYS_timerfd_gettime,
        // event loops
        SYS_pipe,
        SYS_pipe2,
        SYS_select,
        SYS_pselect6,
        SYS_poll,
        SYS_ppoll,
        SYS_epoll_create,
        SYS_epoll_create1,
        SYS_epoll_ctl,
        SYS_epoll_wait,
        SYS_epoll_pwait,
        SYS_epoll_pwait2,
        SYS_eventfd,
        SYS_eventfd2,
        SYS_io_setup,
        SYS_io_destroy,
        SYS_io_submit,
        SYS_io_cancel,
        SYS_io_getevents,
        // sockets (socket() itself is filtered by family below; the network namespace decides
        // what is reachable)
        SYS_socketpair,
        SYS_connect,
        SYS_accept,
        SYS_accept4,
        SYS_bind,
        SYS_listen,
        SYS_sendto,
        SYS_recvfrom,
        SYS_sendmsg,
        SYS_recvmsg,
        SYS_sendmmsg,
        SYS_recvmmsg,
        SYS_shutdown,
        SYS_getsockname,
        SYS_getpeername,
        SYS_setsockopt,
        SYS_getsockopt,
        // System V IPC and message queues: private to the sandbox's IPC namespace
        SYS_shmget,
        SYS_shmat,
        SYS_shmdt,
        SYS_shmctl,
        SYS_semget,
        SYS_semop,
        SYS_semctl,
        SYS_semtimedop,
        SYS_msgget,
        SYS_msgsnd,
        SYS_msgrcv,
        SYS_msgctl,
        SYS_mq_open,
        SYS_mq_unlink,
        SYS_mq_timedsend,
        SYS_mq_timedreceive,
        SYS_mq_notify,
        SYS_mq_getsetattr,
        // system information
        SYS_uname,
        SYS_sysinfo,
        SYS_getrandom,
        // a server may confine itself further
        SYS_seccomp,
        SYS_landlock_create_ruleset,
        SYS_landlock_add_rule,
        SYS_landlock_restrict_self,
    ]
};

/// Never allowed, whatever a policy says: the names and reasons of
/// [`crate::policy::syscalls::NEVER_ALLOWED`] (a policy naming one in `extra_allow` is refused
/// when it loads), with their numbers.
pub fn hard_deny() -> impl Iterator<Item = (&'static str, i64, &'static str)> {
    syscalls::NEVER_ALLOWED.iter().map(|(name, why)| {
        (*name, syscalls::number(name).expect("every NEVER_ALLOWED name is in the x86_64 table"), *why)
    })
}

/// ioctls refused: pushing input into a terminal, or controlling the Linux console.
pub const TIOCSTI: u64 = 0x5412;
pub const TIOCLINUX: u64 = 0x541C;

/// What the filter needs to know from the policy.
#[derive(Debug, Clone, Default)]
pub struct FilterOptions {
    pub extra_deny: Vec<String>,
    pub extra_allow: Vec<String>,
    /// Only `AF_UNIX` (and `AF_NETLINK` for interface listing) sockets: used when the network is
    /// meant to be off but no network namespace could be made (container level, mode `none`).
    pub unix_sockets_only: bool,
    /// Denied syscalls go to a supervisor (`SECCOMP_RET_USER_NOTIF`) that answers EPERM and
    /// records them, instead of the filter answering EPERM itself.
    pub notify: bool,
    /// `mcpbox policy learn`: the allowed syscalls that name a path ([`OBSERVED`]) go to the
    /// supervisor too, which records the path and lets the syscall continue (only with `notify`).
    pub observe: bool,
}

/// How an observed syscall names its path, for `mcpbox policy learn`: which argument holds
/// the path, which the directory descriptor it is relative to (None: the working directory),
/// and what the access is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathArg {
    pub path: usize,
    pub dirfd: Option<usize>,
    pub kind: PathUse,
}

/// What an observed syscall does with its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathUse {
    /// Looks at it: stat, access, readlink, xattrs.
    Look,
    /// Opens it; whether for reading or writing is in the flags argument (index given), or in
    /// `struct open_how` for openat2.
    Open {
        flags: Option<usize>,
    },
    Exec,
    /// Creates, removes, renames or changes it.
    Write,
}

const fn at(path: usize, dirfd: Option<usize>, kind: PathUse) -> PathArg {
    PathArg { path, dirfd, kind }
}

/// The path syscalls `mcpbox policy learn` observes, with where their path is. Descriptor-only
/// calls (fstat, fchmod, …) are left out: the path was observed when the descriptor was opened.
/// For two-path calls (rename, link, symlink) the destination is the one recorded.
pub const OBSERVED: &[(i64, PathArg)] = {
    use PathUse::*;
    &[
        (libc::SYS_open, at(0, None, Open { flags: Some(1) })),
        (libc::SYS_openat, at(1, Some(0), Open { flags: Some(2) })),
        (libc::SYS_openat2, at(1, Some(0), Open { flags: None })),
        (libc::SYS_creat, at(0, None, Write)),
        (libc::SYS_execve, at(0, None, Exec)),
        (libc::SYS_execveat, at(1, Some(0), Exec)),
        (libc::SYS_stat, at(0, None, Look)),
        (libc::SYS_lstat, at(0, None, Look)),
        (libc::SYS_newfstatat, at(1, Some(0), Look)),
        (libc::SYS_statx, at(1, Some(0), Look)),
        (libc::SYS_access, at(0, None, Look)),
        (libc::SYS_faccessat, at(1, Some(0), Look)),
        (libc::SYS_faccessat2, at(1, Some(0), Look)),
        (libc::SYS_readlink, at(0, None, Look)),
        (libc::SYS_readlinkat, at(1, Some(0), Look)),
        (libc::SYS_statfs, at(0, None, Look)),
        (libc::SYS_getxattr, at(0, None, Look)),
        (libc::SYS_lgetxattr, at(0, None, Look)),
        (libc::SYS_listxattr, at(0, None, Look)),
        (libc::SYS_chdir, at(0, None, Look)),
        (libc::SYS_mkdir, at(0, None, Write)),
        (libc::SYS_mkdirat, at(1, Some(0), Write)),
        (libc::SYS_rmdir, at(0, None, Write)),
        (libc::SYS_unlink, at(0, None, Write)),
        (libc::SYS_unlinkat, at(1, Some(0), Write)),
        (libc::SYS_rename, at(1, None, Write)),
        (libc::SYS_renameat, at(3, Some(2), Write)),
        (libc::SYS_renameat2, at(3, Some(2), Write)),
        (libc::SYS_link, at(1, None, Write)),
        (libc::SYS_linkat, at(3, Some(2), Write)),
        (libc::SYS_symlink, at(1, None, Write)),
        (libc::SYS_symlinkat, at(2, Some(1), Write)),
        (libc::SYS_chmod, at(0, None, Write)),
        (libc::SYS_fchmodat, at(1, Some(0), Write)),
        (libc::SYS_chown, at(0, None, Write)),
        (libc::SYS_lchown, at(0, None, Write)),
        (libc::SYS_fchownat, at(1, Some(0), Write)),
        (libc::SYS_truncate, at(0, None, Write)),
        (libc::SYS_utimensat, at(1, Some(0), Write)),
        (libc::SYS_setxattr, at(0, None, Write)),
        (libc::SYS_lsetxattr, at(0, None, Write)),
        (libc::SYS_removexattr, at(0, None, Write)),
        (libc::SYS_lremovexattr, at(0, None, Write)),
        (libc::SYS_llistxattr, at(0, None, Look)),
        (libc::SYS_fchmodat2, at(1, Some(0), Write)),
        (libc::SYS_utime, at(0, None, Write)),
        (libc::SYS_utimes, at(0, None, Write)),
        (libc::SYS_futimesat, at(1, Some(0), Write)),
        (libc::SYS_inotify_add_watch, at(1, None, Look)),
    ]
};

/// Where the path of observed syscall `nr` is ([`OBSERVED`]).
pub fn observed(nr: i64) -> Option<PathArg> {
    OBSERVED.iter().find(|(n, _)| *n == nr).map(|(_, a)| *a)
}

/// The number of the x86_64 syscall `name` (the policy module's table).
pub fn syscall_number(name: &str) -> Option<i64> {
    syscalls::number(name)
}

/// The name of syscall `nr` (x86_64), from the policy's name table.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    syscalls::X86_64.iter().find(|(_, n)| *n == nr).map(|(name, _)| *name)
}

/// Refuses names the filter cannot apply. Loading a policy refuses them first (with file and
/// line); this guards [`allowed`], whose options arrive in the spec over a pipe.
fn check_names(opts: &FilterOptions) -> Result<(), SeccompError> {
    for name in opts.extra_deny.iter().chain(&opts.extra_allow) {
        syscall_number(name).ok_or_else(|| SeccompError::UnknownSyscall(name.clone()))?;
    }
    for name in &opts.extra_allow {
        if let Some(why) = syscalls::never_allowed(name) {
            return Err(SeccompError::HardDenied(name.clone(), why));
        }
    }
    Ok(())
}

/// Syscalls allowed only when their arguments pass a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Conditional {
    /// Threads and processes, never with namespace flags.
    Clone,
    /// Anything but TIOCSTI / TIOCLINUX (the command is 32 bits wide in the kernel).
    Ioctl,
    /// The families a server has business with.
    Socket,
    /// Querying, and the flags runtimes actually use (as container runtimes allow).
    Personality,
}

/// What the filter allows: numbers allowed outright, and the conditional ones kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    pub plain: BTreeSet<i64>,
    conditional: Vec<Conditional>,
    unix_sockets_only: bool,
}

/// The policy's choices applied to the default allow-list.
pub fn allowed(opts: &FilterOptions) -> Result<Allowed, SeccompError> {
    check_names(opts)?;
    let mut plain: BTreeSet<i64> = ALLOW.iter().map(|(_, nr)| *nr).collect();
    let mut conditional = vec![Conditional::Clone, Conditional::Ioctl, Conditional::Socket, Conditional::Personality];
    for name in &opts.extra_allow {
        plain.insert(syscall_number(name).expect("checked above"));
    }
    for name in &opts.extra_deny {
        let nr = syscall_number(name).expect("checked above");
        plain.remove(&nr);
        conditional.retain(|c| c.nr() != nr);
    }
    for (_, nr, _) in hard_deny() {
        plain.remove(&nr);
    }
    for c in &conditional {
        plain.remove(&c.nr());
    }
    Ok(Allowed { plain, conditional, unix_sockets_only: opts.unix_sockets_only })
}

impl Conditional {
    fn nr(self) -> i64 {
        match self {
            Conditional::Clone => libc::SYS_clone,
            Conditional::Ioctl => libc::SYS_ioctl,
            Conditional::Socket => libc::SYS_socket,
            Conditional::Personality => libc::SYS_personality,
        }
    }
}

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter { code, jt: 0, jf: 0, k }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// BPF_LD | BPF_W | BPF_ABS (class 0x00, size 0x00, mode 0x20).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JA: u16 = 0x05;
const BPF_JEQ_K: u16 = 0x05 | 0x10;
const BPF_JGT_K: u16 = 0x05 | 0x20;
const BPF_JGE_K: u16 = 0x05 | 0x30;
const BPF_JSET_K: u16 = 0x05 | 0x40;
const BPF_RET_K: u16 = 0x06;
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_EPERM: u32 = SECCOMP_RET_ERRNO | libc::EPERM as u32;
const RET_ENOSYS: u32 = SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
const RET_USER_NOTIF: u32 = 0x7fc0_0000;

/// Offsets in `struct seccomp_data`: nr at 0, arch at 4, then six u64 args from 16. Arguments
/// checked here are C ints, so their low 32 bits (little-endian: the first word) are the value.
const fn arg_low(i: u32) -> u32 {
    16 + 8 * i
}

/// The guard: foreign arch → ENOSYS, x32 → ENOSYS, clone3 → ENOSYS. Leaves `nr` in A.
fn guard() -> Vec<sock_filter> {
    vec![
        stmt(BPF_LD_W_ABS, 4),
        jump(BPF_JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        stmt(BPF_RET_K, RET_ENOSYS),
        stmt(BPF_LD_W_ABS, 0),
        jump(BPF_JGE_K, X32_SYSCALL_BIT, 0, 1),
        stmt(BPF_RET_K, RET_ENOSYS),
        jump(BPF_JEQ_K, libc::SYS_clone3 as u32, 0, 1),
        stmt(BPF_RET_K, RET_ENOSYS),
    ]
}

/// Allow when the 32-bit argument `arg` equals one of `values`; otherwise EPERM.
fn one_of(arg: u32, values: &[u32]) -> Vec<sock_filter> {
    let n = values.len();
    let mut v = vec![stmt(BPF_LD_W_ABS, arg_low(arg))];
    for (i, val) in values.iter().enumerate() {
        // On a match jump over the remaining compares and the EPERM, to the ALLOW.
        v.push(jump(BPF_JEQ_K, *val, (n - i) as u8, 0));
    }
    v.push(stmt(BPF_RET_K, RET_EPERM));
    v.push(stmt(BPF_RET_K, RET_ALLOW));
    v
}

fn conditional_block(c: Conditional, unix_sockets_only: bool) -> Vec<sock_filter> {
    match c {
        Conditional::Clone => vec![
            stmt(BPF_LD_W_ABS, arg_low(0)),
            jump(BPF_JSET_K, CLONE_NAMESPACE_FLAGS as u32, 1, 0),
            stmt(BPF_RET_K, RET_ALLOW),
            stmt(BPF_RET_K, RET_EPERM),
        ],
        Conditional::Ioctl => vec![
            stmt(BPF_LD_W_ABS, arg_low(1)),
            jump(BPF_JEQ_K, TIOCSTI as u32, 2, 0),
            jump(BPF_JEQ_K, TIOCLINUX as u32, 1, 0),
            stmt(BPF_RET_K, RET_ALLOW),
            stmt(BPF_RET_K, RET_EPERM),
        ],
        Conditional::Socket => {
            let fams: &[i32] = if unix_sockets_only {
                &[libc::AF_UNIX, libc::AF_NETLINK]
            } else {
                &[libc::AF_UNIX, libc::AF_INET, libc::AF_INET6, libc::AF_NETLINK]
            };
            one_of(0, &fams.iter().map(|f| *f as u32).collect::<Vec<_>>())
        }
        Conditional::Personality => one_of(0, &[0, 0x0008, 0x20000, 0x20008, 0xffff_ffff]),
    }
}

/// Sorted syscall numbers → disjoint inclusive ranges.
fn ranges(nrs: &BTreeSet<i64>) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for &nr in nrs {
        let nr = nr as u32;
        match out.last_mut() {
            Some((_, hi)) if *hi + 1 == nr => *hi = nr,
            _ => out.push((nr, nr)),
        }
    }
    out
}

/// Binary search over `r` with `nr` in A: every leaf ends in a RET of its own, so no jump has to
/// reach far (conditional jumps have 8-bit offsets; the far ones use JA's 32-bit offset).
fn search(r: &[(u32, u32)]) -> Vec<sock_filter> {
    match r {
        [] => vec![stmt(BPF_RET_K, RET_EPERM)],
        [(lo, hi)] => vec![
            jump(BPF_JGE_K, *lo, 0, 2),
            jump(BPF_JGT_K, *hi, 1, 0),
            stmt(BPF_RET_K, RET_ALLOW),
            stmt(BPF_RET_K, RET_EPERM),
        ],
        _ => {
            let mid = r.len() / 2;
            let left = search(&r[..mid]);
            let right = search(&r[mid..]);
            let mut v = Vec::with_capacity(2 + left.len() + right.len());
            v.push(jump(BPF_JGE_K, r[mid].0, 0, 1));
            v.push(stmt(BPF_JA, left.len() as u32));
            v.extend(left);
            v.extend(right);
            v
        }
    }
}

/// The whole program, ready for `seccomp(SECCOMP_SET_MODE_FILTER)`.
pub fn build_program(opts: &FilterOptions) -> Result<BpfProgram, SeccompError> {
    let a = allowed(opts)?;
    let mut prog = guard();
    if opts.notify && opts.observe {
        // Observed syscalls the allow-list permits go to the supervisor (which lets them
        // continue); the ones it denies still reach the EPERM below.
        for (nr, _) in OBSERVED.iter().filter(|(nr, _)| a.plain.contains(nr)) {
            prog.push(jump(BPF_JEQ_K, *nr as u32, 0, 1));
            prog.push(stmt(BPF_RET_K, RET_USER_NOTIF));
        }
    }
    for c in &a.conditional {
        let block = conditional_block(*c, a.unix_sockets_only);
        prog.push(jump(BPF_JEQ_K, c.nr() as u32, 0, block.len() as u8));
        prog.extend(block);
    }
    prog.extend(search(&ranges(&a.plain)));
    if opts.notify {
        // Every denial (and only denials) answers EPERM: those become notifications. The guard's
        // ENOSYS answers stay in the filter.
        for ins in prog.iter_mut().filter(|i| i.code == BPF_RET_K && i.k == RET_EPERM) {
            ins.k = RET_USER_NOTIF;
        }
    }
    if prog.len() > 4096 {
        return Err(SeccompError::Build(format!("program of {} instructions exceeds the kernel's limit", prog.len())));
    }
    Ok(prog)
}

/// A classic-BPF interpreter for seccomp programs, enough to test ours without a kernel.
#[cfg(test)]
pub(crate) fn run_bpf(prog: &[sock_filter], nr: u32, arch: u32, args: [u64; 6]) -> u32 {
    let mut data = Vec::with_capacity(64);
    data.extend_from_slice(&nr.to_ne_bytes());
    data.extend_from_slice(&arch.to_ne_bytes());
    data.extend_from_slice(&0u64.to_ne_bytes()); // instruction pointer
    for a in args {
        data.extend_from_slice(&a.to_ne_bytes());
    }
    let (mut acc, mut x, mut pc) = (0u32, 0u32, 0usize);
    let mut mem = [0u32; 16];
    loop {
        let ins = &prog[pc];
        let class = ins.code & 0x07;
        match class {
            0x00 => {
                // LD
                acc = match ins.code & 0xe0 {
                    0x20 => u32::from_ne_bytes(data[ins.k as usize..ins.k as usize + 4].try_into().unwrap()),
                    0x00 => ins.k,
                    0x60 => mem[ins.k as usize],
                    m => panic!("unsupported ld mode {m:#x}"),
                };
            }
            0x01 => x = if ins.code & 0xe0 == 0x60 { mem[ins.k as usize] } else { ins.k },
            0x02 => mem[ins.k as usize] = acc,
            0x03 => mem[ins.k as usize] = x,
            0x04 => {
                let v = if ins.code & 0x08 != 0 { x } else { ins.k };
                acc = match ins.code & 0xf0 {
                    0x00 => acc.wrapping_add(v),
                    0x10 => acc.wrapping_sub(v),
                    0x50 => acc & v,
                    0x40 => acc | v,
                    op => panic!("unsupported alu {op:#x}"),
                };
            }
            0x05 => {
                let v = if ins.code & 0x08 != 0 { x } else { ins.k };
                let op = ins.code & 0xf0;
                if op == 0x00 {
                    pc += ins.k as usize + 1;
                    continue;
                }
                let taken = match op {
                    0x10 => acc == v,
                    0x20 => acc > v,
                    0x30 => acc >= v,
                    0x40 => acc & v != 0,
                    _ => panic!("unsupported jmp {op:#x}"),
                };
                pc += 1 + if taken { ins.jt as usize } else { ins.jf as usize };
                continue;
            }
            0x06 => return ins.k,
            0x07 => {
                if ins.code & 0xf8 == 0x00 {
                    x = acc
                } else {
                    acc = x
                }
            }
            _ => unreachable!(),
        }
        pc += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALLOW_RET: u32 = 0x7fff_0000;
    const EPERM_RET: u32 = SECCOMP_RET_ERRNO | libc::EPERM as u32;
    const ENOSYS_RET: u32 = SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
    const AUDIT_ARCH_I386: u32 = 0x4000_0003;

    fn prog() -> BpfProgram {
        build_program(&FilterOptions::default()).unwrap()
    }

    fn eval(nr: i64, args: [u64; 6]) -> u32 {
        run_bpf(&prog(), nr as u32, AUDIT_ARCH_X86_64, args)
    }

    #[test]
    fn ordinary_syscalls_are_allowed() {
        for nr in [libc::SYS_read, libc::SYS_write, libc::SYS_openat, libc::SYS_execve, libc::SYS_futex] {
            assert_eq!(eval(nr, [0; 6]), ALLOW_RET, "syscall {nr}");
        }
    }

    #[test]
    fn hard_denied_syscalls_answer_eperm() {
        for (name, nr, _) in hard_deny() {
            if ["clone3", "personality"].contains(&name) {
                continue;
            }
            assert_eq!(eval(nr, [0; 6]), EPERM_RET, "{name}");
        }
    }

    #[test]
    fn the_policy_syscall_table_agrees_with_seccompiler_and_libc() {
        // seccompiler's own name table, through its JSON front end: a filter naming the syscall
        // compiles, and its program compares the syscall number with the table's.
        for (name, nr) in syscalls::X86_64 {
            let json = format!(
                r#"{{"t": {{"mismatch_action": "allow", "match_action": "trap", "filter": [{{"syscall": "{name}"}}]}}}}"#
            );
            let progs = seccompiler::compile_from_json(json.as_bytes(), seccompiler::TargetArch::x86_64)
                .unwrap_or_else(|e| panic!("seccompiler does not know `{name}`: {e}"));
            let hit = progs["t"].iter().any(|i| i.code == BPF_JEQ_K && i.k == *nr as u32);
            assert!(hit, "`{name}`: seccompiler's number is not {nr}");
        }
        assert!(syscalls::X86_64.len() > 370, "the table lost entries");
        // The libc constants the allow-list is written with.
        for (name, nr) in ALLOW {
            assert_eq!(syscall_number(name.trim_start_matches("SYS_")), Some(*nr), "{name}");
        }
        for (name, nr) in [("clone", libc::SYS_clone), ("socket", libc::SYS_socket), ("ioctl", libc::SYS_ioctl)] {
            assert_eq!(syscall_number(name), Some(nr), "{name}");
        }
        for (name, nr) in
            [("clone3", libc::SYS_clone3), ("io_uring_setup", libc::SYS_io_uring_setup), ("bpf", libc::SYS_bpf)]
        {
            assert_eq!(hard_deny().find(|(n, _, _)| *n == name).map(|(_, nr, _)| nr), Some(nr), "{name}");
        }
    }

    #[test]
    fn unknown_syscall_numbers_answer_eperm() {
        assert_eq!(eval(600, [0; 6]), EPERM_RET); // no syscall has this number (yet)
        assert_eq!(eval(0x3fff_ffff, [0; 6]), EPERM_RET);
    }

    #[test]
    fn x32_syscalls_are_refused_even_for_allowed_numbers() {
        for nr in [libc::SYS_read, libc::SYS_getpid, libc::SYS_write] {
            let x32 = X32_SYSCALL_BIT | nr as u32;
            assert_eq!(run_bpf(&prog(), x32, AUDIT_ARCH_X86_64, [0; 6]), ENOSYS_RET);
        }
    }

    #[test]
    fn the_32_bit_abi_is_refused() {
        // i386 getpid is 20, read is 3: with a foreign arch nothing is allowed.
        for nr in [20u32, 3, 0] {
            assert_eq!(run_bpf(&prog(), nr, AUDIT_ARCH_I386, [0; 6]), ENOSYS_RET);
        }
    }

    #[test]
    fn clone_is_allowed_for_threads_but_not_namespaces() {
        let thread_flags = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM
            | libc::CLONE_SETTLS
            | libc::CLONE_PARENT_SETTID
            | libc::CLONE_CHILD_CLEARTID) as u64;
        assert_eq!(eval(libc::SYS_clone, [thread_flags, 0, 0, 0, 0, 0]), ALLOW_RET);
        assert_eq!(eval(libc::SYS_clone, [libc::SIGCHLD as u64, 0, 0, 0, 0, 0]), ALLOW_RET);
        for ns in [libc::CLONE_NEWUSER, libc::CLONE_NEWNS, libc::CLONE_NEWPID, libc::CLONE_NEWNET] {
            let flags = libc::SIGCHLD as u64 | ns as u64;
            assert_eq!(eval(libc::SYS_clone, [flags, 0, 0, 0, 0, 0]), EPERM_RET, "flag {ns:#x}");
        }
        assert_eq!(eval(libc::SYS_clone3, [0; 6]), ENOSYS_RET);
    }

    #[test]
    fn tiocsti_and_tioclinux_are_refused_whatever_the_high_bits() {
        assert_eq!(eval(libc::SYS_ioctl, [0, TIOCSTI, 0, 0, 0, 0]), EPERM_RET);
        assert_eq!(eval(libc::SYS_ioctl, [0, TIOCLINUX, 0, 0, 0, 0]), EPERM_RET);
        assert_eq!(eval(libc::SYS_ioctl, [0, TIOCSTI | (1 << 32), 0, 0, 0, 0]), EPERM_RET);
        assert_eq!(eval(libc::SYS_ioctl, [0, libc::TCGETS, 0, 0, 0, 0]), ALLOW_RET);
    }

    #[test]
    fn socket_families_are_filtered() {
        assert_eq!(eval(libc::SYS_socket, [libc::AF_INET as u64, 1, 0, 0, 0, 0]), ALLOW_RET);
        assert_eq!(eval(libc::SYS_socket, [libc::AF_PACKET as u64, 3, 0, 0, 0, 0]), EPERM_RET);
        assert_eq!(eval(libc::SYS_socket, [libc::AF_ALG as u64, 5, 0, 0, 0, 0]), EPERM_RET);
        let unix_only = build_program(&FilterOptions { unix_sockets_only: true, ..Default::default() }).unwrap();
        let r = run_bpf(&unix_only, libc::SYS_socket as u32, AUDIT_ARCH_X86_64, [libc::AF_INET as u64, 1, 0, 0, 0, 0]);
        assert_eq!(r, EPERM_RET);
        let r = run_bpf(&unix_only, libc::SYS_socket as u32, AUDIT_ARCH_X86_64, [libc::AF_UNIX as u64, 1, 0, 0, 0, 0]);
        assert_eq!(r, ALLOW_RET);
    }

    #[test]
    fn every_syscall_number_gets_exactly_the_allow_list_answer() {
        // Exhaustive over the whole x86_64 table (and beyond): the search tree must agree with
        // the allow-list on every number, not only on the ones spot-checked above.
        let opts = FilterOptions::default();
        let a = allowed(&opts).unwrap();
        let p = build_program(&opts).unwrap();
        let conditional = [libc::SYS_clone, libc::SYS_ioctl, libc::SYS_socket, libc::SYS_personality, libc::SYS_clone3];
        for nr in 0..1024i64 {
            if conditional.contains(&nr) {
                continue;
            }
            let want = if a.plain.contains(&nr) { ALLOW_RET } else { EPERM_RET };
            assert_eq!(run_bpf(&p, nr as u32, AUDIT_ARCH_X86_64, [0; 6]), want, "syscall {nr}");
        }
        assert!(a.plain.len() > 200, "the allow-list lost entries: {}", a.plain.len());
        // Small enough to load fast and evaluate in a few dozen instructions.
        assert!(p.len() < 700, "program has {} instructions", p.len());
    }

    #[test]
    fn policy_extra_deny_and_allow() {
        let opts = FilterOptions { extra_deny: vec!["mkdir".into()], ..Default::default() };
        let p = build_program(&opts).unwrap();
        assert_eq!(run_bpf(&p, libc::SYS_mkdir as u32, AUDIT_ARCH_X86_64, [0; 6]), EPERM_RET);
        let bad = FilterOptions { extra_allow: vec!["ptrace".into()], ..Default::default() };
        assert!(matches!(build_program(&bad), Err(SeccompError::HardDenied(n, _)) if n == "ptrace"));
        let unknown = FilterOptions { extra_deny: vec!["no_such_call".into()], ..Default::default() };
        assert!(matches!(build_program(&unknown), Err(SeccompError::UnknownSyscall(n)) if n == "no_such_call"));
    }

    #[test]
    fn with_notify_every_denial_goes_to_the_supervisor_and_nothing_else_does() {
        let plain = build_program(&FilterOptions::default()).unwrap();
        let notify = build_program(&FilterOptions { notify: true, ..Default::default() }).unwrap();
        assert_eq!(plain.len(), notify.len());
        let probe = |prog: &[sock_filter], nr: i64, arch: u32| run_bpf(prog, nr as u32, arch, [0; 6]);
        for nr in [libc::SYS_bpf, libc::SYS_ptrace, libc::SYS_kexec_load, libc::SYS_io_uring_setup] {
            assert_eq!(probe(&plain, nr, AUDIT_ARCH_X86_64), RET_EPERM);
            assert_eq!(probe(&notify, nr, AUDIT_ARCH_X86_64), RET_USER_NOTIF, "syscall {nr}");
        }
        for nr in [libc::SYS_read, libc::SYS_openat, libc::SYS_execve] {
            assert_eq!(probe(&notify, nr, AUDIT_ARCH_X86_64), RET_ALLOW);
        }
        // Namespace flags on clone are a denial too; the guard's ENOSYS answers are not.
        assert_eq!(
            run_bpf(&notify, libc::SYS_clone as u32, AUDIT_ARCH_X86_64, [libc::CLONE_NEWUSER as u64, 0, 0, 0, 0, 0]),
            RET_USER_NOTIF
        );
        assert_eq!(probe(&notify, libc::SYS_clone3, AUDIT_ARCH_X86_64), RET_ENOSYS);
        assert_eq!(probe(&notify, 1, 0x4000_0003), RET_ENOSYS);
        assert_eq!(syscall_name(libc::SYS_bpf), Some("bpf"));
        assert_eq!(syscall_name(libc::SYS_read), Some("read"));
    }

    #[test]
    fn observing_sends_the_allowed_path_syscalls_to_the_supervisor_and_keeps_every_denial() {
        let opts =
            FilterOptions { notify: true, observe: true, extra_deny: vec!["mkdir".into()], ..Default::default() };
        let learn = build_program(&opts).unwrap();
        let probe = |nr: i64| run_bpf(&learn, nr as u32, AUDIT_ARCH_X86_64, [0; 6]);
        for nr in [libc::SYS_openat, libc::SYS_execve, libc::SYS_newfstatat, libc::SYS_unlink, libc::SYS_renameat2] {
            assert_eq!(probe(nr), RET_USER_NOTIF, "syscall {nr}");
            assert!(observed(nr).is_some());
        }
        // Not a path syscall: allowed by the filter itself.
        for nr in [libc::SYS_read, libc::SYS_write, libc::SYS_mmap, libc::SYS_fstat] {
            assert_eq!(probe(nr), RET_ALLOW, "syscall {nr}");
        }
        // Denied ones are still notified (and answered EPERM by the supervisor, which tells them
        // apart: they are not observed, or not allowed, like mkdir here).
        assert_eq!(probe(libc::SYS_ptrace), RET_USER_NOTIF);
        assert_eq!(probe(libc::SYS_mkdir), RET_USER_NOTIF);
        assert!(!allowed(&opts).unwrap().plain.contains(&libc::SYS_mkdir));
        // The guard still runs first; clone with namespace flags is still a denial.
        assert_eq!(probe(libc::SYS_clone3), RET_ENOSYS);
        assert_eq!(run_bpf(&learn, libc::SYS_openat as u32, 0x4000_0003, [0; 6]), RET_ENOSYS);
        // Without a supervisor nothing is observed.
        let plain = build_program(&FilterOptions { observe: true, ..Default::default() }).unwrap();
        assert_eq!(run_bpf(&plain, libc::SYS_openat as u32, AUDIT_ARCH_X86_64, [0; 6]), RET_ALLOW);
        // Every observed syscall is in the allow-list by default.
        let a = allowed(&FilterOptions::default()).unwrap();
        for (nr, _) in OBSERVED {
            assert!(a.plain.contains(nr), "observed syscall {nr} is not allowed");
        }
    }
}

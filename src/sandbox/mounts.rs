//! The sandbox's filesystem view, built inside its own mount namespace:
//! a tmpfs root holding only what the policy grants, a fresh /proc, a minimal /dev, a private
//! size-capped /tmp, then pivot_root with the old root detached.
//!
//! The host tree stays reachable during construction under `/oldroot` (a first pivot_root onto
//! a scratch tmpfs), so that binds never depend on what the new root hides.
//!
//! Grants are mounted by handle, not by path: each is opened once, with `openat2` refusing every
//! symlink on the way (`RESOLVE_NO_SYMLINKS`, magic links included), and the mount is cloned from
//! that handle (`open_tree`) and attached with `move_mount`. mcpbox resolved the policy's
//! symlinks when it planned the sandbox; a symlink that appears since (planted in a tree the
//! server can write, between planning and mounting) makes the start fail, and is never followed.

use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{symlink, DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::Mode;
use nix::unistd::{chdir, pivot_root};

use super::spec::{Access, SandboxSpec};
use super::sys::{
    mount_setattr, move_mount_fd, open_tree_clone, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC, MOUNT_ATTR_NOSUID,
    MOUNT_ATTR_RDONLY,
};

#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct MountError {
    pub what: &'static str,
    pub path: PathBuf,
    pub source: io::Error,
}

fn err<'a, E: Into<io::Error>>(what: &'static str, path: &'a Path) -> impl FnOnce(E) -> MountError + 'a {
    move |e| MountError { what, path: path.to_path_buf(), source: e.into() }
}

const BASE: &str = "/tmp";
const OLD: &str = "/oldroot";
const NEW: &str = "/newroot";

fn inside(root: &str, p: &Path) -> PathBuf {
    Path::new(root).join(p.strip_prefix("/").unwrap_or(p))
}

fn mkdir_p(p: &Path) -> Result<(), MountError> {
    fs::DirBuilder::new().recursive(true).mode(0o755).create(p).map_err(err("mkdir", p))
}

fn tmpfs(target: &Path, flags: MsFlags, data: &str) -> Result<(), MountError> {
    mount(Some("tmpfs"), target, Some("tmpfs"), flags, Some(data)).map_err(err("mount tmpfs on", target))
}

fn bind(src: &Path, dst: &Path) -> Result<(), MountError> {
    mount(Some(src), dst, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
        .map_err(err("bind mount", src))
}

fn setattr(p: &Path, attrs: u64, recursive: bool) -> Result<(), MountError> {
    mount_setattr(&p.to_string_lossy(), attrs, recursive).map_err(err("mount_setattr", p))
}

/// Open `path` (absolute) below the directory `under` as an `O_PATH` handle, refusing every
/// symlink on the way, the last component included (ELOOP), and `..`.
pub(super) fn open_nofollow(under: impl AsFd, path: &Path) -> Result<OwnedFd, MountError> {
    let rel = path.strip_prefix("/").unwrap_or(path);
    let rel = if rel.as_os_str().is_empty() { Path::new(".") } else { rel };
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .mode(Mode::empty())
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS | ResolveFlag::RESOLVE_BENEATH);
    openat2(under, rel, how).map_err(err("open (no symlinks)", path))
}

/// Mount what the handle `src` refers to (with every mount below it) on `dst`, as a recursive
/// bind mount would, without looking its path up again.
fn bind_handle(src: &OwnedFd, dst: &Path, shown: &Path) -> Result<(), MountError> {
    let tree = open_tree_clone(src.as_fd()).map_err(err("open_tree", shown))?;
    let target = open_nofollow(fs::File::open("/").map_err(err("open", Path::new("/")))?, dst)?;
    move_mount_fd(tree.as_fd(), target.as_fd()).map_err(err("move_mount", shown))
}
/// Build the view and pivot into it. Runs as PID 1 of the new PID namespace, with all
/// capabilities of the new user namespace. `disk`: the data dir's own filesystem (`[limits]
/// disk`, see `disk`), mounted detached by the outer sandbox-init.
pub fn build_root(spec: &SandboxSpec, disk: Option<OwnedFd>) -> Result<(), MountError> {
    let root = Path::new("/");
    // Nothing we do may propagate back to the host.
    mount(None::<&str>, root, None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .map_err(err("make private", root))?;

    // 1. A scratch tmpfs becomes the root for a while; the host tree moves to /oldroot.
    let base = Path::new(BASE);
    tmpfs(base, MsFlags::MS_NOSUID | MsFlags::MS_NODEV, "mode=0755,size=1m")?;
    mkdir_p(&inside(BASE, Path::new(OLD)))?;
    chdir(base).map_err(err("chdir", base))?;
    pivot_root(".", &inside(".", Path::new(OLD))).map_err(err("pivot_root to scratch", base))?;
    chdir(root).map_err(err("chdir", root))?;
    let old = fs::File::open(OLD).map_err(err("open", Path::new(OLD)))?;

    // 1b. The data dir's own filesystem over the host's data dir, in our copy of the host tree:
    //     grants of the data dir (or below it) then reach it like any other path.
    if let (Some(fd), Some(img)) = (disk, &spec.outer.disk) {
        let at = open_nofollow(&old, &img.at)?;
        move_mount_fd(fd.as_fd(), at.as_fd()).map_err(err("move_mount disk image onto", &img.at))?;
    }

    // 2. The new root: an empty tmpfs, read-only once populated.
    let new = Path::new(NEW);
    mkdir_p(new)?;
    tmpfs(new, MsFlags::MS_NOSUID | MsFlags::MS_NODEV, "mode=0755,size=1m")?;

    // 3. /proc: a fresh procfs for the new PID namespace; /proc/sys read-only on top.
    let proc_ = inside(NEW, Path::new("/proc"));
    mkdir_p(&proc_)?;
    mount(
        Some("proc"),
        &proc_,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(err("mount proc on", &proc_))?;
    let sys = proc_.join("sys");
    bind(&sys, &sys)?;
    setattr(&sys, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC, true)?;

    // 4. /dev: the harmless character devices, no tty, a small /dev/shm.
    let dev = inside(NEW, Path::new("/dev"));
    mkdir_p(&dev)?;
    tmpfs(&dev, MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, "mode=0755,size=64k")?;
    for node in ["null", "zero", "full", "random", "urandom"] {
        let dst = dev.join(node);
        fs::File::create(&dst).map_err(err("create", &dst))?;
        bind(&inside(OLD, &Path::new("/dev").join(node)), &dst)?;
        setattr(&dst, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC, false)?;
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let p = dev.join(name);
        symlink(target, &p).map_err(err("symlink", &p))?;
    }
    let shm = dev.join("shm");
    mkdir_p(&shm)?;
    let tmp_size = spec.outer.limits.tmp.unwrap_or(64 << 20);
    tmpfs(&shm, MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC, &format!("mode=1777,size={tmp_size}"))?;
    setattr(&dev, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC, false)?;

    // 5. /tmp: private and size-capped.
    let tmp = inside(NEW, Path::new("/tmp"));
    mkdir_p(&tmp)?;
    tmpfs(&tmp, MsFlags::MS_NOSUID | MsFlags::MS_NODEV, &format!("mode=1777,size={tmp_size}"))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777)).map_err(err("chmod", &tmp))?;

    // 6. The policy's grants, parents before children, read-only unless writable; each opened
    //    once without following symlinks and mounted from that handle. None may cover the
    //    sandbox's own /proc, /dev, /tmp (refused when the policy was loaded; checked again).
    let mut grants = spec.grants.clone();
    grants.sort_by(|a, b| a.path.cmp(&b.path));
    for g in &grants {
        if let Some(why) = crate::policy::reserved_conflict(&g.path) {
            return Err(MountError { what: "grant", path: g.path.clone(), source: io::Error::other(why) });
        }
        let src = open_nofollow(&old, &g.path)?;
        let is_dir =
            nix::sys::stat::fstat(&src).map_err(err("fstat", &g.path))?.st_mode & libc::S_IFMT == libc::S_IFDIR;
        if is_dir != g.dir {
            let what = if g.dir {
                "was a directory when planned, is not now"
            } else {
                "was a file when planned, is a directory now"
            };
            return Err(MountError { what: "grant", path: g.path.clone(), source: io::Error::other(what) });
        }
        let dst = inside(NEW, &g.path);
        if fs::symlink_metadata(&dst).is_err() {
            if g.dir {
                mkdir_p(&dst)?;
            } else {
                if let Some(parent) = dst.parent() {
                    mkdir_p(parent)?;
                }
                fs::File::create(&dst).map_err(err("create", &dst))?;
            }
        }
        bind_handle(&src, &dst, &g.path)?;
        let mut attrs = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
        if g.access != Access::Write {
            attrs |= MOUNT_ATTR_RDONLY;
        }
        setattr(&dst, attrs, true)?;
    }
    for l in &spec.links {
        let dst = inside(NEW, &l.path);
        if fs::symlink_metadata(&dst).is_ok() {
            continue;
        }
        if let Some(parent) = dst.parent() {
            mkdir_p(parent)?;
        }
        symlink(&l.target, &dst).map_err(err("symlink", &dst))?;
    }
    if fs::symlink_metadata(inside(NEW, &spec.cwd)).is_err() {
        mkdir_p(&inside(NEW, &spec.cwd))?;
    }
    // Grants under /tmp hang from directories made in the private, writable /tmp tmpfs. Those
    // directories stand for host paths the policy did not grant: make them read-only, so that
    // writing beside a grant fails (EROFS) as it would anywhere else, instead of silently
    // landing in the sandbox's /tmp.
    let mut tops: Vec<PathBuf> = grants
        .iter()
        .filter_map(|g| g.path.strip_prefix("/tmp").ok()?.components().next().map(|c| Path::new("/tmp").join(c)))
        .filter(|top| !grants.iter().any(|g| &g.path == top))
        .collect();
    tops.sort();
    tops.dedup();
    for top in tops {
        let p = inside(NEW, &top);
        bind(&p, &p)?;
        setattr(&p, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, false)?;
    }

    // 7. Freeze the root, then pivot into it and let go of the host tree for good.
    drop(old);
    setattr(new, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, false)?;
    chdir(new).map_err(err("chdir", new))?;
    pivot_root(".", ".").map_err(err("pivot_root into", new))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(err("detach old root", root))?;
    chdir(root).map_err(err("chdir", root))?;
    Ok(())
}

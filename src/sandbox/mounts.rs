//! The sandbox's filesystem view, built inside its own mount namespace:
//! a tmpfs root holding only what the policy grants, a fresh /proc, a minimal /dev, a private
//! size-capped /tmp, then pivot_root with the old root detached.
//!
//! The host tree stays reachable during construction under `/oldroot` (a first pivot_root onto
//! a scratch tmpfs), so that binds never depend on what the new root hides.

use std::fs;
use std::io;
use std::os::unix::fs::{symlink, DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::unistd::{chdir, pivot_root};

use super::spec::{Access, SandboxSpec};
use super::sys::{mount_setattr, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY};

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
    mount(Some(src), dst, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>).map_err(err("bind mount", src))
}

fn setattr(p: &Path, attrs: u64, recursive: bool) -> Result<(), MountError> {
    mount_setattr(&p.to_string_lossy(), attrs, recursive).map_err(err("mount_setattr", p))
}

/// Build the view and pivot into it. Runs as PID 1 of the new PID namespace, with all
/// capabilities of the new user namespace.
pub fn build_root(spec: &SandboxSpec) -> Result<(), MountError> {
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
    for (name, target) in [("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")] {
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

    // 6. The policy's grants, parents before children, read-only unless writable.
    let mut grants = spec.grants.clone();
    grants.sort_by(|a, b| a.path.cmp(&b.path));
    for g in &grants {
        let src = inside(OLD, &g.path);
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
        bind(&src, &dst)?;
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
    setattr(new, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, false)?;
    chdir(new).map_err(err("chdir", new))?;
    pivot_root(".", ".").map_err(err("pivot_root into", new))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(err("detach old root", root))?;
    chdir(root).map_err(err("chdir", root))?;
    Ok(())
}

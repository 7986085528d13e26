//! `[limits] disk`: the server's data dir as a size-capped filesystem of its own, so that the
//! kernel stops it (ENOSPC) at its limit and the host's disk never fills up.
//!
//! mcpbox (root) keeps one ext4 image per server (`STATE/NAME/data.img`, see `launch`);
//! sandbox-init, still host root, binds it to a loop device that detaches by itself once
//! unmounted, and makes a *detached* mount of it (fsmount): it is attached only inside the
//! sandbox's mount namespace, by PID 1 (see `mounts`), and goes away with the sandbox. Sandboxes
//! of one server running at once share the loop device, and so one superblock: two mounts of
//! one image through two devices would corrupt it.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use super::spec::DiskImage;
use super::sys;

#[derive(Debug, thiserror::Error)]
#[error("disk image {image}: {what}: {source}")]
pub struct DiskError {
    pub image: String,
    pub what: &'static str,
    pub source: io::Error,
}

/// Mount `img`'s filesystem, detached; the descriptor is what PID 1 attaches over the data dir.
pub fn mount_image(img: &DiskImage) -> Result<OwnedFd, DiskError> {
    let e = |what: &'static str| {
        move |source: io::Error| DiskError { image: img.image.display().to_string(), what, source }
    };
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&img.image)
        .map_err(e("open"))?;
    let meta = file.metadata().map_err(e("stat"))?;
    if !meta.is_file() || meta.uid() != 0 {
        return Err(e("check")(io::Error::other("not a regular file owned by root")));
    }
    // One start at a time per image: finding a device bound to it and binding one must not
    // interleave, or two devices (two superblocks) could end up on one image.
    let file = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, errno)| e("flock")(errno.into()))?;
    let (path, dev) = match bound_device(&img.image, (meta.dev(), meta.ino())) {
        Some(found) => found,
        None => sys::loop_attach(&file).map_err(e("binding a loop device"))?,
    };
    let mnt = sys::fsmount_dev("ext4", &path, sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV).map_err(e("mounting"))?;
    // The mount holds the device now; closing ours lets it detach once the last mount goes.
    drop(dev);
    drop(file);
    Ok(mnt)
}

/// A loop device already bound to the image (another sandbox of the same server runs), opened:
/// an open device is not detached under us. Checked by device and inode, not by name.
fn bound_device(image: &Path, id: (u64, u64)) -> Option<(String, fs::File)> {
    let want = image.as_os_str().as_encoded_bytes();
    for entry in fs::read_dir("/sys/block").ok()?.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|n| n.starts_with("loop")) else { continue };
        let Ok(backing) = fs::read(entry.path().join("loop/backing_file")) else { continue };
        if backing.strip_suffix(b"\n").unwrap_or(&backing) != want {
            continue;
        }
        let path = format!("/dev/{name}");
        let Ok(dev) = fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open(&path) else {
            continue;
        };
        if sys::loop_backing(&dev).ok() == Some(id) {
            return Some((path, dev));
        }
    }
    None
}

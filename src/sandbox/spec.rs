//! What `sandbox-init` receives on its inherited fd: everything it needs, decided before the fork.
//!
//! Two messages travel on it, each a little-endian u32 length and that much JSON: first the
//! [`OuterSpec`] (what the process outside the namespaces needs: identities, cgroups, which
//! namespaces), then the whole [`SandboxSpec`] (read by PID 1, or by the outer process at
//! container level, before the server is forked). `mcpbox run` sends the first as soon as the
//! policy is loaded, so that the namespaces are being made while it resolves the grants. An end
//! of file before a message means mcpbox gave up: sandbox-init exits without a word.
//!
//! And what travels back on the report socket: [`Msg`] (the proxy socket, [`StartReport`] or an
//! error). Both ends of both channels (`launch` in mcpbox, `init` in sandbox-init) import their
//! wire types from here.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::policy::{Level, Limits, Network, Relax};

/// A mount/Landlock grant, after symlinks were resolved by the supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Canonical path on the host (symlinks resolved).
    pub path: PathBuf,
    pub access: Access,
    /// Directory (true) or file.
    pub dir: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// List directories only (the sandbox's own root at full level).
    List,
    Read,
    Exec,
    Write,
}

/// A symlink recreated inside the sandbox root (e.g. `/lib64 -> usr/lib64` on merged-/usr hosts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub path: PathBuf,
    pub target: PathBuf,
}

/// The complete, self-contained description of one sandboxed process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// What the outer sandbox-init needs (sent ahead of the rest by `mcpbox run`).
    #[serde(flatten)]
    pub outer: OuterSpec,
    /// argv[0] must be an absolute path inside the sandbox.
    pub argv: Vec<String>,
    /// The whole environment of the server; nothing else is passed.
    pub env: BTreeMap<String, String>,
    pub cwd: PathBuf,
    /// A private host directory used as TMPDIR at container level (at full level /tmp is a
    /// private tmpfs).
    pub tmp_dir: PathBuf,
    pub grants: Vec<Grant>,
    pub links: Vec<Link>,
    /// Syscall names denied on top of the default allow-list.
    pub seccomp_extra_deny: Vec<String>,
    pub seccomp_extra_allow: Vec<String>,
    pub landlock_min_abi: u8,
    /// `mcpbox policy learn`: path syscalls go to mcpbox's seccomp listener too, which records
    /// them and lets them continue. Without a listener the sandbox does not start.
    #[serde(default)]
    pub observe: bool,
}

/// The part of a [`SandboxSpec`] the outer sandbox-init needs before PID 1 exists: identities,
/// limits, which namespaces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OuterSpec {
    /// Server name (hostname inside, cgroup name, logs).
    pub name: String,
    pub network: Network,
    pub limits: Limits,
    pub min_level: Level,
    /// Host uid/gid the server runs as when mcpbox is root (None when rootless: the caller's own).
    pub host_ids: Option<(u32, u32)>,
    /// uid/gid the server sees inside its user namespace.
    pub inner_uid: u32,
    pub inner_gid: u32,
    /// pid of the process that spawned sandbox-init (PDEATHSIG race check).
    pub parent_pid: i32,
    /// cgroup v1/v2 parent under which the sandbox's cgroups are (root only).
    pub cgroup_parent: String,
    /// Where the host mounts its cgroup controllers, as mcpbox found them (root only; read by
    /// sandbox-init itself when absent).
    #[serde(default)]
    pub cgroup_layout: Option<super::CgroupLayout>,
    /// The sandbox's CPU weight against its siblings (cgroup v2 `cpu.weight`, 1-10000; None:
    /// the kernel's 100). For the supervisor: warm-pool and background sandboxes started lower
    /// yield to live sessions.
    #[serde(default)]
    pub cpu_weight: Option<u32>,
    /// Limits the policy accepts unenforced (`[sandbox] relax`).
    #[serde(default)]
    pub relax: Relax,
    /// The server's data dir as a size-capped filesystem (`[limits] disk`, root only).
    #[serde(default)]
    pub disk: Option<DiskImage>,
    /// KSM may merge this sandbox's pages (`mcpbox.memoryMerge`): sandbox-init sets
    /// `PR_SET_MEMORY_MERGE` on itself, and every process of the sandbox inherits it.
    #[serde(default)]
    pub memory_merge: bool,
}

/// `[limits] disk` as root: an ext4 image file per server (made by mcpbox, owned by root,
/// `STATE/NAME/data.img`), which sandbox-init attaches to a loop device and mounts, private to
/// the sandbox, over the data dir `at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskImage {
    pub image: PathBuf,
    pub at: PathBuf,
}

/// One message of the spec stream: its length, then its JSON.
pub fn frame<T: Serialize>(msg: &T) -> Vec<u8> {
    let json = serde_json::to_vec(msg).expect("specs serialize");
    let mut out = (json.len() as u32).to_le_bytes().to_vec();
    out.extend(json);
    out
}

/// Read one message; `Ok(None)` at end of file before it starts.
pub fn read_frame<T: serde::de::DeserializeOwned>(r: &mut impl std::io::Read) -> std::io::Result<Option<T>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let mut buf = vec![0u8; u32::from_le_bytes(len) as usize];
    r.read_exact(&mut buf)?;
    serde_json::from_slice(&buf).map(Some).map_err(std::io::Error::other)
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
    /// The server's host pid (as the kernel gave it with the report; Landlock's audit records
    /// name it), filled in by mcpbox.
    #[serde(skip)]
    pub server_pid: Option<u32>,
}

/// Messages from sandbox-init to mcpbox over the report socket (SOCK_SEQPACKET: one message
/// per datagram). The socket is close-on-exec: end of stream means the server was exec'd.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Msg {
    /// Carries the listening socket of the egress proxy as SCM_RIGHTS.
    Proxy,
    /// Carries the seccomp notification listener as SCM_RIGHTS: mcpbox answers the server's
    /// denied syscalls (EPERM) and records them.
    SeccompNotify,
    Ready(StartReport),
    Error {
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Msg {
        a: u32,
        b: String,
    }

    #[test]
    fn frames_read_back_in_order_then_end_of_file() {
        let mut stream = frame(&Msg { a: 1, b: "x".into() });
        stream.extend(frame(&Msg { a: 2, b: "y y".into() }));
        let mut r = std::io::Cursor::new(stream);
        assert_eq!(read_frame::<Msg>(&mut r).unwrap(), Some(Msg { a: 1, b: "x".into() }));
        assert_eq!(read_frame::<Msg>(&mut r).unwrap(), Some(Msg { a: 2, b: "y y".into() }));
        assert_eq!(read_frame::<Msg>(&mut r).unwrap(), None);
    }

    #[test]
    fn a_cut_or_garbled_frame_is_an_error_not_the_end() {
        let whole = frame(&Msg { a: 7, b: "seven".into() });
        for cut in [2, 4, whole.len() - 1] {
            let mut r = std::io::Cursor::new(whole[..cut].to_vec());
            assert!(read_frame::<Msg>(&mut r).is_err(), "cut at {cut}");
        }
        let mut bad = 3u32.to_le_bytes().to_vec();
        bad.extend(b"{x}");
        assert!(read_frame::<Msg>(&mut std::io::Cursor::new(bad)).is_err());
    }
}

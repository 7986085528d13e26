//! Landlock: filesystem rights from the policy, TCP ports where the policy narrows the host
//! network, abstract-unix-socket and signal scoping. The ABI is the kernel's own (the best it
//! has); the rights handled are exactly that ABI's, and the status reached is checked.
//!
//! From ABI 7 on, the domain is created with `LANDLOCK_RESTRICT_SELF_LOG_NEW_EXEC_ON`: by default
//! the kernel logs (as audit records) only the denials of the process that called
//! `landlock_restrict_self` until it execs, i.e. none of the server's. With the flag, what the
//! server and its children are refused is logged, and `super::audit` turns it into denials of
//! the server. Before ABI 7 the kernel logs nothing and a warning says so.

use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, NetPort, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

use super::spec::Access as Grant;

#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    #[error("Landlock is not available on this kernel (the policy requires ABI {required}); enable it with the `lsm=landlock,…` boot parameter, or set [sandbox] landlock_min_abi = 0 to run without it")]
    Unavailable { required: u8 },
    #[error("Landlock ABI {have} is older than the ABI {required} the policy requires")]
    TooOld { have: u8, required: u8 },
    #[error("Landlock rule for {path}: {source}")]
    Path { path: PathBuf, source: landlock::PathFdError },
    #[error("Landlock: {0}")]
    Ruleset(#[from] landlock::RulesetError),
    #[error("Landlock was not fully enforced ({0:?}); refusing to start the server")]
    NotEnforced(RulesetStatus),
}

/// One path rule, as seen from inside the sandbox.
pub struct Rule {
    pub path: PathBuf,
    pub access: Grant,
    pub dir: bool,
}

/// Network narrowing handled by Landlock.
pub enum NetRules {
    /// Not handled by Landlock (a network namespace, or the host network unrestricted).
    None,
    /// TCP bind/connect only to these ports (empty lists deny all TCP).
    Ports { connect: Vec<u16>, bind: Vec<u16> },
}

/// The first ABI whose domains can log the denials of the programs they exec.
pub const LOG_ABI: u8 = 7;

pub struct Outcome {
    pub abi: u8,
    pub warnings: Vec<String>,
}

fn rights(access: Grant, dir: bool, abi: ABI) -> BitFlags<AccessFs> {
    let read = AccessFs::from_read(abi) & !AccessFs::Execute;
    let r = match access {
        Grant::List => AccessFs::ReadDir.into(),
        Grant::Read => read,
        Grant::Exec => read | AccessFs::Execute,
        Grant::Write => AccessFs::from_all(abi),
    };
    if dir {
        r
    } else {
        r & AccessFs::from_file(abi)
    }
}

pub fn apply(rules: &[Rule], net: &NetRules, min_abi: u8) -> Result<Outcome, LandlockError> {
    let kernel = super::sys::landlock_abi();
    let mut warnings = Vec::new();
    if kernel == 0 {
        if min_abi == 0 {
            warnings.push("Landlock is not available on this kernel: the filesystem is confined by the mount namespace only (the policy allows this with landlock_min_abi = 0)".to_string());
            return Ok(Outcome { abi: 0, warnings });
        }
        return Err(LandlockError::Unavailable { required: min_abi });
    }
    if kernel < min_abi {
        return Err(LandlockError::TooOld { have: kernel, required: min_abi });
    }
    let abi = ABI::from(i32::from(kernel));
    let mut ruleset =
        Ruleset::default().set_compatibility(CompatLevel::HardRequirement).handle_access(AccessFs::from_all(abi))?;
    if let NetRules::Ports { .. } = net {
        if kernel < 4 {
            return Err(LandlockError::TooOld { have: kernel, required: 4 });
        }
        ruleset = ruleset.handle_access(AccessNet::from_all(abi))?;
    }
    if kernel >= 6 {
        ruleset = ruleset.scope(Scope::AbstractUnixSocket | Scope::Signal)?;
    } else {
        warnings.push(format!("Landlock ABI {kernel} cannot scope abstract unix sockets and signals (needs ABI 6)"));
    }
    let mut created = ruleset.create()?;
    if kernel >= LOG_ABI {
        created = created.log_new_exec(true)?;
    } else {
        warnings.push(format!(
            "Landlock ABI {kernel} cannot log what it refuses (needs ABI {LOG_ABI}, Linux 6.15): Landlock denials are not reported"
        ));
    }
    for rule in rules {
        let fd = PathFd::new(&rule.path).map_err(|source| LandlockError::Path { path: rule.path.clone(), source })?;
        created = created.add_rule(PathBeneath::new(fd, rights(rule.access, rule.dir, abi)))?;
    }
    if let NetRules::Ports { connect, bind } = net {
        for p in connect {
            created = created.add_rule(NetPort::new(*p, AccessNet::ConnectTcp))?;
        }
        for p in bind {
            created = created.add_rule(NetPort::new(*p, AccessNet::BindTcp))?;
        }
    }
    let status = created.restrict_self()?;
    if status.ruleset != RulesetStatus::FullyEnforced {
        return Err(LandlockError::NotEnforced(status.ruleset));
    }
    Ok(Outcome { abi: kernel, warnings })
}

/// Rules every sandbox needs besides its policy's grants: /proc read-only, the few device
/// nodes, and a private temporary directory.
pub fn base_rules(tmp: &Path) -> Vec<Rule> {
    let mut v = vec![
        Rule { path: "/proc".into(), access: Grant::Read, dir: true },
        Rule { path: tmp.to_path_buf(), access: Grant::Write, dir: true },
    ];
    for dev in ["null", "zero", "full"] {
        v.push(Rule { path: Path::new("/dev").join(dev), access: Grant::Write, dir: false });
    }
    for dev in ["random", "urandom"] {
        v.push(Rule { path: Path::new("/dev").join(dev), access: Grant::Read, dir: false });
    }
    v
}

//! `mcpbox doctor`: what this host can give a sandbox, layer by layer, and the level servers
//! will get — found by probing each layer, then by building a real sandbox.

use std::process::{ExitCode, Stdio};

use crate::plan::{plan, PolicyRef, ServerLaunch, StateDir};
use crate::policy::Level;
use crate::sandbox::probe;

fn trial(state: &StateDir, min: Level) -> Result<crate::sandbox::StartReport, String> {
    let launch = ServerLaunch {
        name: "doctor".into(),
        command: "/usr/bin/true".into(),
        args: vec![],
        env: Default::default(),
        policy: PolicyRef::Named("default".into()),
    };
    let mut state = state.clone();
    state.min_level = min;
    let planned = plan(&state, &launch).map_err(|e| format!("{e:#}"))?;
    let (mut child, report, _) =
        crate::sandbox::spawn_blocking_std(&planned.spec, Stdio::null(), Stdio::null(), Stdio::piped())
            .map_err(|e| e.to_string())?;
    let status = child.wait().map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("/usr/bin/true exited with {status} inside the sandbox"));
    }
    Ok(report)
}

pub fn doctor(state_dir: Option<std::path::PathBuf>) -> ExitCode {
    let uname = nix::sys::utsname::uname().ok();
    println!("mcpbox doctor: what this host gives a sandboxed server\n");
    if let Some(u) = &uname {
        println!("  {:<20} {} {}", "kernel", u.release().to_string_lossy(), u.machine().to_string_lossy());
    }
    let root = nix::unistd::geteuid().is_root();
    println!(
        "  {:<20} {}",
        "running as",
        if root {
            "root: each server runs under its own unprivileged host uid".to_string()
        } else {
            format!(
                "uid {} (rootless): servers run under this uid inside their own user namespace",
                nix::unistd::geteuid()
            )
        }
    );
    let layers = probe::layers();
    print!("{}", probe::render(&layers));
    let (_, ksm) = probe::ksm();
    println!(
        "  {:<20} {:<4} {ksm} (off unless the config asks: merged pages are a timing side channel)",
        "memory merge (KSM)", ""
    );
    runtimes();

    let tmp = match tempfile::Builder::new().prefix("mcpbox-doctor").tempdir() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("mcpbox doctor: temp dir: {e}");
            return ExitCode::FAILURE;
        }
    };
    let state = StateDir::new(state_dir.unwrap_or_else(|| tmp.path().join("state")));
    println!();
    match trial(&state, Level::Full) {
        Ok(r) => {
            println!(
                "  trial sandbox: ok in {:.1} ms (Landlock ABI {}, limits: {})",
                r.start_latency.as_secs_f64() * 1e3,
                r.landlock_abi,
                r.limits
            );
            for w in &r.warnings {
                println!("  weakened: {w}");
            }
            print!("{}", denials_reported(seccomp_recorded(&r.warnings), &landlock_reported()));
            println!("\nlevel: full");
            ExitCode::SUCCESS
        }
        Err(full_err) => {
            println!("  full-level trial failed: {full_err}");
            match trial(&state, Level::Container) {
                Ok(r) => {
                    for w in &r.warnings {
                        println!("  weakened: {w}");
                    }
                    print!("{}", denials_reported(seccomp_recorded(&r.warnings), &landlock_reported()));
                    println!("\nlevel: container (policies must say `[sandbox] level = \"container\"`, or run with `--min-level container`)");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    println!("  container-level trial failed: {e}");
                    println!("\nlevel: none: mcpbox cannot confine servers on this host");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Whether the trial sandbox's seccomp filter had its notification listener (see
/// `sandbox::init`: a warning says so when it had none).
fn seccomp_recorded(warnings: &[String]) -> bool {
    !warnings.iter().any(|w| w.contains("seccomp denials are not recorded"))
}

/// Whether `serve`/`run` would read Landlock's audit records here, as they start by default
/// (without `--enable-audit`: doctor changes nothing on the host).
fn landlock_reported() -> crate::sandbox::audit::Status {
    crate::sandbox::audit::probe(crate::sandbox::audit::Enable::IfOn)
}

/// Which layers' refusals mcpbox can report on this host (`policy suggest` works from these).
pub fn denials_reported(seccomp: bool, landlock: &crate::sandbox::audit::Status) -> String {
    let seccomp_detail = if seccomp {
        "every denied syscall goes to mcpbox (SECCOMP_RET_USER_NOTIF), is answered EPERM and is recorded"
    } else {
        "not reported: the kernel gave the trial sandbox no seccomp notification listener (before 5.0, or one already \
         above mcpbox); denied syscalls still get EPERM"
    };
    let landlock_ok = matches!(landlock, crate::sandbox::audit::Status::Reading { .. });
    let landlock_detail = landlock.describe();
    let rows = [
        ("egress", true, "every host:port the proxy refuses is logged, counted and recorded"),
        ("landlock", landlock_ok, landlock_detail.as_str()),
        ("seccomp", seccomp, seccomp_detail),
    ];
    let mut s = String::from("\n  denials reported (`mcpbox policy suggest`):\n");
    for (name, ok, detail) in rows {
        s.push_str(&format!("  {:<20} {:<4} {}\n", name, if ok { "ok" } else { "NO" }, detail));
    }
    s.push_str(
        "  (at level `full` a path outside the grants does not exist in the sandbox: ENOENT, from the mount view,\n   \
         not a Landlock denial; Landlock refuses what the view holds but the grant does not permit, e.g. executing\n   \
         a file under a `read` grant, and at level `container` everything outside the grants)\n",
    );
    s
}

/// The node and python the runtime bases find on the sandbox's PATH, and what they resolve to;
/// and, when mcpbox's own PATH finds a different one (nvm, pyenv), that one too, since servers
/// started by bare name do not get it.
fn runtimes() {
    use crate::plan::runtime::{self, Kind};
    use crate::plan::DEFAULT_PATH;
    println!("\n  runtimes (the `node`/`python` policy bases, for servers whose command is not an interpreter;");
    println!("  MCPBOX_NODE / MCPBOX_PYTHON if set, else found on the sandbox's PATH {DEFAULT_PATH}):");
    // No state dir exists here yet: nothing is excluded for lying under it.
    let no_state = &runtime::Untrusted::dir(std::path::Path::new("/nonexistent/mcpbox-doctor-state"));
    for kind in Kind::ALL {
        let found = runtime::discover(kind, None, DEFAULT_PATH, no_state);
        match &found {
            Ok(r) => println!("  {:<20} {}", kind.name(), r.describe()),
            Err(e) => println!("  {:<20} none usable: {e}", kind.name()),
        }
        let cmd = kind.default_command();
        let user_path = std::env::var("PATH").unwrap_or_default();
        let Ok(mine) = crate::plan::resolve_command(cmd, &user_path) else { continue };
        let real = std::fs::canonicalize(&mine).unwrap_or_else(|_| mine.clone());
        if found.as_ref().is_ok_and(|r| r.exe == real) {
            continue;
        }
        let elf = std::fs::read(&real).map(|b| b.starts_with(b"\x7fELF")).unwrap_or(false);
        if !elf {
            println!("  {:<20} `{cmd}` on your PATH is {} (a script: a version-manager shim?); servers need the interpreter itself as their command", "", mine.display());
            continue;
        }
        match runtime::describe(kind, &real, no_state) {
            Ok(r) => println!(
                "  {:<20} `{cmd}` on your PATH is another: {}; name it as the server's command to use it",
                "",
                r.describe()
            ),
            Err(e) => println!("  {:<20} `{cmd}` on your PATH ({}) is not usable: {e}", "", mine.display()),
        }
    }
}

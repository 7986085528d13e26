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
    let (mut child, report, _) = crate::sandbox::spawn_blocking_std(&planned.spec, Stdio::null(), Stdio::null(), Stdio::piped())
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
        if root { "root: each server runs under its own unprivileged host uid".to_string() } else { format!("uid {} (rootless): servers run under this uid inside their own user namespace", nix::unistd::geteuid()) }
    );
    let layers = probe::layers();
    print!("{}", probe::render(&layers));
    print!("{}", denials_reported());

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
            println!("  trial sandbox: ok in {:.1} ms (Landlock ABI {}, limits: {})", r.start_latency.as_secs_f64() * 1e3, r.landlock_abi, r.limits);
            for w in &r.warnings {
                println!("  weakened: {w}");
            }
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

/// Which layers' refusals mcpbox can report on this host (`policy suggest` works from these).
pub fn denials_reported() -> String {
    let rows = [
        ("egress", true, "every host:port the proxy refuses is logged, counted and recorded"),
        (
            "landlock",
            false,
            "not reported: mcpbox does not read the kernel's audit records yet; at level `full` a path outside \
             the grants does not exist in the sandbox (ENOENT), and the error the server prints is the only trace",
        ),
        ("seccomp", false, "not reported: a refused syscall returns EPERM to the server and is not recorded yet"),
    ];
    let mut s = String::from("\n  denials reported (`mcpbox policy suggest`):\n");
    for (name, ok, detail) in rows {
        s.push_str(&format!("  {:<20} {:<4} {}\n", name, if ok { "ok" } else { "NO" }, detail));
    }
    s
}

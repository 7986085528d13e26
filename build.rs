//! Link mcpbox with the functions a sandbox start runs side by side (link/startup-order.txt,
//! made by bench/startup-order.sh; docs/BENCHMARKS.md has why and what it saves).
//!
//! The option is lld's (`--symbol-ordering-file`; Rust links with lld on x86_64 Linux since
//! 1.90). Whether the linker in use takes it is tried on an empty program first: where it does
//! not, mcpbox is linked as usual, with a warning. Names the file does not match (after a
//! toolchain update, or functions renamed) are skipped silently: the order is an optimisation,
//! never a requirement.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn main() {
    let order = Path::new(env!("CARGO_MANIFEST_DIR")).join("link/startup-order.txt");
    println!("cargo:rerun-if-changed={}", order.display());
    if !order.is_file() {
        return;
    }
    let args = [format!("-Wl,--symbol-ordering-file={}", order.display()), "-Wl,--no-warn-symbol-ordering".to_string()];
    if linker_takes(&args) {
        for a in &args {
            println!("cargo:rustc-link-arg-bins={a}");
        }
    } else {
        println!("cargo:warning=the linker does not take --symbol-ordering-file: mcpbox is linked without link/startup-order.txt (starts are slower with a cold page cache)");
    }
}

/// Link an empty program for the target with `link_args` and the build's own flags.
fn linker_takes(link_args: &[String]) -> bool {
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let out = PathBuf::from(var("OUT_DIR"));
    let src = out.join("order_probe.rs");
    if std::fs::write(&src, "fn main() {}\n").is_err() {
        return false;
    }
    let mut cmd = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()));
    cmd.arg("--target").arg(var("TARGET")).arg("--crate-type=bin").arg("-o").arg(out.join("order_probe")).arg(&src);
    cmd.args(var("CARGO_ENCODED_RUSTFLAGS").split('\x1f').filter(|f| !f.is_empty()));
    for a in link_args {
        cmd.arg("-C").arg(format!("link-arg={a}"));
    }
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

//! Links the unwinder into mcpbox instead of loading `libgcc_s.so.1` at every start.
//!
//! Rust's standard library asks for `-lgcc_s` on x86_64-linux-gnu. That shared library costs
//! each start of mcpbox a library to open and map, its relocations, and its constructor, which
//! probes the CPU with `cpuid` (a trap to the hypervisor in a VM). mcpbox never unwinds
//! (`panic = "abort"`) and uses the unwinder only for backtraces, so the static one (`libgcc_eh.a`,
//! what `-static-libgcc` links for C programs) does the same job. The linker finds `-lgcc_s` in
//! the first directory of its search path that has it: this script puts a directory first that
//! holds `libgcc_s.a`, a link to the C compiler's `libgcc_eh.a`. Measured in docs/BENCHMARKS.md
//! ("A plain build"). Where the C compiler has no `libgcc_eh.a`, the build links as before and
//! says so.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    let features = std::env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    // A static build (link/static.toml) links libgcc_eh itself; a fuzz build (`cargo fuzz`,
    // `--cfg fuzzing`) links libFuzzer's C++ runtime, which loads libgcc_s anyway.
    let fuzzing = std::env::var_os("CARGO_CFG_FUZZING").is_some();
    if os != "linux" || env != "gnu" || features.split(',').any(|f| f == "crt-static") || fuzzing {
        return;
    }
    let cc = std::env::var("RUSTC_LINKER").unwrap_or_else(|_| "cc".to_string());
    let found = Command::new(&cc)
        .arg("-print-file-name=libgcc_eh.a")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        // Without the file, the compiler prints the bare name back.
        .filter(|p| p.is_absolute() && p.is_file());
    let Some(eh) = found else {
        println!(
            "cargo:warning=no libgcc_eh.a from `{cc} -print-file-name`: mcpbox loads libgcc_s.so.1 at every start"
        );
        return;
    };
    let dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("unwind");
    let link = dir.join("libgcc_s.a");
    let made = std::fs::create_dir_all(&dir).and_then(|()| {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&eh, &link)
    });
    if let Err(e) = made {
        println!(
            "cargo:warning=linking {} to {}: {e}; mcpbox loads libgcc_s.so.1 at every start",
            link.display(),
            eh.display()
        );
        return;
    }
    println!("cargo:rustc-link-search=native={}", dir.display());
}

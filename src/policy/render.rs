//! The effective policy as commented TOML (for `mcpbox policy check`). The output is itself a
//! valid policy: loading it gives the same [`Policy`].

use std::fmt::Write;
use std::path::{Path, PathBuf};

use super::error::PolicyError;
use super::load::{load_detailed, LazyVars, LoadContext};
use super::size::{format_cpu, format_size};
use super::{Level, Network, PathRule, Policy};

fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn list(items: impl IntoIterator<Item = String>) -> String {
    let v: Vec<String> = items.into_iter().collect();
    if v.is_empty() {
        "[]".into()
    } else if v.len() <= 3 && v.iter().map(String::len).sum::<usize>() < 60 {
        format!("[{}]", v.join(", "))
    } else {
        let mut s = "[\n".to_string();
        for i in v {
            let _ = writeln!(s, "    {i},");
        }
        s.push(']');
        s
    }
}

fn rules(v: &[PathRule]) -> String {
    list(v.iter().map(|r| {
        let p = q(&r.path.to_string_lossy());
        if r.optional {
            format!("{{ path = {p}, optional = true }}")
        } else {
            p
        }
    }))
}

fn size(w: &mut String, key: &str, n: Option<u64>, what: &str) {
    let _ = match n {
        Some(n) if format_size(n) != n.to_string() => {
            writeln!(w, "{key} = {}  # {what}: {n} bytes", q(&format_size(n)))
        }
        Some(n) => writeln!(w, "{key} = {n}  # {what}, bytes"),
        None => writeln!(w, "# {key}: unset"),
    };
}

fn count(w: &mut String, key: &str, n: Option<u64>) {
    let _ = match n {
        Some(n) => writeln!(w, "{key} = {n}"),
        None => writeln!(w, "# {key}: unset"),
    };
}

/// The effective policy as commented TOML: source, resolved paths, limits in human units.
pub fn render(p: &Policy) -> String {
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(w, "# Effective policy: {}", p.source);
    let _ = writeln!(w, "# `extends` resolved, ${{…}} expanded, defaults filled in. Paths are as written;");
    let _ = writeln!(w, "# the sandbox resolves symlinks when it builds the mounts.");
    let _ = writeln!(w, "\n[filesystem]");
    let _ = writeln!(w, "# read and list");
    let _ = writeln!(w, "read = {}", rules(&p.filesystem.read));
    let _ = writeln!(w, "# read, write, create, delete");
    let _ = writeln!(w, "write = {}", rules(&p.filesystem.write));
    let _ = writeln!(w, "# read and execute");
    let _ = writeln!(w, "exec = {}", rules(&p.filesystem.exec));

    let _ = writeln!(w, "\n[network]");
    match &p.network {
        Network::None => {
            let _ = writeln!(w, "mode = \"none\"  # own network namespace, loopback only");
        }
        Network::Host { connect_ports, bind_ports } => {
            let _ = writeln!(w, "mode = \"host\"  # the host's network");
            let ports = |v: &[u16]| list(v.iter().map(|p| p.to_string()));
            match connect_ports {
                Some(v) => {
                    let _ = writeln!(w, "connect_ports = {}  # TCP connect only to these (Landlock ABI 4+)", ports(v));
                }
                None => {
                    let _ = writeln!(w, "# connect_ports: any");
                }
            }
            match bind_ports {
                Some(v) => {
                    let _ = writeln!(w, "bind_ports = {}  # TCP bind only to these (Landlock ABI 4+)", ports(v));
                }
                None => {
                    let _ = writeln!(w, "# bind_ports: any");
                }
            }
        }
        Network::Proxy { allow } => {
            let _ = writeln!(w, "mode = \"proxy\"  # own namespace; out only through mcpbox's proxy");
            let _ = writeln!(w, "allow = {}", list(allow.iter().map(|a| q(&a.to_string()))));
        }
    }

    let _ = writeln!(w, "\n[env]");
    let _ = writeln!(w, "# nothing else of the caller's environment reaches the server");
    let _ = writeln!(w, "pass = {}", list(p.env.pass.iter().map(|n| q(n))));
    let _ = writeln!(w, "[env.set]");
    for (k, v) in &p.env.set {
        let _ = writeln!(w, "{k} = {}", q(v));
    }

    let l = &p.limits;
    let _ = writeln!(w, "\n[limits]");
    size(w, "memory", l.memory, "memory");
    count(w, "pids", l.pids);
    count(w, "open_files", l.open_files);
    size(w, "tmp", l.tmp, "size of the private /tmp");
    size(w, "file_size", l.file_size, "largest file the server may write");
    let _ = match l.cpu {
        Some(c) => writeln!(w, "cpu = {}  # cores' worth of CPU time", q(&format_cpu(c))),
        None => writeln!(w, "# cpu: unset"),
    };
    size(w, "disk", l.disk, "what the server can write to its data dir");

    let _ = writeln!(w, "\n[seccomp]");
    let _ = writeln!(w, "# on top of mcpbox's default allow-list");
    let _ = writeln!(w, "extra_deny = {}", list(p.seccomp.extra_deny.iter().map(|n| q(n))));
    let _ = writeln!(w, "extra_allow = {}", list(p.seccomp.extra_allow.iter().map(|n| q(n))));

    let _ = writeln!(w, "\n[sandbox]");
    let level = match p.sandbox.level {
        Level::Full => "full\"  # namespaces + mounts + Landlock + seccomp + uid drop + limits",
        Level::Container => "container\"  # no namespaces: Landlock + seccomp + uid drop + rlimits",
    };
    let _ = writeln!(w, "level = \"{level}");
    let abi = if p.sandbox.landlock_min_abi == 0 { "  # Landlock may be missing (logged)" } else { "" };
    let _ = writeln!(w, "landlock_min_abi = {}{abi}", p.sandbox.landlock_min_abi);
    let r = p.sandbox.relax;
    let relaxed: Vec<String> =
        [("cpu", r.cpu), ("disk", r.disk)].iter().filter(|(_, on)| *on).map(|(n, _)| q(n)).collect();
    let _ = writeln!(
        w,
        "relax = {}  # limits that may go unenforced where the host cannot enforce them (logged)",
        list(relaxed)
    );

    let _ = writeln!(w, "\n[runtime]");
    let _ = writeln!(
        w,
        "node_flags = {}  # on node's command line when the server's command is node",
        list(p.runtime.node_flags.iter().map(|f| q(f)))
    );
    s
}

/// `mcpbox policy check REFERENCE [--data DIR] [--cache DIR]`: the text to print. DATA/CACHE
/// default to placeholders; paths under them are not checked when those dirs do not exist.
pub fn check(reference: &str, data: Option<&Path>, cache: Option<&Path>) -> Result<String, PolicyError> {
    check_with(reference, data, cache, None, Vec::new())
}

/// [`check`] with the lazily computed variables (the runtimes' paths) a launch would have, and
/// the directories bare names are looked up in first ([`super::search_dirs`]).
pub fn check_with(
    reference: &str,
    data: Option<&Path>,
    cache: Option<&Path>,
    lazy: Option<LazyVars>,
    search_dirs: Vec<PathBuf>,
) -> Result<String, PolicyError> {
    let data = data.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/var/lib/mcpbox/SERVER/data"));
    let cache = cache.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/var/lib/mcpbox/SERVER/cache"));
    let mut ctx = LoadContext { lazy, search_dirs, ..LoadContext::default() };
    ctx.vars.insert("DATA".into(), data.to_string_lossy().into_owned());
    ctx.vars.insert("CACHE".into(), cache.to_string_lossy().into_owned());
    let loaded = load_detailed(reference, &ctx, &[data.clone(), cache.clone()])?;
    let mut out = String::new();
    let _ = writeln!(out, "# mcpbox policy check {reference}: OK");
    let _ = writeln!(out, "# files read: {}", loaded.files.join(", "));
    let _ = writeln!(out, "# ${{DATA}} = {}, ${{CACHE}} = {}", data.display(), cache.display());
    for n in &loaded.notes {
        let _ = writeln!(out, "# note: {n}");
    }
    out.push('\n');
    out.push_str(&render(&loaded.policy));
    Ok(out)
}

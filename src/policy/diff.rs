//! `mcpbox policy diff A B`: what one resolved policy grants that the other does not.
//!
//! Grants are compared by what they permit, not by how they are written: a path is covered by
//! any grant of at least the same access on it or on a directory above it (write and exec each
//! include read); the network by mode (none < proxy < host) and then allow-list entries or
//! ports; the environment by names passed and values set; limits by size (unset = unlimited);
//! seccomp by syscalls allowed beyond, or no longer denied on top of, the default list; the
//! sandbox requirements by level, Landlock ABI and relaxed limits.

use std::fmt::Write;
use std::path::Path;

use super::size::{format_cpu, format_size};
use super::{AllowEntry, Host, HostPattern, Level, Network, Policy};

/// One grant one side has and the other does not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The section: filesystem, network, env, limits, seccomp, sandbox.
    pub section: &'static str,
    /// The grant, written as a policy line would say it (`read = "/srv/docs"`).
    pub what: String,
}

/// What `b` grants that `a` does not (`more`), and what `a` grants that `b` does not (`less`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyDiff {
    pub more: Vec<Grant>,
    pub less: Vec<Grant>,
    /// Settings that differ and grant nothing (`[runtime]`), as `~` lines.
    pub runtime: Vec<String>,
}

impl PolicyDiff {
    /// Neither side grants anything the other does not (runtime settings may still differ).
    pub fn is_empty(&self) -> bool {
        self.more.is_empty() && self.less.is_empty()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    Exec,
}

impl Access {
    fn key(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::Exec => "exec",
        }
    }
    /// Grants of which kinds permit this access.
    fn covered_by(self) -> &'static [Access] {
        match self {
            Access::Read => &[Access::Read, Access::Write, Access::Exec],
            Access::Write => &[Access::Write],
            Access::Exec => &[Access::Exec],
        }
    }
}

fn rules(p: &Policy, a: Access) -> impl Iterator<Item = &Path> {
    let v = match a {
        Access::Read => &p.filesystem.read,
        Access::Write => &p.filesystem.write,
        Access::Exec => &p.filesystem.exec,
    };
    v.iter().map(|r| r.path.as_path())
}

/// Whether `p` permits `access` on `path` (a grant on it or on a directory above it).
pub fn path_covered(p: &Policy, access: &str, path: &Path) -> bool {
    let a = match access {
        "read" => Access::Read,
        "write" => Access::Write,
        "exec" => Access::Exec,
        _ => return false,
    };
    a.covered_by().iter().any(|k| rules(p, *k).any(|g| path.starts_with(g)))
}

/// Whether allow-list `entries` permit `entry` (`host:port`, `*.domain:port`): equal, or a
/// wildcard entry whose domain covers it.
fn allow_covered(entries: &[AllowEntry], entry: &AllowEntry) -> bool {
    // `*.d` covers strict subdomains of d, and any `*.sub.d`, on the same port.
    let under =
        |name: &str, d: &str| name.len() > d.len() && name.ends_with(d) && name[..name.len() - d.len()].ends_with('.');
    entries.iter().any(|e| {
        e == entry
            || e.port == entry.port
                && match (&e.host, &entry.host) {
                    (HostPattern::Subdomains(d), HostPattern::Exact(Host::Name(h))) => under(h, d),
                    (HostPattern::Subdomains(d), HostPattern::Subdomains(d2)) => d2 == d || under(d2, d),
                    _ => false,
                }
    })
}

fn net_rank(n: &Network) -> u8 {
    match n {
        Network::None => 0,
        Network::Proxy { .. } => 1,
        Network::Host { .. } => 2,
    }
}

fn net_mode(n: &Network) -> &'static str {
    match n {
        Network::None => "none",
        Network::Proxy { .. } => "proxy",
        Network::Host { .. } => "host",
    }
}

/// Ports `b` permits that `a` does not (None = any port).
fn ports_more(a: &Option<Vec<u16>>, b: &Option<Vec<u16>>) -> Option<String> {
    match (a, b) {
        (_, None) if a.is_some() => Some("any port".into()),
        (Some(a), Some(b)) => {
            let extra: Vec<String> = b.iter().filter(|p| !a.contains(p)).map(u16::to_string).collect();
            (!extra.is_empty()).then(|| format!("[{}]", extra.join(", ")))
        }
        _ => None,
    }
}

/// Grants of `b` that `a` does not have.
fn more(a: &Policy, b: &Policy) -> Vec<Grant> {
    let mut out = Vec::new();
    let mut push = |section: &'static str, what: String| out.push(Grant { section, what });

    for acc in [Access::Read, Access::Write, Access::Exec] {
        for path in rules(b, acc) {
            if !path_covered(a, acc.key(), path) {
                push("filesystem", format!("{} = {:?}", acc.key(), path.display().to_string()));
            }
        }
    }

    match (&a.network, &b.network) {
        (na, nb) if net_rank(nb) > net_rank(na) => {
            push("network", format!("mode = \"{}\" (instead of \"{}\")", net_mode(nb), net_mode(na)));
            if let Network::Proxy { allow } = nb {
                for e in allow {
                    push("network", format!("allow = \"{e}\""));
                }
            }
        }
        (Network::Proxy { allow: aa }, Network::Proxy { allow: ab }) => {
            for e in ab.iter().filter(|e| !allow_covered(aa, e)) {
                push("network", format!("allow = \"{e}\""));
            }
        }
        (Network::Host { connect_ports: ca, bind_ports: ba }, Network::Host { connect_ports: cb, bind_ports: bb }) => {
            if let Some(p) = ports_more(ca, cb) {
                push("network", format!("connect_ports: {p}"));
            }
            if let Some(p) = ports_more(ba, bb) {
                push("network", format!("bind_ports: {p}"));
            }
        }
        _ => {}
    }

    for n in b.env.pass.iter().filter(|n| !a.env.pass.contains(n)) {
        push("env", format!("pass = {n:?}"));
    }
    for (k, v) in &b.env.set {
        if a.env.set.get(k) != Some(v) {
            push("env", format!("set {k} = {v:?}"));
        }
    }

    let la = &a.limits;
    let lb = &b.limits;
    let sizes = [
        ("memory", la.memory, lb.memory),
        ("tmp", la.tmp, lb.tmp),
        ("file_size", la.file_size, lb.file_size),
        ("disk", la.disk, lb.disk),
    ];
    for (key, x, y) in sizes {
        match (x, y) {
            (Some(_), None) => push("limits", format!("{key}: unlimited")),
            (Some(x), Some(y)) if y > x => {
                push("limits", format!("{key} = {:?} (more than {:?})", format_size(y), format_size(x)))
            }
            _ => {}
        }
    }
    for (key, x, y) in [("pids", la.pids, lb.pids), ("open_files", la.open_files, lb.open_files)] {
        match (x, y) {
            (Some(_), None) => push("limits", format!("{key}: unlimited")),
            (Some(x), Some(y)) if y > x => push("limits", format!("{key} = {y} (more than {x})")),
            _ => {}
        }
    }
    match (la.cpu, lb.cpu) {
        (Some(_), None) => push("limits", "cpu: unlimited".into()),
        (Some(x), Some(y)) if y > x => {
            push("limits", format!("cpu = {:?} (more than {:?})", format_cpu(y), format_cpu(x)))
        }
        _ => {}
    }

    for s in b.seccomp.extra_allow.iter().filter(|s| !a.seccomp.extra_allow.contains(s)) {
        push("seccomp", format!("extra_allow = {s:?}"));
    }
    for s in a.seccomp.extra_deny.iter().filter(|s| !b.seccomp.extra_deny.contains(s)) {
        push("seccomp", format!("{s} no longer in extra_deny"));
    }

    if b.sandbox.level == Level::Container && a.sandbox.level == Level::Full {
        push("sandbox", "level = \"container\" (accepts no namespaces)".into());
    }
    if b.sandbox.landlock_min_abi < a.sandbox.landlock_min_abi {
        push(
            "sandbox",
            format!("landlock_min_abi = {} (lower than {})", b.sandbox.landlock_min_abi, a.sandbox.landlock_min_abi),
        );
    }
    for (key, x, y) in
        [("cpu", a.sandbox.relax.cpu, b.sandbox.relax.cpu), ("disk", a.sandbox.relax.disk, b.sandbox.relax.disk)]
    {
        if y && !x {
            push("sandbox", format!("relax = {key:?} (the {key} limit may go unenforced)"));
        }
    }
    out
}

/// What `b` grants beyond `a`, and `a` beyond `b`; and how their runtime settings differ.
pub fn diff(a: &Policy, b: &Policy) -> PolicyDiff {
    let mut runtime = Vec::new();
    // Not grants: they change how the server runs (e.g. the JIT off or back on), not what it
    // may reach, so they are listed apart and never counted as + or -.
    if a.runtime.node_flags != b.runtime.node_flags {
        runtime.push(format!("node_flags: A {:?}, B {:?}", a.runtime.node_flags, b.runtime.node_flags));
    }
    PolicyDiff { more: more(a, b), less: more(b, a), runtime }
}

/// The diff as text: `+` lines for what B grants and A does not, `-` for the reverse,
/// grouped by section.
pub fn render_diff(a: &Policy, b: &Policy, d: &PolicyDiff) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "--- A: {}\n+++ B: {}", a.source, b.source);
    if !d.runtime.is_empty() {
        let _ = writeln!(s, "[runtime]");
        for r in &d.runtime {
            let _ = writeln!(s, "~ {r}");
        }
    }
    if d.is_empty() {
        let _ = writeln!(s, "# A and B grant the same");
        return s;
    }
    for section in ["filesystem", "network", "env", "limits", "seccomp", "sandbox"] {
        let plus: Vec<&Grant> = d.more.iter().filter(|g| g.section == section).collect();
        let minus: Vec<&Grant> = d.less.iter().filter(|g| g.section == section).collect();
        if plus.is_empty() && minus.is_empty() {
            continue;
        }
        let _ = writeln!(s, "[{section}]");
        for g in minus {
            let _ = writeln!(s, "- {}", g.what);
        }
        for g in plus {
            let _ = writeln!(s, "+ {}", g.what);
        }
    }
    let _ =
        writeln!(s, "# + granted by B and not by A ({}), - granted by A and not by B ({})", d.more.len(), d.less.len());
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{load_inline, LoadContext};

    fn pol(toml: &str) -> Policy {
        let mut p = load_inline(toml.parse().unwrap(), Path::new("/"), &LoadContext::default()).unwrap();
        p.source = "test".into();
        p
    }

    fn whats(v: &[Grant]) -> Vec<String> {
        v.iter().map(|g| format!("{}: {}", g.section, g.what)).collect()
    }

    #[test]
    fn node_flags_differ_apart_from_the_grants() {
        let a = pol("[runtime]\nnode_flags = [\"--lite-mode\"]\n");
        let b = pol("[runtime]\nnode_flags = [\"--optimize-for-size\"]\n");
        let d = diff(&a, &b);
        assert!(d.is_empty(), "{d:?}");
        assert_eq!(d.runtime, vec![r#"node_flags: A ["--lite-mode"], B ["--optimize-for-size"]"#]);
        let text = render_diff(&a, &b, &d);
        assert!(text.contains("[runtime]\n~ node_flags: A [\"--lite-mode\"], B [\"--optimize-for-size\"]\n"), "{text}");
        assert!(text.contains("# A and B grant the same"), "{text}");
        assert!(!text.lines().any(|l| l.starts_with("+ ") || l.starts_with("- ")), "{text}");
    }

    #[test]
    fn paths_are_compared_by_containment_and_access() {
        let a = pol("[filesystem]\nread = [\"/usr\"]\nwrite = [\"/var\"]\n");
        let b = pol("[filesystem]\nread = [\"/usr/share\", \"/etc\", \"/var/lib\"]\nexec = [\"/usr/bin\"]\n");
        let d = diff(&a, &b);
        // /usr/share is inside A's read, /var/lib inside A's write (which includes read).
        assert_eq!(whats(&d.more), vec!["filesystem: read = \"/etc\"", "filesystem: exec = \"/usr/bin\""]);
        // A's read of /usr is wider than B's /usr/share; A writes /var, B only reads below it.
        assert_eq!(whats(&d.less), vec!["filesystem: read = \"/usr\"", "filesystem: write = \"/var\""]);
    }

    #[test]
    fn network_mode_and_allow_list() {
        let none = pol("");
        let proxy = pol("[network]\nmode = \"proxy\"\nallow = [\"*.example.com:443\", \"a.test:80\"]\n");
        let proxy2 = pol("[network]\nmode = \"proxy\"\nallow = [\"api.example.com:443\", \"a.test:8080\"]\n");
        let d = diff(&none, &proxy);
        assert_eq!(
            whats(&d.more),
            vec![
                "network: mode = \"proxy\" (instead of \"none\")",
                "network: allow = \"*.example.com:443\"",
                "network: allow = \"a.test:80\""
            ]
        );
        assert!(d.less.is_empty());
        let d = diff(&proxy, &proxy2);
        // api.example.com:443 is within *.example.com:443; the port differs for a.test.
        assert_eq!(whats(&d.more), vec!["network: allow = \"a.test:8080\""]);
        assert_eq!(whats(&d.less), vec!["network: allow = \"*.example.com:443\"", "network: allow = \"a.test:80\""]);
    }

    #[test]
    fn env_limits_seccomp_and_sandbox() {
        let a = pol("[env]\npass = [\"A\"]\nset = { X = \"1\" }\n[limits]\nmemory = \"256M\"\npids = 64\n[seccomp]\nextra_deny = [\"ptrace\"]\n");
        let b = pol(
            "[env]\npass = [\"A\", \"B\"]\nset = { X = \"2\" }\n[limits]\nmemory = \"1G\"\npids = 32\n[sandbox]\nlevel = \"container\"\nlandlock_min_abi = 0\n",
        );
        let d = diff(&a, &b);
        let more = whats(&d.more);
        assert!(more.contains(&"env: pass = \"B\"".to_string()), "{more:?}");
        assert!(more.contains(&"env: set X = \"2\"".to_string()), "{more:?}");
        assert!(more.iter().any(|m| m.starts_with("limits: memory = \"1G\"")), "{more:?}");
        assert!(more.contains(&"seccomp: ptrace no longer in extra_deny".to_string()), "{more:?}");
        assert!(more.iter().any(|m| m.starts_with("sandbox: level = \"container\"")), "{more:?}");
        assert!(more.iter().any(|m| m.starts_with("sandbox: landlock_min_abi = 0")), "{more:?}");
        assert!(!more.iter().any(|m| m.contains("pids")), "{more:?}");
        let less = whats(&d.less);
        assert!(less.iter().any(|m| m == "limits: pids = 64 (more than 32)"), "{less:?}");
        assert!(less.contains(&"env: set X = \"1\"".to_string()), "{less:?}");
    }

    #[test]
    fn a_policy_against_itself_is_empty_and_says_so() {
        let a = pol("[filesystem]\nread = [\"/usr\"]\n[network]\nmode = \"proxy\"\nallow = [\"a.test:443\"]\n");
        let d = diff(&a, &a);
        assert!(d.is_empty());
        assert!(render_diff(&a, &a, &d).contains("grant the same"));
    }
}

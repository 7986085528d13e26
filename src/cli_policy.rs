//! `mcpbox policy suggest` and `mcpbox policy diff`: from recorded denials to the grants that
//! would have permitted them, and what one policy grants that another does not.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::denials::{has_unprintable, printable, Layer, Recorded};
use crate::plan::{ServerDirs, StateDir};
use crate::policy::{path_covered, Network, Policy};

/// One grant to add: `+ key = [value]` in `section`, with why (which denials asked for it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addition {
    pub section: &'static str,
    pub key: &'static str,
    /// The value as a TOML literal (`"/srv/x"`, `"a.test:443"`, `443`).
    pub value: String,
    pub why: String,
}

/// What the denials call for, against `policy`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Suggestion {
    pub additions: Vec<Addition>,
    /// Denials no grant can permit (with why), e.g. internal addresses.
    pub notes: Vec<String>,
    /// Denials the policy already permits (refused under an older policy, most likely).
    pub covered: usize,
}

fn quoted(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn seen(r: &Recorded) -> String {
    let times = if r.count == 1 { "once".to_string() } else { format!("{} times", r.count) };
    let session = r.session.as_deref().map(|s| format!(", last in session {s}")).unwrap_or_default();
    let object = if r.denial.object.is_empty() { String::new() } else { format!(" {}", printable(&r.denial.object)) };
    let session = printable(&session);
    format!("{} {}{object}: {times}{session}", r.denial.layer.as_str(), printable(&r.denial.access))
}

/// The grants that would have permitted each recorded denial `policy` does not already permit.
pub fn suggest(policy: &Policy, denials: &[Recorded]) -> Suggestion {
    let mut s = Suggestion::default();
    let add = |s: &mut Suggestion, section, key, value: String, why: String| {
        if !s.additions.iter().any(|a| a.key == key && a.value == value) {
            s.additions.push(Addition { section, key, value, why });
        }
    };
    for r in denials {
        let d = &r.denial;
        // The server chose the object: one that would not read as it is (a newline that ends a
        // comment and starts a `+` line, terminal escapes, bidi overrides) or that was cut is
        // never proposed.
        if has_unprintable(&d.object) || d.object.ends_with(crate::denials::CUT) {
            s.notes.push(format!("{}: the name holds control or invisible characters, or is cut short", seen(r)));
            continue;
        }
        match (d.layer, d.access.as_str()) {
            (Layer::Egress, "connect") => {
                let reason = d.reason.as_deref().unwrap_or("");
                if reason.contains("internal address") {
                    s.notes.push(format!("{}: {reason}; no allow-list entry permits that", seen(r)));
                    continue;
                }
                let Some((host, port)) = crate::netproxy::parse_target(&d.object) else {
                    s.notes.push(format!("{}: not a host:port an allow-list can name", seen(r)));
                    continue;
                };
                let permitted = match &policy.network {
                    Network::Host { .. } => true,
                    Network::None => false,
                    // A wildcard that resolved to a non-public address needs the exact entry.
                    Network::Proxy { allow } => {
                        let list = crate::netproxy::AllowList::new(allow);
                        match list.check(&host, port) {
                            Some(crate::netproxy::Match::Exact) => true,
                            Some(_) => !reason.contains("non-public"),
                            None => false,
                        }
                    }
                };
                if permitted {
                    s.covered += 1;
                    continue;
                }
                if matches!(policy.network, Network::None) {
                    add(&mut s, "network", "mode", quoted("proxy"), "a network mode with an allow-list".into());
                }
                add(&mut s, "network", "allow", quoted(&d.object), seen(r));
            }
            // The proxy's connection cap (mcpbox's, not the policy's): nothing to grant.
            (Layer::Egress, "accept") => s.notes.push(format!(
                "{}: the egress proxy was at its connection cap; no policy grant changes that (mcpbox.maxEgressConnections does)",
                seen(r)
            )),
            (Layer::Landlock, access @ ("read" | "write" | "exec")) => {
                let path = Path::new(&d.object);
                if !path.is_absolute() {
                    s.notes.push(format!("{}: not an absolute path a grant can name", seen(r)));
                    continue;
                }
                if let Some(why) = crate::policy::reserved_conflict(path) {
                    s.notes.push(format!("{}: {why}", seen(r)));
                    continue;
                }
                if path_covered(policy, access, path) {
                    s.covered += 1;
                    continue;
                }
                let key = match access {
                    "read" => "read",
                    "write" => "write",
                    _ => "exec",
                };
                add(&mut s, "filesystem", key, quoted(&d.object), seen(r));
            }
            (Layer::Landlock, access @ ("connect" | "bind")) => {
                let Ok(port) = d.object.rsplit(':').next().unwrap_or(&d.object).parse::<u16>() else {
                    s.notes.push(format!("{}: no port to grant", seen(r)));
                    continue;
                };
                let (key, ports) = match (&policy.network, access) {
                    (Network::Host { connect_ports, .. }, "connect") => ("connect_ports", connect_ports),
                    (Network::Host { bind_ports, .. }, _) => ("bind_ports", bind_ports),
                    _ => {
                        s.notes.push(format!("{}: only network mode \"host\" narrows ports", seen(r)));
                        continue;
                    }
                };
                if ports.as_ref().is_none_or(|v| v.contains(&port)) {
                    s.covered += 1;
                    continue;
                }
                add(&mut s, "network", key, port.to_string(), seen(r));
            }
            // `extra_allow` can only name what `extra_deny` took away; the rest of the allow-list
            // is mcpbox's, not the policy's.
            (Layer::Seccomp, name) => {
                if policy.seccomp.extra_deny.iter().any(|a| a == name) {
                    s.notes.push(format!(
                        "{}: denied by this policy's [seccomp] extra_deny; remove {name:?} there to permit it",
                        seen(r)
                    ));
                } else if let Some(why) = crate::policy::syscalls::never_allowed(name) {
                    s.notes.push(format!("{}: {why}; mcpbox never allows it", seen(r)));
                } else {
                    s.notes.push(format!("{}: not in mcpbox's seccomp allow-list, which no policy widens", seen(r)));
                }
            }
            _ => s.notes.push(format!("{}: no grant of a policy covers this kind of access", seen(r))),
        }
    }
    s
}

/// The suggestion as a diff against the policy: sections, `#` why, `+ key = [values]`.
pub fn render_suggest(server: &str, policy: &Policy, total: usize, s: &Suggestion) -> String {
    let mut out = String::new();
    let _ =
        writeln!(out, "# mcpbox policy suggest {server}: {total} recorded denials, against policy {}", policy.source);
    if s.covered > 0 {
        let _ = writeln!(
            out,
            "# {} of them are permitted by this policy already (refused under an earlier one?)",
            s.covered
        );
    }
    let mut sections: BTreeMap<&str, Vec<&Addition>> = BTreeMap::new();
    for a in &s.additions {
        sections.entry(a.section).or_default().push(a);
    }
    for section in ["filesystem", "network", "seccomp"] {
        let Some(adds) = sections.get(section) else { continue };
        let _ = writeln!(out, "[{section}]");
        let mut keys: Vec<&str> = adds.iter().map(|a| a.key).collect();
        keys.dedup();
        for key in keys {
            let of_key: Vec<&&Addition> = adds.iter().filter(|a| a.key == key).collect();
            for a in &of_key {
                let _ = writeln!(out, "# {}", a.why);
            }
            if key == "mode" {
                let _ = writeln!(out, "+ mode = {}", of_key[0].value);
            } else {
                let values: Vec<&str> = of_key.iter().map(|a| a.value.as_str()).collect();
                let _ = writeln!(out, "+ {key} = [{}]", values.join(", "));
            }
        }
    }
    for n in &s.notes {
        let _ = writeln!(out, "# cannot be granted: {n}");
    }
    if s.additions.is_empty() {
        let _ = writeln!(out, "# nothing to add");
    } else {
        let _ = writeln!(
            out,
            "# Add the + lines to the policy (each list extends the one it has), check it with `mcpbox policy check`,\n\
             # and grant the narrowest path that works: a denied file is named exactly, not its directory."
        );
    }
    out
}

/// A policy reference as a record names it: `shipped:NAME.toml` is the shipped `NAME`.
fn reference_of(source: &str) -> String {
    match source.strip_prefix("shipped:") {
        Some(rest) => rest.strip_suffix(".toml").unwrap_or(rest).to_string(),
        None => source.to_string(),
    }
}

/// `ctx` with the runtime variables (`${PYTHON_STDLIB}`, …) of node/python3 on the sandbox's
/// PATH, as a policy check without a command gets them.
fn with_runtimes(ctx: crate::policy::LoadContext, state: &StateDir) -> crate::policy::LoadContext {
    let launch = crate::plan::ServerLaunch {
        name: "check".into(),
        command: String::new(),
        args: vec![],
        env: Default::default(),
        policy: crate::plan::PolicyRef::Named("default".into()),
    };
    crate::policy::LoadContext { lazy: Some(crate::plan::spec::runtimes_for(state, &launch).vars()), ..ctx }
}

/// `mcpbox policy suggest NAME [--config FILE] [--state-dir D] [--policy P]`.
pub fn suggest_cli(
    server: &str,
    config: Option<&Path>,
    state_dir: Option<PathBuf>,
    policy: Option<String>,
) -> ExitCode {
    let fail = |msg: String| {
        eprintln!("mcpbox: policy suggest {server}: {msg}");
        ExitCode::FAILURE
    };
    // With a config: its state dir, and the policy the server runs under (as `serve` plans it).
    let (state, configured) = match config {
        Some(path) => {
            let cfg = match crate::config::load(path) {
                Ok(c) => c,
                Err(e) => return fail(format!("{e}")),
            };
            let state = StateDir::for_config(&cfg, path, state_dir, crate::policy::Level::Full);
            let Some(sc) = cfg.servers.get(server) else {
                return fail(format!("{} has no server of that name", path.display()));
            };
            let planner = crate::plan::Planner::new(state.clone(), &cfg);
            let resolved = planner
                .launch_of(sc, false)
                .and_then(|(launch, _, _)| crate::plan::check(&state, &launch).map(|c| c.policy));
            match resolved {
                Ok(p) => (state, Some(p)),
                Err(e) => return fail(format!("its policy: {e:#}")),
            }
        }
        None => (StateDir::new(state_dir.unwrap_or_else(StateDir::default_root)), None),
    };
    let file = crate::denials::file_for(&state.root, server);
    let record = match crate::denials::read_file(&file) {
        Ok(r) => r,
        Err(e) => return fail(format!("{e}")),
    };
    let dirs = ServerDirs::at(&state, server);
    let ctx = with_runtimes(dirs.load_context(&state), &state);
    let policy = match (policy, configured) {
        (Some(reference), _) => match crate::policy::load(&reference, &ctx) {
            Ok(p) => p,
            Err(e) => return fail(format!("policy {reference}: {e}")),
        },
        (None, Some(p)) => p,
        (None, None) => {
            let Some(reference) = record.denials.iter().rev().find_map(|r| r.policy.clone()).map(|p| reference_of(&p))
            else {
                return fail("the record does not name the policy; pass --policy FILE or --config FILE".into());
            };
            match crate::policy::load(&reference, &ctx) {
                Ok(p) => p,
                Err(e) => {
                    return fail(format!(
                    "policy {reference}: {e} (pass --policy FILE, or --config FILE for a policy inline in mcpbox.json)"
                ))
                }
            }
        }
    };
    let s = suggest(&policy, &record.denials);
    print!("{}", render_suggest(server, &policy, record.denials.len(), &s));
    ExitCode::SUCCESS
}

/// `mcpbox policy diff A B`.
pub fn diff_cli(a: &str, b: &str, data: Option<&Path>, cache: Option<&Path>, config: Option<&Path>) -> ExitCode {
    let state = match StateDir::for_command(config, None, crate::policy::Level::Full) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mcpbox: policy diff: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let ctx = crate::policy::LoadContext { search_dirs: state.policy_dirs.clone(), ..Default::default() };
    let mut ctx = with_runtimes(ctx, &state);
    let data = data.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/var/lib/mcpbox/SERVER/data"));
    let cache = cache.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/var/lib/mcpbox/SERVER/cache"));
    ctx.vars.insert("DATA".into(), data.to_string_lossy().into_owned());
    ctx.vars.insert("CACHE".into(), cache.to_string_lossy().into_owned());
    let load = |r: &str| crate::policy::load_detailed(r, &ctx, &[data.clone(), cache.clone()]).map(|l| l.policy);
    let (pa, pb) = match (load(a), load(b)) {
        (Ok(pa), Ok(pb)) => (pa, pb),
        (Err(e), _) => {
            eprintln!("mcpbox: policy diff: {a}: {e}");
            return ExitCode::FAILURE;
        }
        (_, Err(e)) => {
            eprintln!("mcpbox: policy diff: {b}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let d = crate::policy::diff(&pa, &pb);
    print!("{}", crate::policy::render_diff(&pa, &pb, &d));
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::denials::Denial;

    fn pol(toml: &str) -> Policy {
        crate::policy::load_inline(toml.parse().unwrap(), Path::new("/"), &crate::policy::LoadContext::default())
            .unwrap()
    }

    fn rec(layer: Layer, access: &str, object: &str, reason: &str) -> Recorded {
        Recorded {
            denial: Denial { layer, access: access.into(), object: object.into(), reason: Some(reason.into()) },
            count: 2,
            first: 0,
            last: 0,
            session: Some("s1".into()),
            policy: None,
        }
    }

    #[test]
    fn suggests_exactly_the_denied_host_and_path_and_nothing_already_granted() {
        let p = pol("[filesystem]\nread = [\"/usr\"]\n[network]\nmode = \"proxy\"\nallow = [\"ok.test:443\", \"*.wild.test:443\"]\n");
        let denials = vec![
            rec(Layer::Egress, "connect", "api.other.test:443", "not in the allow-list"),
            rec(Layer::Egress, "connect", "api.other.test:443", "not in the allow-list"),
            rec(Layer::Egress, "connect", "ok.test:443", "not in the allow-list"),
            rec(Layer::Egress, "connect", "in.wild.test:443", "wildcard match resolves to non-public address 10.0.0.1"),
            rec(Layer::Landlock, "read", "/etc/hostname", ""),
            rec(Layer::Landlock, "read", "/usr/share/x", ""),
            rec(Layer::Seccomp, "bpf", "", ""),
        ];
        let s = suggest(&p, &denials);
        let got: Vec<(&str, &str)> = s.additions.iter().map(|a| (a.key, a.value.as_str())).collect();
        assert_eq!(
            got,
            vec![("allow", "\"api.other.test:443\""), ("allow", "\"in.wild.test:443\""), ("read", "\"/etc/hostname\"")]
        );
        assert_eq!(s.covered, 2);
        assert!(
            s.notes.len() == 1 && s.notes[0].contains("seccomp bpf") && s.notes[0].contains("never allows"),
            "{:?}",
            s.notes
        );
        let text = render_suggest("srv", &p, denials.len(), &s);
        assert!(
            text.contains("[network]\n# egress connect api.other.test:443: 2 times, last in session s1\n"),
            "{text}"
        );
        assert!(text.contains("+ allow = [\"api.other.test:443\", \"in.wild.test:443\"]\n"), "{text}");
        assert!(text.contains("[filesystem]\n# landlock read /etc/hostname: 2 times, last in session s1\n+ read = [\"/etc/hostname\"]\n"), "{text}");
    }

    #[test]
    fn a_refusal_by_the_proxys_connection_cap_is_only_noted() {
        let p = pol("[network]\nmode = \"proxy\"\nallow = [\"ok.test:443\"]\n");
        let denials = vec![rec(
            Layer::Egress,
            "accept",
            "over 64 open connections (mcpbox.maxEgressConnections)",
            "too many connections at once",
        )];
        let s = suggest(&p, &denials);
        assert!(s.additions.is_empty(), "{:?}", s.additions);
        assert!(s.notes.len() == 1 && s.notes[0].contains("connection cap"), "{:?}", s.notes);
    }

    #[test]
    fn network_none_gets_proxy_mode_and_internal_addresses_are_only_noted() {
        let p = pol("");
        let s = suggest(
            &p,
            &[
                rec(Layer::Egress, "connect", "a.test:80", "not in the allow-list"),
                rec(Layer::Egress, "connect", "b.test:80", "resolves to internal address 127.0.0.1"),
            ],
        );
        let got: Vec<(&str, &str)> = s.additions.iter().map(|a| (a.key, a.value.as_str())).collect();
        assert_eq!(got, vec![("mode", "\"proxy\""), ("allow", "\"a.test:80\"")]);
        assert_eq!(s.notes.len(), 1);
        assert!(s.notes[0].contains("b.test:80"));
        let text = render_suggest("srv", &p, 2, &s);
        assert!(text.contains("+ mode = \"proxy\"\n"), "{text}");
    }

    #[test]
    fn landlock_denials_become_the_grant_of_their_access_never_a_reserved_path() {
        let p = pol("[filesystem]\nread = [\"/usr/share\"]\n");
        let denials = vec![
            rec(Layer::Landlock, "exec", "/usr/share/run.sh", "blockers=fs.execute"),
            rec(Layer::Landlock, "read", "/usr/share/x", "blockers=fs.read_file"),
            rec(Layer::Landlock, "read", "/srv/data/a.txt", "blockers=fs.read_file"),
            rec(Layer::Landlock, "write", "/proc/sys/kernel/x", "blockers=fs.write_file"),
            rec(Layer::Landlock, "read", "/", "blockers=fs.read_dir"),
            rec(Layer::Landlock, "signal", "pid 1 (init)", "blockers=scope.signal"),
        ];
        let s = suggest(&p, &denials);
        let got: Vec<(&str, &str)> = s.additions.iter().map(|a| (a.key, a.value.as_str())).collect();
        assert_eq!(got, vec![("exec", "\"/usr/share/run.sh\""), ("read", "\"/srv/data/a.txt\"")]);
        assert_eq!(s.covered, 1);
        assert_eq!(s.notes.len(), 3, "{:?}", s.notes);
        let text = render_suggest("srv", &p, denials.len(), &s);
        assert!(text.contains("+ exec = [\"/usr/share/run.sh\"]\n"), "{text}");
    }

    #[test]
    fn a_denied_name_that_would_add_a_line_or_hide_text_is_never_proposed() {
        let p = pol("");
        let evil = "/tmp/x\n+ read = [\"/\"]\n# ";
        let denials = vec![
            rec(Layer::Landlock, "exec", evil, "blockers=fs.execute"),
            rec(Layer::Landlock, "read", "/srv/a\u{202e}gpj.exe", "blockers=fs.read_file"),
            rec(Layer::Landlock, "read", &format!("/srv/{}{}", "a".repeat(1100), crate::denials::CUT), ""),
            rec(Layer::Landlock, "read", "/srv/\u{1b}]52;c;aGk=\u{7}", ""),
        ];
        let s = suggest(&p, &denials);
        assert!(s.additions.is_empty(), "{:?}", s.additions);
        assert_eq!(s.notes.len(), 4, "{:?}", s.notes);
        let text = render_suggest("srv", &p, denials.len(), &s);
        assert!(!text.lines().any(|l| l.starts_with('+')), "{text}");
        assert!(!text.contains('\u{1b}') && !text.contains('\u{202e}'), "{text}");
        assert_eq!(text.matches("# cannot be granted: ").count(), 4, "{text}");
    }

    #[test]
    fn recorded_policy_names_map_back_to_references() {
        assert_eq!(reference_of("shipped:server-memory.toml"), "server-memory");
        assert_eq!(reference_of("/etc/mcpbox/p.toml"), "/etc/mcpbox/p.toml");
    }
}

//! Unit tests for the policy module.

use std::fs;
use std::path::{Path, PathBuf};

use super::*;

fn ctx(dir: &Path) -> LoadContext {
    let mut c = LoadContext::default();
    c.vars.insert("DATA".into(), dir.join("data").display().to_string());
    c.vars.insert("CACHE".into(), dir.join("cache").display().to_string());
    fs::create_dir_all(dir.join("data")).unwrap();
    fs::create_dir_all(dir.join("cache")).unwrap();
    c.lazy = Some(fake_runtimes(&dir.join("rt")));
    c
}

/// Runtime variables as a launch fills them in (see crate::plan::runtime), for a node and a python
/// installed under `rt`.
fn fake_runtimes(rt: &Path) -> LazyVars {
    let mut vars = std::collections::BTreeMap::new();
    for (name, rel, dir) in [
        ("NODE_EXE", "node/bin/node", false),
        ("NODE_PREFIX", "node", true),
        ("NODE_MODULES", "node/lib/node_modules", true),
        ("PYTHON_EXE", "py/bin/python3.12", false),
        ("PYTHON_PREFIX", "py", true),
        ("PYTHON_STDLIB", "py/lib/python3.12", true),
        ("PYTHON_PLATSTDLIB", "py/lib/python3.12", true),
        ("PYTHON_DYNLOAD", "py/lib/python3.12/lib-dynload", true),
        ("PYTHON_SITE", "py/lib/python3.12/site-packages", true),
        ("PYTHON_PLATSITE", "py/lib/python3.12/site-packages", true),
    ] {
        let p = rt.join(rel);
        if dir {
            fs::create_dir_all(&p).unwrap();
        } else {
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, "").unwrap();
        }
        vars.insert(name.to_string(), p.display().to_string());
    }
    LazyVars(std::sync::Arc::new(move |n: &str| vars.get(n).cloned().map(Ok)))
}

fn pol_has(rules: &[PathRule], p: &Path) -> bool {
    rules.iter().any(|r| r.path == p)
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, text).unwrap();
    p
}

fn paths(v: &[PathRule]) -> Vec<String> {
    v.iter().map(|r| r.path.display().to_string()).collect()
}

fn err(reference: &Path, c: &LoadContext) -> String {
    load(reference.to_str().unwrap(), c).unwrap_err().to_string()
}

#[test]
fn unknown_key_names_key_table_file_and_line() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "x.toml", "# comment\n[filesystem]\nraed = [\"/etc\"]\n");
    let e = err(&p, &ctx(d.path()));
    let file = p.display().to_string();
    assert!(e.starts_with(&format!("unknown key `raed` in [filesystem] ({file} line 3)")), "{e}");
    assert!(e.contains("expected one of: read, write, exec"), "{e}");
}

#[test]
fn unknown_key_at_top_level_and_in_path_entry() {
    let d = tempfile::tempdir().unwrap();
    let c = ctx(d.path());
    let p = write(d.path(), "top.toml", "extends = \"default\"\n\nfilesytem = 1\n");
    let e = err(&p, &c);
    assert!(e.starts_with(&format!("unknown key `filesytem` in the top level ({} line 3)", p.display())), "{e}");

    let p = write(d.path(), "entry.toml", "[filesystem]\nread = [\n  { path = \"/etc\", optinal = true },\n]\n");
    let e = err(&p, &c);
    assert!(e.contains("unknown key `optinal`"), "{e}");
    assert!(e.contains(&format!("{} line 3", p.display())), "{e}");
}

#[test]
fn type_error_has_line() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "x.toml", "[limits]\npids = \"many\"\n");
    let e = err(&p, &ctx(d.path()));
    assert!(e.contains(&format!("({} line 2)", p.display())), "{e}");
}

#[test]
fn missing_path_is_an_error_with_file_and_line() {
    let d = tempfile::tempdir().unwrap();
    let p =
        write(d.path(), "x.toml", "[filesystem]\nread = [\n  \"/etc/hostname\",\n  \"/nonexistent/mcpbox-test\",\n]\n");
    let e = load(p.to_str().unwrap(), &ctx(d.path())).unwrap_err();
    assert!(matches!(&e, PolicyError::MissingPath { path, .. } if path == Path::new("/nonexistent/mcpbox-test")));
    let s = e.to_string();
    assert!(s.starts_with(&format!("path /nonexistent/mcpbox-test does not exist ({} line 4)", p.display())), "{s}");
}

#[test]
fn optional_missing_path_is_dropped_with_note() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "x.toml",
        "[filesystem]\nread = [\"${DATA}\",\n  { path = \"/nonexistent/opt\", optional = true },\n  { path = \"/etc/hostname\", optional = true }]\n",
    );
    let (pol, notes) = load_with_notes(p.to_str().unwrap(), &ctx(d.path())).unwrap();
    assert_eq!(paths(&pol.filesystem.read), vec![d.path().join("data").display().to_string(), "/etc/hostname".into()]);
    assert!(pol.filesystem.read[1].optional);
    assert_eq!(
        notes,
        vec![format!("optional path /nonexistent/opt does not exist ({} line 3); not granted", p.display())]
    );
}

#[test]
fn extends_merges_parents_first_and_dedups() {
    let d = tempfile::tempdir().unwrap();
    let c = ctx(d.path());
    fs::create_dir(d.path().join("sub")).unwrap();
    write(
        d.path(),
        "a.toml",
        "[filesystem]\nread = [\"/etc/hostname\", \"/usr\"]\n[env]\npass = [\"A\", \"B\"]\nset = { X = \"a\", Y = \"a\" }\n\
         [limits]\nmemory = \"512M\"\npids = 10\n[network]\nmode = \"host\"\n",
    );
    write(
        d.path(),
        "b.toml",
        "[filesystem]\nread = [\"/usr\", \"/etc\"]\n[env]\npass = [\"B\", \"C\"]\nset = { Y = \"b\" }\n[limits]\npids = 20\n",
    );
    // Relative extends resolve from the extending file's directory.
    let child = write(
        &d.path().join("sub"),
        "child.toml",
        "extends = [\"../a.toml\", \"../b.toml\"]\n[filesystem]\nread = [\"/etc/hostname\", \"/var\"]\n\
         [env]\npass = [\"A\", \"D\"]\nset = { Z = \"${DATA}\" }\n[limits]\nopen_files = 7\n",
    );
    let pol = load(child.to_str().unwrap(), &c).unwrap();
    assert_eq!(paths(&pol.filesystem.read), vec!["/etc/hostname", "/usr", "/etc", "/var"]);
    assert_eq!(pol.env.pass, vec!["A", "B", "C", "D"]);
    assert_eq!(pol.env.set.get("X").unwrap(), "a");
    assert_eq!(pol.env.set.get("Y").unwrap(), "b");
    assert_eq!(pol.env.set.get("Z").unwrap(), &c.vars["DATA"]);
    assert_eq!(pol.limits.memory, Some(512 << 20));
    assert_eq!(pol.limits.pids, Some(20));
    assert_eq!(pol.limits.open_files, Some(7));
    assert_eq!(pol.limits.tmp, DEFAULT_LIMITS.tmp);
    assert_eq!(pol.network, Network::Host { connect_ports: None, bind_ports: None });
    assert_eq!(pol.source, child.display().to_string());
}

#[test]
fn optional_and_required_same_path_is_required() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "a.toml", "[filesystem]\nread = [{ path = \"/etc/hostname\", optional = true }]\n");
    let p = write(d.path(), "b.toml", "extends = \"./a.toml\"\n[filesystem]\nread = [\"/etc/hostname\"]\n");
    let pol = load(p.to_str().unwrap(), &ctx(d.path())).unwrap();
    assert_eq!(pol.filesystem.read, vec![PathRule { path: "/etc/hostname".into(), optional: false }]);
}

#[test]
fn extends_cycle_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    let a = write(d.path(), "a.toml", "extends = \"./b.toml\"\n");
    let b = write(d.path(), "b.toml", "\nextends = [\"default\", \"./a.toml\"]\n");
    let e = load(a.to_str().unwrap(), &ctx(d.path())).unwrap_err();
    assert!(matches!(e, PolicyError::Cycle { .. }), "{e:?}");
    let s = e.to_string();
    let (a, b) = (a.display().to_string(), b.display().to_string());
    assert!(s.starts_with(&format!("`extends` cycle: {a} -> {b} -> ")), "{s}");
    assert!(s.ends_with(&format!("a.toml ({b} line 2)")), "{s}");
}

#[test]
fn user_policy_dir_wins_and_may_extend_the_shipped_one() {
    let d = tempfile::tempdir().unwrap();
    let mut c = ctx(d.path());
    c.search_dirs.push(d.path().to_path_buf());
    write(d.path(), "node.toml", "extends = \"node\"\n[limits]\npids = 5\n");
    let pol = load("node", &c).unwrap();
    assert_eq!(pol.limits.pids, Some(5));
    assert!(pol.filesystem.exec.iter().any(|r| r.path == d.path().join("rt/node/bin/node")));
    let e = load("nosuchpolicy", &c).unwrap_err().to_string();
    assert!(e.starts_with("policy `nosuchpolicy` not found (referenced from command line)"), "{e}");
    assert!(e.contains("shipped policies (default, node, python, "), "{e}");
}

/// The one list of directories names are looked up in: the config's `policies/`, absolute
/// whatever the working directory, and nothing without a config (never `./policies`).
#[test]
fn names_are_searched_in_the_configs_policies_dir_only() {
    let cwd = std::env::current_dir().unwrap();
    assert_eq!(search_dirs(None), Vec::<PathBuf>::new());
    assert_eq!(search_dirs(Some(Path::new("/etc/mcpbox/mcpbox.json"))), vec![PathBuf::from("/etc/mcpbox/policies")]);
    assert_eq!(search_dirs(Some(Path::new("mcpbox.json"))), vec![cwd.join("policies")]);
    assert_eq!(search_dirs(Some(Path::new("./conf/mcpbox.json"))), vec![cwd.join("conf/policies")]);
    // Without one, a name not shipped says where it could have come from.
    let e = load("mine", &LoadContext::default()).unwrap_err().to_string();
    assert!(e.contains("--config FILE searches its policies/ first"), "{e}");
}

#[test]
fn sizes_parse() {
    assert_eq!(parse_size("4096"), Ok(4096));
    assert_eq!(parse_size("512K"), Ok(512 << 10));
    assert_eq!(parse_size("512KiB"), Ok(512 << 10));
    assert_eq!(parse_size("64M"), Ok(64 << 20));
    assert_eq!(parse_size("1G"), Ok(1 << 30));
    assert_eq!(parse_size("2GiB"), Ok(2 << 30));
    assert_eq!(parse_size("1T"), Ok(1 << 40));
    for bad in ["", "M", "12MB", "1.5G", "-1", " 1G", "1 G", "1g", "10Q"] {
        let e = parse_size(bad).unwrap_err();
        assert!(e.starts_with(&format!("invalid size `{bad}`")), "{bad}: {e}");
    }
    assert_eq!(parse_size("99999999999T").unwrap_err(), "size `99999999999T` is too large");
    assert_eq!(format_size(1 << 30), "1G");
    assert_eq!(format_size(1536 << 20), "1536M");
    assert_eq!(format_size(1000), "1000");
}

#[test]
fn bad_size_in_policy_names_key_file_line() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "x.toml", "[limits]\ntmp = \"64M\"\nmemory = \"1.5G\"\n");
    let e = err(&p, &ctx(d.path()));
    assert!(e.starts_with("[limits] memory: invalid size `1.5G`"), "{e}");
    assert!(e.ends_with(&format!("({} line 3)", p.display())), "{e}");
    let p = write(d.path(), "y.toml", "[limits]\nmemory = 0\n");
    assert!(err(&p, &ctx(d.path())).starts_with("[limits] memory must be positive, not 0"));
}

#[test]
fn undefined_variable_names_variable_file_line() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "x.toml", "[filesystem]\nwrite = [\"${DATA}\",\n \"${HOME}/x\"]\n");
    let e = load(p.to_str().unwrap(), &ctx(d.path())).unwrap_err();
    assert!(matches!(&e, PolicyError::UndefinedVar { name, .. } if name == "HOME"));
    assert_eq!(e.to_string(), format!("undefined variable ${{HOME}} ({} line 3); defined: CACHE, DATA", p.display()));
}

#[test]
fn relative_and_dotdot_paths_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let c = ctx(d.path());
    let p = write(d.path(), "x.toml", "[filesystem]\nread = [\"etc\"]\n");
    assert_eq!(err(&p, &c), format!("path `etc` is not absolute ({} line 2)", p.display()));
    let p = write(d.path(), "y.toml", "[filesystem]\nread = [\"${DATA}/../x\"]\n");
    assert!(err(&p, &c).ends_with(&format!("/data/../x` contains `..` ({} line 2)", p.display())));
    // `.` and doubled/trailing slashes are normalised away.
    let p = write(d.path(), "z.toml", "[filesystem]\nread = [\"/etc//./hostname/\"]\n");
    assert_eq!(paths(&load(p.to_str().unwrap(), &c).unwrap().filesystem.read), vec!["/etc/hostname"]);
}

#[test]
fn network_modes_and_their_keys() {
    let d = tempfile::tempdir().unwrap();
    let c = ctx(d.path());
    let p = write(d.path(), "x.toml", "[network]\nmode = \"none\"\nallow = [\"example.com:443\"]\n");
    let e = err(&p, &c);
    assert!(e.starts_with("[network] allow (`example.com:443`) needs mode = \"proxy\""), "{e}");
    assert!(e.contains(&format!("mode = \"none\" set at {} line 2", p.display())), "{e}");
    assert!(e.ends_with(&format!("({} line 3)", p.display())), "{e}");

    let p = write(d.path(), "y.toml", "[network]\nallow = [\"example.com:443\"]\n");
    assert!(err(&p, &c).contains("mode defaults to \"none\""));

    let p = write(d.path(), "z.toml", "[network]\nmode = \"proxy\"\nconnect_ports = [443]\n");
    assert!(err(&p, &c).starts_with("[network] connect_ports needs mode = \"host\""));

    let p = write(
        d.path(),
        "ok.toml",
        "[network]\nmode = \"proxy\"\nallow = [\"*.Example.com:443\", \"api.x.org:8443\"]\n",
    );
    let pol = load(p.to_str().unwrap(), &c).unwrap();
    assert_eq!(
        pol.network,
        Network::Proxy { allow: vec!["*.example.com:443".parse().unwrap(), "api.x.org:8443".parse().unwrap()] }
    );

    let p = write(d.path(), "bad.toml", "[network]\nmode = \"proxy\"\nallow = [\"example.com\"]\n");
    assert!(err(&p, &c).starts_with("[network] allow `example.com`: a port is required"));

    // The grammar the egress proxy applies at every start: what it refuses, loading refuses,
    // and what it takes (IPv6 literals), loading takes.
    let p = write(d.path(), "tld.toml", "[network]\nmode = \"proxy\"\nallow = [\"*.com:443\"]\n");
    let e = err(&p, &c);
    assert!(e.starts_with("[network] allow `*.com:443`: a wildcard over a whole top-level domain is too broad"), "{e}");
    assert!(e.ends_with(&format!("({} line 3)", p.display())), "{e}");
    let p = write(d.path(), "v6.toml", "[network]\nmode = \"proxy\"\nallow = [\"[::1]:8080\", \"127.0.0.1:8080\"]\n");
    let pol = load(p.to_str().unwrap(), &c).unwrap();
    let Network::Proxy { allow } = &pol.network else { panic!("{:?}", pol.network) };
    assert_eq!(allow.iter().map(|a| a.to_string()).collect::<Vec<_>>(), ["[::1]:8080", "127.0.0.1:8080"]);

    let p = write(d.path(), "host.toml", "[network]\nmode = \"host\"\nconnect_ports = [443, 80, 443]\n");
    let pol = load(p.to_str().unwrap(), &c).unwrap();
    assert_eq!(pol.network, Network::Host { connect_ports: Some(vec![80, 443]), bind_ports: None });
}

#[test]
fn seccomp_names_and_sandbox_fields() {
    let d = tempfile::tempdir().unwrap();
    let c = ctx(d.path());
    let p = write(d.path(), "x.toml", "[seccomp]\nextra_deny = [\"ptrace\", \"Bad-Name\"]\n");
    assert_eq!(
        err(&p, &c),
        format!(
            "[seccomp] extra_deny: `Bad-Name` is not a syscall name (lowercase letters, digits, _) ({} line 2)",
            p.display()
        )
    );
    // Names are checked against the x86_64 table, at the line that wrote them.
    let p = write(d.path(), "unknown.toml", "[seccomp]\nextra_deny = [\"mkdir\",\n  \"no_such_call\"]\n");
    assert_eq!(
        err(&p, &c),
        format!(
            "[seccomp] extra_deny: `no_such_call` is not an x86_64 syscall (see `man 2 syscalls`) ({} line 3)",
            p.display()
        )
    );
    let p = write(d.path(), "hard.toml", "[seccomp]\nextra_allow = [\"bpf\"]\n");
    assert_eq!(
        err(&p, &c),
        format!(
            "[seccomp] extra_allow: syscall `bpf` can never be allowed: eBPF is kernel attack surface ({} line 2)",
            p.display()
        )
    );
    let p =
        write(d.path(), "real.toml", "[seccomp]\nextra_deny = [\"acct\", \"mkdir\"]\nextra_allow = [\"vmsplice\"]\n");
    let pol = load(p.to_str().unwrap(), &c).unwrap();
    assert_eq!(pol.seccomp.extra_deny, ["acct", "mkdir"]);
    assert_eq!(pol.seccomp.extra_allow, ["vmsplice"]);
    let p = write(
        d.path(),
        "y.toml",
        "[seccomp]\nextra_deny = [\"ptrace\"]\nextra_allow = [\"ptrace\", \"pread64\"]\n[sandbox]\nlevel = \"container\"\nlandlock_min_abi = 0\n",
    );
    let (pol, notes) = load_with_notes(p.to_str().unwrap(), &c).unwrap();
    assert_eq!(pol.seccomp.extra_deny, vec!["ptrace"]);
    assert_eq!(pol.seccomp.extra_allow, vec!["pread64"]);
    assert!(notes[0].starts_with("syscall ptrace is both allowed"), "{notes:?}");
    assert_eq!(pol.sandbox, SandboxReq { level: Level::Container, landlock_min_abi: 0, relax: Relax::default() });
    let p = write(d.path(), "z.toml", "[sandbox]\nlevel = \"none\"\n");
    let e = err(&p, &c);
    assert!(e.contains("unknown variant `none`") && e.ends_with(&format!("({} line 2)", p.display())), "{e}");
}

#[test]
fn every_shipped_policy_loads_here() {
    let d = tempfile::tempdir().unwrap();
    let c = ctx(d.path());
    assert_eq!(shipped_names()[..3], ["default", "node", "python"]);
    // Every shipped policy loads, keeps only optional paths as notes, and renders back.
    for name in shipped_names() {
        let (pol, notes) = load_with_notes(name, &c).unwrap_or_else(|e| panic!("{name}: {e}"));
        for n in &notes {
            assert!(n.starts_with("optional path "), "{name}: {n}");
        }
        let again = write(d.path(), &format!("{name}-all-rendered.toml"), &render(&pol));
        let mut back = load(again.to_str().unwrap(), &c).unwrap();
        back.source = pol.source.clone();
        assert_eq!(back, pol, "{name}");
    }
    // The bases: no network, nothing writable, the loader and libraries executable.
    for name in ["default", "node", "python"] {
        let (pol, notes) = load_with_notes(name, &c).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(pol.source, format!("shipped:{name}.toml"));
        assert_eq!(pol.network, Network::None, "{name}");
        assert_eq!(
            pol.sandbox,
            SandboxReq { level: Level::Full, landlock_min_abi: 1, relax: Relax { cpu: true, disk: true } }
        );
        assert!(pol.filesystem.write.is_empty(), "{name}");
        let exec = paths(&pol.filesystem.exec);
        assert!(exec.contains(&"/lib64/ld-linux-x86-64.so.2".to_string()), "{name}");
        assert!(exec.contains(&"/usr/lib/x86_64-linux-gnu".to_string()), "{name}");
        for n in &notes {
            assert!(n.starts_with("optional path "), "{name}: {n}");
        }
        // Rendering gives a policy that loads back to the same thing.
        let again = write(d.path(), &format!("{name}-rendered.toml"), &render(&pol));
        let mut back = load(again.to_str().unwrap(), &c).unwrap();
        back.source = pol.source.clone();
        assert_eq!(back, pol, "{name}");
    }
    let node = load("node", &c).unwrap();
    assert!(paths(&node.filesystem.exec).contains(&c.vars["DATA"].replace("/data", "/rt/node/bin/node")));
    assert_eq!(node.env.set.get("HOME"), Some(&c.vars["DATA"]));
    assert!(!node.env.pass.iter().any(|n| n == "NODE_OPTIONS"));
    // mcpbox's own V8 settings, never the host's.
    assert_eq!(node.env.set.get("NODE_OPTIONS").map(String::as_str), Some("--max-semi-space-size=1"));
    let py = load("python", &c).unwrap();
    let rt = d.path().join("rt/py");
    assert!(
        pol_has(&py.filesystem.exec, &rt.join("bin/python3.12"))
            && pol_has(&py.filesystem.exec, &rt.join("lib/python3.12/lib-dynload"))
    );
    assert!(pol_has(&py.filesystem.read, &rt.join("lib/python3.12")));
    // Nothing of another interpreter's tree: no /usr/lib/python3*, no /usr/bin/python*.
    for r in py.filesystem.read.iter().chain(&py.filesystem.exec) {
        let p = r.path.to_string_lossy();
        assert!(!p.starts_with("/usr/lib/python3") && !p.starts_with("/usr/bin/python"), "{p}");
    }
    assert_eq!(py.env.set.get("PYTHONDONTWRITEBYTECODE").map(String::as_str), Some("1"));
    assert!(!paths(&py.filesystem.read).iter().any(|p| p.starts_with("/root")));
}

#[test]
fn inline_policy_resolves_relative_extends_from_base_dir() {
    let d = tempfile::tempdir().unwrap();
    let c = ctx(d.path());
    write(d.path(), "base.toml", "extends = \"default\"\n[env]\npass = [\"TOKEN\"]\n");
    let table: toml::Table =
        toml::from_str("extends = \"./base.toml\"\n[filesystem]\nwrite = [\"${DATA}\"]\n").unwrap();
    let pol = load_inline(table, d.path(), &c).unwrap();
    assert_eq!(pol.source, "inline policy");
    assert_eq!(pol.env.pass, vec!["TOKEN"]);
    assert_eq!(paths(&pol.filesystem.write), vec![c.vars["DATA"].clone()]);

    let table: toml::Table = toml::from_str("[env]\npas = []\n").unwrap();
    let e = load_inline(table, d.path(), &c).unwrap_err().to_string();
    assert!(e.starts_with("unknown key `pas` in [env] (inline policy)"), "{e}");
}

#[test]
fn check_skips_missing_data_dir_and_says_so() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "x.toml", "extends = \"node\"\n[filesystem]\nwrite = [\"${DATA}\", \"${CACHE}/npm\"]\n");
    let out = check_with(p.to_str().unwrap(), None, None, Some(fake_runtimes(&d.path().join("rt"))), vec![]).unwrap();
    assert!(out.contains("# note: path /var/lib/mcpbox/SERVER/data ("), "{out}");
    assert!(out.contains("not checked: /var/lib/mcpbox/SERVER/data does not exist yet"), "{out}");
    assert!(
        out.contains("write = [\n    \"/var/lib/mcpbox/SERVER/data\",\n    \"/var/lib/mcpbox/SERVER/cache/npm\",\n]"),
        "{out}"
    );
    assert!(out.contains("memory = \"1G\""), "{out}");
    // With a DATA dir that exists, paths under it are checked.
    let data = d.path().join("data");
    fs::create_dir(&data).unwrap();
    let p = write(d.path(), "y.toml", "[filesystem]\nwrite = [\"${DATA}\", \"${DATA}/missing\"]\n");
    let e = check(p.to_str().unwrap(), Some(&data), None).unwrap_err().to_string();
    assert!(e.starts_with(&format!("path {}/missing does not exist ({} line 2)", data.display(), p.display())), "{e}");
}

#[test]
fn lazy_variables_expand_and_a_missing_runtime_is_named() {
    let d = tempfile::tempdir().unwrap();
    let mut c = ctx(d.path());
    let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let a2 = asked.clone();
    let dir = d.path().display().to_string();
    c.lazy = Some(LazyVars(std::sync::Arc::new(move |name: &str| {
        a2.lock().unwrap().push(name.to_string());
        match name {
            "RT_HOME" => Some(Ok(dir.clone())),
            "RT_GONE" => Some(Err("no such runtime on PATH".to_string())),
            _ => None,
        }
    })));
    let p = write(d.path(), "rt.toml", "[filesystem]\nread = [\"${RT_HOME}/data\"]\n");
    let pol = load(p.to_str().unwrap(), &c).unwrap();
    assert_eq!(paths(&pol.filesystem.read), vec![d.path().join("data").display().to_string()]);
    // A policy that does not use them never asks.
    asked.lock().unwrap().clear();
    let p = write(d.path(), "plain.toml", "[filesystem]\nread = [\"${DATA}\"]\n");
    load(p.to_str().unwrap(), &c).unwrap();
    assert!(asked.lock().unwrap().is_empty());
    let p = write(d.path(), "gone.toml", "[filesystem]\n\nexec = [\"${RT_GONE}\"]\n");
    let e = err(&p, &c);
    assert!(e.contains("${RT_GONE}") && e.contains("no such runtime on PATH") && e.contains("gone.toml line 3"), "{e}");
    // A runtime path that the runtime reported but that does not exist is an error naming it,
    // unless written optional.
    let p = write(
        d.path(),
        "nolib.toml",
        "[filesystem]\nexec = [\"${RT_HOME}/lib-dynload\"]\nread = [{ path = \"${RT_HOME}/site\", optional = true }]\n",
    );
    let e = err(&p, &c);
    assert!(
        e.contains("runtime path")
            && e.contains("lib-dynload")
            && e.contains("${RT_HOME}")
            && e.contains("nolib.toml line 2"),
        "{e}"
    );
    let p = write(d.path(), "typo.toml", "[filesystem]\nexec = [\"${RT_NOPE}\"]\n");
    assert!(err(&p, &c).contains("undefined variable ${RT_NOPE}"));
}

#[test]
fn grants_over_the_sandbox_own_dirs_are_refused_after_normalising() {
    let d = tempfile::tempdir().unwrap();
    let c = ctx(d.path());
    // Each spelling normalises to a path that is, contains, or lies inside /proc, /dev or /tmp.
    for (written, shown) in [
        ("/", "/"),
        ("//", "/"),
        ("/./", "/"),
        ("/proc", "/proc"),
        ("/proc/self", "/proc/self"),
        ("/dev/", "/dev"),
        ("/dev/shm", "/dev/shm"),
        ("/tmp", "/tmp"),
        ("/tmp/./", "/tmp"),
    ] {
        for table in ["read", "write", "exec"] {
            let p = write(d.path(), "anc.toml", &format!("[filesystem]\n{table} = [\"{written}\"]\n"));
            let e = err(&p, &c);
            assert!(e.starts_with(&format!("{shown} cannot be granted:")), "{written} in {table}: {e}");
            assert!(e.ends_with(&format!("({} line 2)", p.display())), "{written}: {e}");
        }
    }
    let p = write(d.path(), "anc.toml", "[filesystem]\nread = [\"/\"]\n");
    assert!(err(&p, &c).contains("it contains /proc"), "{}", err(&p, &c));
    // `..` is never normalised away: refused as such, so `/usr/..` cannot become `/`.
    let p = write(d.path(), "dots.toml", "[filesystem]\nread = [\"/usr/..\"]\n");
    assert!(err(&p, &c).starts_with("path `/usr/..` contains `..`"), "{}", err(&p, &c));
    // Optional does not make it acceptable.
    let p = write(d.path(), "opt.toml", "[filesystem]\nread = [{ path = \"/\", optional = true }]\n");
    assert!(err(&p, &c).starts_with("/ cannot be granted:"));
    // Beside them and below /tmp is fine.
    let sub = d.path().join("data");
    let p = write(
        d.path(),
        "fine.toml",
        &format!("[filesystem]\nread = [\"/usr\", \"/etc/hosts\"]\nwrite = [\"{}\"]\n", sub.display()),
    );
    load(p.to_str().unwrap(), &c).unwrap();
    assert_eq!(reserved_conflict(Path::new("/tmp/x/y")), None);
    assert_eq!(reserved_conflict(Path::new("/procfs")), None);
    assert_eq!(reserved_conflict(Path::new("/devices")), None);
    assert!(reserved_conflict(Path::new("/")).is_some());
}

#[test]
fn cpu_and_disk_limits_parse_merge_and_render() {
    let d = tempfile::tempdir().unwrap();
    let c = ctx(d.path());
    for (written, milli) in
        [("\"1.0\"", 1000), ("\"0.5\"", 500), ("1.25", 1250), ("2", 2000), ("\"0.01\"", 10), ("\".5\"", 500)]
    {
        let p = write(d.path(), "cpu.toml", &format!("[limits]\ncpu = {written}\n"));
        assert_eq!(load(p.to_str().unwrap(), &c).unwrap().limits.cpu, Some(milli), "{written}");
    }
    for written in ["\"0\"", "0", "\"0.001\"", "\"-1\"", "\"1.2345\"", "\"one\"", "\"1e3\"", "\"5000\"", "-2"] {
        let p = write(d.path(), "cpu.toml", &format!("[limits]\ncpu = {written}\n"));
        let e = err(&p, &c);
        assert!(e.starts_with("[limits] "), "{written}: {e}");
        assert!(e.ends_with(&format!("({} line 2)", p.display())), "{written}: {e}");
    }
    assert_eq!(format_cpu(1000), "1.0");
    assert_eq!(format_cpu(1250), "1.25");
    assert_eq!(format_cpu(10), "0.01");

    let p = write(d.path(), "disk.toml", "[limits]\ndisk = \"64M\"\ncpu = \"0.5\"\n[sandbox]\nrelax = [\"disk\"]\n");
    let pol = load(p.to_str().unwrap(), &c).unwrap();
    assert_eq!(pol.limits.disk, Some(64 << 20));
    assert_eq!(pol.sandbox.relax, Relax { cpu: false, disk: true });
    let back = write(d.path(), "disk-rendered.toml", &render(&pol));
    let mut again = load(back.to_str().unwrap(), &c).unwrap();
    again.source = pol.source.clone();
    assert_eq!(again, pol);

    // A child inherits the base's limits and relaxations, and may take a relaxation back.
    let p = write(d.path(), "child.toml", "extends = \"disk.toml\"\n[sandbox]\nrelax = []\n");
    let pol = load(p.to_str().unwrap(), &c).unwrap();
    assert_eq!((pol.limits.disk, pol.limits.cpu), (Some(64 << 20), Some(500)));
    assert_eq!(pol.sandbox.relax, Relax::default());

    let p = write(d.path(), "bad.toml", "[sandbox]\nrelax = [\"memory\"]\n");
    assert!(err(&p, &c).starts_with("[sandbox] relax: `memory` is not a limit that may be relaxed"), "{}", err(&p, &c));

    // Unset, there is no CPU or disk limit; the shipped bases set both, relaxed.
    let p = write(d.path(), "none.toml", "[limits]\npids = 3\n");
    let pol = load(p.to_str().unwrap(), &c).unwrap();
    assert_eq!((pol.limits.cpu, pol.limits.disk), (None, None));
    for name in ["default", "node", "python"] {
        let pol = load(name, &c).unwrap();
        assert_eq!((pol.limits.cpu, pol.limits.disk), (Some(1000), Some(1 << 30)), "{name}");
        assert_eq!(pol.sandbox.relax, Relax { cpu: true, disk: true }, "{name}");
    }
}

#[test]
fn node_flags_are_checked_replaced_as_a_whole_and_render() {
    let d = tempfile::tempdir().unwrap();
    let c = ctx(d.path());
    let p = write(d.path(), "base.toml", "[runtime]\nnode_flags = [\"--lite-mode\", \"--max-semi-space-size=1\"]\n");
    let pol = load(p.to_str().unwrap(), &c).unwrap();
    assert_eq!(pol.runtime.node_flags, ["--lite-mode", "--max-semi-space-size=1"]);
    let back = write(d.path(), "base-rendered.toml", &render(&pol));
    let mut again = load(back.to_str().unwrap(), &c).unwrap();
    again.source = pol.source.clone();
    assert_eq!(again, pol);

    // A child that says nothing keeps them; one that sets the list replaces it (`[]`: none).
    let p = write(d.path(), "keep.toml", "extends = \"base.toml\"\n");
    assert_eq!(load(p.to_str().unwrap(), &c).unwrap().runtime.node_flags, ["--lite-mode", "--max-semi-space-size=1"]);
    let p = write(d.path(), "off.toml", "extends = \"base.toml\"\n[runtime]\nnode_flags = []\n");
    assert!(load(p.to_str().unwrap(), &c).unwrap().runtime.node_flags.is_empty());
    let p =
        write(d.path(), "other.toml", "extends = \"base.toml\"\n[runtime]\nnode_flags = [\"--optimize-for-size\"]\n");
    let other = load(p.to_str().unwrap(), &c).unwrap();
    assert_eq!(other.runtime.node_flags, ["--optimize-for-size"]);
    // `policy diff` says how they differ, apart from the grants (flags grant nothing).
    let dd = diff(&pol, &other);
    assert!(dd.is_empty() && dd.runtime.len() == 1 && dd.runtime[0].contains("--optimize-for-size"), "{dd:?}");

    // Only memory and compiler settings: nothing that loads code, opens a port or a file, and
    // values are numbers.
    for bad in [
        "--require=/tmp/x.js",
        "--import=data:text/javascript,1",
        "-r",
        "--inspect=0.0.0.0:9229",
        "--eval=1",
        "--max-semi-space-size",
        "--max-semi-space-size=1k",
        "--max-semi-space-size=",
        "--lite-mode=1",
        "--lite-mode --require=x",
        "lite-mode",
        "--",
    ] {
        let p = write(d.path(), "bad.toml", &format!("[runtime]\nnode_flags = [{}]\n", toml::Value::from(bad)));
        let e = err(&p, &c);
        assert!(e.starts_with("[runtime] node_flags: "), "{bad}: {e}");
        assert!(e.ends_with(&format!("({} line 2)", p.display())), "{bad}: {e}");
    }
    let p = write(d.path(), "bad.toml", "[runtime]\nnode_opts = []\n");
    assert!(err(&p, &c).contains("node_opts"), "{}", err(&p, &c));
}

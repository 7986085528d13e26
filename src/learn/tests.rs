//! Unit tests of the learn view and the policy writer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::*;
use crate::policy::LoadContext;

fn seen(uses: &[(Use, u64)], syscall: &'static str) -> PathSeen {
    let mut s = PathSeen::default();
    for (u, n) in uses {
        s.count[*u as usize] += n;
    }
    s.syscalls.insert(syscall);
    s
}

fn reads(paths: &[&str]) -> BTreeMap<PathBuf, PathSeen> {
    paths.iter().map(|p| (PathBuf::from(p), seen(&[(Use::Read, 1)], "openat"))).collect()
}

fn paths(lines: &[Line]) -> Vec<String> {
    lines.iter().map(|l| l.path.display().to_string()).collect()
}

// Paths under /nonexistent-mcpbox-learn do not exist: files, as far as `collapse` can tell.
const X: &str = "/nonexistent-mcpbox-learn";

/// Every directory is whole in the view (see `View::contains`).
fn all(_: &Path) -> bool {
    true
}

#[test]
fn files_collapse_to_their_directory_and_three_siblings_to_their_parent() {
    let two = collapse(&reads(&[&format!("{X}/a/b/f1"), &format!("{X}/a/b/f2")]), false, all);
    assert_eq!(paths(&two), [format!("{X}/a/b")]);
    assert_eq!((two[0].files, two[0].times), (2, 2));
    // A single file stays a file.
    let one = collapse(&reads(&[&format!("{X}/a/b/f")]), false, all);
    assert_eq!(paths(&one), [format!("{X}/a/b/f")]);
    let three = collapse(
        &reads(&[
            &format!("{X}/a/b/f"),
            &format!("{X}/a/b/g"),
            &format!("{X}/a/c/f"),
            &format!("{X}/a/c/g"),
            &format!("{X}/a/d/f"),
            &format!("{X}/a/d/g"),
        ]),
        false,
        all,
    );
    assert_eq!(paths(&three), [format!("{X}/a")]);
    assert_eq!(three[0].files, 6);
    // Two siblings stay apart.
    let apart = collapse(
        &reads(&[&format!("{X}/a/b/f"), &format!("{X}/a/b/g"), &format!("{X}/a/c/f"), &format!("{X}/a/c/g")]),
        false,
        all,
    );
    assert_eq!(paths(&apart), [format!("{X}/a/b"), format!("{X}/a/c")]);
    // A line inside another is merged into it.
    let nested =
        collapse(&reads(&[&format!("{X}/a/b/f"), &format!("{X}/a/b/g"), &format!("{X}/a/b/c/d/g")]), false, all);
    assert_eq!(paths(&nested), [format!("{X}/a/b")]);
    assert_eq!(nested[0].files, 3);
}

#[test]
fn never_slash_a_top_level_directory_a_home_or_a_broad_system_directory() {
    // Three directories under /usr/share would merge into /usr/share: too broad, they stay.
    let share = collapse(
        &reads(&[
            "/usr/share/x1/f",
            "/usr/share/x1/g",
            "/usr/share/x2/f",
            "/usr/share/x2/g",
            "/usr/share/x3/f",
            "/usr/share/x3/g",
        ]),
        false,
        all,
    );
    assert_eq!(paths(&share), ["/usr/share/x1", "/usr/share/x2", "/usr/share/x3"]);
    // A file whose directory is /etc, a home or / stays a file.
    let files =
        collapse(&reads(&["/etc/x-passwd", "/home/u/.x", "/root/.y", "/top", "/home/u/.z", "/home/u/.w"]), false, all);
    assert_eq!(paths(&files), ["/etc/x-passwd", "/home/u/.w", "/home/u/.x", "/home/u/.z", "/root/.y"]);
    for p in ["/", "/etc", "/usr", "/home", "/home/u", "/root", "/usr/lib", "/usr/share", "/usr/local"] {
        assert!(too_broad(Path::new(p)), "{p}");
    }
    for p in ["/usr/share/zoneinfo", "/usr/lib/x86_64-linux-gnu", "/etc/ssl/certs", "/home/u/project"] {
        assert!(!too_broad(Path::new(p)), "{p}");
    }
    // Looking at a top-level directory grants nothing.
    assert!(collapse(&reads(&["/usr", "/"]), false, all).is_empty());
    // Exec lines are exact.
    let ex = collapse(&reads(&[&format!("{X}/bin/a"), &format!("{X}/bin/b"), &format!("{X}/bin/c")]), true, all);
    assert_eq!(ex.len(), 3);
}

#[test]
fn normalize_is_lexical_and_never_climbs_above_the_root() {
    assert_eq!(normalize(Path::new("/a/./b/../c")), PathBuf::from("/a/c"));
    assert_eq!(normalize(Path::new("/../../etc//passwd")), PathBuf::from("/etc/passwd"));
    assert_eq!(normalize(Path::new("/")), PathBuf::from("/"));
}

#[test]
fn the_learn_view_has_the_system_directories_and_etc_without_secrets_or_hidden_paths() {
    let hidden_dir = tempfile::tempdir_in("/etc").ok();
    let hidden: Vec<PathBuf> = hidden_dir.iter().map(|d| d.path().to_path_buf()).collect();
    let view = learn_view(&hidden);
    assert!(view.grants.contains(&(PathBuf::from("/usr"), Access::Exec)), "{:?}", view.grants);
    assert!(view.contains(Path::new("/usr/bin/env")));
    assert!(view.contains(Path::new("/etc/passwd")));
    for secret in ["/etc/shadow", "/etc/gshadow", "/etc/sudoers", "/etc/ssh/ssh_host_ed25519_key", "/etc/ssl/private/x"]
    {
        assert!(!view.contains(Path::new(secret)), "{secret} is in the view");
    }
    for never in ["/root/.bashrc", "/home/someone/.ssh/id_ed25519", "/var/lib/mcpbox/x/data", "/", "/etc"] {
        assert!(!view.contains(Path::new(never)), "{never} is in the view");
    }
    for h in &hidden {
        assert!(!view.contains(&h.join("mcpbox.json")), "{} is in the view", h.display());
    }
    // A name in the view that a symlink leads out of it (Debian: /usr/lib/ssl/private ->
    // /etc/ssl/private) is not in the view: a grant of it would follow the link at launch.
    if std::fs::read_link("/usr/lib/ssl/private").is_ok() {
        assert!(!view.contains(Path::new("/usr/lib/ssl/private/ssl-cert-snakeoil.key")));
        assert!(!view.contains(Path::new("/usr/lib/ssl/private")));
    }
    // Everything in it is a grant a policy may hold.
    for (g, _) in &view.grants {
        assert!(crate::policy::reserved_conflict(&std::fs::canonicalize(g).unwrap()).is_none(), "{}", g.display());
    }
}

fn default_policy(dir: &Path) -> crate::policy::Policy {
    let mut c = LoadContext::default();
    c.vars.insert("DATA".into(), dir.join("data").display().to_string());
    c.vars.insert("CACHE".into(), dir.join("cache").display().to_string());
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::create_dir_all(dir.join("cache")).unwrap();
    crate::policy::load("default", &c).unwrap()
}

#[test]
fn the_written_policy_has_what_was_used_commented_and_nothing_outside_the_view() {
    let dir = tempfile::tempdir().unwrap();
    let base = default_policy(dir.path());
    let state = PathBuf::from("/var/lib/mcpbox");
    let view = View {
        grants: vec![(PathBuf::from("/usr"), Access::Exec), (PathBuf::from("/etc/passwd"), Access::Read)],
        never: vec![],
    };
    let mut obs = Snapshot::default();
    let mut put = |p: &str, u: Use, call: &'static str| {
        let s = obs.paths.entry(PathBuf::from(p)).or_default();
        s.count[u as usize] += 1;
        s.syscalls.insert(call);
    };
    put("/etc/passwd", Use::Read, "openat");
    put("/usr/bin/env", Use::Exec, "execve");
    put("/usr/bin/true", Use::Exec, "execve"); // the base grants it
    put("/usr/lib/x86_64-linux-gnu/libc.so.6", Use::Read, "openat"); // the base grants it
    put("/etc/shadow", Use::Read, "openat"); // exists, not in the view
    put("/root/canary", Use::Read, "openat");
    put("/proc/self/status", Use::Read, "openat");
    put("/dev/urandom", Use::Read, "openat");
    put("/tmp/x", Use::Write, "openat");
    put("/var/lib/mcpbox/other/data/secret", Use::Read, "openat");
    put("/usr/no-such-mcpbox-file", Use::Look, "newfstatat");
    put("/usr/lib/mcpbox-learn-written.json", Use::Write, "openat");
    put(&format!("{}/memory.json", dir.path().join("data").display()), Use::Write, "openat");
    obs.connects.insert("example.com:443".into(), 2);
    obs.denied.insert("ptrace".into(), 1);
    let learned = Learned {
        extends: "default".into(),
        base: &base,
        launch_grants: &[state],
        view: &view,
        command: "node server.js".into(),
        executable: None,
        data: Some(dir.path().join("data")),
        env_names: vec!["API_KEY".into()],
    };
    let text = write_policy(&learned, &obs);
    assert!(text.contains("extends = \"default\""), "{text}");
    assert!(text.contains("read = [\n    # 1 path, once (openat)\n    \"/etc/passwd\",\n]"), "{text}");
    assert!(text.contains("exec = [\n    # 1 path, once (execve)\n    \"/usr/bin/env\",\n]"), "{text}");
    assert!(
        text.contains("# write = [\n#     # 1 path, once (openat)\n#     \"/usr/lib/mcpbox-learn-written.json\",\n# ]"),
        "{text}"
    );
    assert!(
        text.contains("write = [\n    # 1 path(s) in the server's own data dir (written)\n    \"${DATA}\",\n]"),
        "{text}"
    );
    assert!(text.contains("mode = \"proxy\""), "{text}");
    assert!(text.contains("# 2 connection(s) through the proxy\n    \"example.com:443\","), "{text}");
    assert!(text.contains(
        "pass = [\n    # in the server's configured env (the value stays in the config)\n    \"API_KEY\",\n]"
    ));
    assert!(text.contains("#   ptrace: 1 time(s)"), "{text}");
    for absent in [
        "shadow",
        "/root",
        "/proc",
        "/dev",
        "/tmp/x",
        "/var/lib/mcpbox",
        "no-such",
        "/usr/bin/true",
        "libc.so",
        "memory.json",
    ] {
        assert!(!text.contains(absent), "{absent} in:\n{text}");
    }
    assert!(text.contains("# 3 path(s) it named lay outside the learn view"), "{text}");
    // Every grant line has its comment right above it.
    let lines: Vec<&str> = text.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        if l.trim_start().starts_with('"') {
            assert!(lines[i - 1].trim_start().starts_with('#'), "no comment above {l}");
        }
    }
    // And it passes what `policy check` passes.
    let file = dir.path().join("learned.toml");
    std::fs::write(&file, &text).unwrap();
    let mut c = LoadContext::default();
    c.vars.insert("DATA".into(), dir.path().join("data").display().to_string());
    c.vars.insert("CACHE".into(), dir.path().join("cache").display().to_string());
    let p = crate::policy::load(&file.to_string_lossy(), &c).unwrap();
    assert!(crate::policy::path_covered(&p, "read", Path::new("/etc/passwd")));
    assert!(crate::policy::path_covered(&p, "exec", Path::new("/usr/bin/env")));
    assert!(!crate::policy::path_covered(&p, "write", Path::new("/usr/lib/mcpbox-learn-written.json")));
    assert!(crate::policy::path_covered(&p, "write", &dir.path().join("data/memory.json")));
}

#[test]
fn observations_are_bounded() {
    let o = Observations::default();
    for i in 0..(MAX_PATHS + 10) {
        o.path(Use::Look, PathBuf::from(format!("/x/{i}")), "stat");
    }
    o.path(Use::Read, PathBuf::from("/x/1"), "openat");
    let s = o.snapshot();
    assert_eq!(s.paths.len(), MAX_PATHS);
    assert_eq!(s.dropped, 10);
    assert_eq!(s.paths[Path::new("/x/1")].count, [1, 1, 0, 0]);
}

#[test]
fn a_made_up_name_cannot_end_a_comment_and_add_a_grant() {
    // Two files the server "created" (refused writes) in a directory of the view, one named to
    // break out of the comment that cites it as the example.
    let dir = tempfile::tempdir().unwrap();
    let base = default_policy(dir.path());
    let view = View { grants: vec![(PathBuf::from("/usr"), Access::Exec)], never: vec![] };
    let mut obs = Snapshot::default();
    for name in ["/usr/share/doc/a\n[env]\npass = [\"INJECTED\"]\n#", "/usr/share/doc/b"] {
        obs.paths.insert(PathBuf::from(name), seen(&[(Use::Write, 1)], "openat"));
    }
    let learned = Learned {
        extends: "default".into(),
        base: &base,
        launch_grants: &[],
        view: &view,
        command: "evil\nexec = [\"/root\"]".into(),
        env_names: vec![],
        data: None,
        executable: None,
    };
    let text = write_policy(&learned, &obs);
    // A name that would not show as it is never makes a line to uncomment: it is counted as
    // left out, and nothing else came of it.
    assert!(text.contains("# 1 path(s) it named lay outside the learn view"), "{text}");
    assert!(!text.contains("INJECTED"), "{text}");
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        assert!(!line.contains("INJECTED") && !line.contains("/root"), "{line}\n{text}");
    }
    let table: toml::Table = toml::from_str(&text).unwrap();
    assert!(table.get("env").is_none(), "{text}");
    assert!(table["filesystem"].as_table().unwrap().is_empty(), "{text}");
}

#[test]
fn a_symlink_out_of_the_view_and_a_directory_holding_a_hidden_path_are_never_granted() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let outside = t.path().join("outside");
    std::fs::create_dir_all(root.join("dir")).unwrap();
    std::fs::create_dir_all(root.join("app/state")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), "x").unwrap();
    std::os::unix::fs::symlink(&outside, root.join("dir/link")).unwrap();
    for f in ["app/README", "app/LICENSE"] {
        std::fs::write(root.join(f), "x").unwrap();
    }
    // The view carved around app/state, as learn_view does around a hidden path.
    let view = View {
        grants: vec![
            (root.join("dir"), Access::Read),
            (root.join("app/README"), Access::Read),
            (root.join("app/LICENSE"), Access::Read),
        ],
        never: vec![root.join("app/state")],
    };
    assert!(view.contains(&root.join("app/README")));
    assert!(!view.contains(&root.join("dir/link/secret")), "through a symlink out of the view");
    assert!(!view.contains(&root.join("dir/link")));
    // Two files of app/ would stand for app/, which holds the hidden state: they stay files.
    let used =
        reads(&[&root.join("app/README").display().to_string(), &root.join("app/LICENSE").display().to_string()]);
    let lines = collapse(&used, false, |d| view.contains(d));
    assert_eq!(
        paths(&lines),
        [root.join("app/LICENSE").display().to_string(), root.join("app/README").display().to_string()]
    );
}

#[test]
fn denied_syscalls_are_kept_up_to_a_bound() {
    let obs = Observations::default();
    for i in 0..10_000 {
        obs.denied_syscall(&format!("syscall {i}"));
    }
    let snap = obs.snapshot();
    assert!(snap.denied.len() <= 512, "{}", snap.denied.len());
    assert!(snap.dropped >= 10_000 - 512, "{}", snap.dropped);
}

#[test]
fn comments_escape_invisible_characters() {
    let p = Path::new("/tmp/a\u{202e}txt.exe\u{200b}\nexec");
    let s = shown(p);
    assert!(!s.contains('\u{202e}') && !s.contains('\u{200b}') && !s.contains('\n'), "{s}");
}

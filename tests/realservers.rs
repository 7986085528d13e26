//! Real MCP servers from the registries, started with their real npx/uvx commands under
//! `mcpbox serve`, called through a real MCP client (Streamable HTTP), each showing one thing
//! its policy denies. Packages are prepared once (`mcpbox prepare`) into a shared state dir;
//! a failed prepare fails these tests.
//!
//! Needs: root or unprivileged user namespaces, node/npm, python3, uv (`pip install uv`), git,
//! and the registries that npm's and uv's own configuration name.

#[path = "realservers_support.rs"]
pub(crate) mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use serde_json::json;
use support::*;

fn git(dir: &std::path::Path, args: &[&str]) {
    let st = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"])
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .status()
        .unwrap();
    assert!(st.success(), "git {args:?}");
}

/// The run phase is offline and runs no package manager: time, sequential-thinking and
/// everything answer with network `none`, their processes are node/python on the prepared
/// entry points, and nothing of mcpbox's environment reaches a server.
#[test]
fn offline_servers_work_with_network_none_and_no_package_manager() {
    let state = prepared_state();
    let dir = scratch("offline");
    let cfg = config(json!({
        "time": server("time", &["--local-timezone", "UTC"], json!("mcp-server-time")),
        "sequential-thinking": server("sequential-thinking", &[], json!("server-sequential-thinking")),
        "everything": server("everything", &[], json!("server-everything")),
    }));
    let srv = Serve::start_env(&dir, &state, cfg, &[("MCPBOX_REALSERVERS_CANARY", "leaked-canary-value")]);
    assert_eq!(srv.get("/readyz").0, 200, "{}", srv.log());

    let mut time = srv.client("time");
    let (text, err) = time.tool("get_current_time", json!({ "timezone": "Asia/Tokyo" }));
    assert!(!err && text.contains("Asia/Tokyo") && text.contains("+09:00"), "get_current_time: {text}");
    let (text, err) = time.tool("convert_time", json!({ "source_timezone": "Europe/Paris", "time": "12:00", "target_timezone": "America/New_York" }));
    assert!(!err && text.contains("America/New_York"), "convert_time: {text}");

    let mut st = srv.client("sequential-thinking");
    let names = st.tool_names();
    let tool = names.iter().find(|n| n.contains("thinking")).unwrap_or_else(|| panic!("no thinking tool in {names:?}")).clone();
    let (text, err) = st.tool(&tool, json!({ "thought": "first step", "nextThoughtNeeded": false, "thoughtNumber": 1, "totalThoughts": 1 }));
    assert!(!err && text.contains("thoughtNumber"), "{tool}: {text}");

    let mut ev = srv.client("everything");
    let names = ev.tool_names();
    let (text, err) = ev.tool("echo", json!({ "message": "hello from mcpbox" }));
    assert!(!err && text.contains("hello from mcpbox"), "echo: {text}");
    let env_tool = names.iter().find(|n| *n == "get-env" || *n == "printEnv").unwrap_or_else(|| panic!("no env tool in {names:?}")).clone();
    let (text, err) = ev.tool(&env_tool, json!({}));
    assert!(!err && text.contains("PATH"), "{env_tool}: {text}");
    assert!(!text.contains("leaked-canary-value") && !text.contains(TOKEN), "mcpbox's environment reached the server: {text}");

    // While the sessions live: the server processes are the runtimes on the prepared entry
    // points under this state dir, never npm/npx/uv.
    for name in ["time", "sequential-thinking", "everything"] {
        let cache = state.join(name).join("cache");
        let procs: Vec<_> = processes_mentioning(&cache.to_string_lossy()).into_iter().filter(|(pid, _)| *pid != std::process::id()).collect();
        assert!(!procs.is_empty(), "no process runs {name}'s prepared entry point");
        for (pid, argv) in &procs {
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
            let base = exe.rsplit('/').next().unwrap_or("");
            assert!(base == "node" || base.starts_with("python3"), "{name}: pid {pid} runs {exe}: {argv:?}");
            assert!(
                !argv.iter().any(|a| a.contains("npm-cli") || a.contains("npx-cli") || a.ends_with("/uv") || a.ends_with("/uvx")),
                "{name}: a package manager runs in the run phase: {argv:?}"
            );
        }
    }
    srv.stop();
}

#[test]
fn filesystem_reads_and_writes_inside_its_root_and_not_a_secret_outside() {
    let state = prepared_state();
    let dir = scratch("filesystem");
    let root = dir.join("root");
    let outside = dir.join("outside");
    let reference = dir.join("reference");
    for d in [&root, &outside, &reference] {
        std::fs::create_dir(d).unwrap();
        // World-writable/readable on purpose: only the sandbox stands between the server and them.
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    std::fs::write(root.join("hello.txt"), "hello inside the root\n").unwrap();
    let secret = outside.join("secret.txt");
    std::fs::write(&secret, "TOP-SECRET-CANARY\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(reference.join("doc.txt"), "reference text\n").unwrap();
    let r = root.to_string_lossy().into_owned();
    let rf = reference.to_string_lossy().into_owned();
    // Both directories are the server's own roots (it will try to write in either), but the
    // policy grants `reference` read-only: only the sandbox can refuse that write.
    let cfg = config(json!({
        "filesystem": server("filesystem", &[&r, &rf], json!({ "extends": "server-filesystem", "filesystem": { "write": [r], "read": [rf] } })),
    }));
    let srv = Serve::start(&dir, &state, cfg);
    let mut c = srv.client("filesystem");
    let names = c.tool_names();
    let read = if names.iter().any(|n| n == "read_text_file") { "read_text_file" } else { "read_file" };
    let (text, err) = c.tool(read, json!({ "path": root.join("hello.txt") }));
    assert!(!err && text.contains("hello inside the root"), "{read}: {text}\n{}", srv.log());
    let (text, err) = c.tool("write_file", json!({ "path": root.join("new.txt"), "content": "written by the server" }));
    assert!(!err, "write_file: {text}");
    assert_eq!(std::fs::read_to_string(root.join("new.txt")).unwrap(), "written by the server");

    // A root the server accepts but the policy made read-only: reading works, writing is refused
    // by the sandbox (a read-only mount: EROFS), and nothing appears on the host.
    let (text, err) = c.tool(read, json!({ "path": reference.join("doc.txt") }));
    assert!(!err && text.contains("reference text"), "{read} in the read-only root: {text}");
    let (text, err) = c.tool("write_file", json!({ "path": reference.join("new.txt"), "content": "x" }));
    assert!(err && (text.contains("EROFS") || text.contains("read-only")), "write into the read-only root: {text}");
    assert!(!reference.join("new.txt").exists(), "the write reached the host");

    // Outside the root: refused, and the secret never comes back.
    let (text, err) = c.tool(read, json!({ "path": secret }));
    assert!(err && !text.contains("TOP-SECRET-CANARY"), "{read} outside the root: {text}");
    // Through a symlink planted inside the root: refused as well.
    std::os::unix::fs::symlink(&secret, root.join("link.txt")).unwrap();
    let (text, _) = c.tool(read, json!({ "path": root.join("link.txt") }));
    assert!(!text.contains("TOP-SECRET-CANARY"), "secret read through a symlink: {text}");
    srv.stop();
}

#[test]
fn memory_graph_persists_across_restarts_in_its_data_dir_only() {
    let state = prepared_state();
    let dir = scratch("memory");
    let cfg = config(json!({ "memory": server("memory", &[], json!("server-memory")) }));
    let marker = format!("mcpbox-entity-{}", std::process::id());

    let srv = Serve::start(&dir, &state, cfg.clone());
    let mut c = srv.client("memory");
    let (text, err) = c.tool("create_entities", json!({ "entities": [{ "name": marker, "entityType": "test", "observations": ["survives restarts"] }] }));
    assert!(!err, "create_entities: {text}\n{}", srv.log());
    srv.stop();

    let srv = Serve::start(&dir, &state, cfg);
    let mut c = srv.client("memory");
    let (text, err) = c.tool("read_graph", json!({}));
    assert!(!err && text.contains(&marker) && text.contains("survives restarts"), "read_graph after restart: {text}");
    srv.stop();

    // The graph is in the data dir, and nowhere else under the state dir (not in the package).
    let found = files_containing(&state, &marker);
    let data = state.join("memory/data");
    assert!(!found.is_empty() && found.iter().all(|f| f.starts_with(&data)), "graph files: {found:?}");
}

#[test]
fn fetch_reaches_an_allowed_loopback_site_only_through_the_proxy() {
    let state = prepared_state();
    let dir = scratch("fetch");
    let allowed = site("<html><head><title>Allowed</title></head><body><article><h1>Allowed page</h1><p>FETCH-CANARY-ALLOWED paragraph of text that readability keeps.</p></article></body></html>");
    let denied = site("<html><body><p>FETCH-CANARY-DENIED</p></body></html>");
    let args = ["--ignore-robots-txt", "--allow-private-ips"];
    let cfg = config(json!({
        "fetch": server("fetch", &args, json!({ "extends": "mcp-server-fetch", "network": { "allow": [format!("127.0.0.1:{}", allowed.port)] } })),
    }));
    let srv = Serve::start(&dir, &state, cfg);
    let mut c = srv.client("fetch");
    let (text, err) = c.tool("fetch", json!({ "url": format!("http://127.0.0.1:{}/page", allowed.port) }));
    assert!(!err && text.contains("FETCH-CANARY-ALLOWED"), "allowed fetch: {text}\n{}", srv.log());

    let (text, err) = c.tool("fetch", json!({ "url": format!("http://127.0.0.1:{}/page", denied.port) }));
    assert!(err && !text.contains("FETCH-CANARY-DENIED"), "unlisted port: {text}");
    assert_eq!(denied.hits.load(std::sync::atomic::Ordering::SeqCst), 0, "the unlisted site was contacted");
    let log = srv.stop();
    assert!(log.contains("egress denied") && log.contains(&format!("127.0.0.1:{}", denied.port)), "the proxy should log the refusal:\n{log}");
}

#[test]
fn fetch_with_network_none_reaches_nothing() {
    let state = prepared_state();
    let dir = scratch("fetch-none");
    let s = site("<html><body><p>FETCH-CANARY-NONE</p></body></html>");
    let cfg = config(json!({
        "fetch": server("fetch", &["--ignore-robots-txt", "--allow-private-ips"], json!({ "extends": "mcp-server-fetch", "network": { "mode": "none" } })),
    }));
    let srv = Serve::start(&dir, &state, cfg);
    let mut c = srv.client("fetch");
    let (text, err) = c.tool("fetch", json!({ "url": format!("http://127.0.0.1:{}/", s.port) }));
    assert!(err && !text.contains("FETCH-CANARY-NONE"), "fetch with network none: {text}");
    assert_eq!(s.hits.load(std::sync::atomic::Ordering::SeqCst), 0, "the host site was contacted");
    srv.stop();
}

#[test]
fn git_reads_its_repository_and_not_another() {
    let state = prepared_state();
    let dir = scratch("git");
    let repo = dir.join("repo");
    let other = dir.join("other");
    for (d, msg) in [(&repo, "granted commit"), (&other, "OTHER-REPO-CANARY commit")] {
        std::fs::create_dir(d).unwrap();
        git(d, &["init", "-q"]);
        std::fs::write(d.join("README"), msg).unwrap();
        git(d, &["add", "README"]);
        git(d, &["commit", "-q", "-m", msg]);
    }
    std::fs::write(repo.join("untracked.txt"), "new").unwrap();
    let r = repo.to_string_lossy().into_owned();
    let cfg = config(json!({
        "git": server("git", &["--repository", &r], json!({ "extends": "mcp-server-git", "filesystem": { "read": [r] } })),
    }));
    let srv = Serve::start(&dir, &state, cfg);
    let mut c = srv.client("git");
    let (text, err) = c.tool("git_status", json!({ "repo_path": repo }));
    assert!(!err && text.contains("untracked.txt"), "git_status: {text}\n{}", srv.log());
    let (text, err) = c.tool("git_log", json!({ "repo_path": repo, "max_count": 5 }));
    assert!(!err && text.contains("granted commit"), "git_log: {text}");

    let (text, err) = c.tool("git_log", json!({ "repo_path": other, "max_count": 5 }));
    assert!(err && !text.contains("OTHER-REPO-CANARY"), "git_log of another repository: {text}");
    srv.stop();
}

/// A hostile package's install script runs inside the prepare sandbox: it cannot read a planted
/// world-readable secret, write outside the cache, or see mcpbox's environment.
#[test]
fn prepare_confines_a_malicious_install_script() {
    let dir = scratch("evil");
    let canary = std::path::Path::new("/var/tmp/mcpbox-evil-canary");
    let _ = std::fs::remove_dir_all(canary);
    std::fs::create_dir_all(canary).unwrap();
    std::fs::set_permissions(canary, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::write(canary.join("secret"), "EVIL-SECRET-CANARY").unwrap();
    std::fs::set_permissions(canary.join("secret"), std::fs::Permissions::from_mode(0o644)).unwrap();

    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/evil-pkg");
    let out = Command::new("npm")
        .args(["pack", "--silent", "--pack-destination"])
        .arg(&dir)
        .current_dir(&fixture)
        .env("npm_config_cache", dir.join("npm-cache"))
        .output()
        .unwrap();
    assert!(out.status.success(), "npm pack: {}", String::from_utf8_lossy(&out.stderr));
    let tgz = dir.join("evil-pkg-1.0.0.tgz");
    assert!(tgz.is_file());
    std::fs::set_permissions(&tgz, std::fs::Permissions::from_mode(0o644)).unwrap();

    let state = dir.join("state");
    let cfg = dir.join("evil.json");
    std::fs::write(&cfg, config(json!({ "evil": { "command": "npx", "args": ["-y", tgz] } })).to_string()).unwrap();
    let out = Command::new(mcpbox())
        .args(["prepare", "--config"])
        .arg(&cfg)
        .arg("--state-dir")
        .arg(&state)
        .env("MCPBOX_EVIL_ENV_CANARY", "evil-env-canary")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "prepare of the fixture failed: {log}");

    let report = state.join("evil/cache/npm/node_modules/evil-pkg/report.json");
    let report = std::fs::read_to_string(&report).unwrap_or_else(|e| panic!("the postinstall script did not run ({e}): {log}"));
    let rep: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(rep["ran"], true);
    assert!(!report.contains("EVIL-SECRET-CANARY"), "the install script read the secret: {report}");
    for (path, what) in rep["read"].as_object().unwrap() {
        assert!(what.as_str().unwrap().starts_with("ERR"), "install script read {path}: {what}");
    }
    for (path, what) in rep["wrote"].as_object().unwrap() {
        assert!(what.as_str().unwrap().starts_with("ERR"), "install script wrote {path}: {what}");
    }
    assert!(!canary.join("pwned").exists(), "a file appeared in the canary dir");
    assert!(!state.join("evil/pwned").exists() && !state.join("evil/data/pwned").exists(), "a file appeared outside the cache");
    assert!(!report.contains("MCPBOX_EVIL_ENV_CANARY"), "mcpbox's environment reached the install script: {report}");
    let _ = std::fs::remove_dir_all(canary);
}

/// A config naming a package that does not exist: its prepare fails, the other servers serve,
/// /readyz names it.
#[test]
fn a_failed_prepare_is_that_servers_alone() {
    let state = prepared_state();
    let dir = scratch("failed");
    let cfg = config(json!({
        "time": server("time", &[], json!("mcp-server-time")),
        "broken": { "command": "npx", "args": ["-y", "/nonexistent/mcpbox-no-such-package.tgz"] },
    }));
    let srv = Serve::start(&dir, &state, cfg);
    let (st, body) = srv.get("/readyz");
    assert_eq!(st, 503, "{body}");
    assert!(body.contains("broken") && !body.contains("time"), "{body}");
    let mut c = srv.client("time");
    let (text, err) = c.tool("get_current_time", json!({ "timezone": "UTC" }));
    assert!(!err, "{text}");
    let log = srv.stop();
    assert!(log.contains("broken") && log.contains("prepare failed"), "{log}");
}

/// The README's example config is valid as shipped.
#[test]
fn example_config_checks() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(mcpbox())
        .args(["serve", "--check", "--config"])
        .arg(root.join("examples/mcpbox.json"))
        .env("MCPBOX_TOKEN", "change-me")
        .env("MCPBOX_DEMO_DIR", root.join("examples/demo"))
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    for name in ["everything", "memory", "sequential-thinking", "filesystem", "time", "fetch"] {
        assert!(text.contains(&format!("/{name}/")), "{name} missing: {text}");
    }
    for p in ["server-everything", "server-memory", "server-sequential-thinking", "server-filesystem", "mcp-server-time", "mcp-server-fetch", "mcp-server-git"] {
        let out = Command::new(mcpbox()).args(["policy", "check", p]).output().unwrap();
        assert!(out.status.success(), "policy check {p}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

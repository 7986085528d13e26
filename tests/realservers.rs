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
    // The prepared virtualenv holds bytecode for the server's modules (compiled at prepare
    // time: the run phase cannot write it).
    let pycs = || files_named(&prepared_tree(&state.join("time/cache")), |n| n.ends_with(".pyc"));
    let before = pycs();
    assert!(
        before.iter().any(|p| p.to_string_lossy().contains("mcp_server_time/__pycache__/server.")),
        "no bytecode for mcp_server_time.server in the prepared venv ({} .pyc files)",
        before.len()
    );
    let srv = Serve::start_env(&dir, &state, cfg, &[("MCPBOX_REALSERVERS_CANARY", "leaked-canary-value")]);
    assert_eq!(srv.get("/readyz").0, 200, "{}", srv.log());

    let mut time = srv.client("time");
    let (text, err) = time.tool("get_current_time", json!({ "timezone": "Asia/Tokyo" }));
    assert!(!err && text.contains("Asia/Tokyo") && text.contains("+09:00"), "get_current_time: {text}");
    let (text, err) = time.tool(
        "convert_time",
        json!({ "source_timezone": "Europe/Paris", "time": "12:00", "target_timezone": "America/New_York" }),
    );
    assert!(!err && text.contains("America/New_York"), "convert_time: {text}");

    let mut st = srv.client("sequential-thinking");
    let names = st.tool_names();
    let tool = names
        .iter()
        .find(|n| n.contains("thinking"))
        .unwrap_or_else(|| panic!("no thinking tool in {names:?}"))
        .clone();
    let (text, err) = st.tool(
        &tool,
        json!({ "thought": "first step", "nextThoughtNeeded": false, "thoughtNumber": 1, "totalThoughts": 1 }),
    );
    assert!(!err && text.contains("thoughtNumber"), "{tool}: {text}");

    let mut ev = srv.client("everything");
    let names = ev.tool_names();
    let (text, err) = ev.tool("echo", json!({ "message": "hello from mcpbox" }));
    assert!(!err && text.contains("hello from mcpbox"), "echo: {text}");
    let env_tool = names
        .iter()
        .find(|n| *n == "get-env" || *n == "printEnv")
        .unwrap_or_else(|| panic!("no env tool in {names:?}"))
        .clone();
    let (text, err) = ev.tool(&env_tool, json!({}));
    assert!(!err && text.contains("PATH"), "{env_tool}: {text}");
    assert!(
        !text.contains("leaked-canary-value") && !text.contains(TOKEN),
        "mcpbox's environment reached the server: {text}"
    );

    // While the sessions live: the server processes are the runtimes on the prepared entry
    // points under this state dir, never npm/npx/uv.
    for name in ["time", "sequential-thinking", "everything"] {
        let cache = state.join(name).join("cache");
        let procs: Vec<_> = processes_mentioning(&cache.to_string_lossy())
            .into_iter()
            .filter(|(pid, _)| *pid != std::process::id())
            .collect();
        assert!(!procs.is_empty(), "no process runs {name}'s prepared entry point");
        for (pid, argv) in &procs {
            let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            let base = exe.rsplit('/').next().unwrap_or("");
            assert!(base == "node" || base.starts_with("python3"), "{name}: pid {pid} runs {exe}: {argv:?}");
            assert!(
                !argv.iter().any(|a| a.contains("npm-cli")
                    || a.contains("npx-cli")
                    || a.ends_with("/uv")
                    || a.ends_with("/uvx")),
                "{name}: a package manager runs in the run phase: {argv:?}"
            );
        }
    }
    // Running imported from that bytecode and wrote none.
    assert_eq!(pycs(), before, "the run phase changed the venv's bytecode");
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
    let (text, err) = c.tool(
        "create_entities",
        json!({ "entities": [{ "name": marker, "entityType": "test", "observations": ["survives restarts"] }] }),
    );
    assert!(!err, "create_entities: {text}\n{}", srv.log());
    srv.stop();

    let srv = Serve::start(&dir, &state, cfg);
    let mut c = srv.client("memory");
    let (text, err) = c.tool("read_graph", json!({}));
    assert!(!err && text.contains(&marker) && text.contains("survives restarts"), "read_graph after restart: {text}");
    srv.stop();

    // The graph is in the data dir, and nowhere else under the state dir (not in the package).
    // As root the data dir is the server's own filesystem (`[limits] disk`): its image.
    let found = files_containing(&state, &marker);
    let (data, image) = (state.join("memory/data"), state.join("memory/data.img"));
    assert!(!found.is_empty() && found.iter().all(|f| f.starts_with(&data) || *f == image), "graph files: {found:?}");
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
    assert!(
        log.contains("egress denied") && log.contains(&format!("127.0.0.1:{}", denied.port)),
        "the proxy should log the refusal:\n{log}"
    );
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
/// world-readable secret, the registry credentials of npm's and uv's configuration (canaries in
/// mcpbox's environment, the user's npmrc, netrc and uv.toml), write outside the cache, see
/// mcpbox's environment, or reach a service on the host's loopback, directly or through the
/// egress proxy; and the package still installs.
#[test]
fn prepare_confines_a_malicious_install_script() {
    const CRED: &str = "REGISTRY-CREDENTIAL-CANARY";
    let dir = scratch("evil");
    let canary = std::path::Path::new("/var/tmp/mcpbox-evil-canary");
    let _ = std::fs::remove_dir_all(canary);
    std::fs::create_dir_all(canary).unwrap();
    std::fs::set_permissions(canary, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::write(canary.join("secret"), "EVIL-SECRET-CANARY").unwrap();
    std::fs::set_permissions(canary.join("secret"), std::fs::Permissions::from_mode(0o644)).unwrap();

    // mcpbox's HOME, with credentials where npm, curl/uv and uv look for them (world-readable:
    // only the sandbox may keep the script from them).
    let home = dir.join("home");
    std::fs::create_dir_all(home.join(".config/uv")).unwrap();
    let cred_files = [
        (home.join(".npmrc"), format!("//npm.example.test/:_authToken={CRED}\n")),
        (home.join(".netrc"), format!("machine idx.example.test login u password {CRED}\n")),
        (
            home.join(".config/uv/uv.toml"),
            format!("[[index]]\nname = \"private\"\nurl = \"https://u:{CRED}@idx.example.test/simple\"\n"),
        ),
    ];
    for (p, text) in &cred_files {
        std::fs::write(p, text).unwrap();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    // A service on the host's loopback that the install script must not reach.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();

    let state = dir.join("state");
    // npm's download step (scripts off) gets the credentials in a file beside the cache; the
    // script, which runs in the next step, tries that file too.
    let auth_file = state.join("evil").join("prepare-auth.npmrc");
    let mut files: Vec<String> = cred_files.iter().map(|(p, _)| p.to_string_lossy().into_owned()).collect();
    files.push(auth_file.to_string_lossy().into_owned());
    let tgz = pack_evil(&dir, port, &files);

    let cfg = dir.join("evil.json");
    std::fs::write(&cfg, config(json!({ "evil": { "command": "npx", "args": ["-y", tgz] } })).to_string()).unwrap();
    let out = Command::new(mcpbox())
        .args(["prepare", "--config"])
        .arg(&cfg)
        .arg("--state-dir")
        .arg(&state)
        .env("MCPBOX_EVIL_ENV_CANARY", "evil-env-canary")
        .env("HOME", &home)
        .env("NPM_TOKEN", CRED)
        .env("UV_INDEX_PRIVATE_PASSWORD", CRED)
        .env("UV_INDEX_URL", format!("https://u:{CRED}@idx.example.test/simple"))
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "prepare of the fixture failed: {log}");
    assert!(state.join("evil/cache/prepared.json").is_file(), "the package was not recorded as prepared: {log}");
    assert!(
        log.contains("not given to the prepare sandbox"),
        "the withheld npm credentials are not named in the log: {log}"
    );
    assert!(!auth_file.exists(), "the download step's credentials file outlived it");

    let report = prepared_tree(&state.join("evil/cache")).join("node_modules/evil-pkg/report.json");
    let report =
        std::fs::read_to_string(&report).unwrap_or_else(|e| panic!("the postinstall script did not run ({e}): {log}"));
    let rep: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(rep["ran"], true);
    assert!(!report.contains("EVIL-SECRET-CANARY"), "the install script read the secret: {report}");
    assert!(!report.contains(CRED), "the install script saw a registry credential: {report}");
    for f in &files {
        assert!(
            rep["read"][f].as_str().is_some_and(|w| w.starts_with("ERR")),
            "install script read {f}: {}",
            rep["read"][f]
        );
    }
    for (path, what) in rep["read"].as_object().unwrap() {
        assert!(what.as_str().unwrap().starts_with("ERR"), "install script read {path}: {what}");
    }
    for (path, what) in rep["wrote"].as_object().unwrap() {
        assert!(what.as_str().unwrap().starts_with("ERR"), "install script wrote {path}: {what}");
    }
    // The host's loopback: refused directly (a namespace of its own) and by the proxy (403).
    let tried = rep["net"].as_object().unwrap();
    assert_eq!(tried.len(), 4, "{report}");
    for (how, what) in tried {
        let what = what.as_str().unwrap();
        let refused = if how.starts_with("proxy") { what == "STATUS 403" } else { what.starts_with("ERR") };
        assert!(refused, "install script reached the host's loopback ({how}): {what}");
    }
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the loopback listener saw a connection: {other:?}"),
    }
    assert!(log.contains("egress denied"), "the proxy's refusal is not logged: {log}");
    assert!(!canary.join("pwned").exists(), "a file appeared in the canary dir");
    assert!(
        !state.join("evil/pwned").exists() && !state.join("evil/data/pwned").exists(),
        "a file appeared outside the cache"
    );
    assert!(!report.contains("MCPBOX_EVIL_ENV_CANARY"), "mcpbox's environment reached the install script: {report}");

    // `--force` starts from an empty cache: what the script left there is gone, and the
    // package is installed again.
    std::fs::write(state.join("evil/cache/npm-cache/poison"), "x").unwrap();
    let out = Command::new(mcpbox())
        .args(["prepare", "--force", "--config"])
        .arg(&cfg)
        .arg("--state-dir")
        .arg(&state)
        .env("HOME", &home)
        .output()
        .unwrap();
    assert!(out.status.success(), "prepare --force: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!state.join("evil/cache/npm-cache/poison").exists(), "--force kept the old cache");
    assert!(
        prepared_tree(&state.join("evil/cache")).join("node_modules/evil-pkg/report.json").is_file(),
        "--force did not install again"
    );
    let _ = std::fs::remove_dir_all(canary);
}

/// The evil-pkg fixture packed into DIR/evil-pkg-1.0.0.tgz, told (target.json) which loopback
/// port to try and which more files to read.
fn pack_evil(dir: &std::path::Path, port: u16, files: &[String]) -> std::path::PathBuf {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/evil-pkg");
    let pkg = dir.join("pkg");
    std::fs::create_dir_all(&pkg).unwrap();
    for f in ["package.json", "postinstall.js", "bin.js"] {
        std::fs::copy(fixture.join(f), pkg.join(f)).unwrap();
    }
    std::fs::write(pkg.join("target.json"), json!({ "port": port, "files": files }).to_string()).unwrap();
    crate::common::npm_pack(&pkg, dir, "evil-pkg-1.0.0.tgz")
}

/// At `container` level (Docker's default seccomp profile: no namespaces) there is no network
/// namespace for the egress proxy: with `--min-level container`, prepare runs on the host's
/// network narrowed by Landlock to the registries' ports, says so, and the install script still
/// cannot reach a loopback service on another port.
#[test]
fn prepare_at_container_level_keeps_to_the_registries_ports() {
    let dir = scratch("evil-ctr");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let tgz = pack_evil(&dir, port, &[]);
    let state = dir.join("state");
    let cfg = dir.join("evil.json");
    std::fs::write(&cfg, config(json!({ "evil": { "command": "npx", "args": ["-y", tgz] } })).to_string()).unwrap();
    let mut cmd = Command::new(mcpbox());
    cmd.args(["prepare", "--min-level", "container", "--config"]).arg(&cfg).arg("--state-dir").arg(&state);
    let out = crate::sandbox::under_docker_filter(cmd).output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "prepare at container level failed: {log}");
    assert!(log.contains("prepare at `container` level"), "the weaker network is not announced: {log}");
    let report =
        std::fs::read_to_string(prepared_tree(&state.join("evil/cache")).join("node_modules/evil-pkg/report.json"))
            .unwrap_or_else(|e| panic!("the postinstall script did not run ({e}): {log}"));
    let rep: serde_json::Value = serde_json::from_str(&report).unwrap();
    for (how, what) in rep["net"].as_object().unwrap() {
        let what = what.as_str().unwrap();
        assert!(
            what.starts_with("ERR") || what == "NO PROXY",
            "install script reached the host's loopback ({how}): {what}"
        );
    }
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the loopback listener saw a connection: {other:?}"),
    }
}

/// The same for uv: a project whose build backend runs in the prepare sandbox, while uv's
/// configuration holds index credentials (a canary in a `UV_INDEX_*_PASSWORD` variable and in the
/// user's uv.toml). uv first tries wheels only with the credentials (no package code runs), then
/// builds without them: the backend sees no credential and cannot reach the host's loopback, and
/// the package is installed.
#[test]
fn prepare_builds_python_packages_without_the_index_credentials() {
    const CRED: &str = "UV-CREDENTIAL-CANARY";
    let dir = scratch("evil-py");
    let home = dir.join("home");
    std::fs::create_dir_all(home.join(".config/uv")).unwrap();
    let uv_toml = home.join(".config/uv/uv.toml");
    std::fs::write(
        &uv_toml,
        format!("[[index]]\nname = \"private\"\nurl = \"https://u:{CRED}@idx.example.test/simple\"\n"),
    )
    .unwrap();
    std::fs::set_permissions(&uv_toml, std::fs::Permissions::from_mode(0o644)).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();

    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/evil-py");
    let project = dir.join("evil-py");
    std::fs::create_dir_all(&project).unwrap();
    for f in ["pyproject.toml", "evil_backend.py", "evil_py.py"] {
        std::fs::copy(fixture.join(f), project.join(f)).unwrap();
    }
    std::fs::write(project.join("target.json"), json!({ "port": port, "files": [uv_toml] }).to_string()).unwrap();
    for e in std::fs::read_dir(&project).unwrap() {
        std::fs::set_permissions(e.unwrap().path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    std::fs::set_permissions(&project, std::fs::Permissions::from_mode(0o755)).unwrap();

    let state = dir.join("state");
    let cfg = dir.join("evil-py.json");
    std::fs::write(
        &cfg,
        config(json!({ "evilpy": { "command": "uvx", "args": ["--from", project, "evil-py"] } })).to_string(),
    )
    .unwrap();
    let out = Command::new(mcpbox())
        .args(["prepare", "--config"])
        .arg(&cfg)
        .arg("--state-dir")
        .arg(&state)
        .env("HOME", &home)
        .env("UV_INDEX_PRIVATE_PASSWORD", CRED)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "prepare of the fixture failed: {log}");
    assert!(
        log.contains("UV_INDEX_PRIVATE_PASSWORD") && log.contains("not given to the prepare sandbox"),
        "the credentials are not named in the log: {log}"
    );
    assert!(
        log.contains("installing without them"),
        "no wheels-only step with the credentials before the build: {log}"
    );
    assert!(
        prepared_tree(&state.join("evilpy/cache")).join("bin/evil-py").is_file(),
        "the package was not installed: {log}"
    );
    assert!(!state.join("evilpy").join("prepare-auth-uv-cache").exists(), "the credentialed step's cache outlived it");

    let report = std::fs::read_to_string(state.join("evilpy/cache/evil-py-report.json"))
        .unwrap_or_else(|e| panic!("the build backend did not run ({e}): {log}"));
    let rep: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(rep["ran"], true);
    assert!(!report.contains(CRED), "the build backend saw an index credential: {report}");
    assert!(rep["read"][uv_toml.to_string_lossy().as_ref()].as_str().is_some_and(|w| w.starts_with("ERR")), "{report}");
    assert!(
        rep["net"]["direct"].as_str().is_some_and(|w| w.starts_with("ERR")),
        "the backend reached the host's loopback: {report}"
    );
    assert_eq!(rep["net"]["proxy"], "STATUS 403", "the proxy let the backend through to the host's loopback: {report}");
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the loopback listener saw a connection: {other:?}"),
    }
    // Nothing of the credentials was left in the cache for later steps or the run phase.
    assert!(files_containing(&state.join("evilpy/cache"), CRED).is_empty(), "a credential was written into the cache");
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
    for p in [
        "server-everything",
        "server-memory",
        "server-sequential-thinking",
        "server-filesystem",
        "mcp-server-time",
        "mcp-server-fetch",
        "mcp-server-git",
    ] {
        let out = Command::new(mcpbox()).args(["policy", "check", p]).output().unwrap();
        assert!(out.status.success(), "policy check {p}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// `uvx --python 3 -q PKG@latest`, as configs write it: the virtualenv is built on the host's
/// `python3` (nothing downloaded), `@latest` is the newest release, and the server answers.
#[test]
fn uvx_with_a_python_version_and_latest_runs_on_the_host_interpreter() {
    let d = crate::common::tempdir();
    let state = d.path().join("state");
    let (v, err) = crate::cli::initialize_over_run(
        &state,
        Some("time-py3"),
        &["uvx", "--python", "3", "-q", "mcp-server-time@latest", "--local-timezone", "UTC"],
    );
    assert_eq!(v["result"]["serverInfo"]["name"], "mcp-time", "{v}");
    let made = err
        .lines()
        .find(|l| l.contains("creating a virtualenv on"))
        .unwrap_or_else(|| panic!("no virtualenv made:\n{err}"));
    assert!(made.contains("/python3 at "), "{made}");
    let cfg = std::fs::read_to_string(prepared_tree(&state.join("time-py3/cache")).join("pyvenv.cfg")).unwrap();
    assert!(cfg.lines().any(|l| l.starts_with("home = /usr/")), "built on a host interpreter:\n{cfg}");
}

/// A Python project with an in-tree build backend and no dependencies (nothing fetched): its
/// console script `swap-py` prints `entry` and the virtualenv it runs in, then on a line of
/// stdin (or at its end) imports `swap_lib` from that virtualenv and prints what it says.
fn write_swap_py(project: &std::path::Path) {
    std::fs::create_dir_all(project).unwrap();
    let files = [
        (
            "pyproject.toml",
            "[build-system]\nrequires = []\nbuild-backend = \"swap_backend\"\nbackend-path = [\".\"]\n\n\
             [project]\nname = \"swap-py\"\nversion = \"1.0.0\"\n",
        ),
        (
            "swap_backend.py",
            r#"import base64, hashlib, os, zipfile

HERE = os.path.dirname(os.path.abspath(__file__))


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    dist = "swap_py-1.0.0.dist-info"
    files = {
        "swap_py.py": open(os.path.join(HERE, "swap_py.py"), "rb").read(),
        "swap_lib.py": b"WHAT = 'loaded'\n",
        dist + "/METADATA": b"Metadata-Version: 2.1\nName: swap-py\nVersion: 1.0.0\n",
        dist + "/WHEEL": b"Wheel-Version: 1.0\nGenerator: swap_backend\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        dist + "/entry_points.txt": b"[console_scripts]\nswap-py = swap_py:main\n",
    }
    name = "swap_py-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as z:
        records = []
        for path, data in files.items():
            z.writestr(path, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append(f"{path},sha256={digest},{len(data)}")
        records.append(dist + "/RECORD,,")
        z.writestr(dist + "/RECORD", "\n".join(records) + "\n")
    return name
"#,
        ),
        (
            "swap_py.py",
            "import sys\n\n\ndef main():\n    print('entry ' + sys.prefix, flush=True)\n    sys.stdin.readline()\n    \
             import swap_lib\n    print('lib ' + swap_lib.WHAT, flush=True)\n",
        ),
    ];
    for (name, text) in files {
        std::fs::write(project.join(name), text).unwrap();
        std::fs::set_permissions(project.join(name), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    std::fs::set_permissions(project, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The uv side of cli::preparing_again_leaves_a_running_server_its_files: a virtualenv holds
/// absolute paths, so a new one is built at a new name (`venv-2`) while a server keeps running
/// from `venv-1` and imports from it after `prepare --force`; new starts run from `venv-2`. A
/// build that fails leaves the record and `venv-2` as they were, and no half-built virtualenv.
#[test]
fn preparing_a_virtualenv_again_leaves_a_running_server_its_files() {
    let dir = scratch("swap-py");
    let project = dir.join("swap-py");
    write_swap_py(&project);
    let state = dir.join("state");
    let cfg = dir.join("swap.json");
    std::fs::write(
        &cfg,
        config(json!({ "swappy": { "command": "uvx", "args": ["--from", project, "swap-py"] } })).to_string(),
    )
    .unwrap();
    let cache = state.join("swappy/cache");
    let prepare = |force: bool| {
        let mut cmd = Command::new(mcpbox());
        cmd.args(["prepare", "--config"]).arg(&cfg).arg("--state-dir").arg(&state);
        if force {
            cmd.arg("--force");
        }
        cmd.output().unwrap()
    };
    let run = || {
        let mut cmd = Command::new(mcpbox());
        cmd.args(["run", "--state-dir"]).arg(&state).args(["--name", "swappy", "--", "uvx", "--from"]);
        cmd.arg(&project).arg("swap-py");
        cmd
    };
    let out = prepare(false);
    assert!(out.status.success(), "prepare: {}", String::from_utf8_lossy(&out.stderr));
    let first = prepared_tree(&cache);
    assert_eq!(first, cache.join("venv-1"));
    let held = crate::cli::Held::spawn(run());
    assert_eq!(std::path::Path::new(&held.entry), first);

    let out = prepare(true);
    assert!(out.status.success(), "prepare --force: {}", String::from_utf8_lossy(&out.stderr));
    let second = prepared_tree(&cache);
    assert_eq!(second, cache.join("venv-2"));
    assert!(first.join("bin/swap-py").is_file(), "the running server's virtualenv was removed");
    let (line, st) = held.finish();
    assert_eq!(line, "lib loaded", "the running server could not import from its virtualenv after the re-prepare");
    assert!(st.success(), "{st:?}");
    let out = run().stdin(std::process::Stdio::null()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("entry {}\nlib loaded\n", second.display()));

    // A build that fails: nothing changes for the next start.
    std::fs::write(project.join("swap_backend.py"), "raise SystemExit('broken backend')\n").unwrap();
    let out = prepare(true);
    assert!(!out.status.success(), "a broken build must fail to prepare");
    assert_eq!(prepared_tree(&cache), second);
    assert!(!cache.join("venv-3").exists(), "the failed build left its virtualenv");
    let out = run().stdin(std::process::Stdio::null()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("entry {}\nlib loaded\n", second.display()));
}

//! Denials made visible: a server that reads outside its grants and asks for a host that is not
//! on its allow-list, and makes a syscall seccomp denies; each refusal is logged with server, session and target, counted in /status
//! and /metrics, recorded in the state dir, and `mcpbox policy suggest` proposes exactly it.
//! Landlock's refusals (executing a file under a `read` grant at level `full`, reading outside
//! the grants at level `container`) the same way as root, from the kernel's audit records;
//! rootless, the log and `mcpbox doctor` say they are not reported. A server that hoards egress
//! tunnels gets `maxEgressConnections` of them; the rest are refused at once and recorded.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;

use crate::common::{eventually, run_timeout, test_env};
use crate::realservers::support::site;
use crate::serve_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_logged_counted_recorded_and_suggested() {
    let allowed = site("DENIALS-ALLOWED-SITE");
    let denied = site("DENIALS-DENIED-SITE");
    // The fixture and its policy where a server's uid can read them; a canary it is not granted.
    let dir = tempfile::Builder::new().prefix("mcpbox-denials-").tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = dir.path().join("denied_mcp.py");
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/denied_mcp.py"), &script).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let secret_dir = tempfile::Builder::new().prefix("mcpbox-denials-secret-").tempdir().unwrap();
    std::fs::set_permissions(secret_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let secret = secret_dir.path().join("canary.txt");
    std::fs::write(&secret, "DENIALS-CANARY").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let policy = dir.path().join("den.toml");
    let body = format!(
        "extends = \"python\"\n[filesystem]\nread = [{:?}]\n[network]\nmode = \"proxy\"\nallow = [\"127.0.0.1:{}\"]\n",
        dir.path().display().to_string(),
        allowed.port
    );
    std::fs::write(&policy, body).unwrap();
    std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o644)).unwrap();

    let servers = json!({"den": {"command": "/usr/bin/python3", "args": [script], "policy": policy}});
    let mb = Mcpbox::start(servers, json!({})).await;
    let st = Streamable::open(&mb, "den").await;
    let sid = st.sid.clone();
    let probe =
        |port: u16| call_msg(json!(2), "probe", json!({"path": secret, "url": format!("http://127.0.0.1:{port}/")}));
    let ok = text_of(&st.request(probe(allowed.port)).await);
    assert!(ok.contains("GET DENIALS-ALLOWED-SITE"), "the allowed site, through the proxy: {ok}");
    let out = text_of(&st.request(probe(denied.port)).await);
    assert!(out.contains("GET-STATUS 403"), "the proxy refuses the unlisted host: {out}");
    assert!(
        out.contains("READ-ERRNO 2") || out.contains("READ-ERRNO 13"),
        "the file outside the grants is unreadable: {out}"
    );
    assert!(!out.contains("DENIALS-CANARY") && !out.contains("DENIALS-DENIED-SITE"), "{out}");
    assert_eq!(denied.hits.load(Ordering::SeqCst), 0, "the unlisted site was contacted");

    // One log line naming the server, the session, the access and the target.
    let target = format!("127.0.0.1:{}", denied.port);
    let line = mb
        .log_text()
        .lines()
        .find(|l| l.contains("egress denied") && l.contains(&target))
        .unwrap_or_else(|| panic!("no denial line for {target}:\n{}", mb.log_text()))
        .to_string();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let f = &v["fields"];
    assert_eq!(
        (f["server"].as_str(), f["layer"].as_str(), f["access"].as_str()),
        (Some("den"), Some("egress"), Some("connect")),
        "{line}"
    );
    assert_eq!(f["object"].as_str(), Some(target.as_str()), "{line}");
    // The session is known when the process was started for it (not when it came warm).
    let s = f["session"].as_str().unwrap();
    assert!(s == sid || s == "-", "{line}");

    let status = mb.request("GET", "/status", &[], None).await.json();
    let d = &status["servers"]["den"]["denials"];
    assert_eq!(d["total"]["egress"], 1, "{status}");
    assert_eq!(d["recent"][0]["object"].as_str(), Some(target.as_str()), "{status}");
    assert_eq!(d["recent"][0]["layer"], "egress", "{status}");
    let metrics = mb.request("GET", "/metrics", &[], None).await.body;
    assert!(metrics.contains("mcpbox_denials_total{server=\"den\",layer=\"egress\"} 1\n"), "{metrics}");
    assert!(metrics.contains("mcpbox_denials_total{server=\"den\",layer=\"landlock\"} 0\n"), "{metrics}");
    assert!(metrics.contains("mcpbox_denials_total{server=\"den\",layer=\"seccomp\"} 0\n"), "{metrics}");

    // A syscall outside the seccomp allow-list (bpf, 321 on x86_64): EPERM, as without the
    // supervisor, and recorded by name.
    let call = call_msg(
        json!(3),
        "probe",
        json!({"path": secret, "url": format!("http://127.0.0.1:{}/", allowed.port), "syscall": 321}),
    );
    let out = text_of(&st.request(call).await);
    assert!(out.contains("SYSCALL -1 ERRNO 1"), "bpf is refused with EPERM: {out}");
    assert!(
        eventually(Duration::from_secs(5), || mb
            .log_text()
            .lines()
            .any(|l| l.contains("seccomp denied: bpf") && l.contains("\"server\":\"den\""))),
        "no seccomp denial line:\n{}",
        mb.log_text()
    );
    let metrics = mb.request("GET", "/metrics", &[], None).await.body;
    assert!(metrics.contains("mcpbox_denials_total{server=\"den\",layer=\"seccomp\"} 1\n"), "{metrics}");

    // Asking again counts again.
    let _ = st.request(probe(denied.port)).await;
    let metrics = mb.request("GET", "/metrics", &[], None).await.body;
    assert!(metrics.contains("mcpbox_denials_total{server=\"den\",layer=\"egress\"} 2\n"), "{metrics}");

    // `policy suggest` reads the record in the state dir and proposes exactly the denied host.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mcpbox"));
    cmd.args(["policy", "suggest", "den", "--state-dir"]).arg(mb.dir.path().join("state"));
    test_env(&mut cmd);
    let out = run_timeout(cmd, Duration::from_secs(30));
    assert_eq!(out.code, 0, "{out}");
    let plus: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with('+')).collect();
    assert_eq!(plus, vec![format!("+ allow = [\"{target}\"]").as_str()], "{out}");
    assert!(out.stdout.contains(&format!("against policy {}", policy.display())), "{out}");
    assert!(out.stdout.contains("# cannot be granted: seccomp bpf") && out.stdout.contains("never allows"), "{out}");

    // The same from the config the server is served from (the policy as `serve` plans it).
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mcpbox"));
    cmd.args(["policy", "suggest", "den", "--config"])
        .arg(mb.dir.path().join("mcpbox.json"))
        .arg("--state-dir")
        .arg(mb.dir.path().join("state"));
    test_env(&mut cmd);
    let out = run_timeout(cmd, Duration::from_secs(30));
    let plus: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with('+')).collect();
    assert!(out.code == 0 && plus == vec![format!("+ allow = [\"{target}\"]").as_str()], "{out}");

    // With the suggestion applied, nothing is left to add.
    let fixed = dir.path().join("den-fixed.toml");
    let body = std::fs::read_to_string(&policy).unwrap().replace(
        &format!("\"127.0.0.1:{}\"]", allowed.port),
        &format!("\"127.0.0.1:{}\", \"{target}\"]", allowed.port),
    );
    std::fs::write(&fixed, body).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mcpbox"));
    cmd.args(["policy", "suggest", "den", "--policy"]).arg(&fixed).arg("--state-dir").arg(mb.dir.path().join("state"));
    test_env(&mut cmd);
    let out = run_timeout(cmd, Duration::from_secs(30));
    assert!(out.code == 0 && out.stdout.contains("nothing to add") && !out.stdout.contains("\n+"), "{out}");
    // And `policy diff` names the one new grant.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mcpbox"));
    cmd.args(["policy", "diff"]).arg(&policy).arg(&fixed);
    test_env(&mut cmd);
    let out = run_timeout(cmd, Duration::from_secs(30));
    let changes: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with("+ ") || l.starts_with("- ")).collect();
    assert_eq!(changes, vec![format!("+ allow = \"{target}\"").as_str()], "{out}");
}

/// mcpbox's open descriptors.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// A server that opens tunnel after tunnel through its egress proxy and never closes them gets
/// `maxEgressConnections` of them; the rest are refused at once (503 or closed), recorded as
/// egress denials, and mcpbox's descriptors grow by two per tunnel held, not per tunnel asked
/// for. Another session's sandbox, meanwhile, still reaches its site.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_hoarding_egress_connections_gets_its_cap_and_no_more() {
    const CAP: usize = 5;
    const ASKED: usize = 40;
    let allowed = site("EGRESS-CAP-ALLOWED-SITE");
    // An origin that accepts and never closes: the tunnels stay until their client ends them.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let holder_port = holder.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        for s in holder.incoming() {
            kept.push(s);
        }
    });
    let dir = tempfile::Builder::new().prefix("mcpbox-egress-cap-").tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = dir.path().join("denied_mcp.py");
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/denied_mcp.py"), &script).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let policy = dir.path().join("hog.toml");
    let body = format!(
        "extends = \"python\"\n[filesystem]\nread = [{:?}]\n[network]\nmode = \"proxy\"\nallow = [\"127.0.0.1:{}\", \"127.0.0.1:{holder_port}\"]\n",
        dir.path().display().to_string(),
        allowed.port
    );
    std::fs::write(&policy, body).unwrap();
    std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o644)).unwrap();

    let servers = json!({"hog": {"command": "/usr/bin/python3", "args": [script], "policy": policy}});
    let mb = Mcpbox::start(servers, json!({"maxEgressConnections": CAP})).await;
    let hog = Streamable::open(&mb, "hog").await;
    let other = Streamable::open(&mb, "hog").await;
    // Let the warm pool settle (a session taken starts its replacement).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = open_fds(mb.pid());

    let out =
        text_of(&hog.request(call_msg(json!(2), "probe", json!({"hold": {"port": holder_port, "n": ASKED}}))).await);
    let count = |key: &str| -> usize {
        let word =
            out.split_whitespace().find_map(|w| w.strip_prefix(&format!("{key}="))).unwrap_or_else(|| panic!("{out}"));
        word.parse().unwrap()
    };
    assert_eq!(count("200"), CAP, "{out}");
    assert_eq!(count("503") + count("closed"), ASKED - CAP, "{out}");
    assert_eq!(count("other"), 0, "{out}");
    let took: f64 = out.split_whitespace().last().unwrap().parse().unwrap();
    assert!(took < 5.0, "the refusals were not prompt: {out}");

    let held = open_fds(mb.pid());
    eprintln!(
        "mcpbox descriptors: {before} before, {held} with {CAP} tunnels held and {} refused ({out})",
        ASKED - CAP
    );
    // Two per tunnel held, and some slack for what else mcpbox opens meanwhile (a warm process).
    assert!(held <= before + 2 * CAP + 16, "mcpbox holds {held} descriptors, {before} before: {out}");

    // Another sandbox's proxy still connects.
    let ok = text_of(
        &other
            .request(call_msg(json!(3), "probe", json!({"url": format!("http://127.0.0.1:{}/", allowed.port)})))
            .await,
    );
    assert!(ok.contains("GET EGRESS-CAP-ALLOWED-SITE"), "another session, while the first holds its cap: {ok}");

    // Each refusal is an egress denial, logged as one over the cap.
    let status = mb.request("GET", "/status", &[], None).await.json();
    assert_eq!(status["servers"]["hog"]["denials"]["total"]["egress"], ASKED - CAP, "{status}");
    assert!(
        mb.log_text().lines().any(|l| l.contains("egress denied: accept") && l.contains("mcpbox.maxEgressConnections")),
        "no refusal line:\n{}",
        mb.log_text()
    );
}

/// A directory the servers' uids can traverse, outside /tmp: at level `full` the sandbox's own
/// /tmp is all Landlock-writable (its mounts decide there), so a grant under it shows nothing.
fn outside_tmp(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir_in("/var/tmp").unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn write_mode(path: &std::path::Path, body: &str, mode: u32) {
    std::fs::write(path, body).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The `landlock` row of `mcpbox doctor`'s "denials reported" table.
fn doctor_landlock_row() -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mcpbox"));
    cmd.arg("doctor");
    test_env(&mut cmd);
    let out = run_timeout(cmd, Duration::from_secs(60));
    let section = out.stdout.split("denials reported").nth(1).unwrap_or_else(|| panic!("no denials table: {out}"));
    section.lines().find(|l| l.trim_start().starts_with("landlock ")).unwrap_or_else(|| panic!("{out}")).to_string()
}

/// Level `full`: a file under a `read` grant is in the mount view (not noexec) but its Landlock
/// rule has no execute right, so executing it is a Landlock refusal (EACCES). As root, serve
/// with `--enable-audit` reads it from the audit records: logged with the path, counted in
/// /status and /metrics, and `policy suggest` proposes exactly an exec grant of that file.
/// Rootless, mcpbox cannot read the audit log (no CAP_AUDIT_READ): still EACCES, and the log
/// and `mcpbox doctor` say the refusal is not reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn landlock_refusals_are_read_from_audit_or_doctor_says_why_not() {
    let root = crate::common::is_root();
    let dir = outside_tmp("mcpbox-ll-");
    let script = dir.path().join("denied_mcp.py");
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/denied_mcp.py"), &script).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let tool = dir.path().join("tool.sh");
    write_mode(&tool, "#!/bin/sh\nexit 7\n", 0o755);
    let policy = dir.path().join("ll.toml");
    let body = format!("extends = \"python\"\n[filesystem]\nread = [{:?}]\n", dir.path().display().to_string());
    write_mode(&policy, &body, 0o644);

    let servers = json!({"ll": {"command": "/usr/bin/python3", "args": [script], "policy": policy}});
    let args: &[&str] = if root { &["--enable-audit"] } else { &[] };
    let mb = Mcpbox::start_with_args(servers, json!({}), args).await;
    let st = Streamable::open(&mb, "ll").await;
    let out = text_of(&st.request(call_msg(json!(2), "probe", json!({"exec": tool}))).await);
    assert!(out.contains("EXEC-ERRNO 13"), "executing a file under a read grant: EACCES from Landlock: {out}");

    if !root {
        assert!(
            eventually(Duration::from_secs(5), || mb.log_text().contains("Landlock denials are not reported")),
            "the start must say Landlock denials are not reported:\n{}",
            mb.log_text()
        );
        let row = doctor_landlock_row();
        assert!(row.contains(" NO ") && row.contains("CAP_AUDIT_READ"), "doctor must say why not: {row}");
        let metrics = mb.request("GET", "/metrics", &[], None).await.body;
        assert!(metrics.contains("mcpbox_denials_total{server=\"ll\",layer=\"landlock\"} 0\n"), "{metrics}");
        return;
    }

    let object = tool.display().to_string();
    let found = eventually(Duration::from_secs(5), || {
        mb.log_text().lines().any(|l| l.contains("landlock denied: exec") && l.contains(&object))
    });
    assert!(found, "no Landlock denial line for {object}:\n{}", mb.log_text());
    let line =
        mb.log_text().lines().find(|l| l.contains("landlock denied: exec") && l.contains(&object)).unwrap().to_string();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let f = &v["fields"];
    assert_eq!(
        (f["server"].as_str(), f["layer"].as_str(), f["access"].as_str(), f["object"].as_str()),
        (Some("ll"), Some("landlock"), Some("exec"), Some(object.as_str())),
        "{line}"
    );
    // The session is known when the process was started for it (not when it came warm).
    let s = f["session"].as_str().unwrap();
    assert!(s == st.sid || s == "-", "{line}");

    let status = mb.request("GET", "/status", &[], None).await.json();
    let d = &status["servers"]["ll"]["denials"];
    assert_eq!(d["total"]["landlock"], 1, "{status}");
    assert!(
        d["recent"].as_array().unwrap().iter().any(|r| r["layer"] == "landlock" && r["object"] == object.as_str()),
        "{status}"
    );
    let metrics = mb.request("GET", "/metrics", &[], None).await.body;
    assert!(metrics.contains("mcpbox_denials_total{server=\"ll\",layer=\"landlock\"} 1\n"), "{metrics}");
    // The reader is running (audit is on now: this process turned it on).
    let row = doctor_landlock_row();
    assert!(row.contains(" ok ") && row.contains("audit records"), "{row}");

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mcpbox"));
    cmd.args(["policy", "suggest", "ll", "--state-dir"]).arg(mb.dir.path().join("state"));
    test_env(&mut cmd);
    let out = run_timeout(cmd, Duration::from_secs(30));
    assert_eq!(out.code, 0, "{out}");
    let plus: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with('+')).collect();
    assert_eq!(plus, vec![format!("+ exec = [{object:?}]").as_str()], "{out}");
}

/// Level `container` (no namespaces: mcpbox under a filter like Docker's default): no mount
/// view, so reading a file outside the grants is a Landlock refusal (EACCES). `mcpbox run`
/// reports it as root with `--enable-audit` (log line, the state dir's record, `policy
/// suggest` proposes exactly that file); rootless it says it cannot.
#[test]
fn container_level_reads_outside_the_grants_are_landlock_denials() {
    let root = crate::common::is_root();
    let dir = outside_tmp("mcpbox-ll-ctr-");
    let secret_dir = dir.path().join("secret");
    std::fs::create_dir(&secret_dir).unwrap();
    std::fs::set_permissions(&secret_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let secret = secret_dir.join("canary.txt");
    write_mode(&secret, "LL-CONTAINER-CANARY", 0o644);
    let policy = dir.path().join("ctr.toml");
    write_mode(&policy, "extends = \"python\"\n[filesystem]\nexec = [\"/usr/bin/dash\"]\n", 0o644);
    let state = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mcpbox"));
    cmd.args(["run", "--min-level", "container", "--name", "llctr", "--policy"]).arg(&policy);
    cmd.arg("--state-dir").arg(state.path());
    if root {
        cmd.arg("--enable-audit");
    }
    let sh = format!("read x < {}; echo \"rc=$? x=$x\"", secret.display());
    cmd.args(["--", "/usr/bin/dash", "-c", &sh]).env("MCPBOX_LOG", "info");
    test_env(&mut cmd);
    let out = run_timeout(crate::sandbox::under_docker_filter(cmd), Duration::from_secs(60));
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stderr.contains("container"), "the container level must be announced: {out}");
    assert!(out.stdout.contains("rc=2 x=\n") && !out.stdout.contains("CANARY"), "{out}");
    assert!(out.stderr.contains("Permission denied"), "EACCES, from Landlock: {out}");
    let object = secret.display().to_string();
    if !root {
        assert!(out.stderr.contains("Landlock denials are not reported"), "{out}");
        return;
    }
    assert!(
        out.stderr.lines().any(|l| l.contains("landlock denied: read") && l.contains(&object)),
        "no Landlock denial line for {object}: {out}"
    );
    // `run` waits for its own mark to come back through the audit stream before it exits; a
    // mark the kernel mangled was never seen, and every exit waited out the whole settle time.
    assert!(!out.stderr.contains("did not all arrive"), "the settle mark must come back: {out}");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mcpbox"));
    cmd.args(["policy", "suggest", "llctr", "--state-dir"]).arg(state.path());
    test_env(&mut cmd);
    let out = run_timeout(cmd, Duration::from_secs(30));
    assert_eq!(out.code, 0, "{out}");
    let plus: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with('+')).collect();
    assert_eq!(plus, vec![format!("+ read = [{object:?}]").as_str()], "{out}");
}

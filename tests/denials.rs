//! Denials made visible: a server that reads outside its grants and asks for a host that is not
//! on its allow-list, and makes a syscall seccomp denies; each refusal is logged with server, session and target, counted in /status
//! and /metrics, recorded in the state dir, and `mcpbox policy suggest` proposes exactly it.

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

//! `policy::load` of a policy file's text: any text is a policy or an error, never a panic; and a
//! policy that loads renders (`mcpbox policy check`) as TOML that loads back to the same policy.
//!
//! `extends` of a path is skipped (the loader would read whatever file the input names, e.g.
//! `/dev/zero`); `extends` of a shipped name is fuzzed.
#![no_main]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mcpbox::policy::{self, LoadContext};

struct Scratch {
    _dir: tempfile::TempDir,
    file: PathBuf,
    ctx: LoadContext,
}

fn scratch() -> &'static Scratch {
    static S: OnceLock<Scratch> = OnceLock::new();
    S.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a scratch directory");
        let data = dir.path().join("data");
        let cache = dir.path().join("cache");
        std::fs::create_dir(&data).unwrap();
        std::fs::create_dir(&cache).unwrap();
        let vars = BTreeMap::from([
            ("DATA".to_string(), data.display().to_string()),
            ("CACHE".to_string(), cache.display().to_string()),
            ("HOME".to_string(), "/root".to_string()),
        ]);
        let file = dir.path().join("fuzz.toml");
        Scratch { _dir: dir, file, ctx: LoadContext { vars, ..LoadContext::default() } }
    })
}

fn extends_a_path(text: &str) -> bool {
    let Ok(t) = toml::from_str::<toml::Table>(text) else { return false };
    let is_path = |v: &toml::Value| v.as_str().is_none_or(|s| s.contains('/') || s.ends_with(".toml"));
    match t.get("extends") {
        None => false,
        Some(toml::Value::Array(a)) => a.iter().any(is_path),
        Some(v) => is_path(v),
    }
}

fn load(text: &str) -> Result<policy::Policy, policy::PolicyError> {
    let s = scratch();
    std::fs::write(&s.file, text).expect("write the scratch policy");
    policy::load(s.file.to_str().unwrap(), &s.ctx)
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if extends_a_path(text) {
        return;
    }
    let Ok(p) = load(text) else { return };
    let shown = policy::render(&p);
    if let Err(e) = toml::from_str::<toml::Table>(&shown) {
        panic!("the rendered policy is not TOML: {e}\n{shown}");
    }
    match load(&shown) {
        Ok(mut back) => {
            back.source = p.source.clone();
            assert_eq!(back, p, "the rendered policy loads as another policy\n{shown}");
        }
        Err(e) => panic!("the rendered policy does not load: {e}\n{shown}"),
    }
});

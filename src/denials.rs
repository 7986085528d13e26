//! Denials: what a sandbox layer refused a server, made visible.
//!
//! A layer that refuses something a server tried ([`Layer::Egress`]: the egress proxy; Landlock
//! and seccomp where the host reports them) calls [`ServerDenials::record`], which
//! - logs one line naming the server, session, access and object, at most
//!   [`LOG_BURST`] lines per server per [`LOG_WINDOW`] (the rest are counted and summed up in
//!   one line when the window ends);
//! - counts it per layer (`/status`, `mcpbox_denials_total{server,layer}`);
//! - keeps the [`MAX_RECENT`] most recent distinct denials (access + object), with how often
//!   and when each was seen, in memory and in `STATE/NAME/denials.json` (outside the server's
//!   own `data/`, so the server cannot write it), which `mcpbox policy suggest` reads.
//!
//! The record is process-wide ([`registry`]): the proxy that refuses and the HTTP handler that
//! reports are far apart in the layering, and a server has one record whatever serves it.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Distinct denials kept per server.
pub const MAX_RECENT: usize = 128;
/// Denial lines logged per server per [`LOG_WINDOW`].
pub const LOG_BURST: u32 = 10;
pub const LOG_WINDOW: Duration = Duration::from_secs(10);
/// Record file writes per server per second at most: each new distinct denial rewrites the
/// file, and the server decides how often that happens. Beyond, the record is written by the
/// next denial after the second, by [`Registry::flush_all`] (every few seconds under `serve`,
/// and when `run` or `serve` ends).
pub const WRITES_PER_SECOND: u32 = 10;
/// The record file's name in a server's state directory.
pub const FILE_NAME: &str = "denials.json";
/// Largest record file read back (a record of [`MAX_RECENT`] entries of at most
/// [`MAX_OBJECT`]-byte objects and reasons is far smaller).
const MAX_FILE_BYTES: u64 = 1 << 20;
/// A denial's object and reason are kept to this many bytes: the server chooses them (a path
/// it names, a target), and every distinct denial rewrites the record file.
pub const MAX_OBJECT: usize = 1024;
/// How a cut object ends: such an object is never proposed as a grant.
pub const CUT: &str = "…(cut)";

/// `s` with control characters and the invisible ones that reorder or hide text on a
/// terminal (bidi overrides, zero-width marks) escaped: for log lines, comments and anything
/// else an operator reads, of names a server chose.
pub fn printable(s: &str) -> String {
    s.chars()
        .flat_map(|c| if c.is_control() || invisible(c) { c.escape_default().collect::<Vec<_>>() } else { vec![c] })
        .collect()
}

/// Whether `s` holds characters [`printable`] escapes.
pub fn has_unprintable(s: &str) -> bool {
    s.chars().any(|c| c.is_control() || invisible(c))
}

/// Unicode format characters that change how the text around them is shown.
fn invisible(c: char) -> bool {
    matches!(c as u32, 0x061C | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x206F | 0xFEFF)
}

/// `s` cut to [`MAX_OBJECT`] bytes (at a character boundary), ending in [`CUT`] if it was.
fn capped(mut s: String) -> String {
    if s.len() > MAX_OBJECT {
        let mut end = MAX_OBJECT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str(CUT);
    }
    s
}

/// Which layer refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    Landlock,
    Seccomp,
    Egress,
}

impl Layer {
    pub const ALL: [Layer; 3] = [Layer::Landlock, Layer::Seccomp, Layer::Egress];

    pub fn as_str(self) -> &'static str {
        match self {
            Layer::Landlock => "landlock",
            Layer::Seccomp => "seccomp",
            Layer::Egress => "egress",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One refusal: `access` is read, write, exec, connect, bind or a syscall's name; `object` the
/// path, `host:port` or syscall arguments it was refused on; `reason` what the layer said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Denial {
    pub layer: Layer,
    pub access: String,
    pub object: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A distinct denial as kept: how often, first and last seen (Unix seconds), the last session
/// and the policy (shipped name or file path) it was last refused under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    #[serde(flatten)]
    pub denial: Denial,
    pub count: u64,
    pub first: u64,
    pub last: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

/// The record file's contents.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RecordFile {
    pub server: String,
    pub denials: Vec<Recorded>,
}

#[derive(Debug, thiserror::Error)]
pub enum DenialsError {
    #[error("no denials recorded for this server: {} does not exist (nothing was refused since mcpbox started keeping the record, or --state-dir is not the one the server ran under)", .0.display())]
    NoRecord(PathBuf),
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{} is larger than {MAX_FILE_BYTES} bytes: not a denial record", .0.display())]
    TooLarge(PathBuf),
    #[error("{}: not a denial record: {source}", path.display())]
    Parse { path: PathBuf, source: serde_json::Error },
}

/// `STATE/NAME/denials.json`.
pub fn file_for(state_root: &Path, server: &str) -> PathBuf {
    state_root.join(server).join(FILE_NAME)
}

/// Reads a record file written by [`ServerDenials`].
pub fn read_file(path: &Path) -> Result<RecordFile, DenialsError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(DenialsError::NoRecord(path.to_path_buf())),
        Err(source) => return Err(DenialsError::Read { path: path.to_path_buf(), source }),
    };
    if meta.len() > MAX_FILE_BYTES {
        return Err(DenialsError::TooLarge(path.to_path_buf()));
    }
    let text = std::fs::read(path).map_err(|source| DenialsError::Read { path: path.to_path_buf(), source })?;
    serde_json::from_slice(&text).map_err(|source| DenialsError::Parse { path: path.to_path_buf(), source })
}

struct Inner {
    /// The policy the server runs under, for denials whose layer does not know it.
    policy: Option<String>,
    totals: [u64; 3],
    /// Distinct denials, least recently seen first.
    recent: VecDeque<Recorded>,
    window_start: Option<Instant>,
    logged: u32,
    suppressed: u64,
    /// Writes of the record file in the current second, and whether it is behind.
    write_window: Option<Instant>,
    writes: u32,
    dirty: bool,
}

/// One server's denials.
pub struct ServerDenials {
    server: String,
    /// Set once: at creation, or later by [`Registry::server`] (a sandbox that records before
    /// the server's state is known, e.g. its prepare phase, creates the record without it).
    file: OnceLock<PathBuf>,
    inner: Mutex<Inner>,
    /// Held from the snapshot to the rename: writers of one record never interleave, and a
    /// newer snapshot is always the one written last.
    writing: Mutex<()>,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl ServerDenials {
    /// A record for `server`, kept in `file` too when given (what the file already holds is
    /// taken over, so a restart of mcpbox does not forget what `policy suggest` needs).
    pub fn new(server: impl Into<String>, file: Option<PathBuf>) -> Self {
        let server = server.into();
        let mut recent = VecDeque::new();
        if let Some(f) = &file {
            if let Ok(rec) = read_file(f) {
                recent.extend(rec.denials.into_iter().rev().take(MAX_RECENT).rev());
            }
        }
        let cell = OnceLock::new();
        if let Some(f) = file {
            let _ = cell.set(f);
        }
        ServerDenials {
            server,
            file: cell,
            writing: Mutex::new(()),
            inner: Mutex::new(Inner {
                policy: None,
                totals: [0; 3],
                recent,
                window_start: None,
                logged: 0,
                suppressed: 0,
                write_window: None,
                writes: 0,
                dirty: false,
            }),
        }
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    /// Keep the record in `file` from now on, if it had no file: what the file holds comes
    /// first, then what was recorded meanwhile (written at once if anything was).
    fn attach(&self, file: PathBuf) {
        if self.file.get().is_some() {
            return;
        }
        let history = read_file(&file).map(|r| r.denials).unwrap_or_default();
        if self.file.set(file).is_err() {
            return;
        }
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let had = !g.recent.is_empty();
        g.dirty = g.dirty || had;
        let mut merged: VecDeque<Recorded> = history.into_iter().collect();
        merged.extend(g.recent.drain(..));
        while merged.len() > MAX_RECENT {
            merged.pop_front();
        }
        g.recent = merged;
        if had {
            self.write(g, Instant::now());
        }
    }

    /// Writes the record if it is behind (see [`WRITES_PER_SECOND`]).
    pub fn flush(&self) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.dirty {
            g.write_window = None;
            self.write(g, Instant::now());
        }
    }

    /// Writes the record, within [`WRITES_PER_SECOND`]; beyond, marks it behind (the guard is
    /// released once the snapshot is taken).
    fn write(&self, mut g: std::sync::MutexGuard<'_, Inner>, now: Instant) {
        let Some(f) = self.file.get() else { return };
        if g.write_window.is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1)) {
            g.write_window = Some(now);
            g.writes = 0;
        }
        if g.writes >= WRITES_PER_SECOND {
            g.dirty = true;
            return;
        }
        g.writes += 1;
        g.dirty = false;
        let body = RecordFile { server: self.server.clone(), denials: g.recent.iter().cloned().collect() };
        let _w = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        drop(g);
        if let Err(e) = write_atomic(f, &body) {
            tracing::warn!(server = %self.server, file = %f.display(), "cannot keep the denial record: {e}");
        }
    }

    /// The policy (shipped name or file path) the server runs under, recorded with denials
    /// whose layer does not name it (seccomp's).
    pub fn set_policy(&self, source: &str) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).policy = Some(source.to_string());
    }

    /// Records, counts and (rate-limited) logs one denial.
    pub fn record(&self, session: Option<&str>, policy: Option<&str>, d: Denial) {
        self.record_at(session, policy, d, Instant::now(), now_secs());
    }

    fn record_at(&self, session: Option<&str>, policy: Option<&str>, d: Denial, now: Instant, wall: u64) {
        let d = Denial { object: capped(d.object), reason: d.reason.map(capped), ..d };
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.totals[d.layer.index()] += 1;

        // The log line, rate-limited per server.
        let fresh_window = g.window_start.is_none_or(|s| now.duration_since(s) >= LOG_WINDOW);
        if fresh_window {
            if g.suppressed > 0 {
                tracing::warn!(server = %self.server, suppressed = g.suppressed, "{} more denials were not logged (at most {LOG_BURST} lines per {}s)", g.suppressed, LOG_WINDOW.as_secs());
            }
            g.window_start = Some(now);
            g.logged = 0;
            g.suppressed = 0;
        }
        if g.logged < LOG_BURST {
            g.logged += 1;
            tracing::warn!(
                server = %self.server,
                session = session.unwrap_or("-"),
                layer = d.layer.as_str(),
                access = %printable(&d.access),
                object = %printable(&d.object),
                reason = %printable(d.reason.as_deref().unwrap_or("")),
                "{} denied: {} {} (see `mcpbox policy suggest {}`)",
                d.layer.as_str(),
                printable(&d.access),
                printable(&d.object),
                self.server
            );
        } else {
            g.suppressed += 1;
        }

        // The distinct record; the file is rewritten only when a new distinct denial appears.
        let pos = g
            .recent
            .iter()
            .position(|r| r.denial.layer == d.layer && r.denial.access == d.access && r.denial.object == d.object);
        let is_new = pos.is_none();
        let mut rec = match pos.and_then(|i| g.recent.remove(i)) {
            Some(r) => r,
            None => Recorded { denial: d, count: 0, first: wall, last: wall, session: None, policy: None },
        };
        rec.count += 1;
        rec.last = wall;
        rec.session = session.map(str::to_owned);
        rec.policy = policy.map(str::to_owned).or_else(|| g.policy.clone());
        g.recent.push_back(rec);
        while g.recent.len() > MAX_RECENT {
            g.recent.pop_front();
        }
        if is_new || g.dirty {
            self.write(g, now);
        }
    }

    /// Denials counted per layer since this process started.
    pub fn totals(&self) -> [(Layer, u64); 3] {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        Layer::ALL.map(|l| (l, g.totals[l.index()]))
    }

    /// The distinct denials kept, least recently seen first.
    pub fn recent(&self) -> Vec<Recorded> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).recent.iter().cloned().collect()
    }
}

/// Through a temporary file of its own in the same directory, then renamed over: a reader
/// sees the old record or the new one whole, and two writers (another mcpbox process of the
/// same state) never share a temporary file.
fn write_atomic(path: &Path, body: &RecordFile) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new().prefix(&format!(".{FILE_NAME}.")).tempfile_in(dir)?;
    std::io::Write::write_all(&mut tmp, &serde_json::to_vec_pretty(body).map_err(std::io::Error::other)?)?;
    tmp.persist(path).map(|_| ()).map_err(|e| e.error)
}

/// Every server's record in this process.
#[derive(Default)]
pub struct Registry {
    servers: Mutex<BTreeMap<String, Arc<ServerDenials>>>,
}

impl Registry {
    /// The record of `server`, created the first time; kept in `file` once one is given (a
    /// record made without one, by a sandbox that started first, gets it then).
    pub fn server(&self, server: &str, file: Option<PathBuf>) -> Arc<ServerDenials> {
        let mut m = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        let (d, file) = match m.get(server) {
            Some(d) => (d.clone(), file),
            None => {
                let d = Arc::new(ServerDenials::new(server, file));
                m.insert(server.to_string(), d.clone());
                (d, None)
            }
        };
        drop(m);
        if let Some(f) = file {
            d.attach(f);
        }
        d
    }

    /// Writes every record that is behind (see [`WRITES_PER_SECOND`]).
    pub fn flush_all(&self) {
        let all: Vec<Arc<ServerDenials>> =
            self.servers.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        for d in all {
            d.flush();
        }
    }

    pub fn get(&self, server: &str) -> Option<Arc<ServerDenials>> {
        self.servers.lock().unwrap_or_else(|e| e.into_inner()).get(server).cloned()
    }
}

/// How often held-back records reach their files (`serve`'s flusher, and [`flush_in_background`]).
pub const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// For `run` and `policy learn`: a thread that writes the records a flood held back every
/// [`FLUSH_EVERY`], as `serve` does, so that what `policy suggest` reads is at most that much
/// behind even if mcpbox is killed. Start it with the signals the caller waits for blocked (the
/// thread keeps that mask).
pub fn flush_in_background() {
    let spawned = std::thread::Builder::new().name("mcpbox-denials-flush".into()).spawn(|| loop {
        std::thread::sleep(FLUSH_EVERY);
        registry().flush_all();
    });
    if let Err(e) = spawned {
        tracing::warn!("denial records are written at exit only: cannot start their flusher thread: {e}");
    }
}

/// The process-wide registry.
pub fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(Registry::default)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn egress(obj: &str) -> Denial {
        Denial {
            layer: Layer::Egress,
            access: "connect".into(),
            object: obj.into(),
            reason: Some("not in the allow-list".into()),
        }
    }

    #[test]
    fn counts_per_layer_and_keeps_distinct_denials_with_counts() {
        let d = ServerDenials::new("s", None);
        let t = Instant::now();
        d.record_at(Some("a"), None, egress("x.test:443"), t, 1);
        d.record_at(Some("b"), None, egress("x.test:443"), t, 2);
        d.record_at(
            None,
            None,
            Denial { layer: Layer::Landlock, access: "read".into(), object: "/etc/x".into(), reason: None },
            t,
            3,
        );
        assert_eq!(d.totals(), [(Layer::Landlock, 1), (Layer::Seccomp, 0), (Layer::Egress, 2)]);
        let r = d.recent();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].denial.object, "x.test:443");
        assert_eq!((r[0].count, r[0].first, r[0].last, r[0].session.as_deref()), (2, 1, 2, Some("b")));
        assert_eq!(r[1].denial.object, "/etc/x");
    }

    #[test]
    fn the_record_is_bounded_and_drops_the_least_recently_seen() {
        let d = ServerDenials::new("s", None);
        let t = Instant::now();
        for i in 0..MAX_RECENT + 5 {
            d.record_at(None, None, egress(&format!("h{i}.test:443")), t, i as u64);
        }
        // Seeing h5 again makes it the most recent: h6.. survive, h5 too.
        d.record_at(None, None, egress("h5.test:443"), t, 999);
        let r = d.recent();
        assert_eq!(r.len(), MAX_RECENT);
        assert_eq!(r.last().unwrap().denial.object, "h5.test:443");
        assert!(r.iter().all(|x| x.denial.object != "h0.test:443" && x.denial.object != "h4.test:443"));
        assert_eq!(d.totals()[2].1, MAX_RECENT as u64 + 6);
    }

    #[test]
    fn log_lines_are_rate_limited_per_window() {
        let d = ServerDenials::new("s", None);
        let t = Instant::now();
        for i in 0..LOG_BURST + 7 {
            d.record_at(None, None, egress(&format!("h{i}.test:1")), t, 0);
        }
        {
            let g = d.inner.lock().unwrap();
            assert_eq!((g.logged, g.suppressed), (LOG_BURST, 7));
        }
        d.record_at(None, None, egress("late.test:1"), t + LOG_WINDOW, 0);
        let g = d.inner.lock().unwrap();
        assert_eq!((g.logged, g.suppressed), (1, 0));
    }

    #[test]
    fn a_record_made_without_its_file_keeps_it_once_given() {
        let dir = tempfile::tempdir().unwrap();
        let f = file_for(dir.path(), "srv");
        let r = Registry::default();
        // A prepare sandbox's listener records first, knowing no file.
        r.server("srv", None).record(None, None, egress("early.test:443"));
        let d = r.server("srv", Some(f.clone()));
        d.record(None, None, egress("late.test:443"));
        let rec = read_file(&f).expect("the record reached its file");
        let objects: Vec<&str> = rec.denials.iter().map(|d| d.denial.object.as_str()).collect();
        assert_eq!(objects, ["early.test:443", "late.test:443"]);
    }

    #[test]
    fn objects_are_capped_and_a_full_record_stays_readable() {
        let dir = tempfile::tempdir().unwrap();
        let f = file_for(dir.path(), "srv");
        let d = ServerDenials::new("srv", Some(f.clone()));
        for i in 0..(MAX_RECENT + 1) {
            let object = format!("/tmp/{i}/{}", "\u{1}".repeat(4000));
            d.record(None, None, Denial { layer: Layer::Landlock, access: "exec".into(), object, reason: None });
        }
        d.flush();
        let rec = read_file(&f).expect("a full record of the longest objects is readable");
        assert_eq!(rec.denials.len(), MAX_RECENT);
        assert!(rec.denials.iter().all(|r| r.denial.object.len() <= MAX_OBJECT + CUT.len()));
        assert!(rec.denials.iter().all(|r| r.denial.object.ends_with(CUT)));
        assert!(std::fs::metadata(&f).unwrap().len() < MAX_FILE_BYTES);
    }

    #[test]
    fn concurrent_writers_leave_a_whole_record() {
        let dir = tempfile::tempdir().unwrap();
        let f = file_for(dir.path(), "srv");
        let d = Arc::new(ServerDenials::new("srv", Some(f.clone())));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let d = d.clone();
                std::thread::spawn(move || {
                    for i in 0..200 {
                        let object = format!("{}{i}.test:443", "x".repeat(1 + (t * 37 + i) % 300));
                        d.record(None, None, egress(&object));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        d.flush();
        let rec = read_file(&f).expect("never a torn or mixed record");
        assert!(rec.denials == d.recent(), "the newest snapshot is the one written last");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("srv"))
            .map(|e| e.flatten().map(|e| e.file_name()).filter(|n| n != FILE_NAME).collect())
            .unwrap_or_default();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn a_flood_of_new_denials_rewrites_the_file_a_bounded_number_of_times_and_a_flush_catches_up() {
        let dir = tempfile::tempdir().unwrap();
        let f = file_for(dir.path(), "srv");
        let d = ServerDenials::new("srv", Some(f.clone()));
        let t0 = Instant::now();
        for i in 0..100 {
            d.record_at(None, None, egress(&format!("h{i}.test:443")), t0, 0);
        }
        // Ten writes in that second: the file holds the first ten.
        assert_eq!(read_file(&f).unwrap().denials.len(), WRITES_PER_SECOND as usize);
        // The next denial a second later writes what was behind.
        d.record_at(None, None, egress("h0.test:443"), t0 + Duration::from_secs(1), 1);
        assert_eq!(read_file(&f).unwrap().denials.len(), 100);
        for i in 100..150 {
            d.record_at(None, None, egress(&format!("h{i}.test:443")), t0 + Duration::from_secs(1), 1);
        }
        assert!(read_file(&f).unwrap().denials.len() < 128);
        d.flush();
        assert_eq!(read_file(&f).unwrap().denials, d.recent());
    }

    #[test]
    fn printable_escapes_what_would_end_a_line_or_hide_text() {
        assert_eq!(printable("/a b/c"), "/a b/c");
        let p = printable("x\n+ y\u{1b}[2J\u{202e}z");
        assert!(!p.contains('\n') && !p.contains('\u{1b}') && !p.contains('\u{202e}'), "{p}");
        assert!(has_unprintable("a\u{200b}b") && !has_unprintable("/usr/lib/é"));
    }

    #[test]
    fn the_file_is_written_on_new_denials_and_read_back_by_a_new_record() {
        let dir = tempfile::tempdir().unwrap();
        let f = file_for(dir.path(), "srv");
        let d = ServerDenials::new("srv", Some(f.clone()));
        d.record(Some("s1"), Some("p.toml"), egress("a.test:443"));
        let rec = read_file(&f).unwrap();
        assert_eq!(rec.server, "srv");
        assert_eq!(rec.denials.len(), 1);
        assert_eq!(rec.denials[0].denial, egress("a.test:443"));
        let again = ServerDenials::new("srv", Some(f.clone()));
        assert_eq!(again.recent().len(), 1);
        assert!(matches!(read_file(&dir.path().join("none.json")), Err(DenialsError::NoRecord(_))));
        std::fs::write(&f, "{").unwrap();
        assert!(matches!(read_file(&f), Err(DenialsError::Parse { .. })));
    }
}

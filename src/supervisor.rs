//! Server lifecycle: processes (always through a [`Launcher`]), the warm pool, restarts with
//! backoff, idle timeouts, shutdown. Sessions themselves, their outboxes and the routing of
//! messages live in [`crate::bridge`]; the supervisor opens sessions there and ends them.
//!
//! - `isolation: "session"`: every session gets its own process; the session ends when the
//!   process exits (in-flight requests get "MCP server exited") and the process is killed
//!   when the session ends (DELETE, SSE disconnect, idle, shutdown).
//! - `isolation: "principal"`: stateless (2026-07-28) requests of one principal go to that
//!   principal's own backend session and process ([`Supervisor::principal_backend`]; also used
//!   for `session` servers), and its 2025-era sessions join that process
//!   ([`Supervisor::open_session`], routed as on a shared server); reaped when no session on it
//!   is in use.
//! - `isolation: "shared"`: one process per server behind one [`Hub`]; it is restarted with
//!   exponential backoff (250 ms … 30 s) and sessions survive the restart.
//! - A process whose stdout closes is ended at once (its in-flight requests fail first): a
//!   server that can no longer answer is not left running until the idle timeout.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use tokio::io::AsyncWriteExt;
use tokio::process::Child;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bridge::{
    framing, input_queue, Hub, Limits, LineReader, Principal, Session, SessionId, Sessions, Transport,
};
use crate::config::{Config, Isolation, ServerConfig};

/// A started server process.
pub struct LaunchedProcess {
    /// stdin, stdout and stderr piped.
    pub child: Child,
    pub pid: u32,
    /// Confinement level actually reached ("full", "container").
    pub level: String,
    pub start_latency: Duration,
    /// The sandbox's cgroup directories (empty without cgroups): the warm pool raises a taken
    /// process's CPU weight there.
    pub cgroups: Vec<PathBuf>,
    /// Runs once the process has exited (e.g. removes cgroups).
    pub cleanup: Box<dyn FnOnce() + Send>,
}

/// The one way the supervisor creates server processes.
pub trait Launcher: Send + Sync + 'static {
    fn launch(
        &self,
        server: &ServerConfig,
        session: Option<&str>,
    ) -> BoxFuture<'static, anyhow::Result<LaunchedProcess>>;

    /// A process for the warm pool: like [`Launcher::launch`] without a session, at
    /// [`WARM_CPU_WEIGHT`] where the launcher can set one.
    fn launch_warm(&self, server: &ServerConfig) -> BoxFuture<'static, anyhow::Result<LaunchedProcess>> {
        self.launch(server, None)
    }

    /// Whether `server` can start at all (e.g. its policy plans); drives `/readyz`.
    fn check(&self, server: &ServerConfig) -> anyhow::Result<()> {
        let _ = server;
        Ok(())
    }
}

/// Production launcher: [`crate::plan::Planner`] + `sandbox::Spawner`. Never runs a server
/// unconfined.
pub struct SandboxLauncher {
    pub planner: crate::plan::Planner,
    pub spawner: crate::sandbox::Spawner,
    /// Connections each sandbox's egress proxy serves at once (`mcpbox.maxEgressConnections`).
    pub egress_per_sandbox: usize,
    /// What all the sandboxes' egress proxies hold together (sized from the descriptor limit).
    pub egress_budget: crate::netproxy::SharedBudget,
}

impl Launcher for SandboxLauncher {
    fn launch(
        &self,
        server: &ServerConfig,
        session: Option<&str>,
    ) -> BoxFuture<'static, anyhow::Result<LaunchedProcess>> {
        self.start(server, session, None)
    }

    fn launch_warm(&self, server: &ServerConfig) -> BoxFuture<'static, anyhow::Result<LaunchedProcess>> {
        self.start(server, None, Some(WARM_CPU_WEIGHT))
    }

    fn check(&self, server: &ServerConfig) -> anyhow::Result<()> {
        self.planner.plan(server).map(|_| ())
    }
}

impl SandboxLauncher {
    fn start(
        &self,
        server: &ServerConfig,
        session: Option<&str>,
        cpu_weight: Option<u32>,
    ) -> BoxFuture<'static, anyhow::Result<LaunchedProcess>> {
        let planned = self.planner.plan(server).map(|mut p| {
            p.spec.outer.cpu_weight = cpu_weight;
            p
        });
        let spawner = self.spawner.clone();
        let (egress_per_sandbox, egress_budget) = (self.egress_per_sandbox, self.egress_budget.clone());
        let name = server.name.clone();
        let session = session.map(str::to_owned);
        let denials =
            crate::denials::registry().server(&name, Some(crate::denials::file_for(&self.planner.state.root, &name)));
        Box::pin(async move {
            let planned = planned?;
            denials.set_policy(&planned.policy.source);
            for note in &planned.notes {
                tracing::warn!(server = %name, session = ?session, "{note}");
            }
            let sb = spawner.spawn(planned.spec).await?;
            // Landlock's denials of this sandbox name the session it was started for.
            if let (Some(pid), Some(s)) = (sb.report.server_pid, session.as_deref()) {
                crate::sandbox::audit::sandbox_started(pid, &name, Some(s));
            }
            for w in &sb.report.warnings {
                tracing::warn!(server = %name, session = ?session, "sandbox weakened: {w}");
            }
            let pid = sb.child.id().unwrap_or(0);
            let level = serde_json::to_value(sb.report.level)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_else(|| "unknown".into());
            // Network mode `proxy`: the sandbox handed back its listening socket; the egress
            // proxy runs here, in the host's network, for as long as the sandbox lives.
            let proxy_task = match (sb.proxy_listener, &planned.policy.network) {
                (Some(listener), crate::policy::Network::Proxy { allow }) => {
                    let allow = crate::netproxy::AllowList::new(allow);
                    let mut cfg = crate::netproxy::ProxyConfig::new(allow, planned.policy.source.clone(), name.clone());
                    cfg.session = session.clone();
                    cfg.denials = Some(denials);
                    cfg.max_connections = egress_per_sandbox;
                    cfg.shared = Some(egress_budget);
                    let cfg = std::sync::Arc::new(cfg);
                    let server_name = name.clone();
                    Some(tokio::spawn(async move {
                        if let Err(e) = crate::netproxy::serve(listener, cfg).await {
                            tracing::warn!(server = %server_name, "egress proxy stopped: {e}");
                        }
                    }))
                }
                (None, crate::policy::Network::Proxy { .. }) => {
                    anyhow::bail!("sandbox for {name} did not hand over its proxy socket")
                }
                _ => None,
            };
            let report = sb.report.clone();
            Ok(LaunchedProcess {
                child: sb.child,
                pid,
                level,
                start_latency: report.start_latency,
                cgroups: report.cgroups.clone(),
                cleanup: Box::new(move || {
                    if let Some(t) = proxy_task {
                        t.abort();
                    }
                    // Every process of the sandbox is gone: its pid may come back as anyone's.
                    if let Some(pid) = report.server_pid {
                        crate::sandbox::audit::sandbox_ended(pid);
                    }
                }),
            })
        })
    }
}

/// Test-only: runs the command without any confinement.
#[cfg(test)]
pub struct DirectLauncher;

#[cfg(test)]
impl Launcher for DirectLauncher {
    fn launch(
        &self,
        server: &ServerConfig,
        _session: Option<&str>,
    ) -> BoxFuture<'static, anyhow::Result<LaunchedProcess>> {
        let crate::config::ServerKind::Stdio { command, args, env } = server.kind.clone() else {
            return Box::pin(async { anyhow::bail!("not a stdio server") });
        };
        Box::pin(async move {
            let t = Instant::now();
            let child = tokio::process::Command::new(command)
                .args(args)
                .envs(env)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            let pid = child.id().unwrap_or(0);
            Ok(LaunchedProcess {
                child,
                pid,
                level: "none".into(),
                start_latency: t.elapsed(),
                cgroups: Vec::new(),
                cleanup: Box::new(|| {}),
            })
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("no such server")]
    NotFound,
    #[error("server {0} has reached maxSessions")]
    TooMany(String),
    #[error("shutting down")]
    ShuttingDown,
    /// SIGTERM came: open sessions go on for the drain grace, new ones belong on other replicas.
    #[error("draining: this replica takes no new sessions")]
    Draining,
    /// The global budget (sessions or sandboxes across all servers) is spent.
    #[error("{0}")]
    Busy(#[from] crate::budget::Exhausted),
    #[error("could not start the server: {0}")]
    Launch(String),
}

/// Upper bounds (seconds) of the buckets of `mcpbox_session_start_seconds`.
pub const START_BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// A Prometheus histogram over [`START_BUCKETS`].
#[derive(Default)]
pub struct Histogram {
    /// Observations at or under each bound (cumulative when rendered).
    buckets: [AtomicU64; START_BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = START_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// The `_bucket`, `_sum` and `_count` lines of `name` with `labels` (`k="v"`, escaped).
    pub fn render(&self, name: &str, labels: &str, out: &mut String) {
        use std::fmt::Write;
        let mut acc = 0;
        for (b, n) in START_BUCKETS.iter().zip(&self.buckets) {
            acc += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {acc}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

#[derive(Default)]
pub struct Metrics {
    /// Shared with the server's sessions, which count their requests.
    pub requests: Arc<AtomicU64>,
    pub errors: AtomicU64,
    pub restarts: AtomicU64,
    pub starts: AtomicU64,
    /// Sum of start latencies, microseconds.
    pub start_us: AtomicU64,
    pub level: Mutex<Option<String>>,
    /// `isolation: "session"`: how long a new session waited for its process.
    pub session_start: Histogram,
    /// Sessions that got a warm process, and those that waited for a cold start.
    pub warm_starts: AtomicU64,
    pub cold_starts: AtomicU64,
}

pub struct Server {
    pub cfg: ServerConfig,
    pub sessions: Sessions,
    shared: Option<Arc<Hub>>,
    pub metrics: Metrics,
    /// Result of the launcher's check at startup.
    pub ready: Result<(), String>,
    /// `isolation: "session"`: one process started ahead of time (sandbox built, runtime
    /// loaded, waiting on stdin), handed to the next new session; see [`Supervisor::keep_warm`].
    warm: Option<Warm>,
    /// Stateless (2026-07-28) requests: each principal's backend session, opened on first use
    /// and initialized by mcpbox; see [`Supervisor::principal_backend`].
    principals: Mutex<std::collections::HashMap<Principal, BackendSlot>>,
}

/// Where one principal's backend is kept; locked while it is being opened.
type BackendSlot = Arc<tokio::sync::Mutex<Option<Arc<Backend>>>>;

/// The backend of one principal's stateless requests: a session mcpbox opened and initialized
/// itself, with the server's `initialize` result.
pub struct Backend {
    pub session: Arc<Session>,
    pub init: serde_json::Value,
    /// The level last set with `logging/setLevel` on the server, if any.
    pub log_level: tokio::sync::Mutex<Option<String>>,
    /// The server's `tools/list` (all pages), with the count of its `tools/list_changed`
    /// notifications it was fetched at: what `x-mcp-header` checks read.
    pub tools: tokio::sync::Mutex<Option<(u64, serde_json::Value)>>,
}

/// CPU weight of a warm process while it starts and waits (cgroup v2 `cpu.weight`, v1
/// `cpu.shares` scaled): refills yield to live sessions, which run at the kernel's 100. Raised
/// to [`LIVE_CPU_WEIGHT`] when a session takes it.
pub const WARM_CPU_WEIGHT: u32 = 10;
pub const LIVE_CPU_WEIGHT: u32 = 100;
/// Most warm processes one server keeps.
const WARM_MAX: usize = 32;
/// What a warm process is assumed to hold until one has been measured (its memory cgroup's
/// anonymous and kernel memory).
const WARM_GUESS_BYTES: u64 = 64 << 20;
/// Session arrivals are counted over this window; the pool aims at the busiest window seen.
const ARRIVAL_WINDOW: Duration = Duration::from_secs(10);
/// With no session arriving for this long, the pool's target halves (down to one process).
const WARM_IDLE_SHRINK: Duration = Duration::from_secs(300);

/// The warm pool of one server: processes started ahead of time, as many as sessions arrived
/// in the busiest [`ARRIVAL_WINDOW`] lately, within `mcpbox.warmPoolBytes` for all servers.
struct Warm {
    state: Mutex<WarmState>,
    /// Wakes the refill task: a process was taken or the target grew.
    wake: tokio::sync::Notify,
}

struct WarmState {
    ready: VecDeque<LaunchedProcess>,
    /// Session opens within the last [`ARRIVAL_WINDOW`].
    arrivals: VecDeque<Instant>,
    target: usize,
    last_arrival: Instant,
    last_shrink: Instant,
    /// Bytes one warm process holds: the largest measured, or [`WARM_GUESS_BYTES`].
    each: Option<u64>,
}

impl Warm {
    fn new() -> Self {
        let now = Instant::now();
        Warm {
            state: Mutex::new(WarmState {
                ready: VecDeque::new(),
                arrivals: VecDeque::new(),
                target: 1,
                last_arrival: now,
                last_shrink: now,
                each: None,
            }),
            wake: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WarmState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl WarmState {
    fn each(&self) -> u64 {
        self.each.unwrap_or(WARM_GUESS_BYTES)
    }

    /// A session arrived: the target follows the arrivals of the last window.
    fn arrived(&mut self, now: Instant) {
        while self.arrivals.front().is_some_and(|t| now.duration_since(*t) > ARRIVAL_WINDOW) {
            self.arrivals.pop_front();
        }
        self.arrivals.push_back(now);
        self.target = self.target.max(self.arrivals.len()).min(WARM_MAX);
        self.last_arrival = now;
    }

    /// Idle long enough: halve the target. Returns the processes over it, to be ended.
    fn shrink(&mut self, now: Instant) -> Vec<LaunchedProcess> {
        if self.target > 1
            && now.duration_since(self.last_arrival) > WARM_IDLE_SHRINK
            && now.duration_since(self.last_shrink) > WARM_IDLE_SHRINK
        {
            self.target = (self.target / 2).max(1);
            self.last_shrink = now;
        }
        let mut extra = Vec::new();
        while self.ready.len() > self.target {
            extra.extend(self.ready.pop_back());
        }
        extra
    }
}

impl Server {
    /// The open session `id`, if `principal` opened it.
    pub fn session(&self, id: &str, principal: &Principal) -> Option<Arc<Session>> {
        self.sessions.get(id, principal)
    }
    /// Whether `s` is its principal's backend (the session of its stateless requests, which
    /// holds the principal's process). `false` while that slot is busy (being opened).
    fn is_principal_backend(&self, s: &Session) -> bool {
        let slot = self.principals.lock().unwrap_or_else(|e| e.into_inner()).get(&s.principal).cloned();
        slot.is_some_and(|slot| slot.try_lock().is_ok_and(|b| b.as_ref().is_some_and(|b| b.session.id == s.id)))
    }

    pub fn active_sessions(&self) -> usize {
        self.sessions.len()
    }
}

/// Longest line of a server's stderr that is logged; the rest of a longer line is dropped
/// while reading (with a note in the log), never collected.
pub const STDERR_LINE_MAX: usize = 4096;

/// How long mcpbox waits for a server's answer to its own `initialize`.
const INIT_TIMEOUT: Duration = Duration::from_secs(60);
/// The protocol version mcpbox initializes a principal's process with when a 2025-era session
/// opens it (a stateless request opens it with the version of the stateless adapter).
const PRINCIPAL_PROTOCOL: &str = "2025-11-25";

pub struct Options {
    pub max_line: usize,
    /// Bytes one session's outbox may hold (`mcpbox.sessionBufferBytes`).
    pub session_buffer: usize,
    /// Bytes queued for one server's stdin (`mcpbox.serverInputBytes`).
    pub server_input: usize,
    pub grace: Duration,
    /// `mcpbox.replicaId`: the prefix of every session id (`ID.<random>`).
    pub replica_id: Option<String>,
}

impl Options {
    pub fn from_config(cfg: &Config, grace: Duration) -> Self {
        Options {
            max_line: cfg.max_line_bytes,
            session_buffer: cfg.session_buffer_bytes,
            server_input: cfg.server_input_bytes,
            grace,
            replica_id: cfg.replica.id.clone(),
        }
    }

    fn limits(&self) -> Limits {
        Limits { max_line: self.max_line, input: self.server_input }
    }
}

pub struct Supervisor {
    pub servers: BTreeMap<String, Arc<Server>>,
    launcher: Arc<dyn Launcher>,
    opts: Options,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// Sessions and session sandboxes across all servers (`mcpbox.maxSessionsTotal`, `maxSandboxes`).
    pub budget: Arc<crate::budget::Budget>,
    /// Memory all warm pools may hold together (`mcpbox.warmPoolBytes`).
    warm_pool_bytes: u64,
    /// Set by [`Supervisor::drain`]: no new sessions, open ones go on.
    draining: std::sync::atomic::AtomicBool,
}

struct ProcCtl {
    exited: oneshot::Receiver<String>,
}

/// Random hex, after `REPLICA.` when this mcpbox is one of several replicas (a proxy routes on it).
fn new_session_id(replica: Option<&str>) -> SessionId {
    let a: u128 = rand::random();
    match replica {
        Some(r) => Arc::from(format!("{r}.{a:032x}")),
        None => Arc::from(format!("{a:032x}")),
    }
}

/// The replica a session id names (the part before its first `.`), if any.
pub fn session_replica(id: &str) -> Option<&str> {
    id.split_once('.').map(|(r, _)| r)
}

impl Supervisor {
    /// Build the servers of `config` (url upstreams through the sandboxed url-bridge) and
    /// start the shared ones. Must be called inside a tokio runtime.
    pub fn start(config: &Config, launcher: Arc<dyn Launcher>, opts: Options) -> Arc<Self> {
        let mut servers = BTreeMap::new();
        for (name, cfg) in &config.servers {
            if cfg.disabled {
                tracing::info!(server = %name, "disabled; not served");
                continue;
            }
            let ready = launcher.check(cfg).map_err(|e| format!("{e:#}"));
            if let Err(e) = &ready {
                tracing::error!(server = %name, "cannot start: {e}");
            }
            let shared = (cfg.isolation == Isolation::Shared).then(|| {
                Hub::new(name, true, cfg.tool_filter.clone(), opts.limits()).with_options(cfg.log_enabled, cfg.timeout)
            });
            servers.insert(
                name.clone(),
                Arc::new(Server {
                    cfg: cfg.clone(),
                    sessions: Sessions::default(),
                    shared,
                    metrics: Metrics::default(),
                    warm: (cfg.isolation != Isolation::Shared && ready.is_ok()).then(Warm::new),
                    ready,
                    principals: Mutex::default(),
                }),
            );
        }
        let sup = Arc::new(Supervisor {
            servers,
            launcher,
            opts,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            budget: crate::budget::Budget::new(config.limits.max_sessions_total, config.limits.max_sandboxes),
            warm_pool_bytes: config.limits.warm_pool_bytes,
            draining: Default::default(),
        });
        for server in sup.servers.values() {
            if server.shared.is_some() && server.ready.is_ok() {
                let (s, srv) = (sup.clone(), server.clone());
                sup.tasks.spawn(async move { s.run_shared(srv).await });
            }
            if server.warm.is_some() {
                let (s, srv) = (sup.clone(), server.clone());
                sup.tasks.spawn(async move { s.keep_warm(srv).await });
            }
        }
        let s = sup.clone();
        sup.tasks.spawn(async move { s.reap_idle().await });
        sup
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    pub fn server(&self, name: &str) -> Option<&Arc<Server>> {
        self.servers.get(name)
    }

    async fn run_shared(self: Arc<Self>, server: Arc<Server>) {
        let hub = server.shared.clone().expect("shared hub");
        let mut backoff = Duration::from_millis(250);
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            match self.start_process(&server, hub.clone(), None, None).await {
                Ok(ctl) => {
                    let up = Instant::now();
                    let status = ctl.exited.await.unwrap_or_else(|_| "unknown".into());
                    if self.shutdown.is_cancelled() {
                        return;
                    }
                    server.metrics.restarts.fetch_add(1, Ordering::Relaxed);
                    if up.elapsed() > Duration::from_secs(30) {
                        backoff = Duration::from_millis(250);
                    }
                    tracing::warn!(server = %server.cfg.name, status = %status, "shared server exited; restarting in {backoff:?}");
                }
                Err(e) => {
                    server.metrics.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(server = %server.cfg.name, "cannot start shared server: {e:#}; retrying in {backoff:?}");
                    hub.fail_waiting("MCP server could not be started");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.shutdown.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    /// Keep started processes waiting for the next sessions of `server` (session isolation):
    /// a new session then costs an initialize round trip instead of a sandbox and runtime
    /// start. The pool holds one process, more while sessions arrive faster (see [`Warm`]),
    /// refilled one at a time at [`WARM_CPU_WEIGHT`]; it shrinks when the server is idle and
    /// its processes are ended at shutdown.
    async fn keep_warm(self: Arc<Self>, server: Arc<Server>) {
        let Some(warm) = &server.warm else { return };
        let mut backoff = Duration::from_millis(250);
        loop {
            let (extra, short, first, each) = {
                let mut st = warm.lock();
                let extra = st.shrink(Instant::now());
                (extra, st.ready.len() < st.target, st.ready.is_empty(), st.each())
            };
            // (The budget looks at every pool, this one's included: not under its lock.)
            let want = short && (first || self.warm_fits(each));
            for lp in extra {
                tracing::debug!(server = %server.cfg.name, pid = lp.pid, "warm pool shrinks after idling");
                discard(lp, self.opts.grace).await;
            }
            if !want {
                tokio::select! {
                    _ = warm.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = self.shutdown.cancelled() => break,
                }
                continue;
            }
            let launch = self.launcher.launch_warm(&server.cfg);
            tokio::pin!(launch);
            let launched = tokio::select! {
                r = &mut launch => r,
                _ = self.shutdown.cancelled() => {
                    // A start in flight is finished and then ended, not abandoned: dropped, its
                    // sandbox would live on until mcpbox's own exit took it down, after
                    // shutdown had said everything was over.
                    if let Ok(lp) = launch.await {
                        discard(lp, self.opts.grace).await;
                    }
                    break;
                }
            };
            match launched {
                Ok(lp) => {
                    backoff = Duration::from_millis(250);
                    let mut st = warm.lock();
                    if let Some(m) = crate::sandbox::memory_own(&lp.cgroups) {
                        st.each = Some(st.each.unwrap_or(0).max(m));
                    }
                    tracing::debug!(server = %server.cfg.name, pid = lp.pid, ready = st.ready.len() + 1, target = st.target, each = st.each(), "warm process ready");
                    // The level is known as soon as a sandbox stands: /status shows it before
                    // the first session.
                    *server.metrics.level.lock().unwrap_or_else(|e| e.into_inner()) = Some(lp.level.clone());
                    st.ready.push_back(lp);
                }
                Err(e) => {
                    tracing::warn!(server = %server.cfg.name, "cannot start a warm process: {e:#}; retrying in {backoff:?}");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.shutdown.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
        // Shutdown: the processes still waiting are ended like any other.
        let left: Vec<_> = warm.lock().ready.drain(..).collect();
        for lp in left {
            discard(lp, self.opts.grace).await;
        }
    }

    /// Whether one more warm process of `each` bytes fits in `mcpbox.warmPoolBytes` beside
    /// what all pools hold now.
    fn warm_fits(&self, each: u64) -> bool {
        let held: u64 = self
            .servers
            .values()
            .filter_map(|s| s.warm.as_ref())
            .map(|w| {
                let st = w.lock();
                st.ready.len() as u64 * st.each()
            })
            .sum();
        held + each <= self.warm_pool_bytes
    }

    /// Count a session arriving at `server` and take its oldest waiting warm process, if one
    /// is alive; its CPU weight is raised to a live session's.
    async fn take_warm(&self, server: &Server) -> Option<LaunchedProcess> {
        let warm = server.warm.as_ref()?;
        loop {
            let lp = {
                let mut st = warm.lock();
                st.arrived(Instant::now());
                st.ready.pop_front()
            };
            warm.wake.notify_one();
            let mut lp = lp?;
            match lp.child.try_wait() {
                Ok(None) => {
                    // Loaded and waiting: what one more process of this server costs.
                    if let Some(m) = crate::sandbox::memory_own(&lp.cgroups) {
                        let mut st = warm.lock();
                        st.each = Some(st.each.unwrap_or(0).max(m));
                    }
                    if let Err(e) = crate::sandbox::set_cpu_weight(&lp.cgroups, LIVE_CPU_WEIGHT) {
                        tracing::warn!(server = %server.cfg.name, pid = lp.pid, "cannot raise the CPU weight of a taken warm process: {e}");
                    }
                    return Some(lp);
                }
                _ => {
                    tracing::warn!(server = %server.cfg.name, pid = lp.pid, "warm process died while waiting; starting a fresh one");
                    discard(lp, self.opts.grace).await;
                }
            }
        }
    }

    /// Launch a process and wire it to `hub`. The process is killed when `kill` (a child of
    /// the shutdown token) fires; `exited` reports its end.
    async fn start_process(
        &self,
        server: &Arc<Server>,
        hub: Arc<Hub>,
        session: Option<(SessionId, CancellationToken)>,
        prestarted: Option<LaunchedProcess>,
    ) -> anyhow::Result<ProcCtl> {
        let name = server.cfg.name.clone();
        let sid_str = session.as_ref().map(|(s, _)| s.to_string());
        let lp = match prestarted {
            Some(lp) => lp,
            None => self.launcher.launch(&server.cfg, sid_str.as_deref()).await?,
        };
        let LaunchedProcess { mut child, pid, level, start_latency, cleanup, .. } = lp;
        server.metrics.starts.fetch_add(1, Ordering::Relaxed);
        server.metrics.start_us.fetch_add(start_latency.as_micros() as u64, Ordering::Relaxed);
        *server.metrics.level.lock().unwrap_or_else(|e| e.into_inner()) = Some(level.clone());
        let sess_field = sid_str.clone().unwrap_or_else(|| "-".into());
        tracing::info!(server = %name, session = %sess_field, pid, level = %level, latency_ms = start_latency.as_secs_f64() * 1e3, "server started");

        let (Some(mut stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.start_kill();
            anyhow::bail!("launcher returned a process without piped stdio");
        };
        let (tx, mut rx) = input_queue(hub.input_budget());
        hub.connect_process(tx);
        tokio::spawn(async move {
            while let Some(b) = rx.recv().await {
                if stdin.write_all(&b).await.is_err() {
                    break;
                }
                rx.written(b.len());
            }
        });
        // stderr: drained with a bounded line buffer, logged at a bounded rate.
        let (n2, s2) = (name.clone(), sess_field.clone());
        tokio::spawn(async move {
            let mut window = Instant::now();
            let (mut count, mut dropped) = (0u32, 0u64);
            framing::read_log_lines(stderr, STDERR_LINE_MAX, |line| {
                if window.elapsed() > Duration::from_secs(1) {
                    if dropped > 0 {
                        tracing::warn!(server = %n2, session = %s2, pid, "suppressed {dropped} stderr lines");
                    }
                    window = Instant::now();
                    count = 0;
                    dropped = 0;
                }
                count += 1;
                if count > 50 {
                    dropped += 1;
                    return;
                }
                tracing::info!(server = %n2, session = %s2, pid, "stderr: {line}");
            })
            .await;
        });
        // stdout: its end means the server can no longer answer; in-flight requests fail now
        // and the process is ended (below), whether or not it meant to exit.
        let hub2 = hub.clone();
        let stdout_closed = CancellationToken::new();
        let closed2 = stdout_closed.clone();
        let (n3, s3) = (name.clone(), sess_field.clone());
        let reader = tokio::spawn(async move {
            let mut lr = LineReader::new(stdout, hub2.max_line());
            while let Ok(Some(frame)) = lr.next_frame().await {
                hub2.from_backend(frame);
            }
            tracing::debug!(server = %n3, session = %s3, pid, "server closed its stdout");
            hub2.process_exited();
            closed2.cancel();
        });
        let kill = match &session {
            Some((_, closed)) => closed.clone(),
            None => self.shutdown.child_token(),
        };
        let shutdown = self.shutdown.clone();
        let grace = self.opts.grace;
        let (done_tx, done_rx) = oneshot::channel();
        self.tasks.spawn(async move {
            let status = tokio::select! {
                s = child.wait() => s,
                _ = kill.cancelled() => terminate(&mut child, pid, grace).await,
                _ = shutdown.cancelled() => terminate(&mut child, pid, grace).await,
                _ = stdout_closed.cancelled() => {
                    // Usually the process is exiting anyway; one that lives on without its
                    // stdout is ended.
                    match tokio::time::timeout(Duration::from_millis(100), child.wait()).await {
                        Ok(s) => s,
                        Err(_) => {
                            tracing::warn!(server = %name, session = %sess_field, pid, "server closed its stdout but kept running; ending it");
                            terminate(&mut child, pid, grace).await
                        }
                    }
                }
            };
            let status = match status {
                Ok(s) => s.to_string(),
                Err(e) => e.to_string(),
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), reader).await;
            hub.process_exited();
            cleanup();
            tracing::info!(server = %name, session = %sess_field, pid, status = %status, "server process ended");
            let _ = done_tx.send(status);
        });
        Ok(ProcCtl { exited: done_rx })
    }

    /// Open a client session on `server`, read through `transport`. On an
    /// `isolation: "principal"` server it is a session on the principal's own process
    /// ([`Self::open_on_principal`]).
    pub async fn open_session(
        self: &Arc<Self>,
        server_name: &str,
        principal: Principal,
        transport: Transport,
    ) -> Result<Arc<Session>, OpenError> {
        let server = self.servers.get(server_name).ok_or(OpenError::NotFound)?;
        if server.cfg.isolation == Isolation::Principal {
            return self.open_on_principal(server_name, principal, transport).await;
        }
        self.open_own_session(server_name, principal, transport).await
    }

    /// A 2025-era session of `principal` on an `isolation: "principal"` server: it shares the
    /// process of the principal's stateless requests (opened by mcpbox with every routable
    /// client capability if it is not running), whose `initialize` result it is answered with;
    /// server requests and notifications go to it only while it alone has requests in flight
    /// on that process, as on a shared server. It counts against `maxSessions`, takes no
    /// sandbox of its own, and ends with the process; ending it leaves the process running.
    async fn open_on_principal(
        self: &Arc<Self>,
        server_name: &str,
        principal: Principal,
        transport: Transport,
    ) -> Result<Arc<Session>, OpenError> {
        let server = self.open_allowed(server_name)?;
        let init = serde_json::json!({
            "protocolVersion": PRINCIPAL_PROTOCOL,
            "capabilities": {"sampling": {}, "elicitation": {}, "roots": {}},
            "clientInfo": {"name": "mcpbox", "version": env!("CARGO_PKG_VERSION")},
        });
        let backend = self.principal_backend(server_name, &principal, init).await?;
        let Some(slot) = server.sessions.reserve(server.cfg.max_sessions) else {
            return Err(OpenError::TooMany(server_name.to_string()));
        };
        let budget_slot = self.budget.acquire(false)?;
        let id = new_session_id(self.opts.replica_id.as_deref());
        // Ends with the principal's process (and so at shutdown), or on its own.
        let closed = backend.session.closed.child_token();
        let session = Session::new(
            id.clone(),
            server_name,
            principal,
            transport,
            backend.session.hub(),
            self.opts.session_buffer,
            closed.clone(),
            server.metrics.requests.clone(),
        );
        server.sessions.insert(slot, session.clone());
        tracing::info!(server = %server_name, session = %id, principal = %session.principal, backend = %backend.session.id, "session opened on the principal's process");
        let srv = server.clone();
        let sess = session.clone();
        self.tasks.spawn(async move {
            closed.cancelled().await;
            let reason =
                if backend.session.is_closed() { "the principal's server process ended" } else { "session ended" };
            sess.finish(reason);
            srv.sessions.remove(&sess.id);
            drop(budget_slot);
        });
        Ok(session)
    }

    async fn open_own_session(
        self: &Arc<Self>,
        server_name: &str,
        principal: Principal,
        transport: Transport,
    ) -> Result<Arc<Session>, OpenError> {
        let server = self.open_allowed(server_name)?;
        if let Err(e) = &server.ready {
            return Err(OpenError::Launch(e.clone()));
        }
        // Reserve a slot before the (slow) launch so concurrent opens cannot overshoot.
        let Some(slot) = server.sessions.reserve(server.cfg.max_sessions) else {
            return Err(OpenError::TooMany(server_name.to_string()));
        };
        // The global budget, also before anything starts; its slot goes back when the session ends.
        let budget_slot = self.budget.acquire(server.shared.is_none())?;
        let id = new_session_id(self.opts.replica_id.as_deref());
        let closed = self.shutdown.child_token();
        let hub = match &server.shared {
            Some(h) => h.clone(),
            None => {
                let hub = Hub::new(server_name, false, server.cfg.tool_filter.clone(), self.opts.limits());
                // A principal's process: its 2025-era sessions join it (open_on_principal).
                let hub = if server.cfg.isolation == Isolation::Principal { hub.with_shared_routing() } else { hub };
                hub.with_options(server.cfg.log_enabled, server.cfg.timeout)
            }
        };
        let session = Session::new(
            id.clone(),
            server_name,
            principal,
            transport,
            hub.clone(),
            self.opts.session_buffer,
            closed.clone(),
            server.metrics.requests.clone(),
        );
        let proc = if server.shared.is_none() {
            let t = Instant::now();
            let warm = self.take_warm(&server).await;
            let cold = warm.is_none();
            if cold {
                server.metrics.cold_starts.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(server = %server_name, session = %id, "no warm process ready: the session waits for a cold start");
            } else {
                server.metrics.warm_starts.fetch_add(1, Ordering::Relaxed);
            }
            match self.start_process(&server, hub.clone(), Some((id.clone(), closed.clone())), warm).await {
                Ok(p) => {
                    server.metrics.session_start.observe(t.elapsed());
                    if cold {
                        tracing::info!(server = %server_name, session = %id, "cold start took {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
                    }
                    Some(p)
                }
                Err(e) => {
                    session.finish("the server could not be started");
                    server.metrics.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(server = %server_name, "cannot start server for a new session: {e:#}");
                    return Err(OpenError::Launch(format!("{e:#}")));
                }
            }
        } else {
            None
        };
        server.sessions.insert(slot, session.clone());
        tracing::info!(server = %server_name, session = %id, principal = %session.principal, "session opened");
        let srv = server.clone();
        let sess = session.clone();
        self.tasks.spawn(async move {
            let mut reason = "session ended".to_string();
            match proc {
                Some(p) => {
                    tokio::select! {
                        _ = closed.cancelled() => {}
                        r = p.exited => {
                            srv.metrics.errors.fetch_add(1, Ordering::Relaxed);
                            reason = format!("server process exited ({})", r.unwrap_or_default());
                            sess.close(&reason);
                        }
                    }
                }
                None => closed.cancelled().await,
            }
            sess.finish(&reason);
            srv.sessions.remove(&sess.id);
            drop(budget_slot);
        });
        Ok(session)
    }

    /// The backend of `principal`'s stateless requests on `server_name`: one session per
    /// principal, opened on first use (a process of its own unless the server is shared),
    /// initialized by mcpbox with `init_params` (the 2025-era handshake the server expects),
    /// and reopened once it has ended (idle timeout, crash). Ends like any session: idle
    /// reaping, shutdown.
    pub async fn principal_backend(
        self: &Arc<Self>,
        server_name: &str,
        principal: &Principal,
        init_params: serde_json::Value,
    ) -> Result<Arc<Backend>, OpenError> {
        let server = self.servers.get(server_name).ok_or(OpenError::NotFound)?.clone();
        let slot =
            server.principals.lock().unwrap_or_else(|e| e.into_inner()).entry(principal.clone()).or_default().clone();
        let mut slot = slot.lock().await;
        if let Some(b) = slot.as_ref().filter(|b| !b.session.is_closed()) {
            return Ok(b.clone());
        }
        *slot = None;
        let session = self.open_own_session(server_name, principal.clone(), Transport::Streamable).await?;
        let req = serde_json::json!({"jsonrpc": "2.0", "id": "mcpbox-initialize", "method": "initialize", "params": init_params});
        let answer = tokio::time::timeout(INIT_TIMEOUT, session.request_json(req)).await;
        let init = match answer {
            Ok(Some(body)) => {
                serde_json::from_slice::<serde_json::Value>(&body).ok().and_then(|v| v.get("result").cloned())
            }
            _ => None,
        };
        let Some(init) = init else {
            session.close("the server did not answer initialize");
            tracing::error!(server = %server_name, principal = %principal, "server did not answer mcpbox's initialize in {INIT_TIMEOUT:?}");
            return Err(OpenError::Launch("the server did not answer initialize".into()));
        };
        session.send(serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
        tracing::info!(server = %server_name, principal = %principal, session = %session.id, "backend for stateless requests ready");
        let b = Arc::new(Backend {
            session,
            init,
            log_level: tokio::sync::Mutex::new(None),
            tools: tokio::sync::Mutex::new(None),
        });
        *slot = Some(b.clone());
        Ok(b)
    }

    async fn reap_idle(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.shutdown.cancelled() => return,
            }
            for server in self.servers.values() {
                let idle = server.cfg.idle_timeout;
                let all = server.sessions.all();
                for s in &all {
                    if s.idle_for().is_none_or(|d| d <= idle) {
                        continue;
                    }
                    // A principal's process lives while any session on it is in use.
                    let in_use = server.cfg.isolation == Isolation::Principal
                        && server.is_principal_backend(s)
                        && all.iter().any(|o| {
                            o.id != s.id && o.principal == s.principal && o.idle_for().is_none_or(|d| d <= idle)
                        });
                    if !in_use {
                        s.close(&format!("idle for {idle:?}"));
                    }
                }
            }
        }
    }

    /// Take no new sessions from now on; open ones go on until [`Supervisor::shutdown`].
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// The server a new session may be opened on: none while shutting down or draining.
    fn open_allowed(&self, server_name: &str) -> Result<Arc<Server>, OpenError> {
        if self.shutdown.is_cancelled() {
            return Err(OpenError::ShuttingDown);
        }
        if self.is_draining() {
            return Err(OpenError::Draining);
        }
        self.servers.get(server_name).ok_or(OpenError::NotFound).cloned()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Open sessions across all servers.
    pub fn open_sessions(&self) -> usize {
        self.servers.values().map(|s| s.active_sessions()).sum()
    }

    /// Stop everything: sessions end, children get SIGTERM then SIGKILL after the grace
    /// period. Returns once every process task has finished.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(self.opts.grace + Duration::from_secs(2), self.tasks.wait()).await.is_err() {
            tracing::error!("some server processes did not end in time");
        }
    }
}

/// End a process that was never wired to a hub (a warm process nobody took).
async fn discard(mut lp: LaunchedProcess, grace: Duration) {
    let _ = terminate(&mut lp.child, lp.pid, grace).await;
    (lp.cleanup)();
}

async fn terminate(child: &mut Child, pid: u32, grace: Duration) -> std::io::Result<std::process::ExitStatus> {
    if pid > 0 {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(r) => r,
        Err(_) => {
            let _ = child.start_kill();
            child.wait().await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pool's target follows the arrivals of one window, stays there while sessions keep
    /// coming, and halves per idle period down to one.
    #[test]
    fn warm_target_follows_arrivals_and_halves_when_idle() {
        let w = Warm::new();
        let mut st = w.lock();
        let t0 = Instant::now();
        for i in 0..10 {
            st.arrived(t0 + Duration::from_millis(i * 100));
        }
        assert_eq!(st.target, 10);
        // Arrivals further apart than the window do not add up.
        st.arrived(t0 + ARRIVAL_WINDOW * 3);
        assert_eq!((st.target, st.arrivals.len()), (10, 1));
        let last = t0 + ARRIVAL_WINDOW * 3;
        assert!(st.shrink(last + WARM_IDLE_SHRINK / 2).is_empty());
        assert_eq!(st.target, 10, "shrunk before an idle period");
        st.shrink(last + WARM_IDLE_SHRINK + Duration::from_secs(1));
        assert_eq!(st.target, 5);
        st.shrink(last + WARM_IDLE_SHRINK * 2 + Duration::from_secs(1));
        assert_eq!(st.target, 5, "halved twice within one idle period");
        for k in 3..8 {
            st.shrink(last + WARM_IDLE_SHRINK * k + Duration::from_secs(k as u64));
        }
        assert_eq!(st.target, 1);
        for i in 0..100 {
            st.arrived(last + WARM_IDLE_SHRINK * 9 + Duration::from_millis(i));
        }
        assert_eq!(st.target, WARM_MAX);
    }
}

//! Server lifecycle: processes (always through a [`Launcher`]), the warm pool, restarts with
//! backoff, idle timeouts, shutdown. Sessions themselves, their outboxes and the routing of
//! messages live in [`crate::bridge`]; the supervisor opens sessions there and ends them.
//!
//! - `isolation: "session"`: every session gets its own process; the session ends when the
//!   process exits (in-flight requests get "MCP server exited") and the process is killed
//!   when the session ends (DELETE, SSE disconnect, idle, shutdown).
//! - `isolation: "principal"`: as `session` for 2025-era sessions; stateless (2026-07-28)
//!   requests of one principal go to that principal's own backend session and process
//!   ([`Supervisor::principal_backend`]; also used for `session` servers), reaped when idle.
//! - `isolation: "shared"`: one process per server behind one [`Hub`]; it is restarted with
//!   exponential backoff (250 ms … 30 s) and sessions survive the restart.
//! - A process whose stdout closes is ended at once (its in-flight requests fail first): a
//!   server that can no longer answer is not left running until the idle timeout.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use tokio::io::AsyncWriteExt;
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bridge::{framing, input_queue, Hub, Limits, LineReader, Principal, Session, SessionId, Sessions, Transport};
use crate::config::{Config, Isolation, ServerConfig};

/// A started server process.
pub struct LaunchedProcess {
    /// stdin, stdout and stderr piped.
    pub child: Child,
    pub pid: u32,
    /// Confinement level actually reached ("full", "container").
    pub level: String,
    pub start_latency: Duration,
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
}

impl Launcher for SandboxLauncher {
    fn launch(&self, server: &ServerConfig, session: Option<&str>) -> BoxFuture<'static, anyhow::Result<LaunchedProcess>> {
        let planned = self.planner.plan(server);
        let spawner = self.spawner.clone();
        let name = server.name.clone();
        let session = session.map(str::to_owned);
        let denials = crate::denials::registry().server(&name, Some(crate::denials::file_for(&self.planner.state.root, &name)));
        Box::pin(async move {
            let planned = planned?;
            denials.set_policy(&planned.policy.source);
            for note in &planned.notes {
                tracing::warn!(server = %name, session = ?session, "{note}");
            }
            let sb = spawner.spawn(planned.spec).await?;
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
                cleanup: Box::new(move || {
                    if let Some(t) = proxy_task {
                        t.abort();
                    }
                }),
            })
        })
    }

    fn check(&self, server: &ServerConfig) -> anyhow::Result<()> {
        self.planner.plan(server).map(|_| ())
    }
}

/// Test-only: runs the command without any confinement.
#[cfg(test)]
pub struct DirectLauncher;

#[cfg(test)]
impl Launcher for DirectLauncher {
    fn launch(&self, server: &ServerConfig, _session: Option<&str>) -> BoxFuture<'static, anyhow::Result<LaunchedProcess>> {
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
            Ok(LaunchedProcess { child, pid, level: "none".into(), start_latency: t.elapsed(), cleanup: Box::new(|| {}) })
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
}

struct Warm {
    rx: tokio::sync::Mutex<mpsc::Receiver<LaunchedProcess>>,
    tx: Mutex<Option<mpsc::Sender<LaunchedProcess>>>,
}

impl Server {
    /// The open session `id`, if `principal` opened it.
    pub fn session(&self, id: &str, principal: &Principal) -> Option<Arc<Session>> {
        self.sessions.get(id, principal)
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
            let shared = (cfg.isolation == Isolation::Shared)
                .then(|| Hub::new(name, true, cfg.tool_filter.clone(), opts.limits()).with_options(cfg.log_enabled, cfg.timeout));
            servers.insert(
                name.clone(),
                Arc::new(Server {
                    cfg: cfg.clone(),
                    sessions: Sessions::default(),
                    shared,
                    metrics: Metrics::default(),
                    warm: (cfg.isolation != Isolation::Shared && ready.is_ok()).then(|| {
                        let (tx, rx) = mpsc::channel(1);
                        Warm { rx: tokio::sync::Mutex::new(rx), tx: Mutex::new(Some(tx)) }
                    }),
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

    /// Keep one started process waiting for the next session of `server` (session isolation):
    /// a new session then costs an initialize round trip instead of a sandbox and runtime
    /// start. Replenished as soon as it is taken; killed at shutdown.
    async fn keep_warm(self: Arc<Self>, server: Arc<Server>) {
        let Some(warm) = &server.warm else { return };
        let Some(tx) = warm.tx.lock().unwrap_or_else(|e| e.into_inner()).take() else { return };
        let mut backoff = Duration::from_millis(250);
        loop {
            let permit = tokio::select! {
                p = tx.reserve() => match p { Ok(p) => p, Err(_) => break },
                _ = self.shutdown.cancelled() => break,
            };
            let launched = tokio::select! {
                r = self.launcher.launch(&server.cfg, None) => r,
                _ = self.shutdown.cancelled() => break,
            };
            match launched {
                Ok(lp) => {
                    backoff = Duration::from_millis(250);
                    tracing::debug!(server = %server.cfg.name, pid = lp.pid, "warm process ready");
                    // The level is known as soon as a sandbox stands: /status shows it before
                    // the first session.
                    *server.metrics.level.lock().unwrap_or_else(|e| e.into_inner()) = Some(lp.level.clone());
                    permit.send(lp);
                }
                Err(e) => {
                    drop(permit);
                    tracing::warn!(server = %server.cfg.name, "cannot start a warm process: {e:#}; retrying in {backoff:?}");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.shutdown.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
        // Shutdown: the process still waiting is ended like any other.
        drop(tx);
        if let Some(lp) = warm.rx.lock().await.recv().await {
            discard(lp, self.opts.grace).await;
        }
    }

    /// The waiting warm process of `server`, if there is one and it is still alive.
    async fn take_warm(&self, server: &Server) -> Option<LaunchedProcess> {
        let warm = server.warm.as_ref()?;
        let mut rx = warm.rx.lock().await;
        loop {
            let mut lp = rx.try_recv().ok()?;
            match lp.child.try_wait() {
                Ok(None) => return Some(lp),
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
        let LaunchedProcess { mut child, pid, level, start_latency, cleanup } = lp;
        server.metrics.starts.fetch_add(1, Ordering::Relaxed);
        server.metrics.start_us.fetch_add(start_latency.as_micros() as u64, Ordering::Relaxed);
        *server.metrics.level.lock().unwrap_or_else(|e| e.into_inner()) = Some(level.clone());
        let sess_field = sid_str.clone().unwrap_or_else(|| "-".into());
        tracing::info!(server = %name, session = %sess_field, pid, level = %level, latency_ms = start_latency.as_secs_f64() * 1e3, "server started");

        let (Some(mut stdin), Some(stdout), Some(stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take()) else {
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

    /// Open a client session on `server`, read through `transport`.
    pub async fn open_session(
        self: &Arc<Self>,
        server_name: &str,
        principal: Principal,
        transport: Transport,
    ) -> Result<Arc<Session>, OpenError> {
        if self.shutdown.is_cancelled() {
            return Err(OpenError::ShuttingDown);
        }
        if self.is_draining() {
            return Err(OpenError::Draining);
        }
        let server = self.servers.get(server_name).ok_or(OpenError::NotFound)?.clone();
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
            None => Hub::new(server_name, false, server.cfg.tool_filter.clone(), self.opts.limits()).with_options(server.cfg.log_enabled, server.cfg.timeout),
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
            let warm = self.take_warm(&server).await;
            match self.start_process(&server, hub.clone(), Some((id.clone(), closed.clone())), warm).await {
                Ok(p) => Some(p),
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
        let slot = server.principals.lock().unwrap_or_else(|e| e.into_inner()).entry(principal.clone()).or_default().clone();
        let mut slot = slot.lock().await;
        if let Some(b) = slot.as_ref().filter(|b| !b.session.is_closed()) {
            return Ok(b.clone());
        }
        *slot = None;
        let session = self.open_session(server_name, principal.clone(), Transport::Streamable).await?;
        let req = serde_json::json!({"jsonrpc": "2.0", "id": "mcpbox-initialize", "method": "initialize", "params": init_params});
        let answer = tokio::time::timeout(INIT_TIMEOUT, session.request_json(req)).await;
        let init = match answer {
            Ok(Some(body)) => serde_json::from_slice::<serde_json::Value>(&body).ok().and_then(|v| v.get("result").cloned()),
            _ => None,
        };
        let Some(init) = init else {
            session.close("the server did not answer initialize");
            tracing::error!(server = %server_name, principal = %principal, "server did not answer mcpbox's initialize in {INIT_TIMEOUT:?}");
            return Err(OpenError::Launch("the server did not answer initialize".into()));
        };
        session.send(serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
        tracing::info!(server = %server_name, principal = %principal, session = %session.id, "backend for stateless requests ready");
        let b = Arc::new(Backend { session, init, log_level: tokio::sync::Mutex::new(None) });
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
                for s in server.sessions.all() {
                    if s.idle_for().is_some_and(|d| d > idle) {
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

//! `mcpbox serve`: load the config, start the supervisor and the HTTP edge, stop cleanly.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{self, Config, ServerKind, Transport};
use crate::policy::Level;
use crate::supervisor::{Options, SandboxLauncher, Supervisor};

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// mcpbox.json (a superset of mcp-proxy's config.json).
    #[arg(long)]
    pub config: PathBuf,
    /// Validate the config and exit: 0 with a summary, 2 with the errors.
    #[arg(long)]
    pub check: bool,
    /// Per-server data and caches (default: the config's `stateDir`, else $MCPBOX_STATE_DIR, else
    /// /var/lib/mcpbox as root, $XDG_STATE_HOME/mcpbox otherwise).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Lowest confinement level any server may get: `container` permits the container level
    /// for every server (the Docker image sets this).
    #[arg(long, value_parser = ["full", "container"], default_value = "full")]
    pub min_level: String,
    /// Allow a non-loopback address without any auth token.
    #[arg(long)]
    pub allow_unauthenticated: bool,
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    pub log_format: String,
    /// Seconds between SIGTERM and SIGKILL for server processes at shutdown.
    #[arg(long, default_value_t = 5)]
    pub grace: u64,
    /// This replica's id, carried in every session id so that a proxy can route on it
    /// (overrides `mcpbox.replicaId`).
    #[arg(long, env = "MCPBOX_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// Seconds after SIGTERM during which open sessions go on while no new ones are taken
    /// (overrides `mcpbox.drainGrace`; 0 ends them at once).
    #[arg(long)]
    pub drain_grace: Option<u64>,
    /// Turn the kernel's audit subsystem on if it is off, so that what Landlock refuses a server
    /// is reported (logged, counted, recorded for `policy suggest`). A host-wide change that
    /// outlives mcpbox; without auditd the kernel also prints its audit records to its log.
    /// Without this flag Landlock denials are reported only where audit is on already.
    #[arg(long)]
    pub enable_audit: bool,
}

fn load(args: &ServeArgs) -> Result<Config, config::ConfigError> {
    let mut c = config::load(&args.config)?;
    c.check_exposure(args.allow_unauthenticated)?;
    if let Some(id) = &args.replica_id {
        config::check_replica_id(id).map_err(|msg| config::ConfigError::Field { field: "--replica-id".into(), msg })?;
        c.replica.id = Some(id.clone());
    }
    if let Some(secs) = args.drain_grace {
        c.replica.drain_grace = Duration::from_secs(secs);
    }
    Ok(c)
}

fn min_level(args: &ServeArgs) -> Level {
    if args.min_level == "container" {
        Level::Container
    } else {
        Level::Full
    }
}

fn urls(c: &Config) -> Vec<String> {
    let base = match &c.proxy.base_url {
        Some(b) => format!("{}{}", b.origin(), b.path),
        None => format!("http://{}", c.proxy.addr),
    };
    c.servers
        .values()
        .filter(|s| !s.disabled)
        .map(|s| {
            let via = match &s.kind {
                ServerKind::Url { url, .. } => format!(" (upstream {})", url.split('?').next().unwrap_or(url)),
                ServerKind::Stdio { .. } => String::new(),
            };
            match c.proxy.transport {
                Transport::Sse => format!("{}: {base}/{}/sse{via}", s.name, s.name),
                Transport::StreamableHttp => format!("{}: {base}/{}/mcp{via}", s.name, s.name),
            }
        })
        .collect()
}

/// How the descriptor limit is shared out: the global connection cap (`maxConnections` if set)
/// and the budget of all the egress proxies together.
fn descriptors(cfg: &Config, nofile: u64) -> crate::http::listen::Descriptors {
    let l = &cfg.limits;
    crate::http::listen::plan_descriptors(nofile, l.max_sandboxes, l.max_egress_connections, l.max_connections)
}

/// Said when the descriptor limit cannot hold what the limits allow at once.
fn descriptors_warning(d: &crate::http::listen::Descriptors) -> Option<String> {
    (!d.fits()).then(|| {
        format!(
            "the descriptor limit {} is below what these limits can hold at once ({}: {} reserved for mcpbox and mcpbox.maxSandboxes, {} connections, {} egress connections × {}); raise the limit (systemd LimitNOFILE=, ulimit -n) or lower mcpbox.maxSandboxes / mcpbox.maxConnections",
            d.limit,
            d.needed(),
            d.reserve,
            d.connections,
            d.egress,
            crate::netproxy::FDS_PER_CONNECTION
        )
    })
}

/// The effective limits, for `serve --check` and the start banner.
fn limits_summary(cfg: &Config, nofile: u64) -> Vec<String> {
    let l = &cfg.limits;
    let d = descriptors(cfg, nofile);
    let conns = match l.max_connections {
        Some(n) => format!("{n}"),
        None => format!("{} (from the descriptor limit {nofile})", d.connections),
    };
    let mut out = vec![
        format!(
            "connections: at most {conns}, {} per client address; headerTimeout {:?} (also the keep-alive idle timeout), bodyTimeout {:?}",
            l.max_connections_per_address, l.header_timeout, l.body_timeout
        ),
        format!("sessions: at most {} across all servers, {} session sandboxes", l.max_sessions_total, l.max_sandboxes),
        format!(
            "egress proxies: at most {} connections per sandbox, {} across all sandboxes ({} descriptors each; sized from the descriptor limit {nofile} after {} kept for mcpbox and the sandboxes' pipes)",
            l.max_egress_connections,
            d.egress,
            crate::netproxy::FDS_PER_CONNECTION,
            d.reserve
        ),
    ];
    for s in cfg.servers.values().filter(|s| !s.disabled) {
        let max = match s.max_sessions {
            Some(n) => n.to_string(),
            None => "unlimited (maxSessions 0; the global budget applies)".into(),
        };
        out.push(format!("  {}: maxSessions {max}", s.name));
    }
    out
}

pub fn main(args: ServeArgs) -> ExitCode {
    let cfg = match load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mcpbox: {}: {e}", args.config.display());
            return ExitCode::from(2);
        }
    };
    if args.check {
        // Everything a launch would refuse, refused now (nothing is created or prepared).
        let state = crate::plan::StateDir::for_config(&cfg, &args.config, args.state_dir.clone(), min_level(&args));
        let planner = crate::plan::Planner::new(state, &cfg);
        let refused = planner.refusals(&cfg);
        if !refused.is_empty() {
            for (name, e) in &refused {
                eprintln!("mcpbox: {}: server {name}: {e}", args.config.display());
            }
            return ExitCode::from(2);
        }
        for w in &cfg.warnings {
            eprintln!("mcpbox: {}: warning: {w}", args.config.display());
        }
        println!("{}: ok; listen {}; {} server(s)", args.config.display(), cfg.proxy.addr, cfg.servers.len());
        if let Some(id) = &cfg.replica.id {
            println!("replica {id}: session ids {id}.<random>; drainGrace {:?}", cfg.replica.drain_grace);
        }
        for u in urls(&cfg) {
            println!("  {u}");
        }
        // Which file each server's policy is (a name may be the config's policies/NAME.toml).
        for (name, server) in cfg.servers.iter().filter(|(_, s)| !s.disabled) {
            if let Ok(c) = planner.check(server) {
                println!("policy of {name}: {}", c.policy.source);
            }
        }
        let nofile = crate::http::listen::nofile_hard();
        for line in limits_summary(&cfg, nofile) {
            println!("{line}");
        }
        if let Some(w) = descriptors_warning(&descriptors(&cfg, nofile)) {
            eprintln!("mcpbox: {}: warning: {w}", args.config.display());
        }
        return ExitCode::SUCCESS;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if args.log_format == "json" {
        tracing_subscriber::fmt().json().with_env_filter(filter).with_writer(std::io::stderr).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    }
    let rt = match crate::runtime("serve", true) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(run(args, cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: ServeArgs, cfg: Config) -> anyhow::Result<()> {
    let min_level = min_level(&args);
    if min_level == Level::Container {
        tracing::warn!("--min-level container: servers may run without namespaces (container level)");
    }
    for w in &cfg.warnings {
        tracing::warn!("{}: {w}", args.config.display());
    }
    // Every client connection is a descriptor: take what the system allows, and size the
    // connection cap from it (below).
    let nofile = match crate::http::listen::raise_nofile() {
        Ok((before, now)) if now > before => {
            tracing::info!("raised the descriptor limit (RLIMIT_NOFILE) from {before} to {now}");
            now
        }
        Ok((_, now)) => now,
        Err(e) => {
            tracing::warn!("cannot raise the descriptor limit (RLIMIT_NOFILE): {e}");
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map(|(s, _)| s).unwrap_or(1024)
        }
    };
    if nofile < 4096 {
        tracing::warn!("the descriptor limit is {nofile}: connections and sessions are capped low; raise it (systemd LimitNOFILE=, ulimit -n)");
    }
    if cfg.memory_merge {
        match crate::sandbox::probe::ksm() {
            (true, why) => tracing::info!("mcpbox.memoryMerge: every sandbox is mergeable; {why}"),
            (false, why) => tracing::warn!("mcpbox.memoryMerge is on, but {why}"),
        }
    }
    let swept = crate::sandbox::sweep_stale_cgroups();
    if swept > 0 {
        tracing::info!("removed {swept} cgroup(s) left by earlier sandboxes");
    }
    // Landlock's refusals come from the kernel's audit records (logged either way: read, or why not).
    let audit =
        if args.enable_audit { crate::sandbox::audit::Enable::Yes } else { crate::sandbox::audit::Enable::IfOn };
    if let crate::sandbox::audit::Status::Unavailable(why) = crate::sandbox::audit::start(audit) {
        tracing::warn!("Landlock denials are not reported: {why}");
    }
    let state = crate::plan::StateDir::for_config(&cfg, &args.config, args.state_dir.clone(), min_level);
    // npx/uvx servers: install what is missing before serving (each in its prepare sandbox);
    // a failure is that server's alone and shows in /readyz.
    // A server whose policy would refuse it at launch is refused now, before its package is
    // prepared; it shows in /readyz like a failed prepare.
    let mut planner = crate::plan::Planner::new(state, &cfg);
    let refused = planner.refusals(&cfg);
    let failed = crate::plan::prepare::prepare_config(&planner.state, &cfg, false, &refused).await;
    planner.cannot_start =
        refused.into_iter().chain(failed.into_iter().map(|(n, e)| (n, format!("prepare failed: {e}")))).collect();
    // The descriptor limit shared out: the egress proxies of all sandboxes draw from one budget
    // (each sandbox's own cap is `maxEgressConnections`), the clients get the connection cap.
    let fds = descriptors(&cfg, nofile);
    if let Some(w) = descriptors_warning(&fds) {
        tracing::warn!("{w}");
    }
    let launcher = SandboxLauncher {
        planner,
        spawner: crate::sandbox::Spawner::new(),
        egress_per_sandbox: cfg.limits.max_egress_connections,
        egress_budget: crate::netproxy::SharedBudget::new(fds.egress),
    };
    let cfg = Arc::new(cfg);
    let grace = Duration::from_secs(args.grace);
    let sup = Supervisor::start(&cfg, Arc::new(launcher), Options::from_config(&cfg, grace));
    let listener = tokio::net::TcpListener::bind(cfg.proxy.addr).await?;
    tracing::info!("mcpbox {} listening on {}", env!("CARGO_PKG_VERSION"), listener.local_addr()?);
    for u in urls(&cfg) {
        tracing::info!("serving {u}");
    }
    if let Some(id) = &cfg.replica.id {
        tracing::info!("replica {id}: session ids start with {id}.; drainGrace {:?}", cfg.replica.drain_grace);
    }
    for line in limits_summary(&cfg, nofile) {
        tracing::info!("{}", line.trim_start());
    }
    if cfg.proxy.base_url.as_ref().is_some_and(|b| b.scheme == "https") {
        // TLS ends in a reverse proxy: every client then comes from the proxy's one address.
        tracing::info!(
            "behind a reverse proxy all clients share its address: mcpbox.maxConnectionsPerAddress ({}) caps them together",
            cfg.limits.max_connections_per_address
        );
    }
    let app = crate::http::router(sup.clone(), cfg.clone());
    let settings = crate::http::listen::Settings {
        header_timeout: cfg.limits.header_timeout,
        body_timeout: cfg.limits.body_timeout,
        max_connections: fds.connections,
        max_per_address: cfg.limits.max_connections_per_address,
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let conns = tokio_util::task::TaskTracker::new();
    let accept = tokio::spawn(crate::http::listen::serve(listener, app, settings, stop.clone(), conns.clone()));
    // Denial records a flood held back (`denials::WRITES_PER_SECOND`) reach their files.
    let flusher = tokio::spawn(async {
        let mut every = tokio::time::interval(crate::denials::FLUSH_EVERY);
        loop {
            every.tick().await;
            let _ = tokio::task::spawn_blocking(|| crate::denials::registry().flush_all()).await;
        }
    });
    wait_for_signal().await;
    drain(&sup, cfg.replica.drain_grace).await;
    tracing::info!("shutting down: closing sessions, stopping servers");
    sup.shutdown().await;
    flusher.abort();
    crate::denials::registry().flush_all();
    stop.cancel();
    let _ = accept.await;
    // Streams end with their sessions; do not wait forever for slow clients.
    conns.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), conns.wait()).await;
    tracing::info!("stopped");
    Ok(())
}

/// After SIGTERM: take no new sessions (`/readyz` 503, opens 503) and let the open ones go on
/// until they end, the grace runs out, or a second signal comes.
async fn drain(sup: &Supervisor, grace: Duration) {
    if grace.is_zero() {
        return;
    }
    sup.drain();
    let open = sup.open_sessions();
    if open == 0 {
        return;
    }
    tracing::info!("draining: no new sessions; {open} open session(s) may go on for up to {grace:?}");
    let until_empty = async {
        while sup.open_sessions() > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        _ = until_empty => tracing::info!("drained: every session has ended"),
        _ = tokio::time::sleep(grace) => tracing::info!("drain grace over: ending {} open session(s)", sup.open_sessions()),
        _ = wait_for_signal() => tracing::info!("second signal: ending the open sessions now"),
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

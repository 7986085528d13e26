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
    /// Per-server data and caches (default /var/lib/mcpbox as root, $XDG_STATE_HOME/mcpbox otherwise).
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
}

fn load(args: &ServeArgs) -> Result<Config, config::ConfigError> {
    let c = config::load(&args.config)?;
    c.check_exposure(args.allow_unauthenticated)?;
    Ok(c)
}

fn min_level(args: &ServeArgs) -> Level {
    if args.min_level == "container" { Level::Container } else { Level::Full }
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
        let refused = crate::plan::Planner::new(state).refusals(&cfg);
        if !refused.is_empty() {
            for (name, e) in &refused {
                eprintln!("mcpbox: {}: server {name}: {e}", args.config.display());
            }
            return ExitCode::from(2);
        }
        println!("{}: ok; listen {}; {} server(s)", args.config.display(), cfg.proxy.addr, cfg.servers.len());
        for u in urls(&cfg) {
            println!("  {u}");
        }
        return ExitCode::SUCCESS;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if args.log_format == "json" {
        tracing_subscriber::fmt().json().with_env_filter(filter).with_writer(std::io::stderr).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mcpbox: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
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
    let swept = crate::sandbox::sweep_stale_cgroups();
    if swept > 0 {
        tracing::info!("removed {swept} cgroup(s) left by earlier sandboxes");
    }
    let state = crate::plan::StateDir::for_config(&cfg, &args.config, args.state_dir.clone(), min_level);
    // npx/uvx servers: install what is missing before serving (each in its prepare sandbox);
    // a failure is that server's alone and shows in /readyz.
    // A server whose policy would refuse it at launch is refused now, before its package is
    // prepared; it shows in /readyz like a failed prepare.
    let mut planner = crate::plan::Planner::new(state);
    let refused = planner.refusals(&cfg);
    let failed = crate::plan::prepare::prepare_config(&planner.state, &cfg, false, &refused).await;
    planner.cannot_start = refused.into_iter().chain(failed.into_iter().map(|(n, e)| (n, format!("prepare failed: {e}")))).collect();
    let launcher = SandboxLauncher { planner, spawner: crate::sandbox::Spawner::new() };
    let cfg = Arc::new(cfg);
    let grace = Duration::from_secs(args.grace);
    let sup = Supervisor::start(&cfg, Arc::new(launcher), Options { queue: cfg.session_queue, max_line: cfg.max_line_bytes, grace });
    let listener = tokio::net::TcpListener::bind(cfg.proxy.addr).await?;
    tracing::info!("mcpbox {} listening on {}", env!("CARGO_PKG_VERSION"), listener.local_addr()?);
    for u in urls(&cfg) {
        tracing::info!("serving {u}");
    }
    let app = crate::http::router(sup.clone(), cfg.clone());
    // TCP_NODELAY: an SSE answer is written as several small chunks (headers, the event, the
    // end of the stream); with Nagle's algorithm on, each waits for the client's delayed ACK
    // and every request answered as a stream took ~40 ms instead of ~0.1 ms.
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {e}");
        }
    });
    let sup2 = sup.clone();
    let stopped = tokio_util::sync::CancellationToken::new();
    let stopped2 = stopped.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        wait_for_signal().await;
        tracing::info!("shutting down: closing sessions, stopping servers");
        sup2.shutdown().await;
        stopped2.cancel();
    });
    let serve = tokio::spawn(async move { server.await });
    stopped.cancelled().await;
    // Streams end with their sessions; do not wait forever for slow clients.
    let _ = tokio::time::timeout(Duration::from_secs(2), serve).await;
    tracing::info!("stopped");
    Ok(())
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

#![no_main]
use std::process::ExitCode;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "mcpbox", version, about = "Run stdio MCP servers in a Linux sandbox and serve them over HTTP")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Work with policies: check what one resolves to, see what a server was refused, turn that
    /// into grants, compare two policies.
    ///
    /// The workflow (docs/POLICIES.md, "Writing a policy"):
    ///   1. start from a shipped policy (`mcpbox policy check node` shows what it grants);
    ///   2. run the server under it (`mcpbox run --policy P -- …` or `serve`); what a sandbox layer
    ///      refuses is logged ("denied: egress connect host:443") and counted in /status;
    ///   3. `mcpbox policy suggest NAME` turns the recorded denials into `+` lines to add;
    ///   4. `mcpbox policy diff OLD NEW` shows exactly what the edited policy grants beyond the old.
    ///
    /// For a server you know nothing about, `mcpbox policy learn -- COMMAND…` writes a first
    /// policy from what it did while you drove it.
    #[command(verbatim_doc_comment)]
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Run one MCP server (or any program) confined, with stdin/stdout/stderr passed through.
    ///
    /// A drop-in wrapper for local MCP clients:
    ///   "command": "mcpbox", "args": ["run", "--policy", "node", "--", "node", "server.js"]
    /// Exit status is the program's (128+N if killed by signal N); 125 if mcpbox could not start it.
    #[command(verbatim_doc_comment)]
    Run {
        /// Policy: a file path, or the name of a shipped policy (default, node, python, …) or,
        /// with --config, of one in the config's policies/ directory.
        /// Without it: `default`, plus the node or python runtime base for npx/uvx commands.
        #[arg(long, short = 'p')]
        policy: Option<String>,
        /// An mcpbox.json: a policy NAME is looked up as `mcpbox serve` looks it up for that
        /// config, policies/NAME.toml in the config's directory first, then the shipped NAME
        /// (without --config: shipped names only; the working directory is never searched).
        /// Policy paths stay relative to the working directory.
        /// Its mcpbox.stateDir, uidBase and memoryMerge apply too: the server gets the state
        /// and uid `serve` gives a server of that --name.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where per-server data/ and cache/ live (default: --config's mcpbox.stateDir, else
        /// $MCPBOX_STATE_DIR, else /var/lib/mcpbox as root, $XDG_STATE_HOME/mcpbox otherwise).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Server name: its state directory, uid, hostname and cgroup (default: the package for
        /// npx/uvx, else the command's name).
        #[arg(long)]
        name: Option<String>,
        /// Lowest confinement level accepted: `full` (default) or `container` (no namespaces,
        /// as in a default Docker container).
        #[arg(long, value_enum, default_value = "full")]
        min_level: LevelArg,
        /// Turn the kernel's audit subsystem on if it is off, so that Landlock denials are
        /// reported (host-wide, outlives mcpbox; see `mcpbox serve --help`).
        #[arg(long)]
        enable_audit: bool,
        /// Let the host's KSM merge the sandbox's identical pages with other mergeable
        /// processes' (needs ksmd on: /sys/kernel/mm/ksm/run = 1; merged pages are a timing
        /// side channel between the processes that share them). `mcpbox.memoryMerge` for serve.
        #[arg(long)]
        memory_merge: bool,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Show what this host can give a sandbox: each layer (namespaces, Landlock, seccomp,
    /// cgroups, user-namespace restrictions), a trial sandbox, and the resulting level.
    Doctor {
        /// State directory for the trial sandbox (default: a temporary one).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Hidden: a `url` upstream as a stdio MCP server (run by `serve` inside a sandbox).
    #[command(hide = true)]
    UrlBridge {
        // The URL comes in MCPBOX_UPSTREAM_URL: a command line is readable by every user.
        #[arg(long)]
        transport: Option<String>,
        /// The most it holds of one line or message from the upstream (`mcpbox.maxLineBytes`).
        #[arg(long)]
        max_line_bytes: Option<usize>,
    },
    /// Hidden: the single-threaded sandbox builder, started by mcpbox itself.
    #[command(hide = true)]
    SandboxInit {
        #[arg(long)]
        spec_fd: i32,
        #[arg(long)]
        report_fd: i32,
    },
    /// Serve the servers of a config file over SSE and Streamable HTTP.
    Serve(mcpbox::serve::ServeArgs),
    /// Install the packages of the config's npx/uvx servers ahead of time, each in its own
    /// prepare sandbox (network allowed, writes only to that server's cache dir).
    Prepare {
        /// mcpbox.json.
        #[arg(long)]
        config: PathBuf,
        /// Where per-server data/ and cache/ live (as for `serve`).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Prepare again even when the cache already holds this package, from an emptied cache
        /// (download caches and npm/uv configuration removed). The installed tree that running
        /// servers use stays until the next successful prepare after this one.
        #[arg(long)]
        force: bool,
        /// Lowest confinement level accepted (as for `serve`).
        #[arg(long, value_enum, default_value = "full")]
        min_level: LevelArg,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LevelArg {
    Full,
    Container,
}

impl From<LevelArg> for mcpbox::policy::Level {
    fn from(l: LevelArg) -> Self {
        match l {
            LevelArg::Full => mcpbox::policy::Level::Full,
            LevelArg::Container => mcpbox::policy::Level::Container,
        }
    }
}

fn init_logging(default: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MCPBOX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Validate a policy (file or shipped name) and print the effective policy.
    ///
    /// Start a new policy from what this prints for a base (`node`, `python`, `default`) or for
    /// a shipped server policy; after running the server, `policy suggest NAME` says what it was
    /// refused, and `policy diff` what an edit changes.
    Check {
        /// Policy file (a path), or shipped policy name, or (with --config) the name of one in
        /// the config's policies/ directory. `# files read:` says which file it was.
        file: String,
        /// An mcpbox.json: a policy NAME is looked up as `mcpbox serve` looks it up for that
        /// config, policies/NAME.toml in the config's directory first, then the shipped NAME
        /// (without --config: shipped names only; the working directory is never searched).
        /// Policy paths stay relative to the working directory.
        #[arg(long)]
        config: Option<PathBuf>,
        /// What ${DATA} expands to (default: a placeholder; paths under it are not checked if it does not exist).
        #[arg(long)]
        data: Option<PathBuf>,
        /// What ${CACHE} expands to (default: a placeholder, as for --data).
        #[arg(long)]
        cache: Option<PathBuf>,
        /// The server's command: the runtime variables (${NODE_EXE}, ${PYTHON_STDLIB}, …) are
        /// filled in for the interpreter it resolves to (default: node/python3 on the
        /// sandbox's PATH).
        #[arg(long)]
        command: Option<String>,
    },
    /// Turn the denials recorded for a server into the grants that would have permitted them.
    ///
    /// Every refusal a sandbox layer reports is recorded per server (the most recent 128
    /// distinct ones, in STATE/NAME/denials.json; also under "denials" in /status). This prints
    /// them as a diff against the server's policy:
    ///   [network]
    ///   # egress connect api.example.com:443: 3 times, last in session 4f…
    ///   + allow = ["api.example.com:443"]
    ///   # cannot be granted: seccomp bpf: once: … mcpbox never allows it
    /// Reported: the egress proxy, seccomp, and Landlock where mcpbox reads the kernel's audit
    /// records (root, audit on: `serve --enable-audit`), e.g.
    ///   [filesystem]
    ///   # landlock exec /srv/tools/run.sh: once
    ///   + exec = ["/srv/tools/run.sh"]
    ///
    /// At level `full` a path outside the grants is absent rather than refused: the server's
    /// ENOENT names what to add to [filesystem].
    /// Read each line before adding it: a denial says what the server tried, not what it needs
    /// (a hostile package tries things too). Grant the narrowest path that works, check the
    /// result with `mcpbox policy check`, and compare with `mcpbox policy diff OLD NEW`.
    /// Which layers this host can report is listed by `mcpbox doctor`.
    #[command(verbatim_doc_comment)]
    Suggest {
        /// The server's name (as in mcpbox.json, or `mcpbox run --name`).
        server: String,
        /// The mcpbox.json the server is served from: its state directory and the policy the
        /// server runs under (inline ones too) are taken from there.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The state directory the server ran under (default: the config's, else
        /// $MCPBOX_STATE_DIR, else /var/lib/mcpbox as root, $XDG_STATE_HOME/mcpbox otherwise).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// The policy to compare against (file or shipped/user name), e.g. the one you are
        /// editing; default: the server's in --config, else the one the denials were recorded under.
        #[arg(long, short = 'p')]
        policy: Option<String>,
    },
    /// Run a server under observation and write the policy that covers what it used.
    ///
    /// The server runs as under `mcpbox run` (stdio passed straight through: drive it with any
    /// MCP client or script; same level, namespaces, own uid), but in a learn view: its base
    /// policy plus the host's system directories (/usr, /bin, /sbin, /lib*, /opt; read and exec)
    /// and /etc without its secrets (shadow, sudoers, ssh, ssl/private, …). Never /root, /home,
    /// mcpbox's state directory or the config's directory. Every path it opens, stats or executes
    /// is recorded (seccomp notifications; the syscalls continue), every host it connects to too
    /// (the egress proxy in record mode: any public host:port; internal addresses stay refused).
    /// Writes outside DATA and /tmp fail (EROFS) and are recorded. When the server exits (close
    /// its stdin), the policy is written to --out:
    ///   extends = "node"                # the runtime base, or --policy
    ///   [filesystem]
    ///   read = [
    ///       # 3 paths, 5 times (openat), e.g. /usr/share/misc/magic.mgc
    ///       "/usr/share/misc",
    ///   ]
    ///   [network]
    ///   mode = "proxy"
    ///   allow = ["api.example.com:443"]
    /// Then: read every line (it says what the server did, not what it should do), check it
    /// (`mcpbox policy check FILE`), compare (`mcpbox policy diff BASE FILE`), and run the server
    /// under it; `mcpbox policy suggest NAME` later shows what it was refused.
    ///   mcpbox policy learn --out fetch.toml -- uvx mcp-server-fetch
    ///   mcpbox policy learn --config mcpbox.json --server notes --out notes.toml
    /// Exit status: 0 once the policy is written (whatever the server's own status), 125 when
    /// the server could not be started or no policy could be written.
    #[command(verbatim_doc_comment)]
    Learn {
        /// The base policy to learn on top of (file or shipped/user name); default: the runtime
        /// base of the command (`node` for npx/node, `python` for uvx/python, else `default`),
        /// or the server's policy in --config.
        #[arg(long, short = 'p')]
        policy: Option<String>,
        /// Where to write the learned policy (default: ./NAME.learned.toml; never stdout, which
        /// is the server's MCP stream).
        #[arg(long, short = 'o')]
        out: Option<PathBuf>,
        /// Server name: its state directory, uid and hostname (default as for `mcpbox run`).
        #[arg(long)]
        name: Option<String>,
        /// The mcpbox.json holding the server (with --server): its command, env, state directory;
        /// policy names are looked up as `serve` looks them up (its policies/ first).
        #[arg(long, requires = "server")]
        config: Option<PathBuf>,
        /// The server of --config to learn.
        #[arg(long, requires = "config")]
        server: Option<String>,
        /// Where per-server data/ and cache/ live (as for `mcpbox run`).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Lowest confinement level accepted (as for `mcpbox run`).
        #[arg(long, value_enum, default_value = "full")]
        min_level: LevelArg,
        /// The command and its arguments, after `--` (not with --config).
        #[arg(last = true, conflicts_with = "config")]
        command: Vec<String>,
    },
    /// Show what policy B grants that policy A does not (+), and the reverse (-).
    ///
    /// Both are resolved first (`extends`, ${DATA}/${CACHE}); grants are compared by what they
    /// permit: a path inside a granted directory is no new grant, write and exec include read;
    /// network mode (none < proxy < host), allow-list entries and ports; env names and values;
    /// limits (higher or unset is more); seccomp; sandbox level and relaxations. `[runtime]`
    /// settings (node_flags) grant nothing: where they differ, a `~` line says how.
    /// Use it to review an edit before deploying it (`policy diff old.toml new.toml`: every +
    /// line is something the server can now do), or to see what a policy adds to its base
    /// (`policy diff node my-server.toml`).
    #[command(verbatim_doc_comment)]
    Diff {
        /// Policy A (file, shipped name, or with --config a name in its policies/).
        a: String,
        /// Policy B.
        b: String,
        /// An mcpbox.json: a policy NAME is looked up as `mcpbox serve` looks it up for that
        /// config, policies/NAME.toml in the config's directory first, then the shipped NAME
        /// (without --config: shipped names only; the working directory is never searched).
        /// Policy paths stay relative to the working directory.
        #[arg(long)]
        config: Option<PathBuf>,
        /// What ${DATA} expands to in both (default: a placeholder).
        #[arg(long)]
        data: Option<PathBuf>,
        /// What ${CACHE} expands to in both (default: a placeholder).
        #[arg(long)]
        cache: Option<PathBuf>,
    },
}

/// The process's entry point, called by the C library. mcpbox defines it itself instead of a
/// Rust `fn main`, so that the Rust runtime's start-up is skipped: it reads the whole of
/// /proc/self/maps and sets up an alternate signal stack to report stack overflows, at every
/// exec, and every sandbox `mcpbox run` starts pays it first (docs/BENCHMARKS.md, "A plain
/// build"). What of that start-up mcpbox relies on, [`mcpbox::sandbox::process_start`] does:
/// SIGPIPE ignored, descriptors 0-2 open. `std::env::args` is unaffected (the standard library
/// takes the command line from the C library's start-up on glibc). Given up: the "has
/// overflowed its stack" message (an overflow of the main thread's stack is a plain SIGSEGV) and
/// the name `main` of the main thread in panic messages.
#[no_mangle]
extern "C" fn main(_argc: std::ffi::c_int, _argv: *const *const std::ffi::c_char) -> std::ffi::c_int {
    mcpbox::sandbox::process_start();
    let code = cli_main();
    // ExitCode keeps its number to itself; it is one of these. `exit` flushes stdout, as
    // returning from a Rust `main` does.
    std::process::exit((0..=255u8).find(|n| ExitCode::from(*n) == code).map_or(1, i32::from))
}

fn cli_main() -> ExitCode {
    // `mcpbox run` starts its sandbox-init before anything else, even parsing the command line,
    // by forking while nothing has happened yet: it is ready by the time the sandbox is planned
    // (see cli_run and Pending::fork_here).
    let early = std::env::args_os().nth(1).is_some_and(|a| a == "run").then(mcpbox::sandbox::Pending::fork_here);
    // The hidden sandbox-init mode runs before anything else: no logging, no threads.
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::SandboxInit { spec_fd, report_fd } => {
            let code = mcpbox::sandbox::sandbox_init_main(spec_fd, report_fd);
            ExitCode::from(code.clamp(0, 255) as u8)
        }
        // The tokio runtime is built inside: sandbox-init above must run before any thread.
        Cmd::Serve(args) => mcpbox::serve::main(args),
        Cmd::Prepare { config, state_dir, force, min_level } => {
            init_logging("info", false);
            mcpbox::plan::prepare::cli(&config, state_dir, force, min_level.into())
        }
        Cmd::UrlBridge { transport, max_line_bytes } => mcpbox::urlbridge::main(transport, max_line_bytes),
        Cmd::Doctor { state_dir } => mcpbox::cli_doctor::doctor(state_dir),
        Cmd::Run { policy, config, state_dir, name, min_level, enable_audit, memory_merge, command } => {
            // Quiet by default (stderr is the MCP client's log), but a first start that
            // installs an npx/uvx package says so instead of hanging silently.
            init_logging("warn,mcpbox::plan::prepare=info", false);
            mcpbox::cli_run::run(
                mcpbox::cli_run::RunArgs {
                    policy,
                    config,
                    state_dir,
                    name,
                    min_level: min_level.into(),
                    enable_audit,
                    memory_merge,
                    command,
                },
                early,
            )
        }
        Cmd::Policy { cmd: PolicyCmd::Suggest { server, config, state_dir, policy } } => {
            mcpbox::cli_policy::suggest_cli(&server, config.as_deref(), state_dir, policy)
        }
        Cmd::Policy { cmd: PolicyCmd::Learn { policy, out, name, config, server, state_dir, min_level, command } } => {
            init_logging("warn,mcpbox::plan::prepare=info", false);
            mcpbox::cli_learn::learn(mcpbox::cli_learn::LearnArgs {
                policy,
                out,
                name,
                state_dir,
                min_level: min_level.into(),
                config,
                server,
                command,
            })
        }
        Cmd::Policy { cmd: PolicyCmd::Diff { a, b, data, cache, config } } => {
            mcpbox::cli_policy::diff_cli(&a, &b, data.as_deref(), cache.as_deref(), config.as_deref())
        }
        Cmd::Policy { cmd: PolicyCmd::Check { file, config, data, cache, command } } => {
            let checked = mcpbox::plan::StateDir::for_command(config.as_deref(), None, mcpbox::policy::Level::Full)
                .and_then(|state| {
                    mcpbox::plan::check_policy(&state, &file, data.as_deref(), cache.as_deref(), command.as_deref())
                });
            match checked {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("mcpbox: policy check {file}: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

//! `reaper`: the command line. Parses arguments and hands over to [`reaper::app`].
use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use reaper::{
    app::{Pipeline, PipelineConfig},
    config::{Config, ConfigError, Overrides},
    detect::{Explanation, TargetView},
    events, ipc,
    probes::{ProbeOptions, Probes},
    render, service,
    tree::Process,
};

/// `reaper --version`: the release, the commit and the compiler it was built from.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("REAPER_GIT_REVISION"),
    ", rustc ",
    env!("REAPER_RUSTC_VERSION"),
    ")"
);

/// reaper watches every process's life through eBPF and reaps leaked AI-agent children.
#[derive(Parser)]
#[command(name = "reaper", version = VERSION, about, propagate_version = true)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: follow every process, keep the live tree, serve the local interface.
    Run(RunArgs),
    /// Stream process lifecycle events (fork, exec, exit, rename) as they happen.
    Events {
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the running daemon's live process tree.
    Tree {
        /// The daemon's socket.
        #[arg(long, default_value = ipc::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// The tree as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the running daemon's counters (events, losses, corrections, kills) as a table.
    Stats {
        #[arg(long, default_value = ipc::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// The counters as JSON, for machines.
        #[arg(long)]
        json: bool,
    },
    /// List agent sessions: each target (live or ended), its parent daemon, state, live
    /// descendants by kind (stdio server, tool, other), leftovers and RSS.
    Sessions {
        #[arg(long, default_value = ipc::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// The sessions as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Explain why a process is or is not a target, and its verdict.
    Explain {
        pid: u32,
        #[arg(long, default_value = ipc::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Validate a configuration file without running anything.
    CheckConfig { file: PathBuf },
    /// Inspect this host: privileges, BTF, tracepoints, ring buffer and pidfd support.
    /// Exits non-zero when the daemon cannot run here. Also lists the capabilities `reaper run`
    /// keeps once started with this configuration (the built-in default without --config).
    Check {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Write the manual pages or print shell completions (for packagers: `cargo xtask dist`).
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        what: Generate,
    },
}

#[derive(Subcommand)]
enum Generate {
    /// Write reaper.1 and a page per subcommand (reaper-run.1, …) into DIR.
    Man { dir: PathBuf },
    /// Print the completion script for SHELL.
    Completions { shell: clap_complete::Shell },
}

#[derive(Args)]
struct RunArgs {
    /// TOML configuration file: owned by root, not writable by others, not a symlink, in
    /// directories only root can write (or sticky, as /tmp). Without it the built-in default
    /// applies: reap SDK-spawned `claude` children idle for 15 minutes.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Idle time before a target is reaped, e.g. "90s", "15m" (overrides the file).
    #[arg(long, value_parser = humantime::parse_duration)]
    idle_timeout: Option<Duration>,
    /// Time between SIGTERM and SIGKILL (overrides the file).
    #[arg(long, value_parser = humantime::parse_duration)]
    grace: Option<Duration>,
    /// Decide, log and count what would be killed; signal nothing.
    #[arg(long)]
    dry_run: bool,
    /// Address of the metrics endpoint (overrides the file).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// The local interface's socket (root only).
    #[arg(long, default_value = ipc::DEFAULT_SOCKET)]
    socket: PathBuf,
}

/// Exit status: 0, 1 for a failure, [`service::EX_CONFIG`] (78) for a configuration that
/// cannot be used (the unit does not restart on it: a restart would fail the same way).
fn main() -> ExitCode {
    let result = main_result();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            service::print_error(&format!("Error: {err:?}\n"));
            if err.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(service::EX_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn main_result() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    if let Command::Run(args) = cli.command {
        return run(args);
    }
    if !matches!(cli.command, Command::Events { .. }) {
        // Client commands print and exit: a closed pipe (`reaper tree | head`) ends them
        // quietly, like any Unix tool, instead of a write error. The daemon keeps Rust's
        // default (SIGPIPE ignored), so a peer closing a socket cannot kill it.
        // SAFETY: setting a signal disposition to its default before any thread is started.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Run(_) => unreachable!("handled above"),
            Command::Events { json } => stream_events(json).await,
            Command::Tree { socket, json } => {
                let value = ipc::request(&socket, ipc::Request::Tree).await?;
                if json {
                    println!("{}", render::json(&value, true)?);
                } else {
                    let processes: Vec<Process> =
                        serde_json::from_value(value).context("unexpected tree from the daemon")?;
                    let targets: Vec<TargetView> =
                        serde_json::from_value(ipc::request(&socket, ipc::Request::Targets).await?)
                            .unwrap_or_default();
                    print!("{}", render::render_tree(&processes, &targets));
                }
                Ok(())
            }
            Command::Stats { socket, json } => {
                let value = ipc::request(&socket, ipc::Request::Stats).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&value)?);
                } else {
                    print!("{}", render::render_stats(&value));
                }
                Ok(())
            }
            Command::Sessions { socket, json } => {
                let value = ipc::request(&socket, ipc::Request::Sessions).await?;
                if json {
                    println!("{}", render::json(&value, true)?);
                } else {
                    let sessions: Vec<reaper::detect::session::SessionView> =
                        serde_json::from_value(value)
                            .context("unexpected sessions from the daemon")?;
                    print!("{}", render::render_sessions(&sessions));
                }
                Ok(())
            }
            Command::Explain { pid, socket, json } => {
                let value = ipc::request(&socket, ipc::Request::Explain(pid)).await?;
                if json {
                    println!("{}", render::json(&value, true)?);
                } else {
                    let e: Explanation = serde_json::from_value(value)
                        .context("unexpected explanation from the daemon")?;
                    print!("{}", render::render_explanation(&e));
                }
                Ok(())
            }
            Command::Generate { what } => generate(what),
            Command::Check { config } => {
                let config = Config::resolve(config.as_deref(), &Overrides::default())?;
                let mut report = reaper::check::inspect();
                report.items.extend(reaper::check::kept_items(&config));
                print!("{report}");
                if !report.can_run() {
                    anyhow::bail!("reaper cannot run on this host: see the missing items above");
                }
                Ok(())
            }
            Command::CheckConfig { file } => {
                let config = Config::load(&file, &Overrides::default())?;
                println!(
                    "{}: ok — mode {:?}, {} rule(s): {}",
                    file.display(),
                    config.mode,
                    config.rules.len(),
                    config
                        .rules
                        .iter()
                        .map(|r| format!(
                            "{} (idle {})",
                            r.name,
                            humantime::format_duration(r.idle_timeout)
                        ))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                Ok(())
            }
        }
    })
}

/// The man pages and completions are generated from the same definition as the parser, so
/// they cannot drift from it.
fn generate(what: Generate) -> anyhow::Result<()> {
    use clap::CommandFactory as _;
    let mut cmd = Cli::command();
    match what {
        Generate::Man { dir } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(cmd, &dir)
                .with_context(|| format!("writing man pages into {}", dir.display()))?;
        }
        Generate::Completions { shell } => {
            clap_complete::generate(shell, &mut cmd, "reaper", &mut std::io::stdout());
        }
    }
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: under systemd, stderr goes to the journal, where escape
    // codes would clutter `journalctl` and defeat a grep for " WARN ". There, each line also
    // carries its syslog priority (`journalctl -p warning` works).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(service::Stderr {
            journal: service::stderr_is_journal(),
        });
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Blocks (`how` = `SIG_BLOCK`) or unblocks (`SIG_UNBLOCK`) SIGTERM, SIGINT and SIGHUP in the
/// calling thread. rustix has no safe signal-mask call (only the unsafe
/// `runtime::kernel_sigprocmask`, meant for libc-less runtimes), hence libc's.
fn mask_stop_signals(how: libc::c_int) -> std::io::Result<()> {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: `sigemptyset` initialises the set before `sigaddset` and `pthread_sigmask` read
    // it; the old mask is not asked for (null). All three only touch memory passed to them.
    let rc = unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(set.as_mut_ptr(), signal);
        }
        libc::pthread_sigmask(how, set.as_ptr(), std::ptr::null_mut())
    };
    match rc {
        0 => Ok(()),
        err => Err(std::io::Error::from_raw_os_error(err)),
    }
}

/// `reaper run`. Capabilities and no_new_privs belong to each thread, and a thread starts with
/// its creator's: so everything that needs privileges (loading and attaching the probes,
/// binding the metrics port and the local socket) happens first, on the only thread there is;
/// then the privileges are dropped; only then is the runtime, and with it every other thread
/// (tokio's workers and blocking pool), started. Each inherits the reduced set.
fn run(args: RunArgs) -> anyhow::Result<()> {
    // Before any thread starts.
    reaper::heap::one_arena();
    let overrides = Overrides {
        idle_timeout: args.idle_timeout,
        grace: args.grace,
        dry_run: args.dry_run,
        metrics_addr: args.metrics_addr,
    };
    let config = Config::resolve(args.config.as_deref(), &overrides)?;
    tracing::info!(
        origin = %config.origin,
        mode = ?config.mode,
        rules = %config.rules.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(","),
        "configuration loaded"
    );
    let metrics_addr = config.metrics_addr;
    let (mode, rules) = (config.mode, rule_names(&config));
    let config = PipelineConfig::new(config);
    // SIGTERM, SIGINT and SIGHUP wait (blocked, inherited by every thread) until the runtime
    // has its handlers: a supervisor that stops the daemon as soon as its socket exists must
    // get a clean stop, not a death by the default action.
    mask_stop_signals(libc::SIG_BLOCK)?;
    let probes = Pipeline::attach(&config)?;
    let http = reaper::http::bind(metrics_addr)?;
    let server = ipc::Server::bind(&args.socket)?;
    // Loaded, attached and bound: from here on only what running needs.
    // What the mode needs (reaper::privileges::KEPT); a SIGHUP that needs more is refused.
    let dropped = match reaper::privileges::drop_to_kept(&config.config) {
        Ok(dropped) => {
            tracing::info!(
                mode = ?config.config.mode,
                kept = %dropped.describe_kept(),
                not_needed_in_this_mode = %dropped.describe_given_up(),
                "dropped every other capability and set no_new_privs, before starting any other thread"
            );
            dropped
        }
        Err(err) => {
            tracing::warn!(error = %err, "could not drop capabilities; running with more than needed");
            reaper::privileges::Dropped::default()
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let signals = Signals::register()?;
        // Handlers in place (this is the main thread, where block_on runs): deliver what waited.
        mask_stop_signals(libc::SIG_UNBLOCK)?;
        let pipeline = Pipeline::start_attached(config, probes).await?;
        let metrics = pipeline.metrics();
        metrics.configured(mode, &rules.iter().map(String::as_str).collect::<Vec<_>>());
        metrics.reloaded(true);
        let http = tokio::spawn(http.serve(pipeline.metrics(), pipeline.health()));
        tracing::info!(socket = %server.path().display(), "serving the local interface (root only); `reaper tree` shows the live tree");
        let serving = tokio::spawn(server.serve(pipeline.handle()));
        // Probes attached, the tree built from /proc with the events of the scan applied, both
        // endpoints bound: ready (Type=notify).
        service::notify_ready(&ready_status(mode, &rules));
        let watchdog = service::spawn_watchdog(pipeline.health());
        wait_for_signals(signals, &args, &overrides, &pipeline, &dropped).await?;
        service::notify_stopping();
        if let Some(watchdog) = watchdog {
            watchdog.abort();
        }
        tracing::info!("shutting down: detaching probes");
        serving.abort();
        http.abort();
        let _ = serving.await;
        pipeline.shutdown().await;
        tracing::info!("stopped");
        Ok(())
    })
}

/// The daemon's signal handlers, registered before start-up so nothing arriving meanwhile is
/// lost.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn register() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// SIGTERM or SIGINT: return (graceful shutdown). SIGHUP: reload the configuration; a bad new
/// one is refused and the running one stays in force.
async fn wait_for_signals(
    signals: Signals,
    args: &RunArgs,
    overrides: &Overrides,
    pipeline: &Pipeline,
    dropped: &reaper::privileges::Dropped,
) -> anyhow::Result<()> {
    let Signals {
        mut term,
        mut int,
        mut hup,
    } = signals;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => {
                service::notify_reloading();
                let metrics = pipeline.metrics();
                let resolved = Config::resolve(args.config.as_deref(), overrides).map_err(anyhow::Error::from).and_then(|config| {
                    reaper::privileges::reload_allowed(&config, dropped)?;
                    Ok(config)
                });
                match resolved {
                    Ok(config) => {
                        let (mode, rules) = (config.mode, rule_names(&config));
                        pipeline.handle().reload(config).await;
                        metrics.configured(mode, &rules.iter().map(String::as_str).collect::<Vec<_>>());
                        metrics.reloaded(true);
                        service::notify_ready(&ready_status(mode, &rules));
                    }
                    Err(err) => {
                        tracing::error!(
                            error = %format!("{err:#}"),
                            "SIGHUP: refusing the new configuration; the running one stays in force"
                        );
                        metrics.reloaded(false);
                        service::notify_ready("new configuration refused; the previous one stays in force");
                    }
                }
            }
        }
    }
}

fn rule_names(config: &Config) -> Vec<String> {
    config.rules.iter().map(|r| r.name.clone()).collect()
}

/// `systemctl status` shows this.
fn ready_status(mode: reaper::config::Mode, rules: &[String]) -> String {
    format!(
        "following every process; mode {mode:?}, rules {}",
        rules.join(", ")
    )
}

async fn stream_events(json: bool) -> anyhow::Result<()> {
    // Every exec whole: nothing here decides which processes are candidates.
    let options = ProbeOptions {
        full_exec_records: true,
        ..ProbeOptions::default()
    };
    let ring_bytes = options.ring_bytes as usize;
    let mut probes = Probes::attach(options)?;
    let ring = probes.take_ring().expect("ring buffer taken once")?;
    let mut ring = events::ring::Reader::new(ring, ring_bytes)?;
    let metrics = reaper::metrics::Metrics::new();
    eprintln!("following fork/exec/exit/rename; Ctrl-C to stop");
    // Registered once: a signal arriving while events are printed is not lost.
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut stdout = std::io::stdout().lock();
    loop {
        tokio::select! {
            due = ring.due() => {
                let how = due?;
                // A failed write is stdout closed (e.g. piped into head): the end, not an
                // error. A record that cannot be rendered is an error.
                let mut written = Ok(());
                let mut unrendered = None;
                ring.drain(how, |record| {
                    use std::io::Write as _;
                    if written.is_err() || unrendered.is_some() {
                        return;
                    }
                    let Some(event) = events::ring::decode_counted(record, &metrics) else {
                        return;
                    };
                    written = if json {
                        match render::json(&event, false) {
                            Ok(line) => writeln!(stdout, "{line}"),
                            Err(err) => {
                                unrendered = Some(anyhow::Error::from(err));
                                return;
                            }
                        }
                    } else {
                        writeln!(stdout, "{event}")
                    };
                });
                if let Some(err) = unrendered {
                    return Err(err);
                }
                if written.is_err() {
                    return Ok(());
                }
            }
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
        }
    }
    let lost = probes.lost();
    if lost.total() > 0 {
        eprintln!("kernel dropped {} events (ring buffer full)", lost.total());
    }
    Ok(())
}

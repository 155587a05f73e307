//! The `contimg` command line. `main.rs` parses; each subcommand lives in a function here
//! (or a submodule) that returns an exit code.
//!
//! Exit codes: 0 success; 1 failure (verify found a problem, an import was refused, a
//! folder is held by another process, any other error); 2 arguments clap refused.
//! `monitor` has its own codes (see its module).

pub mod audit;
pub mod charts;
pub mod demo;
pub mod logtools;
pub mod monitor;
pub mod mosaic;
pub mod report;
pub mod validate;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use crate::api::{self, AppState, ServerConfig};
use crate::config::Config;
use crate::events::Ledger;
use crate::pipeline::{Pipeline, PipelineConfig};

#[derive(Parser, Debug)]
#[command(
    name = "contimg",
    version,
    about = "DSA-110 continuum imaging: product ledger and pipeline"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "CONTIMG_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Simulate two hours of observing through the real pipeline, with faults, and summarize.
    Demo(demo::DemoArgs),
    /// Own a ledger and serve its HTTP API, run the pipeline, or both (`--mode`).
    Serve(ServeArgs),
    /// Write every event as JSON Lines (EventStoreDB field names).
    Export(logtools::ExportArgs),
    /// Load an export into an empty ledger: same ids, revisions and positions.
    Import(logtools::ImportArgs),
    /// Check a stopped ledger: gapless positions, matching checksums, agreeing indexes.
    Verify(logtools::VerifyArgs),
    /// Show a stopped sled ledger's layout, or put it in another (`--to 1` before going
    /// back to a build from before layout 2).
    LedgerLayout(logtools::LedgerLayoutArgs),
    /// What the ledger knew and when: timelines, status and failed list as of any time.
    Audit(audit::AuditArgs),
    /// The weekly review, rebuilt offline: report.json, report.md, report.html with charts.
    Report(report::ReportArgs),
    /// Watch a running server: status, alerts, retries (the old monitor script's flags).
    Monitor(monitor::MonitorArgs),
    /// Reproject FITS tiles onto one grid and co-add them weighted by B^2/sigma^2.
    Mosaic(mosaic::MosaicArgs),
    /// Pre-deployment checks: config, folders, free space, ledger, port, units, clock.
    Validate(validate::ValidateArgs),
    /// Print the HTTP API's description (OpenAPI 3.1), as `GET /api/openapi.json` serves it.
    Openapi,
}

/// What `serve` runs: the API, the pipeline, or both in one process.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Own the ledger and serve the HTTP API (and the publisher); no ingest.
    Api,
    /// Run ingest and the stages, appending through a running API server (`--url`).
    Stream,
    /// Both in one process, on the ledger this process owns.
    Both,
}

/// The configuration file and the flags that override its folders and address: shared by
/// `serve` and `validate`, so that `validate` checks exactly what `serve` will use.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Layout {
    /// Configuration file (TOML); without one the embedded defaults apply.
    #[arg(long, env = "CONTIMG_CONFIG")]
    pub config: Option<PathBuf>,
    /// Ledger folder (created if missing) [default: ./var].
    #[arg(long, env = "CONTIMG_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The ledger on PostgreSQL (`postgres://USER@HOST/DB`) instead of the sled folder;
    /// several servers may share it.
    #[arg(long, env = "CONTIMG_LEDGER", hide_env_values = true)]
    pub ledger: Option<String>,
    /// Address to listen on; loopback unless you mean otherwise [default: 127.0.0.1:8000].
    #[arg(long, env = "CONTIMG_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Where staged products live (default: DATA_DIR/stage).
    #[arg(long, env = "CONTIMG_STAGE_ROOT")]
    pub stage_root: Option<PathBuf>,
    /// Where published products go (default: DATA_DIR/products).
    #[arg(long, env = "CONTIMG_PRODUCTS_ROOT")]
    pub products_root: Option<PathBuf>,
    /// Where the correlator writes subband files (default: DATA_DIR/incoming).
    #[arg(long, env = "CONTIMG_INCOMING")]
    pub incoming: Option<PathBuf>,
    /// Where Measurement Sets, calibration tables and tiles go (default: DATA_DIR/work).
    #[arg(long, env = "CONTIMG_WORK_ROOT")]
    pub work_root: Option<PathBuf>,
}

impl Layout {
    /// The configuration file (or the defaults) with these flags laid over it.
    pub fn resolve(&self) -> anyhow::Result<Config> {
        let mut c = Config::load_or_default(self.config.as_deref())?;
        self.apply(&mut c);
        Ok(c)
    }

    /// Lays the flags given over a configuration.
    pub fn apply(&self, c: &mut Config) {
        if let Some(d) = &self.data_dir {
            c.data_dir = d.clone();
        }
        if let Some(l) = self.listen {
            c.listen = l;
        }
        if let Some(u) = &self.ledger {
            c.ledger.url = Some(u.clone());
        }
        for (flag, slot) in [
            (&self.stage_root, &mut c.paths.stage_root),
            (&self.products_root, &mut c.paths.products_root),
            (&self.incoming, &mut c.paths.incoming),
            (&self.work_root, &mut c.paths.work_root),
        ] {
            if let Some(p) = flag {
                *slot = Some(p.clone());
            }
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub layout: Layout,
    /// api: the ledger and HTTP API; stream: the pipeline, appending through --url;
    /// both: the two in one process.
    #[arg(long, value_enum, default_value_t = Mode::Both, env = "CONTIMG_MODE")]
    pub mode: Mode,
    /// The API server a `--mode stream` worker appends through.
    #[arg(long, env = "CONTIMG_URL")]
    pub url: Option<String>,
    /// Bearer token required by mutating endpoints (and sent by a stream worker).
    #[arg(long, env = "CONTIMG_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Automatic publish attempts before a product needs an operator [default: 3].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_attempts: Option<u32>,
    /// Waits before automatic retries, in seconds, comma-separated; the last repeats
    /// [default: 60,300,1500].
    #[arg(long, value_delimiter = ',')]
    pub retry_backoff: Option<Vec<f64>>,
    /// Start with the automatic publisher off (manual publishes and retries still work):
    /// for looking around after an incident before anything moves.
    #[arg(long)]
    pub no_auto_publish: bool,
    /// Alert thresholds (JSON, as `contimg monitor --alert-thresholds`) for /api/monitoring/alerts.
    #[arg(long)]
    pub alert_thresholds: Option<PathBuf>,
}

impl ServeArgs {
    /// The configuration file (or the defaults) with the flags laid over it.
    pub fn resolve(&self) -> anyhow::Result<Config> {
        let mut c = self.layout.resolve()?;
        if let Some(u) = &self.url {
            c.url = Some(u.clone());
        }
        if let Some(m) = self.max_attempts {
            c.publish.max_attempts = m;
        }
        if let Some(b) = &self.retry_backoff {
            if b.is_empty()
                || b.iter()
                    .any(|s| !s.is_finite() || *s < 0.0 || *s > 86_400.0 * 7.0)
            {
                anyhow::bail!(
                    "--retry-backoff takes seconds between 0 and 604800, comma-separated"
                );
            }
            c.publish.backoff_s = b.clone();
        }
        if self.no_auto_publish {
            c.publish.auto_publish = false;
        }
        c.check()?;
        Ok(c)
    }

    pub fn server_config(&self, c: &Config) -> anyhow::Result<ServerConfig> {
        let mut s = server_config(c);
        s.token = self.token.clone();
        if let Some(f) = &self.alert_thresholds {
            s.thresholds = monitor::read_thresholds(f)?;
        }
        Ok(s)
    }
}

/// The server's settings from a configuration.
pub fn server_config(c: &Config) -> ServerConfig {
    let mut s = ServerConfig::under(&c.data_dir);
    s.publish.stage_root = c.stage_root();
    s.publish.products_root = c.products_root();
    s.publish.max_attempts = c.publish.max_attempts;
    s.publish.backoff = crate::config::Backoff::from_secs(&c.publish.backoff_s);
    s.publish.timeout = Duration::from_secs_f64(c.publish.timeout_s);
    s.publish.stuck_publishing_min = c.publish.stuck_publishing_min;
    s.auto_publish = c.publish.auto_publish;
    s.subbands = c.ingest.subbands;
    let h = &c.server;
    s.http = crate::api::HttpLimits {
        header_timeout: Duration::from_secs_f64(h.header_timeout_s),
        body_timeout: Duration::from_secs_f64(h.body_timeout_s),
        max_connections: h.max_connections,
        shutdown_deadline: Duration::from_secs_f64(h.shutdown_deadline_s),
        write_timeout: Duration::from_secs_f64(h.write_timeout_s),
        max_as_of_replays: h.max_as_of_replays,
        allowed_hosts: h.allowed_hosts.clone(),
    };
    s
}

/// Parses nothing: runs a parsed command and maps its outcome to an exit code.
pub fn run(cli: Cli) -> ExitCode {
    // A command that only writes to standard output ends quietly when the reader goes
    // away (`contimg audit ... | head`), as Unix tools do, instead of panicking in
    // `println!`. Not the servers: a client closing its socket must not kill them.
    if !matches!(cli.command, Command::Serve(_) | Command::Demo(_)) {
        // SAFETY: restores the default disposition of one signal before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    if matches!(
        cli.command,
        Command::Audit(_) | Command::Report(_) | Command::Export(_) | Command::Verify(_)
    ) {
        crate::memory::keep_freed_until_exit();
    }
    // The demo prints its own summary; its info lines would drown it.
    let quiet = matches!(cli.command, Command::Demo(_));
    init_tracing(cli.log_format, if quiet { "warn" } else { "info" });
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Demo(args) => demo::run(args),
        Command::Export(args) => logtools::export(args),
        Command::Import(args) => logtools::import(args),
        Command::Verify(args) => logtools::verify(args),
        Command::LedgerLayout(args) => logtools::ledger_layout(args),
        Command::Monitor(args) => return monitor::run(args),
        Command::Validate(args) => return validate::run(args),
        Command::Audit(args) => audit::run(args),
        Command::Report(args) => report::run(args),
        Command::Mosaic(args) => mosaic::run(args),
        Command::Openapi => {
            use std::io::Write;
            std::io::stdout()
                .write_all(crate::api::openapi::spec_json().as_bytes())
                .map(|()| ExitCode::SUCCESS)
                .map_err(anyhow::Error::from)
        }
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            if is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            eprintln!("contimg: {err:#}");
            ExitCode::from(1)
        }
    }
}

/// A command line clap refused. `monitor --json` promises one JSON document on standard
/// output whatever happens, so it gets one here too; exit code 2 either way.
pub fn usage_error(e: clap::Error) -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let monitor_json = args.iter().any(|a| a == "monitor") && args.iter().any(|a| a == "--json");
    if monitor_json && e.use_stderr() {
        let reason = e.to_string();
        let first = reason
            .lines()
            .next()
            .unwrap_or("bad arguments")
            .trim_start_matches("error: ");
        println!("{}", serde_json::json!({"error": first, "exit_code": 2}));
        return ExitCode::from(2);
    }
    let _ = e.print();
    ExitCode::from(if e.use_stderr() { 2 } else { 0 })
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn init_tracing(format: LogFormat, default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("CONTIMG_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    let config = args.resolve()?;
    // Work still running on blocking threads after the server stopped (a publish whose
    // hashing is stuck in a slow read) must not keep the process alive past the deadline;
    // recovery settles it at the next start.
    let deadline = Duration::from_secs_f64(config.server.shutdown_deadline_s);
    let result = serve_on(&rt, args, config);
    // By now the server has stopped within its deadline and closed the store; what is
    // left is blocking work already told to stop between chunks.
    rt.shutdown_timeout(deadline.min(Duration::from_secs(1)));
    result
}

fn serve_on(
    rt: &tokio::runtime::Runtime,
    args: ServeArgs,
    config: crate::config::Config,
) -> anyhow::Result<ExitCode> {
    if args.mode == Mode::Stream {
        return rt.block_on(serve_stream(config, args.token.clone()));
    }
    let server = args.server_config(&config)?;
    let mode = args.mode;
    rt.block_on(async move {
        let data_dir = config.ledger_dir();
        let store = logtools::open_store(
            config.ledger.url.as_deref(),
            &data_dir,
            true,
            config.ledger.cache_bytes(),
        )?;
        store.set_reserve_bytes(config.ledger.reserve_bytes());
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("listening on {}", config.listen))?;
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() && server.token.as_deref().is_none_or(str::is_empty) {
            tracing::warn!(
                %addr,
                "listening beyond loopback without a token: anyone who can reach this \
                 address can register, publish and retry; set CONTIMG_API_TOKEN"
            );
        }
        let mut signal = Box::pin(shutdown_signal());
        let events = store.event_count();
        // Settling publishes a crash cut short may read large files; a stop asked for
        // meanwhile ends the start-up (what is left is settled at the next start).
        let state = tokio::select! {
            state = AppState::open(store.clone(), server) => state?,
            _ = &mut signal => {
                tracing::warn!("stopped during start-up; publishes not yet settled are settled at the next start");
                let s = store.clone();
                tokio::task::spawn_blocking(move || s.close()).await?;
                return Ok(ExitCode::SUCCESS);
            }
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        // The worker folds the whole log before it runs: the API serves meanwhile. A
        // worker that cannot start stops the server, as a failed start would.
        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<anyhow::Error>();
        let pipeline = (mode == Mode::Both).then(|| {
            let parked = state.pipeline_parked.clone();
            let cfg = PipelineConfig::from_config(&config);
            tokio::spawn(async move {
                match Pipeline::open(Ledger::Local(store), cfg).await {
                    Ok(p) => {
                        drop(failed_tx);
                        let _ = parked.set(p.parked_counter());
                        p.run(stop_rx).await
                    }
                    Err(e) => {
                        let _ = failed_tx.send(e);
                    }
                }
            })
        });
        let failure = std::sync::Arc::new(std::sync::Mutex::new(None));
        // The pipeline stops (and its last appends are answered) before the server
        // closes the store.
        let stop = {
            let failure = failure.clone();
            async move {
                tokio::select! {
                    _ = signal => {}
                    Ok(e) = failed_rx => {
                        tracing::error!(error = %format!("{e:#}"), "the pipeline worker did not start; stopping");
                        *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    }
                }
                let _ = stop_tx.send(true);
                if let Some(p) = pipeline {
                    let _ = p.await;
                }
            }
        };
        // One machine-readable line for scripts and tests that listen on port 0, written
        // once recovery is done and the signals are watched.
        println!("contimg: listening on http://{addr}");
        tracing::info!(
            %addr,
            data_dir = %data_dir.display(),
            mode = ?mode,
            events,
            "contimg serving"
        );
        api::run(listener, state, stop).await?;
        if let Some(e) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(e.context("starting the pipeline worker"));
        }
        tracing::info!("stopped; every taken append was answered");
        Ok(ExitCode::SUCCESS)
    })
}

/// `serve --mode stream`: the pipeline in a process of its own, appending through a
/// running API server (a ledger has exactly one owner).
async fn serve_stream(config: Config, token: Option<String>) -> anyhow::Result<ExitCode> {
    let url = config
        .url
        .clone()
        .context("--mode stream needs the API server's --url (or url in the configuration)")?;
    let ledger = Ledger::Remote(crate::events::ledger::RemoteLedger::new(&url, token)?);
    let signal = shutdown_signal();
    let pipeline = Pipeline::open(ledger, PipelineConfig::from_config(&config))
        .await
        .with_context(|| format!("reading the ledger through {url}"))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(pipeline.run(stop_rx));
    println!(
        "contimg: stream worker watching {} through {url}",
        config.incoming().display()
    );
    signal.await;
    let _ = stop_tx.send(true);
    let _ = task.await;
    tracing::info!("stream worker stopped");
    Ok(ExitCode::SUCCESS)
}

/// Completes on SIGINT or SIGTERM. Signal handling stays in the binary's layer.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    // Registered now, not at the first poll: a signal that arrives before the future is
    // awaited is still caught (and no longer kills the process outright).
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            (term, int) => {
                tracing::warn!(
                    term = term.is_ok(),
                    int = int.is_ok(),
                    "cannot watch SIGTERM and SIGINT; falling back to Ctrl-C"
                );
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        tracing::info!("shutting down");
    }
}

//! The `contimg` command line. `main.rs` parses; each subcommand lives in a function here
//! (or a submodule) that returns an exit code.
//!
//! Exit codes: 0 success; 1 failure (verify found a problem, an import was refused, a
//! folder is held by another process, any other error); 2 arguments clap refused.
//! `monitor` has its own codes (see its module).

pub mod audit;
pub mod logtools;
pub mod monitor;
pub mod mosaic;
pub mod report;
pub mod validate;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use crate::api::{self, AppState, ServerConfig};
use crate::events::Store;

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
    /// Own a ledger and serve its HTTP API.
    Serve(ServeArgs),
    /// Write every event as JSON Lines (EventStoreDB field names).
    Export(logtools::ExportArgs),
    /// Load an export into an empty ledger: same ids, revisions and positions.
    Import(logtools::ImportArgs),
    /// Check a stopped ledger: gapless positions, matching checksums, agreeing indexes.
    Verify(logtools::VerifyArgs),
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
}

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Ledger folder (created if missing).
    #[arg(long, default_value = "./var", env = "CONTIMG_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Address to listen on; loopback unless you mean otherwise.
    #[arg(long, default_value = "127.0.0.1:8000", env = "CONTIMG_LISTEN")]
    pub listen: SocketAddr,
    /// Bearer token required by mutating endpoints.
    #[arg(long, env = "CONTIMG_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Where staged products live (default: DATA_DIR/stage).
    #[arg(long, env = "CONTIMG_STAGE_ROOT")]
    pub stage_root: Option<PathBuf>,
    /// Where published products go (default: DATA_DIR/products).
    #[arg(long, env = "CONTIMG_PRODUCTS_ROOT")]
    pub products_root: Option<PathBuf>,
    /// Automatic publish attempts before a product needs an operator.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_attempts: u32,
    /// Waits before automatic retries, in seconds, comma-separated; the last repeats.
    #[arg(long, default_value = "60,300,1500", value_delimiter = ',')]
    pub retry_backoff: Vec<f64>,
    /// Start with the automatic publisher off (manual publishes and retries still work):
    /// for looking around after an incident before anything moves.
    #[arg(long)]
    pub no_auto_publish: bool,
    /// Alert thresholds (JSON, as `contimg monitor --alert-thresholds`) for /api/monitoring/alerts.
    #[arg(long)]
    pub alert_thresholds: Option<PathBuf>,
}

impl ServeArgs {
    pub fn server_config(&self) -> anyhow::Result<ServerConfig> {
        let mut c = ServerConfig::under(&self.data_dir);
        c.token = self.token.clone();
        if let Some(p) = &self.stage_root {
            c.publish.stage_root = p.clone();
        }
        if let Some(p) = &self.products_root {
            c.publish.products_root = p.clone();
        }
        c.publish.max_attempts = self.max_attempts;
        c.auto_publish = !self.no_auto_publish;
        if self.retry_backoff.is_empty()
            || self
                .retry_backoff
                .iter()
                .any(|s| !s.is_finite() || *s < 0.0 || *s > 86_400.0 * 7.0)
        {
            anyhow::bail!("--retry-backoff takes seconds between 0 and 604800, comma-separated");
        }
        c.publish.backoff = self
            .retry_backoff
            .iter()
            .map(|s| std::time::Duration::from_secs_f64(*s))
            .collect();
        if let Some(f) = &self.alert_thresholds {
            c.thresholds = monitor::read_thresholds(f)?;
        }
        Ok(c)
    }
}

/// Parses nothing: runs a parsed command and maps its outcome to an exit code.
pub fn run(cli: Cli) -> ExitCode {
    init_tracing(cli.log_format);
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Export(args) => logtools::export(args),
        Command::Import(args) => logtools::import(args),
        Command::Verify(args) => logtools::verify(args),
        Command::Monitor(args) => return monitor::run(args),
        Command::Validate(args) => return validate::run(args),
        Command::Audit(args) => audit::run(args),
        Command::Report(args) => report::run(args),
        Command::Mosaic(args) => mosaic::run(args),
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

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("CONTIMG_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
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
    let config = args.server_config()?;
    rt.block_on(async move {
        let store = Store::open(&args.data_dir)
            .with_context(|| format!("opening ledger at {}", args.data_dir.display()))?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let addr = listener.local_addr()?;
        let stop = shutdown_signal();
        let events = store.event_count();
        let state = AppState::open(store, config).await?;
        // One machine-readable line for scripts and tests that listen on port 0, written
        // once recovery is done and the signals are watched.
        println!("contimg: listening on http://{addr}");
        tracing::info!(
            %addr,
            data_dir = %args.data_dir.display(),
            events,
            "contimg serving"
        );
        api::run(listener, state, stop).await?;
        tracing::info!("stopped; every taken append was answered");
        Ok(ExitCode::SUCCESS)
    })
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

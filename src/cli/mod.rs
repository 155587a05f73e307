//! The `contimg` command line. `main.rs` parses; each subcommand lives in a function here
//! (or a submodule) that returns an exit code.
//!
//! Exit codes: 0 success; 1 the command ran and found a fault (verify found a problem, an
//! import was refused); 2 bad arguments or an unreachable server.

pub mod logtools;
pub mod mosaic;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use crate::api::{self, AppState};
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
    /// Reproject FITS tiles onto one grid and co-add them weighted by B^2/sigma^2.
    Mosaic(mosaic::MosaicArgs),
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
}

/// Parses nothing: runs a parsed command and maps its outcome to an exit code.
pub fn run(cli: Cli) -> ExitCode {
    init_tracing(cli.log_format);
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Export(args) => logtools::export(args),
        Command::Import(args) => logtools::import(args),
        Command::Verify(args) => logtools::verify(args),
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
    rt.block_on(async move {
        let store = Store::open(&args.data_dir)
            .with_context(|| format!("opening ledger at {}", args.data_dir.display()))?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        tracing::info!(
            addr = %listener.local_addr()?,
            data_dir = %args.data_dir.display(),
            events = store.event_count(),
            "contimg serving"
        );
        let state = AppState::new(store, args.token);
        api::run(listener, state, shutdown_signal()).await?;
        tracing::info!("stopped; every taken append was answered");
        Ok(ExitCode::SUCCESS)
    })
}

/// Completes on SIGINT or SIGTERM. Signal handling stays in the binary's layer.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the server");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

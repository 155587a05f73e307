//! `export`, `import` and `verify`: the tools that work on the log itself.

use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};

use crate::events::jsonl::WireEvent;
use crate::events::ledger::RemoteLedger;
use crate::events::shape::{Empty, LogShape};
use crate::events::{Direction, Ledger, RecordedEvent, Store};

#[derive(clap::Args, Debug)]
#[command(group = clap::ArgGroup::new("source").args(["data_dir", "ledger", "url"]))]
pub struct ExportArgs {
    /// A ledger folder no server holds.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// A PostgreSQL ledger (`postgres://USER@HOST/DB`), read directly; `CONTIMG_LEDGER`
    /// when no other source is given.
    #[arg(long)]
    pub ledger: Option<String>,
    /// A running server, read page by page over /api/events.
    #[arg(long)]
    pub url: Option<String>,
    /// Bearer token for --url.
    #[arg(long, env = "CONTIMG_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Output file; standard output when absent.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// An empty (or new) ledger folder.
    #[arg(long, conflicts_with = "ledger")]
    pub data_dir: Option<PathBuf>,
    /// An empty PostgreSQL ledger (`postgres://USER@HOST/DB`; an empty database gets the
    /// ledger's tables); `CONTIMG_LEDGER` when neither is given.
    #[arg(long)]
    pub ledger: Option<String>,
    /// A JSON Lines export.
    pub file: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// The ledger folder (no server may hold it) [default: ./var].
    #[arg(long, conflicts_with = "ledger")]
    pub data_dir: Option<PathBuf>,
    /// A PostgreSQL ledger instead (`postgres://USER@HOST/DB`); servers may keep running.
    /// `CONTIMG_LEDGER` when neither is given.
    #[arg(long)]
    pub ledger: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct LedgerLayoutArgs {
    /// The ledger as `serve` would open it: from the configuration and the flags and
    /// environment that override it. A ledger on PostgreSQL has no sled layout to change.
    #[command(flatten)]
    pub layout: super::Layout,
    /// Put the ledger in this layout: 1 for a contimg from before layout 2, 2 for one
    /// from before layout 3, 3 for one from before layout 4, 4 for one from before
    /// layout 5, 5 for this one (what `serve` and `import` do). Going back, it drops the
    /// id index of long streams (layout 4 keeps one without runs, so from 4 to 4 it stays;
    /// older layouts keep none), and writes what the older layout keeps and this one does
    /// not: for 2 and 1 the id index of every stream, for 1 a head key per stream. Do it
    /// before putting such a binary back. Without it, only print the layout.
    /// A folder with no ledger yet has nothing to change.
    #[arg(long)]
    pub to: Option<u32>,
    /// Print the layout this contimg reads and writes, and nothing else (for scripts).
    #[arg(long, conflicts_with = "to")]
    pub writes: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `contimg ledger-layout`: what [`crate::events::store::sled::to_layout`] found and did.
pub fn ledger_layout(args: LedgerLayoutArgs) -> anyhow::Result<ExitCode> {
    use crate::events::store::sled::{LAYOUT, to_layout};
    if args.writes {
        println!("{LAYOUT}");
        return Ok(ExitCode::SUCCESS);
    }
    let config = args.layout.resolve()?;
    if config.ledger.url.is_some() {
        println!("the ledger is on PostgreSQL: it has no sled layout to change");
        return Ok(ExitCode::SUCCESS);
    }
    let dir = config.ledger_dir();
    let change =
        to_layout(&dir, args.to).with_context(|| format!("ledger at {}", dir.display()))?;
    let Some(change) = change else {
        if args.to.is_some() {
            println!("{} holds no ledger yet: nothing to change", dir.display());
            return Ok(ExitCode::SUCCESS);
        }
        bail!("{} holds no sled ledger", dir.display());
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&change)?);
    } else if args.to.is_none() {
        println!("layout {} (this contimg writes {LAYOUT})", change.from);
    } else {
        let mut written = Vec::new();
        if change.ids_dropped > 0 {
            println!(
                "dropped the {} id index keys and runs of long streams",
                change.ids_dropped
            );
        }
        if change.ids_written > 0 {
            written.push(format!("{} id index keys", change.ids_written));
        }
        if change.to == 1 {
            written.push(format!("{} stream head keys", change.heads_written));
        }
        match written.is_empty() {
            true => println!("layout {} -> {}", change.from, change.to),
            false => println!(
                "layout {} -> {} ({} written)",
                change.from,
                change.to,
                written.join(", ")
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A progress bar on a terminal, nothing otherwise.
pub fn progress(len: Option<u64>, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match len {
        Some(n) => ProgressBar::new(n).with_style(
            ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} ({per_sec}, {eta})")
                .expect("template"),
        ),
        None => ProgressBar::new_spinner(),
    };
    bar.set_message(what.to_string());
    bar
}

/// The PostgreSQL ledger a tool reads: `--ledger`, else `CONTIMG_LEDGER` when no other
/// source was named on the command line (an explicit `--data-dir`, `--export` or `--url`
/// wins over the environment, so a shell that loads the servers' variables can still
/// point a tool elsewhere).
pub fn ledger_url(flag: Option<String>, other_source_given: bool) -> Option<String> {
    flag.or_else(|| {
        (!other_source_given)
            .then(|| std::env::var("CONTIMG_LEDGER").ok())
            .flatten()
            .filter(|u| !u.is_empty())
    })
}

/// Opens a ledger this process reads and writes directly: the PostgreSQL database at
/// `ledger`, or else the sled folder `data_dir` with a page cache of `cache_bytes`.
/// Without `create`, an empty PostgreSQL database or a missing folder is an error, and a
/// sled ledger in an older layout is left in it (`Store::open_to_read`): the read-only
/// tools make and change nothing.
pub fn open_store(
    ledger: Option<&str>,
    data_dir: &Path,
    create: bool,
    cache_bytes: u64,
) -> anyhow::Result<Store> {
    match ledger {
        Some(url) if create => {
            Store::connect(url, data_dir).context("opening the PostgreSQL ledger")
        }
        Some(url) => {
            Store::connect_existing(url, data_dir).context("opening the PostgreSQL ledger")
        }
        None => {
            if !create && !data_dir.join(crate::events::store::LOG_DIR).exists() {
                bail!(
                    "no ledger at {} (expected a folder made by contimg serve)",
                    data_dir.display()
                );
            }
            let opened = if create {
                Store::open_cached(data_dir, cache_bytes)
            } else {
                Store::open_to_read(data_dir, cache_bytes)
            };
            opened.with_context(|| format!("opening ledger at {}", data_dir.display()))
        }
    }
}

/// Opens the ledger behind `--ledger`, `--data-dir` or `--url`, `./var` when none is given.
pub fn open_source(
    data_dir: Option<PathBuf>,
    ledger: Option<String>,
    url: Option<String>,
    token: Option<String>,
) -> anyhow::Result<Ledger> {
    if let Some(url) = url {
        return Ok(Ledger::Remote(RemoteLedger::new(&url, token)?));
    }
    let dir = data_dir.unwrap_or_else(|| PathBuf::from("./var"));
    Ok(Ledger::Local(open_store(
        ledger.as_deref(),
        &dir,
        false,
        crate::events::store::SCAN_CACHE_BYTES,
    )?))
}

pub fn export(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let given = args.data_dir.is_some() || args.url.is_some();
    let ledger = open_source(
        args.data_dir,
        ledger_url(args.ledger, given),
        args.url,
        args.token,
    )?;
    let out: Box<dyn Write> = match &args.out {
        Some(p) => Box::new(File::create(p).with_context(|| format!("creating {}", p.display()))?),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut out = BufWriter::with_capacity(1 << 20, out);
    let rt = super::runtime()?;
    let total = match &ledger {
        Ledger::Local(s) => Some(s.event_count()),
        Ledger::Remote(_) => None,
    };
    let bar = progress(total, "exporting");
    let mut from = Some(0);
    let mut n = 0u64;
    while let Some(f) = from {
        let (events, next) = rt.block_on(ledger.read_all(Some(f), Direction::Forward, 4096))?;
        for e in &events {
            serde_json::to_writer(&mut out, &WireEvent::from(e))?;
            out.write_all(b"\n")?;
        }
        n += events.len() as u64;
        bar.set_position(n);
        from = next;
    }
    out.flush()?;
    bar.finish_and_clear();
    if let Ledger::Local(s) = &ledger {
        s.close();
    }
    if args.out.is_some() {
        eprintln!("exported {n} events");
    }
    Ok(ExitCode::SUCCESS)
}

fn read_export(
    path: &std::path::Path,
    mut f: impl FnMut(usize, RecordedEvent) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    for item in crate::events::jsonl::read_export(path)? {
        let (line, record) = item?;
        f(line, record)?;
    }
    Ok(())
}

pub fn import(args: ImportArgs) -> anyhow::Result<ExitCode> {
    // First pass: the whole file must be a well-formed log before anything is written,
    // so that a bad line never leaves a half-imported ledger behind.
    let mut shape = LogShape::from_start(true);
    read_export(&args.file, |line, r| {
        crate::events::record::validate_stream_name(&r.stream_id)
            .map_err(|e| anyhow::anyhow!("line {line}: {e}"))?;
        shape
            .check(&r, &mut Empty)?
            .map_err(|e| anyhow::anyhow!("line {line}: {e}"))?;
        Ok(())
    })?;
    let next = shape.next_position();
    drop(shape);

    let ledger = ledger_url(args.ledger.clone(), args.data_dir.is_some());
    let Some(dir) = args
        .data_dir
        .clone()
        .or(ledger.as_ref().map(|_| PathBuf::from(".")))
    else {
        bail!("give --data-dir DIR or --ledger postgres://...");
    };
    let store = open_store(
        ledger.as_deref(),
        &dir,
        true,
        crate::events::store::DEFAULT_CACHE_BYTES,
    )?;
    if store.event_count() != 0 {
        bail!(
            "ledger at {} already holds {} events; import only into an empty ledger",
            store.describe(),
            store.event_count()
        );
    }
    let bar = progress(Some(next), "importing");
    let mut batch = Vec::with_capacity(1000);
    read_export(&args.file, |_, r| {
        batch.push(r);
        if batch.len() >= 1000 {
            store.import_blocking(std::mem::take(&mut batch))?;
            bar.set_position(store.event_count());
        }
        Ok(())
    })?;
    if !batch.is_empty() {
        store.import_blocking(batch)?;
    }
    bar.finish_and_clear();
    let n = store.event_count();
    store.close();
    eprintln!("imported {n} events into {}", store.describe());
    Ok(ExitCode::SUCCESS)
}

pub fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let ledger = ledger_url(args.ledger.clone(), args.data_dir.is_some());
    let dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("./var"));
    let store = open_store(
        ledger.as_deref(),
        &dir,
        false,
        // verify looks up both indexes for every event, in no order: not a scan.
        crate::events::store::DEFAULT_CACHE_BYTES,
    )?;
    let bar = progress(Some(store.event_count()), "verifying");
    let report = crate::events::verify::verify(&store, |n| bar.set_position(n))
        .with_context(|| format!("reading ledger at {}", store.describe()))?;
    bar.finish_and_clear();
    store.close();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if report.ok() {
        println!(
            "ok: {} events in {} streams; positions gapless, checksums match, indexes agree",
            report.events, report.streams
        );
    } else {
        match report.first_bad_position() {
            Some(p) => println!("FAILED: first bad position {p}"),
            None => println!("FAILED"),
        }
        for p in &report.problems {
            match p.position {
                Some(pos) => println!("  position {pos}: {}", p.message),
                None => println!("  {}", p.message),
            }
        }
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

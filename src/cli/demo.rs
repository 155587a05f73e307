//! `contimg demo`: a stretch of observing, simulated through the real path. Subband files
//! are written into an incoming folder in accelerated time; ingest, the simulated stages,
//! the five safeguards, the real mosaicker, staging and the publisher do the rest on a
//! ledger of its own, with the HTTP API up the whole time. A few faults are injected so
//! every monitoring view has something to show:
//! - a corrupt subband file (refused; its observation times out with 15 subbands);
//! - a calibration table removed after calibration (the mosaic group over that tile is
//!   refused by the calibration-tables safeguard);
//! - the products' `mosaics` folder blocked by a file, so the first mosaic's publish fails,
//!   and unblocked once the failure is recorded (the automatic retry publishes it).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Timelike, Utc};
use serde::Serialize;

use super::{runtime, server_config, shutdown_signal};
use crate::api::{self, AppState};
use crate::config::Config;
use crate::events::{Ledger, Store};
use crate::pipeline::ingest::NAME_TIME;
use crate::pipeline::state::{PipelineState, Stage};
use crate::pipeline::worker::{mosaic_product, next_window};
use crate::pipeline::{Pipeline, PipelineConfig, sim};
use crate::projections::alerts::{self, Alert};
use crate::projections::status::{PublishStatus, alert_inputs, publish_status};

/// A file in the demo folder that says it is one (and may be replaced).
const MARKER: &str = ".contimg-demo";

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Folder for the ledger, incoming files, work, stage and products; replaced when it
    /// holds an earlier demo, refused when it holds anything else.
    #[arg(long, default_value = "./contimg-demo")]
    pub dir: PathBuf,
    /// Observations (5-minute tiles) to simulate: 24 is two hours.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u32).range(1..=2000))]
    pub tiles: u32,
    /// Pixels per side of a tile (4800 for DSA-110's real size).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(16..=8192))]
    pub tile_size: u32,
    /// Wall-clock milliseconds between observations (5 minutes of sky each).
    #[arg(long, default_value_t = 250)]
    pub cadence_ms: u64,
    /// Bytes per simulated subband file.
    #[arg(long, default_value_t = 64 * 1024)]
    pub subband_bytes: usize,
    /// Pointing declination, degrees.
    #[arg(long, default_value_t = 71.6, allow_negative_numbers = true)]
    pub dec: f64,
    /// Leave out the injected faults.
    #[arg(long)]
    pub no_faults: bool,
    /// Where the API listens during the demo (and after, with --serve).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Keep the API up after the summary, until Ctrl-C.
    #[arg(long)]
    pub serve: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Give up when the pipeline has not settled within this many seconds.
    #[arg(long, default_value_t = 600)]
    pub deadline_s: u64,
}

/// What the demo did, from the ledger's own projections.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub seconds: f64,
    pub api: String,
    pub folders: Folders,
    pub files_accepted: usize,
    pub files_rejected: Vec<Rejected>,
    pub groups_formed: usize,
    pub groups_timed_out: u64,
    pub tiles_imaged: usize,
    pub stage_failures: u32,
    pub mosaics_created: usize,
    pub mosaics_refused: Vec<RefusedMosaic>,
    pub mosaics_published: usize,
    pub products_published: u64,
    pub publish_failures_healed: u64,
    pub status: PublishStatus,
    pub alerts: Vec<Alert>,
    pub ledger_events: u64,
}

#[derive(Debug, Serialize)]
pub struct Folders {
    pub root: PathBuf,
    pub ledger: PathBuf,
    pub incoming: PathBuf,
    pub work: PathBuf,
    pub stage: PathBuf,
    pub products: PathBuf,
}

#[derive(Debug, Serialize)]
pub struct Rejected {
    pub file: String,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct RefusedMosaic {
    pub mosaic_id: String,
    pub safeguard: String,
}

/// The demo's configuration: the defaults, with accelerated time.
pub fn demo_config(args: &DemoArgs, root: &Path) -> Config {
    let mut c = Config::under_root(root);
    c.ingest.poll_interval_s = 0.05;
    c.ingest.stable_s = 0.15;
    // An incomplete observation is given up after about six observations' worth of time.
    c.ingest.group_timeout_s = (args.cadence_ms as f64 * 6.0 / 1000.0).max(1.0);
    // The demo's stages are the simulator's, said outright (its products say so).
    c.stages.runner = Some(crate::config::RunnerKind::Simulate);
    c.stages.backoff_s = vec![0.5];
    c.stages.simulate.tile_size = args.tile_size as usize;
    c.publish.backoff_s = vec![1.0];
    c
}

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    prepare(&args.dir)?;
    let root = args
        .dir
        .canonicalize()
        .with_context(|| format!("resolving {}", args.dir.display()))?;
    let config = demo_config(&args, &root);
    config.check()?;
    runtime()?.block_on(demo(args, root, config))
}

/// Makes an empty demo folder, replacing an earlier demo's.
fn prepare(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        let empty = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .next()
            .is_none();
        if !empty {
            anyhow::ensure!(
                dir.join(MARKER).exists(),
                "{} exists and is not an earlier demo; choose another --dir",
                dir.display()
            );
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("removing the earlier demo in {}", dir.display()))?;
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(
        dir.join(MARKER),
        b"contimg demo folder; `contimg demo` may replace it\n",
    )?;
    Ok(())
}

async fn demo(args: DemoArgs, root: PathBuf, config: Config) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let store = Store::open(config.ledger_dir())?;
    store.set_reserve_bytes(config.ledger.reserve_bytes());
    let products = config.products_root();
    std::fs::create_dir_all(&products)?;
    let blocker = products.join("mosaics");
    if !args.no_faults {
        // The publish fault: a file where the mosaics folder goes.
        std::fs::write(
            &blocker,
            b"in the way of the mosaics folder (contimg demo fault)\n",
        )?;
    }
    let state = AppState::open(store.clone(), server_config(&config)).await?;
    let projections = state.projections.clone();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let api_url = format!("http://{addr}");
    let pipeline = Pipeline::open(
        Ledger::Local(store.clone()),
        PipelineConfig {
            default_dec: args.dec,
            ..PipelineConfig::from_config(&config)
        },
    )
    .await?;
    let _ = state.pipeline_parked.set(pipeline.parked_counter());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(pipeline.clone().run(stop_rx));
    let (server_stop_tx, server_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(api::run(listener, state, async move {
        let _ = server_stop_rx.await;
    }));
    if !args.json {
        eprintln!(
            "contimg demo: API on {api_url}, files under {}",
            root.display()
        );
    }

    // The correlator: 16 subbands per observation, in accelerated time.
    let start = observing_start(Utc::now(), args.tiles);
    let obs_times: Vec<String> = (0..args.tiles)
        .map(|i| {
            (start + chrono::Duration::minutes(5 * i as i64))
                .format(NAME_TIME)
                .to_string()
        })
        .collect();
    let corrupt = (!args.no_faults && args.tiles >= 3)
        .then(|| args.tiles as usize - 4.min(args.tiles as usize - 1));
    let writer = {
        let incoming = config.incoming();
        let times = obs_times.clone();
        let (dec, size, cadence) = (args.dec, args.subband_bytes, args.cadence_ms);
        tokio::task::spawn_blocking(move || {
            write_observations(&incoming, &times, dec, size, cadence, corrupt)
        })
    };

    // The calibration fault: the gain table of a tile inside the second mosaic window.
    let cal_fault = (!args.no_faults && args.tiles >= 18).then(|| obs_times[12].clone());
    let deadline = started + Duration::from_secs(args.deadline_s);
    let mut writer = Some(writer);
    let mut healed = 0u64;
    let mut cal_done = cal_fault.is_none();
    loop {
        if let Some(w) = &writer
            && w.is_finished()
        {
            writer.take().expect("present").await??;
        }
        // One look at the worker's state per round (it is not copied).
        let writing = writer.is_some();
        let (cal_tables, mosaics, done) = pipeline
            .read(|s| {
                // The group is keyed by its first file's name time, up to 2 s past the
                // nominal one.
                let cal_tables = cal_fault
                    .as_ref()
                    .filter(|_| !cal_done)
                    .and_then(|obs| {
                        s.groups
                            .range(obs.clone()..)
                            .next()
                            .filter(|(_, g)| g.obs_time[..16] == obs[..16])
                    })
                    .filter(|(_, g)| g.stage(Stage::Calibrate).completed.is_some())
                    .map(|(_, g)| g.outputs(Stage::Calibrate).to_vec());
                let mosaics: Vec<String> = s.mosaics.values().map(|m| m.id.clone()).collect();
                let done = !writing && settled(s, &config, &projections, obs_times.len());
                (cal_tables, mosaics, done)
            })
            .await;
        if let Some(tables) = cal_tables {
            for t in tables.iter().filter(|t| t.ends_with(".G")) {
                let _ = std::fs::remove_file(Path::new(t).join("table.dat"));
            }
            cal_done = true;
        }
        if blocker.is_file() {
            let failed_once = projections.read(|m| {
                mosaics.iter().any(|id| {
                    m.product(&mosaic_product(id))
                        .is_some_and(|p| p.is_failed())
                })
            });
            if failed_once {
                std::fs::remove_file(&blocker)?;
                healed += 1;
            }
        }
        if done {
            break;
        }
        if Instant::now() > deadline {
            let _ = stop_tx.send(true);
            anyhow::bail!(
                "the demo did not settle within {} s; the ledger is in {}",
                args.deadline_s,
                config.ledger_dir().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let summary = pipeline
        .read(|s| {
            summarize(
                s,
                &projections,
                &config,
                &root,
                &api_url,
                started,
                healed,
                store.event_count(),
            )
        })
        .await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary, args.serve);
    }
    if args.serve {
        println!("contimg: listening on {api_url} (Ctrl-C to stop)");
        shutdown_signal().await;
    }
    let _ = stop_tx.send(true);
    let _ = worker.await;
    let _ = server_stop_tx.send(());
    server.await??;
    Ok(ExitCode::SUCCESS)
}

/// The start of the simulated stretch: it ends at the last whole 5 minutes before now.
fn observing_start(now: DateTime<Utc>, tiles: u32) -> DateTime<Utc> {
    let end = now
        .with_second(0)
        .and_then(|t| t.with_nanosecond(0))
        .unwrap_or(now);
    let end = end - chrono::Duration::minutes((end.minute() % 5) as i64);
    end - chrono::Duration::minutes(5 * tiles as i64)
}

/// Writes every observation's subband files: in a shuffled order, a few seconds apart in
/// their names, some in two writes with a pause (a file still growing), and at `corrupt`
/// one file without an HDF5 signature.
fn write_observations(
    incoming: &Path,
    times: &[String],
    dec: f64,
    size: usize,
    cadence_ms: u64,
    corrupt: Option<usize>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(incoming)?;
    let mut rng = crate::pipeline::mosaic::synth::Rng::new(110);
    for (i, t) in times.iter().enumerate() {
        let base = chrono::NaiveDateTime::parse_from_str(t, NAME_TIME)?;
        let mut order: Vec<u8> = (0..16).collect();
        for k in (1..order.len()).rev() {
            order.swap(k, (rng.next_u64() % (k as u64 + 1)) as usize);
        }
        for sb in order {
            // The correlator's clock puts subbands up to a few seconds apart.
            let name_time = base + chrono::Duration::seconds((rng.next_u64() % 3) as i64);
            let name = format!("{}_sb{sb:02}.hdf5", name_time.format(NAME_TIME));
            let path = incoming.join(&name);
            if corrupt == Some(i) && sb == 7 {
                std::fs::write(&path, vec![0x42u8; size])?;
                continue;
            }
            let pause = rng
                .next_u64()
                .is_multiple_of(8)
                .then(|| Duration::from_millis(40));
            sim::write_subband_at(&path, Some(base), dec, size, pause)?;
        }
        std::thread::sleep(Duration::from_millis(cadence_ms));
    }
    Ok(())
}

/// Every observation decided, every group imaged or given up, every mosaic window that can
/// be decided decided and built, and every product published or waiting for a person.
fn settled(
    s: &PipelineState,
    config: &Config,
    projections: &crate::projections::Projections,
    observations: usize,
) -> bool {
    let decided = s.closed.len() >= observations && s.pending.is_empty();
    let groups = s.groups.values().all(|g| g.settled());
    let mosaics = next_window(s, &config.mosaic).is_none()
        && s.mosaics
            .values()
            .all(|m| m.rejected.is_some() || m.build.settled())
        && s.mosaics
            .values()
            .filter(|m| m.rejected.is_none() && m.build.completed.is_some())
            .all(|m| s.products.contains(&mosaic_product(&m.id)));
    let images = s.groups.values().filter(|g| g.imaged()).all(|g| {
        s.products
            .contains(&crate::pipeline::worker::image_product(&g.id))
    });
    let publishing = projections.read(|m| {
        let c = m.counts();
        c.publishing == 0 && c.staging == c.max_attempts_exceeded
    }) && projections.lag() == 0;
    decided && groups && mosaics && images && publishing
}

#[allow(clippy::too_many_arguments)]
fn summarize(
    s: &PipelineState,
    projections: &crate::projections::Projections,
    config: &Config,
    root: &Path,
    api_url: &str,
    started: Instant,
    healed: u64,
    events: u64,
) -> Summary {
    let now = Utc::now().timestamp_micros();
    let status = projections.read(|m| publish_status(m, now));
    let alerts = alerts::evaluate(&alert_inputs(&status), &Default::default());
    let mut files_rejected: Vec<Rejected> = s
        .files
        .iter()
        .filter_map(|(f, r)| {
            r.as_ref().err().map(|reason| Rejected {
                file: f.clone(),
                reason: reason.clone(),
            })
        })
        .collect();
    files_rejected.sort_by(|a, b| a.file.cmp(&b.file));
    let mut mosaics_refused: Vec<RefusedMosaic> = s
        .mosaic_order
        .iter()
        .filter_map(|id| {
            let m = &s.mosaics[id];
            m.rejected.as_ref().map(|r| RefusedMosaic {
                mosaic_id: m.id.clone(),
                safeguard: r.clone(),
            })
        })
        .collect();
    mosaics_refused.sort_by(|a, b| a.mosaic_id.cmp(&b.mosaic_id));
    let mosaics_published = projections.read(|m| {
        s.mosaics
            .values()
            .filter(|ms| {
                m.product(&mosaic_product(&ms.id)).is_some_and(|p| {
                    p.status == crate::projections::product::ProductStatus::Published
                })
            })
            .count()
    });
    let stage_failures = s
        .groups
        .values()
        .flat_map(|g| g.stages.iter())
        .chain(s.mosaics.values().map(|m| &m.build))
        .map(|p| p.attempts.saturating_sub(u32::from(p.completed.is_some())))
        .sum();
    Summary {
        seconds: (started.elapsed().as_secs_f64() * 100.0).round() / 100.0,
        api: api_url.to_string(),
        folders: Folders {
            root: root.to_path_buf(),
            ledger: config.ledger_dir(),
            incoming: config.incoming(),
            work: config.work_root(),
            stage: config.stage_root(),
            products: config.products_root(),
        },
        files_accepted: s.files.values().filter(|r| r.is_ok()).count(),
        files_rejected,
        groups_formed: s.groups.len(),
        groups_timed_out: s.timed_out() as u64,
        tiles_imaged: s.groups.values().filter(|g| g.imaged()).count(),
        stage_failures,
        mosaics_created: s.mosaics.values().filter(|m| m.rejected.is_none()).count(),
        mosaics_refused,
        mosaics_published,
        products_published: status.total_published,
        publish_failures_healed: healed,
        alerts,
        status,
        ledger_events: events,
    }
}

fn print_summary(s: &Summary, serving: bool) {
    println!("contimg demo finished in {:.1} s", s.seconds);
    println!(
        "  subband files   {} accepted, {} refused",
        s.files_accepted,
        s.files_rejected.len()
    );
    for r in &s.files_rejected {
        println!("                  refused {}: {}", r.file, r.reason);
    }
    println!(
        "  groups          {} formed, {} timed out; {} tiles imaged; {} stage failures",
        s.groups_formed, s.groups_timed_out, s.tiles_imaged, s.stage_failures
    );
    println!(
        "  mosaics         {} created, {} refused, {} published",
        s.mosaics_created,
        s.mosaics_refused.len(),
        s.mosaics_published
    );
    for m in &s.mosaics_refused {
        println!(
            "                  refused {} by the {} safeguard",
            m.mosaic_id, m.safeguard
        );
    }
    println!(
        "  products        {} published, {} failed now, {} publish failures healed by retry; success rate {}%",
        s.products_published,
        s.status.failed_publishes,
        s.publish_failures_healed,
        s.status.success_rate_percent
    );
    if s.alerts.is_empty() {
        println!("  alerts          none");
    }
    for a in &s.alerts {
        println!(
            "  alert           [{}] {}: {}",
            a.severity, a.name, a.message
        );
    }
    println!(
        "  ledger          {} events in {}",
        s.ledger_events,
        s.folders.ledger.display()
    );
    println!("  products        {}", s.folders.products.display());
    println!("  work            {}", s.folders.work.display());
    println!("  API             {}", s.api);
    // While the demo serves, it holds the ledger: ask the server.
    let source = if serving {
        format!("--url {}", s.api)
    } else {
        format!("--data-dir {}", s.folders.ledger.display())
    };
    println!(
        "  look closer     contimg audit {source} between 2000-01-01T00:00:00Z 2100-01-01T00:00:00Z"
    );
}

//! The pipeline worker: ingest, the stages of each group in observation order, mosaic
//! groups behind the five safeguards, the mosaicker, and staging of images and mosaics as
//! products for the publisher. It is written against [`Ledger`], so the same worker runs
//! inside `contimg serve` (local store) or as a process of its own appending through a
//! running server (`serve --mode stream --url`).
//!
//! Every decision is appended before it is acted on, with the ledger's optimistic
//! concurrency as the lock: a stage starts by appending `StageStarted` with
//! `Exact(revision)` to its group's stream, a group and a mosaic group are created with
//! `NoStream` under an id derived from their members (so an identical repeat is
//! idempotent and a different one collides), and ingest appends with `Exact` on its
//! stream. Several workers on one ledger therefore never do the same work twice. After
//! every append the worker folds the log (its own events and anyone else's) into
//! [`PipelineState`]; that fold is the only thing it decides from.
//!
//! `run` first settles this host's interrupted stages (`recover`), then runs two loops
//! over one `PipelineState` behind a tokio `Mutex`: ingest (`ingest_once`, every
//! `poll_interval_s`: scan the incoming folder against the fold, append the facts, then a
//! `GroupFormed` per complete observation) and work (`step`: catch up, take one unit from
//! `next_work`, do it). Decisions take the time from the `Clock` in [`PipelineConfig`], so
//! a test moves the time instead of sleeping. `PipelineState` is not a projection: it has
//! no snapshot and is folded from position 0 at every start.
//!
//! Tunable numbers (the configuration's own defaults are in `config.rs`): when nothing is
//! due, `step` sleeps until the earliest retry time or for `poll_interval_s`, whichever is
//! sooner, and `run` waits as long after a failed step; work that fails without an event
//! of its own (staging a product, say) is held back for the poll interval doubled per
//! failure (the exponent capped at 12), at most 5 min, while the rest goes on; ingest
//! appends at most 500 facts per append; over HTTP the fold reads `$all` 1,000 events a
//! page; a worker names itself `host:pid:` and 8 hex digits in every `StageStarted` it
//! appends; simulated tiles take declination 71.6 degrees when the subband files carry
//! none; the fold keeps the first 100 parked events (`ParkedEvents::KEPT`; all counted).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Mutex, watch};

use super::ingest::{Ingest, IngestFact, short_hash};
use super::mosaic::{MosaicOptions, build_mosaic};
use super::publish::{Registration, register_product};
use super::safeguards::{self, Refusal};
use super::stages::{GroupPaths, RunResult, run_stage};
use super::state::{GroupState, PipelineState, Stage, StageProgress};
use crate::config::{Config, IngestConfig, MosaicConfig, StagesConfig};
use crate::events::catalogue::{
    DomainEvent, EventMetadata, GroupFormed, GroupRejected, MosaicGroupCreated,
    MosaicGroupRejected, StageCompleted, StageFailed, StageStarted, StreamName,
};
use crate::events::record::format_time;
use crate::events::{Direction, ExpectedRevision, Ledger, ProposedEvent, StoreError};

/// Where the worker reads and writes, and how it behaves.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub incoming: PathBuf,
    pub work_root: PathBuf,
    pub stage_root: PathBuf,
    pub ingest: IngestConfig,
    pub stages: StagesConfig,
    pub mosaic: MosaicConfig,
    /// Declination for simulated tiles when the subband files do not carry one.
    pub default_dec: f64,
    /// Stage tile images as products too (mosaics always are).
    pub stage_images: bool,
    /// Where decisions get the time: the system clock, or a test's.
    pub clock: Clock,
}

/// The time decisions are made at. Decision code never reads the system clock itself;
/// tests give a clock they move, instead of sleeping.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>);

impl Clock {
    pub fn system() -> Self {
        Clock(Arc::new(Utc::now))
    }

    pub fn new(f: impl Fn() -> DateTime<Utc> + Send + Sync + 'static) -> Self {
        Clock(Arc::new(f))
    }

    pub fn now(&self) -> DateTime<Utc> {
        (self.0)()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

impl PipelineConfig {
    pub fn from_config(c: &Config) -> Self {
        PipelineConfig {
            incoming: c.incoming(),
            work_root: c.work_root(),
            stage_root: c.stage_root(),
            ingest: c.ingest.clone(),
            stages: c.stages.clone(),
            mosaic: c.mosaic.clone(),
            default_dec: 71.6,
            stage_images: true,
            clock: Clock::system(),
        }
    }
}

/// The worker. Cheap to clone.
#[derive(Clone)]
pub struct Pipeline {
    ledger: Ledger,
    cfg: Arc<PipelineConfig>,
    state: Arc<Mutex<PipelineState>>,
    meta: EventMetadata,
    /// `host:pid:instance`, written into every `StageStarted` this worker appends.
    worker: Arc<str>,
    /// Work that failed without an event to show for it (staging a product, say), with
    /// its failures so far and when it may be tried again; the rest goes on meanwhile.
    held: Arc<std::sync::Mutex<Held>>,
    /// Events the fold parked so far (also in the state), readable without its lock.
    parked: Arc<std::sync::atomic::AtomicU64>,
}

mod intake;
mod recovery;
mod schedule;
mod staging;

pub use schedule::next_window;
use schedule::{Held, Work, held_at, next_work};

fn store_err(e: StoreError) -> anyhow::Error {
    anyhow::anyhow!("ledger: {e}")
}

impl Pipeline {
    /// Creates the folders and folds the whole log.
    pub async fn open(ledger: Ledger, cfg: PipelineConfig) -> anyhow::Result<Pipeline> {
        for d in [&cfg.incoming, &cfg.work_root, &cfg.stage_root] {
            std::fs::create_dir_all(d)
                .map_err(|e| anyhow::anyhow!("creating {}: {e}", d.display()))?;
        }
        let meta = EventMetadata::actor("pipeline");
        let worker = format!(
            "{}:{}:{}",
            meta.host.as_deref().unwrap_or("unknown"),
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let p = Pipeline {
            ledger,
            cfg: Arc::new(cfg),
            state: Arc::new(Mutex::new(PipelineState::default())),
            meta,
            worker: Arc::from(worker),
            held: Arc::default(),
            parked: Arc::default(),
        };
        p.catch_up().await?;
        Ok(p)
    }

    pub fn config(&self) -> &PipelineConfig {
        &self.cfg
    }

    /// A copy of what the worker knows now.
    pub async fn snapshot(&self) -> PipelineState {
        self.state.lock().await.clone()
    }

    /// A look at what the worker knows now, without copying it.
    pub async fn read<R>(&self, f: impl FnOnce(&PipelineState) -> R) -> R {
        f(&*self.state.lock().await)
    }

    /// The count of events the fold parked (undecodable payloads), shared with the API
    /// server when the pipeline runs in its process.
    pub fn parked_counter(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.parked.clone()
    }

    /// Folds every event committed since the last fold.
    pub async fn catch_up(&self) -> anyhow::Result<()> {
        let mut state = self.state.lock().await;
        let r = self.fold_new(&mut state).await;
        self.parked
            .store(state.parked.total, std::sync::atomic::Ordering::Relaxed);
        r
    }

    async fn fold_new(&self, state: &mut PipelineState) -> anyhow::Result<()> {
        if let Ledger::Local(store) = &self.ledger {
            // Read in place: most of a ledger is other categories, skipped without a copy.
            for raw in store.raw_from(state.next_position) {
                let raw = raw.map_err(store_err)?;
                state.apply(&raw.view().map_err(store_err)?);
            }
            return Ok(());
        }
        loop {
            let (events, next) = self
                .ledger
                .read_all(Some(state.next_position), Direction::Forward, 1000)
                .await
                .map_err(store_err)?;
            for e in &events {
                state.apply(&e.view());
            }
            if next.is_none() || events.is_empty() {
                return Ok(());
            }
        }
    }

    async fn append(
        &self,
        stream: &str,
        expected: ExpectedRevision,
        events: Vec<ProposedEvent>,
    ) -> Result<(), StoreError> {
        self.append_at(stream, expected, events).await.map(|_| ())
    }

    /// Appends, then folds what was written (or what beat us to it) before anything else
    /// is decided. Returns the stream's revision after the append.
    async fn append_at(
        &self,
        stream: &str,
        expected: ExpectedRevision,
        events: Vec<ProposedEvent>,
    ) -> Result<u64, StoreError> {
        let r = self.ledger.append(stream, expected, events).await;
        if let Err(e) = self.catch_up().await {
            tracing::warn!(error = %e, "folding the log after an append");
        }
        r.map(|a| a.next_expected_version)
    }

    fn event<T: DomainEvent>(&self, e: &T) -> ProposedEvent {
        e.to_proposed(&self.meta)
    }

    /// An event whose id follows from what it records, so a repeat is idempotent.
    fn event_with_id<T: DomainEvent>(&self, e: &T, key: &str) -> ProposedEvent {
        let mut p = self.event(e);
        let hash = blake3::hash(key.as_bytes());
        let bytes: [u8; 16] = hash.as_bytes()[..16].try_into().expect("16 bytes");
        p.event_id = uuid::Builder::from_random_bytes(bytes).into_uuid();
        p
    }

    /// Does one unit of work. `Ok(None)` when something was done; `Ok(Some(wait))` when
    /// nothing is due for `wait`.
    pub async fn step(&self) -> anyhow::Result<Option<Duration>> {
        self.catch_up().await?;
        let idle = Duration::from_secs_f64(self.cfg.ingest.poll_interval_s);
        let now = self.cfg.clock.now();
        let work = {
            let state = self.state.lock().await;
            let held = held_at(&self.held.lock().expect("held lock"), now);
            next_work(&state, &held, &self.cfg, now)
        };
        let work = match work {
            Ok(w) => w,
            Err(None) => return Ok(Some(idle)),
            Err(Some(t)) => {
                let wait = (t - now).to_std().unwrap_or_default();
                return Ok(Some(wait.min(idle)));
            }
        };
        let key = work.key();
        let done = match work {
            Work::Stage { group, stage } => self.run_group_stage(&group, stage).await,
            Work::Decide { members } => self.decide(members).await,
            Work::Build { mosaic } => self.build(&mosaic).await,
            Work::RegisterMosaic { mosaic } => self.register_mosaic(&mosaic).await,
            Work::RegisterImage { group } => self.register_image(&group).await,
        };
        let mut held = self.held.lock().expect("held lock");
        match done {
            Ok(()) => {
                held.remove(&key);
                Ok(None)
            }
            // Held back, with a growing wait, so that the rest of the work goes on.
            Err(e) => {
                let failures = held.get(&key).map_or(0, |(n, _)| *n) + 1;
                let wait = idle
                    .mul_f64(2f64.powi(failures.min(12) as i32))
                    .min(Duration::from_secs(300));
                let until =
                    self.cfg.clock.now() + chrono::Duration::from_std(wait).unwrap_or_default();
                held.insert(key.clone(), (failures, until));
                Err(e.context(format!(
                    "{key} (failure {failures}; held back {:.1} s)",
                    wait.as_secs_f64()
                )))
            }
        }
    }

    fn failure(
        &self,
        stage: Stage,
        attempt: u32,
        r: &RunResult,
        cfg: &StagesConfig,
    ) -> StageFailed {
        let f = r.outcome.as_ref().err();
        let next = (attempt < cfg.max_attempts).then(|| {
            let wait = crate::config::Backoff::from_secs(&cfg.backoff_s).after(attempt);
            format_time(self.cfg.clock.now() + chrono::Duration::from_std(wait).unwrap_or_default())
        });
        StageFailed {
            stage: stage.name().into(),
            attempt,
            duration_s: r.duration.as_secs_f64(),
            exit_status: r.exit_status,
            timed_out: f.is_some_and(|f| f.timed_out),
            stderr_tail: f.map(|f| f.stderr_tail.clone()).unwrap_or_default(),
            error: f.map(|f| f.error.clone()).unwrap_or_default(),
            next_retry_at: next,
        }
    }

    async fn run_group_stage(&self, id: &str, stage: Stage) -> anyhow::Result<()> {
        let Some(group) = self.state.lock().await.group(id).cloned() else {
            return Ok(());
        };
        let attempt = group.stage(stage).attempts + 1;
        let paths = GroupPaths::new(&self.cfg.work_root, id);
        let command = match (&self.cfg.stages.runner, stage) {
            (Some(crate::config::RunnerKind::External), _) => {
                let c = match stage {
                    Stage::Convert => &self.cfg.stages.convert,
                    Stage::Calibrate => &self.cfg.stages.calibrate,
                    Stage::Image | Stage::Mosaic => &self.cfg.stages.image,
                };
                c.as_ref()
                    .map(|c| super::stages::render(&c.command, stage, &group, &paths))
            }
            _ => None,
        };
        let stream = StreamName::group(id);
        let Some(head) = self
            .take_stage(&stream, group.head, stage, attempt, command)
            .await?
        else {
            return Ok(());
        };
        // The subband files `GroupFormed` names are handed to convert only from beneath
        // the incoming folder.
        let outside = match stage {
            Stage::Convert => group
                .files
                .iter()
                .find_map(|f| safeguards::beneath(&self.cfg.incoming, f).err()),
            _ => None,
        };
        let r = match outside {
            Some(e) => RunResult {
                duration: Duration::ZERO,
                exit_status: None,
                outcome: Err(super::stages::RunFailure::new(format!(
                    "input refused: {e}"
                ))),
                command: None,
            },
            None => {
                run_stage(
                    &self.cfg.stages,
                    stage,
                    &group,
                    &paths,
                    self.cfg.default_dec,
                )
                .await
            }
        };
        self.finish_stage(&stream, head, stage, attempt, &r).await
    }

    /// Takes a stage's lock: `StageStarted` (naming this worker) with `Exact(head)`. The
    /// stream's revision after it; `None` when another worker took it first.
    async fn take_stage(
        &self,
        stream: &str,
        head: u64,
        stage: Stage,
        attempt: u32,
        command: Option<String>,
    ) -> anyhow::Result<Option<u64>> {
        let started = StageStarted {
            stage: stage.name().into(),
            attempt,
            command,
            worker: Some(self.worker.to_string()),
        };
        match self
            .append_at(
                stream,
                ExpectedRevision::Exact(head),
                vec![self.event(&started)],
            )
            .await
        {
            Ok(revision) => {
                tracing::info!(%stream, %stage, attempt, "stage started");
                Ok(Some(revision))
            }
            Err(StoreError::WrongExpectedVersion { .. }) => Ok(None),
            Err(e) => Err(store_err(e)),
        }
    }

    /// Records how a run ended: `StageCompleted` with its outputs, or `StageFailed` with the
    /// next retry time. Appended with `Exact(head)`, the revision of its `StageStarted`:
    /// when anything came between (another worker settled the run as interrupted), this
    /// result no longer speaks for the stage and is dropped.
    async fn finish_stage(
        &self,
        stream: &str,
        head: u64,
        stage: Stage,
        attempt: u32,
        r: &RunResult,
    ) -> anyhow::Result<()> {
        let event = match &r.outcome {
            Ok(outputs) => {
                tracing::info!(%stream, %stage, seconds = r.duration.as_secs_f64(), "stage completed");
                self.event(&StageCompleted {
                    stage: stage.name().into(),
                    attempt,
                    duration_s: r.duration.as_secs_f64(),
                    exit_status: r.exit_status,
                    outputs: outputs.clone(),
                })
            }
            Err(f) => {
                tracing::warn!(%stream, %stage, attempt, error = %f.error, "stage failed");
                self.event(&self.failure(stage, attempt, r, &self.cfg.stages))
            }
        };
        match self
            .append(stream, ExpectedRevision::Exact(head), vec![event])
            .await
        {
            Ok(()) => Ok(()),
            Err(StoreError::WrongExpectedVersion { .. }) => {
                tracing::warn!(%stream, %stage, attempt, "result dropped: the run was settled by another worker meanwhile");
                Ok(())
            }
            Err(e) => Err(store_err(e)),
        }
    }

    async fn decide(&self, members: Vec<String>) -> anyhow::Result<()> {
        let (groups, existing) = {
            let s = self.state.lock().await;
            let groups: Vec<GroupState> =
                members.iter().filter_map(|m| s.group(m).cloned()).collect();
            let id = mosaic_id(&groups);
            (
                groups,
                s.mosaics.get(&id).map(|m| (m.members.clone(), m.head)),
            )
        };
        let id = mosaic_id(&groups);
        let stream = StreamName::mosaic(&id);
        let first = groups
            .first()
            .map(|g| g.obs_time.clone())
            .unwrap_or_default();
        let last = groups
            .last()
            .map(|g| g.obs_time.clone())
            .unwrap_or_default();
        // 1. Group id collision: this id already holds other members.
        if let Some((held, head)) = existing {
            if held != members {
                let r = MosaicGroupRejected {
                    mosaic_id: id.clone(),
                    safeguard: safeguards::ID_COLLISION.into(),
                    member: None,
                    reason: format!(
                        "mosaic id {id} already holds members {}; refusing {} rather than overwrite",
                        held.join(","),
                        members.join(",")
                    ),
                    members,
                };
                tracing::error!(mosaic = %id, "mosaic group id collision");
                return self
                    .append(&stream, ExpectedRevision::Exact(head), vec![self.event(&r)])
                    .await
                    .or_else(ignore_conflict);
            }
            return Ok(());
        }
        let cfg = self.cfg.mosaic.clone();
        let work_root = self.cfg.work_root.clone();
        let checked = tokio::task::spawn_blocking(move || {
            let refs: Vec<&GroupState> = groups.iter().collect();
            safeguards::check(&refs, &cfg, &work_root)
        })
        .await?;
        let event = match checked {
            Ok(()) => {
                tracing::info!(mosaic = %id, "mosaic group created");
                self.event_with_id(
                    &MosaicGroupCreated {
                        mosaic_id: id.clone(),
                        members,
                        first_obs_time: first,
                        last_obs_time: last,
                    },
                    &format!("{stream}/created"),
                )
            }
            Err(Refusal {
                safeguard,
                member,
                reason,
            }) => {
                tracing::warn!(mosaic = %id, safeguard, member = ?member, reason = %reason, "mosaic group refused");
                self.event_with_id(
                    &MosaicGroupRejected {
                        mosaic_id: id.clone(),
                        safeguard: safeguard.into(),
                        member,
                        reason,
                        members,
                    },
                    &format!("{stream}/rejected"),
                )
            }
        };
        self.append(&stream, ExpectedRevision::NoStream, vec![event])
            .await
            .or_else(ignore_conflict)
    }

    async fn build(&self, id: &str) -> anyhow::Result<()> {
        let (mosaic, tiles, beams) = {
            let s = self.state.lock().await;
            let Some(m) = s.mosaics.get(id).cloned() else {
                return Ok(());
            };
            let groups: Vec<&GroupState> = m.members.iter().filter_map(|g| s.group(g)).collect();
            let tiles: Vec<String> = groups
                .iter()
                .filter_map(|g| g.outputs(Stage::Image).first().cloned())
                .collect();
            let beams: Vec<String> = groups
                .iter()
                .filter_map(|g| g.outputs(Stage::Image).get(1).cloned())
                .collect();
            (m, tiles, beams)
        };
        let attempt = mosaic.build.attempts + 1;
        let stream = StreamName::mosaic(id);
        let Some(head) = self
            .take_stage(&stream, mosaic.head, Stage::Mosaic, attempt, None)
            .await?
        else {
            return Ok(());
        };
        let folder = self.cfg.stage_root.join("mosaics").join(mosaic_product(id));
        let partial = self
            .cfg
            .stage_root
            .join("mosaics")
            .join(format!(".partial-{}", mosaic_product(id)));
        let start = std::time::Instant::now();
        let out = folder.clone();
        let work_root = self.cfg.work_root.clone();
        let built = tokio::task::spawn_blocking(move || -> Result<(), String> {
            // The tiles the members' events name are read only beneath the work root.
            let within = |paths: Vec<String>| -> Result<Vec<PathBuf>, String> {
                paths
                    .iter()
                    .map(|p| safeguards::beneath(&work_root, p))
                    .collect()
            };
            let (tiles, beams) = (within(tiles)?, within(beams)?);
            let _ = std::fs::remove_dir_all(&partial);
            std::fs::create_dir_all(&partial)
                .map_err(|e| format!("creating {}: {e}", partial.display()))?;
            let mut opts = MosaicOptions::new(partial.join("mosaic.fits"));
            opts.weights_out = Some(partial.join("weights.fits"));
            opts.noise_out = Some(partial.join("noise.fits"));
            let beams = (beams.len() == tiles.len()).then_some(beams);
            build_mosaic(&tiles, beams.as_deref(), &opts).map_err(|e| e.to_string())?;
            let _ = std::fs::remove_dir_all(&out);
            std::fs::rename(&partial, &out).map_err(|e| format!("moving into place: {e}"))?;
            if let Some(parent) = out.parent() {
                let _ = std::fs::File::open(parent).and_then(|d| d.sync_all());
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|e| Err(format!("mosaic task failed: {e}")));
        let r = RunResult {
            duration: start.elapsed(),
            exit_status: None,
            outcome: built
                .map(|()| vec![folder.display().to_string()])
                .map_err(super::stages::RunFailure::new),
            command: None,
        };
        self.finish_stage(&stream, head, Stage::Mosaic, attempt, &r)
            .await
    }

    /// Runs ingest and the stages until `shutdown` turns true. A stage cut short by the
    /// shutdown is left running in the ledger and settled by [`Pipeline::recover`] at the
    /// next start.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        if self.cfg.stages.runner.is_none() {
            tracing::warn!(
                "stages idle: the configuration names no [stages] runner; ingest records what \
                 arrives and groups wait. Set runner = \"external\" with the stage commands \
                 (tools/stages/dsa110.toml) or runner = \"simulate\" for synthetic products"
            );
        }
        if let Err(e) = self.recover().await {
            tracing::error!(error = %format!("{e:#}"), "recovering interrupted stages");
        }
        let ingest_task = {
            let p = self.clone();
            let mut shutdown = shutdown.clone();
            tokio::spawn(async move {
                let mut ingest = Ingest::new(p.cfg.incoming.clone(), p.cfg.ingest.clone());
                let poll = Duration::from_secs_f64(p.cfg.ingest.poll_interval_s);
                loop {
                    if let Err(e) = p.ingest_once(&mut ingest).await {
                        tracing::error!(error = %format!("{e:#}"), "ingest");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(poll) => {}
                        _ = crate::projections::stopped(&mut shutdown) => return,
                    }
                }
            })
        };
        loop {
            let wait = tokio::select! {
                r = self.step() => match r {
                    Ok(w) => w,
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "pipeline step");
                        Some(Duration::from_secs_f64(self.cfg.ingest.poll_interval_s))
                    }
                },
                _ = crate::projections::stopped(&mut shutdown) => break,
            };
            if let Some(w) = wait {
                tokio::select! {
                    _ = tokio::time::sleep(w) => {}
                    _ = crate::projections::stopped(&mut shutdown) => break,
                }
            }
        }
        let _ = ingest_task.await;
    }
}

fn ignore_conflict(e: StoreError) -> anyhow::Result<()> {
    match e {
        // Someone else decided first; the fold has their decision.
        StoreError::WrongExpectedVersion { .. } => Ok(()),
        e => Err(store_err(e)),
    }
}

/// A mosaic group id from its members: the first member's compact time and a short hash
/// of the member ids.
pub fn mosaic_id(members: &[GroupState]) -> String {
    let compact: String = members
        .first()
        .map(|g| {
            g.obs_time
                .chars()
                .filter(|c| *c != '-' && *c != ':')
                .collect()
        })
        .unwrap_or_default();
    format!(
        "{compact}-{}",
        short_hash(members.iter().map(|g| g.id.as_str()))
    )
}

const MOSAIC_PRODUCT: &str = "mosaic-";
const IMAGE_PRODUCT: &str = "image-";

pub fn mosaic_product(id: &str) -> String {
    format!("{MOSAIC_PRODUCT}{id}")
}

pub fn image_product(group: &str) -> String {
    format!("{IMAGE_PRODUCT}{group}")
}

/// Whether `id` is named as the pipeline names its products ([`image_product`],
/// [`mosaic_product`]).
pub fn pipeline_product(id: &str) -> bool {
    id.starts_with(IMAGE_PRODUCT) || id.starts_with(MOSAIC_PRODUCT)
}

#[cfg(test)]
mod tests {
    use super::recovery::interrupted;
    use super::*;
    use crate::pipeline::state::{GroupState, MosaicState};

    fn imaged(i: usize) -> GroupState {
        let done = StageProgress {
            attempts: 1,
            completed: Some(vec![]),
            ..Default::default()
        };
        GroupState {
            id: format!("g{i}"),
            obs_time: format!("2026-11-30T10:{:02}:00", i * 5),
            files: vec![],
            dec_deg: None,
            stages: [done.clone(), done.clone(), done],
            head: 5,
        }
    }

    fn state(groups: usize) -> PipelineState {
        let mut s = PipelineState::default();
        for g in (0..groups).map(imaged) {
            s.group_obs.insert(g.id.clone(), g.obs_time.clone());
            s.groups.insert(g.obs_time.clone(), g);
        }
        s
    }

    fn decide(s: &mut PipelineState, members: Vec<String>) {
        let id = format!("m{}", s.mosaic_order.len());
        s.mosaic_order.push(id.clone());
        s.mosaics.insert(
            id.clone(),
            MosaicState {
                id,
                members,
                rejected: None,
                rejected_reason: None,
                rejected_member: None,
                build: StageProgress::default(),
                head: 0,
            },
        );
    }

    fn ids(v: &[usize]) -> Vec<String> {
        v.iter().map(|i| format!("g{i}")).collect()
    }

    #[test]
    fn windows_chain_with_overlap_and_without() {
        let cfg = |tiles, overlap| MosaicConfig {
            tiles,
            overlap,
            ..MosaicConfig::default()
        };
        let mut s = state(8);
        assert_eq!(next_window(&s, &cfg(3, 1)), Some(ids(&[0, 1, 2])));
        decide(&mut s, ids(&[0, 1, 2]));
        assert_eq!(next_window(&s, &cfg(3, 1)), Some(ids(&[2, 3, 4])));
        // No overlap: the next window starts right after the last one.
        assert_eq!(next_window(&s, &cfg(3, 0)), Some(ids(&[3, 4, 5])));
        decide(&mut s, ids(&[3, 4, 5]));
        assert_eq!(next_window(&s, &cfg(3, 0)), None, "only g6 and g7 are left");
        // A window waits while an observation inside it still collects subbands.
        let mut s = state(8);
        s.pending.insert(
            "2026-11-30T10:07:00".into(),
            crate::pipeline::state::PendingObs {
                first_seen: Utc::now(),
                subbands: Default::default(),
                headers: Default::default(),
            },
        );
        assert_eq!(next_window(&s, &cfg(3, 1)), None);
    }

    #[test]
    fn only_stages_of_dead_workers_on_this_host_are_settled() {
        let me = format!("h1:{}:aaaa", std::process::id());
        let live_other = format!("h1:{}:bbbb", std::process::id());
        // Our own pid but another instance: a live worker in this process.
        assert!(!interrupted(Some(&live_other), Some("h1"), &me));
        // A pid that cannot be running.
        assert!(interrupted(Some("h1:2147483646:cccc"), Some("h1"), &me));
        // Another host's stage is left to it, dead or alive.
        assert!(!interrupted(Some("h2:2147483646:cccc"), Some("h1"), &me));
        // Events from before workers were named: by host.
        assert!(interrupted(Some("h1"), Some("h1"), &me));
        assert!(!interrupted(Some("h2"), Some("h1"), &me));
        assert!(interrupted(None, Some("h1"), &me));
    }

    fn config() -> PipelineConfig {
        let mut c = Config::default();
        c.stages.runner = Some(crate::config::RunnerKind::Simulate);
        PipelineConfig::from_config(&c)
    }

    /// Given a group whose convert failed with a retry due at T+60 s, when the worker asks
    /// at T, then nothing is due until T+60 s; when it asks at T+60 s, the retry is due;
    /// and work held back is passed over until its time. No sleeping: the time is given.
    #[test]
    fn a_failed_stage_is_due_again_at_its_retry_time_and_held_work_waits() {
        let t = DateTime::parse_from_rfc3339("2026-11-30T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let mut g = imaged(0);
        g.stages = Default::default();
        g.stages[0] = StageProgress {
            attempts: 1,
            last_error: Some("convert exited with status 1".into()),
            next_retry_at: Some(t + chrono::Duration::seconds(60)),
            ..Default::default()
        };
        let mut s = PipelineState::default();
        s.group_obs.insert(g.id.clone(), g.obs_time.clone());
        s.groups.insert(g.obs_time.clone(), g);
        let cfg = config();
        let none = std::collections::HashSet::new();
        let at = |secs| t + chrono::Duration::seconds(secs);
        assert!(matches!(
            next_work(&s, &none, &cfg, t),
            Err(Some(when)) if when == at(60)
        ));
        assert!(matches!(
            next_work(&s, &none, &cfg, at(60)),
            Ok(Work::Stage {
                stage: Stage::Convert,
                ..
            })
        ));
        let mut held = std::collections::HashMap::new();
        held.insert("convert of g0".to_string(), (1, at(90)));
        assert!(next_work(&s, &held_at(&held, at(60)), &cfg, at(60)).is_err());
        assert!(matches!(
            next_work(&s, &held_at(&held, at(90)), &cfg, at(90)),
            Ok(Work::Stage { .. })
        ));
        // With no runner in the configuration, the same stage is never offered.
        let mut idle = config();
        idle.stages.runner = None;
        assert!(matches!(next_work(&s, &none, &idle, at(90)), Err(None)));
    }
}

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

use std::collections::HashMap;
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

/// One unit of work the worker can take.
#[derive(Debug, Clone)]
enum Work {
    Stage { group: String, stage: Stage },
    Decide { members: Vec<String> },
    Build { mosaic: String },
    RegisterMosaic { mosaic: String },
    RegisterImage { group: String },
}

impl Work {
    /// What the work is about, for holding it back after a failure.
    fn key(&self) -> String {
        match self {
            Work::Stage { group, stage } => format!("{stage} of {group}"),
            Work::Decide { members } => {
                format!("mosaic window from {}", members.first().map_or("", |m| m))
            }
            Work::Build { mosaic } => format!("mosaic {mosaic}"),
            Work::RegisterMosaic { mosaic } => format!("staging {}", mosaic_product(mosaic)),
            Work::RegisterImage { group } => format!("staging {}", image_product(group)),
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

    /// One look at the incoming folder; returns the events written.
    pub async fn ingest_once(&self, ingest: &mut Ingest) -> anyhow::Result<usize> {
        self.catch_up().await?;
        // The scan decides against the fold as it stands; its appends expect exactly the
        // stream heads it decided against, so a fact another worker wrote meanwhile makes
        // them conflict instead of slipping in beside a decision it would have changed.
        let (outcome, mut heads) = {
            let state = self.state.lock().await;
            let outcome = ingest
                .scan(&state, self.cfg.clock.now())
                .map_err(|e| anyhow::anyhow!("scanning {}: {e}", ingest.dir.display()))?;
            let heads: HashMap<String, Option<u64>> = outcome
                .ingest
                .keys()
                .map(|k| (k.clone(), state.ingest_heads.get(k).copied()))
                .collect();
            (outcome, heads)
        };
        if outcome.is_empty() {
            return Ok(0);
        }
        let mut written = 0;
        for (stream, facts) in outcome.ingest {
            for chunk in facts.chunks(500) {
                let head = heads.get(&stream).copied().flatten();
                let expected = head.map_or(ExpectedRevision::NoStream, ExpectedRevision::Exact);
                let events: Vec<ProposedEvent> = chunk
                    .iter()
                    .map(|f| match f {
                        IngestFact::Accepted(a) => self.event(a),
                        IngestFact::Rejected(r) => {
                            tracing::warn!(path = %r.path, reason = %r.reason, "subband file refused");
                            self.event(r)
                        }
                        IngestFact::TimedOut(t) => {
                            tracing::warn!(obs = %t.obs_time, missing = ?t.missing, "observation timed out");
                            self.event(t)
                        }
                    })
                    .collect();
                match self.append_at(&stream, expected, events).await {
                    Ok(revision) => {
                        heads.insert(stream.clone(), Some(revision));
                        written += chunk.len();
                    }
                    // Another worker wrote first: decide again on the next scan.
                    Err(StoreError::WrongExpectedVersion { .. }) => return Ok(written),
                    Err(e) => return Err(store_err(e)),
                }
            }
        }
        for mut g in outcome.formed {
            g.dec_deg = g
                .files
                .first()
                .and_then(|f| super::sim::read_subband_dec(Path::new(f)));
            let stream = StreamName::group(&g.group_id);
            let key = format!("{stream}/GroupFormed");
            match self
                .append(
                    &stream,
                    ExpectedRevision::NoStream,
                    vec![self.event_with_id(&g, &key)],
                )
                .await
            {
                Ok(()) => {
                    tracing::info!(group = %g.group_id, obs = %g.obs_time, "group formed");
                    written += 1;
                }
                Err(StoreError::WrongExpectedVersion { .. }) => {
                    written += self.refuse_collision(&g).await?;
                }
                Err(e) => return Err(store_err(e)),
            }
        }
        Ok(written)
    }

    /// A `GroupFormed` met an existing `group-<id>` stream. The same members are an
    /// idempotent repeat; other members are safeguard 1: the group is refused with a
    /// `GroupRejected` in the ingest stream, and the existing group is left as it is.
    async fn refuse_collision(&self, g: &GroupFormed) -> anyhow::Result<usize> {
        let stream = StreamName::group(&g.group_id);
        let first = self
            .ledger
            .read_stream(&stream, Some(0), Direction::Forward, 1)
            .await
            .map_err(store_err)?;
        let held: Option<GroupFormed> = first
            .first()
            .and_then(|e| serde_json::from_slice(&e.data).ok());
        if held.as_ref().map(|h| &h.files) == Some(&g.files) {
            return Ok(0);
        }
        let reason = match &held {
            Some(h) => format!(
                "group id {} already holds observation {} with {} other files; refusing rather than overwrite",
                g.group_id,
                h.obs_time,
                h.files.len()
            ),
            None => format!(
                "group id {} is already taken by a stream that is not a group",
                g.group_id
            ),
        };
        tracing::error!(group = %g.group_id, %reason, "group id collision");
        let ingest = super::ingest::ingest_stream(
            chrono::NaiveDateTime::parse_from_str(&g.obs_time, super::ingest::NAME_TIME).ok(),
            self.cfg.clock.now(),
        );
        let head = self.state.lock().await.ingest_heads.get(&ingest).copied();
        let expected = head.map_or(ExpectedRevision::NoStream, ExpectedRevision::Exact);
        let event = GroupRejected {
            obs_time: g.obs_time.clone(),
            group_id: g.group_id.clone(),
            files: g.files.clone(),
            reason,
        };
        match self
            .append(&ingest, expected, vec![self.event(&event)])
            .await
        {
            Ok(()) => Ok(1),
            // Decided again on the next scan.
            Err(StoreError::WrongExpectedVersion { .. }) => Ok(0),
            Err(e) => Err(store_err(e)),
        }
    }

    /// Settles stages and mosaic builds this host left running when it stopped: each gets
    /// a `StageFailed` marked as interrupted, and is retried like any failure.
    pub async fn recover(&self) -> anyhow::Result<usize> {
        self.catch_up().await?;
        let host = self.meta.host.clone();
        let me = self.worker.clone();
        let (groups, mosaics) = {
            let s = self.state.lock().await;
            let settle = |p: &StageProgress| {
                p.running
                    .as_ref()
                    .filter(|(_, _, who)| interrupted(who.as_deref(), host.as_deref(), &me))
                    .map(|(a, _, _)| *a)
            };
            let groups: Vec<(String, Stage, u32, u64)> = s
                .groups
                .values()
                .flat_map(|g| {
                    Stage::GROUP
                        .into_iter()
                        .filter_map(|st| settle(g.stage(st)).map(|a| (g.id.clone(), st, a, g.head)))
                        .collect::<Vec<_>>()
                })
                .collect();
            let mosaics: Vec<(String, u32, u64)> = s
                .mosaics
                .values()
                .filter_map(|m| settle(&m.build).map(|a| (m.id.clone(), a, m.head)))
                .collect();
            (groups, mosaics)
        };
        let n = groups.len() + mosaics.len();
        let streams = groups
            .into_iter()
            .map(|(id, stage, a, head)| (StreamName::group(&id), stage, a, head))
            .chain(
                mosaics
                    .into_iter()
                    .map(|(id, a, head)| (StreamName::mosaic(&id), Stage::Mosaic, a, head)),
            );
        for (stream, stage, attempt, head) in streams {
            let f = self.failure(stage, attempt, &RunResult::interrupted(), &self.cfg.stages);
            // Exact: if anything was appended meanwhile, the stage was not abandoned.
            match self
                .append(&stream, ExpectedRevision::Exact(head), vec![self.event(&f)])
                .await
            {
                Ok(()) | Err(StoreError::WrongExpectedVersion { .. }) => {}
                Err(e) => return Err(store_err(e)),
            }
        }
        if n > 0 {
            tracing::warn!(interrupted = n, "settled stages a stop cut short");
        }
        Ok(n)
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
            (crate::config::RunnerKind::External, _) => {
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
        let r = run_stage(
            &self.cfg.stages,
            stage,
            &group,
            &paths,
            self.cfg.default_dec,
        )
        .await;
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
        let checked = tokio::task::spawn_blocking(move || {
            let refs: Vec<&GroupState> = groups.iter().collect();
            safeguards::check(&refs, &cfg)
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
            let tiles: Vec<PathBuf> = groups
                .iter()
                .filter_map(|g| g.outputs(Stage::Image).first().map(PathBuf::from))
                .collect();
            let beams: Vec<PathBuf> = groups
                .iter()
                .filter_map(|g| g.outputs(Stage::Image).get(1).map(PathBuf::from))
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
        let built = tokio::task::spawn_blocking(move || -> Result<(), String> {
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

    async fn register(&self, req: Registration) -> anyhow::Result<()> {
        let id = req.data_id.clone();
        match register_product(&self.ledger, &self.cfg.stage_root, req, "pipeline").await {
            Ok(_) => {
                tracing::info!(product = %id, "staged");
                self.catch_up().await
            }
            Err(e) => Err(anyhow::anyhow!("registering {id}: {e}")),
        }
    }

    async fn register_mosaic(&self, id: &str) -> anyhow::Result<()> {
        let Some(m) = self.state.lock().await.mosaics.get(id).cloned() else {
            return Ok(());
        };
        let Some(folder) = m.build.completed.as_ref().and_then(|o| o.first()).cloned() else {
            return Ok(());
        };
        let metadata = [
            ("mosaic_id".to_string(), id.to_string()),
            ("members".to_string(), m.members.join(",")),
        ]
        .into_iter()
        .collect();
        self.register(Registration {
            data_id: mosaic_product(id),
            data_type: "mosaic".into(),
            stage_path: folder,
            qa_status: Some("passed".into()),
            validation_status: Some("validated".into()),
            auto_publish: true,
            metadata,
        })
        .await
    }

    async fn register_image(&self, group: &str) -> anyhow::Result<()> {
        let Some(g) = self.state.lock().await.group(group).cloned() else {
            return Ok(());
        };
        let Some(tile) = g.outputs(Stage::Image).first().cloned() else {
            return Ok(());
        };
        let dir = self.cfg.stage_root.join("images");
        let name = format!("{group}.pbcor.fits");
        let staged = dir.join(&name);
        let (src, dst) = (PathBuf::from(&tile), staged.clone());
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            if dst.exists() {
                return Ok(());
            }
            std::fs::create_dir_all(&dir)?;
            let tmp = dir.join(format!(".partial-{}-{name}", uuid::Uuid::new_v4()));
            std::fs::copy(&src, &tmp)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &dst)
        })
        .await?
        .map_err(|e| anyhow::anyhow!("staging {tile}: {e}"))?;
        let metadata = [
            ("group_id".to_string(), group.to_string()),
            ("obs_time".to_string(), g.obs_time.clone()),
        ]
        .into_iter()
        .collect();
        self.register(Registration {
            data_id: image_product(group),
            data_type: "image".into(),
            stage_path: staged.display().to_string(),
            qa_status: Some("passed".into()),
            validation_status: Some("validated".into()),
            auto_publish: true,
            metadata,
        })
        .await
    }

    /// Runs ingest and the stages until `shutdown` turns true. A stage cut short by the
    /// shutdown is left running in the ledger and settled by [`Pipeline::recover`] at the
    /// next start.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
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

/// The next window of consecutive groups to decide a mosaic over, when it is ready: it
/// starts at the first group (or `overlap` members before the end of the last decided
/// mosaic group), holds `tiles` groups in observation order, every member is imaged or
/// given up, and no observation inside it is still collecting subbands.
pub fn next_window(s: &PipelineState, cfg: &MosaicConfig) -> Option<Vec<String>> {
    use std::ops::Bound;
    // The window starts `overlap` members before the end of the last decided one (read
    // from its own members, so a change of `tiles` or `overlap` does not lose the chain),
    // or right after it when there is no overlap.
    let start = match s.last_mosaic() {
        Some(m) => match m
            .members
            .len()
            .checked_sub(cfg.overlap)
            .filter(|k| *k < m.members.len())
        {
            Some(k) => Bound::Included(s.group_obs.get(&m.members[k])?.clone()),
            None => Bound::Excluded(s.group_obs.get(m.members.last()?)?.clone()),
        },
        None => Bound::Included(s.groups.keys().next()?.clone()),
    };
    let members: Vec<&GroupState> = s
        .groups
        .range((start, Bound::Unbounded))
        .map(|(_, g)| g)
        .take(cfg.tiles)
        .collect();
    if members.len() < cfg.tiles || !members.iter().all(|g| g.settled()) {
        return None;
    }
    let (first, last) = (&members[0].obs_time, &members[members.len() - 1].obs_time);
    if s.pending
        .range(first.clone()..=last.clone())
        .next()
        .is_some()
    {
        return None;
    }
    Some(members.iter().map(|g| g.id.clone()).collect())
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

/// Picks the next due unit of work, a pure function of the fold, the work held back and
/// the time: staging and mosaic decisions first (cheap), then mosaic builds, then group
/// stages in observation order. `Err(when)` when nothing is due, with the earliest retry
/// time if one is pending.
fn next_work(
    s: &PipelineState,
    held: &std::collections::HashSet<String>,
    cfg: &PipelineConfig,
    now: DateTime<Utc>,
) -> Result<Work, Option<DateTime<Utc>>> {
    let free = |w: &Work| !held.contains(&w.key());
    let mut earliest: Option<DateTime<Utc>> = None;
    let mut due = |p: &StageProgress| -> bool {
        if p.settled() || p.running.is_some() {
            return false;
        }
        match p.next_retry_at {
            Some(t) if t > now => {
                earliest = Some(earliest.map_or(t, |e| e.min(t)));
                false
            }
            _ => true,
        }
    };
    for id in &s.mosaic_order {
        let m = &s.mosaics[id];
        if m.rejected.is_some() || !s.known_members(m) {
            continue;
        }
        let w = Work::RegisterMosaic {
            mosaic: m.id.clone(),
        };
        if m.build.completed.is_some() && !s.products.contains(&mosaic_product(&m.id)) && free(&w) {
            return Ok(w);
        }
    }
    if cfg.stage_images {
        for g in s.groups.values() {
            let w = Work::RegisterImage {
                group: g.id.clone(),
            };
            if g.imaged() && !s.products.contains(&image_product(&g.id)) && free(&w) {
                return Ok(w);
            }
        }
    }
    if let Some(members) = next_window(s, &cfg.mosaic) {
        let w = Work::Decide { members };
        if free(&w) {
            return Ok(w);
        }
    }
    for id in &s.mosaic_order {
        let m = &s.mosaics[id];
        let w = Work::Build {
            mosaic: m.id.clone(),
        };
        if m.rejected.is_none() && s.known_members(m) && free(&w) && due(&m.build) {
            return Ok(w);
        }
    }
    for g in s.groups.values() {
        if let Some(stage) = g.next_stage() {
            let w = Work::Stage {
                group: g.id.clone(),
                stage,
            };
            if free(&w) && due(g.stage(stage)) {
                return Ok(w);
            }
        }
    }
    Err(earliest)
}

/// Work held back after failing without an event of its own: its key, the failures so
/// far, and until when.
type Held = HashMap<String, (u32, DateTime<Utc>)>;

/// Keys of the work held back at `now`.
fn held_at(held: &Held, now: DateTime<Utc>) -> std::collections::HashSet<String> {
    held.iter()
        .filter(|(_, (_, until))| *until > now)
        .map(|(k, _)| k.clone())
        .collect()
}

pub fn mosaic_product(id: &str) -> String {
    format!("mosaic-{id}")
}

pub fn image_product(group: &str) -> String {
    format!("image-{group}")
}

/// Whether a stage left running by `who` (the `worker` of its `StageStarted`, or a host
/// name from older events) was cut short, as seen by worker `me` on `host`: a worker of
/// this host whose process is gone. Stages of other hosts, or of live workers here, are
/// not this worker's to settle.
fn interrupted(who: Option<&str>, host: Option<&str>, me: &str) -> bool {
    let Some(who) = who else {
        return true;
    };
    if who == me {
        return true;
    }
    let mut parts = who.rsplitn(3, ':');
    let (Some(_instance), Some(pid), Some(on)) = (parts.next(), parts.next(), parts.next()) else {
        // A bare host name (events written before workers were named).
        return Some(who) == host;
    };
    let Ok(pid) = pid.parse::<i32>() else {
        return false;
    };
    Some(on) == host && !process_alive(pid)
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
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
        PipelineConfig::from_config(&Config::default())
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
        let mut held = HashMap::new();
        held.insert("convert of g0".to_string(), (1, at(90)));
        assert!(next_work(&s, &held_at(&held, at(60)), &cfg, at(60)).is_err());
        assert!(matches!(
            next_work(&s, &held_at(&held, at(90)), &cfg, at(90)),
            Ok(Work::Stage { .. })
        ));
    }
}

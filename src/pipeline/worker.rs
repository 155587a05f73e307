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

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Mutex, watch};

use super::ingest::{Ingest, IngestFact, short_hash};
use super::mosaic::{MosaicOptions, build_mosaic};
use super::publish::{RegisterProduct, register_product};
use super::safeguards::{self, Refusal};
use super::stages::{GroupPaths, RunResult, run_stage};
use super::state::{GROUP_STAGES, GroupState, MOSAIC_STAGE, PipelineState, StageProgress};
use crate::config::{Config, IngestConfig, MosaicConfig, StagesConfig};
use crate::events::catalogue::{
    DomainEvent, EventMetadata, GroupFormed, GroupRejected, MosaicGroupCreated,
    MosaicGroupRejected, StageCompleted, StageFailed, StageStarted,
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
        }
    }
}

/// One unit of work the worker can take.
#[derive(Debug, Clone)]
enum Work {
    Stage { group: String, stage: usize },
    Decide { members: Vec<String> },
    Build { mosaic: String },
    RegisterMosaic { mosaic: String },
    RegisterImage { group: String },
}

/// The worker. Cheap to clone.
#[derive(Clone)]
pub struct Pipeline {
    ledger: Ledger,
    cfg: Arc<PipelineConfig>,
    state: Arc<Mutex<PipelineState>>,
    meta: EventMetadata,
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
        let p = Pipeline {
            ledger,
            cfg: Arc::new(cfg),
            state: Arc::new(Mutex::new(PipelineState::default())),
            meta: EventMetadata::actor("pipeline"),
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

    /// Folds every event committed since the last fold.
    pub async fn catch_up(&self) -> anyhow::Result<()> {
        let mut state = self.state.lock().await;
        loop {
            let (events, next) = self
                .ledger
                .read_all(Some(state.next_position), Direction::Forward, 1000)
                .await
                .map_err(store_err)?;
            for e in &events {
                state.apply(e);
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
        let r = self.ledger.append(stream, expected, events).await;
        // Fold what was written (or what beat us to it) before deciding anything else.
        if let Err(e) = self.catch_up().await {
            tracing::warn!(error = %e, "folding the log after an append");
        }
        r.map(|_| ())
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
        let outcome = {
            let state = self.state.lock().await;
            ingest
                .scan(&state, Utc::now())
                .map_err(|e| anyhow::anyhow!("scanning {}: {e}", ingest.dir.display()))?
        };
        if outcome.is_empty() {
            return Ok(0);
        }
        let mut written = 0;
        for (stream, facts) in outcome.ingest {
            for chunk in facts.chunks(500) {
                let head = self.state.lock().await.ingest_heads.get(&stream).copied();
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
                match self.append(&stream, expected, events).await {
                    Ok(()) => written += chunk.len(),
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
            let stream = format!("group-{}", g.group_id);
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
        let stream = format!("group-{}", g.group_id);
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
            Utc::now(),
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
        let (groups, mosaics) = {
            let s = self.state.lock().await;
            let ours = |p: &StageProgress| {
                p.running
                    .as_ref()
                    .filter(|(_, _, h)| h.is_none() || *h == host)
                    .map(|(a, _, _)| *a)
            };
            let groups: Vec<(String, usize, u32)> = s
                .groups
                .values()
                .flat_map(|g| {
                    g.stages
                        .iter()
                        .enumerate()
                        .filter_map(|(i, p)| ours(p).map(|a| (g.id.clone(), i, a)))
                        .collect::<Vec<_>>()
                })
                .collect();
            let mosaics: Vec<(String, u32)> = s
                .mosaics
                .values()
                .filter_map(|m| ours(&m.build).map(|a| (m.id.clone(), a)))
                .collect();
            (groups, mosaics)
        };
        let n = groups.len() + mosaics.len();
        for (id, stage, attempt) in groups {
            let f = self.failure(
                GROUP_STAGES[stage],
                attempt,
                &RunResult::interrupted(),
                &self.cfg.stages,
            );
            self.append(
                &format!("group-{id}"),
                ExpectedRevision::Any,
                vec![self.event(&f)],
            )
            .await
            .map_err(store_err)?;
        }
        for (id, attempt) in mosaics {
            let f = self.failure(
                MOSAIC_STAGE,
                attempt,
                &RunResult::interrupted(),
                &self.cfg.stages,
            );
            self.append(
                &format!("mosaic-{id}"),
                ExpectedRevision::Any,
                vec![self.event(&f)],
            )
            .await
            .map_err(store_err)?;
        }
        if n > 0 {
            tracing::warn!(interrupted = n, "settled stages a stop cut short");
        }
        Ok(n)
    }

    /// Picks the next due unit of work: staging and mosaic decisions first (cheap), then
    /// mosaic builds, then group stages in observation order. `Err(when)` when nothing is
    /// due, with the earliest retry time if one is pending.
    async fn next_work(&self, now: DateTime<Utc>) -> Result<Work, Option<DateTime<Utc>>> {
        let s = self.state.lock().await;
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
            if m.build.completed.is_some() && !s.products.contains(&mosaic_product(&m.id)) {
                return Ok(Work::RegisterMosaic {
                    mosaic: m.id.clone(),
                });
            }
        }
        if self.cfg.stage_images {
            for g in s.groups.values() {
                if g.stages[2].completed.is_some() && !s.products.contains(&image_product(&g.id)) {
                    return Ok(Work::RegisterImage {
                        group: g.id.clone(),
                    });
                }
            }
        }
        if let Some(members) = next_window(&s, &self.cfg.mosaic) {
            return Ok(Work::Decide { members });
        }
        for id in &s.mosaic_order {
            let m = &s.mosaics[id];
            if m.rejected.is_none() && s.known_members(m) && due(&m.build) {
                return Ok(Work::Build {
                    mosaic: m.id.clone(),
                });
            }
        }
        for g in s.groups.values() {
            if let Some(i) = g.next_stage()
                && due(&g.stages[i])
            {
                return Ok(Work::Stage {
                    group: g.id.clone(),
                    stage: i,
                });
            }
        }
        Err(earliest)
    }

    /// Does one unit of work. `Ok(None)` when something was done; `Ok(Some(wait))` when
    /// nothing is due for `wait`.
    pub async fn step(&self) -> anyhow::Result<Option<Duration>> {
        self.catch_up().await?;
        let idle = Duration::from_secs_f64(self.cfg.ingest.poll_interval_s);
        let work = match self.next_work(Utc::now()).await {
            Ok(w) => w,
            Err(None) => return Ok(Some(idle)),
            Err(Some(t)) => {
                let wait = (t - Utc::now()).to_std().unwrap_or_default();
                return Ok(Some(wait.min(idle)));
            }
        };
        match work {
            Work::Stage { group, stage } => self.run_group_stage(&group, stage).await?,
            Work::Decide { members } => self.decide(members).await?,
            Work::Build { mosaic } => self.build(&mosaic).await?,
            Work::RegisterMosaic { mosaic } => self.register_mosaic(&mosaic).await?,
            Work::RegisterImage { group } => self.register_image(&group).await?,
        }
        Ok(None)
    }

    fn failure(&self, stage: &str, attempt: u32, r: &RunResult, cfg: &StagesConfig) -> StageFailed {
        let f = r.outcome.as_ref().err();
        let next = (attempt < cfg.max_attempts).then(|| {
            let i = (attempt as usize)
                .saturating_sub(1)
                .min(cfg.backoff_s.len() - 1);
            let wait = chrono::Duration::milliseconds((cfg.backoff_s[i] * 1e3) as i64);
            format_time(Utc::now() + wait)
        });
        StageFailed {
            stage: stage.into(),
            attempt,
            duration_s: r.duration.as_secs_f64(),
            exit_status: r.exit_status,
            timed_out: f.is_some_and(|f| f.timed_out),
            stderr_tail: f.map(|f| f.stderr_tail.clone()).unwrap_or_default(),
            error: f.map(|f| f.error.clone()).unwrap_or_default(),
            next_retry_at: next,
        }
    }

    async fn run_group_stage(&self, id: &str, stage: usize) -> anyhow::Result<()> {
        let Some(group) = self.state.lock().await.group(id).cloned() else {
            return Ok(());
        };
        let name = GROUP_STAGES[stage];
        let attempt = group.stages[stage].attempts + 1;
        let paths = GroupPaths::new(&self.cfg.work_root, id);
        let command = match (&self.cfg.stages.runner, stage) {
            (crate::config::RunnerKind::External, _) => {
                let c = [
                    &self.cfg.stages.convert,
                    &self.cfg.stages.calibrate,
                    &self.cfg.stages.image,
                ][stage];
                c.as_ref()
                    .map(|c| super::stages::render(&c.command, stage, &group, &paths))
            }
            _ => None,
        };
        let started = StageStarted {
            stage: name.into(),
            attempt,
            command,
        };
        let stream = format!("group-{id}");
        if !self.take_stage(&stream, group.head, &started).await? {
            return Ok(());
        }
        let r = run_stage(
            &self.cfg.stages,
            stage,
            &group,
            &paths,
            self.cfg.default_dec,
        )
        .await;
        self.finish_stage(&stream, name, attempt, &r).await
    }

    /// Takes a stage's lock: `StageStarted` with `Exact(head)`. `false` when another worker
    /// took it first.
    async fn take_stage(
        &self,
        stream: &str,
        head: u64,
        started: &StageStarted,
    ) -> anyhow::Result<bool> {
        match self
            .append(
                stream,
                ExpectedRevision::Exact(head),
                vec![self.event(started)],
            )
            .await
        {
            Ok(()) => {
                tracing::info!(%stream, stage = %started.stage, attempt = started.attempt, "stage started");
                Ok(true)
            }
            Err(StoreError::WrongExpectedVersion { .. }) => Ok(false),
            Err(e) => Err(store_err(e)),
        }
    }

    /// Records how a run ended: `StageCompleted` with its outputs, or `StageFailed` with the
    /// next retry time. Appended with `Any`: the worker holds the stage's lock.
    async fn finish_stage(
        &self,
        stream: &str,
        stage: &str,
        attempt: u32,
        r: &RunResult,
    ) -> anyhow::Result<()> {
        let event = match &r.outcome {
            Ok(outputs) => {
                tracing::info!(%stream, stage, seconds = r.duration.as_secs_f64(), "stage completed");
                self.event(&StageCompleted {
                    stage: stage.into(),
                    attempt,
                    duration_s: r.duration.as_secs_f64(),
                    exit_status: r.exit_status,
                    outputs: outputs.clone(),
                })
            }
            Err(f) => {
                tracing::warn!(%stream, stage, attempt, error = %f.error, "stage failed");
                self.event(&self.failure(stage, attempt, r, &self.cfg.stages))
            }
        };
        self.append(stream, ExpectedRevision::Any, vec![event])
            .await
            .map_err(store_err)
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
        let stream = format!("mosaic-{id}");
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
                .filter_map(|g| g.outputs(2).first().map(PathBuf::from))
                .collect();
            let beams: Vec<PathBuf> = groups
                .iter()
                .filter_map(|g| g.outputs(2).get(1).map(PathBuf::from))
                .collect();
            (m, tiles, beams)
        };
        let attempt = mosaic.build.attempts + 1;
        let stream = format!("mosaic-{id}");
        let started = StageStarted {
            stage: MOSAIC_STAGE.into(),
            attempt,
            command: None,
        };
        if !self.take_stage(&stream, mosaic.head, &started).await? {
            return Ok(());
        }
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
                .map_err(super::stages::RunFailure::from_error),
            command: None,
        };
        self.finish_stage(&stream, MOSAIC_STAGE, attempt, &r).await
    }

    async fn register(&self, req: RegisterProduct) -> anyhow::Result<()> {
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
            ("mosaic_id".to_string(), serde_json::Value::from(id)),
            (
                "members".to_string(),
                serde_json::Value::from(m.members.join(",")),
            ),
        ]
        .into_iter()
        .collect();
        self.register(RegisterProduct {
            data_id: mosaic_product(id),
            data_type: "mosaic".into(),
            stage_path: folder,
            qa_status: Some("passed".into()),
            validation_status: Some("validated".into()),
            auto_publish: Some(true),
            metadata: Some(metadata),
        })
        .await
    }

    async fn register_image(&self, group: &str) -> anyhow::Result<()> {
        let Some(g) = self.state.lock().await.group(group).cloned() else {
            return Ok(());
        };
        let Some(tile) = g.outputs(2).first().cloned() else {
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
            ("group_id".to_string(), serde_json::Value::from(group)),
            (
                "obs_time".to_string(),
                serde_json::Value::from(g.obs_time.clone()),
            ),
        ]
        .into_iter()
        .collect();
        self.register(RegisterProduct {
            data_id: image_product(group),
            data_type: "image".into(),
            stage_path: staged.display().to_string(),
            qa_status: Some("passed".into()),
            validation_status: Some("validated".into()),
            auto_publish: Some(true),
            metadata: Some(metadata),
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
/// starts at the first group (or at the `tiles - overlap`-th member of the last decided
/// mosaic group), holds `tiles` groups in observation order, every member is imaged or
/// given up, and no observation inside it is still collecting subbands.
pub fn next_window(s: &PipelineState, cfg: &MosaicConfig) -> Option<Vec<String>> {
    let start = match s.last_mosaic() {
        Some(m) => {
            let id = m.members.get(cfg.tiles - cfg.overlap)?;
            s.group_obs.get(id)?.clone()
        }
        None => s.groups.keys().next()?.clone(),
    };
    let members: Vec<&GroupState> = s
        .groups
        .range(start..)
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

pub fn mosaic_product(id: &str) -> String {
    format!("mosaic-{id}")
}

pub fn image_product(group: &str) -> String {
    format!("image-{group}")
}

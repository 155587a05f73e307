//! What the pipeline knows, folded from the ledger: which incoming files were taken or
//! refused, the observations still collecting subbands, the groups and how far each got
//! through its stages, and the mosaic groups decided so far. A worker rebuilds this from
//! position 0 when it starts and folds new events (its own and other workers') as they
//! commit, so a restart resumes exactly where the log says it stood: no file is taken
//! twice and none is forgotten.
//!
//! Folding is idempotent per fact (a file name, a group's stage attempt, a mosaic id), and
//! the fold takes nothing from the configuration: an event carries every decision it
//! records (the observation a file joined, the members of a group).

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};

use crate::events::catalogue::{
    DomainEvent, EventMetadata, GroupFormed, GroupRejected, IngestGroupTimedOut,
    MosaicGroupCreated, MosaicGroupRejected, ProductRegistered, StageCompleted, StageFailed,
    StageStarted, StreamName, SubbandFileAccepted, SubbandFileRejected,
};
use crate::events::record::RecordRef;

/// A stage of the pipeline: three per observation group, in order, then the mosaic
/// build of a mosaic group. Stored by name in the stage events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    Convert,
    Calibrate,
    Image,
    Mosaic,
}

impl Stage {
    /// The stages of an observation group, in the order they run.
    pub const GROUP: [Stage; 3] = [Stage::Convert, Stage::Calibrate, Stage::Image];

    /// The name stored in `StageStarted`, `StageCompleted` and `StageFailed`.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Convert => "convert",
            Stage::Calibrate => "calibrate",
            Stage::Image => "image",
            Stage::Mosaic => "mosaic",
        }
    }

    /// A stage name as a metrics label: one of the four, or `unknown` (labels are a
    /// bounded set whatever the log holds).
    pub fn label(name: Option<&str>) -> String {
        name.and_then(Stage::parse)
            .map_or("unknown", Stage::name)
            .to_string()
    }

    pub fn parse(name: &str) -> Option<Stage> {
        [
            Stage::Convert,
            Stage::Calibrate,
            Stage::Image,
            Stage::Mosaic,
        ]
        .into_iter()
        .find(|s| s.name() == name)
    }

    /// Its place among a group's stages; `None` for the mosaic build.
    fn group_index(self) -> Option<usize> {
        Stage::GROUP.iter().position(|s| *s == self)
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An observation still collecting subbands.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingObs {
    /// Commit time of its first accepted file (the timeout counts from here).
    pub first_seen: DateTime<Utc>,
    /// Subband number to file path.
    pub subbands: BTreeMap<u8, String>,
    /// Subband number to its header, for the files whose events carry one.
    pub headers: BTreeMap<u8, crate::events::catalogue::SubbandHeader>,
}

/// How an observation ended.
#[derive(Debug, Clone, PartialEq)]
pub enum ObsOutcome {
    Formed(String),
    TimedOut,
    /// Its group id was held by other members (see `GroupRejected`).
    Refused,
}

/// One stage of one group (or of a mosaic).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StageProgress {
    /// Attempts started so far.
    pub attempts: u32,
    /// An attempt started and not yet finished: its number, start, and who runs it (the
    /// `worker` of its `StageStarted`, else the host of its metadata).
    pub running: Option<(u32, DateTime<Utc>, Option<String>)>,
    pub completed: Option<Vec<String>>,
    pub last_error: Option<String>,
    /// The last lines of the failed attempt's stderr, when it wrote any.
    pub last_stderr: Option<String>,
    /// When the next attempt may start; `None` with `last_error` set means given up.
    pub next_retry_at: Option<DateTime<Utc>>,
    pub given_up: bool,
}

impl StageProgress {
    fn started(&mut self, attempt: u32, at: DateTime<Utc>, who: Option<String>) {
        self.attempts = self.attempts.max(attempt);
        if self.completed.is_none() && !self.given_up {
            self.running = Some((attempt, at, who));
        }
    }

    fn completed(&mut self, attempt: u32, outputs: Vec<String>) {
        // A late result of an attempt that was superseded (settled as interrupted, then
        // retried) does not speak for the attempt now running.
        if attempt < self.attempts {
            return;
        }
        self.attempts = attempt;
        self.running = None;
        self.completed = Some(outputs);
        self.next_retry_at = None;
    }

    fn failed(&mut self, f: &StageFailed) {
        if f.attempt < self.attempts {
            return;
        }
        self.attempts = f.attempt;
        self.running = None;
        self.last_error = Some(f.error.clone());
        self.last_stderr = Some(f.stderr_tail.clone()).filter(|t| !t.is_empty());
        self.next_retry_at = f
            .next_retry_at
            .as_deref()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc));
        self.given_up = self.next_retry_at.is_none();
    }

    /// Done, one way or the other.
    pub fn settled(&self) -> bool {
        self.completed.is_some() || self.given_up
    }
}

/// A formed group: one observation's 16 subbands, on its way to an image.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupState {
    pub id: String,
    pub obs_time: String,
    pub files: Vec<String>,
    pub dec_deg: Option<f64>,
    /// Progress of convert, calibrate, image (the order of [`Stage::GROUP`]); read it
    /// through [`GroupState::stage`].
    pub stages: [StageProgress; 3],
    /// Revision of the last event in `group-<id>`.
    pub head: u64,
}

impl GroupState {
    /// The first stage not yet completed, unless a stage was given up.
    pub fn next_stage(&self) -> Option<Stage> {
        if self.failed() {
            return None;
        }
        Stage::GROUP
            .into_iter()
            .find(|s| self.stage(*s).completed.is_none())
    }

    /// The progress of one of the group's stages. The mosaic build is not one of them:
    /// asking for it is a bug, answered with the image stage's progress.
    pub fn stage(&self, stage: Stage) -> &StageProgress {
        debug_assert!(stage != Stage::Mosaic, "a group has no mosaic stage");
        &self.stages[stage.group_index().unwrap_or(2)]
    }

    fn stage_mut(&mut self, stage: Stage) -> Option<&mut StageProgress> {
        stage.group_index().map(|i| &mut self.stages[i])
    }

    pub fn imaged(&self) -> bool {
        self.stage(Stage::Image).completed.is_some()
    }

    /// A stage was given up: the group will never have an image.
    pub fn failed(&self) -> bool {
        self.stages.iter().any(|s| s.given_up)
    }

    /// Imaged or failed: a mosaic may be decided over it.
    pub fn settled(&self) -> bool {
        self.failed() || self.imaged()
    }

    /// What a completed stage wrote (the MS; the calibration tables; the tile and its
    /// beam), empty until it completes.
    pub fn outputs(&self, stage: Stage) -> &[String] {
        self.stage(stage).completed.as_deref().unwrap_or(&[])
    }
}

/// A mosaic group the ledger decided on.
#[derive(Debug, Clone, PartialEq)]
pub struct MosaicState {
    pub id: String,
    pub members: Vec<String>,
    /// `None` when created; the safeguard that refused it otherwise.
    pub rejected: Option<String>,
    /// Why it was refused, and the member at fault when one is.
    pub rejected_reason: Option<String>,
    pub rejected_member: Option<String>,
    pub build: StageProgress,
    pub head: u64,
}

/// The fold.
#[derive(Debug, Clone, Default)]
pub struct PipelineState {
    /// The next log position to fold.
    pub next_position: u64,
    /// Last revision of the `ingest-` streams (appends use `Exact`).
    pub ingest_heads: HashMap<String, u64>,
    /// File name to its fate: `Ok(observation)` when accepted, `Err(reason)` when refused.
    pub files: HashMap<String, Result<String, String>>,
    /// Observations collecting subbands, by the name time of their first file.
    pub pending: BTreeMap<String, PendingObs>,
    /// Observations that formed a group or timed out.
    pub closed: BTreeMap<String, ObsOutcome>,
    /// Formed groups by observation time (so iteration is in observation order).
    pub groups: BTreeMap<String, GroupState>,
    /// Group id to observation time.
    pub group_obs: HashMap<String, String>,
    /// Mosaic groups by id, and the order they were decided in.
    pub mosaics: HashMap<String, MosaicState>,
    pub mosaic_order: Vec<String>,
    /// Every registered product the pipeline names (`worker::pipeline_product`).
    pub products: HashSet<String>,
    /// Events of the pipeline's categories whose payload did not decode: counted and
    /// kept aside (the first ones, with the reason), never silently dropped.
    pub parked: ParkedEvents,
}

/// Events a fold could not take.
#[derive(Debug, Clone, Default)]
pub struct ParkedEvents {
    pub total: u64,
    /// The first [`ParkedEvents::KEPT`]: position, type and reason.
    pub first: Vec<(u64, String, String)>,
}

impl ParkedEvents {
    pub const KEPT: usize = 100;

    fn park(&mut self, e: &RecordRef<'_>, reason: String) {
        self.total += 1;
        tracing::warn!(position = e.position, event_type = e.event_type, %reason, "pipeline event parked: its payload does not decode");
        if self.first.len() < Self::KEPT {
            self.first
                .push((e.position, e.event_type.to_string(), reason));
        }
    }
}

/// The payload of `e`, or `None` with the event parked.
fn decode<T: serde::de::DeserializeOwned>(
    e: &RecordRef<'_>,
    parked: &mut ParkedEvents,
) -> Option<T> {
    match serde_json::from_slice(e.data) {
        Ok(v) => Some(v),
        Err(err) => {
            parked.park(e, format!("{} does not decode: {err}", e.event_type));
            None
        }
    }
}

impl PipelineState {
    /// Folds one event (others are ignored).
    pub fn apply(&mut self, e: &RecordRef<'_>) {
        self.next_position = self.next_position.max(e.position + 1);
        let at = e.created();
        match e.category() {
            "ingest" => {
                let head = self
                    .ingest_heads
                    .entry(e.stream_id.to_string())
                    .or_insert(0);
                *head = (*head).max(e.revision);
                self.apply_ingest(e, at);
            }
            "group" => self.apply_group(e, at),
            "mosaic" => self.apply_mosaic(e, at),
            // Only the pipeline's own products matter here; the others (a million on a
            // large ledger) are the publish model's, and are not even decoded.
            "product"
                if e.event_type == ProductRegistered::TYPE
                    && super::worker::pipeline_product(crate::events::record::entity_of(
                        e.stream_id,
                    )) =>
            {
                if let Some(p) = decode::<ProductRegistered>(e, &mut self.parked) {
                    self.products.insert(p.data_id);
                }
            }
            _ => {}
        }
    }

    fn apply_ingest(&mut self, e: &RecordRef<'_>, at: DateTime<Utc>) {
        match e.event_type {
            SubbandFileAccepted::TYPE => {
                let Some(f) = decode::<SubbandFileAccepted>(e, &mut self.parked) else {
                    return;
                };
                let name = file_name(&f.path);
                if self.files.contains_key(&name) {
                    return;
                }
                let obs = f.group_obs_time.unwrap_or(f.obs_time);
                self.files.insert(name, Ok(obs.clone()));
                if self.closed.contains_key(&obs) {
                    return;
                }
                let set = self.pending.entry(obs).or_insert_with(|| PendingObs {
                    first_seen: at,
                    subbands: BTreeMap::new(),
                    headers: BTreeMap::new(),
                });
                if let std::collections::btree_map::Entry::Vacant(slot) =
                    set.subbands.entry(f.subband)
                {
                    slot.insert(f.path);
                    if let Some(h) = f.header {
                        set.headers.insert(f.subband, h);
                    }
                }
            }
            SubbandFileRejected::TYPE => {
                if let Some(f) = decode::<SubbandFileRejected>(e, &mut self.parked) {
                    let name = file_name(&f.path);
                    self.files.entry(name).or_insert(Err(f.reason));
                }
            }
            IngestGroupTimedOut::TYPE => {
                if let Some(t) = decode::<IngestGroupTimedOut>(e, &mut self.parked) {
                    self.close(t.obs_time, ObsOutcome::TimedOut);
                }
            }
            GroupRejected::TYPE => {
                if let Some(r) = decode::<GroupRejected>(e, &mut self.parked) {
                    self.close(r.obs_time, ObsOutcome::Refused);
                }
            }
            _ => {}
        }
    }

    /// Ends an observation that is not ended yet.
    fn close(&mut self, obs: String, outcome: ObsOutcome) {
        if !self.closed.contains_key(&obs) {
            self.pending.remove(&obs);
            self.closed.insert(obs, outcome);
        }
    }

    /// Observations given up for missing subbands.
    pub fn timed_out(&self) -> usize {
        self.closed
            .values()
            .filter(|o| **o == ObsOutcome::TimedOut)
            .count()
    }

    fn apply_group(&mut self, e: &RecordRef<'_>, at: DateTime<Utc>) {
        // `group` alone is a valid stream of the category, with no id: not a group.
        let Some(id) = StreamName::id_in(e.stream_id, "group").map(str::to_string) else {
            return;
        };
        if e.event_type == GroupFormed::TYPE {
            let Some(g) = decode::<GroupFormed>(e, &mut self.parked) else {
                return;
            };
            // One group per observation: a second id for a formed observation (another
            // writer's) does not replace the group that is there.
            if self.group_obs.contains_key(&id) || self.groups.contains_key(&g.obs_time) {
                return;
            }
            self.pending.remove(&g.obs_time);
            self.closed
                .insert(g.obs_time.clone(), ObsOutcome::Formed(id.clone()));
            // Its files are taken, whoever recorded their acceptance.
            for f in &g.files {
                self.files
                    .entry(file_name(f))
                    .or_insert_with(|| Ok(g.obs_time.clone()));
            }
            self.group_obs.insert(id.clone(), g.obs_time.clone());
            self.groups.insert(
                g.obs_time.clone(),
                GroupState {
                    id,
                    obs_time: g.obs_time,
                    files: g.files,
                    dec_deg: g.dec_deg,
                    stages: Default::default(),
                    head: e.revision,
                },
            );
            return;
        }
        let Some(group) = self
            .group_obs
            .get(&id)
            .and_then(|obs| self.groups.get_mut(obs))
        else {
            return;
        };
        group.head = group.head.max(e.revision);
        match e.event_type {
            StageStarted::TYPE => {
                if let Some(s) = decode::<StageStarted>(e, &mut self.parked)
                    && let Some(p) = Stage::parse(&s.stage).and_then(|st| group.stage_mut(st))
                {
                    p.started(s.attempt, at, s.worker.clone().or_else(|| host_of(e)));
                }
            }
            StageCompleted::TYPE => {
                if let Some(s) = decode::<StageCompleted>(e, &mut self.parked)
                    && let Some(p) = Stage::parse(&s.stage).and_then(|st| group.stage_mut(st))
                {
                    p.completed(s.attempt, s.outputs);
                }
            }
            StageFailed::TYPE => {
                if let Some(s) = decode::<StageFailed>(e, &mut self.parked)
                    && let Some(p) = Stage::parse(&s.stage).and_then(|st| group.stage_mut(st))
                {
                    p.failed(&s);
                }
            }
            _ => {}
        }
    }

    fn apply_mosaic(&mut self, e: &RecordRef<'_>, at: DateTime<Utc>) {
        let Some(id) = StreamName::id_in(e.stream_id, "mosaic").map(str::to_string) else {
            return;
        };
        match e.event_type {
            MosaicGroupCreated::TYPE => {
                if let Some(m) = decode::<MosaicGroupCreated>(e, &mut self.parked) {
                    self.decide_mosaic(id, m.members, None, e.revision);
                }
            }
            MosaicGroupRejected::TYPE => {
                let Some(m) = decode::<MosaicGroupRejected>(e, &mut self.parked) else {
                    return;
                };
                // A collision recorded after the created group: that group stands, and the
                // refused window is a decision of its own.
                let key = match self.mosaics.get_mut(&id) {
                    Some(existing) => {
                        existing.head = existing.head.max(e.revision);
                        format!("{id}@{}", e.revision)
                    }
                    None => id,
                };
                self.decide_mosaic(key.clone(), m.members, Some(m.safeguard), e.revision);
                // The first decision under a key stands, with its reason.
                if let Some(decided) = self.mosaics.get_mut(&key)
                    && decided.rejected.is_some()
                    && decided.rejected_reason.is_none()
                {
                    decided.rejected_reason = Some(m.reason);
                    decided.rejected_member = m.member;
                }
            }
            StageStarted::TYPE | StageCompleted::TYPE | StageFailed::TYPE => {
                let Some(m) = self.mosaics.get_mut(&id) else {
                    return;
                };
                m.head = m.head.max(e.revision);
                match e.event_type {
                    StageStarted::TYPE => {
                        if let Some(s) = decode::<StageStarted>(e, &mut self.parked) {
                            m.build
                                .started(s.attempt, at, s.worker.clone().or_else(|| host_of(e)));
                        }
                    }
                    StageCompleted::TYPE => {
                        if let Some(s) = decode::<StageCompleted>(e, &mut self.parked) {
                            m.build.completed(s.attempt, s.outputs);
                        }
                    }
                    _ => {
                        if let Some(s) = decode::<StageFailed>(e, &mut self.parked) {
                            m.build.failed(&s);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// Records a mosaic decision under `key`, unless one is recorded there already.
    fn decide_mosaic(
        &mut self,
        key: String,
        members: Vec<String>,
        rejected: Option<String>,
        revision: u64,
    ) {
        if self.mosaics.contains_key(&key) {
            return;
        }
        self.mosaic_order.push(key.clone());
        self.mosaics.insert(
            key.clone(),
            MosaicState {
                id: key,
                members,
                rejected,
                rejected_reason: None,
                rejected_member: None,
                build: StageProgress::default(),
                head: revision,
            },
        );
    }

    /// The group of an id.
    pub fn group(&self, id: &str) -> Option<&GroupState> {
        self.group_obs.get(id).and_then(|o| self.groups.get(o))
    }

    /// Every member is a group this ledger formed (not another writer's squatting id).
    pub fn known_members(&self, m: &MosaicState) -> bool {
        m.members.iter().all(|g| self.group_obs.contains_key(g))
    }

    /// The last decided mosaic group (created or refused, in log order) over groups this
    /// ledger formed; a group over unknown members (another writer's) does not count.
    pub fn last_mosaic(&self) -> Option<&MosaicState> {
        self.mosaic_order
            .iter()
            .rev()
            .filter_map(|id| self.mosaics.get(id))
            .find(|m| self.known_members(m))
    }
}

fn host_of(e: &RecordRef<'_>) -> Option<String> {
    serde_json::from_slice::<EventMetadata>(e.metadata)
        .ok()
        .and_then(|m| m.host)
}

/// The last component of a path (the whole string when it has none).
pub fn file_name(path: &str) -> String {
    std::path::Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::RecordedEvent;

    fn record(stream: &str, event_type: &str, data: &[u8], position: u64) -> RecordedEvent {
        RecordedEvent {
            event_id: uuid::Uuid::new_v4(),
            stream_id: stream.into(),
            revision: position,
            position,
            event_type: event_type.into(),
            event_version: 1,
            data: data.to_vec(),
            metadata: b"{}".to_vec(),
            created_micros: 1_796_000_000_000_000,
            checksum: 0,
        }
    }

    /// Regression: a `StageCompleted` that did not decode vanished, and its stage looked
    /// running forever. Now it is parked and counted.
    #[test]
    fn an_event_that_does_not_decode_is_parked_and_counted() {
        let mut s = PipelineState::default();
        let formed = serde_json::to_vec(&GroupFormed {
            group_id: "g1".into(),
            obs_time: "2026-11-30T10:00:00".into(),
            files: vec!["/in/a_sb00.hdf5".into()],
            dec_deg: Some(71.6),
        })
        .unwrap();
        s.apply(&record("group-g1", GroupFormed::TYPE, &formed, 0).view());
        s.apply(&record("group-g1", StageCompleted::TYPE, br#"{"stage": 5}"#, 1).view());
        s.apply(&record("ingest-2026-11-30", SubbandFileAccepted::TYPE, b"[]", 2).view());
        assert_eq!(s.parked.total, 2);
        assert_eq!(s.parked.first[0].0, 1);
        assert!(
            s.parked.first[0].2.contains("StageCompleted"),
            "{:?}",
            s.parked.first
        );
        // Events of other categories are not the pipeline's to judge.
        s.apply(&record("scratch-1", StageCompleted::TYPE, b"nonsense", 3).view());
        assert_eq!(s.parked.total, 2);
    }
}

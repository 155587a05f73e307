//! What the pipeline and the publisher have done, as Prometheus counters and histograms,
//! folded from the log: subband files accepted and refused (by reason), groups formed,
//! timed out and refused, stage runs, failures and durations (by stage), mosaics created
//! and refused (by safeguard), publishes attempted, succeeded and failed, events appended
//! (by category). The server follows the log with it, so the figures are the same
//! whichever process ran the pipeline, and start again from the log after a restart.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::de::DeserializeOwned;

use crate::events::RecordedEvent;
use crate::events::catalogue::{
    MosaicGroupRejected, StageCompleted, StageFailed, StageStarted, SubbandFileRejected,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Category {
    pub category: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    pub stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Safeguard {
    pub safeguard: String,
}

fn stage_histogram() -> Histogram {
    // 0.1 s to about 27 minutes.
    Histogram::new(exponential_buckets(0.1, 2.0, 15))
}

/// The handles; clones share their values.
#[derive(Clone)]
pub struct Activity {
    events: Family<Category, Counter>,
    files_accepted: Counter,
    files_refused: Family<Reason, Counter>,
    last_file_accepted: Gauge<f64, std::sync::atomic::AtomicU64>,
    groups_formed: Counter,
    groups_timed_out: Counter,
    groups_refused: Counter,
    stage_runs: Family<StageLabel, Counter>,
    stage_failures: Family<StageLabel, Counter>,
    stage_seconds: Family<StageLabel, Histogram, fn() -> Histogram>,
    mosaics_created: Counter,
    mosaics_refused: Family<Safeguard, Counter>,
    publishes_attempted: Counter,
    publishes_succeeded: Counter,
    publishes_failed: Counter,
    /// Position of the next event to fold.
    next: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Default for Activity {
    /// Every labelled series of a known label starts at 0, so that its first increase
    /// shows (a series that appears at 3 would show none).
    fn default() -> Self {
        let a = Activity::empty();
        for stage in ["convert", "calibrate", "image", "mosaic"] {
            let l = StageLabel {
                stage: stage.to_string(),
            };
            let _ = a.stage_runs.get_or_create(&l);
            let _ = a.stage_failures.get_or_create(&l);
        }
        for reason in crate::pipeline::ingest::REASON_CLASSES {
            let _ = a.files_refused.get_or_create(&Reason {
                reason: reason.to_string(),
            });
        }
        for safeguard in crate::pipeline::safeguards::NAMES {
            let _ = a.mosaics_refused.get_or_create(&Safeguard {
                safeguard: safeguard.to_string(),
            });
        }
        for category in crate::events::catalogue::DOMAIN_CATEGORIES {
            let _ = a.events.get_or_create(&Category {
                category: category.to_string(),
            });
        }
        a
    }
}

impl Activity {
    fn empty() -> Self {
        Activity {
            events: Family::default(),
            files_accepted: Counter::default(),
            files_refused: Family::default(),
            last_file_accepted: Gauge::default(),
            groups_formed: Counter::default(),
            groups_timed_out: Counter::default(),
            groups_refused: Counter::default(),
            stage_runs: Family::default(),
            stage_failures: Family::default(),
            stage_seconds: Family::new_with_constructor(stage_histogram),
            mosaics_created: Counter::default(),
            mosaics_refused: Family::default(),
            publishes_attempted: Counter::default(),
            publishes_succeeded: Counter::default(),
            publishes_failed: Counter::default(),
            next: Default::default(),
        }
    }
}

fn data<T: DeserializeOwned>(e: &RecordedEvent) -> Option<T> {
    serde_json::from_slice(&e.data).ok()
}

impl Activity {
    /// The position of the next event this fold expects.
    pub fn next_position(&self) -> u64 {
        self.next.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Counts one event. Payloads are decoded only for the labels they carry; one that
    /// does not decode is counted without them (`unknown`).
    pub fn apply(&self, e: &RecordedEvent) {
        let category = crate::events::record::category_of(&e.stream_id);
        self.events
            .get_or_create(&Category {
                category: if crate::events::catalogue::DOMAIN_CATEGORIES.contains(&category) {
                    category.to_string()
                } else {
                    "other".to_string()
                },
            })
            .inc();
        let stage = |s: Option<String>| StageLabel {
            stage: crate::pipeline::state::Stage::label(s.as_deref()),
        };
        // A look-alike in another stream (`scratch-*` takes any payload) counts for nothing.
        if !crate::events::catalogue::in_its_category(&e.stream_id, &e.event_type) {
            self.next
                .store(e.position + 1, std::sync::atomic::Ordering::Release);
            return;
        }
        match e.event_type.as_str() {
            "SubbandFileAccepted" => {
                self.files_accepted.inc();
                self.last_file_accepted.set(e.created_micros as f64 / 1e6);
            }
            "SubbandFileRejected" => {
                let reason = data::<SubbandFileRejected>(e).map_or("unknown", |r| {
                    crate::pipeline::ingest::reason_class(&r.reason)
                });
                self.files_refused
                    .get_or_create(&Reason {
                        reason: reason.to_string(),
                    })
                    .inc();
            }
            "GroupFormed" => {
                self.groups_formed.inc();
            }
            "IngestGroupTimedOut" => {
                self.groups_timed_out.inc();
            }
            "GroupRejected" => {
                self.groups_refused.inc();
            }
            "StageStarted" => {
                self.stage_runs
                    .get_or_create(&stage(data::<StageStarted>(e).map(|s| s.stage)))
                    .inc();
            }
            "StageCompleted" => {
                if let Some(s) = data::<StageCompleted>(e)
                    && s.duration_s.is_finite()
                {
                    self.stage_seconds
                        .get_or_create(&stage(Some(s.stage)))
                        .observe(s.duration_s.max(0.0));
                }
            }
            "StageFailed" => {
                let s = data::<StageFailed>(e);
                let label = stage(s.as_ref().map(|s| s.stage.clone()));
                self.stage_failures.get_or_create(&label).inc();
                if let Some(s) = s.filter(|s| s.duration_s.is_finite()) {
                    self.stage_seconds
                        .get_or_create(&label)
                        .observe(s.duration_s.max(0.0));
                }
            }
            "MosaicGroupCreated" => {
                self.mosaics_created.inc();
            }
            "MosaicGroupRejected" => {
                let safeguard = data::<MosaicGroupRejected>(e)
                    .map(|r| r.safeguard)
                    .filter(|s| crate::pipeline::safeguards::NAMES.contains(&s.as_str()))
                    .unwrap_or_else(|| "unknown".into());
                self.mosaics_refused
                    .get_or_create(&Safeguard { safeguard })
                    .inc();
            }
            "PublishStarted" => {
                self.publishes_attempted.inc();
            }
            "PublishSucceeded" => {
                self.publishes_succeeded.inc();
            }
            "PublishFailed" => {
                self.publishes_failed.inc();
            }
            _ => {}
        }
        self.next
            .store(e.position + 1, std::sync::atomic::Ordering::Release);
    }

    /// Registers every handle (clones) in `registry`.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "contimg_events_appended",
            "Events in the log, by stream category",
            self.events.clone(),
        );
        r.register(
            "contimg_subband_files_accepted",
            "Subband files accepted at ingest",
            self.files_accepted.clone(),
        );
        r.register(
            "contimg_subband_files_refused",
            "Subband files refused at ingest, by reason",
            self.files_refused.clone(),
        );
        r.register(
            "contimg_subband_file_last_accepted_timestamp_seconds",
            "Commit time of the last subband file accepted (Unix seconds; 0 when none)",
            self.last_file_accepted.clone(),
        );
        r.register(
            "contimg_groups_formed",
            "Observation groups formed (16 subbands)",
            self.groups_formed.clone(),
        );
        r.register(
            "contimg_groups_timed_out",
            "Observations whose subbands did not all arrive in time",
            self.groups_timed_out.clone(),
        );
        r.register(
            "contimg_groups_refused",
            "Observation groups refused at formation (id collision)",
            self.groups_refused.clone(),
        );
        r.register(
            "contimg_stage_runs",
            "Stage runs started, by stage",
            self.stage_runs.clone(),
        );
        r.register(
            "contimg_stage_failures",
            "Stage runs failed, by stage",
            self.stage_failures.clone(),
        );
        r.register_with_unit(
            "contimg_stage_duration",
            "Stage run durations, completed or failed, by stage",
            prometheus_client::registry::Unit::Seconds,
            self.stage_seconds.clone(),
        );
        r.register(
            "contimg_mosaics_created",
            "Mosaic groups created",
            self.mosaics_created.clone(),
        );
        r.register(
            "contimg_mosaics_refused",
            "Mosaic groups refused, by safeguard",
            self.mosaics_refused.clone(),
        );
        r.register(
            "contimg_publishes_attempted",
            "Publish attempts started",
            self.publishes_attempted.clone(),
        );
        r.register(
            "contimg_publishes_succeeded",
            "Publishes that succeeded",
            self.publishes_succeeded.clone(),
        );
        r.register(
            "contimg_publishes_failed",
            "Publish attempts that failed",
            self.publishes_failed.clone(),
        );
    }
}

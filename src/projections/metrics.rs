//! Weekly metrics for the review: per day (UTC) products staged, published and failed, the
//! success rate, time-to-publish percentiles, top failure reasons and counts per data type;
//! and per pipeline stage the runs, failures and durations. Folded from the log like every
//! other read model, over a window of commit times.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::product::{ProductEvent, truncate_error};
use crate::events::RecordedEvent;
use crate::events::catalogue::{DomainEvent, StageCompleted, StageFailed};
use crate::events::record::micros_to_datetime;

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct TypeCounts {
    pub staged: u64,
    pub published: u64,
    pub failed: u64,
}

#[derive(Debug, Clone, Default)]
struct DayAcc {
    counts: TypeCounts,
    by_type: BTreeMap<String, TypeCounts>,
    ttp: Vec<f64>,
    reasons: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default)]
struct StageAcc {
    runs: u64,
    failures: u64,
    durations: Vec<f64>,
}

/// One day of the window.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DayMetrics {
    pub date: String,
    pub staged: u64,
    pub published: u64,
    pub failed: u64,
    /// `round(published / (published + failed) * 100, 2)`; `null` on a day without any
    /// publish outcome (no data is not a success).
    pub success_rate_percent: Option<f64>,
    pub time_to_publish_p50_s: Option<f64>,
    pub time_to_publish_p90_s: Option<f64>,
    pub time_to_publish_p99_s: Option<f64>,
    pub top_failure_reasons: Vec<(String, u64)>,
    pub by_type: BTreeMap<String, TypeCounts>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StageMetrics {
    pub stage: String,
    pub runs: u64,
    pub failures: u64,
    pub mean_duration_s: Option<f64>,
    pub p50_duration_s: Option<f64>,
    pub p90_duration_s: Option<f64>,
    pub max_duration_s: Option<f64>,
}

/// The figures of a window.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MetricsReport {
    pub from: String,
    pub to: String,
    pub days: Vec<DayMetrics>,
    pub totals: TypeCounts,
    /// Over the window; `null` when the window holds no publish outcome.
    pub success_rate_percent: Option<f64>,
    /// Every time to publish in the window, seconds, sorted (for the distribution).
    pub time_to_publish_s: Vec<f64>,
    pub top_failure_reasons: Vec<(String, u64)>,
    pub stages: Vec<StageMetrics>,
    pub pipeline: PipelineWeek,
}

/// What the pipeline did in the window: files, groups, stage failures, mosaics.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct PipelineWeek {
    pub files_accepted: u64,
    /// By reason class (`not_hdf5`, `late`, `duplicate`, ...).
    pub files_refused: BTreeMap<String, u64>,
    pub groups_formed: u64,
    pub groups_timed_out: u64,
    pub groups_refused: u64,
    /// Stage -> reason (`timed out`, `exit N`, or the grouped error) -> failures.
    pub stage_failures: BTreeMap<String, BTreeMap<String, u64>>,
    pub mosaics_created: u64,
    /// By safeguard.
    pub mosaics_refused: BTreeMap<String, u64>,
}

pub fn success_rate(published: u64, failed: u64) -> f64 {
    if published + failed == 0 {
        100.0
    } else {
        (published as f64 / (published + failed) as f64 * 10000.0).round() / 100.0
    }
}

/// The success rate of a period, `None` when it saw no outcome at all.
pub fn rate_if_any(published: u64, failed: u64) -> Option<f64> {
    (published + failed > 0).then(|| success_rate(published, failed))
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    Some(sorted[rank.min(sorted.len()) - 1])
}

/// A failure reason, grouped: paths become `<path>` and the `(os error N)` tail goes, so
/// that the same fault on different files counts as one reason. At most 120 characters.
pub fn reason_key(error: &str) -> String {
    let e = truncate_error(error);
    let e = match e.find(" (os error") {
        Some(cut) => &e[..cut],
        None => &e,
    };
    let words: Vec<String> = e
        .split(' ')
        .map(|w| {
            if w.starts_with('/') {
                let tail = if w.ends_with(':') { ":" } else { "" };
                format!("<path>{tail}")
            } else {
                w.to_string()
            }
        })
        .collect();
    words.join(" ").chars().take(120).collect()
}

fn top(reasons: &BTreeMap<String, u64>, n: usize) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = reasons.iter().map(|(k, c)| (k.clone(), *c)).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(n);
    v
}

/// Folds events; counts those committed in `[from, to]` (microseconds), remembering from
/// earlier ones what it needs (when and as what each product was staged).
#[derive(Debug, Clone)]
pub struct Metrics {
    from: i64,
    to: i64,
    staged: HashMap<String, (i64, String)>,
    days: BTreeMap<String, DayAcc>,
    stages: BTreeMap<String, StageAcc>,
    pipeline: PipelineWeek,
}

impl Metrics {
    pub fn new(from: i64, to: i64) -> Self {
        Metrics {
            from,
            to,
            staged: HashMap::new(),
            days: BTreeMap::new(),
            stages: BTreeMap::new(),
            pipeline: PipelineWeek::default(),
        }
    }

    /// Counts an ingest, group or mosaic fact of the window; false for any other event.
    fn pipeline_event(&mut self, r: &RecordedEvent) -> bool {
        use crate::events::catalogue::{MosaicGroupRejected, SubbandFileRejected};
        if !crate::events::catalogue::in_its_category(&r.stream_id, &r.event_type) {
            return false;
        }
        let p = &mut self.pipeline;
        match r.event_type.as_str() {
            "SubbandFileAccepted" => p.files_accepted += 1,
            "SubbandFileRejected" => {
                let class = serde_json::from_slice::<SubbandFileRejected>(&r.data)
                    .map_or("unknown", |e| {
                        crate::pipeline::ingest::reason_class(&e.reason)
                    });
                *p.files_refused.entry(class.to_string()).or_default() += 1;
            }
            "GroupFormed" => p.groups_formed += 1,
            "IngestGroupTimedOut" => p.groups_timed_out += 1,
            "GroupRejected" => p.groups_refused += 1,
            "MosaicGroupCreated" => p.mosaics_created += 1,
            "MosaicGroupRejected" => {
                let safeguard = serde_json::from_slice::<MosaicGroupRejected>(&r.data)
                    .map_or_else(|_| "unknown".to_string(), |e| e.safeguard);
                *p.mosaics_refused.entry(safeguard).or_default() += 1;
            }
            _ => return false,
        }
        true
    }

    fn day(&mut self, at: i64) -> &mut DayAcc {
        let date = micros_to_datetime(at).format("%Y-%m-%d").to_string();
        self.days.entry(date).or_default()
    }

    pub fn apply(&mut self, r: &RecordedEvent) {
        let at = r.created_micros;
        let inside = at >= self.from && at <= self.to;
        if inside && self.pipeline_event(r) {
            return;
        }
        if r.event_type == StageCompleted::TYPE || r.event_type == StageFailed::TYPE {
            // Only the pipeline's own streams run stages.
            let category = crate::events::record::category_of(&r.stream_id);
            if !inside || !(category == "group" || category == "mosaic") {
                return;
            }
            let (stage, duration, failed) = if r.event_type == StageCompleted::TYPE {
                match serde_json::from_slice::<StageCompleted>(&r.data) {
                    Ok(e) => (e.stage, e.duration_s, false),
                    Err(_) => return,
                }
            } else {
                match serde_json::from_slice::<StageFailed>(&r.data) {
                    Ok(e) => {
                        let reason = if e.timed_out {
                            "timed out".to_string()
                        } else if let Some(code) = e.exit_status.filter(|c| *c != 0) {
                            format!("exit {code}")
                        } else {
                            reason_key(&e.error)
                        };
                        *self
                            .pipeline
                            .stage_failures
                            .entry(e.stage.clone())
                            .or_default()
                            .entry(reason)
                            .or_default() += 1;
                        (e.stage, e.duration_s, true)
                    }
                    Err(_) => return,
                }
            };
            let s = self.stages.entry(stage).or_default();
            s.runs += 1;
            s.failures += failed as u64;
            // A duration is a finite number of seconds; anything else is not one.
            if duration.is_finite() && duration >= 0.0 {
                s.durations.push(duration);
            }
            return;
        }
        let Ok(Some(event)) = ProductEvent::decode(r) else {
            return;
        };
        let id = crate::events::record::entity_of(&r.stream_id).to_string();
        match event {
            ProductEvent::Registered(reg) => {
                self.staged.insert(id, (at, reg.data_type.clone()));
                if inside {
                    let d = self.day(at);
                    d.counts.staged += 1;
                    d.by_type.entry(reg.data_type).or_default().staged += 1;
                }
            }
            ProductEvent::PublishSucceeded(_) if inside => {
                let (staged_at, data_type) = self
                    .staged
                    .get(&id)
                    .cloned()
                    .unwrap_or((at, "unknown".into()));
                let d = self.day(at);
                d.counts.published += 1;
                d.by_type.entry(data_type).or_default().published += 1;
                d.ttp.push((at - staged_at) as f64 / 1e6);
            }
            ProductEvent::PublishFailed(f) if inside => {
                let data_type = self
                    .staged
                    .get(&id)
                    .map_or("unknown".to_string(), |s| s.1.clone());
                let d = self.day(at);
                d.counts.failed += 1;
                d.by_type.entry(data_type).or_default().failed += 1;
                *d.reasons.entry(reason_key(&f.error)).or_default() += 1;
            }
            _ => {}
        }
    }

    pub fn report(&self) -> MetricsReport {
        let mut all_ttp = Vec::new();
        let mut all_reasons: BTreeMap<String, u64> = BTreeMap::new();
        let mut totals = TypeCounts::default();
        let mut days = Vec::new();
        // Every day of the window appears, quiet ones included.
        let mut date = micros_to_datetime(self.from).date_naive();
        let last = micros_to_datetime(self.to).date_naive();
        while date <= last {
            let key = date.format("%Y-%m-%d").to_string();
            let acc = self.days.get(&key).cloned().unwrap_or_default();
            let mut ttp = acc.ttp.clone();
            ttp.sort_by(f64::total_cmp);
            all_ttp.extend_from_slice(&ttp);
            for (k, v) in &acc.reasons {
                *all_reasons.entry(k.clone()).or_default() += v;
            }
            totals.staged += acc.counts.staged;
            totals.published += acc.counts.published;
            totals.failed += acc.counts.failed;
            days.push(DayMetrics {
                date: key,
                staged: acc.counts.staged,
                published: acc.counts.published,
                failed: acc.counts.failed,
                success_rate_percent: rate_if_any(acc.counts.published, acc.counts.failed),
                time_to_publish_p50_s: percentile(&ttp, 50.0),
                time_to_publish_p90_s: percentile(&ttp, 90.0),
                time_to_publish_p99_s: percentile(&ttp, 99.0),
                top_failure_reasons: top(&acc.reasons, 5),
                by_type: acc.by_type.clone(),
            });
            date = date.succ_opt().expect("dates go on");
        }
        all_ttp.sort_by(f64::total_cmp);
        let stages = self
            .stages
            .iter()
            .map(|(name, s)| {
                let mut d = s.durations.clone();
                d.sort_by(f64::total_cmp);
                StageMetrics {
                    stage: name.clone(),
                    runs: s.runs,
                    failures: s.failures,
                    mean_duration_s: (!d.is_empty())
                        .then(|| d.iter().sum::<f64>() / d.len() as f64),
                    p50_duration_s: percentile(&d, 50.0),
                    p90_duration_s: percentile(&d, 90.0),
                    max_duration_s: d.last().copied(),
                }
            })
            .collect();
        MetricsReport {
            from: crate::events::record::format_time(micros_to_datetime(self.from)),
            to: crate::events::record::format_time(micros_to_datetime(self.to)),
            success_rate_percent: rate_if_any(totals.published, totals.failed),
            days,
            totals,
            time_to_publish_s: all_ttp,
            top_failure_reasons: top(&all_reasons, 10),
            stages,
            pipeline: self.pipeline.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_rates() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 90.0), Some(90.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(success_rate(0, 0), 100.0);
        assert_eq!(success_rate(2, 1), 66.67);
        assert_eq!(
            reason_key("copying into the products root: No space left on device (os error 28)"),
            "copying into the products root: No space left on device"
        );
        assert_eq!(
            reason_key("staged file /data/stage/a.fits: No such file or directory (os error 2)"),
            "staged file <path>: No such file or directory"
        );
    }
}

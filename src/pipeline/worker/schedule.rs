//! What to do next: the units of work, the mosaic window chain, and `next_work`, a pure
//! function of the fold, the work held back and the time.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::*;

/// One unit of work the worker can take.
#[derive(Debug, Clone)]
pub(super) enum Work {
    Stage { group: String, stage: Stage },
    Decide { members: Vec<String> },
    Build { mosaic: String },
    RegisterMosaic { mosaic: String },
    RegisterImage { group: String },
}

impl Work {
    /// What the work is about, for holding it back after a failure.
    pub(super) fn key(&self) -> String {
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

/// Picks the next due unit of work, a pure function of the fold, the work held back and
/// the time: staging and mosaic decisions first (cheap), then mosaic builds, then group
/// stages in observation order. `Err(when)` when nothing is due, with the earliest retry
/// time if one is pending.
pub(super) fn next_work(
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
    // Without a runner the stages stay idle: nothing runs them by accident.
    let runner = cfg.stages.runner.is_some();
    for g in s.groups.values().filter(|_| runner) {
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
pub(super) type Held = HashMap<String, (u32, DateTime<Utc>)>;

/// Keys of the work held back at `now`.
pub(super) fn held_at(held: &Held, now: DateTime<Utc>) -> std::collections::HashSet<String> {
    held.iter()
        .filter(|(_, (_, until))| *until > now)
        .map(|(k, _)| k.clone())
        .collect()
}

//! The safeguards a mosaic group must pass before it is formed (DESIGN section 5). The
//! first, the group id collision, needs the ledger and lives with the worker; the other
//! four look at the members' ledger records and their files here. Each refusal names the
//! safeguard and the member at fault.

use std::path::Path;

use chrono::NaiveDateTime;

use super::casa;
use super::ingest::NAME_TIME;
use super::mosaic::io::{TileHeader, read_header, read_plane};
use super::state::{GroupState, Stage};
use crate::config::MosaicConfig;

/// Names of the safeguards, as recorded in `MosaicGroupRejected.safeguard`.
pub const ID_COLLISION: &str = "id_collision";
pub const TIME_SPAN: &str = "time_span";
pub const MS_STAGE: &str = "ms_stage";
pub const CALIBRATION_TABLES: &str = "calibration_tables";
pub const IMAGES: &str = "images";
/// All of them, in the order they are applied.
pub const NAMES: &[&str] = &[
    ID_COLLISION,
    TIME_SPAN,
    MS_STAGE,
    CALIBRATION_TABLES,
    IMAGES,
];

/// Why a group was refused.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub safeguard: &'static str,
    pub member: Option<String>,
    pub reason: String,
}

fn refuse(safeguard: &'static str, member: Option<&str>, reason: String) -> Refusal {
    Refusal {
        safeguard,
        member: member.map(str::to_string),
        reason,
    }
}

/// Each member's tile header (`None` when imaging recorded no tile), read once for the
/// declination check and the image check.
type Headers = [Option<Result<TileHeader, String>>];

/// Runs safeguards 2 to 5 in order and returns the first refusal. Every file a member's
/// events name is looked at only beneath `work_root` (the stage outputs' root), resolved
/// with no symbolic link followed: an output path outside it is a refusal, not a read.
pub fn check(members: &[&GroupState], cfg: &MosaicConfig, work_root: &Path) -> Result<(), Refusal> {
    let headers: Vec<_> = members
        .iter()
        .map(|m| {
            m.outputs(Stage::Image).first().map(|t| {
                beneath(work_root, t).and_then(|p| read_header(&p).map_err(|e| e.to_string()))
            })
        })
        .collect();
    time_span(members, &headers, cfg)?;
    ms_stage(members, work_root)?;
    calibration_tables(members, work_root)?;
    images(members, &headers, work_root)
}

/// Where a stage output an event names really is, beneath `root` with no symbolic link
/// on the way or at the end, or why it is refused. Both are taken as absolute (against the
/// working directory when relative, as the worker wrote them), so a relative data folder
/// works.
pub fn beneath(root: &Path, output: &str) -> Result<std::path::PathBuf, String> {
    let refused = |e: std::io::Error| {
        format!(
            "{output}: not a stage output beneath {} ({e})",
            root.display()
        )
    };
    let root = std::path::absolute(root).map_err(refused)?;
    let output_abs = std::path::absolute(output).map_err(refused)?;
    let at = super::moves::locate(&root, &output_abs.to_string_lossy()).map_err(refused)?;
    // `locate` follows no link on the way; the output itself must not be one either.
    match std::fs::symlink_metadata(&at.path) {
        Ok(m) if m.file_type().is_symlink() => {
            Err(refused(std::io::Error::other("a symbolic link")))
        }
        _ => Ok(at.path),
    }
}

/// 2. First to last tile within the span, consecutive tiles under the gap, declinations
///    within the spread of the group mean (from the tiles' headers, or the ledger).
pub fn time_span(
    members: &[&GroupState],
    headers: &Headers,
    cfg: &MosaicConfig,
) -> Result<(), Refusal> {
    let mut times = Vec::with_capacity(members.len());
    for m in members {
        let t = NaiveDateTime::parse_from_str(&m.obs_time, NAME_TIME).map_err(|e| {
            refuse(
                TIME_SPAN,
                Some(&m.id),
                format!("observation time {:?} does not parse: {e}", m.obs_time),
            )
        })?;
        times.push(t);
    }
    let minutes = |d: chrono::Duration| d.num_milliseconds() as f64 / 60_000.0;
    if let (Some(first), Some(last)) = (times.first(), times.last()) {
        let span = minutes(*last - *first);
        if span > cfg.max_span_min {
            return Err(refuse(
                TIME_SPAN,
                members.last().map(|m| m.id.as_str()),
                format!(
                    "the tiles span {span:.1} min from first to last, more than {} min",
                    cfg.max_span_min
                ),
            ));
        }
    }
    for (i, w) in times.windows(2).enumerate() {
        let gap = minutes(w[1] - w[0]);
        if gap >= cfg.max_gap_min || gap <= 0.0 {
            return Err(refuse(
                TIME_SPAN,
                Some(&members[i + 1].id),
                format!(
                    "{:.1} min after the previous tile {} (consecutive tiles must be under {} min apart)",
                    gap, members[i].id, cfg.max_gap_min
                ),
            ));
        }
    }
    let decs: Vec<(&GroupState, f64)> = members
        .iter()
        .zip(headers)
        .filter_map(|(m, h)| {
            // The tile's pointing, else what ingest recorded.
            let from_tile = h
                .as_ref()
                .and_then(|h| h.as_ref().ok())
                .map(|h| h.pointing_deg.1);
            from_tile.or(m.dec_deg).map(|d| (*m, d))
        })
        .collect();
    if !decs.is_empty() {
        let mean = decs.iter().map(|(_, d)| d).sum::<f64>() / decs.len() as f64;
        if let Some((m, d)) = decs
            .iter()
            .filter(|(_, d)| (d - mean).abs() > cfg.max_dec_spread_deg)
            .max_by(|a, b| (a.1 - mean).abs().total_cmp(&(b.1 - mean).abs()))
        {
            return Err(refuse(
                TIME_SPAN,
                Some(&m.id),
                format!(
                    "declination {d:.4} deg is {:.4} deg from the group mean {mean:.4} (at most {})",
                    (d - mean).abs(),
                    cfg.max_dec_spread_deg
                ),
            ));
        }
    }
    Ok(())
}

/// 3. Every member converted, calibrated and imaged according to the ledger, and its
///    Measurement Set on disk as a CASA table of type `Measurement Set`.
pub fn ms_stage(members: &[&GroupState], work_root: &Path) -> Result<(), Refusal> {
    for m in members {
        for name in Stage::GROUP {
            let s = m.stage(name);
            if s.completed.is_none() {
                let why = match (&s.last_error, s.given_up) {
                    (Some(e), true) => format!("{name} failed after {} attempts: {e}", s.attempts),
                    (Some(e), false) => format!("{name} has not completed (last error: {e})"),
                    _ => format!("{name} has not completed"),
                };
                return Err(refuse(MS_STAGE, Some(&m.id), why));
            }
        }
        let ms = m
            .outputs(Stage::Convert)
            .first()
            .cloned()
            .unwrap_or_default();
        if ms.is_empty() {
            return Err(refuse(
                MS_STAGE,
                Some(&m.id),
                "conversion recorded no Measurement Set".into(),
            ));
        }
        beneath(work_root, &ms)
            .and_then(|ms| casa::check_table(&ms, casa::MEASUREMENT_SET))
            .map_err(|e| refuse(MS_STAGE, Some(&m.id), format!("the Measurement Set {e}")))?;
    }
    Ok(())
}

/// 4. Every calibration table a member used is a CASA calibration table on disk
///    ([`casa::check_table`]: its description whole, its type `Calibration`, its data).
pub fn calibration_tables(members: &[&GroupState], work_root: &Path) -> Result<(), Refusal> {
    for m in members {
        let tables = m.outputs(Stage::Calibrate);
        if tables.is_empty() {
            return Err(refuse(
                CALIBRATION_TABLES,
                Some(&m.id),
                "calibration recorded no table".into(),
            ));
        }
        for t in tables {
            beneath(work_root, t)
                .and_then(|t| casa::check_table(&t, casa::CALIBRATION))
                .map_err(|e| {
                    refuse(
                        CALIBRATION_TABLES,
                        Some(&m.id),
                        format!("calibration table {e}"),
                    )
                })?;
        }
    }
    Ok(())
}

/// 5. Every member's image exists, opens as FITS, has a celestial WCS, shares the first
///    image's pixel scale (within 1%), and is not entirely blank.
pub fn images(members: &[&GroupState], headers: &Headers, work_root: &Path) -> Result<(), Refusal> {
    let mut scale: Option<f64> = None;
    for (m, header) in members.iter().zip(headers) {
        let (Some(tile), Some(header)) = (m.outputs(Stage::Image).first(), header) else {
            return Err(refuse(
                IMAGES,
                Some(&m.id),
                "imaging recorded no tile".into(),
            ));
        };
        let header = header
            .as_ref()
            .map_err(|e| refuse(IMAGES, Some(&m.id), e.clone()))?;
        let s = header.wcs.pixel_scale_deg();
        match scale {
            None => scale = Some(s),
            Some(first) if ((s - first) / first).abs() > 0.01 => {
                return Err(refuse(
                    IMAGES,
                    Some(&m.id),
                    format!(
                        "{tile}: pixel scale {:.4} arcsec differs from the first tile's {:.4} arcsec",
                        s * 3600.0,
                        first * 3600.0
                    ),
                ));
            }
            Some(_) => {}
        }
        let plane = beneath(work_root, tile)
            .and_then(|t| read_plane(&t).map_err(|e| e.to_string()))
            .map_err(|e| refuse(IMAGES, Some(&m.id), e))?;
        if !plane.iter().any(|v| v.is_finite() && *v != 0.0) {
            return Err(refuse(
                IMAGES,
                Some(&m.id),
                format!("{tile} is blank (every pixel NaN or zero)"),
            ));
        }
    }
    Ok(())
}

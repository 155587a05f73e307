//! The built-in simulator: what the correlator and CASA/WSClean would write, made up
//! realistically enough for demos and tests to run the real pipeline path without them.
//!
//! - subband files: the HDF5 signature, a one-line header the simulator reads back
//!   (`contimg-sim dec_deg=...`), then padding to the requested size;
//! - conversion: a Measurement Set folder (a CASA table skeleton, `casa::write_skeleton`,
//!   with the `ANTENNA`, `FIELD`, `SPECTRAL_WINDOW` sub-tables);
//! - calibration: a bandpass table per day (`WORK/caltables/<date>.B`, shared) and a gain
//!   table per group (`WORK/<group>/cal/<group>.G`), each a calibration table skeleton;
//! - imaging: a primary-beam-corrected FITS tile (SIN, the configured cell, point sources
//!   from one fixed sky so overlapping tiles agree, noise, the 4.65 m dish at 1.4 GHz,
//!   WSClean's header keys) and its beam image.

use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::NaiveDateTime;

use super::casa;
use super::ingest::NAME_TIME;
use super::mosaic::synth::{self, PointSource, TileSpec};
use crate::config::SimulateConfig;

/// OVRO's east longitude, degrees.
pub const OVRO_LON_DEG: f64 = -118.2834;
/// DSA-110's band centre, Hz.
pub const FREQ_HZ: f64 = 1.405e9;
/// Length of one observation, seconds.
pub const OBS_SECONDS: f64 = 309.24;

/// Writes one simulated subband file, a small but real UVH5 file
/// ([`super::uvh5::sim_file_bytes`]) whose header starts at the name's time; in two writes
/// with a pause between, when `pause` is given, as a correlator still writing would.
pub fn write_subband(
    path: &Path,
    dec_deg: f64,
    size: usize,
    pause: Option<std::time::Duration>,
) -> std::io::Result<()> {
    write_subband_at(path, None, dec_deg, size, pause)
}

/// [`write_subband`] with the observation's start in the header given (a correlator's
/// clock may name the subbands of one observation a few seconds apart).
pub fn write_subband_at(
    path: &Path,
    start: Option<NaiveDateTime>,
    dec_deg: f64,
    size: usize,
    pause: Option<std::time::Duration>,
) -> std::io::Result<()> {
    let bad = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let parsed = super::ingest::parse_name(&name, 64).map_err(bad)?;
    let bytes = super::uvh5::sim_file_bytes(&super::uvh5::SimFile {
        start_ms: start
            .unwrap_or(parsed.obs_time)
            .and_utc()
            .timestamp_millis(),
        duration_s: OBS_SECONDS,
        dec_deg,
        subband: parsed.subband,
        subbands: 16,
        size_hint: size,
    })
    .map_err(bad)?;
    let mut f = std::fs::File::create(path)?;
    let half = bytes.len() / 2;
    f.write_all(&bytes[..half])?;
    if let Some(p) = pause {
        f.flush()?;
        std::thread::sleep(p);
    }
    f.write_all(&bytes[half..])?;
    f.sync_all()
}

/// The declination a subband file's header carries, if it carries one.
pub fn read_subband_dec(path: &Path) -> Option<f64> {
    super::uvh5::read_header(path).ok()?.dec_deg
}

/// Local sidereal time at OVRO, degrees: where a drift scan points in right ascension.
pub fn lst_deg(t: NaiveDateTime) -> f64 {
    let jd = t.and_utc().timestamp_millis() as f64 / 86_400_000.0 + 2_440_587.5;
    let gmst = 280.460_618_37 + 360.985_647_366_29 * (jd - 2_451_545.0);
    (gmst + OVRO_LON_DEG).rem_euclid(360.0)
}

/// What conversion records in the MS for the later stages.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MsInfo {
    pub group_id: String,
    pub obs_time: String,
    pub ra_deg: f64,
    pub dec_deg: f64,
    pub subbands: usize,
}

/// Conversion: subband files to a Measurement Set folder.
pub fn convert(
    group_id: &str,
    obs_time: &str,
    files: &[String],
    ms: &Path,
    default_dec: f64,
) -> Result<(), String> {
    for f in files {
        let (_, header) =
            super::ingest::check_file(Path::new(f)).map_err(|e| format!("{f}: {e}"))?;
        if !header.simulated {
            return Err(format!(
                "{f}: a real observation's file; the simulator converts only the files it wrote"
            ));
        }
    }
    let t = NaiveDateTime::parse_from_str(obs_time, NAME_TIME)
        .map_err(|e| format!("observation time {obs_time:?}: {e}"))?;
    let dec = files
        .first()
        .and_then(|f| read_subband_dec(Path::new(f)))
        .unwrap_or(default_dec);
    let mid = t + chrono::Duration::milliseconds((OBS_SECONDS * 500.0) as i64);
    let info = MsInfo {
        group_id: group_id.into(),
        obs_time: obs_time.into(),
        ra_deg: lst_deg(mid),
        dec_deg: dec,
        subbands: files.len(),
    };
    let tmp = ms.with_extension("ms.partial");
    let _ = std::fs::remove_dir_all(&tmp);
    let io = |e: std::io::Error| format!("writing {}: {e}", ms.display());
    casa::write_skeleton(&tmp, casa::MEASUREMENT_SET, "", "MAIN").map_err(io)?;
    std::fs::write(tmp.join("table.f0"), vec![0u8; 4096]).map_err(io)?;
    for sub in ["ANTENNA", "FIELD", "SPECTRAL_WINDOW"] {
        casa::write_skeleton(&tmp.join(sub), sub, "", sub).map_err(io)?;
    }
    std::fs::write(
        tmp.join("contimg_sim.json"),
        serde_json::to_vec_pretty(&info).expect("serializes"),
    )
    .map_err(io)?;
    let _ = std::fs::remove_dir_all(ms);
    std::fs::rename(&tmp, ms).map_err(io)?;
    Ok(())
}

/// Reads what conversion recorded.
pub fn ms_info(ms: &Path) -> Result<MsInfo, String> {
    let p = ms.join("contimg_sim.json");
    let bytes = std::fs::read(&p).map_err(|e| format!("reading {}: {e}", p.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", p.display()))
}

/// Calibration: the day's bandpass table (made once, shared) and the group's gain table.
/// Returns the tables the group uses.
pub fn calibrate(ms: &Path, cal_dir: &Path, caltables_root: &Path) -> Result<Vec<PathBuf>, String> {
    let info = ms_info(ms)?;
    let date = info.obs_time.get(..10).unwrap_or("unknown");
    let bandpass = caltables_root.join(format!("{date}.B"));
    let gain = cal_dir.join(format!("{}.G", info.group_id));
    let io = |p: &Path, e: std::io::Error| format!("writing {}: {e}", p.display());
    if !bandpass.join("table.dat").exists() {
        let tmp = caltables_root.join(format!(".{date}.B.{}", uuid::Uuid::new_v4()));
        casa::write_skeleton(&tmp, casa::CALIBRATION, "B Jones", "BANDPASS")
            .map_err(|e| io(&tmp, e))?;
        // Another group may have made it meanwhile: either copy is a good table.
        if std::fs::rename(&tmp, &bandpass).is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
    casa::write_skeleton(&gain, casa::CALIBRATION, "G Jones", "GAIN").map_err(|e| io(&gain, e))?;
    Ok(vec![bandpass, gain])
}

/// Imaging: the primary-beam-corrected tile and its beam image.
pub fn image(ms: &Path, tile: &Path, beam: &Path, cfg: &SimulateConfig) -> Result<(), String> {
    let info = ms_info(ms)?;
    let spec = TileSpec {
        ra_deg: info.ra_deg,
        dec_deg: info.dec_deg,
        npix: cfg.tile_size,
        cell_arcsec: cfg.cell_arcsec,
        freq_hz: FREQ_HZ,
        noise_jy: cfg.noise_jy,
        date_obs: format!("{}.0", info.obs_time),
        seed: u64::from_str_radix(
            &super::ingest::short_hash(std::iter::once(&info.group_id)),
            16,
        )
        .unwrap_or(1),
        ..TileSpec::default()
    };
    let sources = sky(&spec, cfg.sources_per_deg2);
    synth::write_tile(&spec, &sources, tile, Some(beam)).map_err(|e| e.to_string())?;
    Ok(())
}

/// The fixed sky around a tile: sources drawn per 1-degree cell with a seed from the cell,
/// so every tile that covers a cell sees the same sources.
pub fn sky(spec: &TileSpec, per_deg2: f64) -> Vec<PointSource> {
    let half = spec.npix as f64 * spec.cell_arcsec / 3600.0 / 2.0 + 0.5;
    let cos_dec = spec.dec_deg.to_radians().cos().max(0.05);
    let (d0, d1) = (
        (spec.dec_deg - half).floor() as i64,
        (spec.dec_deg + half).floor() as i64,
    );
    let ra_half = (half / cos_dec).min(180.0);
    let (r0, r1) = (
        (spec.ra_deg - ra_half).floor() as i64,
        (spec.ra_deg + ra_half).floor() as i64,
    );
    let mut out = Vec::new();
    for d in d0..=d1 {
        if !(-90..90).contains(&d) {
            continue;
        }
        let dc = d as f64 + 0.5;
        let area = dc.to_radians().cos().max(0.0);
        let n = (per_deg2 * area).round() as usize;
        for r in r0..=r1 {
            let r = r.rem_euclid(360);
            let seed = (r as u64) << 32 | (d + 90) as u64;
            out.extend(synth::random_sources(
                (r as f64 + 0.5, dc),
                (0.5 * area, 0.5),
                n,
                (0.005, 0.5),
                0.0,
                seed ^ 0x05d5_a110,
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lst_moves_a_sidereal_day_per_day() {
        let t = NaiveDateTime::parse_from_str("2026-11-30T00:00:00", NAME_TIME).unwrap();
        let a = lst_deg(t);
        let b = lst_deg(t + chrono::Duration::hours(1));
        let step = (b - a).rem_euclid(360.0);
        assert!((step - 15.041).abs() < 0.01, "{step}");
    }

    #[test]
    fn subband_files_carry_their_declination() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("2026-11-30T00:00:00_sb00.hdf5");
        write_subband(&p, 71.25, 4096, None).unwrap();
        assert!((read_subband_dec(&p).unwrap() - 71.25).abs() < 1e-9);
        assert!(super::super::ingest::check_file(&p).is_ok());
    }
}

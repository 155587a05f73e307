//! UVH5 subband files: the header ingest reads from each file, and the small but real
//! files the simulator writes.
//!
//! A UVH5 file is HDF5 with a `Header` group (the UVData metadata, one dataset each) and a
//! `Data` group (`visdata`, `flags`, `nsamples`). Ingest needs only the header: the times
//! (`time_array`, Julian dates in UTC, one per baseline-time, at the integrations'
//! centres), the frequencies (`freq_array`), the shape (`Nbls`, `Ntimes`, `Nfreqs`,
//! `Npols`, `Nblts`), the telescope and the pointing declination. The file is read through
//! `hdf5-pure`, a pure-Rust HDF5 implementation: no system library, and it reads the files
//! pyuvdata and h5py write (the tests prove it on files pyuvdata wrote).
//!
//! Every check names what was wrong; nothing here panics on a corrupt file (the decoder
//! runs under `catch_unwind` all the same, so a bug in it refuses the file instead).

use std::path::Path;

use chrono::{DateTime, Utc};

/// Julian date of the Unix epoch.
const JD_UNIX_EPOCH: f64 = 2_440_587.5;

/// What ingest reads from a subband file's header.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub telescope: String,
    /// Start of the first integration and end of the last, UTC milliseconds.
    pub start_ms: i64,
    pub end_ms: i64,
    /// Lowest and highest channel centre, Hz.
    pub freq_lo_hz: f64,
    pub freq_hi_hz: f64,
    pub nbls: u64,
    pub ntimes: u64,
    pub nfreqs: u64,
    pub npols: u64,
    /// The phase centre's declination (a sidereal phase centre), else the pointing
    /// declination DSA-110 records in `extra_keywords/phase_center_dec`; degrees.
    pub dec_deg: Option<f64>,
    /// Written by contimg's simulator (`extra_keywords/contimg_simulated`).
    pub simulated: bool,
}

impl Header {
    pub fn start(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.start_ms).unwrap_or_default()
    }
    pub fn end(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.end_ms).unwrap_or_default()
    }
}

/// Julian date (UTC) to Unix milliseconds.
pub fn jd_to_unix_ms(jd: f64) -> i64 {
    ((jd - JD_UNIX_EPOCH) * 86_400_000.0).round() as i64
}

/// Unix milliseconds to a Julian date (UTC).
pub fn unix_ms_to_jd(ms: i64) -> f64 {
    ms as f64 / 86_400_000.0 + JD_UNIX_EPOCH
}

/// Reads and checks a subband file's UVH5 header. The error says why the file is not a
/// usable subband: truncated, not HDF5, not UVH5, or a header that contradicts itself.
pub fn read_header(path: &Path) -> Result<Header, String> {
    let size = std::fs::metadata(path)
        .map_err(|e| format!("cannot read: {e}"))?
        .len();
    let path = path.to_path_buf();
    std::panic::catch_unwind(move || read_header_inner(&path, size))
        .unwrap_or_else(|_| Err("not UVH5: reading its header failed (a panic, caught)".into()))
}

fn read_header_inner(path: &Path, size: u64) -> Result<Header, String> {
    let f =
        hdf5_pure::File::open_streaming(path).map_err(|e| format!("not readable as HDF5: {e}"))?;
    let sb = f.superblock();
    let eof = sb.base_address.get().saturating_add(sb.eof_address);
    if eof > size {
        return Err(format!(
            "truncated: the HDF5 superblock says the file ends at {eof} bytes but it has {size}"
        ));
    }
    // A header dataset, once its shape is one of `want`: an array is read only when its
    // shape says it holds the values the header counts, and (below) no count may claim
    // more values than the file has bytes for, so a few-kilobyte file declaring a billion
    // times (stored as fill values, or compressed) is refused, never allocated.
    let dataset = |name: &str, want: &[&[u64]]| -> Result<hdf5_pure::Dataset, String> {
        let d = f
            .dataset(&format!("Header/{name}"))
            .map_err(|_| format!("not UVH5: no Header/{name}"))?;
        let shape = d
            .shape()
            .map_err(|e| format!("not UVH5: Header/{name}: {e}"))?;
        if !want.contains(&shape.as_slice()) {
            return Err(format!(
                "bad UVH5 header: Header/{name} has shape {shape:?}, not {:?}",
                want[0]
            ));
        }
        Ok(d)
    };
    let int = |name: &str| -> Result<u64, String> {
        let v = dataset(name, &[&[], &[1]])?
            .read_i64()
            .map_err(|e| format!("not UVH5: Header/{name}: {e}"))?;
        match v.as_slice() {
            [n] if *n >= 0 => Ok(*n as u64),
            _ => Err(format!(
                "bad UVH5 header: Header/{name} is not a count ({v:?})"
            )),
        }
    };
    let floats = |name: &str, want: &[&[u64]]| -> Result<Vec<f64>, String> {
        dataset(name, want)?
            .read_f64()
            .map_err(|e| format!("not UVH5: Header/{name}: {e}"))
    };
    let text = |name: &str| -> Option<String> {
        f.dataset(name)
            .ok()?
            .read_string()
            .ok()?
            .into_iter()
            .next()
            .map(|s| s.trim_end_matches('\0').trim().to_string())
    };
    let (nbls, ntimes, nfreqs, npols, nblts) = (
        int("Nbls")?,
        int("Ntimes")?,
        int("Nfreqs")?,
        int("Npols")?,
        int("Nblts")?,
    );
    if nbls == 0 || ntimes == 0 || nfreqs == 0 || npols == 0 {
        return Err(format!(
            "bad UVH5 header: an empty axis (Nbls {nbls}, Ntimes {ntimes}, Nfreqs {nfreqs}, Npols {npols})"
        ));
    }
    // Every baseline-time holds Nfreqs x Npols visibilities of 8 bytes at least, and the
    // header's own arrays 8 bytes a value: counts beyond the file's size are lies.
    if nblts > nbls.saturating_mul(ntimes)
        || nblts.saturating_mul(8) > size
        || nfreqs.saturating_mul(8) > size
    {
        return Err(format!(
            "bad UVH5 header: Nblts {nblts} (Nbls {nbls} x Ntimes {ntimes}), Nfreqs {nfreqs} do not fit a file of {size} bytes"
        ));
    }
    let times = floats("time_array", &[&[nblts]])?;
    let freqs = floats("freq_array", &[&[nfreqs], &[1, nfreqs]])?;
    let finite = |v: &[f64]| v.iter().all(|x| x.is_finite());
    if !finite(&times) || !finite(&freqs) || freqs.iter().any(|x| *x <= 0.0) {
        return Err("bad UVH5 header: a time or frequency is not a finite positive number".into());
    }
    // Integrations are centred on their times: the observation spans half an
    // integration either side.
    let half_int_s = floats("integration_time", &[&[nblts]])
        .ok()
        .and_then(|v| v.first().copied())
        .filter(|v| v.is_finite() && *v >= 0.0)
        .unwrap_or(0.0)
        / 2.0;
    let (t0, t1) = times
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), t| (lo.min(*t), hi.max(*t)));
    // Julian dates between the years 1900 and 2200, integrations under a day, an
    // observation under a day: anything else is not a subband of this instrument.
    let date = |jd: f64| (2_415_020.5..2_524_593.5).contains(&jd);
    if !date(t0) || !date(t1) || half_int_s >= 43_200.0 || t1 - t0 >= 1.0 {
        return Err(format!(
            "bad UVH5 header: times {t0} to {t1} (Julian dates) with integrations of {} s are not an observation",
            2.0 * half_int_s
        ));
    }
    let half_ms = (half_int_s * 1e3).round() as i64;
    let (start_ms, end_ms) = (jd_to_unix_ms(t0) - half_ms, jd_to_unix_ms(t1) + half_ms);
    let (freq_lo_hz, freq_hi_hz) = freqs
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
    // The visibilities: a baseline-time axis of Nblts, and the frequency and polarisation
    // axes (with the old spectral-window axis of 1 in files before UVH5 1.0).
    let vis = f
        .dataset("Data/visdata")
        .map_err(|_| "not UVH5: no Data/visdata".to_string())?
        .shape()
        .map_err(|e| format!("not UVH5: Data/visdata: {e}"))?;
    let want: &[&[u64]] = &[&[nblts, nfreqs, npols], &[nblts, 1, nfreqs, npols]];
    if !want.contains(&vis.as_slice()) {
        return Err(format!(
            "bad UVH5 file: Data/visdata is {vis:?}, the header says [{nblts}, {nfreqs}, {npols}]"
        ));
    }
    let telescope = text("Header/telescope_name")
        .ok_or_else(|| "not UVH5: no Header/telescope_name".to_string())?;
    let dec_deg = sidereal_dec(&f)
        .or_else(|| scalar_f64(&f, "Header/phase_center_dec"))
        .or_else(|| scalar_f64(&f, "Header/extra_keywords/phase_center_dec"))
        .map(f64::to_degrees)
        .filter(|d| d.is_finite() && d.abs() <= 90.0);
    let simulated =
        scalar_f64(&f, "Header/extra_keywords/contimg_simulated").is_some_and(|v| v != 0.0);
    Ok(Header {
        telescope,
        start_ms,
        end_ms,
        freq_lo_hz,
        freq_hi_hz,
        nbls,
        ntimes,
        nfreqs,
        npols,
        dec_deg,
        simulated,
    })
}

fn scalar_f64(f: &hdf5_pure::File, name: &str) -> Option<f64> {
    let d = f.dataset(name).ok()?;
    if !matches!(d.shape().ok()?.as_slice(), [] | [1]) {
        return None;
    }
    match d.read_f64().ok()?.as_slice() {
        [v] => Some(*v),
        _ => None,
    }
}

/// The declination of a sidereal phase centre in `phase_center_catalog` (pyuvdata 2.2
/// and later), radians.
fn sidereal_dec(f: &hdf5_pure::File) -> Option<f64> {
    let cat = f.group("Header/phase_center_catalog").ok()?;
    cat.groups().ok()?.into_iter().find_map(|id| {
        let base = format!("Header/phase_center_catalog/{id}");
        let kind = f
            .dataset(&format!("{base}/cat_type"))
            .ok()?
            .read_string()
            .ok()?;
        (kind.first().map(|s| s.trim_end_matches('\0')) == Some("sidereal"))
            .then(|| scalar_f64(f, &format!("{base}/cat_lat")))
            .flatten()
    })
}

/// What the simulator writes in one subband file.
#[derive(Debug, Clone)]
pub struct SimFile {
    /// Start of the observation, UTC milliseconds.
    pub start_ms: i64,
    pub duration_s: f64,
    pub dec_deg: f64,
    /// Subband number: sb00 holds the highest frequencies, as DSA-110 numbers them.
    pub subband: u8,
    pub subbands: u8,
    /// The file grows its baseline axis to come near this size.
    pub size_hint: usize,
}

/// DSA-110's band, Hz.
pub const BAND_LO_HZ: f64 = 1.28e9;
pub const BAND_HI_HZ: f64 = 1.53e9;

/// The simulator's small UVH5 file: a well-formed header (2 integrations, 2 channels,
/// 2 polarisations, as many baselines as bring it near `size_hint`), zero visibilities,
/// and `extra_keywords/contimg_simulated = 1` so that nothing mistakes it for sky data.
pub fn sim_file_bytes(s: &SimFile) -> Result<Vec<u8>, String> {
    let (ntimes, nfreqs, npols) = (2u64, 2u64, 2u64);
    let per_bl = (ntimes * nfreqs * npols * 8) as usize;
    let nbls = (s.size_hint.saturating_sub(6_000) / per_bl).max(1) as u64;
    let nblts = nbls * ntimes;
    let tint = s.duration_s / ntimes as f64;
    let times: Vec<f64> = (0..nblts)
        .map(|i| {
            let t = (i / nbls) as f64;
            unix_ms_to_jd(s.start_ms + ((t + 0.5) * tint * 1e3).round() as i64)
        })
        .collect();
    let width = (BAND_HI_HZ - BAND_LO_HZ) / f64::from(s.subbands.max(1));
    let block = f64::from(s.subbands.max(1) - 1 - s.subband.min(s.subbands.max(1) - 1));
    let freqs: Vec<f64> = (0..nfreqs)
        .map(|c| BAND_LO_HZ + block * width + (c as f64 + 0.5) * width / nfreqs as f64)
        .collect();
    fn e(e: impl std::fmt::Display) -> String {
        format!("writing the simulated UVH5 file: {e}")
    }
    let mut b = hdf5_pure::FileBuilder::new();
    let mut h = b.create_group("Header");
    for (name, v) in [
        ("Nbls", nbls),
        ("Ntimes", ntimes),
        ("Nfreqs", nfreqs),
        ("Npols", npols),
        ("Nblts", nblts),
        ("Nspws", 1),
    ] {
        h.create_dataset(name)
            .with_i64_data(&[v as i64])
            .with_shape(&[]);
    }
    h.create_dataset("time_array").with_f64_data(&times);
    h.create_dataset("integration_time")
        .with_f64_data(&vec![tint; nblts as usize]);
    h.create_dataset("freq_array").with_f64_data(&freqs);
    h.create_dataset("polarization_array")
        .with_i64_data(&[-5, -6]);
    for (name, value) in [
        ("telescope_name", "DSA-110"),
        ("version", "1.2"),
        ("history", "written by contimg's simulator: not sky data"),
    ] {
        h.create_dataset(name)
            .with_ascii_strings(&[value])
            .map_err(e)?
            .with_shape(&[]);
    }
    let mut extra = h.create_group("extra_keywords");
    extra
        .create_dataset("phase_center_dec")
        .with_f64_data(&[s.dec_deg.to_radians()])
        .with_shape(&[]);
    extra
        .create_dataset("contimg_simulated")
        .with_i64_data(&[1])
        .with_shape(&[]);
    h.add_group(extra.finish());
    b.add_group(h.finish());
    let mut d = b.create_group("Data");
    d.create_dataset("visdata")
        .with_complex32_data(&vec![(0.0f32, 0.0f32); (nblts * nfreqs * npols) as usize])
        .with_shape(&[nblts, nfreqs, npols]);
    b.add_group(d.finish());
    b.finish().map_err(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sim(dir: &Path) -> std::path::PathBuf {
        let p = dir.join("2026-11-30T10:00:00_sb03.hdf5");
        let start =
            chrono::NaiveDateTime::parse_from_str("2026-11-30T10:00:00", "%Y-%m-%dT%H:%M:%S")
                .unwrap()
                .and_utc()
                .timestamp_millis();
        let bytes = sim_file_bytes(&SimFile {
            start_ms: start,
            duration_s: 300.0,
            dec_deg: 71.6,
            subband: 3,
            subbands: 16,
            size_hint: 20_000,
        })
        .unwrap();
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn the_simulators_files_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let h = read_header(&sim(dir.path())).unwrap();
        assert_eq!(h.telescope, "DSA-110");
        assert_eq!(h.start().to_rfc3339(), "2026-11-30T10:00:00+00:00");
        assert_eq!(h.end_ms - h.start_ms, 300_000);
        assert_eq!((h.ntimes, h.nfreqs, h.npols), (2, 2, 2));
        assert!(h.nbls > 100, "grown toward the size hint: {}", h.nbls);
        assert!((h.dec_deg.unwrap() - 71.6).abs() < 1e-9);
        assert!(h.simulated);
        // sb03 is the fourth block from the top of 1.28-1.53 GHz.
        let width = (BAND_HI_HZ - BAND_LO_HZ) / 16.0;
        assert!(
            h.freq_lo_hz > BAND_LO_HZ + 12.0 * width && h.freq_hi_hz < BAND_LO_HZ + 13.0 * width
        );
    }

    #[test]
    fn truncated_and_foreign_files_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let p = sim(dir.path());
        let full = std::fs::read(&p).unwrap();
        let cut = dir.path().join("cut.hdf5");
        std::fs::write(&cut, &full[..full.len() - 100]).unwrap();
        let e = read_header(&cut).unwrap_err();
        assert!(e.starts_with("truncated: "), "{e}");
        // HDF5, but not UVH5.
        let mut b = hdf5_pure::FileBuilder::new();
        b.create_dataset("x").with_f64_data(&[1.0]);
        let other = dir.path().join("other.hdf5");
        std::fs::write(&other, b.finish().unwrap()).unwrap();
        let e = read_header(&other).unwrap_err();
        assert!(e.starts_with("not UVH5: no Header/"), "{e}");
        // Every shorter prefix is refused, never a panic.
        for n in (0..full.len()).step_by(997) {
            std::fs::write(&cut, &full[..n]).unwrap();
            assert!(read_header(&cut).is_err(), "{n} bytes accepted");
        }
    }

    /// A small file whose header claims far more values than it holds is refused before
    /// anything of that size is allocated.
    #[test]
    fn counts_beyond_the_files_size_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = hdf5_pure::FileBuilder::new();
        let mut h = b.create_group("Header");
        for (name, v) in [
            ("Nbls", 1_000_000i64),
            ("Ntimes", 1_000),
            ("Nfreqs", 2),
            ("Npols", 2),
            ("Nblts", 1_000_000_000),
        ] {
            h.create_dataset(name).with_i64_data(&[v]).with_shape(&[]);
        }
        h.create_dataset("time_array").with_f64_data(&[2_461_374.9]);
        b.add_group(h.finish());
        let p = dir.path().join("huge.hdf5");
        std::fs::write(&p, b.finish().unwrap()).unwrap();
        let e = read_header(&p).unwrap_err();
        assert!(e.contains("do not fit a file of"), "{e}");
    }

    /// A file pyuvdata 3.2.8 wrote (tools/stages/make_test_data.py: 6 antennas, 2
    /// channels, 2 integrations, drift scan at declination 55): h5py's layout (superblock
    /// 0, symbol-table groups, fixed-length strings, a phase-centre catalogue), read here.
    #[test]
    fn a_file_pyuvdata_wrote_reads() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/pyuvdata-3.2.8_2026-11-30T10:00:00_sb03.hdf5");
        let h = read_header(&p).unwrap();
        assert_eq!(h.telescope, "DSA-110");
        assert_eq!((h.nbls, h.ntimes, h.nfreqs, h.npols), (15, 2, 2, 2));
        assert_eq!(h.start().to_rfc3339(), "2026-11-30T10:00:00+00:00");
        assert_eq!(h.end_ms - h.start_ms, 300_000);
        assert!((h.dec_deg.unwrap() - 55.0).abs() < 1e-9, "{:?}", h.dec_deg);
        assert!(!h.simulated);
        // sb03: the fourth block of 15.625 MHz from the top of 1.28-1.53 GHz.
        assert!(
            (h.freq_lo_hz - 1_471_406_250.0).abs() < 1.0,
            "{}",
            h.freq_lo_hz
        );
        assert!(
            (h.freq_hi_hz - 1_479_218_750.0).abs() < 1.0,
            "{}",
            h.freq_hi_hz
        );
        // Cut anywhere, it is refused with a reason, never a panic.
        let full = std::fs::read(&p).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cut = dir.path().join("cut.hdf5");
        for n in (0..full.len()).step_by(499) {
            std::fs::write(&cut, &full[..n]).unwrap();
            assert!(read_header(&cut).is_err(), "{n} bytes accepted");
        }
    }

    #[test]
    fn julian_dates() {
        assert_eq!(jd_to_unix_ms(JD_UNIX_EPOCH), 0);
        assert_eq!(
            jd_to_unix_ms(unix_ms_to_jd(1_764_496_800_000)),
            1_764_496_800_000
        );
    }
}

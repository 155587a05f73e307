//! FITS in and out through fitsio (cfitsio): tile headers and pixels in, float32 planes
//! with their WCS and provenance out.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use fitsio::FitsFile;
use fitsio::hdu::HduInfo;
use fitsio::images::{ImageDescription, ImageType};
use ndarray::{Array2, Ix2};

use super::MosaicError;
use super::wcs::{CelestialWcs, ProjectionKind};

/// What the mosaicker needs from a tile's primary header.
#[derive(Debug, Clone)]
pub struct TileHeader {
    pub path: PathBuf,
    pub wcs: CelestialWcs,
    /// Columns and rows of the celestial plane.
    pub nx: usize,
    pub ny: usize,
    /// Observing frequency: RESTFRQ, RESTFREQ, or a FREQ axis.
    pub freq_hz: Option<f64>,
    /// Primary-beam centre: OBSRA/OBSDEC when present, otherwise CRVAL.
    pub pointing_deg: (f64, f64),
    pub bunit: Option<String>,
    /// BMAJ, BMIN, BPA in degrees.
    pub beam: Option<(f64, f64, f64)>,
    pub date_obs: Option<String>,
    pub radesys: Option<String>,
    pub equinox: Option<f64>,
}

fn open(path: &Path) -> Result<FitsFile, MosaicError> {
    if !path.exists() {
        return Err(MosaicError::Missing {
            path: path.to_path_buf(),
        });
    }
    FitsFile::open(path).map_err(|source| MosaicError::Fits {
        path: path.to_path_buf(),
        source,
    })
}

fn key_f64(f: &mut FitsFile, hdu: &fitsio::hdu::FitsHdu, name: &str) -> Option<f64> {
    hdu.read_key::<f64>(f, name).ok().filter(|v| v.is_finite())
}

fn key_str(f: &mut FitsFile, hdu: &fitsio::hdu::FitsHdu, name: &str) -> Option<String> {
    hdu.read_key::<String>(f, name)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Image shape in C order (slowest axis first), as fitsio reports it.
fn image_shape(path: &Path, hdu: &fitsio::hdu::FitsHdu) -> Result<Vec<usize>, MosaicError> {
    match &hdu.info {
        HduInfo::ImageInfo { shape, .. } => Ok(shape.clone()),
        _ => Err(MosaicError::BadShape {
            path: path.to_path_buf(),
            shape: vec![],
        }),
    }
}

/// (ny, nx) of a primary HDU that is 2-D, or N-D with every axis past the second of
/// length 1 (the `[1, 1, ny, nx]` cubes WSClean writes).
fn celestial_plane(path: &Path, shape: &[usize]) -> Result<(usize, usize), MosaicError> {
    let n = shape.len();
    let ok =
        n >= 2 && shape[..n - 2].iter().all(|&s| s == 1) && shape[n - 2] > 1 && shape[n - 1] > 1;
    if !ok {
        return Err(MosaicError::BadShape {
            path: path.to_path_buf(),
            shape: shape.iter().rev().copied().collect(),
        });
    }
    Ok((shape[n - 2], shape[n - 1]))
}

/// Reads and checks a tile's primary header.
pub fn read_header(path: &Path) -> Result<TileHeader, MosaicError> {
    let mut f = open(path)?;
    let hdu = f.primary_hdu().map_err(|source| MosaicError::Fits {
        path: path.to_path_buf(),
        source,
    })?;
    let shape = image_shape(path, &hdu)?;
    let (ny, nx) = celestial_plane(path, &shape)?;
    let no_wcs = |reason: String| MosaicError::NoCelestialWcs {
        path: path.to_path_buf(),
        reason,
    };

    let ctype1 = key_str(&mut f, &hdu, "CTYPE1").ok_or_else(|| no_wcs("no CTYPE1".into()))?;
    let ctype2 = key_str(&mut f, &hdu, "CTYPE2").ok_or_else(|| no_wcs("no CTYPE2".into()))?;
    let (c1, c2) = (ctype1.to_ascii_uppercase(), ctype2.to_ascii_uppercase());
    if !(c1.starts_with("RA--") && c2.starts_with("DEC-")) || c1.len() < 8 || c2.len() < 8 {
        return Err(no_wcs(format!(
            "axes 1 and 2 must be RA---xxx and DEC--xxx, found CTYPE1 = '{ctype1}', CTYPE2 = '{ctype2}'"
        )));
    }
    let kind = ProjectionKind::from_code(&c1[5..8])
        .filter(|_| c1[5..8] == c2[5..8])
        .ok_or_else(|| {
            no_wcs(format!(
                "projection '{ctype1}' / '{ctype2}' is not supported (SIN and TAN are)"
            ))
        })?;
    for key in ["PV2_1", "PV2_2"] {
        if key_f64(&mut f, &hdu, key).is_some_and(|v| v != 0.0) {
            return Err(no_wcs(format!(
                "{key} is set: slant SIN (NCP) is not supported"
            )));
        }
    }
    if let Some(lonpole) = key_f64(&mut f, &hdu, "LONPOLE")
        && (lonpole - 180.0).abs() > 1e-9
    {
        return Err(no_wcs(format!(
            "LONPOLE = {lonpole} is not supported (only the default 180)"
        )));
    }
    let mut need = |k: &str| key_f64(&mut f, &hdu, k).ok_or_else(|| no_wcs(format!("no {k}")));
    let crval = [need("CRVAL1")?, need("CRVAL2")?];
    let crpix = [need("CRPIX1")?, need("CRPIX2")?];

    let cd_keys = ["CD1_1", "CD1_2", "CD2_1", "CD2_2"];
    let cd_vals: Vec<Option<f64>> = cd_keys.iter().map(|k| key_f64(&mut f, &hdu, k)).collect();
    let cd = if cd_vals.iter().any(Option::is_some) {
        let v = |i: usize| cd_vals[i].unwrap_or(0.0);
        [[v(0), v(1)], [v(2), v(3)]]
    } else {
        let cdelt1 =
            key_f64(&mut f, &hdu, "CDELT1").ok_or_else(|| no_wcs("no CDELT1 or CD1_1".into()))?;
        let cdelt2 =
            key_f64(&mut f, &hdu, "CDELT2").ok_or_else(|| no_wcs("no CDELT2 or CD2_2".into()))?;
        let pc_keys = ["PC1_1", "PC1_2", "PC2_1", "PC2_2"];
        let pc_vals: Vec<Option<f64>> = pc_keys.iter().map(|k| key_f64(&mut f, &hdu, k)).collect();
        let pc = if pc_vals.iter().any(Option::is_some) {
            let id = [1.0, 0.0, 0.0, 1.0];
            let v = |i: usize| pc_vals[i].unwrap_or(id[i]);
            [[v(0), v(1)], [v(2), v(3)]]
        } else if let Some(rot) = key_f64(&mut f, &hdu, "CROTA2") {
            // AIPS convention: CROTA2 turns the sky clockwise on the pixel grid.
            let (s, c) = rot.to_radians().sin_cos();
            let ratio = cdelt2 / cdelt1;
            [[c, -s * ratio], [s / ratio, c]]
        } else {
            [[1.0, 0.0], [0.0, 1.0]]
        };
        [
            [cdelt1 * pc[0][0], cdelt1 * pc[0][1]],
            [cdelt2 * pc[1][0], cdelt2 * pc[1][1]],
        ]
    };
    let wcs = CelestialWcs::new(kind, crval, crpix, cd)
        .ok_or_else(|| no_wcs("the pixel matrix is singular or a value is out of range".into()))?;

    let mut freq_hz =
        key_f64(&mut f, &hdu, "RESTFRQ").or_else(|| key_f64(&mut f, &hdu, "RESTFREQ"));
    if freq_hz.is_none() {
        for axis in 3..=shape.len() {
            if key_str(&mut f, &hdu, &format!("CTYPE{axis}"))
                .is_some_and(|t| t.to_ascii_uppercase().starts_with("FREQ"))
            {
                freq_hz = key_f64(&mut f, &hdu, &format!("CRVAL{axis}"));
            }
        }
    }
    let pointing_deg = match (
        key_f64(&mut f, &hdu, "OBSRA"),
        key_f64(&mut f, &hdu, "OBSDEC"),
    ) {
        (Some(ra), Some(dec)) => (ra, dec),
        _ => (crval[0], crval[1]),
    };
    let beam = match (key_f64(&mut f, &hdu, "BMAJ"), key_f64(&mut f, &hdu, "BMIN")) {
        (Some(a), Some(b)) => Some((a, b, key_f64(&mut f, &hdu, "BPA").unwrap_or(0.0))),
        _ => None,
    };
    Ok(TileHeader {
        path: path.to_path_buf(),
        wcs,
        nx,
        ny,
        freq_hz: freq_hz.filter(|&v| v > 0.0),
        pointing_deg,
        bunit: key_str(&mut f, &hdu, "BUNIT").filter(|s| !s.is_empty()),
        beam,
        date_obs: key_str(&mut f, &hdu, "DATE-OBS").filter(|s| !s.is_empty()),
        radesys: key_str(&mut f, &hdu, "RADESYS").filter(|s| !s.is_empty()),
        equinox: key_f64(&mut f, &hdu, "EQUINOX"),
    })
}

/// Reads the celestial plane of a primary HDU as float32 `[ny, nx]`.
pub fn read_plane(path: &Path) -> Result<Array2<f32>, MosaicError> {
    let mut f = open(path)?;
    let fits_err = |source| MosaicError::Fits {
        path: path.to_path_buf(),
        source,
    };
    let hdu = f.primary_hdu().map_err(fits_err)?;
    let shape = image_shape(path, &hdu)?;
    let (ny, nx) = celestial_plane(path, &shape)?;
    let data: ndarray::ArrayD<f32> = hdu.read_image(&mut f).map_err(fits_err)?;
    data.into_shape_with_order((ny, nx))
        .map_err(|_| MosaicError::BadShape {
            path: path.to_path_buf(),
            shape: shape.iter().rev().copied().collect(),
        })
        .map(|a| a.into_dimensionality::<Ix2>().expect("two axes"))
}

/// Keys written on every output plane.
#[derive(Debug, Clone, Default)]
pub struct OutputKeys {
    pub bunit: Option<String>,
    pub beam: Option<(f64, f64, f64)>,
    pub date_obs: Option<String>,
    pub freq_hz: Option<f64>,
    pub radesys: Option<String>,
    pub equinox: Option<f64>,
    /// One HISTORY card each.
    pub history: Vec<String>,
    /// Extra string keys, e.g. ("TELESCOP", "DSA-110").
    pub extra_str: Vec<(String, String)>,
    /// Extra numeric keys.
    pub extra_f64: Vec<(String, f64)>,
}

/// Writes a float32 image with a celestial WCS. `leading_unit_axes` adds WSClean's FREQ
/// and STOKES axes of length 1 (a `[1, 1, ny, nx]` cube) when true.
pub fn write_plane(
    path: &Path,
    data: &[f32],
    ny: usize,
    nx: usize,
    wcs: &CelestialWcs,
    keys: &OutputKeys,
    leading_unit_axes: bool,
) -> Result<(), MosaicError> {
    let werr = |source: fitsio::errors::Error| MosaicError::Write {
        path: path.to_path_buf(),
        source,
    };
    assert_eq!(data.len(), ny * nx, "plane size");
    // Written under a temporary name and renamed, so a failed run leaves no half file.
    let partial = partial_name(path);
    let _ = std::fs::remove_file(&partial);
    let dims4 = [1, 1, ny, nx];
    let dims2 = [ny, nx];
    let desc = ImageDescription {
        data_type: ImageType::Float,
        dimensions: if leading_unit_axes { &dims4 } else { &dims2 },
    };
    let mut f = FitsFile::create(&partial)
        .with_custom_primary(&desc)
        .open()
        .map_err(werr)?;
    let hdu = f.primary_hdu().map_err(werr)?;
    let code = wcs.kind().code();
    let cd = wcs.cd();
    let (crval, crpix) = (wcs.crval(), wcs.crpix());
    let put = |f: &mut FitsFile, k: &str, v: f64| hdu.write_key(f, k, v);
    put(&mut f, "CRPIX1", crpix[0]).map_err(werr)?;
    put(&mut f, "CRPIX2", crpix[1]).map_err(werr)?;
    put(&mut f, "CRVAL1", crval[0]).map_err(werr)?;
    put(&mut f, "CRVAL2", crval[1]).map_err(werr)?;
    if cd[0][1] == 0.0 && cd[1][0] == 0.0 {
        put(&mut f, "CDELT1", cd[0][0]).map_err(werr)?;
        put(&mut f, "CDELT2", cd[1][1]).map_err(werr)?;
    } else {
        put(&mut f, "CD1_1", cd[0][0]).map_err(werr)?;
        put(&mut f, "CD1_2", cd[0][1]).map_err(werr)?;
        put(&mut f, "CD2_1", cd[1][0]).map_err(werr)?;
        put(&mut f, "CD2_2", cd[1][1]).map_err(werr)?;
    }
    let hdu = f.primary_hdu().map_err(werr)?;
    hdu.write_key(&mut f, "CTYPE1", format!("RA---{code}"))
        .map_err(werr)?;
    hdu.write_key(&mut f, "CTYPE2", format!("DEC--{code}"))
        .map_err(werr)?;
    hdu.write_key(&mut f, "CUNIT1", "deg").map_err(werr)?;
    hdu.write_key(&mut f, "CUNIT2", "deg").map_err(werr)?;
    hdu.write_key(&mut f, "LONPOLE", 180.0).map_err(werr)?;
    if leading_unit_axes {
        let freq = keys.freq_hz.unwrap_or(1.405e9);
        hdu.write_key(&mut f, "CTYPE3", "FREQ").map_err(werr)?;
        hdu.write_key(&mut f, "CRPIX3", 1.0).map_err(werr)?;
        hdu.write_key(&mut f, "CRVAL3", freq).map_err(werr)?;
        hdu.write_key(&mut f, "CDELT3", 1.875e8).map_err(werr)?;
        hdu.write_key(&mut f, "CUNIT3", "Hz").map_err(werr)?;
        hdu.write_key(&mut f, "CTYPE4", "STOKES").map_err(werr)?;
        hdu.write_key(&mut f, "CRPIX4", 1.0).map_err(werr)?;
        hdu.write_key(&mut f, "CRVAL4", 1.0).map_err(werr)?;
        hdu.write_key(&mut f, "CDELT4", 1.0).map_err(werr)?;
    }
    hdu.write_key(
        &mut f,
        "RADESYS",
        keys.radesys.clone().unwrap_or_else(|| "FK5".into()),
    )
    .map_err(werr)?;
    hdu.write_key(&mut f, "EQUINOX", keys.equinox.unwrap_or(2000.0))
        .map_err(werr)?;
    if let Some(b) = &keys.bunit {
        hdu.write_key(&mut f, "BUNIT", b.clone()).map_err(werr)?;
    }
    if let Some((bmaj, bmin, bpa)) = keys.beam {
        hdu.write_key(&mut f, "BMAJ", bmaj).map_err(werr)?;
        hdu.write_key(&mut f, "BMIN", bmin).map_err(werr)?;
        hdu.write_key(&mut f, "BPA", bpa).map_err(werr)?;
    }
    if let Some(freq) = keys.freq_hz {
        hdu.write_key(&mut f, "RESTFRQ", freq).map_err(werr)?;
    }
    if let Some(d) = &keys.date_obs {
        hdu.write_key(&mut f, "DATE-OBS", d.clone()).map_err(werr)?;
    }
    for (k, v) in &keys.extra_str {
        hdu.write_key(&mut f, k, v.clone()).map_err(werr)?;
    }
    for (k, v) in &keys.extra_f64 {
        hdu.write_key(&mut f, k, *v).map_err(werr)?;
    }
    for line in &keys.history {
        write_history(&mut f, line).map_err(werr)?;
    }
    hdu.write_image(&mut f, data).map_err(werr)?;
    drop(f);
    std::fs::rename(&partial, path).map_err(|e| MosaicError::Io {
        path: path.to_path_buf(),
        source: e,
    })
}

fn partial_name(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".partial");
    path.with_file_name(name)
}

/// fitsio has no HISTORY writer; cfitsio's `ffphis` wraps long text over several cards.
fn write_history(f: &mut FitsFile, line: &str) -> Result<(), fitsio::errors::Error> {
    let text = CString::new(line.replace('\0', " "))?;
    let mut status = 0;
    // SAFETY: the pointer comes from an open FitsFile that outlives the call, and `text`
    // is a valid NUL-terminated string.
    unsafe {
        fitsio::sys::ffphis(f.as_raw(), text.as_ptr(), &mut status);
    }
    fitsio::errors::check_status(status)
}

/// HISTORY cards of a primary header, in order (for tests and tools).
pub fn read_history(path: &Path) -> Result<Vec<String>, MosaicError> {
    let mut f = open(path)?;
    let ferr = |source| MosaicError::Fits {
        path: path.to_path_buf(),
        source,
    };
    let mut nkeys = 0;
    let mut more = 0;
    let mut status = 0;
    // SAFETY: as in `write_history`; the buffer is cfitsio's card length plus NUL.
    unsafe {
        fitsio::sys::ffghsp(f.as_raw(), &mut nkeys, &mut more, &mut status);
    }
    fitsio::errors::check_status(status).map_err(ferr)?;
    let mut out = Vec::new();
    for i in 1..=nkeys {
        let mut card = [0 as std::ffi::c_char; 81];
        unsafe {
            fitsio::sys::ffgrec(f.as_raw(), i, card.as_mut_ptr(), &mut status);
        }
        fitsio::errors::check_status(status).map_err(ferr)?;
        // SAFETY: cfitsio NUL-terminates the card.
        let s = unsafe { std::ffi::CStr::from_ptr(card.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        if let Some(rest) = s.strip_prefix("HISTORY") {
            out.push(rest.trim().to_string());
        }
    }
    Ok(out)
}

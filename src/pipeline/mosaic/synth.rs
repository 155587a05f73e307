//! Realistic WSClean-like tiles for tests, demos and benchmarks.
//!
//! A tile is what WSClean writes after primary-beam correction: a SIN image (by default a
//! `[1, 1, ny, nx]` cube with FREQ and STOKES axes) in Jy/beam holding point sources
//! convolved with the restoring beam, plus noise that was flat before the correction and
//! so grows as 1/B towards the edge; and, beside it, the primary-beam image B. The noise
//! is white noise smoothed by a Gaussian so that it is correlated over the restoring beam,
//! as in a real image (white noise would be smoothed by the bilinear interpolation and
//! make the noise map look wrong when it is not).
//!
//! Everything is deterministic for a given seed, and parallel over rows.

use std::path::Path;

use rayon::prelude::*;

use super::MosaicError;
use super::beam;
use super::io::{OutputKeys, write_plane};
use super::wcs::{CelestialWcs, ProjectionKind};

/// A point source on the sky.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PointSource {
    pub ra_deg: f64,
    pub dec_deg: f64,
    /// Integrated (= peak, for a point source) flux density in Jy.
    pub flux_jy: f64,
}

/// What a synthetic tile looks like.
#[derive(Debug, Clone)]
pub struct TileSpec {
    /// Phase centre and pointing, degrees.
    pub ra_deg: f64,
    pub dec_deg: f64,
    /// Pixels per side.
    pub npix: usize,
    pub cell_arcsec: f64,
    pub freq_hz: f64,
    /// Restoring beam, arcsec and degrees.
    pub bmaj_arcsec: f64,
    pub bmin_arcsec: f64,
    pub bpa_deg: f64,
    /// Noise at the beam centre (flat noise before the primary-beam correction), Jy/beam.
    pub noise_jy: f64,
    pub date_obs: String,
    /// Pixels where B is below this are NaN, as after WSClean's primary-beam limit.
    pub pb_limit: f64,
    pub seed: u64,
    /// Write a `[1, 1, ny, nx]` cube (WSClean) rather than a 2-D image.
    pub cube: bool,
    pub projection: ProjectionKind,
}

impl Default for TileSpec {
    /// A DSA-110 tile: 4800 x 4800 at 3 arcsec, SIN, 1.405 GHz.
    fn default() -> Self {
        Self {
            ra_deg: 150.0,
            dec_deg: 37.0,
            npix: 4800,
            cell_arcsec: 3.0,
            freq_hz: 1.405e9,
            bmaj_arcsec: 15.0,
            bmin_arcsec: 12.0,
            bpa_deg: 30.0,
            noise_jy: 1e-3,
            date_obs: "2026-11-30T08:00:00.0".into(),
            pb_limit: 0.0,
            seed: 1,
            cube: true,
            projection: ProjectionKind::Sin,
        }
    }
}

impl TileSpec {
    /// The tile's WCS (reference pixel at the centre, FITS convention).
    pub fn wcs(&self) -> CelestialWcs {
        let c = (self.npix as f64) / 2.0 + 1.0;
        CelestialWcs::north_up(
            self.projection,
            [self.ra_deg, self.dec_deg],
            [c, c],
            self.cell_arcsec / 3600.0,
        )
        .expect("a valid tile spec")
    }

    /// Primary-beam FWHM of the dish model, degrees.
    pub fn pb_fwhm_deg(&self) -> f64 {
        beam::fwhm_rad(self.freq_hz).to_degrees()
    }

    /// Restoring-beam area in pixels: pi bmaj bmin / (4 ln 2).
    pub fn beam_area_px(&self) -> f64 {
        std::f64::consts::PI * self.bmaj_arcsec * self.bmin_arcsec
            / (4.0 * std::f64::consts::LN_2)
            / (self.cell_arcsec * self.cell_arcsec)
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct WrittenTile {
    /// Sources that landed on the tile.
    pub sources: usize,
}

/// SplitMix64: small, fast, and good enough for noise; keeps the library free of a
/// random-number dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// Two independent standard normals (Box-Muller).
    pub fn normal_pair(&mut self) -> (f64, f64) {
        let r = (-2.0 * self.uniform().ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * self.uniform()).sin_cos();
        (r * c, r * s)
    }
}

/// `n` sources placed uniformly in a box of half-sizes `half_deg` (east, north) in the SIN
/// plane about (ra, dec), fluxes log-uniform between `min_jy` and `max_jy`, kept at least
/// `min_sep_deg` apart.
pub fn random_sources(
    (ra_deg, dec_deg): (f64, f64),
    half_deg: (f64, f64),
    n: usize,
    (min_jy, max_jy): (f64, f64),
    min_sep_deg: f64,
    seed: u64,
) -> Vec<PointSource> {
    let mut rng = Rng::new(seed);
    // A plane in degrees: x grows to the east.
    let w = CelestialWcs::new(
        ProjectionKind::Sin,
        [ra_deg, dec_deg],
        [1.0, 1.0],
        [[1.0, 0.0], [0.0, 1.0]],
    )
    .expect("valid centre");
    let mut out: Vec<PointSource> = Vec::with_capacity(n);
    let mut dirs: Vec<[f64; 3]> = Vec::with_capacity(n);
    let mut tries = 0;
    while out.len() < n && tries < 100 * n + 100 {
        tries += 1;
        let x = (2.0 * rng.uniform() - 1.0) * half_deg.0;
        let y = (2.0 * rng.uniform() - 1.0) * half_deg.1;
        let Some(v) = w.pix_to_xyz(x, y) else {
            continue;
        };
        let d = [v.x(), v.y(), v.z()];
        if dirs
            .iter()
            .any(|o| beam::angle_between(*o, d).to_degrees() < min_sep_deg)
        {
            continue;
        }
        let (ra, dec) = super::wcs::xyz_to_radec(&v);
        let flux = min_jy * (max_jy / min_jy).powf(rng.uniform());
        dirs.push(d);
        out.push(PointSource {
            ra_deg: ra,
            dec_deg: dec,
            flux_jy: flux,
        });
    }
    out
}

/// Renders a tile (and its beam image when `beam_path` is given) and writes them.
pub fn write_tile(
    spec: &TileSpec,
    sources: &[PointSource],
    image_path: &Path,
    beam_path: Option<&Path>,
) -> Result<WrittenTile, MosaicError> {
    let n = spec.npix;
    let wcs = spec.wcs();
    let pb = primary_beam(spec, &wcs);
    let mut img = correlated_noise(spec);
    // Noise was flat before the correction: divide by B.
    img.par_iter_mut().zip(pb.par_iter()).for_each(|(v, &b)| {
        *v = if b >= spec.pb_limit as f32 && b > 0.0 {
            *v / b
        } else {
            f32::NAN
        };
    });
    let landed = add_sources(spec, &wcs, sources, &mut img);
    let keys = OutputKeys {
        bunit: Some("JY/BEAM".into()),
        beam: Some((
            spec.bmaj_arcsec / 3600.0,
            spec.bmin_arcsec / 3600.0,
            spec.bpa_deg,
        )),
        date_obs: Some(spec.date_obs.clone()),
        freq_hz: Some(spec.freq_hz),
        radesys: Some("FK5".into()),
        equinox: Some(2000.0),
        history: vec![format!(
            "contimg synth: {} point sources, noise {:.3e} Jy/beam, seed {}",
            landed, spec.noise_jy, spec.seed
        )],
        extra_str: vec![
            ("TELESCOP".into(), "DSA-110".into()),
            ("ORIGIN".into(), "contimg synth (WSClean-like)".into()),
        ],
        extra_f64: vec![],
    };
    write_plane(image_path, &img, n, n, &wcs, &keys, spec.cube)?;
    if let Some(bp) = beam_path {
        let bkeys = OutputKeys {
            bunit: Some("".into()),
            history: vec!["contimg synth: primary beam, Gaussian 1.2 lambda / 4.65 m".into()],
            beam: None,
            ..keys
        };
        let mut pb = pb;
        for v in pb.iter_mut() {
            if *v <= 0.0 {
                *v = 0.0;
            }
        }
        write_plane(bp, &pb, n, n, &wcs, &bkeys, spec.cube)?;
    }
    Ok(WrittenTile { sources: landed })
}

/// The dish model on the tile's grid.
fn primary_beam(spec: &TileSpec, wcs: &CelestialWcs) -> Vec<f32> {
    let n = spec.npix;
    let fwhm = beam::fwhm_rad(spec.freq_hz);
    let pointing = wcs
        .world_to_native(spec.ra_deg, spec.dec_deg)
        .unwrap_or([1.0, 0.0, 0.0]);
    let mut pb = vec![0.0f32; n * n];
    pb.par_chunks_mut(n).enumerate().for_each(|(y, row)| {
        for (x, v) in row.iter_mut().enumerate() {
            *v = wcs
                .pix_to_native(x as f64, y as f64)
                .map(|d| beam::response(beam::angle_between(d, pointing), fwhm) as f32)
                .unwrap_or(0.0);
        }
    });
    pb
}

/// Gaussian noise of rms `spec.noise_jy`, correlated over the restoring beam: white noise
/// convolved with a circular Gaussian of sigma = beam sigma / sqrt(2) (so that the noise's
/// own correlation has the beam's width), then scaled to the wanted rms exactly.
fn correlated_noise(spec: &TileSpec) -> Vec<f32> {
    let n = spec.npix;
    let fwhm_px = (spec.bmaj_arcsec * spec.bmin_arcsec).sqrt() / spec.cell_arcsec;
    let sigma_k = fwhm_px / (8.0 * std::f64::consts::LN_2).sqrt() / std::f64::consts::SQRT_2;
    let r = (4.0 * sigma_k).ceil() as usize;
    let kernel: Vec<f64> = (0..=2 * r)
        .map(|i| {
            let d = i as f64 - r as f64;
            (-0.5 * d * d / (sigma_k * sigma_k)).exp()
        })
        .collect();
    // Unit white noise through the separable kernel has rms sum(k^2).
    let scale = spec.noise_jy / kernel.iter().map(|k| k * k).sum::<f64>();
    let kernel: Vec<f32> = kernel.iter().map(|k| (k * scale.sqrt()) as f32).collect();
    let m = n + 2 * r;
    // Rows of white noise, each from its own stream so rows can be made in parallel.
    let mut white = vec![0.0f32; m * m];
    white.par_chunks_mut(m).enumerate().for_each(|(y, row)| {
        let mut rng = Rng::new(spec.seed.wrapping_mul(0x1000_0001).wrapping_add(y as u64));
        for pair in row.chunks_mut(2) {
            let (a, b) = rng.normal_pair();
            pair[0] = a as f32;
            if pair.len() > 1 {
                pair[1] = b as f32;
            }
        }
    });
    // Horizontal pass: m rows of n.
    let mut h = vec![0.0f32; m * n];
    h.par_chunks_mut(n).enumerate().for_each(|(y, out)| {
        let row = &white[y * m..(y + 1) * m];
        for (x, o) in out.iter_mut().enumerate() {
            *o = row[x..x + 2 * r + 1]
                .iter()
                .zip(&kernel)
                .map(|(a, k)| a * k)
                .sum();
        }
    });
    drop(white);
    // Vertical pass: n rows of n.
    let mut v = vec![0.0f32; n * n];
    v.par_chunks_mut(n).enumerate().for_each(|(y, out)| {
        for (j, k) in kernel.iter().enumerate() {
            let src = &h[(y + j) * n..(y + j + 1) * n];
            for (o, s) in out.iter_mut().zip(src) {
                *o += k * s;
            }
        }
    });
    v
}

/// Adds each source as the restoring beam scaled to its flux (Jy/beam peak = Jy).
/// Returns how many landed on the tile.
fn add_sources(
    spec: &TileSpec,
    wcs: &CelestialWcs,
    sources: &[PointSource],
    img: &mut [f32],
) -> usize {
    let n = spec.npix as i64;
    let fwhm_to_sigma = 1.0 / (8.0 * std::f64::consts::LN_2).sqrt();
    let smaj = spec.bmaj_arcsec / spec.cell_arcsec * fwhm_to_sigma;
    let smin = spec.bmin_arcsec / spec.cell_arcsec * fwhm_to_sigma;
    let (sp, cp) = spec.bpa_deg.to_radians().sin_cos();
    let r = (5.0 * smaj).ceil() as i64;
    let mut landed = 0;
    for s in sources {
        let Some((px, py)) = wcs.world_to_pix(s.ra_deg, s.dec_deg) else {
            continue;
        };
        // Sources just off the tile still put their wings on it.
        let rf = r as f64;
        if px < -rf || py < -rf || px > n as f64 + rf || py > n as f64 + rf {
            continue;
        }
        if px >= -0.5 && py >= -0.5 && px <= n as f64 - 0.5 && py <= n as f64 - 0.5 {
            landed += 1;
        }
        let (cx, cy) = (px.round() as i64, py.round() as i64);
        for y in (cy - r).max(0)..=(cy + r).min(n - 1) {
            for x in (cx - r).max(0)..=(cx + r).min(n - 1) {
                // Offsets east and north in pixels (x grows to the west).
                let e = -(x as f64 - px);
                let no = y as f64 - py;
                let along = e * sp + no * cp;
                let across = e * cp - no * sp;
                let g = (-0.5 * (along * along / (smaj * smaj) + across * across / (smin * smin)))
                    .exp();
                let i = (y * n + x) as usize;
                if img[i].is_finite() {
                    img[i] += (s.flux_jy * g) as f32;
                }
            }
        }
    }
    landed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_has_the_asked_rms() {
        let spec = TileSpec {
            npix: 200,
            noise_jy: 2e-3,
            ..TileSpec::default()
        };
        let v = correlated_noise(&spec);
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        let var = v
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / v.len() as f64;
        let rms = var.sqrt();
        assert!((rms / 2e-3 - 1.0).abs() < 0.05, "rms {rms}");
    }

    #[test]
    fn normals_are_standard() {
        let mut r = Rng::new(7);
        let xs: Vec<f64> = (0..20000).map(|_| r.normal_pair().0).collect();
        let m = xs.iter().sum::<f64>() / xs.len() as f64;
        let v = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(m.abs() < 0.03 && (v - 1.0).abs() < 0.03, "{m} {v}");
    }
}

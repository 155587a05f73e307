//! Mosaicking, black box: tiles written by the synthetic WSClean-like writer into a temp
//! dir, mosaicked through the library API (and once through the binary), outputs read back
//! with cfitsio and measured against the injected truth.
//!
//! Tiles are small (256 x 256) with 36 arcsec pixels, so that a tile spans 2.56 degrees
//! and the 3.16-degree primary beam varies across it as it does on a real DSA-110 tile.

use std::path::{Path, PathBuf};

use contimg::pipeline::mosaic::synth::{self, PointSource, TileSpec};
use contimg::pipeline::mosaic::{
    self, BeamUsed, MosaicError, MosaicOptions, ProjectionKind, beam, io,
};
use fitsio::FitsFile;
use ndarray::{Array2, Ix2};

const DEC: f64 = 37.0;
const RA: f64 = 150.0;

fn spec(ra_off_deg: f64, noise: f64, seed: u64) -> TileSpec {
    TileSpec {
        ra_deg: RA + ra_off_deg / DEC.to_radians().cos(),
        dec_deg: DEC,
        npix: 256,
        cell_arcsec: 36.0,
        bmaj_arcsec: 180.0,
        bmin_arcsec: 144.0,
        bpa_deg: 30.0,
        noise_jy: noise,
        seed,
        ..TileSpec::default()
    }
}

fn read2(path: &Path) -> Array2<f32> {
    let mut f = FitsFile::open(path).unwrap();
    let hdu = f.primary_hdu().unwrap();
    let a: ndarray::ArrayD<f32> = hdu.read_image(&mut f).unwrap();
    a.into_dimensionality::<Ix2>().unwrap()
}

fn key_f64(path: &Path, k: &str) -> f64 {
    let mut f = FitsFile::open(path).unwrap();
    let hdu = f.primary_hdu().unwrap();
    hdu.read_key::<f64>(&mut f, k).unwrap()
}

fn key_str(path: &Path, k: &str) -> String {
    let mut f = FitsFile::open(path).unwrap();
    let hdu = f.primary_hdu().unwrap();
    hdu.read_key::<String>(&mut f, k).unwrap()
}

/// Pixel (0-based) of a sky position from the output header alone, with the textbook SIN
/// formulas (Calabretta & Greisen 2002), independent of the crate's WCS code.
fn sin_pixel_from_header(path: &Path, ra: f64, dec: f64) -> (f64, f64) {
    assert_eq!(key_str(path, "CTYPE1"), "RA---SIN");
    assert_eq!(key_str(path, "CTYPE2"), "DEC--SIN");
    let (a0, d0) = (
        key_f64(path, "CRVAL1").to_radians(),
        key_f64(path, "CRVAL2").to_radians(),
    );
    let (a, d) = (ra.to_radians(), dec.to_radians());
    let x = (d.cos() * (a - a0).sin()).to_degrees();
    let y = (d.sin() * d0.cos() - d.cos() * d0.sin() * (a - a0).cos()).to_degrees();
    (
        x / key_f64(path, "CDELT1") + key_f64(path, "CRPIX1") - 1.0,
        y / key_f64(path, "CDELT2") + key_f64(path, "CRPIX2") - 1.0,
    )
}

struct Measured {
    flux: f64,
    dx: f64,
    dy: f64,
}

/// Aperture flux (sum / beam area, background from an annulus) and centroid offset of a
/// source expected at (x, y). `None` if the aperture leaves the image or touches NaN.
fn measure(img: &Array2<f32>, x: f64, y: f64, bmaj_px: f64, beam_area_px: f64) -> Option<Measured> {
    let (ny, nx) = img.dim();
    let r = 1.5 * bmaj_px;
    let rr = (1.8 * r).ceil() as i64 + 1;
    let (cx, cy) = (x.round() as i64, y.round() as i64);
    if cx - rr < 0 || cy - rr < 0 || cx + rr >= nx as i64 || cy + rr >= ny as i64 {
        return None;
    }
    let mut ann = vec![];
    let mut ap = vec![];
    for j in cy - rr..=cy + rr {
        for i in cx - rr..=cx + rr {
            let v = f64::from(img[[j as usize, i as usize]]);
            let d = (i as f64 - x).hypot(j as f64 - y);
            if d <= r {
                if !v.is_finite() {
                    return None;
                }
                ap.push((i as f64, j as f64, d, v));
            } else if d > 1.3 * r && d <= 1.8 * r && v.is_finite() {
                ann.push(v);
            }
        }
    }
    ann.sort_by(f64::total_cmp);
    let bkg = ann[ann.len() / 2];
    let flux = ap.iter().map(|p| p.3 - bkg).sum::<f64>() / beam_area_px;
    let core: Vec<_> = ap.iter().filter(|p| p.2 <= bmaj_px).collect();
    let w: f64 = core.iter().map(|p| p.3 - bkg).sum();
    let mx = core.iter().map(|p| (p.3 - bkg) * p.0).sum::<f64>() / w;
    let my = core.iter().map(|p| (p.3 - bkg) * p.1).sum::<f64>() / w;
    Some(Measured {
        flux,
        dx: mx - x,
        dy: my - y,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn robust_std(v: &[f64]) -> f64 {
    let m = median(v.to_vec());
    1.4826 * median(v.iter().map(|x| (x - m).abs()).collect())
}

fn unit(ra: f64, dec: f64) -> [f64; 3] {
    let (a, d) = (ra.to_radians(), dec.to_radians());
    [d.cos() * a.cos(), d.cos() * a.sin(), d.sin()]
}

/// Three overlapping tiles along RA (two WSClean cubes, one 2-D image), model beams.
struct Strip {
    _dir: tempfile::TempDir,
    tiles: Vec<PathBuf>,
    specs: Vec<TileSpec>,
    sources: Vec<PointSource>,
    out: PathBuf,
    weights: PathBuf,
    noise: PathBuf,
}

fn strip() -> Strip {
    let dir = tempfile::tempdir().unwrap();
    let specs: Vec<TileSpec> = [-1.2, 0.0, 1.2]
        .iter()
        .enumerate()
        .map(|(i, &off)| TileSpec {
            cube: i != 1,
            npix: 320,
            date_obs: format!("2026-11-30T08:{:02}:00.0", 5 * i),
            ..spec(off, 1e-3, 10 + i as u64)
        })
        .collect();
    let sources = synth::random_sources((RA, DEC), (2.4, 1.3), 24, (0.3, 3.0), 0.3, 7);
    assert!(sources.len() >= 24);
    let mut tiles = vec![];
    for (i, s) in specs.iter().enumerate() {
        let p = dir.path().join(format!("tile{i}.fits"));
        synth::write_tile(s, &sources, &p, None).unwrap();
        tiles.push(p);
    }
    let d = dir.path().to_path_buf();
    Strip {
        _dir: dir,
        tiles,
        specs,
        sources,
        out: d.join("mosaic.fits"),
        weights: d.join("weights.fits"),
        noise: d.join("noise.fits"),
    }
}

#[test]
fn fluxes_positions_noise_and_header_of_a_three_tile_mosaic() {
    let s = strip();
    let opts = MosaicOptions {
        weights_out: Some(s.weights.clone()),
        noise_out: Some(s.noise.clone()),
        ..MosaicOptions::new(&s.out)
    };
    let summary = mosaic::build_mosaic(&s.tiles, None, &opts).unwrap();
    assert_eq!(summary.tiles.len(), 3);
    eprintln!(
        "sigmas {:?}",
        summary.tiles.iter().map(|t| t.sigma).collect::<Vec<_>>()
    );
    for t in &summary.tiles {
        // The robust noise of tile x beam is the injected flat noise (a little above it:
        // a dozen bright sources on a small tile widen the distribution).
        assert!((t.sigma / 1e-3 - 1.0).abs() < 0.08, "sigma {}", t.sigma);
        assert!(matches!(t.beam, BeamUsed::Model { fwhm_deg } if (fwhm_deg - 3.155).abs() < 0.01));
        assert!(t.map_error_px < 1e-3);
    }

    // Header, read back by cfitsio.
    assert_eq!(key_f64(&s.out, "BITPIX"), -32.0);
    assert_eq!(key_str(&s.out, "BUNIT"), "JY/BEAM");
    assert_eq!(key_str(&s.out, "DATE-OBS"), "2026-11-30T08:00:00.0");
    assert!((key_f64(&s.out, "BMAJ") - 180.0 / 3600.0).abs() < 1e-12);
    assert!((key_f64(&s.out, "CDELT2") - 0.01).abs() < 1e-12);
    let history = io::read_history(&s.out).unwrap().join("\n");
    for t in &s.tiles {
        assert!(
            history.contains(&*t.file_name().unwrap().to_string_lossy()),
            "{history}"
        );
    }

    let img = read2(&s.out);
    let noise = read2(&s.noise);
    let weights = read2(&s.weights);
    let sp = &s.specs[0];
    let bmaj_px = sp.bmaj_arcsec / sp.cell_arcsec;
    let (mut ratios, mut offsets) = (vec![], vec![]);
    for src in &s.sources {
        let (x, y) = sin_pixel_from_header(&s.out, src.ra_deg, src.dec_deg);
        // The crate's own WCS, read from the same header, agrees.
        let h = io::read_header(&s.out).unwrap();
        let (x2, y2) = h.wcs.world_to_pix(src.ra_deg, src.dec_deg).unwrap();
        assert!((x - x2).abs() < 1e-6 && (y - y2).abs() < 1e-6);
        let Some(m) = measure(&img, x, y, bmaj_px, sp.beam_area_px()) else {
            continue;
        };
        ratios.push(m.flux / src.flux_jy);
        offsets.push(m.dx.hypot(m.dy));
    }
    assert!(ratios.len() >= 20, "only {} sources measured", ratios.len());
    eprintln!("flux ratios {ratios:?}\noffsets {offsets:?}");
    let med_dev = median(ratios.iter().map(|r| (r - 1.0).abs()).collect());
    let med = median(ratios.clone());
    assert!(med_dev < 0.02, "median |flux ratio - 1| = {med_dev}");
    assert!((med - 1.0).abs() < 0.02, "median flux ratio {med}");
    let worst = offsets.iter().cloned().fold(0.0, f64::max);
    assert!(worst < 0.3, "largest position offset {worst} px");

    // Noise map against the measured noise, away from sources.
    let h = io::read_header(&s.out).unwrap();
    let src_px: Vec<(f64, f64)> = s
        .sources
        .iter()
        .map(|p| h.wcs.world_to_pix(p.ra_deg, p.dec_deg).unwrap())
        .collect();
    let (ny, nx) = img.dim();
    let mut z = vec![];
    let mut block: std::collections::HashMap<(usize, usize), (Vec<f64>, Vec<f64>)> =
        Default::default();
    for j in 0..ny {
        for i in 0..nx {
            let (v, n) = (f64::from(img[[j, i]]), f64::from(noise[[j, i]]));
            if !v.is_finite() || !n.is_finite() {
                continue;
            }
            if src_px
                .iter()
                .any(|&(x, y)| (x - i as f64).hypot(y - j as f64) < 5.0 * bmaj_px)
            {
                continue;
            }
            z.push(v / n);
            let e = block.entry((j / 64, i / 64)).or_default();
            e.0.push(v);
            e.1.push(n);
            // Weights and noise are the same information.
            let w = f64::from(weights[[j, i]]);
            assert!((n * w.sqrt() - 1.0).abs() < 1e-5);
        }
    }
    assert!(z.len() > 20_000, "{} source-free pixels", z.len());
    let zs = robust_std(&z);
    assert!(
        (zs - 1.0).abs() < 0.1,
        "robust std of mosaic / noise map = {zs}"
    );
    let block_ratios: Vec<f64> = block
        .values()
        .filter(|(v, _)| v.len() > 1500)
        .map(|(v, n)| robust_std(v) / median(n.clone()))
        .collect();
    assert!(block_ratios.len() >= 6);
    let mb = median(block_ratios.clone());
    eprintln!(
        "noise: robust std of mosaic / noise map {zs:.4}, median block ratio {mb:.4} over {} blocks",
        block_ratios.len()
    );
    assert!(
        (mb - 1.0).abs() < 0.1,
        "measured / predicted noise per block: {block_ratios:?}"
    );
    // Overlaps are deeper than single coverage: the noise map is not flat.
    let (lo, hi) = noise
        .iter()
        .filter(|v| v.is_finite())
        .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    assert!(hi > 2.0 * lo);
}

#[test]
fn tan_output_maps_sources_to_their_sky_positions() {
    let s = strip();
    let opts = MosaicOptions {
        projection: ProjectionKind::Tan,
        ..MosaicOptions::new(&s.out)
    };
    mosaic::build_mosaic(&s.tiles, None, &opts).unwrap();
    assert_eq!(key_str(&s.out, "CTYPE1"), "RA---TAN");
    let h = io::read_header(&s.out).unwrap();
    let img = read2(&s.out);
    let sp = &s.specs[0];
    let mut offsets = vec![];
    let mut ratios = vec![];
    for src in &s.sources {
        let (x, y) = h.wcs.world_to_pix(src.ra_deg, src.dec_deg).unwrap();
        if let Some(m) = measure(
            &img,
            x,
            y,
            sp.bmaj_arcsec / sp.cell_arcsec,
            sp.beam_area_px(),
        ) {
            offsets.push(m.dx.hypot(m.dy));
            ratios.push(m.flux / src.flux_jy);
        }
    }
    assert!(offsets.len() >= 20);
    assert!(offsets.iter().all(|&o| o < 0.3), "{offsets:?}");
    assert!((median(ratios) - 1.0).abs() < 0.02);
}

#[test]
fn overlap_is_weighted_by_beam_squared_over_noise_squared() {
    let dir = tempfile::tempdir().unwrap();
    // Tile A is quiet and far from P; tile B is three times noisier but pointed near P.
    let a = spec(-0.6, 1e-3, 21);
    let b = TileSpec {
        cube: false,
        ..spec(0.6, 3e-3, 22)
    };
    let w0 = CelestialWcsProbe::new();
    let (pra, pdec) = w0.offset(0.3, 0.1);
    let (fa, fb) = (1.0, 0.5);
    let src = |f| PointSource {
        ra_deg: pra,
        dec_deg: pdec,
        flux_jy: f,
    };
    let (ta, tb) = (dir.path().join("a.fits"), dir.path().join("b.fits"));
    let (ba, bb) = (dir.path().join("a.pb.fits"), dir.path().join("b.pb.fits"));
    synth::write_tile(&a, &[src(fa)], &ta, Some(&ba)).unwrap();
    synth::write_tile(&b, &[src(fb)], &tb, Some(&bb)).unwrap();
    let out = dir.path().join("m.fits");
    let wts = dir.path().join("w.fits");
    let opts = MosaicOptions {
        weights_out: Some(wts.clone()),
        ..MosaicOptions::new(&out)
    };
    let summary = mosaic::build_mosaic(
        &[ta.clone(), tb.clone()],
        Some(&[ba.clone(), bb.clone()]),
        &opts,
    )
    .unwrap();
    assert_eq!(summary.tiles[0].beam, BeamUsed::Image(ba));
    assert!((summary.tiles[1].sigma / 3e-3 - 1.0).abs() < 0.05);

    // The prediction: B from the dish model at P, sigma the injected noise.
    let fwhm = beam::fwhm_rad(1.405e9);
    let p = unit(pra, pdec);
    let ba_p = beam::response(beam::angle_between(p, unit(a.ra_deg, a.dec_deg)), fwhm);
    let bb_p = beam::response(beam::angle_between(p, unit(b.ra_deg, b.dec_deg)), fwhm);
    assert!(bb_p > ba_p + 0.1, "P is nearer B's centre: {ba_p} {bb_p}");
    let (wa, wb) = (ba_p * ba_p / 1e-6, bb_p * bb_p / 9e-6);
    let expected = (wa * fa + wb * fb) / (wa + wb);
    // Neither an unweighted mean nor beam-only weights would give this.
    assert!((expected - 0.75).abs() > 0.1);

    let h = io::read_header(&out).unwrap();
    let (x, y) = h.wcs.world_to_pix(pra, pdec).unwrap();
    let img = read2(&out);
    let m = measure(&img, x, y, a.bmaj_arcsec / a.cell_arcsec, a.beam_area_px()).unwrap();
    assert!(
        (m.flux / expected - 1.0).abs() < 0.02,
        "flux {} expected {expected}",
        m.flux
    );
    let wmap = read2(&wts);
    let w = f64::from(wmap[[y.round() as usize, x.round() as usize]]);
    assert!(
        (w / (wa + wb) - 1.0).abs() < 0.05,
        "weight {w} expected {}",
        wa + wb
    );
}

/// Offsets on the sky about the strip centre.
struct CelestialWcsProbe(mosaic::CelestialWcs);
impl CelestialWcsProbe {
    fn new() -> Self {
        Self(
            mosaic::CelestialWcs::new(
                ProjectionKind::Sin,
                [RA, DEC],
                [1.0, 1.0],
                [[1.0, 0.0], [0.0, 1.0]],
            )
            .unwrap(),
        )
    }
    /// (east, north) in degrees -> (RA, Dec).
    fn offset(&self, east: f64, north: f64) -> (f64, f64) {
        self.0.pix_to_world(east, north).unwrap()
    }
}

fn small_tile(dir: &Path, name: &str, spec: TileSpec) -> PathBuf {
    let p = dir.join(name);
    synth::write_tile(&spec, &[], &p, None).unwrap();
    p
}

#[test]
fn refuses_a_missing_tile() {
    let dir = tempfile::tempdir().unwrap();
    let good = small_tile(dir.path(), "good.fits", spec(0.0, 1e-3, 1));
    let missing = dir.path().join("nope.fits");
    let err = mosaic::build_mosaic(
        &[good, missing.clone()],
        None,
        &MosaicOptions::new(dir.path().join("m.fits")),
    )
    .unwrap_err();
    assert!(matches!(&err, MosaicError::Missing { path } if *path == missing));
    assert!(err.to_string().contains("nope.fits: no such file"));
    assert!(!dir.path().join("m.fits").exists());
}

#[test]
fn refuses_a_tile_without_a_celestial_wcs() {
    let dir = tempfile::tempdir().unwrap();
    let bare = dir.path().join("bare.fits");
    let desc = fitsio::images::ImageDescription {
        data_type: fitsio::images::ImageType::Float,
        dimensions: &[16, 16],
    };
    let mut f = FitsFile::create(&bare)
        .with_custom_primary(&desc)
        .open()
        .unwrap();
    let hdu = f.primary_hdu().unwrap();
    hdu.write_image(&mut f, &vec![1.0f32; 256]).unwrap();
    drop(f);
    let err = mosaic::build_mosaic(
        &[bare],
        None,
        &MosaicOptions::new(dir.path().join("m.fits")),
    )
    .unwrap_err();
    assert!(matches!(err, MosaicError::NoCelestialWcs { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("bare.fits: no usable celestial WCS: no CTYPE1"),
        "{err}"
    );
}

#[test]
fn refuses_mismatched_pixel_scales() {
    let dir = tempfile::tempdir().unwrap();
    let a = small_tile(dir.path(), "a.fits", spec(0.0, 1e-3, 1));
    let b = small_tile(
        dir.path(),
        "b.fits",
        TileSpec {
            cell_arcsec: 40.0,
            ..spec(0.5, 1e-3, 2)
        },
    );
    let err = mosaic::build_mosaic(
        &[a, b],
        None,
        &MosaicOptions::new(dir.path().join("m.fits")),
    )
    .unwrap_err();
    match &err {
        MosaicError::PixelScaleMismatch {
            scale_arcsec,
            reference_arcsec,
            ..
        } => {
            assert!((scale_arcsec - 40.0).abs() < 1e-9 && (reference_arcsec - 36.0).abs() < 1e-9)
        }
        other => panic!("wrong error: {other}"),
    }
    assert!(err.to_string().contains("b.fits"));
}

#[test]
fn refuses_a_tile_that_is_entirely_nan() {
    let dir = tempfile::tempdir().unwrap();
    let a = small_tile(dir.path(), "a.fits", spec(0.0, 1e-3, 1));
    // A primary-beam limit above 1 blanks every pixel.
    let nan = small_tile(
        dir.path(),
        "nan.fits",
        TileSpec {
            pb_limit: 2.0,
            ..spec(0.5, 1e-3, 2)
        },
    );
    let err = mosaic::build_mosaic(
        &[a, nan],
        None,
        &MosaicOptions::new(dir.path().join("m.fits")),
    )
    .unwrap_err();
    assert!(matches!(err, MosaicError::AllNan { .. }), "{err}");
    assert!(err.to_string().contains("nan.fits: every pixel is NaN"));
}

#[test]
fn refuses_beams_that_do_not_match_the_tiles() {
    let dir = tempfile::tempdir().unwrap();
    let a = small_tile(dir.path(), "a.fits", spec(0.0, 1e-3, 1));
    let err = mosaic::build_mosaic(
        &[a.clone(), a.clone()],
        Some(&[a]),
        &MosaicOptions::new(dir.path().join("m.fits")),
    )
    .unwrap_err();
    assert!(
        matches!(err, MosaicError::BeamCount { tiles: 2, beams: 1 }),
        "{err}"
    );
}

#[test]
fn nan_regions_contribute_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // Tile B is blanked where its beam is below 0.8: the mosaic there is tile A alone.
    let a = small_tile(dir.path(), "a.fits", spec(-0.3, 1e-3, 1));
    let b = small_tile(
        dir.path(),
        "b.fits",
        TileSpec {
            pb_limit: 0.8,
            ..spec(0.3, 1e-3, 2)
        },
    );
    let w = dir.path().join("w.fits");
    let opts = MosaicOptions {
        weights_out: Some(w.clone()),
        ..MosaicOptions::new(dir.path().join("m.fits"))
    };
    let s = mosaic::build_mosaic(&[a.clone(), b], None, &opts).unwrap();
    assert!(s.tiles[1].pixels < s.tiles[0].pixels);
    // Only-A-coverage: the weight is A's alone, B^2/sigma^2 with B from the model.
    let h = io::read_header(&opts.out).unwrap();
    let wmap = read2(&w);
    let probe = CelestialWcsProbe::new();
    let (ra, dec) = probe.offset(-1.3, 0.0); // 1.0 deg from A, 1.6 deg from B
    let (x, y) = h.wcs.world_to_pix(ra, dec).unwrap();
    let sa = spec(-0.3, 1e-3, 1);
    let fwhm = beam::fwhm_rad(1.405e9);
    let bb = beam::response(
        beam::angle_between(
            unit(ra, dec),
            unit(sa.ra_deg + 0.6 / DEC.to_radians().cos(), DEC),
        ),
        fwhm,
    );
    assert!(bb < 0.8, "B's beam there is {bb}, below its limit");
    let ba = beam::response(
        beam::angle_between(unit(ra, dec), unit(sa.ra_deg, sa.dec_deg)),
        fwhm,
    );
    let got = f64::from(wmap[[y.round() as usize, x.round() as usize]]);
    let sigma_a = s.tiles[0].sigma;
    assert!(
        (got / (ba * ba / (sigma_a * sigma_a)) - 1.0).abs() < 0.01,
        "{got}"
    );
}

#[test]
fn the_binary_reports_bad_input_without_panicking_and_mosaics_good_input() {
    let dir = tempfile::tempdir().unwrap();
    let exe = env!("CARGO_BIN_EXE_contimg");
    let out = dir.path().join("m.fits");
    let run = |args: &[&std::ffi::OsStr]| {
        std::process::Command::new(exe)
            .arg("mosaic")
            .args(args)
            .env("CONTIMG_LOG", "warn")
            .output()
            .unwrap()
    };
    let missing = dir.path().join("missing.fits");
    let o = run(&["--out".as_ref(), out.as_os_str(), missing.as_os_str()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("contimg: building mosaic") && err.contains("missing.fits: no such file"),
        "{err}"
    );
    assert!(!err.contains("panicked"));

    let a = dir.path().join("a.fits");
    let a_pb = dir.path().join("a.pb.fits");
    let b = dir.path().join("b.fits");
    let b_pb = dir.path().join("b.pb.fits");
    synth::write_tile(&spec(-0.3, 1e-3, 1), &[], &a, Some(&a_pb)).unwrap();
    synth::write_tile(&spec(0.3, 1e-3, 2), &[], &b, Some(&b_pb)).unwrap();
    let noise = dir.path().join("n.fits");
    let o = run(&[
        "--out".as_ref(),
        out.as_os_str(),
        "--noise".as_ref(),
        noise.as_os_str(),
        "--projection".as_ref(),
        "tan".as_ref(),
        a.as_os_str(),
        b.as_os_str(),
        "--beams".as_ref(),
        a_pb.as_os_str(),
        b_pb.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(key_str(&out, "CTYPE2"), "DEC--TAN");
    let n = read2(&noise);
    let best = n
        .iter()
        .filter(|v| v.is_finite())
        .fold(f32::MAX, |a, &v| a.min(v));
    // Two tiles overlapping near their centres: about 1/sqrt(2) of one tile's noise.
    assert!(best > 0.6e-3 && best < 0.8e-3, "{best}");
}

#[test]
fn a_tile_with_a_cd_matrix_gives_the_same_mosaic_as_its_north_up_twin() {
    let dir = tempfile::tempdir().unwrap();
    let sp = TileSpec {
        cube: false,
        npix: 200,
        ..spec(0.0, 1e-3, 5)
    };
    let sources = synth::random_sources((RA, DEC), (0.8, 0.8), 8, (0.3, 3.0), 0.3, 3);
    let plain = dir.path().join("plain.fits");
    synth::write_tile(&sp, &sources, &plain, None).unwrap();
    // The same sky stored transposed: pixel (i, j) holds what (j, i) held, so
    // CD = CDELT x swap = [[0, -s], [s, 0]] and the reference pixel swaps its axes.
    let data = read2(&plain);
    let h = io::read_header(&plain).unwrap();
    let cd = h.wcs.cd();
    let crpix = h.wcs.crpix();
    let wcs_t = mosaic::CelestialWcs::new(
        ProjectionKind::Sin,
        h.wcs.crval(),
        [crpix[1], crpix[0]],
        [[cd[0][1], cd[0][0]], [cd[1][1], cd[1][0]]],
    )
    .unwrap();
    let t = data.t().as_standard_layout().to_owned();
    let keys = io::OutputKeys {
        bunit: h.bunit.clone(),
        beam: h.beam,
        freq_hz: h.freq_hz,
        date_obs: h.date_obs.clone(),
        ..Default::default()
    };
    let rotated = dir.path().join("cd.fits");
    let (ny, nx) = t.dim();
    io::write_plane(
        &rotated,
        t.as_slice().unwrap(),
        ny,
        nx,
        &wcs_t,
        &keys,
        false,
    )
    .unwrap();
    assert!(
        key_f64(&rotated, "CD1_2") != 0.0,
        "written with a CD matrix"
    );

    let (m1, m2) = (dir.path().join("m1.fits"), dir.path().join("m2.fits"));
    let s1 = mosaic::build_mosaic(&[plain], None, &MosaicOptions::new(&m1)).unwrap();
    let s2 = mosaic::build_mosaic(&[rotated], None, &MosaicOptions::new(&m2)).unwrap();
    assert_eq!((s1.grid.nx, s1.grid.ny), (s2.grid.nx, s2.grid.ny));
    assert!((s1.tiles[0].sigma / s2.tiles[0].sigma - 1.0).abs() < 1e-3);
    let (a, b) = (read2(&m1), read2(&m2));
    let mut worst = 0.0f32;
    for (x, y) in a.iter().zip(b.iter()) {
        assert_eq!(x.is_finite(), y.is_finite());
        if x.is_finite() {
            worst = worst.max((x - y).abs());
        }
    }
    assert!(worst < 1e-4, "largest difference {worst} Jy/beam");
}

#[test]
fn refuses_tiles_on_opposite_sides_of_the_sky() {
    let dir = tempfile::tempdir().unwrap();
    let a = small_tile(dir.path(), "a.fits", spec(0.0, 1e-3, 1));
    let far = TileSpec {
        ra_deg: RA + 180.0,
        dec_deg: -DEC,
        ..spec(0.0, 1e-3, 2)
    };
    let b = small_tile(dir.path(), "b.fits", far);
    let err = mosaic::build_mosaic(
        &[a, b],
        None,
        &MosaicOptions::new(dir.path().join("m.fits")),
    )
    .unwrap_err();
    assert!(matches!(err, MosaicError::TooWide), "{err}");
}

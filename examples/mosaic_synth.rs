//! Writes a strip of synthetic DSA-110 tiles (and their beam images) along RA, plus the
//! true source list, for the mosaic benchmark and for demos:
//!
//! ```sh
//! cargo run --release --example mosaic_synth -- --out-dir /tmp/mosaic-bench --tiles 12 --npix 4800
//! ```
//!
//! Writes `tile_NN.fits`, `tile_NN.pb.fits` and `sources.csv` (ra_deg,dec_deg,flux_jy).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use contimg::pipeline::mosaic::synth::{self, TileSpec};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long)]
    out_dir: PathBuf,
    #[arg(long, default_value_t = 12)]
    tiles: usize,
    #[arg(long, default_value_t = 4800)]
    npix: usize,
    #[arg(long, default_value_t = 3.0)]
    cell_arcsec: f64,
    /// Separation of neighbouring pointings on the sky (DSA-110 drifts 1.25 deg of RA in
    /// five minutes at the equator).
    #[arg(long, default_value_t = 1.25)]
    step_deg: f64,
    #[arg(long, default_value_t = 150.0)]
    ra: f64,
    #[arg(long, default_value_t = 37.0)]
    dec: f64,
    /// Sources per square degree.
    #[arg(long, default_value_t = 20.0)]
    density: f64,
    /// Noise at the beam centre, Jy/beam.
    #[arg(long, default_value_t = 1e-3)]
    noise: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    std::fs::create_dir_all(&a.out_dir)
        .with_context(|| format!("creating {}", a.out_dir.display()))?;
    let size_deg = a.npix as f64 * a.cell_arcsec / 3600.0;
    let span = (a.tiles as f64 - 1.0) * a.step_deg;
    let half = (0.5 * (span + size_deg), 0.5 * size_deg);
    let n_src = (a.density * 4.0 * half.0 * half.1).round() as usize;
    let sources = synth::random_sources(
        (a.ra, a.dec),
        half,
        n_src,
        (0.02, 1.0),
        10.0 * 15.0 / 3600.0,
        a.seed,
    );
    let mut csv = std::fs::File::create(a.out_dir.join("sources.csv"))?;
    writeln!(csv, "ra_deg,dec_deg,flux_jy")?;
    for s in &sources {
        writeln!(csv, "{:.9},{:.9},{:.6}", s.ra_deg, s.dec_deg, s.flux_jy)?;
    }
    for i in 0..a.tiles {
        // Pointings step in RA along the declination of the strip.
        let off = (i as f64 - 0.5 * (a.tiles as f64 - 1.0)) * a.step_deg;
        let spec = TileSpec {
            ra_deg: (a.ra + off / a.dec.to_radians().cos()).rem_euclid(360.0),
            dec_deg: a.dec,
            npix: a.npix,
            cell_arcsec: a.cell_arcsec,
            noise_jy: a.noise,
            seed: a.seed * 1000 + i as u64,
            date_obs: format!("2026-11-30T08:{:02}:00.0", (5 * i) % 60),
            ..TileSpec::default()
        };
        let img = a.out_dir.join(format!("tile_{i:02}.fits"));
        let pb = a.out_dir.join(format!("tile_{i:02}.pb.fits"));
        let t = std::time::Instant::now();
        let w = synth::write_tile(&spec, &sources, &img, Some(&pb))?;
        eprintln!(
            "{}: {} sources, {:.1} s",
            img.display(),
            w.sources,
            t.elapsed().as_secs_f64()
        );
    }
    eprintln!(
        "{} sources in {}",
        sources.len(),
        a.out_dir.join("sources.csv").display()
    );
    Ok(())
}

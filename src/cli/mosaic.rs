//! `contimg mosaic`: reproject and co-add FITS tiles, weighted by B^2/sigma^2.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::ValueEnum;

use crate::pipeline::mosaic::{self, BeamUsed, MosaicOptions, ProjectionKind};

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProjectionArg {
    #[value(name = "SIN", alias = "sin")]
    Sin,
    #[value(name = "TAN", alias = "tan")]
    Tan,
}

/// Arguments of `contimg mosaic`.
#[derive(clap::Args, Debug)]
pub struct MosaicArgs {
    /// The mosaic to write (float32 FITS; replaced if present).
    #[arg(long)]
    pub out: PathBuf,
    /// Also write the summed weights B^2/sigma^2.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Also write the noise map 1/sqrt(sum of weights).
    #[arg(long)]
    pub noise: Option<PathBuf>,
    /// Primary-beam images, one per tile in the same order. Without them a Gaussian
    /// model of a 4.65 m dish at each tile's RESTFRQ is used. Put --beams after the
    /// tiles: it takes every value that follows (or end its list with --).
    #[arg(long, num_args = 1.., value_name = "BEAM.fits")]
    pub beams: Vec<PathBuf>,
    /// Projection of the output grid.
    #[arg(long, value_enum, default_value = "SIN")]
    pub projection: ProjectionArg,
    /// Largest relative difference between the tiles' pixel scales.
    #[arg(long, default_value_t = 0.01)]
    pub scale_tolerance: f64,
    /// Tiles: 2-D images or WSClean [1, 1, ny, nx] cubes with a SIN or TAN WCS.
    #[arg(required = true, value_name = "TILE.fits")]
    pub tiles: Vec<PathBuf>,
}

pub fn run(args: MosaicArgs) -> anyhow::Result<ExitCode> {
    let opts = MosaicOptions {
        out: args.out.clone(),
        weights_out: args.weights,
        noise_out: args.noise,
        projection: match args.projection {
            ProjectionArg::Sin => ProjectionKind::Sin,
            ProjectionArg::Tan => ProjectionKind::Tan,
        },
        scale_tolerance: args.scale_tolerance,
    };
    let beams = (!args.beams.is_empty()).then_some(args.beams.as_slice());
    let summary = mosaic::build_mosaic(&args.tiles, beams, &opts)
        .with_context(|| format!("building mosaic {}", args.out.display()))?;
    let g = &summary.grid;
    let c = g.wcs.crval();
    println!(
        "{}: {} x {} pixels at {:.3} arcsec ({}), centre RA {:.5} Dec {:+.5} deg, {} tiles, {:.1} s",
        args.out.display(),
        g.nx,
        g.ny,
        g.wcs.pixel_scale_deg() * 3600.0,
        g.wcs.kind().code(),
        c[0],
        c[1],
        summary.tiles.len(),
        summary.seconds
    );
    for t in &summary.tiles {
        let beam = match &t.beam {
            BeamUsed::Image(p) => format!("beam {}", p.display()),
            BeamUsed::Model { fwhm_deg } => format!("beam model {fwhm_deg:.3} deg FWHM"),
        };
        println!(
            "  {}: sigma {:.3e}, {} pixels, {beam}",
            t.path.display(),
            t.sigma,
            t.pixels
        );
    }
    for p in &summary.outputs[1..] {
        println!("  wrote {}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}

//! The output grid: the tiles' pixel scale, north up, centred on the tiles' footprint and
//! just large enough to hold every tile.

use super::MosaicError;
use super::io::TileHeader;
use super::reproject::outline;
use super::wcs::{CelestialWcs, ProjectionKind, xyz_to_radec};

/// Larger grids are refused: 2^30 pixels is 4 GiB per float32 plane, and there are two.
const MAX_PIXELS: usize = 1 << 30;

#[derive(Debug, Clone)]
pub struct OutputGrid {
    pub wcs: CelestialWcs,
    pub nx: usize,
    pub ny: usize,
}

impl OutputGrid {
    /// A grid of pixel size `scale_deg` covering every tile's pixel footprint.
    pub fn covering(
        tiles: &[TileHeader],
        kind: ProjectionKind,
        scale_deg: f64,
    ) -> Result<OutputGrid, MosaicError> {
        // Outline points of every tile on the sky.
        let mut pts = Vec::new();
        for t in tiles {
            for (x, y) in outline(t.nx, t.ny, 32) {
                if let Some(v) = t.wcs.pix_to_xyz(x, y) {
                    pts.push(v);
                }
            }
        }
        // Start from the mean direction, then move the reference point to the centre of
        // the bounding box in the projection plane (twice: the box shifts a little).
        let (mut sx, mut sy, mut sz) = (0.0, 0.0, 0.0);
        for v in &pts {
            sx += v.x();
            sy += v.y();
            sz += v.z();
        }
        let norm = (sx * sx + sy * sy + sz * sz).sqrt();
        let too_wide = || MosaicError::TooWide;
        if norm == 0.0 || pts.is_empty() {
            return Err(too_wide());
        }
        let mut centre = xyz_to_radec(&mapproj::XYZ::new(sx / norm, sy / norm, sz / norm));
        let mut half = (0.0, 0.0);
        for _ in 0..3 {
            let probe = CelestialWcs::north_up(kind, [centre.0, centre.1], [1.0, 1.0], scale_deg)
                .ok_or_else(too_wide)?;
            let (mut xmin, mut xmax, mut ymin, mut ymax) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
            for v in &pts {
                // A point off this projection means the tiles span a hemisphere.
                let (x, y) = probe.xyz_to_pix(v).ok_or_else(too_wide)?;
                xmin = xmin.min(x);
                xmax = xmax.max(x);
                ymin = ymin.min(y);
                ymax = ymax.max(y);
            }
            let (cx, cy) = (0.5 * (xmin + xmax), 0.5 * (ymin + ymax));
            half = (0.5 * (xmax - xmin), 0.5 * (ymax - ymin));
            let c = probe.pix_to_xyz(cx, cy).ok_or_else(too_wide)?;
            centre = xyz_to_radec(&c);
        }
        // Odd sizes with the reference pixel in the middle; the half-extent is rounded up
        // and one pixel of margin added for the recentring residual.
        let hx = half.0.ceil() as usize + 1;
        let hy = half.1.ceil() as usize + 1;
        let (nx, ny) = (2 * hx + 1, 2 * hy + 1);
        if nx.saturating_mul(ny) > MAX_PIXELS {
            return Err(MosaicError::TooLarge { nx, ny });
        }
        let wcs = CelestialWcs::north_up(
            kind,
            [centre.0, centre.1],
            [(hx + 1) as f64, (hy + 1) as f64],
            scale_deg,
        )
        .ok_or_else(too_wide)?;
        Ok(OutputGrid { wcs, nx, ny })
    }
}

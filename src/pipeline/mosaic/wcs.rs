//! The celestial WCS of a tile or of the output grid: FITS pixel <-> intermediate world
//! coordinates (the linear CRPIX / CD or PC x CDELT part, done here) <-> sky (the
//! spherical projection, done by cds-astro's `mapproj`).
//!
//! `mapproj` serves the projection maths: its `CenteredProjection` rotates the sky so that
//! the reference point (CRVAL) is the native pole, with the projection plane's x towards
//! increasing RA and y towards the north, which is the FITS convention for zenithal
//! projections with the default LONPOLE = 180. Its plane is in radians; FITS intermediate
//! coordinates are in degrees. The linear part and the header parsing are a few lines and
//! stay here, so that the reader can say precisely why a header is refused.
//!
//! Pixel coordinates in this module are 0-based array indices (x = column, y = row); FITS
//! pixel p = index + 1.

use mapproj::zenithal::{sin::Sin, tan::Tan};
use mapproj::{CanonicalProjection, CenteredProjection, LonLat, ProjXY, Projection, XYZ};

/// Zenithal projections that tiles and mosaics may use.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ProjectionKind {
    /// Orthographic (slant terms zero): what WSClean writes.
    Sin,
    /// Gnomonic.
    Tan,
}

impl ProjectionKind {
    /// The three-letter FITS code.
    pub fn code(self) -> &'static str {
        match self {
            ProjectionKind::Sin => "SIN",
            ProjectionKind::Tan => "TAN",
        }
    }

    pub fn from_code(code: &str) -> Option<Self> {
        match code.trim().to_ascii_uppercase().as_str() {
            "SIN" => Some(ProjectionKind::Sin),
            "TAN" => Some(ProjectionKind::Tan),
            _ => None,
        }
    }
}

enum Proj {
    Sin(CenteredProjection<Sin>),
    Tan(CenteredProjection<Tan>),
}

/// A 2-D celestial WCS: RA on the first axis, Dec on the second.
pub struct CelestialWcs {
    kind: ProjectionKind,
    crval: [f64; 2],
    crpix: [f64; 2],
    cd: [[f64; 2]; 2],
    inv: [[f64; 2]; 2],
    proj: Proj,
}

impl std::fmt::Debug for CelestialWcs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CelestialWcs")
            .field("kind", &self.kind)
            .field("crval", &self.crval)
            .field("crpix", &self.crpix)
            .field("cd", &self.cd)
            .finish()
    }
}

impl Clone for CelestialWcs {
    fn clone(&self) -> Self {
        Self::new(self.kind, self.crval, self.crpix, self.cd).expect("already validated")
    }
}

impl CelestialWcs {
    /// `crval` in degrees, `crpix` FITS 1-based, `cd` in degrees per pixel
    /// (`cd[i][j]` = CDi_j). `None` when the matrix is singular or not finite.
    pub fn new(
        kind: ProjectionKind,
        crval: [f64; 2],
        crpix: [f64; 2],
        cd: [[f64; 2]; 2],
    ) -> Option<Self> {
        let det = cd[0][0] * cd[1][1] - cd[0][1] * cd[1][0];
        let all = [crval[0], crval[1], crpix[0], crpix[1], det];
        if det == 0.0 || all.iter().any(|v| !v.is_finite()) || crval[1].abs() > 90.0 {
            return None;
        }
        let inv = [
            [cd[1][1] / det, -cd[0][1] / det],
            [-cd[1][0] / det, cd[0][0] / det],
        ];
        let centre = LonLat::new(crval[0].to_radians(), crval[1].to_radians());
        let proj = match kind {
            ProjectionKind::Sin => {
                let mut p = CenteredProjection::new(Sin::new());
                p.set_proj_center_from_lonlat(&centre);
                Proj::Sin(p)
            }
            ProjectionKind::Tan => {
                let mut p = CenteredProjection::new(Tan::new());
                p.set_proj_center_from_lonlat(&centre);
                Proj::Tan(p)
            }
        };
        Some(Self {
            kind,
            crval,
            crpix,
            cd,
            inv,
            proj,
        })
    }

    /// North up, east left, square pixels of `scale_deg`.
    pub fn north_up(
        kind: ProjectionKind,
        crval: [f64; 2],
        crpix: [f64; 2],
        scale_deg: f64,
    ) -> Option<Self> {
        Self::new(kind, crval, crpix, [[-scale_deg, 0.0], [0.0, scale_deg]])
    }

    pub fn kind(&self) -> ProjectionKind {
        self.kind
    }
    pub fn crval(&self) -> [f64; 2] {
        self.crval
    }
    pub fn crpix(&self) -> [f64; 2] {
        self.crpix
    }
    pub fn cd(&self) -> [[f64; 2]; 2] {
        self.cd
    }

    /// Geometric mean pixel size in degrees.
    pub fn pixel_scale_deg(&self) -> f64 {
        (self.cd[0][0] * self.cd[1][1] - self.cd[0][1] * self.cd[1][0])
            .abs()
            .sqrt()
    }

    /// 0-based pixel -> projection plane in radians.
    #[inline]
    pub fn pix_to_plane(&self, x: f64, y: f64) -> (f64, f64) {
        let dx = x + 1.0 - self.crpix[0];
        let dy = y + 1.0 - self.crpix[1];
        (
            (self.cd[0][0] * dx + self.cd[0][1] * dy).to_radians(),
            (self.cd[1][0] * dx + self.cd[1][1] * dy).to_radians(),
        )
    }

    /// Projection plane in radians -> 0-based pixel.
    #[inline]
    pub fn plane_to_pix(&self, u: f64, v: f64) -> (f64, f64) {
        let (u, v) = (u.to_degrees(), v.to_degrees());
        (
            self.inv[0][0] * u + self.inv[0][1] * v + self.crpix[0] - 1.0,
            self.inv[1][0] * u + self.inv[1][1] * v + self.crpix[1] - 1.0,
        )
    }

    /// 0-based pixel -> unit vector on the sky (equatorial frame).
    pub fn pix_to_xyz(&self, x: f64, y: f64) -> Option<XYZ> {
        let (u, v) = self.pix_to_plane(x, y);
        let p = ProjXY::new(u, v);
        match &self.proj {
            Proj::Sin(c) => c.unproj_xyz(&p),
            Proj::Tan(c) => c.unproj_xyz(&p),
        }
    }

    /// Unit vector on the sky -> 0-based pixel; `None` on the far side of the projection.
    pub fn xyz_to_pix(&self, xyz: &XYZ) -> Option<(f64, f64)> {
        let p = match &self.proj {
            Proj::Sin(c) => c.proj_xyz(xyz),
            Proj::Tan(c) => c.proj_xyz(xyz),
        }?;
        Some(self.plane_to_pix(p.x(), p.y()))
    }

    /// 0-based pixel -> (RA, Dec) in degrees, RA in [0, 360).
    pub fn pix_to_world(&self, x: f64, y: f64) -> Option<(f64, f64)> {
        Some(xyz_to_radec(&self.pix_to_xyz(x, y)?))
    }

    /// (RA, Dec) in degrees -> 0-based pixel.
    pub fn world_to_pix(&self, ra_deg: f64, dec_deg: f64) -> Option<(f64, f64)> {
        self.xyz_to_pix(&radec_to_xyz(ra_deg, dec_deg))
    }

    /// Direction of a 0-based pixel in the native frame of the projection (x towards the
    /// reference point). Cheap: one square root, no trigonometry; the primary-beam model
    /// measures distances between such vectors.
    #[inline]
    pub fn pix_to_native(&self, x: f64, y: f64) -> Option<[f64; 3]> {
        let (u, v) = self.pix_to_plane(x, y);
        self.plane_to_native(u, v)
    }

    #[inline]
    fn plane_to_native(&self, u: f64, v: f64) -> Option<[f64; 3]> {
        let p = ProjXY::new(u, v);
        let n = match &self.proj {
            Proj::Sin(c) => c.inner_proj().unproj(&p),
            Proj::Tan(c) => c.inner_proj().unproj(&p),
        }?;
        Some([n.x(), n.y(), n.z()])
    }

    /// A sky direction in the native frame of the projection.
    pub fn world_to_native(&self, ra_deg: f64, dec_deg: f64) -> Option<[f64; 3]> {
        let (x, y) = self.world_to_pix(ra_deg, dec_deg)?;
        self.pix_to_native(x, y)
    }
}

/// (RA, Dec) in degrees -> unit vector.
pub fn radec_to_xyz(ra_deg: f64, dec_deg: f64) -> XYZ {
    LonLat::new(ra_deg.to_radians(), dec_deg.to_radians()).to_xyz()
}

/// Unit vector -> (RA, Dec) in degrees.
pub fn xyz_to_radec(v: &XYZ) -> (f64, f64) {
    let lat = v.z().atan2(v.x().hypot(v.y()));
    let lon = v.y().atan2(v.x());
    (lon.to_degrees().rem_euclid(360.0), lat.to_degrees())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Textbook SIN (Calabretta & Greisen 2002, LONPOLE 180): intermediate coordinates in
    /// degrees of (ra, dec) about (ra0, dec0).
    fn sin_reference(ra: f64, dec: f64, ra0: f64, dec0: f64) -> (f64, f64) {
        let (a, d, a0, d0) = (
            ra.to_radians(),
            dec.to_radians(),
            ra0.to_radians(),
            dec0.to_radians(),
        );
        let x = d.cos() * (a - a0).sin();
        let y = d.sin() * d0.cos() - d.cos() * d0.sin() * (a - a0).cos();
        (x.to_degrees(), y.to_degrees())
    }

    #[test]
    fn sin_matches_the_textbook_formula_and_fits_orientation() {
        let w = CelestialWcs::north_up(
            ProjectionKind::Sin,
            [150.0, 37.0],
            [2401.0, 2401.0],
            3.0 / 3600.0,
        )
        .unwrap();
        // RA grows to the left (east), Dec grows upwards.
        let (x, y) = w.world_to_pix(150.5, 37.2).unwrap();
        assert!(x < 2400.0 && y > 2400.0);
        for &(ra, dec) in &[(150.5, 37.2), (148.9, 35.5), (151.7, 38.9)] {
            let (px, py) = w.world_to_pix(ra, dec).unwrap();
            let (xi, eta) = sin_reference(ra, dec, 150.0, 37.0);
            let ex = -xi / (3.0 / 3600.0) + 2400.0;
            let ey = eta / (3.0 / 3600.0) + 2400.0;
            assert!(
                (px - ex).abs() < 1e-6 && (py - ey).abs() < 1e-6,
                "{px} {ex} {py} {ey}"
            );
            let (r, d) = w.pix_to_world(px, py).unwrap();
            assert!((r - ra).abs() < 1e-9 && (d - dec).abs() < 1e-9);
        }
    }

    #[test]
    fn tan_with_rotated_cd_round_trips() {
        let s = 3.0 / 3600.0;
        let (c, sn) = (0.3_f64.cos(), 0.3_f64.sin());
        let w = CelestialWcs::new(
            ProjectionKind::Tan,
            [359.9, -20.0],
            [100.5, 80.0],
            [[-s * c, s * sn], [s * sn, s * c]],
        )
        .unwrap();
        assert!((w.pixel_scale_deg() - s).abs() < 1e-15);
        let (r, d) = w.pix_to_world(310.0, -40.0).unwrap();
        let (x, y) = w.world_to_pix(r, d).unwrap();
        assert!((x - 310.0).abs() < 1e-8 && (y + 40.0).abs() < 1e-8);
        // The reference pixel is the reference point, and its native direction is x.
        let (r0, d0) = w.pix_to_world(99.5, 79.0).unwrap();
        assert!((r0 - 359.9).abs() < 1e-9 && (d0 + 20.0).abs() < 1e-9);
        let n = w.pix_to_native(99.5, 79.0).unwrap();
        assert!((n[0] - 1.0).abs() < 1e-15);
    }

    #[test]
    fn singular_matrix_is_refused() {
        assert!(
            CelestialWcs::new(
                ProjectionKind::Sin,
                [0.0, 0.0],
                [1.0, 1.0],
                [[0.0, 0.0], [0.0, 1.0]]
            )
            .is_none()
        );
    }
}

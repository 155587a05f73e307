//! The primary-beam model used when no beam image is given: a circular Gaussian for a
//! 4.65 m DSA-110 dish, FWHM = 1.2 lambda / D, centred on the tile's pointing.

/// DSA-110 dish diameter in metres.
pub const DISH_DIAMETER_M: f64 = 4.65;
const SPEED_OF_LIGHT: f64 = 299_792_458.0;
const FOUR_LN2: f64 = 4.0 * std::f64::consts::LN_2;

/// FWHM of the primary beam in radians at `freq_hz`.
pub fn fwhm_rad(freq_hz: f64) -> f64 {
    1.2 * SPEED_OF_LIGHT / freq_hz / DISH_DIAMETER_M
}

/// Gaussian primary-beam response `dist_rad` from the pointing.
pub fn response(dist_rad: f64, fwhm_rad: f64) -> f64 {
    (-FOUR_LN2 * (dist_rad / fwhm_rad).powi(2)).exp()
}

/// Gaussian response between two unit vectors. Within 14 degrees the squared angle comes
/// from the squared chord by its series, d^2 = c^2 (1 + c^2/12 + c^4/90), good to 1e-7
/// there and free of the arcsine that dominated the per-pixel cost; beyond, exactly.
#[inline]
pub fn response_between(a: [f64; 3], b: [f64; 3], fwhm_rad: f64) -> f64 {
    let d = [a[0] - b[0], a[1] - b[1], a[2] - b[2]];
    let c2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2];
    let d2 = if c2 < 0.0625 {
        c2 * (1.0 + c2 / 12.0 + c2 * c2 / 90.0)
    } else {
        angle_between(a, b).powi(2)
    };
    (-FOUR_LN2 * d2 / (fwhm_rad * fwhm_rad)).exp()
}

/// Angular distance between two unit vectors, accurate also for tiny angles.
pub fn angle_between(a: [f64; 3], b: [f64; 3]) -> f64 {
    let d = [a[0] - b[0], a[1] - b[1], a[2] - b[2]];
    let chord = (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).sqrt();
    2.0 * (0.5 * chord).min(1.0).asin()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dsa110_beam_at_1405_mhz() {
        let fwhm_deg = fwhm_rad(1.405e9).to_degrees();
        assert!((fwhm_deg - 3.155).abs() < 0.01, "{fwhm_deg}");
        let half = response(0.5 * fwhm_rad(1.405e9), fwhm_rad(1.405e9));
        assert!((half - 0.5).abs() < 1e-12);
    }

    #[test]
    fn chord_series_matches_the_exact_response() {
        let f = fwhm_rad(1.405e9);
        let a = [1.0, 0.0, 0.0];
        for deg in [0.0_f64, 0.001, 0.5, 2.0, 5.0, 10.0, 14.0, 14.5, 30.0] {
            let t = deg.to_radians();
            let b = [t.cos(), t.sin(), 0.0];
            let exact = response(t, f);
            let fast = response_between(a, b, f);
            assert!(
                (fast - exact).abs() <= 1e-7 * exact.max(1e-3),
                "{deg}: {fast} {exact}"
            );
        }
    }

    #[test]
    fn small_angles_are_exact() {
        let t = 1e-7_f64;
        let a = [1.0, 0.0, 0.0];
        let b = [t.cos(), t.sin(), 0.0];
        assert!((angle_between(a, b) - t).abs() < 1e-15);
    }
}

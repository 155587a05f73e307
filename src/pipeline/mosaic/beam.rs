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
    fn small_angles_are_exact() {
        let t = 1e-7_f64;
        let a = [1.0, 0.0, 0.0];
        let b = [t.cos(), t.sin(), 0.0];
        assert!((angle_between(a, b) - t).abs() < 1e-15);
    }
}

"""What the DSA-110 reference stages share: the site, the dish and its primary beam.

One place for each rule: the test-data generator, calibrate (the apparent sky model) and
image (the primary-beam correction) all take the beam from here.
"""

import numpy as np
from astropy.utils import iers

# Nothing is downloaded at run time: astropy uses the IERS tables it was installed with,
# whatever their age (by default it refuses, once they are 30 days old, to convert times
# without fetching new ones, so the stages would stop working on a date, offline).
iers.conf.auto_download = False
iers.conf.auto_max_age = None

# The Owens Valley Radio Observatory, DSA-110's site.
OVRO_LAT_DEG = 37.2339
OVRO_LON_DEG = -118.2825
OVRO_ALT_M = 1222.0

# DSA-110's dishes are 4.65 m across.
DISH_DIAMETER_M = 4.65
SPEED_OF_LIGHT = 299_792_458.0

# The band: 16 subbands across 1.28 to 1.53 GHz (sb00 the highest, as DSA-110 numbers them).
BAND_LO_HZ = 1.28e9
BAND_HI_HZ = 1.53e9
SUBBANDS = 16


def primary_beam(theta_rad, freq_hz, diameter_m=DISH_DIAMETER_M):
    """Power response of a uniformly illuminated dish (Airy pattern) at angle theta from
    its axis: (2 J1(x) / x)^2 with x = pi D sin(theta) / lambda. 1 on axis."""
    from scipy.special import j1

    theta = np.asarray(theta_rad, dtype=float)
    x = np.pi * diameter_m * np.sin(theta) * np.asarray(freq_hz, dtype=float) / SPEED_OF_LIGHT
    with np.errstate(invalid="ignore", divide="ignore"):
        amp = np.where(np.abs(x) < 1e-9, 1.0, 2.0 * j1(x) / np.where(x == 0, 1.0, x))
    return amp * amp


def separation_rad(ra1, dec1, ra2, dec2):
    """Angular distance between two directions (radians in, radians out)."""
    s = np.sin((dec2 - dec1) / 2) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2
    return 2 * np.arcsin(np.sqrt(np.clip(s, 0.0, 1.0)))


def read_sky_model(path):
    """A sky model file: CSV with a header `name,ra_deg,dec_deg,flux_jy` (true fluxes at
    the band centre, ICRS)."""
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"name", "ra_deg", "dec_deg", "flux_jy"}
    if not rows or not need <= set(rows[0]):
        raise SystemExit(f"{path}: a sky model needs the columns {sorted(need)}")
    return [
        (r["name"], float(r["ra_deg"]), float(r["dec_deg"]), float(r["flux_jy"]))
        for r in rows
    ]


def site():
    """OVRO as an astropy EarthLocation."""
    from astropy import units as u
    from astropy.coordinates import EarthLocation

    return EarthLocation.from_geodetic(
        lon=OVRO_LON_DEG * u.deg, lat=OVRO_LAT_DEG * u.deg, height=OVRO_ALT_M * u.m
    )


def meridian_icrs(times_jd, dec_deg, location=None):
    """Where a dish parked on the meridian at declination `dec_deg` points at each time
    (Julian dates, UTC), from `location` (an EarthLocation; OVRO by default): hour angle 0
    in the true-equator, true-equinox frame of the moment, as ICRS right ascension and
    declination in radians. DSA-110 drift-scans: the dishes stay put and the sky moves
    through the beam."""
    from astropy import units as u
    from astropy.coordinates import ICRS, TETE, SkyCoord
    from astropy.time import Time

    where = location if location is not None else site()
    t = Time(np.atleast_1d(np.asarray(times_jd, dtype=float)), format="jd", scale="utc", location=where)
    lst = t.sidereal_time("apparent")
    c = SkyCoord(ra=lst, dec=np.full(len(t), dec_deg) * u.deg, frame=TETE(obstime=t))
    icrs = c.transform_to(ICRS())
    return icrs.ra.rad, icrs.dec.rad


def mean_beam(ra_rad, dec_rad, pointing_ra, pointing_dec, freq_hz):
    """The primary beam at a direction (or array of directions) averaged over the
    pointings of an observation's integrations and over the frequencies given (one, or
    the channels of a multi-frequency image): what a point source there contributes to
    visibilities averaged over the observation and the band. Far from the axis the beam
    is convex in angle and frequency, so its mean exceeds its value at the middle time and
    frequency; dividing by the latter would brighten sources towards the edge."""
    ra = np.asarray(ra_rad, dtype=float)[..., None]
    dec = np.asarray(dec_rad, dtype=float)[..., None]
    sep = separation_rad(ra, dec, np.asarray(pointing_ra)[None, :], np.asarray(pointing_dec)[None, :])
    freqs = np.atleast_1d(np.asarray(freq_hz, dtype=float))
    total = np.zeros(sep.shape[:-1])
    for f in freqs:
        total += primary_beam(sep, f).mean(axis=-1)
    return total / len(freqs)


def pointing_from_ms(ms):
    """What the stages after convert need of an MS: the unique integration times (Julian
    dates), the site (from the antennas' mean ITRF position), the declination the dishes
    point at (the phase centre's, in the meridian frame of the middle time) and the
    drift-scan pointings (ICRS radians) at each time."""
    from astropy import units as u
    from astropy.coordinates import ICRS, TETE, EarthLocation, SkyCoord
    from astropy.time import Time
    from casacore.tables import table

    with table(ms, ack=False) as t:
        times_jd = np.unique(t.getcol("TIME")) / 86400.0 + 2400000.5
    with table(ms + "/ANTENNA", ack=False) as t:
        xyz = t.getcol("POSITION").mean(axis=0)
    with table(ms + "/FIELD", ack=False) as t:
        ra0, dec0 = t.getcol("PHASE_DIR")[0, 0]
    location = EarthLocation.from_geocentric(*xyz, unit=u.m)
    mid = Time(float(np.mean(times_jd)), format="jd", scale="utc")
    dec = SkyCoord(ra=ra0 * u.rad, dec=dec0 * u.rad, frame=ICRS()).transform_to(TETE(obstime=mid)).dec.deg
    pra, pdec = meridian_icrs(times_jd, dec, location)
    return times_jd, location, dec, pra, pdec

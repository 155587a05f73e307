#!/usr/bin/env python3
"""Writes small but real DSA-110-like UVH5 subband files with pyuvdata, for the tests.

A T-shaped array of 4.65 m dishes at OVRO (an east-west arm and a north-south arm),
16 subbands across 1.28-1.53 GHz with a few channels each, a few integrations per
5-minute observation, drift-scan (unprojected) visibilities of a known point-source sky
seen through the primary beam, with per-antenna complex gain errors for calibration to
remove and a little thermal noise.

    make_test_data.py OUT_DIR --start 2026-11-30T10:00:00 --observations 3

writes OUT_DIR/<start>_sbNN.hdf5 for each observation (5 minutes apart), the true sky
OUT_DIR/skymodel.csv and what was injected OUT_DIR/truth.json. The seed is printed and
recorded so that a run can be replayed.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dsa110  # noqa: E402


def layout(n_ew, n_ns, ew_step, ns_step):
    """East, north, up offsets (m) of a T: an east-west arm through the origin and a
    north-south arm running south from its middle."""
    ew = [((i - (n_ew - 1) / 2) * ew_step, 0.0, 0.0) for i in range(n_ew)]
    ns = [(0.0, -(j + 1) * ns_step, 0.0) for j in range(n_ns)]
    return np.array(ew + ns)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--start", default="2026-11-30T10:00:00", help="first observation (UTC)")
    p.add_argument("--observations", type=int, default=3)
    p.add_argument("--dec", type=float, default=55.0, help="pointing declination, degrees")
    p.add_argument("--channels", type=int, default=4, help="channels per subband")
    p.add_argument("--integrations", type=int, default=6, help="integrations per observation")
    p.add_argument("--ew", type=int, default=24, help="antennas on the east-west arm")
    p.add_argument("--ns", type=int, default=12, help="antennas on the north-south arm")
    p.add_argument("--noise-jy", type=float, default=0.3, help="noise per visibility, Jy")
    p.add_argument("--gain-amp", type=float, default=0.2, help="gain amplitude error (fraction)")
    p.add_argument("--gain-phase-deg", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=None)
    a = p.parse_args()

    from astropy import units as u
    from astropy.coordinates import EarthLocation
    from astropy.time import Time, TimeDelta
    from pyuvdata import Telescope, UVData
    from pyuvdata import utils as uvutils

    seed = a.seed if a.seed is not None else int.from_bytes(os.urandom(4), "little")
    print(f"make_test_data: seed {seed}", flush=True)
    rng = np.random.default_rng(seed)
    os.makedirs(a.out, exist_ok=True)

    site = EarthLocation.from_geodetic(
        lon=dsa110.OVRO_LON_DEG * u.deg, lat=dsa110.OVRO_LAT_DEG * u.deg, height=dsa110.OVRO_ALT_M * u.m
    )
    enu = layout(a.ew, a.ns, 11.5, 20.0)
    lat, lon, alt = site.geodetic.lat.rad, site.geodetic.lon.rad, site.geodetic.height.to_value(u.m)
    ecef = uvutils.ECEF_from_ENU(enu, latitude=lat, longitude=lon, altitude=alt)
    site_xyz = np.array([site.x.to_value(u.m), site.y.to_value(u.m), site.z.to_value(u.m)])
    nant = len(enu)
    telescope = Telescope.new(
        name="DSA-110",
        location=site,
        antenna_positions=ecef - site_xyz,
        antenna_names=[f"pad{i + 1}" for i in range(nant)],
        antenna_numbers=list(range(nant)),
        antenna_diameters=[dsa110.DISH_DIAMETER_M] * nant,
        instrument="DSA",
        feeds=["x", "y"],
        mount_type="alt-az",
        update_from_known=False,
    )

    nsub, nch = dsa110.SUBBANDS, a.channels
    width = (dsa110.BAND_HI_HZ - dsa110.BAND_LO_HZ) / (nsub * nch)
    # Ascending frequencies; subband k holds the k-th block from the top (sb00 highest).
    freqs = dsa110.BAND_LO_HZ + (np.arange(nsub * nch) + 0.5) * width
    fcentre = freqs.mean()
    pairs = [(i, j) for i in range(nant) for j in range(i + 1, nant)]
    # Per-antenna, per-feed complex gains: what calibration has to remove.
    gains = (1 + a.gain_amp * rng.uniform(-1, 1, (nant, 2))) * np.exp(
        1j * np.deg2rad(a.gain_phase_deg) * rng.uniform(-1, 1, (nant, 2))
    )

    start = Time(a.start, scale="utc", location=site)
    obs_s = 300.0
    tint = obs_s / a.integrations
    # The sky: sources along the strip the observations drift across, all near the
    # pointing declination, one bright enough to calibrate every observation on.
    dec0 = a.dec
    mids = [(start + TimeDelta((o + 0.5) * obs_s, format="sec")).jd for o in (0, a.observations - 1)]
    ra_mid, dec_mid = dsa110.meridian_icrs(mids, dec0)
    lst_first, lst_last = np.rad2deg(ra_mid[0]), np.rad2deg(ra_mid[1])
    if lst_last < lst_first:
        lst_last += 360.0
    sources = []
    nsrc = 2 + 2 * a.observations
    ras = np.linspace(lst_first - 0.6, lst_last + 0.6, nsrc)
    for k, ra in enumerate(ras):
        dec = np.rad2deg(dec_mid[0]) + rng.uniform(-0.4, 0.4)
        flux = 8.0 if k % 2 == 0 else rng.uniform(1.5, 4.0)
        sources.append((f"src{k}", float(ra % 360.0), float(dec), float(flux)))
    with open(os.path.join(a.out, "skymodel.csv"), "w") as f:
        f.write("name,ra_deg,dec_deg,flux_jy\n")
        for s in sources:
            f.write(f"{s[0]},{s[1]:.6f},{s[2]:.6f},{s[3]:.4f}\n")

    written = []
    for o in range(a.observations):
        t0 = start + TimeDelta(o * obs_s, format="sec")
        times = (t0 + TimeDelta((np.arange(a.integrations) + 0.5) * tint, format="sec")).jd
        uvd = UVData.new(
            freq_array=freqs,
            polarization_array=["xx", "yy"],
            times=times,
            telescope=telescope,
            antpairs=pairs,
            do_blt_outer=True,
            integration_time=tint,
            channel_width=width,
            vis_units="uncalib",
            empty=True,
            update_telescope_from_known=False,
        )
        uvd.history = f"contimg make_test_data.py, seed {seed}"
        # The pointing: the meridian at the declination, moving across the sky with the
        # drift, one direction per integration.
        utimes, which = np.unique(uvd.time_array, return_inverse=True)
        pra, pdec = dsa110.meridian_icrs(utimes, dec0)
        pra, pdec = pra[which], pdec[which]
        model = np.zeros(uvd.data_array.shape, dtype=np.complex128)
        for name, ra, dec, flux in sources:
            sep = dsa110.separation_rad(pra, pdec, np.deg2rad(ra), np.deg2rad(dec))
            beam = dsa110.primary_beam(sep[:, None], freqs[None, :])
            if beam.max() < 1e-3:
                continue
            one = uvd.copy()
            one.phase(ra=np.deg2rad(ra), dec=np.deg2rad(dec), cat_name=name, epoch="J2000")
            one.data_array = np.repeat((flux * beam)[:, :, None], 2, axis=2).astype(np.complex64)
            one.unproject_phase()
            model += one.data_array
        g1 = gains[uvd.ant_1_array]  # (Nblts, 2)
        g2 = gains[uvd.ant_2_array]
        gij = (g1 * np.conj(g2))[:, None, :]
        noise = a.noise_jy * (rng.standard_normal(model.shape) + 1j * rng.standard_normal(model.shape)) / np.sqrt(2)
        uvd.data_array = (model * gij + noise).astype(np.complex64)
        uvd.flag_array[:] = False
        uvd.nsample_array[:] = 1.0
        uvd.extra_keywords = {"phase_center_dec": float(np.deg2rad(dec0))}
        name_time = t0.isot[:19]
        for sb in range(nsub):
            # sb00 is the highest block of channels.
            block = nsub - 1 - sb
            part = uvd.select(freq_chans=np.arange(block * nch, (block + 1) * nch), inplace=False)
            path = os.path.join(a.out, f"{name_time}_sb{sb:02d}.hdf5")
            part.write_uvh5(path, clobber=True)
            written.append(path)
    truth = {
        "seed": seed,
        "dec_deg": dec0,
        "sources": [dict(zip(("name", "ra_deg", "dec_deg", "flux_jy"), s)) for s in sources],
        "frequency_centre_hz": fcentre,
        "observations": a.observations,
        "files": len(written),
    }
    with open(os.path.join(a.out, "truth.json"), "w") as f:
        json.dump(truth, f, indent=1)
    print(f"make_test_data: {len(written)} files in {a.out}", flush=True)


if __name__ == "__main__":
    main()

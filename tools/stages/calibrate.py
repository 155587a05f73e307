#!/usr/bin/env python3
"""DSA-110 reference stage `calibrate`: solve antenna gains against a sky model with CASA
and apply them.

    calibrate.py --ms GROUP.ms --out CAL_DIR --sky-model SKY.csv [--refant pad1]

The sky model (CSV: name, ra_deg, dec_deg, flux_jy; true fluxes, ICRS) is seen through the
primary beam of DSA-110's 4.65 m dishes as the drift scan moves it (dsa110.mean_beam) and
written as a CASA component list; `ft` predicts it into MODEL_DATA, `gaincal` solves one
complex gain per antenna and polarisation over the observation (CAL_DIR/<ms name>.G, a
real CASA calibration table), and `applycal` writes CORRECTED_DATA. CASA runs offline: its
site configuration (casasiteconfig.py beside this script, unless CASASITECONFIG names
another) switches automatic data updates off and takes the measures from `casadata`.
"""

import argparse
import os
import shutil
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dsa110  # noqa: E402


def version():
    """`--version`: CASA starts offline with this site configuration, and its versions."""
    os.environ.setdefault("CASASITECONFIG", os.path.join(HERE, "casasiteconfig.py"))
    os.environ["CONTIMG_CASA_NOLOG"] = "1"
    import casacore
    import casatasks
    import casatools

    print(
        f"calibrate.py: casatools {casatools.version_string()}, casatasks {casatasks.version_string()}, "
        f"python-casacore {casacore.__version__}"
    )


def main():
    if "--version" in sys.argv[1:]:
        return version()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ms", required=True)
    p.add_argument("--out", required=True, help="folder for the calibration tables")
    p.add_argument("--sky-model", required=True, help="CSV: name,ra_deg,dec_deg,flux_jy")
    p.add_argument("--refant", default=None, help="reference antenna (default: the first with data)")
    p.add_argument("--uvrange", default="", help="CASA uvrange of the baselines to solve on, e.g. '>100m' (default: all)")
    p.add_argument("--min-beam", type=float, default=0.05, help="sources fainter in the beam than this fraction are left out")
    a = p.parse_args()

    os.environ.setdefault("CASASITECONFIG", os.path.join(HERE, "casasiteconfig.py"))
    sources = dsa110.read_sky_model(a.sky_model)

    from casacore.tables import table

    ms = os.path.abspath(a.ms.rstrip("/"))
    times_jd, _, _, pra, pdec = dsa110.pointing_from_ms(ms)
    with table(os.path.join(ms, "SPECTRAL_WINDOW"), ack=False) as t:
        chans = np.sort(t.getcol("CHAN_FREQ").ravel())
    freq = float(np.mean(chans))
    # The beam each source is seen through, averaged over the band as over the drift.
    band = chans[np.unique(np.linspace(0, len(chans) - 1, min(len(chans), 32)).round().astype(int))]
    with table(os.path.join(ms, "ANTENNA"), ack=False) as t:
        names = list(t.getcol("NAME"))
    with table(ms, ack=False) as t:
        present = np.union1d(np.unique(t.getcol("ANTENNA1")), np.unique(t.getcol("ANTENNA2")))

    import casatools
    from casatasks import applycal, ft, gaincal

    work = os.path.abspath(a.out)
    os.makedirs(work, exist_ok=True)
    cl_path = os.path.join(work, "skymodel.cl")
    shutil.rmtree(cl_path, ignore_errors=True)
    cl = casatools.componentlist()
    used = 0
    for name, ra, dec, flux in sources:
        beam = float(np.squeeze(dsa110.mean_beam(np.deg2rad(ra), np.deg2rad(dec), pra, pdec, band)))
        if beam < a.min_beam:
            continue
        cl.addcomponent(
            flux=flux * beam,
            fluxunit="Jy",
            shape="point",
            dir=f"J2000 {ra}deg {dec}deg",
            freq=f"{freq}Hz",
            spectrumtype="constant",
            label=name,
        )
        used += 1
    if used == 0:
        sys.exit(f"calibrate: no source of {a.sky_model} is in the beam of {ms}")
    cl.rename(cl_path)
    cl.close()

    group = os.path.basename(ms)[: -len(".ms")] if ms.endswith(".ms") else os.path.basename(ms)
    gtable = os.path.join(work, f"{group}.G")
    partial = gtable + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    ft(vis=ms, complist=cl_path, usescratch=True)
    # The reference antenna: the one asked for, else the first that has data.
    refant = a.refant or names[int(present[0])]
    gaincal(
        vis=ms, caltable=partial, solint="inf", refant=refant, calmode="ap", gaintype="G",
        minsnr=3.0, uvrange=a.uvrange,
    )
    if not os.path.isdir(partial):
        sys.exit("calibrate: gaincal wrote no table")
    shutil.rmtree(gtable, ignore_errors=True)
    os.rename(partial, gtable)
    applycal(vis=ms, gaintable=[gtable], calwt=False, flagbackup=False)
    shutil.rmtree(cl_path, ignore_errors=True)
    with table(gtable, ack=False) as t:
        gains = t.getcol("CPARAM")
        flags = t.getcol("FLAG")
    good = gains[~flags]
    print(
        f"calibrate: {used} sources in the model, refant {refant}; {good.size} gain solutions, "
        f"|g| {np.abs(good).min():.3f}-{np.abs(good).max():.3f}; wrote {gtable}",
        flush=True,
    )


if __name__ == "__main__":
    main()

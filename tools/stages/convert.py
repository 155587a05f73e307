#!/usr/bin/env python3
"""DSA-110 reference stage `convert`: UVH5 subbands to one Measurement Set.

    convert.py --out GROUP.ms SUBBAND.hdf5...

pyuvdata reads the subband files of one observation, combines them in frequency (in
ascending order), phases the drift-scan visibilities to the observation's meridian
pointing at its middle (hour angle 0 at the pointing declination the files record, as
ICRS), and writes a Measurement Set through python-casacore. The MS is written beside
its final path and renamed into place, so a crash never leaves a half-written one there.
"""

import argparse
import os
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dsa110  # noqa: E402


def version():
    """`--version`: the libraries this stage needs import, and their versions."""
    import casacore
    import pyuvdata

    print(f"convert.py: pyuvdata {pyuvdata.__version__}, python-casacore {casacore.__version__}")


def main():
    if "--version" in sys.argv[1:]:
        return version()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the Measurement Set to write")
    p.add_argument("files", nargs="+", help="the observation's UVH5 subband files")
    p.add_argument("--dec", type=float, default=None, help="pointing declination (degrees) when the files lack one")
    a = p.parse_args()

    from pyuvdata import UVData

    parts = []
    for f in sorted(a.files):
        u = UVData.from_file(f, file_type="uvh5")
        parts.append(u)
    uvd = parts[0]
    if len(parts) > 1:
        uvd.fast_concat(parts[1:], axis="freq", inplace=True)
    uvd.reorder_freqs(channel_order="freq")
    # The pointing declination, by the rule ingest reads it (src/pipeline/uvh5.rs): a
    # sidereal phase centre's, else extra_keywords/phase_center_dec (DSA-110's files).
    dec = a.dec
    sidereal = [c for c in uvd.phase_center_catalog.values() if c.get("cat_type") == "sidereal"]
    kw = uvd.extra_keywords or {}
    if sidereal:
        dec = float(np.rad2deg(sidereal[0]["cat_lat"]))
    elif "phase_center_dec" in kw:
        dec = float(np.rad2deg(kw["phase_center_dec"]))
    if dec is None:
        sys.exit("convert: the files record no pointing declination (phase_center_dec); give --dec")
    mid = float(np.mean(np.unique(uvd.time_array)))
    ra, dec_icrs = dsa110.meridian_icrs([mid], dec, uvd.telescope.location)
    uvd.phase(ra=float(ra[0]), dec=float(dec_icrs[0]), epoch="J2000", cat_name="meridian")
    uvd.vis_units = "uncalib"
    out = os.path.abspath(a.out.rstrip("/"))
    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    uvd.write_ms(tmp, clobber=True)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    print(
        f"convert: {len(a.files)} subbands, {uvd.Nfreqs} channels {uvd.freq_array.min() / 1e6:.1f}-"
        f"{uvd.freq_array.max() / 1e6:.1f} MHz, {uvd.Ntimes} integrations, {uvd.Nbls} baselines; "
        f"phased to RA {np.rad2deg(ra[0]):.4f} Dec {np.rad2deg(dec_icrs[0]):.4f} (ICRS); wrote {out}",
        flush=True,
    )


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""DSA-110 reference stage `image`: WSClean images Stokes I with CLEAN, and the primary
beam of the 4.65 m dishes corrects it.

    image.py --ms GROUP.ms --tile GROUP.pbcor.fits --beam GROUP.pb.fits [--size N] [--scale-arcsec S]

WSClean (3.1) images the MS's CORRECTED_DATA (DATA when there is none) into
`<work>/<group>-image.fits`, with pixels of a sixth of lambda/B (3 to 5 across the
synthesized beam) and the field out to where the primary beam falls below `--pb-cutoff`
(unless `--scale-arcsec` and `--size` say otherwise). The beam image is the dish's Airy pattern averaged over the
observation's drift and its band (dsa110.mean_beam) on the image's own pixel grid;
the corrected tile is the image divided by it, blank (NaN) where the beam is below
`--pb-cutoff`. Both are written beside their final paths and renamed into place.
"""

import argparse
import os
import shutil
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dsa110  # noqa: E402


def version(wsclean):
    """`--version`: WSClean starts, the libraries import, and their versions."""
    import astropy
    import casacore

    out = subprocess.run([wsclean, "--version"], check=True, capture_output=True, text=True).stdout
    line = next((l.strip() for l in out.splitlines() if l.strip()), "wsclean (no version printed)")
    print(f"image.py: {line}; astropy {astropy.__version__}, python-casacore {casacore.__version__}")


def main():
    if "--version" in sys.argv[1:]:
        i = sys.argv.index("--wsclean") if "--wsclean" in sys.argv else -1
        return version(sys.argv[i + 1] if 0 <= i < len(sys.argv) - 1 else "wsclean")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ms", required=True)
    p.add_argument("--tile", required=True, help="the primary-beam corrected image to write")
    p.add_argument("--beam", required=True, help="the beam image to write")
    p.add_argument("--size", type=int, default=None, help="pixels per side (default: out to the beam cutoff)")
    p.add_argument("--scale-arcsec", type=float, default=None, help="pixel size (default: a quarter of the resolution)")
    p.add_argument("--niter", type=int, default=5000)
    p.add_argument("--pb-cutoff", type=float, default=0.1)
    p.add_argument("--wsclean", default="wsclean")
    a = p.parse_args()

    from astropy.io import fits
    from astropy.wcs import WCS
    from casacore.tables import table

    ms = os.path.abspath(a.ms.rstrip("/"))
    tile = os.path.abspath(a.tile)
    name = tile[: -len(".pbcor.fits")] if tile.endswith(".pbcor.fits") else os.path.splitext(tile)[0]
    times_jd, location, pointing_dec, pra, pdec = dsa110.pointing_from_ms(ms)
    with table(ms, ack=False) as t:
        column = "CORRECTED_DATA" if "CORRECTED_DATA" in t.colnames() else "DATA"
        longest = float(np.max(np.hypot(*t.getcol("UVW")[:, :2].T)))
    with table(os.path.join(ms, "SPECTRAL_WINDOW"), ack=False) as t:
        freqs = t.getcol("CHAN_FREQ").ravel()
    # The geometry from the data, unless given: pixels of a sixth of lambda / B at the
    # highest frequency (3 to 5 across the synthesized beam, whose FWHM is 0.5 to 0.9 of
    # it), and the field out to where the primary beam falls below the cutoff at the
    # lowest frequency (where it is widest).
    scale = a.scale_arcsec
    if scale is None:
        resolution = dsa110.SPEED_OF_LIGHT / freqs.max() / max(longest, 1.0)
        scale = max(round(float(np.rad2deg(resolution)) * 3600.0 / 6.0, 1), 0.1)
    size = a.size
    if size is None:
        theta = np.linspace(0.0, np.deg2rad(10.0), 20001)
        below = np.nonzero(dsa110.primary_beam(theta, freqs.min()) < a.pb_cutoff)[0]
        radius = np.rad2deg(theta[below[0]] if len(below) else theta[-1])
        # Across the image: twice that radius (with 5% to spare), an even number of pixels.
        size = 2 * int(np.ceil(radius * 3600.0 / scale * 1.05))
    cmd = [
        a.wsclean, "-quiet", "-name", name, "-size", str(size), str(size),
        "-scale", f"{scale}asec", "-pol", "I", "-weight", "briggs", "0",
        "-niter", str(a.niter), "-mgain", "0.8", "-auto-threshold", "1", "-auto-mask", "3",
        "-data-column", column, "-no-update-model-required", ms,
    ]
    print("image: " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=sys.stdout, stderr=sys.stderr)
    image = f"{name}-image.fits"

    with fits.open(image) as hdul:
        hdr = hdul[0].header.copy()
        data = hdul[0].data.astype(np.float32)
    w = WCS(hdr).celestial
    ny, nx = data.shape[-2:]
    yy, xx = np.mgrid[0:ny, 0:nx]
    sky = w.pixel_to_world(xx, yy)
    # The image sums every channel: its beam is the mean over the band (at most 32
    # frequencies spread across it), not the beam at the middle frequency.
    band = np.sort(freqs)[np.unique(np.linspace(0, len(freqs) - 1, min(len(freqs), 32)).round().astype(int))]
    beam = np.asarray(dsa110.mean_beam(sky.ra.rad, sky.dec.rad, pra, pdec, band), dtype=np.float32)
    beam = beam.reshape(data.shape)
    corrected = np.where(beam >= a.pb_cutoff, data / np.maximum(beam, 1e-6), np.nan).astype(np.float32)

    # Where the dishes pointed at the middle of the observation, in the image's frame.
    ora, odec = dsa110.meridian_icrs([float(np.mean(times_jd))], pointing_dec, location)
    hdr["OBSRA"] = float(np.rad2deg(ora[0]))
    hdr["OBSDEC"] = float(np.rad2deg(odec[0]))
    hdr["TELESCOP"] = "DSA-110"
    for path, values, what in ((a.beam, beam, "primary beam (4.65 m dish, drift-averaged)"), (tile, corrected, "primary-beam corrected")):
        h = hdr.copy()
        h["HISTORY"] = f"contimg image.py: {what}"
        if path == a.beam:
            h["BUNIT"] = ""
        partial = os.path.abspath(path) + ".partial"
        fits.PrimaryHDU(values, header=h).writeto(partial, overwrite=True)
        os.replace(partial, os.path.abspath(path))
    finite = corrected[np.isfinite(corrected)]
    print(
        f"image: {nx}x{ny} px of {scale} arcsec from {column}; peak {np.nanmax(data):.3f} Jy/beam, "
        f"corrected peak {finite.max():.3f}; wrote {tile} and {a.beam}",
        flush=True,
    )


if __name__ == "__main__":
    main()

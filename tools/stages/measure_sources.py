#!/usr/bin/env python3
"""Measures catalogued point sources in a FITS image: for each source of a sky model (CSV
name,ra_deg,dec_deg,flux_jy) inside the image, an elliptical Gaussian plus a constant
background is fitted (scipy's least squares) to the pixels within two restoring-beam major
axes of its catalogued position (within one, the background and the width trade off against
each other and CLEAN's small negative components around a source, and the fit reads a
few per cent high). Prints one JSON object per source:

    {"name", "flux_jy" (the catalogue's), "fit_jy" (the Gaussian's integral over the
     restoring beam's area: a point source's flux), "peak_jy", "offset_px" (fitted centre
     to catalogued position), "noise" (from --noise, the noise image, when given)}

    measure_sources.py IMAGE.fits SKY.csv [--noise NOISE.fits]

The positions go through astropy's WCS, independently of the code that wrote the image.
"""

import argparse
import csv
import json

import numpy as np


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("image")
    p.add_argument("sky")
    p.add_argument("--noise", default=None)
    a = p.parse_args()

    from astropy.io import fits
    from astropy.wcs import WCS
    from scipy.optimize import curve_fit

    with fits.open(a.image) as h:
        hdr = h[0].header
        data = np.squeeze(h[0].data).astype(float)
    noise = np.squeeze(fits.getdata(a.noise)).astype(float) if a.noise else None
    w = WCS(hdr).celestial
    scale = abs(w.proj_plane_pixel_scales()[0].value)
    bmaj, bmin = hdr["BMAJ"] / scale, hdr["BMIN"] / scale
    s_maj, s_min = bmaj / 2.3548, bmin / 2.3548
    ny, nx = data.shape

    def gauss(xy, amp, x0, y0, sx, sy, th, bg):
        x, y = xy
        ct, st = np.cos(th), np.sin(th)
        u = ct * (x - x0) + st * (y - y0)
        v = -st * (x - x0) + ct * (y - y0)
        return amp * np.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2)) + bg

    with open(a.sky, newline="") as f:
        rows = list(csv.DictReader(f))
    r = int(np.ceil(2 * bmaj))
    for row in rows:
        x, y = (float(v) for v in w.world_to_pixel_values(float(row["ra_deg"]), float(row["dec_deg"])))
        xi, yi = int(round(x)), int(round(y))
        if not (r <= xi < nx - r and r <= yi < ny - r):
            continue
        yy, xx = np.mgrid[yi - r : yi + r + 1, xi - r : xi + r + 1]
        z = data[yi - r : yi + r + 1, xi - r : xi + r + 1]
        near = np.hypot(xx - x, yy - y) <= 2 * bmaj
        if not np.all(np.isfinite(z[near])):
            continue
        pts = (xx[near].astype(float), yy[near].astype(float))
        try:
            fit, _ = curve_fit(
                gauss, pts, z[near], p0=[z[near].max(), x, y, s_maj, s_min, 0.0, 0.0], maxfev=10000
            )
        except RuntimeError:
            continue
        amp, x0, y0, sx, sy = fit[:5]
        out = {
            "name": row["name"],
            "flux_jy": float(row["flux_jy"]),
            "fit_jy": float(amp * abs(sx * sy) / (s_maj * s_min)),
            "peak_jy": float(np.nanmax(z[near])),
            "offset_px": float(np.hypot(x0 - x, y0 - y)),
            "noise": float(noise[yi, xi]) if noise is not None else None,
        }
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

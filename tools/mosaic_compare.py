#!/usr/bin/env python3
"""Builds the same mosaic as `contimg mosaic` with astropy's reproject, and compares both
mosaics with the true sources and with each other.

  mosaic_compare.py coadd --template CONTIMG.fits --out REPROJECT.fits --tiles T... --beams B...
  mosaic_compare.py compare --truth sources.csv --mosaic NAME=FILE [--mosaic NAME=FILE ...]

`coadd` uses the same weights as contimg: B^2/sigma^2 with B the beam image and sigma
1.4826 x MAD of tile x B, reproject_interp with order='bilinear', reproject_and_coadd with
combine_function='mean', on contimg's output grid (so that the maps compare pixel by pixel).
"""
import argparse
import json
import sys

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS


def robust_sigma(x):
    x = x[np.isfinite(x)]
    med = np.median(x)
    return 1.4826 * np.median(np.abs(x - med))


def coadd(args):
    from reproject import reproject_interp
    from reproject.mosaicking import reproject_and_coadd

    hdr = fits.getheader(args.template)
    wcs_out = WCS(hdr).celestial
    shape_out = (hdr["NAXIS2"], hdr["NAXIS1"])
    inputs, weights = [], []
    for t, b in zip(args.tiles, args.beams):
        with fits.open(t) as h:
            data = np.asarray(h[0].data, dtype=np.float32).squeeze()
            w = WCS(h[0].header).celestial
        beam = np.asarray(fits.getdata(b), dtype=np.float32).squeeze()
        sigma = robust_sigma((data * beam).ravel())
        inputs.append((data, w))
        weights.append((beam * beam / np.float32(sigma * sigma)).astype(np.float32))
        print(f"{t}: sigma {sigma:.4e}", file=sys.stderr)
    mosaic, footprint = reproject_and_coadd(
        inputs,
        wcs_out,
        shape_out=shape_out,
        input_weights=weights,
        reproject_function=reproject_interp,
        order="bilinear",
        combine_function="mean",
        match_background=False,
        blank_pixel_value=np.nan,
    )
    out = fits.PrimaryHDU(mosaic.astype(np.float32), header=wcs_out.to_header())
    out.header["BUNIT"] = hdr.get("BUNIT", "JY/BEAM")
    for k in ("BMAJ", "BMIN", "BPA", "DATE-OBS", "RESTFRQ"):
        if k in hdr:
            out.header[k] = hdr[k]
    out.writeto(args.out, overwrite=True)


def measure(path, truth, radius_beams=2.5):
    """Aperture flux (sum / beam area, local background from an annulus) and centroid
    offset of each true source."""
    with fits.open(path) as h:
        data = np.asarray(h[0].data, dtype=np.float64).squeeze()
        hdr = h[0].header
    w = WCS(hdr).celestial
    scale = abs(hdr.get("CDELT1", 0.0)) or np.sqrt(abs(np.linalg.det(w.pixel_scale_matrix)))
    bmaj, bmin = hdr["BMAJ"] / scale, hdr["BMIN"] / scale
    area = np.pi * bmaj * bmin / (4 * np.log(2))
    r = radius_beams * bmaj
    ny, nx = data.shape
    px, py = w.world_to_pixel_values(truth[:, 0], truth[:, 1])
    rows = []
    R = int(np.ceil(r * 1.8)) + 1
    for (x, y, s) in zip(px, py, truth):
        ix, iy = int(round(x)), int(round(y))
        if ix - R < 0 or iy - R < 0 or ix + R >= nx or iy + R >= ny:
            continue
        cut = data[iy - R: iy + R + 1, ix - R: ix + R + 1]
        yy, xx = np.mgrid[iy - R: iy + R + 1, ix - R: ix + R + 1]
        d = np.hypot(xx - x, yy - y)
        ap = d <= r
        ann = (d > 1.3 * r) & (d <= 1.8 * r)
        if not np.all(np.isfinite(cut[ap])):
            continue
        bkg = np.nanmedian(cut[ann])
        c = cut[ap] - bkg
        flux = c.sum() / area
        pos = cut - bkg
        core = d <= bmaj
        wsum = pos[core].sum()
        if not wsum > 0:
            continue
        cx = (pos[core] * xx[core]).sum() / wsum
        cy = (pos[core] * yy[core]).sum() / wsum
        rows.append((s[2], flux, cx - x, cy - y))
    return np.array(rows)


def compare(args):
    truth = np.loadtxt(args.truth, delimiter=",", skiprows=1, ndmin=2)
    truth_all = truth
    truth = truth[truth[:, 2] >= args.min_flux]
    report = {}
    maps = {}
    for spec in args.mosaic:
        name, path = spec.split("=", 1)
        m = measure(path, truth)
        ratio = m[:, 1] / m[:, 0]
        off = np.hypot(m[:, 2], m[:, 3])
        report[name] = {
            "sources": int(len(m)),
            "flux_ratio_median": float(np.median(ratio)),
            "flux_abs_dev_median_pct": float(100 * np.median(np.abs(ratio - 1))),
            "flux_ratio_robust_scatter": float(robust_sigma(ratio)),
            "position_offset_median_px": float(np.median(off)),
            "position_offset_p95_px": float(np.percentile(off, 95)),
        }
        maps[name] = np.asarray(fits.getdata(path), dtype=np.float32).squeeze()
    names = list(maps)
    if len(names) == 2:
        a, b = maps[names[0]], maps[names[1]]
        both = np.isfinite(a) & np.isfinite(b)
        diff = (a - b)[both]
        report["map_difference"] = {
            "pixels_compared": int(both.sum()),
            "only_in_" + names[0]: int((np.isfinite(a) & ~np.isfinite(b)).sum()),
            "only_in_" + names[1]: int((~np.isfinite(a) & np.isfinite(b)).sum()),
            "rms_difference": float(np.sqrt(np.mean(diff.astype(np.float64) ** 2))),
            "rms_of_" + names[1]: float(robust_sigma(b[both])),
            "max_abs_difference": float(np.max(np.abs(diff))),
        }
    if args.noise_map:
        report["noise_map"] = noise_check(args.noise_map, maps[names[0]], truth_all)
    print(json.dumps(report, indent=2))


def noise_check(noise_path, mosaic, truth):
    """Robust std of mosaic / noise map over pixels at least 5 BMAJ from every source."""
    with fits.open(noise_path) as h:
        noise = np.asarray(h[0].data, dtype=np.float32).squeeze()
        hdr = h[0].header
    w = WCS(hdr).celestial
    bmaj = hdr["BMAJ"] / abs(hdr["CDELT1"])
    ok = np.isfinite(mosaic) & np.isfinite(noise)
    px, py = w.world_to_pixel_values(truth[:, 0], truth[:, 1])
    r = int(np.ceil(5 * bmaj))
    yy, xx = np.mgrid[-r: r + 1, -r: r + 1]
    disc = xx * xx + yy * yy <= r * r
    ny, nx = ok.shape
    for x, y in zip(px, py):
        ix, iy = int(round(x)), int(round(y))
        x0, x1, y0, y1 = ix - r, ix + r + 1, iy - r, iy + r + 1
        if x1 <= 0 or y1 <= 0 or x0 >= nx or y0 >= ny:
            continue
        sub = disc[max(0, -y0): disc.shape[0] - max(0, y1 - ny), max(0, -x0): disc.shape[1] - max(0, x1 - nx)]
        ok[max(0, y0): min(ny, y1), max(0, x0): min(nx, x1)] &= ~sub
    z = (mosaic[ok] / noise[ok]).astype(np.float64)
    return {"source_free_pixels": int(ok.sum()), "robust_std_mosaic_over_noise_map": float(robust_sigma(z))}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("coadd")
    c.add_argument("--template", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--tiles", nargs="+", required=True)
    c.add_argument("--beams", nargs="+", required=True)
    k = sub.add_parser("compare")
    k.add_argument("--truth", required=True)
    k.add_argument("--mosaic", action="append", required=True)
    k.add_argument("--min-flux", type=float, default=0.1)
    k.add_argument("--noise-map", help="check this noise map against the first mosaic")
    a = p.parse_args()
    coadd(a) if a.cmd == "coadd" else compare(a)


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Builds the same mosaic with contimg and with astropy's reproject, records wall time and
# peak memory of both (/usr/bin/time -v), and compares fluxes, positions and maps.
#
#   tools/mosaic_compare.sh [TILES [NPIX]]        # default 12 tiles of 4800 x 4800
#
# Environment: WORK (default /tmp/mosaic-bench; tiles and outputs, deleted at the end
# unless KEEP=1), VENV (default /tmp/mosaic-venv; created with astropy, reproject, numpy),
# CARGO_TARGET_DIR (default ./target), SKIP_REPROJECT=1 to time contimg only.
set -euo pipefail
cd "$(dirname "$0")/.."
TILES=${1:-12}
NPIX=${2:-4800}
WORK=${WORK:-/tmp/mosaic-bench}
VENV=${VENV:-/tmp/mosaic-venv}
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
LOCK=${CARGO_LOCK:-/tmp/contimg-cargo.lock}

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check astropy reproject numpy

# One cargo build at a time on this machine: take the shared lock when there is one.
if command -v flock >/dev/null; then
  CARGO_TARGET_DIR=$TARGET flock "$LOCK" cargo build --release --bin contimg --example mosaic_synth
else
  CARGO_TARGET_DIR=$TARGET cargo build --release --bin contimg --example mosaic_synth
fi

rm -rf "$WORK" && mkdir -p "$WORK"
"$TARGET/release/examples/mosaic_synth" --out-dir "$WORK" --tiles "$TILES" --npix "$NPIX"
tiles=("$WORK"/tile_??.fits)
beams=("$WORK"/tile_??.pb.fits)

timed() { # name, command...
  local name=$1; shift
  /usr/bin/time -v "$@" 2> "$WORK/$name.time" > "$WORK/$name.out" || { cat "$WORK/$name.time"; exit 1; }
  local wall rss
  wall=$(grep "Elapsed (wall clock)" "$WORK/$name.time" | awk '{print $NF}')
  rss=$(grep "Maximum resident set size" "$WORK/$name.time" | awk '{print $NF}')
  printf '%-14s wall %s  peak RSS %.2f GiB\n' "$name" "$wall" "$(echo "$rss/1048576" | bc -l)" | tee -a "$WORK/summary.txt"
}

CONTIMG_LOG=warn timed contimg "$TARGET/release/contimg" mosaic --out "$WORK/contimg.fits" \
  --weights "$WORK/contimg.weights.fits" --noise "$WORK/contimg.noise.fits" "${tiles[@]}" --beams "${beams[@]}"
# The same without beam images: the Gaussian dish model at RESTFRQ.
CONTIMG_LOG=warn timed contimg-model "$TARGET/release/contimg" mosaic --out "$WORK/contimg.model.fits" "${tiles[@]}"
if [ "${SKIP_REPROJECT:-0}" != 1 ]; then
  timed reproject "$VENV/bin/python" tools/mosaic_compare.py coadd --template "$WORK/contimg.fits" \
    --out "$WORK/reproject.fits" --tiles "${tiles[@]}" --beams "${beams[@]}"
  "$VENV/bin/python" tools/mosaic_compare.py compare --truth "$WORK/sources.csv" \
    --mosaic contimg="$WORK/contimg.fits" --mosaic reproject="$WORK/reproject.fits" \
    --noise-map "$WORK/contimg.noise.fits" | tee -a "$WORK/summary.txt"
  "$VENV/bin/python" tools/mosaic_compare.py compare --truth "$WORK/sources.csv" \
    --mosaic contimg-model="$WORK/contimg.model.fits" | tee -a "$WORK/summary.txt"
else
  "$VENV/bin/python" tools/mosaic_compare.py compare --truth "$WORK/sources.csv" \
    --mosaic contimg="$WORK/contimg.fits" --noise-map "$WORK/contimg.noise.fits" | tee -a "$WORK/summary.txt"
fi
cat "$WORK/contimg.out" >> "$WORK/summary.txt"
if [ "${KEEP:-0}" != 1 ]; then
  cp "$WORK/summary.txt" "/tmp/mosaic-compare-summary-$TILES-$NPIX.txt"
  rm -rf "$WORK"
  echo "summary kept in /tmp/mosaic-compare-summary-$TILES-$NPIX.txt"
fi

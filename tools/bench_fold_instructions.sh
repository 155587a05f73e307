#!/usr/bin/env bash
# Instructions the whole-log fold executes for each event, counted by valgrind's callgrind:
# a figure that does not move with the machine's load, where wall times on a shared
# machine move by 10% or more from one run to the next.
#
#   tools/bench_fold_instructions.sh SEEDED_LEDGER
#
# SEEDED_LEDGER is a folder written by `examples/seed_products --data-dir DIR --products N`
# (100,000 products, 330,000 events, take about 30 s here). `contimg audit --json status`
# runs under callgrind, counting only inside the fold's three parts: the reader walking
# the log (`LogIter`), the two decoders (`decode_raw`) and the fold itself (`fold_as_of`);
# opening the ledger and sled's own threads are not counted. Each thread's count is
# printed, then the total, each divided by the ledger's events. CONTIMG_BIN names the
# binary (default target/release/contimg).
set -euo pipefail
ledger=${1:?usage: tools/bench_fold_instructions.sh SEEDED_LEDGER}
bin=${CONTIMG_BIN:-target/release/contimg}
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$bin" audit --data-dir "$ledger" --json status >"$work/status.json"
events=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['position'] + 1)" "$work/status.json")
valgrind --tool=callgrind --separate-threads=yes --collect-atstart=no \
  --toggle-collect='*LogIter*' --toggle-collect='*fold::decode_raw*' \
  --toggle-collect='*fold::fold_as_of*' \
  --callgrind-out-file="$work/cg.out" \
  "$bin" audit --data-dir "$ledger" --json status >/dev/null 2>"$work/valgrind.log" \
  || { cat "$work/valgrind.log" >&2; exit 1; }
total=0
for f in "$work"/cg.out-*; do
  n=$(awk '/^summary:/ {print $2}' "$f")
  [ "${n:-0}" -gt 0 ] || continue
  total=$((total + n))
  if grep -q 'fold_as_of' "$f"; then role="the fold"
  elif grep -q 'decode_raw' "$f"; then role="a decoder"
  else role="the reader"; fi
  echo "thread ${f##*-} ($role): $n instructions, $((n / events)) an event"
done
echo "$events events; the fold: $total instructions, $((total / events)) an event"

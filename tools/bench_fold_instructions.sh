#!/usr/bin/env bash
# Instructions the whole-log fold executes for each event, counted by valgrind's callgrind:
# a figure that does not move with the machine's load, where wall times on a shared
# machine move by 10% or more from one run to the next.
#
#   tools/bench_fold_instructions.sh SEEDED_LEDGER
#
# Run from the repository's root, after
#   cargo build --release --bin contimg --example seed_products
#   target/release/examples/seed_products --data-dir /tmp/f100k --products 100000
# SEEDED_LEDGER is such a folder (100,000 products, 330,000 events: about 30 s a count
# here). Needs valgrind (`apt-get install valgrind`) and python3.
#
# `contimg audit --json status` runs under callgrind, counting only inside the fold's
# four threads: the reader walking the log (`LogIter::next` of the sled store), the two
# decoders (`decode_raw`) and the fold itself (`fold_as_of`); opening the ledger and
# sled's own threads are not counted. Each thread's count is printed divided by all the
# ledger's events (so the two decoders' figures add up to what decoding costs an event),
# then the total. A run that does not count exactly those four threads (a function
# renamed or inlined away) stops with an error rather than print a smaller total.
# CONTIMG_BIN names the binary (default target/release/contimg).
set -euo pipefail
ledger=${1:?usage: tools/bench_fold_instructions.sh SEEDED_LEDGER}
bin=${CONTIMG_BIN:-target/release/contimg}
for tool in valgrind python3; do
  command -v "$tool" >/dev/null || { echo "$tool is not installed" >&2; exit 2; }
done
[ -x "$bin" ] || { echo "no binary at $bin (build it, or set CONTIMG_BIN)" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$bin" audit --data-dir "$ledger" --json status >"$work/status.json"
events=$(python3 -c "
import json, sys
p = json.load(open(sys.argv[1]))['position']
print(0 if p is None else p + 1)" "$work/status.json")
[ "$events" -gt 0 ] || { echo "$ledger holds no events" >&2; exit 2; }
valgrind --tool=callgrind --separate-threads=yes --collect-atstart=no \
  --toggle-collect='<contimg::events::store::sled::LogIter as core::iter::traits::iterator::Iterator>::next' \
  --toggle-collect='contimg::projections::fold::decode_raw' \
  --toggle-collect='contimg::projections::fold::fold_as_of' \
  --callgrind-out-file="$work/cg.out" \
  "$bin" audit --data-dir "$ledger" --json status >/dev/null 2>"$work/valgrind.log" \
  || { cat "$work/valgrind.log" >&2; exit 1; }
total=0
roles=""
for f in "$work"/cg.out-*; do
  n=$(awk '/^summary:/ {print $2}' "$f")
  [ "${n:-0}" -gt 0 ] || continue
  if grep -q 'fold_as_of' "$f"; then role="the fold"
  elif grep -q 'decode_raw' "$f"; then role="a decoder"
  elif grep -q 'LogIter' "$f"; then role="the reader"
  else role="unknown"; fi
  roles="$roles|$role"
  total=$((total + n))
  echo "thread ${f##*-} ($role): $n instructions, $((n / events)) an event"
done
case "$roles" in
  *unknown*) ;;
  *) [ "$(tr '|' '\n' <<<"$roles" | sort | tr '\n' '|')" = "|a decoder|a decoder|the fold|the reader|" ] && {
       echo "$events events; the fold: $total instructions, $((total / events)) an event"
       exit 0
     } ;;
esac
echo "expected the fold, two decoders and the reader; counted:$roles" >&2
exit 1

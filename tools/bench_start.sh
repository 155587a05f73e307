#!/usr/bin/env bash
# The server's start and memory on a seeded ledger (loopback only).
#
#   tools/bench_start.sh SEEDED_LEDGER [RUNS] [PORT]
#
# SEEDED_LEDGER is a folder written by `examples/seed_products --data-dir DIR --products N`
# and never served (so it holds no projection snapshot). Each run copies it, then:
#   1. starts `contimg serve` on the copy (no snapshot): seconds until GET /api/status
#      first answers, RSS then and 15 s later (the background folds done);
#   2. stops it (SIGTERM; the server saves its snapshot) and starts it again: seconds to
#      ready with the snapshot, RSS then and 15 s later.
# Each start also prints its peak (VmHWM, 15 s after ready: the first start's includes
# the snapshot it saves after its catch-up).
# An empty server's RSS is printed first, the baseline for bytes per product. RSS is
# printed in MiB (VmRSS / 1024); bytes a product are worked out here from KiB, over the
# products the server counts (staging + publishing + published in
# /api/monitoring/publish/status), so no one divides MiB by a million by hand. SERVE_ARGS
# adds options to `serve` (e.g. `--mode api`); CONTIMG_BIN names the binary.
set -euo pipefail
seeded=${1:?usage: tools/bench_start.sh SEEDED_LEDGER [RUNS] [PORT]}
runs=${2:-3}
port=${3:-18123}
bin=${CONTIMG_BIN:-target/release/contimg}
work=$(mktemp -d)
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

rss_mb() { awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
# The most the process has held (VmHWM): a load's transient buffers show here, not in RSS.
peak_mb() { awk '/VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }

# Products the running server counts.
products() {
  curl -fsS "http://127.0.0.1:$port/api/monitoring/publish/status" | python3 -c "
import json, sys
s = json.load(sys.stdin)
print(s['total_staging'] + s['total_publishing'] + s['total_published'])"
}

# Bytes a product: (RSS in KiB - the empty server's) * 1024 / products.
per_product() {
  if [ "$2" -gt 0 ]; then echo $((($1 - empty_kib) * 1024 / $2)); else echo "n/a"; fi
}

# Starts the server on $1; sets pid and writes seconds to the first answer to $work/t.
start() {
  local began
  began=$(date +%s.%N)
  # shellcheck disable=SC2086
  "$bin" serve --data-dir "$1" --listen "127.0.0.1:$port" ${SERVE_ARGS:-} \
    --log-format json >"$work/log" 2>&1 &
  pid=$!
  until curl -fsS -o /dev/null "http://127.0.0.1:$port/api/status" 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || { cat "$work/log" >&2; exit 1; }
    sleep 0.02
  done
  awk -v a="$began" -v b="$(date +%s.%N)" 'BEGIN {printf "%.2f", b - a}' >"$work/t"
}

stop() {
  kill -TERM "$pid"
  wait "$pid" 2>/dev/null || true
  pid=
}

mkdir "$work/empty"
start "$work/empty"
sleep 2
empty_kib=$(rss_kib "$pid")
echo "empty server: RSS $(rss_mb "$pid") MiB"
stop

for r in $(seq 1 "$runs"); do
  rm -rf "$work/ledger"
  cp -r "$seeded" "$work/ledger"
  sync
  start "$work/ledger"
  t=$(cat "$work/t")
  ready=$(rss_mb "$pid")
  n=$(products)
  sleep 15
  settled=$(rss_mb "$pid")
  peak=$(peak_mb "$pid")
  b=$(per_product "$(rss_kib "$pid")" "$n")
  stop
  start "$work/ledger"
  t2=$(cat "$work/t")
  ready2=$(rss_mb "$pid")
  sleep 15
  settled2=$(rss_mb "$pid")
  peak2=$(peak_mb "$pid")
  b2=$(per_product "$(rss_kib "$pid")" "$n")
  stop
  echo "run $r ($n products): without snapshot ready in ${t} s, RSS ${ready} MiB at ready," \
    "${settled} MiB 15 s later ($b bytes a product), peak ${peak} MiB; with the snapshot" \
    "ready in ${t2} s, RSS ${ready2} MiB at ready, ${settled2} MiB 15 s later ($b2 bytes a" \
    "product), peak ${peak2} MiB"
done

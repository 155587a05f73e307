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
# An empty server's RSS is printed first, the baseline for bytes per product. SERVE_ARGS
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
echo "empty server: RSS $(rss_mb "$pid") MB"
stop

for r in $(seq 1 "$runs"); do
  rm -rf "$work/ledger"
  cp -r "$seeded" "$work/ledger"
  sync
  start "$work/ledger"
  t=$(cat "$work/t")
  ready=$(rss_mb "$pid")
  sleep 15
  settled=$(rss_mb "$pid")
  stop
  start "$work/ledger"
  t2=$(cat "$work/t")
  ready2=$(rss_mb "$pid")
  sleep 15
  settled2=$(rss_mb "$pid")
  stop
  echo "run $r: without snapshot ready in ${t} s, RSS ${ready} MB at ready, ${settled} MB 15 s later;" \
    "with the snapshot ready in ${t2} s, RSS ${ready2} MB at ready, ${settled2} MB 15 s later"
done

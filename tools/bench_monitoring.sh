#!/usr/bin/env bash
# Load test of the monitoring endpoints with wrk, loopback only, and the publisher's rate.
#
#   tools/bench_monitoring.sh [PRODUCTS ...]      (default: 1000 1000000)
#
# For each size: seed a ledger with that many products (a week of realistic history),
# start `contimg serve` on it (automatic publisher held), then run wrk for 10 s against
# /api/monitoring/publish/status and /api/monitoring/publish/failed with 2 threads and
# 64 connections. Then publish 200 files of 1 MiB through the library.
# Needs wrk (installed from Debian packages when missing). Everything stays on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(1000 1000000)
port=${CONTIMG_BENCH_PORT:-18431}
duration=${CONTIMG_BENCH_DURATION:-10s}

if ! command -v wrk >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq wrk >/dev/null
fi
cargo build --release --bin contimg --example seed_products
bin=target/release/contimg
seed=target/release/examples/seed_products
work=$(mktemp -d "${TMPDIR:-/tmp}/contimg-bench.XXXXXX")
trap 'kill "${server:-}" 2>/dev/null || true; rm -rf "$work"' EXIT

for n in "${sizes[@]}"; do
  echo "== $n products"
  "$seed" --data-dir "$work/ledger-$n" --products "$n"
  start=$(date +%s.%N)
  "$bin" serve --data-dir "$work/ledger-$n" --listen "127.0.0.1:$port" --no-auto-publish \
    >/dev/null 2>"$work/serve-$n.log" &
  server=$!
  until curl -fsS "http://127.0.0.1:$port/api/status" >/dev/null 2>&1; do sleep 0.1; done
  echo "server ready in $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $start}") s (replay of the ledger into the read model)"
  curl -fsS "http://127.0.0.1:$port/api/monitoring/publish/status"; echo
  for path in /api/monitoring/publish/status "/api/monitoring/publish/failed?limit=50"; do
    echo "-- wrk $path"
    wrk -t2 -c64 -d"$duration" --latency "http://127.0.0.1:$port$path" | grep -E "Requests/sec|99%|50%|Non-2xx"
  done
  kill "$server"; wait "$server" || true
  server=
done

echo "== publishing 200 files of 1 MiB"
"$seed" --publish-bench "$work/publish" --files 200 --size-mib 1

#!/usr/bin/env bash
# The status endpoint's latency while durable appends run beside it, loopback only.
#
#   tools/bench_reads_under_writes.sh LEDGER [APPEND_CONNECTIONS] [DELAY_MS] [STATUS_CONNECTIONS]
#                                            (defaults: 80 10 4)
#
# Serves LEDGER (a seeded folder: examples/seed_products), waits 12 s for the background
# folds, then runs two wrk at once: tools/append_load.lua (each of APPEND_CONNECTIONS
# appends one event, then waits DELAY_MS: at most 80 * 1000 / 10 = 8,000 a second, fewer
# as each append's own latency adds to the wait) for 25 s, and after 4 s of it wrk against
# /api/monitoring/publish/status for 15 s. Prints the status latencies and the appends'
# rate over their 25 s. Needs wrk (installed when missing). CONTIMG_BIN names the binary
# (default: target/release/contimg, built first).
set -euo pipefail
cd "$(dirname "$0")/.."
ledger=$1
conns=${2:-80}
delay=${3:-10}
readers=${4:-4}
port=${CONTIMG_BENCH_PORT:-18431}
if ! command -v wrk >/dev/null 2>&1; then apt-get update -qq && apt-get install -y -qq wrk >/dev/null; fi
bin=${CONTIMG_BIN:-}
if [ -z "$bin" ]; then cargo build --release --bin contimg; bin=target/release/contimg; fi
out=$(mktemp)
"$bin" serve --data-dir "$ledger" --listen "127.0.0.1:$port" --no-auto-publish >/dev/null 2>"$out.log" &
server=$!
# Waits for the server to exit, so that a run right after this one finds the ledger free.
trap 'kill "$server" 2>/dev/null && wait "$server" 2>/dev/null; rm -f "$out" "$out.log"' EXIT
until curl -fsS "http://127.0.0.1:$port/api/status" >/dev/null 2>&1; do
  kill -0 "$server" 2>/dev/null || { echo "the server exited before answering:" >&2; tail -5 "$out.log" >&2; exit 1; }
  sleep 0.05
done
sleep 12
CONTIMG_LOAD_DELAY_MS=$delay wrk -t1 -c"$conns" -d25s -s tools/append_load.lua "http://127.0.0.1:$port" >"$out" &
appends=$!
sleep 4
echo "-- GET /api/monitoring/publish/status, $readers connections, beside the appends"
wrk -t1 -c"$readers" -d15s --latency "http://127.0.0.1:$port/api/monitoring/publish/status" |
  grep -E "Requests/sec|50%|90%|99%"
wait "$appends"
echo "-- appends ($conns connections, $delay ms between a connection's requests), over 25 s"
grep -E "Requests/sec|Non-2xx" "$out"

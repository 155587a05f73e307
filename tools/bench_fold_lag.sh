#!/usr/bin/env bash
# How far the read model falls behind durable appends, and for how long, while the server
# saves its snapshots: loopback only.
#
#   tools/bench_fold_lag.sh LEDGER [SECONDS] [APPEND_CONNECTIONS] [DELAY_MS]
#                                   (defaults: 40 80 10)
#
# Serves LEDGER (a seeded folder: examples/seed_products; use a copy, it grows), waits
# 12 s for the background folds, then runs tools/append_load.lua (each of
# APPEND_CONNECTIONS appends one event, then waits DELAY_MS) for SECONDS while a probe
# reads `projection.lag_events` from GET /api/status every 20 ms. The server saves a
# snapshot after every 100,000 events folded, so at 5,000 appends a second a run of 40 s
# holds one or two saves. Prints the appends' rate, the largest lag seen, the time the
# lag spent over 1,000 events, and the server's `projection snapshot saved` lines (a
# save after the start's own catch-up, if that took over 12 s, is among them). Needs
# wrk (installed when missing) and python3. CONTIMG_BIN names the binary (default:
# target/release/contimg, built first).
set -euo pipefail
ledger=$(realpath "${1:?usage: tools/bench_fold_lag.sh LEDGER [SECONDS] [APPEND_CONNECTIONS] [DELAY_MS]}")
[ -n "${CONTIMG_BIN:-}" ] && CONTIMG_BIN=$(realpath "$CONTIMG_BIN")
cd "$(dirname "$0")/.."
seconds=${2:-40}
conns=${3:-80}
delay=${4:-10}
port=${CONTIMG_BENCH_PORT:-18432}
if ! command -v wrk >/dev/null 2>&1; then apt-get update -qq && apt-get install -y -qq wrk >/dev/null; fi
bin=${CONTIMG_BIN:-}
if [ -z "$bin" ]; then cargo build --release --bin contimg; bin=target/release/contimg; fi
out=$(mktemp)
"$bin" serve --data-dir "$ledger" --listen "127.0.0.1:$port" --no-auto-publish \
  --log-format json >/dev/null 2>"$out.log" &
server=$!
appends=
# Stops the load and the server (waiting for it, so that a run right after finds the
# ledger free), whatever ended the script.
cleanup() {
  [ -n "$appends" ] && kill "$appends" 2>/dev/null || true
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  rm -f "$out" "$out.log"
}
trap cleanup EXIT
for _ in $(seq 1 1200); do
  curl -fsS "http://127.0.0.1:$port/api/status" >/dev/null 2>&1 && break
  kill -0 "$server" 2>/dev/null || { echo "the server exited before answering:" >&2; tail -5 "$out.log" >&2; exit 1; }
  sleep 0.05
done
curl -fsS "http://127.0.0.1:$port/api/status" >/dev/null 2>&1 \
  || { echo "the server did not answer within 60 s:" >&2; tail -5 "$out.log" >&2; exit 1; }
sleep 12
from=$(wc -l <"$out.log")
CONTIMG_LOAD_DELAY_MS=$delay wrk -t1 -c"$conns" -d"${seconds}s" -s tools/append_load.lua \
  "http://127.0.0.1:$port" >"$out" &
appends=$!
python3 - "$port" "$seconds" <<'PY'
import http.client, json, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
end = time.monotonic() + seconds
worst, over, last, failed = 0, 0.0, time.monotonic(), 0
while time.monotonic() < end:
    try:
        c.request("GET", "/api/status")
        lag = json.loads(c.getresponse().read())["projection"]["lag_events"]
    except Exception:
        # A sample lost (a timeout, a reset): counted, and the probe goes on.
        failed += 1
        c.close()
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        continue
    now = time.monotonic()
    if lag > 1000:
        over += now - last
    last = now
    worst = max(worst, lag)
    time.sleep(0.02)
print(f"-- read model: largest lag {worst} events; {over:.2f} s over 1,000 events;"
      f" {failed} samples failed")
PY
wait "$appends"
echo "-- appends ($conns connections, $delay ms between a connection's requests), over $seconds s"
grep -E "Requests/sec|Non-2xx" "$out"
echo "-- snapshots saved meanwhile"
tail -n +"$((from + 1))" "$out.log" | grep "projection snapshot saved" || echo "(none logged)"

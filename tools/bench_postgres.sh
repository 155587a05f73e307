#!/usr/bin/env bash
# The ledger on PostgreSQL, measured: a throwaway PostgreSQL 15 cluster in a temporary
# folder (synchronous_commit = on, fsync on), loopback only.
#
#   tools/bench_postgres.sh [PRODUCTS]       (default: 1000000)
#
# 1. examples/bench_postgres: 64 durable appenders on PostgreSQL and on sled beside it,
#    then 1,000,000 bulk-written events replayed through $all from each.
# 2. A seeded ledger of PRODUCTS products (examples/seed_products, a week of history, as
#    tools/bench_monitoring.sh seeds it) exported and imported into PostgreSQL; the time
#    of `contimg audit --ledger ... status` over it.
# 3. `contimg serve --ledger ...` on it: the time to be ready, then wrk against
#    /api/monitoring/publish/status (2 threads, 64 connections, 10 s).
# Needs Debian's postgresql and wrk (installed when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
products=${1:-1000000}
port=${CONTIMG_BENCH_PORT:-18432}
pgbin=/usr/lib/postgresql/15/bin
if ! [ -x "$pgbin/initdb" ]; then apt-get update -qq && apt-get install -y -qq postgresql >/dev/null; fi
if ! command -v wrk >/dev/null 2>&1; then apt-get update -qq && apt-get install -y -qq wrk >/dev/null; fi
cargo build --release --bin contimg --example seed_products --example bench_postgres
bin=target/release/contimg

work=$(mktemp -d "${TMPDIR:-/tmp}/contimg-pgbench.XXXXXX")
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" = 0 ] && chown postgres "$work"
pgport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cleanup() {
  kill "${server:-}" 2>/dev/null || true
  as_pg "$pgbin/pg_ctl" -D "$work/pg" -m fast stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
as_pg "$pgbin/initdb" -D "$work/pg" -U postgres --auth=trust -E UTF8 >/dev/null
as_pg "$pgbin/pg_ctl" -D "$work/pg" -l "$work/pg.log" -w start \
  -o "-p $pgport -k $work -c listen_addresses=127.0.0.1 -c synchronous_commit=on -c shared_buffers=1GB" >/dev/null
db() { psql -X -q -h 127.0.0.1 -p "$pgport" -U postgres -d postgres -c "CREATE DATABASE $1"; echo "postgres://postgres@127.0.0.1:$pgport/$1"; }

echo "== appends and replay"
target/release/examples/bench_postgres --url "$(db appends)" --appenders 64 --seconds 10 --replay 1000000

echo "== $products products"
target/release/examples/seed_products --data-dir "$work/sled" --products "$products" >/dev/null
"$bin" export --data-dir "$work/sled" --out "$work/events.jsonl"
url=$(db products)
start=$(date +%s.%N)
"$bin" import --ledger "$url" "$work/events.jsonl"
echo "import into PostgreSQL: $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $start}") s"
for backend in "--data-dir $work/sled" "--ledger $url"; do
  start=$(date +%s.%N)
  # shellcheck disable=SC2086
  "$bin" audit $backend --json status >/dev/null
  echo "audit status ($backend): $(awk "BEGIN{printf \"%.2f\", $(date +%s.%N) - $start}") s"
done
start=$(date +%s.%N)
"$bin" serve --ledger "$url" --data-dir "$work/serve" --listen "127.0.0.1:$port" --no-auto-publish \
  >/dev/null 2>"$work/serve.log" &
server=$!
until curl -fsS "http://127.0.0.1:$port/api/status" >/dev/null 2>&1; do sleep 0.1; done
echo "server ready in $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $start}") s"
wrk -t2 -c64 -d10s --latency "http://127.0.0.1:$port/api/monitoring/publish/status" | grep -E "Requests/sec|50%|99%|Non-2xx"
kill "$server"; wait "$server" || true
server=

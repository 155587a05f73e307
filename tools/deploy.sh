#!/usr/bin/env bash
# Installs contimg and its systemd units, validates the machine, (re)starts the services,
# waits for them to be healthy, and rolls the binary back when they do not become so.
# Idempotent: a second run with the same binary changes nothing.
#
#   tools/deploy.sh --mode api|stream|both [--prefix DIR] [--dry-run] [--binary PATH]
#                   [--health-url URL] [--timeout SECONDS]
#
#   --mode        which units to install and start (api: the ledger server; stream: the
#                 pipeline, which needs an api somewhere; both)
#   --prefix DIR  install under DIR (packaging, tests); services are not touched unless
#                 DIR is /                                               (default /)
#   --dry-run     print every action, change nothing
#   --binary PATH install this binary instead of building one (also
#                 CONTIMG_DEPLOY_SKIP_BUILD=1: use target/release/contimg as it is)
#   --health-url  where /api/status answers          (default http://$CONTIMG_LISTEN or
#                                                     http://127.0.0.1:8000)
#   --timeout S   how long to wait for health         (default 60)
#
# Exit codes: 0 deployed (or nothing to do); 1 a step failed (after a rollback when the new
# binary did not become healthy); 2 bad arguments.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

mode=""
prefix="/"
dry_run=0
binary=""
health_url=""
timeout=60

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
}

while [ $# -gt 0 ]; do
  case "$1" in
    --mode) mode="${2:-}"; shift 2 || usage ;;
    --mode=*) mode="${1#*=}"; shift ;;
    --prefix) prefix="${2:-}"; shift 2 || usage ;;
    --prefix=*) prefix="${1#*=}"; shift ;;
    --dry-run) dry_run=1; shift ;;
    --binary) binary="${2:-}"; shift 2 || usage ;;
    --binary=*) binary="${1#*=}"; shift ;;
    --health-url) health_url="${2:-}"; shift 2 || usage ;;
    --timeout) timeout="${2:-}"; shift 2 || usage ;;
    -h|--help) usage ;;
    *) echo "deploy: unknown argument $1" >&2; usage ;;
  esac
done

case "$mode" in
  api) units=(contimg-api.service) ;;
  stream) units=(contimg-stream.service) ;;
  both) units=(contimg-api.service contimg-stream.service) ;;
  *) echo "deploy: --mode api|stream|both is required" >&2; exit 2 ;;
esac
case "$timeout" in ''|*[!0-9]*) echo "deploy: --timeout takes whole seconds" >&2; exit 2 ;; esac
[ -n "$prefix" ] || { echo "deploy: --prefix is empty" >&2; exit 2; }
prefix="${prefix%/}"          # "/" becomes "", so "$prefix/usr" is "/usr"

bin_dir="$prefix/usr/local/bin"
unit_dir="$prefix/etc/systemd/system"
etc_dir="$prefix/etc/contimg"
installed="$bin_dir/contimg"

say() { echo "deploy: $*"; }
# Every change goes through here: printed always, done unless --dry-run.
run() {
  echo "+ $*"
  if [ "$dry_run" -eq 0 ]; then "$@"; fi
}

# 1. The binary to install.
if [ -n "$binary" ]; then
  [ -x "$binary" ] || { echo "deploy: --binary $binary is not an executable file" >&2; exit 1; }
  new="$binary"
elif [ "${CONTIMG_DEPLOY_SKIP_BUILD:-0}" = 1 ]; then
  new="$repo/target/release/contimg"
  [ -x "$new" ] || { echo "deploy: CONTIMG_DEPLOY_SKIP_BUILD=1 but $new is missing" >&2; exit 1; }
else
  run cargo build --release --locked --manifest-path "$repo/Cargo.toml"
  new="${CARGO_TARGET_DIR:-$repo/target}/release/contimg"
fi

# 2. Files: the binary (keeping the previous one), units, config and env file if absent.
for d in "$bin_dir" "$unit_dir" "$etc_dir"; do
  [ -d "$d" ] || run install -d -m 0755 "$d"
done
replaced=0
if [ -e "$installed" ] && cmp -s "$new" "$installed"; then
  say "binary unchanged: $installed"
else
  if [ -e "$installed" ]; then
    run cp -p "$installed" "$bin_dir/contimg.prev"
    replaced=1
  fi
  # Copy next to it, then rename: a running service never sees a half-written binary.
  run install -m 0755 "$new" "$bin_dir/.contimg.new"
  run mv -f "$bin_dir/.contimg.new" "$installed"
fi

units_changed=0
for unit in contimg-api.service contimg-stream.service; do
  case " ${units[*]} " in *" $unit "*) ;; *) continue ;; esac
  if [ -e "$unit_dir/$unit" ] && cmp -s "$here/systemd/$unit" "$unit_dir/$unit"; then
    say "unit unchanged: $unit_dir/$unit"
  else
    run install -m 0644 "$here/systemd/$unit" "$unit_dir/$unit"
    units_changed=1
  fi
done

if [ -e "$etc_dir/contimg.toml" ]; then
  say "keeping the existing $etc_dir/contimg.toml"
else
  run install -m 0644 "$here/contimg.toml.example" "$etc_dir/contimg.toml"
fi
if [ -e "$etc_dir/contimg.env" ]; then
  say "keeping the existing $etc_dir/contimg.env"
else
  run install -m 0600 "$here/systemd/contimg.env.example" "$etc_dir/contimg.env"
fi

# Before the previous binary runs again: the new one may have brought a sled ledger to its
# own layout (the server does when it starts), which the previous one would refuse.
# Put the ledger back in the layout the previous binary reads (one without
# `ledger-layout --writes` reads layout 1), with the new binary, which knows both. Nothing
# to do when both read the same layout, or when a running service (the previous binary,
# not yet restarted) holds the ledger: the new one cannot have changed it. Returns 1, with
# what to run, when the ledger could not be put back.
restore_layout() {
  local wants writes out
  wants="$("$bin_dir/contimg.prev" ledger-layout --writes 2>/dev/null)" || wants=1
  writes="$("$installed" ledger-layout --writes 2>/dev/null)" || writes=1
  if [ "$wants" = "$writes" ]; then
    say "the previous binary reads ledger layout $wants, as the new one does"
    return 0
  fi
  echo "+ $installed ledger-layout --config $etc_dir/contimg.toml --to $wants"
  # Not through `run`: its output decides what follows. So --dry-run is honoured here.
  [ "$dry_run" -eq 1 ] && return 0
  if out="$(set -a; [ -r "$etc_dir/contimg.env" ] && . "$etc_dir/contimg.env"; set +a
            "$installed" ledger-layout --config "$etc_dir/contimg.toml" --to "$wants" 2>&1)"; then
    echo "$out"
    return 0
  fi
  echo "$out" >&2
  case "$out" in
    *"held by another process"*)
      say "the ledger is held by the running service (the previous binary): left as it is"
      return 0 ;;
  esac
  echo "deploy: could not put the ledger back in layout $wants; with the services stopped, and the services' environment, run: $new ledger-layout --config $etc_dir/contimg.toml --to $wants" >&2
  return 1
}

# 3. Validate with the installed binary, in the services' environment.
validate=("$installed" validate --config "$etc_dir/contimg.toml" --units-dir "$unit_dir")
if [ -n "$prefix" ]; then
  # Under a prefix the units still name /usr/local/bin/contimg, the path they will run.
  validate+=(--expect-exec /usr/local/bin/contimg)
fi
echo "+ ${validate[*]}"
if [ "$dry_run" -eq 0 ]; then
  if ! (set -a; [ -r "$etc_dir/contimg.env" ] && . "$etc_dir/contimg.env"; set +a; "${validate[@]}"); then
    echo "deploy: contimg validate found errors; fix them and run again" >&2
    if [ "$replaced" -eq 1 ]; then
      say "rolling back to the previous binary"
      # The services were not restarted: they run the previous binary still. A ledger the
      # previous binary cannot read is refused by it, not misread; what to run is printed.
      restore_layout || true
      run mv -f "$bin_dir/contimg.prev" "$installed"
    fi
    exit 1
  fi
fi

# 4. Services: only on the real root of a machine running systemd.
if [ -n "$prefix" ]; then
  say "skipping systemctl: --prefix $prefix is not /"
  exit 0
fi
if [ ! -d /run/systemd/system ]; then
  say "skipping systemctl: systemd is not running on this machine"
  exit 0
fi
if ! id contimg >/dev/null 2>&1; then
  run useradd --system --home-dir /var/lib/contimg --shell /usr/sbin/nologin contimg
fi
if [ "$units_changed" -eq 1 ]; then
  run systemctl daemon-reload
fi
run systemctl enable "${units[@]}"
run systemctl restart "${units[@]}"

if [ -z "$health_url" ]; then
  listen="$( (set -a; [ -r "$etc_dir/contimg.env" ] && . "$etc_dir/contimg.env"; echo "${CONTIMG_LISTEN:-}") )"
  health_url="http://${listen:-127.0.0.1:8000}"
fi

healthy() {
  local u
  for u in "${units[@]}"; do
    systemctl is-active --quiet "$u" || return 1
  done
  case " ${units[*]} " in
    *" contimg-api.service "*)
      curl -fsS --max-time 2 "$health_url/api/status" | grep -q '"service":"contimg"' || return 1 ;;
  esac
}

if [ "$dry_run" -eq 1 ]; then
  say "would wait up to ${timeout}s for $health_url/api/status and ${units[*]} to be active"
  exit 0
fi
say "waiting up to ${timeout}s for ${units[*]} to be healthy"
deadline=$((SECONDS + timeout))
until healthy; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "deploy: not healthy after ${timeout}s (journalctl -u ${units[0]} -n 50)" >&2
    if [ "$replaced" -eq 1 ]; then
      say "rolling back to the previous binary"
      run systemctl stop "${units[@]}"
      if restore_layout; then
        run mv -f "$bin_dir/contimg.prev" "$installed"
        run systemctl restart "${units[@]}"
      else
        echo "deploy: the services are left stopped and the new binary installed: put the ledger back first" >&2
      fi
    fi
    exit 1
  fi
  sleep 1
done
say "healthy: ${units[*]} ($health_url)"

# Shared helpers for the macro benchmarks. Source it.
# shellcheck shell=bash
set -euo pipefail

BIN_DIR=${BIN_DIR:-target/release}
WORK=$(mktemp -d /tmp/edgepoll-bench.XXXXXX)
BG_PIDS=()
cleanup() {
    local pid
    for pid in "${BG_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

CLK_TCK=$(getconf CLK_TCK)

# cpu_seconds PID: user + system CPU time of a running process, in seconds.
cpu_seconds() {
    local stat
    stat=$(cat "/proc/$1/stat")
    stat=${stat##*) }
    # Fields 14 and 15 of proc(5) are the 12th and 13th after the command name.
    awk -v tck="$CLK_TCK" '{ printf "%.4f", ($12 + $13) / tck }' <<<"$stat"
}

# median N1 N2 ...: the median of the numbers.
median() {
    printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else printf "%.6g\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

# ratio A B: A / B with three decimals.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / b }'; }

# machine: one line naming the CPU, core count, kernel and date.
machine() {
    local cpu
    cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
    echo "${cpu:-unknown CPU}, $(nproc) cores, Linux $(uname -r), $(date -u +%Y-%m-%d)"
}

source "$(dirname "${BASH_SOURCE[0]}")/ports.sh"

# await_line FILE PATTERN: waits up to 5 s for a line matching PATTERN in FILE; if
# none comes, prints FILE and exits, so that no load runs against a server that
# never started (redis-benchmark, for one, would retry for ever).
await_line() {
    local i
    for i in $(seq 100); do
        grep -q "$2" "$1" && return
        sleep 0.05
    done
    echo "no line matching '$2' in $1 within 5 s:" >&2
    cat "$1" >&2
    exit 1
}

# start_edgepoll ARGS...: starts edgepoll pinned to core 0; sets EP_PID, EP_ADDR, EP_METRICS.
start_edgepoll() {
    RUST_LOG=info taskset -c 0 "$BIN_DIR/edgepoll" "$@" >"$WORK/edgepoll.log" 2>&1 &
    EP_PID=$!
    BG_PIDS+=("$EP_PID")
    await_line "$WORK/edgepoll.log" ' listening on '
    local line
    line=$(grep ' listening on ' "$WORK/edgepoll.log") || { cat "$WORK/edgepoll.log"; exit 1; }
    EP_ADDR=$(sed -E 's/.* listening on ([^ ,]+).*/\1/' <<<"$line")
    EP_METRICS=$(sed -nE 's#.*metrics on http://([^/]+)/metrics.*#\1#p' <<<"$line")
}

stop_pid() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# json_field FILE KEY: a top-level number from edgeload's --json output.
json_field() { grep -o "\"$2\":[0-9.e+-]*" "$1" | head -1 | cut -d: -f2; }

# peer_bin NAME: builds the benchmark peer benches/peers/NAME.rs and prints its path.
peer_bin() {
    cargo bench --no-run --bench "$1" --message-format=json 2>/dev/null |
        grep -o '"executable":"[^"]*'"$1"'[^"]*"' | cut -d'"' -f4 | head -1
}

# start_peer BIN ARGS...: starts a peer on core 0 and waits for its "listening on"
# line; sets EP_PID and EP_ADDR.
start_peer() {
    taskset -c 0 "$@" >"$WORK/peer.log" 2>&1 &
    EP_PID=$!
    BG_PIDS+=("$EP_PID")
    await_line "$WORK/peer.log" 'listening on'
    EP_ADDR=$(sed -nE 's/.*listening on ([^ ]+).*/\1/p' "$WORK/peer.log")
}

# load_cost PID EDGELOAD_ARGS...: runs edgeload --json on core 1 and prints
# "requests/s server_cpu_ns_per_request p50_us p99_us" for the server PID. Any load
# error fails.
load_cost() {
    local pid=$1 before after
    shift
    before=$(cpu_seconds "$pid")
    taskset -c 1 "$BIN_DIR/edgeload" --json "$@" >"$WORK/load.json"
    after=$(cpu_seconds "$pid")
    grep -q '"total":0' "$WORK/load.json" || { cat "$WORK/load.json" >&2; exit 1; }
    python3 - "$WORK/load.json" "$before" "$after" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
cpu = float(sys.argv[3]) - float(sys.argv[2])
p = r["latency_us"]["percentiles"]
print("%.0f %.1f %s %s" % (r["requests_per_sec"], cpu / r["requests"] * 1e9, p["p50"], p["p99"]))
PY
}

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

# start_edgepoll ARGS...: starts edgepoll pinned to core 0; sets EP_PID, EP_ADDR, EP_METRICS.
start_edgepoll() {
    RUST_LOG=info taskset -c 0 "$BIN_DIR/edgepoll" "$@" >"$WORK/edgepoll.log" 2>&1 &
    EP_PID=$!
    BG_PIDS+=("$EP_PID")
    local i
    for i in $(seq 100); do
        grep -q ' listening on ' "$WORK/edgepoll.log" && break
        sleep 0.05
    done
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

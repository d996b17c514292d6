#!/usr/bin/env bash
# Idle scaling: 50 active connections of 64-byte ping-pong while 0, 1,000 and 10,000
# idle connections are held open by another process. edgepoll echo with one worker on
# core 0; the load and the idle clients on core 1. With edge-triggered epoll an idle
# connection costs nothing per wake-up, so throughput should not move. Alternates the
# idle counts run by run; reports median messages/s and the ratio to 0 idle.
#
#   bash benches/idle_scaling.sh              # RUNS=5 DURATION=5s
source "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
DURATION=${DURATION:-5s}
CLIENTS=$(peer_bin idle_clients)

one_run() { # IDLE: prints messages/s
    start_edgepoll echo --listen 127.0.0.1:0 --workers 1 --metrics-listen off --max-connections 50000
    local hold_pid=""
    if (($1 > 0)); then
        coproc HOLD { taskset -c 1 "$CLIENTS" "$EP_ADDR" "$1"; }
        hold_pid=$HOLD_PID
        read -r line <&"${HOLD[0]}"
        [[ $line == "holding $1" ]] || { echo "clients: $line" >&2; exit 1; }
    fi
    taskset -c 1 "$BIN_DIR/edgeload" -t1 -c50 -d"$DURATION" --json "tcp://$EP_ADDR" >"$WORK/load.json"
    if [[ -n $hold_pid ]]; then
        exec {HOLD[1]}>&-
        wait "$hold_pid" 2>/dev/null || true
    fi
    stop_pid "$EP_PID"
    grep -q '"total":0' "$WORK/load.json" || { cat "$WORK/load.json" >&2; exit 1; }
    json_field "$WORK/load.json" requests_per_sec
}

echo "Machine: $(machine). edgepoll (1 worker) on core 0; edgeload (50 connections, 64-byte ping-pong) and the idle clients on core 1; $DURATION x $RUNS runs each, alternating."
declare -A rps=()
for run in $(seq "$RUNS"); do
    for idle in 0 1000 10000; do
        r=$(one_run "$idle")
        rps[$idle]+="$r "
        echo "run $run: $idle idle: $r msg/s" >&2
    done
done
# shellcheck disable=SC2086
base=$(median ${rps[0]})
echo
echo "| idle connections | messages/s (median) | vs 0 idle |"
echo "|---|---|---|"
for idle in 0 1000 10000; do
    # shellcheck disable=SC2086
    m=$(median ${rps[$idle]})
    printf '| %s | %.0f | %s |\n' "$idle" "$m" "$(ratio "$m" "$base")"
done

# The chart for benches/README.md: throughput against idle connections, with the
# target (0.95x of 0 idle) drawn in.
args=()
for idle in 0 1000 10000; do
    # shellcheck disable=SC2086
    args+=("$idle" "$(median ${rps[$idle]})")
done
python3 - "$(dirname "$0")/idle_scaling.svg" "${args[@]}" <<'PY'
import sys
out, vals = sys.argv[1], sys.argv[2:]
pts = [(int(vals[i]), float(vals[i + 1])) for i in range(0, len(vals), 2)]
base = pts[0][1]
w, h, left, bottom, top = 560, 360, 90, 50, 50
top_v = max(v for _, v in pts) * 1.1
y = lambda v: h - bottom - v / top_v * (h - top - bottom)
bw = (w - left - 40) / len(pts)
s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">',
     f'<rect width="{w}" height="{h}" fill="white"/>',
     f'<text x="{w / 2}" y="24" text-anchor="middle" font-size="15">Echo throughput, 50 active connections, with idle ones open</text>']
for k in range(0, 6):
    v = top_v * k / 5
    s.append(f'<line x1="{left}" y1="{y(v):.1f}" x2="{w - 30}" y2="{y(v):.1f}" stroke="#ddd"/><text x="{left - 8}" y="{y(v) + 4:.1f}" text-anchor="end">{v / 1000:.0f}k</text>')
for i, (idle, v) in enumerate(pts):
    x = left + i * bw + bw * 0.2
    s.append(f'<rect x="{x:.1f}" y="{y(v):.1f}" width="{bw * 0.6:.1f}" height="{y(0) - y(v):.1f}" fill="#2ca02c"/>')
    s.append(f'<text x="{x + bw * 0.3:.1f}" y="{y(v) - 6:.1f}" text-anchor="middle">{v / base:.3f}x</text>')
    s.append(f'<text x="{x + bw * 0.3:.1f}" y="{h - bottom + 18}" text-anchor="middle">{idle:,} idle</text>')
t = y(base * 0.95)
s.append(f'<line x1="{left}" y1="{t:.1f}" x2="{w - 30}" y2="{t:.1f}" stroke="#d62728" stroke-dasharray="6 4"/><text x="{w - 32}" y="{t - 6:.1f}" text-anchor="end" fill="#d62728">target: 0.95x of 0 idle</text>')
s.append(f'<text x="20" y="{(h - bottom + top) / 2}" transform="rotate(-90 20 {(h - bottom + top) / 2})" text-anchor="middle">messages/s (median)</text>')
s.append('</svg>')
open(out, "w").write("\n".join(s) + "\n")
PY
echo
echo "Chart: benches/idle_scaling.svg."

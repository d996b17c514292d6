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

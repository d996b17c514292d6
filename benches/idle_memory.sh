#!/usr/bin/env bash
# Memory per idle connection: the server's resident set before and after 10,000 idle
# connections (held by a separate client process), for edgepoll echo and the tokio
# echo peer, one worker each. Alternates the servers; reports medians of RUNS runs.
#
#   bash benches/idle_memory.sh               # RUNS=3 CONNS=10000
source "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
CONNS=${CONNS:-10000}

TOKIO=$(peer_bin tokio_echo)
CLIENTS=$(peer_bin idle_clients)

rss_bytes() { awk '/^VmRSS:/ { print $2 * 1024 }' "/proc/$1/status"; }

one_run() { # SERVER: prints bytes of RSS growth per idle connection
    if [[ $1 == edgepoll ]]; then
        start_edgepoll echo --listen 127.0.0.1:0 --workers 1 --metrics-listen off --max-connections 50000
    else
        start_peer "$TOKIO" 127.0.0.1:0 1
    fi
    # The tokio peer takes the soft limit it was given; give both the same room.
    prlimit --pid "$EP_PID" --nofile=20000:20000 2>/dev/null || true
    sleep 0.3
    local before after
    before=$(rss_bytes "$EP_PID")
    coproc HOLD { taskset -c 1 "$CLIENTS" "$EP_ADDR" "$CONNS"; }
    read -r line <&"${HOLD[0]}"
    [[ $line == "holding $CONNS" ]] || { echo "clients: $line" >&2; exit 1; }
    sleep 1
    after=$(rss_bytes "$EP_PID")
    exec {HOLD[1]}>&-
    wait "$HOLD_PID" 2>/dev/null || true
    stop_pid "$EP_PID"
    awk -v b="$before" -v a="$after" -v n="$CONNS" 'BEGIN { printf "%.0f\n", (a - b) / n }'
}

echo "Machine: $(machine). One worker each on core 0; $CONNS idle connections from a separate process on core 1; $RUNS runs each, alternating."
declare -a ep tk
for run in $(seq "$RUNS"); do
    ep+=("$(one_run edgepoll)")
    tk+=("$(one_run tokio)")
    echo "run $run: edgepoll ${ep[-1]} B/conn, tokio ${tk[-1]} B/conn" >&2
done
echo
echo "| server | RSS growth per idle connection (median) |"
echo "|---|---|"
echo "| edgepoll echo | $(median "${ep[@]}") bytes |"
echo "| tokio echo (16 KiB buffer per connection) | $(median "${tk[@]}") bytes |"

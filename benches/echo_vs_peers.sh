#!/usr/bin/env bash
# edgepoll echo against its peers: the tokio echo server (task per connection, 16 KiB
# buffer, the same worker count) and the floor (a bare edge-triggered loop on the same
# sys layer). Each server pinned to core 0 with one worker, edgeload on core 1, 50
# connections of 64-byte messages at depth 1 and depth 16. Alternates the servers run by
# run; reports median messages/s and median server CPU per message (/proc/PID/stat).
#
#   bash benches/echo_vs_peers.sh             # RUNS=5 DURATION=5s
source "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
DURATION=${DURATION:-5s}

TOKIO=$(peer_bin tokio_echo)
FLOOR=$(peer_bin floor)
[[ -x $TOKIO && -x $FLOOR ]] || { echo "could not build the peers" >&2; exit 1; }

one_run() { # SERVER DEPTH: prints "messages/s cpu_ns_per_message"
    case $1 in
        edgepoll) start_edgepoll echo --listen 127.0.0.1:0 --workers 1 --metrics-listen off ;;
        tokio) start_peer "$TOKIO" 127.0.0.1:0 1 ;;
        floor) start_peer "$FLOOR" 127.0.0.1:0 ;;
    esac
    load_cost "$EP_PID" -t1 -c50 --depth "$2" -d"$DURATION" "tcp://$EP_ADDR"
    stop_pid "$EP_PID"
}

echo "Machine: $(machine). Server (1 worker) on core 0, edgeload on core 1, 50 connections, 64-byte messages, $DURATION x $RUNS runs each, alternating."
for depth in 1 16; do
    declare -A rps_list=() cpu_list=() p50_list=() p99_list=()
    for run in $(seq "$RUNS"); do
        for server in edgepoll tokio floor; do
            read -r rps cpu p50 p99 < <(one_run "$server" "$depth")
            rps_list[$server]+="$rps "
            cpu_list[$server]+="$cpu "
            p50_list[$server]+="$p50 "
            p99_list[$server]+="$p99 "
            echo "depth $depth run $run: $server $rps msg/s $cpu ns/msg" >&2
        done
    done
    echo
    echo "### 64-byte echo, depth $depth"
    echo
    echo "| server | messages/s (median) | server CPU ns per message (median) | CPU vs edgepoll | p50 latency µs (median) | p99 latency µs (median) |"
    echo "|---|---|---|---|---|---|"
    # shellcheck disable=SC2086
    ep_cpu=$(median ${cpu_list[edgepoll]})
    for server in edgepoll tokio floor; do
        # shellcheck disable=SC2086
        m_rps=$(median ${rps_list[$server]})
        # shellcheck disable=SC2086
        m_cpu=$(median ${cpu_list[$server]})
        # shellcheck disable=SC2086
        m_p50=$(median ${p50_list[$server]})
        # shellcheck disable=SC2086
        m_p99=$(median ${p99_list[$server]})
        printf '| %s | %.0f | %.0f | %s | %.0f | %.0f |\n' "$server" "$m_rps" "$m_cpu" "$(ratio "$m_cpu" "$ep_cpu")" "$m_p50" "$m_p99"
    done
done

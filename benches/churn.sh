#!/usr/bin/env bash
# Connection churn: connect, one 64-byte echo, close, again, over 50 connection slots
# (edgeload --reconnect). edgepoll echo against the tokio echo peer, one worker each on
# core 0, edgeload on core 1. Alternates the servers; reports median connections/s and
# median server CPU per connection.
#
#   bash benches/churn.sh                     # RUNS=5 DURATION=5s
source "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
DURATION=${DURATION:-5s}
TOKIO=$(peer_bin tokio_echo)

one_run() { # SERVER: prints "connections/s cpu_ns_per_connection"
    if [[ $1 == edgepoll ]]; then
        start_edgepoll echo --listen 127.0.0.1:0 --workers 1 --metrics-listen off
    else
        start_peer "$TOKIO" 127.0.0.1:0 1
    fi
    load_cost "$EP_PID" -t1 -c50 --reconnect -d"$DURATION" "tcp://$EP_ADDR"
    stop_pid "$EP_PID"
}

echo "Machine: $(machine). Server (1 worker) on core 0, edgeload --reconnect on core 1, 50 slots, 64-byte echo per connection, $DURATION x $RUNS runs each, alternating."
declare -a e_rps e_cpu t_rps t_cpu
for run in $(seq "$RUNS"); do
    read -r r c _ < <(one_run edgepoll); e_rps+=("$r"); e_cpu+=("$c")
    read -r r c _ < <(one_run tokio); t_rps+=("$r"); t_cpu+=("$c")
    echo "run $run: edgepoll ${e_rps[-1]} conn/s ${e_cpu[-1]} ns/conn; tokio ${t_rps[-1]} conn/s ${t_cpu[-1]} ns/conn" >&2
done
me=$(median "${e_rps[@]}"); mt=$(median "${t_rps[@]}")
ce=$(median "${e_cpu[@]}"); ct=$(median "${t_cpu[@]}")
echo
echo "| server | connections/s (median) | server CPU ns per connection (median) |"
echo "|---|---|---|"
printf '| edgepoll echo | %.0f | %.0f |\n' "$me" "$ce"
printf '| tokio echo | %.0f | %.0f |\n' "$mt" "$ct"
echo "| edgepoll / tokio | $(ratio "$me" "$mt") | $(ratio "$ce" "$ct") |"

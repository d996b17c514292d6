#!/usr/bin/env bash
# The cost of metrics: edgepoll echo with the metrics endpoint off, against the same
# server with the endpoint on and scraped every second (a harsher scrape interval than
# Prometheus's usual 15 s). One worker pinned to core 0, edgeload on core 1, 64-byte
# ping-pong over 50 connections. Reports the server's CPU time per echoed message
# (from /proc/PID/stat around the load) as medians of RUNS alternating runs.
#
#   bash benches/metrics_overhead.sh          # RUNS=5 DURATION=5s
source "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
DURATION=${DURATION:-5s}

# one_run off|on: prints "messages/s cpu_ns_per_message".
one_run() {
    if [[ $1 == on ]]; then
        start_edgepoll echo --listen 127.0.0.1:0 --workers 1 --metrics-listen 127.0.0.1:0
        (while sleep 1; do curl -sf "http://$EP_METRICS/metrics" >/dev/null || true; done) &
        local scraper=$!
    else
        start_edgepoll echo --listen 127.0.0.1:0 --workers 1 --metrics-listen off
    fi
    load_cost "$EP_PID" -t1 -c50 -d"$DURATION" "tcp://$EP_ADDR"
    if [[ $1 == on ]]; then
        kill "$scraper"
        wait "$scraper" 2>/dev/null || true
    fi
    stop_pid "$EP_PID"
}

declare -a off_cpu on_cpu off_rps on_rps
for run in $(seq "$RUNS"); do
    read -r rps cpu _ < <(one_run off)
    off_rps+=("$rps"); off_cpu+=("$cpu")
    read -r rps cpu _ < <(one_run on)
    on_rps+=("$rps"); on_cpu+=("$cpu")
    echo "run $run: off ${off_rps[-1]} msg/s ${off_cpu[-1]} ns CPU/msg; on ${on_rps[-1]} msg/s ${on_cpu[-1]} ns CPU/msg" >&2
done
m_off=$(median "${off_cpu[@]}")
m_on=$(median "${on_cpu[@]}")
echo
echo "Machine: $(machine). edgepoll (1 worker) on core 0, edgeload on core 1, 50 connections, 64-byte ping-pong, $DURATION x $RUNS runs each, alternating."
echo
echo "| metrics | messages/s (median) | server CPU ns per message (median) |"
echo "|---|---|---|"
printf '| off | %.0f | %.1f |\n' "$(median "${off_rps[@]}")" "$m_off"
printf '| on, scraped every 1 s | %.0f | %.1f |\n' "$(median "${on_rps[@]}")" "$m_on"
echo "| on / off | | $(ratio "$m_on" "$m_off") |"

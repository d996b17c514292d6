#!/usr/bin/env bash
# The metrics endpoint against real Prometheus tools: promtool lints a live scrape,
# and a real Prometheus server scrapes edgepoll while a known number of bytes flows.
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/e2e/lib.sh

echo "== metrics: promtool check metrics on a live scrape"
start_edgepoll edgepoll echo --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --workers 2
log "edgepoll on $EP_ADDR, metrics on $EP_METRICS"
echo_bytes "$EP_ADDR" 1000
curl -sf "http://$EP_METRICS/metrics" >"$WORK/scrape.txt"
if ! promtool check metrics <"$WORK/scrape.txt" >"$WORK/promtool.txt" 2>&1 || [[ -s $WORK/promtool.txt ]]; then
    cat "$WORK/promtool.txt"
    fail "promtool check metrics reported findings"
fi
log "promtool check metrics: no findings ($(grep -vc '^#' "$WORK/scrape.txt") samples)"

echo "== metrics: a real Prometheus scrape counts the bytes sent"
prom_port=$(free_port)
cat >"$WORK/prometheus.yml" <<YAML
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: edgepoll
    static_configs:
      - targets: ['$EP_METRICS']
YAML
start_bg prometheus prometheus --config.file="$WORK/prometheus.yml" \
    --storage.tsdb.path="$WORK/tsdb" --web.listen-address="127.0.0.1:$prom_port"
wait_for 60 "Prometheus to be ready" curl -sf "http://127.0.0.1:$prom_port/-/ready"

query() {
    curl -sf "http://127.0.0.1:$prom_port/api/v1/query" --data-urlencode "query=$1" |
        grep -o '"value":\[[^]]*\]' | sed -E 's/.*,"([^"]*)"\]/\1/'
}
sent=0
for size in 1000 250000 2000000; do
    echo_bytes "$EP_ADDR" "$size"
    sent=$((sent + size))
done
total=$((sent + 1000)) # plus the 1000 bytes before the lint
log "sent $total bytes through edgepoll"
received_is_total() { [[ $(query 'sum(edgepoll_received_bytes_total)') == "$total" ]]; }
wait_for 60 "Prometheus to see $total received bytes" received_is_total
[[ $(query 'sum(edgepoll_sent_bytes_total)') == "$total" ]] || fail "sent bytes differ"
[[ $(query 'up{job="edgepoll"}') == "1" ]] || fail "target not up"
[[ $(query 'sum(edgepoll_connections_accepted_total)') == "4" ]] || fail "accepted != 4"
log "Prometheus: sum(edgepoll_received_bytes_total) = $(query 'sum(edgepoll_received_bytes_total)'), sent = $(query 'sum(edgepoll_sent_bytes_total)'), accepted = 4"

stop_gracefully "$EP_PID"
log "edgepoll drained and exited 0"
echo "metrics: ok"

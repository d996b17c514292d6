#!/usr/bin/env bash
# The access log against a real client: wrk's keep-alive connections give one JSON
# record each, whose request counts add up to the metric (rotation with the real
# logrotate is tests/e2e/logrotate.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/e2e/lib.sh

# count_lines FILE: lines in FILE (0 if it does not exist).
count_lines() { [[ -f $1 ]] && wc -l <"$1" || echo 0; }

echo "== access log: wrk's connections, one JSON record each"
start_edgepoll http http --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --workers 2 \
    --access-log "$WORK/records-http.jsonl" --access-log-format json
wrk -t 2 -c 20 -d 2s "http://$EP_ADDR/" >"$WORK/wrk.txt"
sum_metric() { curl -sf "http://$EP_METRICS/metrics" | awk -v m="$1" 'index($1, m) == 1 { s += $2 } END { print s + 0 }'; }
no_connections_open() { [[ $(sum_metric edgepoll_connections_active) == 0 ]]; }
wait_for 10 "wrk's connections to close" no_connections_open
sleep 0.3 # one publish interval, for the last closes' counters
closed=$(sum_metric edgepoll_connections_closed_total)
answered=$(sum_metric edgepoll_http_requests_total)
stop_gracefully "$EP_PID"
records=$(count_lines "$WORK/records-http.jsonl")
# wrk opens one connection to check the address, then -c of them (and reconnects any
# that fail): the server's count of closes is the truth to compare with.
[[ $records -eq $closed && $records -ge 20 ]] || fail "$closed connections closed, $records records"
python3 - "$WORK/records-http.jsonl" "$WORK/records-http.jsonl.sum" <<'PY'
import json, sys
total = 0
for line in open(sys.argv[1]):
    r = json.loads(line)
    assert r["mode"] == "http" and r["reason"] in ("eof", "shutdown", "reset"), r
    assert r["statuses"].get("200", 0) == r["requests"], r
    total += r["requests"]
open(sys.argv[2], "w").write(str(total))
PY
served=$(grep -E '^ +[0-9]+ requests in' "$WORK/wrk.txt" | awk '{print $1}')
logged=$(cat "$WORK/records-http.jsonl.sum")
[[ $logged -eq $answered ]] || fail "records count $logged requests, the metric $answered"
# wrk stops counting at its deadline while responses are in flight: the server may
# have answered a few more than wrk reports, never fewer.
((logged >= served)) || fail "records count $logged requests, wrk $served"
log "$records records for $closed connections, all JSON; their requests add up to $logged (the metric: $answered; wrk counted $served)"

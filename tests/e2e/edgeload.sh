#!/usr/bin/env bash
# edgeload against real servers: edgepoll's echo (every byte verified) and Debian's
# nginx (HTTP keep-alive and pipelining), plus its exit statuses.
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/e2e/lib.sh

echo "== edgeload: tcp:// against edgepoll echo, verified"
start_edgepoll edgepoll echo --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --workers 2
"$BIN_DIR/edgeload" -c 20 -t 2 -d 2s --depth 4 --size 1KiB --json "tcp://$EP_ADDR" >"$WORK/echo.json"
grep -q '"total":0' "$WORK/echo.json" || { cat "$WORK/echo.json"; fail "errors against edgepoll echo"; }
requests=$(grep -o '"requests":[0-9]*' "$WORK/echo.json" | cut -d: -f2)
((requests > 1000)) || fail "only $requests requests"
log "edgeload tcp://: $requests verified 1 KiB requests, 0 errors"
written=$(grep -o '"bytes_written":[0-9]*' "$WORK/echo.json" | cut -d: -f2)
received_matches() {
    [[ $(curl -sf "http://$EP_METRICS/metrics" | awk '/^edgepoll_received_bytes_total/ { s += $2 } END { printf "%d", s }') == "$written" ]]
}
wait_for 10 "edgepoll to have received every byte edgeload wrote ($written)" received_matches
log "edgepoll counted exactly the $written bytes edgeload wrote"
stop_gracefully "$EP_PID"

echo "== edgeload: http:// against nginx, keep-alive and depth 16"
port=$(free_port)
start_nginx "$port"
for depth in 1 16; do
    "$BIN_DIR/edgeload" -c 10 -d 2s --depth "$depth" --json "http://127.0.0.1:$port/" >"$WORK/http.json"
    grep -q '"total":0' "$WORK/http.json" || { cat "$WORK/http.json"; fail "errors against nginx at depth $depth"; }
    requests=$(grep -o '"requests":[0-9]*' "$WORK/http.json" | cut -d: -f2)
    ok=$(grep -o '"2xx":[0-9]*' "$WORK/http.json" | cut -d: -f2)
    [[ $requests == "$ok" ]] || fail "$requests requests but $ok 2xx"
    log "edgeload http:// depth $depth: $requests requests, all 2xx, 0 errors"
done
"$BIN_DIR/edgeload" -c 2 -d 1s --json "http://127.0.0.1:$port/missing" >"$WORK/404.json"
non2xx=$(grep -o '"non_2xx":[0-9]*' "$WORK/404.json" | cut -d: -f2)
requests=$(grep -o '"requests":[0-9]*' "$WORK/404.json" | cut -d: -f2)
[[ $non2xx == "$requests" && $requests -gt 0 ]] || fail "404s not counted as non-2xx"
log "edgeload counts nginx's 404s: $non2xx of $requests non-2xx"

echo "== edgeload: exit statuses"
status=0
"$BIN_DIR/edgeload" "ftp://127.0.0.1:1" 2>"$WORK/err.txt" || status=$?
[[ $status -eq 2 ]] || fail "unknown scheme exited $status, not 2"
status=0
"$BIN_DIR/edgeload" -d 1s "tcp://127.0.0.1:$(free_port)" 2>"$WORK/err.txt" || status=$?
[[ $status -eq 2 ]] && grep -q 'cannot connect to' "$WORK/err.txt" || fail "unreachable target exited $status"
log "bad URL and unreachable target: exit 2 with one line"
echo "edgeload: ok"

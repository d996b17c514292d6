#!/usr/bin/env bash
# http mode against real clients: wrk with keep-alive, wrk pipelining 16 (Lua), curl,
# and strace to check that one read's pipelined requests are answered in one write.
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/e2e/lib.sh

# wrk_check NAME ARGS...: runs wrk; fails on any socket error or non-2xx response.
wrk_check() {
    local name=$1
    shift
    wrk "$@" >"$WORK/$name.txt"
    if grep -qE 'Socket errors|Non-2xx' "$WORK/$name.txt"; then
        cat "$WORK/$name.txt"
        fail "wrk $name: socket errors or non-2xx responses"
    fi
    local requests rps
    requests=$(awk '/requests in/ { print $1 }' "$WORK/$name.txt")
    rps=$(awk '/Requests\/sec/ { print $2 }' "$WORK/$name.txt")
    ((requests > 0)) || fail "wrk $name completed no requests"
    log "wrk $name: $requests requests ($rps/s), 0 socket errors, 0 non-2xx"
}

echo "== http: wrk keep-alive and pipelined 16"
start_edgepoll edgepoll http --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --workers 2
wrk_check keepalive -t1 -c50 -d3s "http://$EP_ADDR/"
wrk_check pipeline16 -t1 -c50 -d3s -s tests/e2e/pipeline16.lua "http://$EP_ADDR/"
scrape=$(curl -sf "http://$EP_METRICS/metrics")
non200=$(awk '/^edgepoll_http_requests_total/ && !/status="200"/ { s += $2 } END { print s + 0 }' <<<"$scrape")
ok=$(awk '/^edgepoll_http_requests_total/ && /status="200"/ { s += $2 } END { printf "%d", s }' <<<"$scrape")
[[ $non200 == 0 ]] || fail "edgepoll counted $non200 non-200 responses"
log "edgepoll counted $ok responses, all 200"

echo "== http: curl sees the configured response"
stop_gracefully "$EP_PID"
start_edgepoll edgepoll http --listen 127.0.0.1:0 --metrics-listen off --workers 1 \
    --status 201 --body '{"ok":true}' --content-type application/json --header 'X-Edge: 1'
curl -si "http://$EP_ADDR/any/path" >"$WORK/curl.txt"
grep -q '^HTTP/1.1 201 Created' "$WORK/curl.txt" || fail "status"
grep -q '^Content-Type: application/json' "$WORK/curl.txt" || fail "content type"
grep -q '^X-Edge: 1' "$WORK/curl.txt" || fail "extra header"
grep -q '{"ok":true}' "$WORK/curl.txt" || fail "body"
[[ $(curl -s -o /dev/null -w '%{http_code}' -X TRACE "http://$EP_ADDR/") == 405 ]] || fail "TRACE is not 405"
log "curl: 201 with the configured body and headers; TRACE gets 405"
stop_gracefully "$EP_PID"

echo "== http: 16 pipelined requests in one read are answered in one write (strace)"
RUST_LOG=info start_bg traced strace -f -qq -e trace=sendto -o "$WORK/strace.txt" \
    "$BIN_DIR/edgepoll" http --listen 127.0.0.1:0 --metrics-listen off --workers 1
strace_pid=$LAST_PID
wait_for 10 "edgepoll under strace to start" grep -q ' listening on ' "$WORK/traced.log"
addr=$(sed -nE 's/.* listening on ([^ ,]+).*/\1/p' "$WORK/traced.log")
printf 'GET / HTTP/1.1\r\nHost: t\r\n\r\n%.0s' $(seq 16) >"$WORK/requests.txt"
exec 3<>"/dev/tcp/${addr%:*}/${addr##*:}"
# cat copies the 432 bytes with one write, so they arrive as one segment.
cat "$WORK/requests.txt" >&3
# The server keeps the connection open: read for a second, then count.
timeout 1 cat <&3 >"$WORK/responses.txt" || true
responses=$(grep -o 'HTTP/1.1 200 OK' "$WORK/responses.txt" | wc -l)
exec 3>&- 3<&-
((responses == 16)) || { pkill -P "$strace_pid"; fail "got $responses of 16 responses"; }
sleep 0.2
writes=$(grep -c 'sendto(' "$WORK/strace.txt" || true)
[[ $writes == 1 ]] || { cat "$WORK/strace.txt"; fail "16 pipelined responses took $writes writes"; }
log "16 pipelined requests, 16 responses, $writes sendto call"
# Killing strace would leave edgepoll running: stop edgepoll itself.
pkill -TERM -P "$strace_pid" || true
wait "$strace_pid" || true
echo "http: ok"

#!/usr/bin/env bash
# Reload under load: 10 SIGHUPs, one every 1.5 s, each to the process serving at the
# time, while clients keep going. Echo: edgeload churning (a new connection per
# request) and edgeload holding 50 long-lived streams, every echoed byte verified.
# http: wrk with 50 keep-alive connections. No client may see an error or lose a
# long-lived connection, every reload must succeed, and each replaced process must be
# gone within 1 s of its SIGHUP.
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/e2e/lib.sh
source benches/sighup.sh

RELOADS=10
INTERVAL_MS=1500
# Long enough that the last reload (at 15 s) happens with the clients still running.
DURATION=20s
# The bound on a reload: SIGHUP until the replaced process has exited.
MAX_RELOAD_MS=1000

# The process serving now. After a reload it is no child of this shell, so lib.sh's
# cleanup does not know it: the trap stops every successor the logs name.
SERVER_PID=""
trap 'kill_successors "$BIN_DIR/edgepoll" "$WORK"/*.log; cleanup' EXIT

# storm LOG: RELOADS reloads of the edgepoll writing LOG, every INTERVAL_MS; sets
# SERVER_PID to the last successor and STORM_MS to each reload's time (-1: the
# replaced process was still alive after 5 s, or the reload failed).
storm() {
    local log=$1 i wait next
    next=$(($(now_ms) + INTERVAL_MS))
    STORM_MS=()
    for i in $(seq "$RELOADS"); do
        wait=$((next - $(now_ms)))
        ((wait <= 0)) || sleep "$((wait / 1000)).$(printf %03d $((wait % 1000)))"
        next=$((next + INTERVAL_MS))
        edgepoll_reload "$log" "$SERVER_PID" 5
        STORM_MS+=("$RELOAD_MS")
        SERVER_PID=$NEXT_PID
    done
}

# check_storm LOG: every reload in LOG succeeded, each within MAX_RELOAD_MS; sets
# MAX_MS, and MOVED ("min-max" connections moved per reload) and MOVED_SUM.
check_storm() {
    local log=$1 ms reloaded
    MAX_MS=0
    for ms in "${STORM_MS[@]}"; do
        ((ms >= 0)) || { cat "$log"; fail "a replaced process was still running 5 s after its SIGHUP (${STORM_MS[*]} ms)"; }
        ((ms <= MAX_MS)) || MAX_MS=$ms
    done
    ((MAX_MS <= MAX_RELOAD_MS)) || fail "a reload took $MAX_MS ms (over $MAX_RELOAD_MS): ${STORM_MS[*]} ms"
    if grep -E 'reload failed|taking over from pid|handing over to pid [0-9]+:' "$log"; then
        fail "a reload went wrong (above)"
    fi
    reloaded=$(count_lines "$log" 'reloaded: took over')
    [[ $reloaded == "$RELOADS" ]] || fail "$reloaded 'reloaded:' lines after $RELOADS SIGHUPs"
    read -r MOVED MOVED_SUM < <(sed -nE 's/.*reloaded: took over from pid [0-9]+ with ([0-9]+) connections? moved.*/\1/p' "$log" |
        sort -n | awk 'NR == 1 { lo = $1 } { hi = $1; s += $1 } END { print lo "-" hi, s }')
}

# errors FILE: edgeload's error counts as "connect/read/write/timeout/mismatch".
errors() {
    python3 -c '
import json, sys
e = json.load(open(sys.argv[1]))["errors"]
print("/".join(str(e[k]) for k in ("connect", "read", "write", "timeout", "mismatch")))' "$1"
}

# json_field FILE KEY: a top-level number from edgeload's --json output.
json_field() { grep -o "\"$2\":[0-9.e+-]*" "$1" | head -1 | cut -d: -f2; }

# metric NAME_AND_LABELS: one sample from the serving process's scrape (0 if absent).
metric() {
    curl -sf "http://$EP_METRICS/metrics" | awk -v s="$1" 'index($0, s " ") == 1 { v = $2 } END { printf "%d", v }'
}

# holds_50 PID: PID has its 50 connections open.
holds_50() { [[ $(socket_inodes "$1" | wc -l) == 50 ]]; }

# check_kept NAME BEFORE PID: every socket in BEFORE is still held by PID: no
# connection was cut and reopened across the reloads.
check_kept() {
    local n
    n=$(replaced "$2" "$(socket_inodes "$3")")
    [[ $n == 0 ]] || fail "$1: $n of 50 connections were replaced across the reloads"
    log "$1: the same 50 connections before and after the $RELOADS reloads"
}

ROWS=()

echo "== reload: echo, edgeload churn and 50 long-lived streams, $RELOADS SIGHUPs"
start_edgepoll echo echo --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --workers 2
SERVER_PID=$EP_PID
"$BIN_DIR/edgeload" -c 50 --reconnect -d "$DURATION" --json "tcp://$EP_ADDR" >"$WORK/churn.json" &
churn=$!
BG_PIDS+=("$churn")
"$BIN_DIR/edgeload" -c 50 -d "$DURATION" --json "tcp://$EP_ADDR" >"$WORK/streams.json" &
streams=$!
BG_PIDS+=("$streams")
wait_for 10 "edgeload to open its 50 streams" holds_50 "$streams"
before=$(socket_inodes "$streams")
storm "$WORK/echo.log"
check_kept "edgeload streams" "$before" "$streams"
status=0
wait "$churn" || status=$?
[[ $status == 0 ]] || { cat "$WORK/churn.json"; fail "edgeload --reconnect exited $status"; }
wait "$streams" || status=$?
[[ $status == 0 ]] || { cat "$WORK/streams.json"; fail "edgeload (streams) exited $status (1: an echoed byte differed)"; }
check_storm "$WORK/echo.log"
for load in churn streams; do
    grep -q '"total":0' "$WORK/$load.json" || { cat "$WORK/$load.json"; fail "edgeload $load: errors $(errors "$WORK/$load.json")"; }
    requests=$(json_field "$WORK/$load.json" requests)
    ((requests > 0)) || fail "edgeload $load completed no requests"
    log "edgeload $load: $requests verified requests, errors connect/read/write/timeout/mismatch $(errors "$WORK/$load.json")"
    ROWS+=("| echo | edgeload -c 50 $([[ $load == churn ]] && echo '--reconnect | -' || echo '(long-lived) | 50 of 50') | $requests | $(errors "$WORK/$load.json") | RELOADS_DONE |")
done
log "$RELOADS reloads, each old process gone in ${STORM_MS[*]} ms (max $MAX_MS); connections moved per reload: $MOVED"
ROWS=("${ROWS[@]/RELOADS_DONE/$RELOADS | $MAX_MS | $MOVED}")
((MOVED_SUM > 0)) || fail "no reload moved a connection: the streams were not there to move"
# Counters carried across ten processes: what the last one exports is every reload and
# every moved connection, and every byte the clients wrote.
[[ $(metric 'edgepoll_config_reloads_total{result="success"}') == "$RELOADS" ]] ||
    fail "edgepoll_config_reloads_total{result=\"success\"} is $(metric 'edgepoll_config_reloads_total{result="success"}'), not $RELOADS"
[[ $(metric edgepoll_reload_connections_moved_total) == "$MOVED_SUM" ]] ||
    fail "edgepoll_reload_connections_moved_total is $(metric edgepoll_reload_connections_moved_total), the log says $MOVED_SUM"
written=$(($(json_field "$WORK/churn.json" bytes_written) + $(json_field "$WORK/streams.json" bytes_written)))
received_matches() {
    [[ $(curl -sf "http://$EP_METRICS/metrics" | awk '/^edgepoll_received_bytes_total/ { s += $2 } END { printf "%d", s }') == "$written" ]]
}
wait_for 10 "edgepoll's received bytes, carried over $RELOADS reloads, to equal the $written bytes edgeload wrote" received_matches
log "the last process counts $RELOADS reloads, $MOVED_SUM moved connections and all $written bytes written"
stop_reloaded "$SERVER_PID"
SERVER_PID=""

echo "== reload: http, wrk with 50 keep-alive connections, $RELOADS SIGHUPs"
start_edgepoll http http --listen 127.0.0.1:0 --metrics-listen off --workers 2
SERVER_PID=$EP_PID
wrk -t1 -c50 -d"$DURATION" "http://$EP_ADDR/" >"$WORK/wrk.txt" &
wrk=$!
BG_PIDS+=("$wrk")
wait_for 10 "wrk to open its 50 connections" holds_50 "$wrk"
before=$(socket_inodes "$wrk")
storm "$WORK/http.log"
check_kept wrk "$before" "$wrk"
wait "$wrk" || fail "wrk exited $?"
if grep -qE 'Socket errors|Non-2xx' "$WORK/wrk.txt"; then
    cat "$WORK/wrk.txt"
    fail "wrk: socket errors or non-2xx responses across the reloads"
fi
requests=$(awk '/requests in/ { print $1 }' "$WORK/wrk.txt")
((requests > 0)) || fail "wrk completed no requests"
check_storm "$WORK/http.log"
((MOVED_SUM > 0)) || fail "no reload moved a keep-alive connection"
log "wrk: $requests requests, 0 socket errors, 0 non-2xx"
log "$RELOADS reloads, each old process gone in ${STORM_MS[*]} ms (max $MAX_MS); connections moved per reload: $MOVED"
ROWS+=("| http | wrk -c 50 (keep-alive) | 50 of 50 | $requests | 0/0/0/0, non-2xx 0 | $RELOADS | $MAX_MS | $MOVED |")
stop_reloaded "$SERVER_PID"
SERVER_PID=""

echo
echo "| mode | clients | connections kept throughout | requests | errors connect/read/write/timeout/mismatch | reloads done | old process gone after SIGHUP, max ms | connections moved per reload |"
echo "|---|---|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
echo "reload: ok"

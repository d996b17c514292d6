#!/usr/bin/env bash
# relay mode in front of real services: redis-benchmark through the relay to
# redis-server (and a value written through it read back directly), wrk through it
# to nginx, and iperf3 through it both ways, copying and with --splice.
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/e2e/lib.sh

# metric NAME_AND_LABELS: one sample from the relay's scrape (0 if absent).
metric() {
    curl -sf "http://$EP_METRICS/metrics" | awk -v s="$1" 'index($0, s " ") == 1 { v = $2 } END { print v + 0 }'
}

# metric_is NAME_AND_LABELS VALUE: whether the sample is VALUE now (for wait_for,
# which runs its command anew each time).
metric_is() { [[ $(metric "$1") == "$2" ]]; }

# relay_clean [REASONS]: the relay saw no connect errors and closed no pair for one of
# REASONS (default: reset, error or upstream_error).
relay_clean() {
    local reasons=${1:-reset|error|upstream_error} scrape errors bad
    sleep 0.2 # the workers publish every 100 ms
    scrape=$(curl -sf "http://$EP_METRICS/metrics")
    errors=$(awk '/^edgepoll_upstream_connect_errors_total/ { s += $2 } END { print s + 0 }' <<<"$scrape")
    bad=$(awk -v r="reason=\"($reasons)\"" '/^edgepoll_connections_closed_total/ && $0 ~ r { s += $2 } END { print s + 0 }' <<<"$scrape")
    [[ $errors == 0 ]] || fail "$errors upstream connect errors"
    [[ $bad == 0 ]] || fail "$bad pairs closed for $reasons"
}

echo "== relay: redis-benchmark through edgepoll to redis-server"
redis_port=$(free_port)
start_bg redis redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no
wait_for 10 "redis to answer" redis-cli -p "$redis_port" ping
start_edgepoll relay relay --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --workers 2 \
    --upstream "127.0.0.1:$redis_port"
relay_port=${EP_ADDR##*:}
for pipeline in 1 16; do
    # Bounded: redis-benchmark retries a lost connection for ever, which would hang CI.
    timeout 120 redis-benchmark -h 127.0.0.1 -p "$relay_port" -c 50 -n 50000 -P "$pipeline" \
        -t set,get,incr,lpush,lpop --csv >"$WORK/redis-$pipeline.csv" 2>"$WORK/redis-$pipeline.err" ||
        { cat "$WORK/redis-$pipeline.err"; fail "redis-benchmark -P $pipeline failed or ran past 120 s"; }
    if grep -qi 'error' "$WORK/redis-$pipeline.csv" "$WORK/redis-$pipeline.err"; then
        cat "$WORK/redis-$pipeline.csv" "$WORK/redis-$pipeline.err"
        fail "redis-benchmark -P $pipeline reported errors"
    fi
    tests=$(grep -c '^"' "$WORK/redis-$pipeline.csv")
    ((tests >= 6)) || { cat "$WORK/redis-$pipeline.csv"; fail "redis-benchmark -P $pipeline ran $tests tests"; }
    set_rps=$(awk -F'"' '$2 == "SET" { print $4 }' "$WORK/redis-$pipeline.csv")
    log "redis-benchmark -P $pipeline through the relay: $((tests - 1)) tests, 0 errors, SET $set_rps req/s"
done
value="written-through-edgepoll-$RANDOM"
[[ $(redis-cli -p "$relay_port" set e2e:key "$value") == OK ]] || fail "SET through the relay"
[[ $(redis-cli -p "$redis_port" get e2e:key) == "$value" ]] || fail "the value read back directly differs"
log "a value written through the relay reads back directly from redis"
relay_clean
wait_for 10 "every pair to close" test "$(metric 'edgepoll_upstream_connections_active{upstream="127.0.0.1:'"$redis_port"'"}')" = 0
log "upstream connections back to 0, no connect errors, no resets"
stop_gracefully "$EP_PID"

echo "== relay: wrk through edgepoll to nginx"
nginx_port=$(free_port)
start_nginx "$nginx_port"
start_edgepoll relay-http relay --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --workers 2 \
    --upstream "127.0.0.1:$nginx_port"
wrk -t1 -c50 -d3s "http://$EP_ADDR/" >"$WORK/wrk.txt"
if grep -qE 'Socket errors|Non-2xx' "$WORK/wrk.txt"; then
    cat "$WORK/wrk.txt"
    fail "wrk through the relay: socket errors or non-2xx responses"
fi
requests=$(awk '/requests in/ { print $1 }' "$WORK/wrk.txt")
((requests > 0)) || fail "wrk through the relay completed no requests"
log "wrk through the relay to nginx: $requests requests, 0 socket errors, 0 non-2xx"
# wrk closes its connections at the end with responses in flight; the resets that
# causes are passed on to nginx, and are wrk's own.
relay_clean 'error|upstream_error'
stop_gracefully "$EP_PID"

echo "== relay: iperf3 through edgepoll, both directions, copying and spliced"
iperf_port=$(free_port)
start_bg iperf3 iperf3 --server --bind 127.0.0.1 --port "$iperf_port"
wait_for 10 "iperf3 to listen" bash -c "exec 3<>/dev/tcp/127.0.0.1/$iperf_port"
for variant in copy splice; do
    flags=()
    [[ $variant == splice ]] && flags=(--splice)
    start_edgepoll "relay-$variant" relay --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
        --workers 1 --upstream "127.0.0.1:$iperf_port" "${flags[@]}"
    for direction in forward reverse; do
        args=()
        [[ $direction == reverse ]] && args=(--reverse)
        iperf3 --client 127.0.0.1 --port "${EP_ADDR##*:}" --time 2 --json "${args[@]}" \
            >"$WORK/iperf-$variant-$direction.json" || {
            cat "$WORK/iperf-$variant-$direction.json"
            fail "iperf3 $direction through the $variant relay failed"
        }
        read -r bytes gbits < <(python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
if "error" in r: sys.exit("iperf3: " + r["error"])
s = r["end"]["sum_received"]
print(int(s["bytes"]), round(s["bits_per_second"] / 1e9, 2))' "$WORK/iperf-$variant-$direction.json")
        ((bytes > 0)) || fail "iperf3 $direction through the $variant relay moved nothing"
        log "iperf3 $direction, $variant: $bytes bytes received, $gbits Gbit/s"
    done
    # iperf3 closes its data connections with bytes unread at the end of a test, so
    # their peers get a reset, which the relay passes on: resets are iperf3's own.
    relay_clean 'error|upstream_error'
    stop_gracefully "$EP_PID"
done
echo "== relay: health checks find a redis-server stopped with kill -STOP"
# Two redis-servers behind the relay, probed with PING / +PONG every 200 ms. One is
# stopped (its kernel still accepts connections): once it is marked down every
# redis-cli goes to the other and is answered; resumed, it rises and takes clients.
redis_a=$(free_port)
redis_b=$(free_port)
start_bg redis-a redis-server --port "$redis_a" --bind 127.0.0.1 --save '' --appendonly no
start_bg redis-b redis-server --port "$redis_b" --bind 127.0.0.1 --save '' --appendonly no
redis_b_pid=$LAST_PID
wait_for 10 "redis a" redis-cli -p "$redis_a" ping
wait_for 10 "redis b" redis-cli -p "$redis_b" ping
start_edgepoll relay-checked relay --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --workers 2 \
    --upstream "127.0.0.1:$redis_a" --upstream "127.0.0.1:$redis_b" \
    --health-check send-expect --health-check-send 'PING\r\n' --health-check-expect '+PONG' \
    --health-check-interval 200ms --health-check-timeout 200ms --fall 2 --rise 2
relay_port=${EP_ADDR##*:}
kill -STOP "$redis_b_pid"
up_b="edgepoll_upstream_up{upstream=\"127.0.0.1:$redis_b\"}"
wait_for 10 "the stopped redis to be marked down" metric_is "$up_b" 0
grep -q "upstream down: 2 health checks failed in a row" "$WORK/relay-checked.log" ||
    fail "no log line for the transition"
for i in $(seq 50); do
    [[ $(timeout 5 redis-cli -p "$relay_port" ping) == PONG ]] || fail "client $i through the relay got no PONG"
done
log "50 redis-cli through the relay answered while one redis-server is stopped"
connects_b="edgepoll_upstream_connect_duration_seconds_count{upstream=\"127.0.0.1:$redis_b\"}"
before=$(metric "$connects_b")
kill -CONT "$redis_b_pid"
wait_for 10 "the resumed redis to rise" metric_is "$up_b" 1
for i in $(seq 20); do
    [[ $(timeout 5 redis-cli -p "$relay_port" ping) == PONG ]] || fail "client $i after the rise"
done
after=$(metric "$connects_b")
((after > before)) || fail "the risen redis-server got no client"
log "resumed, it rose after 2 probes and took $((after - before)) of 20 clients"
stop_gracefully "$EP_PID"
echo "relay: ok"

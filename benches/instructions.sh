#!/usr/bin/env bash
# User-space instructions per message or request, counted by valgrind's callgrind:
# a steadier comparison than CPU time on a shared machine (the count does not depend
# on what else the machine is doing), of the part each server controls. The kernel's
# share (the system calls) is not counted.
#
# - echo: edgepoll, the tokio echo peer and the floor loop, edgeload at depth 1 and 16;
# - http: edgepoll http and nginx (return 200, one process), wrk keep-alive;
# - relay: edgepoll relay and HAProxy (tcp mode, one thread) in front of redis-server,
#   redis-benchmark GET.
#
# Each server runs under callgrind twice, loaded for a short and a long time;
# (instructions of the long run - those of the short run) / (requests of the long run
# - those of the short run) cancels start-up and shutdown.
#
#   bash benches/instructions.sh              # SHORT=1s LONG=4s
source "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."
SHORT=${SHORT:-1s}
LONG=${LONG:-4s}
for tool in valgrind nginx wrk haproxy redis-server redis-benchmark; do
    command -v "$tool" >/dev/null ||
        { echo "needs $tool: apt-get install -y valgrind nginx-light wrk haproxy redis-server redis-tools" >&2; exit 1; }
done
source benches/peers/nginx.sh
source benches/peers/haproxy.sh

TOKIO=$(peer_bin tokio_echo)
FLOOR=$(peer_bin floor)
[[ -x $TOKIO && -x $FLOOR ]] || { echo "could not build the peers" >&2; exit 1; }

REDIS_PORT=$(free_port)
taskset -c 1 redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    >"$WORK/redis.log" 2>&1 &
BG_PIDS+=("$!")
for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
redis-cli -p "$REDIS_PORT" ping >/dev/null || { cat "$WORK/redis.log" >&2; exit 1; }

# under_callgrind PORT CMD...: starts CMD on core 0 under callgrind and waits until
# 127.0.0.1:PORT accepts (PORT 0: until CMD prints "listening on ADDR"); sets VG_PID
# and VG_ADDR.
under_callgrind() {
    local port=$1 i
    shift
    rm -f "$WORK/callgrind.out"
    RUST_LOG=info taskset -c 0 valgrind --tool=callgrind --callgrind-out-file="$WORK/callgrind.out" \
        "$@" >"$WORK/vg.log" 2>&1 &
    VG_PID=$!
    BG_PIDS+=("$VG_PID")
    VG_ADDR=""
    for i in $(seq 300); do
        if ((port == 0)); then
            VG_ADDR=$(sed -nE 's/.*listening on ([^ ,]+).*/\1/p' "$WORK/vg.log" | head -1)
        elif (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            VG_ADDR=127.0.0.1:$port
        fi
        [[ -n $VG_ADDR ]] && return
        sleep 0.1
    done
    cat "$WORK/vg.log" >&2
    exit 1
}

# stop_callgrind: stops the server under callgrind and waits until it has written its
# counts (in this shell: a subshell cannot wait for it).
stop_callgrind() {
    kill -TERM "$VG_PID"
    wait "$VG_PID" 2>/dev/null || true
}

# one_run SERVER DEPTH DURATION: prints "instructions requests".
one_run() {
    local server=$1 depth=$2 duration=$3 port
    port=$(free_port)
    case $server in
        edgepoll) under_callgrind 0 "$BIN_DIR/edgepoll" echo --listen 127.0.0.1:0 --workers 1 --metrics-listen off ;;
        tokio) under_callgrind 0 "$TOKIO" 127.0.0.1:0 1 ;;
        floor) under_callgrind 0 "$FLOOR" 127.0.0.1:0 ;;
        edgepoll-http) under_callgrind 0 "$BIN_DIR/edgepoll" http --listen 127.0.0.1:0 --workers 1 --metrics-listen off ;;
        nginx)
            nginx_conf "$WORK" "$port"
            # One process: the worker's instructions without a master to fork it.
            sed -i 's/^daemon off;/daemon off;\nmaster_process off;/' "$WORK/nginx.conf"
            under_callgrind "$port" nginx -c "$WORK/nginx.conf" -p "$WORK"
            ;;
        edgepoll-relay) under_callgrind 0 "$BIN_DIR/edgepoll" relay --listen 127.0.0.1:0 --workers 1 \
            --metrics-listen off --upstream "127.0.0.1:$REDIS_PORT" ;;
        haproxy)
            haproxy_conf "$WORK/haproxy.cfg" "$port" "$REDIS_PORT"
            under_callgrind "$port" haproxy -db -f "$WORK/haproxy.cfg"
            ;;
    esac
    local requests
    case $server in
        edgepoll | tokio | floor)
            taskset -c 1 "$BIN_DIR/edgeload" --json -t1 -c50 --depth "$depth" -d"$duration" "tcp://$VG_ADDR" >"$WORK/load.json"
            grep -q '"total":0' "$WORK/load.json" || { cat "$WORK/load.json" >&2; exit 1; }
            requests=$(json_field "$WORK/load.json" requests)
            ;;
        edgepoll-http | nginx)
            taskset -c 1 wrk -t1 -c50 -d"$duration" "http://$VG_ADDR/" >"$WORK/wrk.txt"
            if grep -qE 'Socket errors|Non-2xx' "$WORK/wrk.txt"; then cat "$WORK/wrk.txt" >&2; exit 1; fi
            requests=$(awk '/requests in/ { print $1 }' "$WORK/wrk.txt")
            ;;
        edgepoll-relay | haproxy)
            # A count, not a duration: 2000 requests per second of DURATION.
            requests=$((${duration%s} * 2000))
            # Bounded, since redis-benchmark retries a lost connection for ever.
            timeout 300 taskset -c 1 redis-benchmark -h 127.0.0.1 -p "${VG_ADDR##*:}" -c 50 \
                -n "$requests" -t get --csv >"$WORK/redis.csv" 2>"$WORK/redis.err" ||
                { cat "$WORK/redis.err" >&2; exit 1; }
            if grep -qi error "$WORK/redis.csv" "$WORK/redis.err" || ! grep -q '^"GET"' "$WORK/redis.csv"; then
                cat "$WORK/redis.err" >&2
                exit 1
            fi
            ;;
    esac
    stop_callgrind
    echo "$(awk '/^(summary|totals):/ { print $2; exit }' "$WORK/callgrind.out") $requests"
}

# per_request SERVER DEPTH: instructions per request, differenced over SHORT and LONG.
per_request() {
    local ir1 m1 ir2 m2
    read -r ir1 m1 < <(one_run "$1" "$2" "$SHORT")
    read -r ir2 m2 < <(one_run "$1" "$2" "$LONG")
    echo "$1 depth $2: $ir1 Ir / $m1 requests, $ir2 Ir / $m2 requests" >&2
    awk -v a="$ir1" -v b="$ir2" -v x="$m1" -v y="$m2" 'BEGIN { printf "%.0f", (b - a) / (y - x) }'
}

echo "Machine: $(machine). Each server with one worker or thread on core 0 under callgrind, the load on core 1 with 50 connections; runs of $SHORT and $LONG (relay: 2000 requests per second of each), differenced."
echo
echo "### Echo, 64-byte messages (edgeload)"
echo
echo "| server | depth | instructions per message | vs edgepoll |"
echo "|---|---|---|---|"
for depth in 1 16; do
    declare -A per=()
    for server in edgepoll tokio floor; do
        per[$server]=$(per_request "$server" "$depth")
    done
    for server in edgepoll tokio floor; do
        echo "| $server | $depth | ${per[$server]} | $(ratio "${per[$server]}" "${per[edgepoll]}") |"
    done
done
echo
echo "### HTTP keep-alive (wrk) and relay (redis-benchmark GET)"
echo
echo "| server | instructions per request | vs the peer |"
echo "|---|---|---|"
e=$(per_request edgepoll-http 1); n=$(per_request nginx 1)
echo "| edgepoll http | $e | $(ratio "$e" "$n") |"
echo "| nginx $(nginx -v 2>&1 | sed -E 's#.*/##') | $n | 1.000 |"
e=$(per_request edgepoll-relay 1); h=$(per_request haproxy 1)
echo "| edgepoll relay | $e | $(ratio "$e" "$h") |"
echo "| HAProxy $(haproxy -v | head -1 | cut -d' ' -f3) | $h | 1.000 |"

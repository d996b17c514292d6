#!/usr/bin/env bash
# edgepoll relay against HAProxy (Debian's package, tcp mode, one thread), and both
# against the direct connection. Each relay is pinned to core 0; the upstream
# (redis-server, iperf3 -s) and the load (redis-benchmark, iperf3 -c) share core 1.
# Contenders alternate run by run; medians of RUNS runs and ratios of medians.
#
# - redis-benchmark -c 50, GET and SET, pipeline 1: requests/s, the relay's CPU
#   time per request (from /proc/PID/stat before and after), and the load core's:
#   redis-server's and redis-benchmark's CPU time together, per request. Core 1 is the
#   one that saturates, so its cost per request sets the requests/s.
# - iperf3 -t 5, one stream, forward: Gbit/s and the relay's CPU time per GB.
#
# The floor (benches/peers/floor.rs --relay: one epoll loop, one read and one write
# per message, nothing else) runs under redis-benchmark too: its CPU per request is
# what the kernel costs any epoll relay under that load, and so the least a relay's
# ratio to HAProxy can be. It drops what a short write leaves, so it sits out iperf3.
#
# - A hung upstream: two upstreams (edgepoll echo, core 1), one stopped with
#   `kill -STOP` (its kernel still accepts connections; it never answers). Under
#   `edgeload -c 20 -d 10s --reconnect --timeout 1s` through the relay (core 1):
#   requests answered and timeouts, for edgepoll with passive failover only, edgepoll
#   with --health-check send-expect, and HAProxy with `option tcp-check` and
#   `tcp-check send/expect`, both `inter 500 fall 2 rise 2`. The upstream is stopped
#   1 s after the relay starts, and the load begins 2 s later (after fall x interval
#   plus the probe timeout), so the table shows the relay that has found it.
#
#   bash benches/relay_vs_haproxy.sh          # RUNS=5 REQUESTS=200000 SECONDS_IPERF=5
#   SECTIONS=hung bash benches/relay_vs_haproxy.sh   # the hung-upstream table only
source "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."
source benches/peers/haproxy.sh
RUNS=${RUNS:-5}
SECTIONS=${SECTIONS:-"throughput hung"}
REQUESTS=${REQUESTS:-200000}
SECONDS_IPERF=${SECONDS_IPERF:-5}
for tool in haproxy redis-server redis-benchmark iperf3; do
    command -v "$tool" >/dev/null ||
        { echo "needs $tool: apt-get install -y haproxy redis-server redis-tools iperf3" >&2; exit 1; }
done

# start_relay KIND UPSTREAM_PORT: starts a relay on core 0; sets RELAY_PID (the
# process doing the work) and RELAY_PORT. KIND: edgepoll, edgepoll-splice, haproxy,
# floor, direct (no relay: RELAY_PORT is the upstream's).
start_relay() {
    local kind=$1 up=$2
    RELAY_PID=""
    case $kind in
        direct) RELAY_PORT=$up ;;
        edgepoll | edgepoll-splice)
            local extra=()
            [[ $kind == edgepoll-splice ]] && extra=(--splice)
            start_edgepoll relay --listen 127.0.0.1:0 --workers 1 --metrics-listen off \
                --upstream "127.0.0.1:$up" "${extra[@]}"
            RELAY_PID=$EP_PID
            RELAY_PORT=${EP_ADDR##*:}
            ;;
        floor)
            start_peer "$FLOOR" 127.0.0.1:0 --relay "127.0.0.1:$up"
            RELAY_PID=$EP_PID
            RELAY_PORT=${EP_ADDR##*:}
            ;;
        haproxy)
            RELAY_PORT=$(free_port)
            haproxy_conf "$WORK/haproxy.cfg" "$RELAY_PORT" "$up"
            taskset -c 0 haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
            RELAY_PID=$!
            BG_PIDS+=("$RELAY_PID")
            local i
            for i in $(seq 100); do
                (exec 3<>"/dev/tcp/127.0.0.1/$RELAY_PORT") 2>/dev/null && return
                sleep 0.05
            done
            # redis-benchmark retries a refused connection for ever: stop here instead.
            cat "$WORK/haproxy.log" >&2
            exit 1
            ;;
    esac
}

stop_relay() { [[ -n $RELAY_PID ]] && stop_pid "$RELAY_PID"; RELAY_PID=""; }

relay_cpu() { if [[ -n $RELAY_PID ]]; then cpu_seconds "$RELAY_PID"; else echo 0; fi; }

# redis_run KIND: prints "requests/s cpu_ns_per_request get_p50_us get_p99_us
# load_cpu_ns_per_request".
redis_run() {
    start_relay "$1" "$REDIS_PORT"
    local before after redis_before redis_after TIMEFORMAT='%U %S'
    before=$(relay_cpu)
    redis_before=$(cpu_seconds "$REDIS_PID")
    # A bound, since redis-benchmark retries a lost connection for ever.
    { time timeout 300 taskset -c 1 redis-benchmark -h 127.0.0.1 -p "$RELAY_PORT" -c 50 \
        -n "$REQUESTS" -t get,set --csv >"$WORK/redis.csv" 2>"$WORK/redis.err"; } \
        2>"$WORK/redis.time" || { echo "redis-benchmark failed or ran past 300 s" >&2; exit 1; }
    after=$(relay_cpu)
    redis_after=$(cpu_seconds "$REDIS_PID")
    stop_relay
    if grep -qi error "$WORK/redis.csv" "$WORK/redis.err"; then cat "$WORK/redis.err" >&2; exit 1; fi
    # Two tests of REQUESTS each; their rates are averaged as a harmonic mean. Columns:
    # "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms",
    # "p99_latency_ms","max_latency_ms"; the latency reported is GET's.
    # bash's `time` prints the benchmark's user and system seconds.
    local load
    load=$(awk -v rb="$redis_before" -v ra="$redis_after" '{ print $1 + $2 + ra - rb }' "$WORK/redis.time")
    awk -F'"' -v b="$before" -v a="$after" -v n="$REQUESTS" -v load="$load" '
        NR > 1 { t += n / $4; k++ }
        $2 == "GET" { p50 = $10 * 1000; p99 = $14 * 1000 }
        END { printf "%.0f %.1f %.0f %.0f %.1f\n", k * n / t, (a - b) / (k * n) * 1e9, p50, p99, load / (k * n) * 1e9 }' "$WORK/redis.csv"
}

# iperf_run KIND: prints "gbit_per_s cpu_s_per_GB".
iperf_run() {
    start_relay "$1" "$IPERF_PORT"
    local before after
    before=$(relay_cpu)
    taskset -c 1 iperf3 --client 127.0.0.1 --port "$RELAY_PORT" --time "$SECONDS_IPERF" --json \
        >"$WORK/iperf.json"
    after=$(relay_cpu)
    stop_relay
    python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
s = r["end"]["sum_received"]
gb = s["bytes"] / 1e9
print("%.2f %.3f" % (s["bits_per_second"] / 1e9, (float(sys.argv[3]) - float(sys.argv[2])) / gb))
' "$WORK/iperf.json" "$before" "$after"
}

throughput() {
    REDIS_PORT=$(free_port)
    taskset -c 1 redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
        >"$WORK/redis.log" 2>&1 &
    REDIS_PID=$!
    BG_PIDS+=("$REDIS_PID")
    IPERF_PORT=$(free_port)
    taskset -c 1 iperf3 --server --bind 127.0.0.1 --port "$IPERF_PORT" >"$WORK/iperf-server.log" 2>&1 &
    BG_PIDS+=("$!")
    sleep 0.5

    KINDS=(edgepoll edgepoll-splice haproxy floor direct)
    FLOOR=$(peer_bin floor)

    declare -A rps cpu gbit cpugb p50 p99 load
    for run in $(seq "$RUNS"); do
        for kind in "${KINDS[@]}"; do
            read -r r c l50 l99 lc < <(redis_run "$kind")
            rps[$kind]+="$r "; cpu[$kind]+="$c "; p50[$kind]+="$l50 "; p99[$kind]+="$l99 "
            load[$kind]+="$lc "
            echo "run $run $kind: redis $r req/s $c ns/req, load core $lc ns/req" >&2
            [[ $kind == floor ]] && continue
            read -r g cg < <(iperf_run "$kind")
            gbit[$kind]+="$g "; cpugb[$kind]+="$cg "
            echo "run $run $kind: iperf3 $g Gbit/s $cg CPU s/GB" >&2
        done
    done

    # row KIND FORMAT VALUES COSTS [EXTRA...]: one table row of medians for KIND, with its
    # value and cost as ratios to HAProxy's; the direct path has no relay, so no cost.
    # VALUES and COSTS name the associative arrays holding the runs.
    row() {
        local kind=$1 fmt=$2 extra="" x
        for x in "${@:5}"; do extra+=" $x |"; done
        local -n values=$3 costs=$4
        local v c
        v=$(m "${values[$kind]}")
        if [[ $kind == direct ]]; then
            printf "| direct (no relay) | $fmt | - | %s | - |%s\n" "$v" "$(ratio "$v" "$(m "${values[haproxy]}")")" "$extra"
        else
            c=$(m "${costs[$kind]}")
            printf "| %s | $fmt | $fmt | %s | %s |%s\n" "$kind" "$v" "$c" \
                "$(ratio "$v" "$(m "${values[haproxy]}")")" "$(ratio "$c" "$(m "${costs[haproxy]}")")" "$extra"
        fi
    }

echo
    echo "### redis-benchmark (-c 50, GET and SET, pipeline 1)"
    echo
    echo "| path | requests/s (median) | relay CPU ns per request (median) | requests/s vs HAProxy | CPU per request vs HAProxy | GET p50 / p99 µs (median) | load core CPU ns per request (median) |"
    echo "|---|---|---|---|---|---|---|"
    for kind in "${KINDS[@]}"; do
        row "$kind" %.0f rps cpu "$(m "${p50[$kind]}") / $(m "${p99[$kind]}")" "$(printf %.0f "$(m "${load[$kind]}")")"
    done
    echo
    echo "### iperf3 (one stream, ${SECONDS_IPERF} s, client to server)"
    echo
    echo "| path | Gbit/s (median) | relay CPU s per GB (median) | throughput vs HAProxy | CPU per GB vs HAProxy |"
    echo "|---|---|---|---|---|"
    for kind in "${KINDS[@]}"; do
        [[ $kind == floor ]] || row "$kind" %s gbit cpugb
    done
}

# hung_run KIND: prints "requests timeouts" of one edgeload run through relay KIND
# (edgepoll, edgepoll-checks, haproxy-checks) in front of two echo upstreams, one
# stopped.
hung_run() {
    local kind=$1 ports=() pids=() i
    # Each run leaves some 100,000 connections in TIME_WAIT, which slows the next
    # run's connects; let them age out first (at most 60 s), so the order of the
    # contenders does not decide the result.
    for i in $(seq 60); do
        (($(ss -tan state time-wait | wc -l) < 10000)) && break
        sleep 1
    done
    for i in 0 1; do
        RUST_LOG=info taskset -c 1 "$BIN_DIR/edgepoll" echo --listen 127.0.0.1:0 --workers 1 \
            --metrics-listen off >"$WORK/up$i.log" 2>&1 &
        pids+=("$!")
        BG_PIDS+=("$!")
    done
    for i in 0 1; do
        await_line "$WORK/up$i.log" ' listening on '
        ports+=("$(sed -nE 's/.* listening on [^ ,]+:([0-9]+).*/\1/p' "$WORK/up$i.log")")
    done
    local checks=(--health-check send-expect --health-check-send 'PING\n'
        --health-check-expect 'PING' --health-check-interval 500ms
        --health-check-timeout 500ms --fall 2 --rise 2)
    case $kind in
        edgepoll | edgepoll-checks)
            local extra=()
            [[ $kind == edgepoll-checks ]] && extra=("${checks[@]}")
            start_edgepoll relay --listen 127.0.0.1:0 --workers 1 --metrics-listen off \
                --upstream "127.0.0.1:${ports[0]}" --upstream "127.0.0.1:${ports[1]}" "${extra[@]}"
            RELAY_PID=$EP_PID
            RELAY_PORT=${EP_ADDR##*:}
            ;;
        haproxy-checks)
            RELAY_PORT=$(free_port)
            haproxy_checked_conf "$WORK/haproxy.cfg" "$RELAY_PORT" "${ports[@]}"
            taskset -c 0 haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
            RELAY_PID=$!
            BG_PIDS+=("$RELAY_PID")
            ;;
    esac
    sleep 1
    kill -STOP "${pids[1]}"
    sleep 2
    taskset -c 1 "$BIN_DIR/edgeload" --json -c 20 -d 10s --reconnect --timeout 1s \
        "tcp://127.0.0.1:$RELAY_PORT" >"$WORK/hung.json" || true
    stop_relay
    kill -CONT "${pids[1]}"
    for i in 0 1; do stop_pid "${pids[$i]}"; done
    python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
print(r["requests"], r["errors"]["timeout"])
' "$WORK/hung.json"
}

hung() {
    local kinds=(edgepoll edgepoll-checks haproxy-checks) kind run r t
    declare -A reqs touts
    for run in $(seq "$RUNS"); do
        for kind in "${kinds[@]}"; do
            read -r r t < <(hung_run "$kind")
            reqs[$kind]+="$r "; touts[$kind]+="$t "
            echo "run $run $kind: hung upstream: $r requests, $t timeouts" >&2
        done
    done
    echo
    echo "### A hung upstream (kill -STOP), edgeload -c 20 -d 10s --reconnect --timeout 1s"
    echo
    echo "| relay | requests in 10 s (median) | timeouts (median) | requests vs HAProxy |"
    echo "|---|---|---|---|"
    local label
    for kind in "${kinds[@]}"; do
        case $kind in
            edgepoll) label="edgepoll relay (passive failover only)" ;;
            edgepoll-checks) label="edgepoll relay, --health-check send-expect, interval 500ms, fall 2, rise 2" ;;
            haproxy-checks) label="HAProxy, option tcp-check, send/expect, inter 500 fall 2 rise 2" ;;
        esac
        printf "| %s | %.0f | %.0f | %s |\n" "$label" "$(m "${reqs[$kind]}")" "$(m "${touts[$kind]}")" \
            "$(ratio "$(m "${reqs[$kind]}")" "$(m "${reqs[haproxy-checks]}")")"
    done
}

m() { median $1; }

echo "Machine: $(machine). Relay on core 0; upstream and load on core 1. $RUNS runs each, alternating. $(haproxy -v | head -1 | cut -d' ' -f1-3), redis $(redis-server --version | sed -E 's/.*v=([^ ]+).*/\1/'), iperf $(iperf3 --version | head -1 | cut -d' ' -f2)."
for section in $SECTIONS; do
    "$section"
done

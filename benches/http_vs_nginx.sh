#!/usr/bin/env bash
# edgepoll http against nginx: Debian's nginx-light, one worker, `return 200`, access
# log off; edgepoll with one worker. Each server pinned to core 0, wrk to core 1, the
# same wrk load: keep-alive, and pipelined 16 (a Lua script). Alternates the servers
# run by run; reports median requests/s and median server CPU time per request (from
# /proc/PID/stat of the process doing the work), and the ratios. The floor
# (benches/peers/floor.rs --http: one epoll loop, no parsing, a fixed answer per
# request head) runs beside them: its CPU per request is what the kernel costs any
# epoll server under the same load, and so the least a server's ratio to nginx can be.
#
#   bash benches/http_vs_nginx.sh             # RUNS=5 DURATION=5s CONNS=50
source "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."
source benches/peers/nginx.sh
RUNS=${RUNS:-5}
DURATION=${DURATION:-5s}
CONNS=${CONNS:-50}
command -v nginx >/dev/null && command -v wrk >/dev/null ||
    { echo "needs nginx-light and wrk: apt-get install -y nginx-light wrk" >&2; exit 1; }

# run_wrk URL PID LOAD: prints "requests/s cpu_ns_per_request p50_us p99_us" for one
# wrk run.
run_wrk() {
    local url=$1 pid=$2 load=$3 script=()
    [[ $load == pipelined16 ]] && script=(-s tests/e2e/pipeline16.lua)
    local before after
    before=$(cpu_seconds "$pid")
    taskset -c 1 wrk -t1 -c"$CONNS" -d"$DURATION" --latency "${script[@]}" "$url" >"$WORK/wrk.txt"
    after=$(cpu_seconds "$pid")
    if grep -qE 'Socket errors|Non-2xx' "$WORK/wrk.txt"; then
        cat "$WORK/wrk.txt" >&2
        exit 1
    fi
    local reqs rps
    reqs=$(awk '/requests in/ { print $1 }' "$WORK/wrk.txt")
    rps=$(awk '/Requests\/sec/ { print $2 }' "$WORK/wrk.txt")
    # wrk --latency prints "50%  245.00us" ... "99%    1.20ms": convert to µs.
    local p50 p99
    p50=$(awk '$1 == "50%" { print $2 }' "$WORK/wrk.txt" | to_us)
    p99=$(awk '$1 == "99%" { print $2 }' "$WORK/wrk.txt" | to_us)
    awk -v b="$before" -v a="$after" -v r="$reqs" -v rps="$rps" -v p50="$p50" -v p99="$p99" \
        'BEGIN { printf "%.0f %.1f %s %s\n", rps, (a - b) / r * 1e9, p50, p99 }'
}

# to_us: a wrk duration on stdin (245.00us, 1.20ms, 2.00s) in microseconds.
to_us() {
    awk '{ v = $1 + 0; if ($1 ~ /ms$/) v *= 1000; else if ($1 ~ /[0-9]s$/) v *= 1000000; printf "%.0f", v }'
}

FLOOR=$(peer_bin floor)

one_run() { # SERVER LOAD
    local server=$1 load=$2 pid url
    if [[ $server == edgepoll ]]; then
        start_edgepoll http --listen 127.0.0.1:0 --workers 1 --metrics-listen off
        pid=$EP_PID
        url="http://$EP_ADDR/"
    elif [[ $server == floor ]]; then
        start_peer "$FLOOR" 127.0.0.1:0 --http
        pid=$EP_PID
        url="http://$EP_ADDR/"
    else
        local port
        port=$(free_port)
        nginx_conf "$WORK" "$port"
        taskset -c 0 nginx -c "$WORK/nginx.conf" -p "$WORK" &
        EP_PID=$!
        sleep 0.5
        # The worker process does the work; the master only waits.
        pid=$(pgrep -P "$EP_PID" | head -1)
        url="http://127.0.0.1:$port/"
    fi
    run_wrk "$url" "$pid" "$load"
    stop_pid "$EP_PID"
}

echo "Machine: $(machine). Server on core 0, wrk 4.1 on core 1, $CONNS connections, 1 wrk thread, $DURATION x $RUNS runs each, alternating."
for load in keepalive pipelined16; do
    declare -a e_rps=() e_cpu=() n_rps=() n_cpu=() e_p50=() e_p99=() n_p50=() n_p99=()
    declare -a f_rps=() f_cpu=() f_p50=() f_p99=()
    for run in $(seq "$RUNS"); do
        read -r rps cpu p50 p99 < <(one_run edgepoll "$load")
        e_rps+=("$rps"); e_cpu+=("$cpu"); e_p50+=("$p50"); e_p99+=("$p99")
        read -r rps cpu p50 p99 < <(one_run nginx "$load")
        n_rps+=("$rps"); n_cpu+=("$cpu"); n_p50+=("$p50"); n_p99+=("$p99")
        read -r rps cpu p50 p99 < <(one_run floor "$load")
        f_rps+=("$rps"); f_cpu+=("$cpu"); f_p50+=("$p50"); f_p99+=("$p99")
        echo "$load run $run: edgepoll ${e_rps[-1]} req/s ${e_cpu[-1]} ns/req; nginx ${n_rps[-1]} req/s ${n_cpu[-1]} ns/req; floor ${f_rps[-1]} req/s ${f_cpu[-1]} ns/req" >&2
    done
    me_rps=$(median "${e_rps[@]}"); mn_rps=$(median "${n_rps[@]}")
    me_cpu=$(median "${e_cpu[@]}"); mn_cpu=$(median "${n_cpu[@]}")
    mf_rps=$(median "${f_rps[@]}"); mf_cpu=$(median "${f_cpu[@]}")
    echo
    echo "### $load"
    echo
    echo "| server | requests/s (median) | server CPU ns per request (median) | p50 latency µs (median) | p99 latency µs (median) |"
    echo "|---|---|---|---|---|"
    # wrk times a pipelined batch as one request (its percentiles past the first come
    # out as 0): latency is reported for keep-alive only.
    if [[ $load == pipelined16 ]]; then
        e_lat="- | -"; n_lat="- | -"; f_lat="- | -"
    else
        e_lat="$(median "${e_p50[@]}") | $(median "${e_p99[@]}")"
        n_lat="$(median "${n_p50[@]}") | $(median "${n_p99[@]}")"
        f_lat="$(median "${f_p50[@]}") | $(median "${f_p99[@]}")"
    fi
    printf '| edgepoll http | %.0f | %.0f | %s |\n' "$me_rps" "$me_cpu" "$e_lat"
    printf '| nginx 1.22 | %.0f | %.0f | %s |\n' "$mn_rps" "$mn_cpu" "$n_lat"
    printf '| floor | %.0f | %.0f | %s |\n' "$mf_rps" "$mf_cpu" "$f_lat"
    echo "| edgepoll / nginx | $(ratio "$me_rps" "$mn_rps") | $(ratio "$me_cpu" "$mn_cpu") | | |"
    echo "| floor / nginx | $(ratio "$mf_rps" "$mn_rps") | $(ratio "$mf_cpu" "$mn_cpu") | | |"
    echo "| edgepoll / floor | $(ratio "$me_rps" "$mf_rps") | $(ratio "$me_cpu" "$mf_cpu") | | |"
done

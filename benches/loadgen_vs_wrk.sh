#!/usr/bin/env bash
# edgeload against wrk, both driving the same nginx (Debian's nginx-light, one worker,
# `return 200`, access log off) pinned to core 0, with the load generator on core 1.
# Alternates the two, RUNS times each; reports median requests/s and median CPU time
# per request of the load generator itself (user + system, from bash's `time`).
#
#   bash benches/loadgen_vs_wrk.sh            # RUNS=5 DURATION=5s CONNS=50
source "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
DURATION=${DURATION:-5s}
CONNS=${CONNS:-50}
command -v nginx >/dev/null && command -v wrk >/dev/null ||
    { echo "needs nginx-light and wrk: apt-get install -y nginx-light wrk" >&2; exit 1; }

port=$(free_port)
source benches/peers/nginx.sh
nginx_conf "$WORK" "$port"
taskset -c 0 nginx -c "$WORK/nginx.conf" -p "$WORK" &
BG_PIDS+=("$!")
sleep 0.5
url="http://127.0.0.1:$port/"

TIMEFORMAT='%U %S'
declare -a wrk_rps wrk_cpu ep_rps ep_cpu
for run in $(seq "$RUNS"); do
    { time taskset -c 1 wrk -t1 -c"$CONNS" -d"$DURATION" "$url" >"$WORK/wrk.txt"; } 2>"$WORK/wrk.time"
    rps=$(awk '/Requests\/sec/ { print $2 }' "$WORK/wrk.txt")
    reqs=$(awk '/requests in/ { print $1 }' "$WORK/wrk.txt")
    cpu=$(awk '{ print $1 + $2 }' "$WORK/wrk.time")
    wrk_rps+=("$rps")
    wrk_cpu+=("$(awk -v c="$cpu" -v r="$reqs" 'BEGIN { printf "%.4f", c / r * 1e6 }')")

    { time taskset -c 1 "$BIN_DIR/edgeload" -t1 -c"$CONNS" -d"$DURATION" --json "$url" >"$WORK/el.json"; } 2>"$WORK/el.time"
    rps=$(json_field "$WORK/el.json" requests_per_sec)
    reqs=$(json_field "$WORK/el.json" requests)
    cpu=$(awk '{ print $1 + $2 }' "$WORK/el.time")
    ep_rps+=("$rps")
    ep_cpu+=("$(awk -v c="$cpu" -v r="$reqs" 'BEGIN { printf "%.4f", c / r * 1e6 }')")
    echo "run $run: wrk ${wrk_rps[-1]} req/s ${wrk_cpu[-1]} us CPU/req; edgeload ${ep_rps[-1]} req/s ${ep_cpu[-1]} us CPU/req" >&2
done

m_wrk_rps=$(median "${wrk_rps[@]}")
m_ep_rps=$(median "${ep_rps[@]}")
m_wrk_cpu=$(median "${wrk_cpu[@]}")
m_ep_cpu=$(median "${ep_cpu[@]}")
echo
echo "Machine: $(machine). nginx on core 0, load on core 1, $CONNS connections, 1 thread, $DURATION x $RUNS runs each, alternating."
echo
echo "| load generator | requests/s (median) | CPU µs per request (median) |"
echo "|---|---|---|"
printf '| wrk 4.1 | %.0f | %.2f |\n' "$m_wrk_rps" "$m_wrk_cpu"
printf '| edgeload | %.0f | %.2f |\n' "$m_ep_rps" "$m_ep_cpu"
echo "| edgeload / wrk | $(ratio "$m_ep_rps" "$m_wrk_rps") | $(ratio "$m_ep_cpu" "$m_wrk_cpu") |"

#!/usr/bin/env bash
# edgeload against wrk and oha, all three driving the same edgepoll http target (the
# release build, `edgepoll http`, one worker) pinned to core 0, with the load generator
# on core 1: 50 keep-alive connections, one client thread. The generators alternate
# run by run, RUNS times each; reports the median requests/s and the median client CPU
# time per request (user + system of the load generator's process, all its threads,
# from bash's `time`), and each one's ratio to wrk.
#
# oha is optional (skipped with a message if missing): `cargo install oha --locked`.
# It runs on tokio; `--worker-threads 1` makes its runtime one worker thread (its
# default is one per physical core), as wrk and edgeload run one thread.
#
#   bash benches/loadgen_vs_wrk.sh            # RUNS=5 DURATION=5s CONNS=50
source "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
DURATION=${DURATION:-5s}
CONNS=${CONNS:-50}
command -v wrk >/dev/null || { echo "needs wrk: apt-get install -y wrk" >&2; exit 1; }
[[ -x $BIN_DIR/edgepoll && -x $BIN_DIR/edgeload ]] ||
    { echo "needs a release build: cargo build --release --bins" >&2; exit 1; }
OHA=$(command -v oha || true)
[[ -z $OHA && -x $HOME/.cargo/bin/oha ]] && OHA=$HOME/.cargo/bin/oha
if [[ -z $OHA ]]; then
    echo "oha not found: skipping it (install with: cargo install oha --locked)" >&2
fi
# The number of worker threads oha's tokio runtime starts.
OHA_THREADS=1

start_edgepoll http --listen 127.0.0.1:0 --workers 1 --metrics-listen off
url="http://$EP_ADDR/"

TIMEFORMAT='%U %S'
# per_request CPU_FILE REQUESTS: client CPU µs per request from bash's `time` output.
per_request() {
    awk -v r="$2" '{ printf "%.4f", ($1 + $2) / r * 1e6 }' "$1"
}

# one_run TOOL: prints "requests/s cpu_us_per_request". Any error fails the benchmark.
one_run() {
    local tool=$1 rps reqs
    case $tool in
        wrk)
            { time taskset -c 1 wrk -t1 -c"$CONNS" -d"$DURATION" "$url" >"$WORK/out"; } 2>"$WORK/time"
            if grep -qE 'Socket errors|Non-2xx' "$WORK/out"; then cat "$WORK/out" >&2; exit 1; fi
            rps=$(awk '/Requests\/sec/ { print $2 }' "$WORK/out")
            reqs=$(awk '/requests in/ { print $1 }' "$WORK/out")
            ;;
        edgeload)
            { time taskset -c 1 "$BIN_DIR/edgeload" -t1 -c"$CONNS" -d"$DURATION" --json "$url" >"$WORK/out"; } 2>"$WORK/time"
            grep -q '"total":0' "$WORK/out" || { cat "$WORK/out" >&2; exit 1; }
            rps=$(json_field "$WORK/out" requests_per_sec)
            reqs=$(json_field "$WORK/out" requests)
            ;;
        oha)
            { time taskset -c 1 "$OHA" -z "$DURATION" -c "$CONNS" --worker-threads "$OHA_THREADS" \
                --no-tui --output-format json "$url" >"$WORK/out"; } 2>"$WORK/time"
            read -r rps reqs < <(python3 - "$WORK/out" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
codes = r.get("statusCodeDistribution", {})
errors = r.get("errorDistribution", {})
ok = sum(n for c, n in codes.items() if c.startswith("2"))
# oha counts the requests cut off by the deadline as errors ("aborted due to
# deadline"); those are not failures, and are left out of the count.
bad = {e: n for e, n in errors.items() if "deadline" not in e}
if bad or ok != sum(codes.values()):
    sys.exit("oha errors: %s %s" % (codes, errors))
print(r["summary"]["requestsPerSec"], ok)
PY
            ) || exit 1
            ;;
    esac
    echo "$rps $(per_request "$WORK/time" "$reqs")"
}

tools=(wrk edgeload)
[[ -n $OHA ]] && tools+=(oha)
declare -A rps_of cpu_of
for tool in "${tools[@]}"; do rps_of[$tool]=""; cpu_of[$tool]=""; done
for run in $(seq "$RUNS"); do
    line="run $run:"
    for tool in "${tools[@]}"; do
        read -r rps cpu < <(one_run "$tool")
        rps_of[$tool]+=" $rps"
        cpu_of[$tool]+=" $cpu"
        line+=" $tool $rps req/s $cpu µs CPU/req;"
    done
    echo "$line" >&2
done

declare -A m_rps m_cpu
for tool in "${tools[@]}"; do
    # shellcheck disable=SC2086 # word splitting of the lists is intended
    m_rps[$tool]=$(median ${rps_of[$tool]})
    # shellcheck disable=SC2086
    m_cpu[$tool]=$(median ${cpu_of[$tool]})
done
echo
echo "Machine: $(machine). edgepoll http (one worker) on core 0, the load generator on core 1, $CONNS connections, 1 thread, $DURATION x $RUNS runs each, alternating."
[[ -n $OHA ]] && echo "oha runs with --worker-threads $OHA_THREADS (one tokio worker thread)."
echo
echo "| load generator | requests/s (median) | vs wrk | client CPU µs per request (median) | vs wrk |"
echo "|---|---|---|---|---|"
name_of() {
    case $1 in
        wrk) echo "wrk $(wrk -v 2>&1 | head -1 | sed -E 's/^wrk ([^ ]*).*/\1/; s#.*/##; s/-.*//')" ;;
        oha) echo "oha $($OHA --version | awk '{ print $2 }')" ;;
        *) echo "$1" ;;
    esac
}
for tool in "${tools[@]}"; do
    printf '| %s | %.0f | %s | %.2f | %s |\n' "$(name_of "$tool")" "${m_rps[$tool]}" \
        "$(ratio "${m_rps[$tool]}" "${m_rps[wrk]}")" "${m_cpu[$tool]}" \
        "$(ratio "${m_cpu[$tool]}" "${m_cpu[wrk]}")"
done

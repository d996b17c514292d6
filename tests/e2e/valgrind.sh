#!/usr/bin/env bash
# edgepoll under valgrind memcheck: short echo, http and relay runs (relay copying and
# spliced, in front of a native edgepoll echo) with edgeload, then SIGTERM. Any
# invalid read or write, or a definite leak, fails.
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/e2e/lib.sh

start_edgepoll upstream echo --listen 127.0.0.1:0 --metrics-listen off --workers 1
upstream=$EP_ADDR

for mode in echo http relay relay-splice; do
    echo "== valgrind: $mode under load, then SIGTERM"
    args=("${mode%-splice}")
    [[ $mode == relay* ]] && args+=(--upstream "$upstream")
    [[ $mode == *-splice ]] && args+=(--splice)
    RUST_LOG=info start_bg "vg-$mode" valgrind --error-exitcode=99 --leak-check=full \
        --errors-for-leak-kinds=definite --show-leak-kinds=definite \
        "$BIN_DIR/edgepoll" "${args[@]}" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --workers 2
    pid=$LAST_PID
    wait_for 60 "edgepoll under valgrind to start" grep -q ' listening on ' "$WORK/vg-$mode.log"
    addr=$(sed -nE 's/.* listening on ([^ ,]+).*/\1/p' "$WORK/vg-$mode.log")
    metrics=$(sed -nE 's#.*metrics on http://([^/]+)/metrics.*#\1#p' "$WORK/vg-$mode.log")
    if [[ $mode == http ]]; then url="http://$addr/"; else url="tcp://$addr"; fi
    "$BIN_DIR/edgeload" -c 8 -d 3s --depth 4 --json "$url" >"$WORK/vg-load.json"
    grep -q '"total":0' "$WORK/vg-load.json" || { cat "$WORK/vg-load.json"; fail "load errors under valgrind"; }
    curl -sf "http://$metrics/metrics" >/dev/null || fail "scrape under valgrind"
    requests=$(grep -o '"requests":[0-9]*' "$WORK/vg-load.json" | cut -d: -f2)
    status=0
    kill -TERM "$pid"
    wait "$pid" || status=$?
    if [[ $status -ne 0 ]]; then
        grep -E '==[0-9]+==' "$WORK/vg-$mode.log" | tail -40
        fail "valgrind reported errors or leaks in $mode (exit $status)"
    fi
    summary=$(grep -E 'ERROR SUMMARY' "$WORK/vg-$mode.log" | tail -1 | sed -E 's/==[0-9]+== //')
    leaks=$(grep -E 'definitely lost' "$WORK/vg-$mode.log" | tail -1 | sed -E 's/==[0-9]+== +//')
    log "$mode: $requests requests under memcheck; $summary; ${leaks:-definitely lost: 0 bytes}"
done
echo "valgrind: ok"

#!/usr/bin/env bash
# Two builds of edgepoll side by side: the guard that a change costs the hot path
# nothing (DESIGN.md: no regression past 1.05x). Each mode runs with one worker on
# core 0 under edgeload on core 1, the two builds alternating run by run; reports the
# median server CPU per message or request (/proc/PID/stat) and the ratio new/old.
#
# - echo: 50 connections of 64-byte messages, depth 1 and depth 16;
# - http: 50 keep-alive connections, depth 1 and 16 (pipelined);
# - relay: 50 connections of 64-byte messages through the relay to the floor echo
#   peer (on core 1 with the load), depth 1; the relay's own CPU is measured.
#
# With INSTRUCTIONS=1 it also counts each build's user-space instructions per
# request under callgrind (SHORT and LONG runs, the difference cancels start-up): a
# count that does not depend on what else the machine is doing.
#
#   git worktree add /tmp/old <commit> && (cd /tmp/old && cargo build --release --bins)
#   OLD_BIN=/tmp/old/target/release bash benches/before_after.sh   # RUNS=5 DURATION=5s
#   CASES="relay-1" INSTRUCTIONS=1 OLD_BIN=... bash benches/before_after.sh
source "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
DURATION=${DURATION:-5s}
OLD_BIN=${OLD_BIN:?set OLD_BIN to the target/release folder of the build to compare with}
NEW_BIN=${NEW_BIN:-target/release}
[[ -x $OLD_BIN/edgepoll && -x $NEW_BIN/edgepoll ]] || { echo "no edgepoll in $OLD_BIN or $NEW_BIN" >&2; exit 1; }

FLOOR=$(peer_bin floor)
[[ -x $FLOOR ]] || { echo "could not build the floor peer" >&2; exit 1; }
# The upstream of the relay runs, with the load, on core 1 for every run.
taskset -c 1 "$FLOOR" 127.0.0.1:0 >"$WORK/floor.log" 2>&1 &
BG_PIDS+=("$!")
await_line "$WORK/floor.log" 'listening on'
UPSTREAM=$(sed -nE 's/.*listening on ([^ ]+).*/\1/p' "$WORK/floor.log")

# server_args CASE: the edgepoll command line of a case.
server_args() {
    case $1 in
        echo-*) echo "echo --listen 127.0.0.1:0 --workers 1 --metrics-listen off" ;;
        http-*) echo "http --listen 127.0.0.1:0 --workers 1 --metrics-listen off" ;;
        relay-*) echo "relay --listen 127.0.0.1:0 --workers 1 --metrics-listen off --upstream $UPSTREAM" ;;
    esac
}

# instructions BUILD_DIR CASE DURATION: prints "requests instructions" of one run of
# the case under callgrind.
instructions() {
    local depth=${2##*-} addr url i
    # shellcheck disable=SC2046
    taskset -c 0 valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.out" \
        "$1/edgepoll" $(server_args "$2") >"$WORK/cg.log" 2>&1 &
    local pid=$!
    for i in $(seq 300); do
        addr=$(sed -nE 's/.* listening on ([^ ,]+).*/\1/p' "$WORK/cg.log" | head -1)
        [[ -n $addr ]] && break
        sleep 0.1
    done
    case $2 in
        http-*) url=http://$addr/ ;;
        *) url=tcp://$addr ;;
    esac
    taskset -c 1 "$BIN_DIR/edgeload" --json -t1 -c50 --depth "$depth" -d"$3" "$url" >"$WORK/cg.json"
    kill -TERM "$pid"
    wait "$pid" || true
    echo "$(json_field "$WORK/cg.json" requests) $(awk '/^(summary|totals):/ { print $2; exit }' "$WORK/cg.out")"
}

one_run() { # BUILD_DIR CASE: prints "rps cpu_ns p50 p99"
    local bin=$1 case=$2
    # shellcheck disable=SC2046
    BIN_DIR=$bin start_edgepoll $(server_args "$case")
    local depth=${case##*-} url
    case $case in
        http-*) url=http://$EP_ADDR/ ;;
        *) url=tcp://$EP_ADDR ;;
    esac
    load_cost "$EP_PID" -t1 -c50 --depth "$depth" -d"$DURATION" "$url"
    stop_pid "$EP_PID"
}

echo "Machine: $(machine). edgepoll (1 worker) on core 0, edgeload on core 1, 50 connections, $DURATION x $RUNS runs per build, alternating."
echo "old: $OLD_BIN/edgepoll; new: $NEW_BIN/edgepoll"
echo
echo "| case | old CPU ns (median) | new CPU ns (median) | new / old | old req/s | new req/s |"
echo "|---|---|---|---|---|---|"
for case in ${CASES:-echo-1 echo-16 http-1 http-16 relay-1}; do
    old_cpu=() new_cpu=() old_rps=() new_rps=()
    for run in $(seq "$RUNS"); do
        # Command substitution, not a pipe or <(...): the run, its server's exit
        # included, is over before the next one starts.
        res=$(one_run "$OLD_BIN" "$case")
        read -r rps cpu _ _ <<<"$res"
        old_cpu+=("$cpu") old_rps+=("$rps")
        res=$(one_run "$NEW_BIN" "$case")
        read -r rps2 cpu2 _ _ <<<"$res"
        new_cpu+=("$cpu2") new_rps+=("$rps2")
        echo "$case run $run: old $cpu ns, new $cpu2 ns" >&2
    done
    mo=$(median "${old_cpu[@]}")
    mn=$(median "${new_cpu[@]}")
    printf '| %s | %.0f | %.0f | %s | %.0f | %.0f |\n' "$case" "$mo" "$mn" "$(ratio "$mn" "$mo")" \
        "$(median "${old_rps[@]}")" "$(median "${new_rps[@]}")"
done

if [[ ${INSTRUCTIONS:-0} == 1 ]]; then
    command -v valgrind >/dev/null || { echo "INSTRUCTIONS=1 needs valgrind" >&2; exit 1; }
    echo
    echo "User-space instructions per request (callgrind; (long - short) runs of ${SHORT:-1s} and ${LONG:-4s}):"
    echo
    echo "| case | old | new | new / old |"
    echo "|---|---|---|---|"
    for case in ${CASES:-echo-1 echo-16 http-1 http-16 relay-1}; do
        per=()
        for bin in "$OLD_BIN" "$NEW_BIN"; do
            read -r r1 i1 <<<"$(instructions "$bin" "$case" "${SHORT:-1s}")"
            read -r r2 i2 <<<"$(instructions "$bin" "$case" "${LONG:-4s}")"
            per+=("$(awk -v a="$i1" -v b="$i2" -v x="$r1" -v y="$r2" 'BEGIN { printf "%.0f", (b - a) / (y - x) }')")
        done
        printf '| %s | %s | %s | %s |\n' "$case" "${per[0]}" "${per[1]}" "$(ratio "${per[1]}" "${per[0]}")"
    done
fi

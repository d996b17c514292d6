#!/usr/bin/env bash
# User-space instructions per echoed message for edgepoll, the tokio echo peer and the
# floor loop, counted by valgrind's callgrind: a steadier comparison than CPU time on a
# shared machine (the count does not depend on what else the machine is doing), of
# the part each server controls. The kernel's share (the system calls, the same for all
# three) is not counted.
#
# Each server runs under callgrind twice, with edgeload driving it for a short and a
# long time; (instructions of the long run - those of the short run) / (messages of
# the long run - those of the short run) cancels start-up and shutdown.
#
#   bash benches/echo_instructions.sh         # SHORT=1s LONG=4s
source "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."
SHORT=${SHORT:-1s}
LONG=${LONG:-4s}
command -v valgrind >/dev/null || { echo "needs valgrind: apt-get install -y valgrind" >&2; exit 1; }

TOKIO=$(peer_bin tokio_echo)
FLOOR=$(peer_bin floor_echo)
[[ -x $TOKIO && -x $FLOOR ]] || { echo "could not build the peers" >&2; exit 1; }

# one_run SERVER DEPTH DURATION: prints "instructions messages".
one_run() {
    local server=$1 depth=$2 duration=$3 out=$WORK/callgrind.out cmd=()
    case $server in
        edgepoll) cmd=("$BIN_DIR/edgepoll" echo --listen 127.0.0.1:0 --workers 1 --metrics-listen off) ;;
        tokio) cmd=("$TOKIO" 127.0.0.1:0 1) ;;
        floor) cmd=("$FLOOR" 127.0.0.1:0) ;;
    esac
    rm -f "$out"
    RUST_LOG=info taskset -c 0 valgrind --tool=callgrind --callgrind-out-file="$out" \
        "${cmd[@]}" >"$WORK/vg.log" 2>&1 &
    local pid=$! i addr=""
    BG_PIDS+=("$pid")
    for i in $(seq 200); do
        addr=$(sed -nE 's/.*listening on ([^ ,]+).*/\1/p' "$WORK/vg.log" | head -1)
        [[ -n $addr ]] && break
        sleep 0.1
    done
    [[ -n $addr ]] || { cat "$WORK/vg.log" >&2; exit 1; }
    taskset -c 1 "$BIN_DIR/edgeload" --json -t1 -c50 --depth "$depth" -d"$duration" "tcp://$addr" >"$WORK/load.json"
    grep -q '"total":0' "$WORK/load.json" || { cat "$WORK/load.json" >&2; exit 1; }
    kill -TERM "$pid"
    wait "$pid" 2>/dev/null || true
    local ir
    ir=$(awk '/^(summary|totals):/ { print $2; exit }' "$out")
    echo "$ir $(json_field "$WORK/load.json" requests)"
}

echo "Machine: $(machine). One worker each on core 0 under callgrind, edgeload on core 1, 50 connections, 64-byte messages; runs of $SHORT and $LONG, differenced."
echo
echo "| server | depth | instructions per message | vs edgepoll |"
echo "|---|---|---|---|"
for depth in 1 16; do
    declare -A per=()
    for server in edgepoll tokio floor; do
        read -r ir1 m1 < <(one_run "$server" "$depth" "$SHORT")
        read -r ir2 m2 < <(one_run "$server" "$depth" "$LONG")
        per[$server]=$(awk -v a="$ir1" -v b="$ir2" -v x="$m1" -v y="$m2" 'BEGIN { printf "%.0f", (b - a) / (y - x) }')
        echo "depth $depth $server: $ir1 Ir / $m1 msgs, $ir2 Ir / $m2 msgs" >&2
    done
    for server in edgepoll tokio floor; do
        echo "| $server | $depth | ${per[$server]} | $(ratio "${per[$server]}" "${per[edgepoll]}") |"
    done
done

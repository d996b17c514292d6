#!/usr/bin/env bash
# Reloads under load: edgepoll relay (SIGHUP: the successor takes the listeners and
# every established connection) beside HAProxy's master-worker reload (`reload` on
# the master CLI, listeners passed with `expose-fd listeners`: the new worker takes
# new connections, the old one keeps its established ones until they end). Both relay
# in tcp mode, one worker or thread pinned to core 0, to the same edgepoll echo
# backend; the backend and the load share core 1. The contenders alternate run by run.
#
# The load, for LOAD_S seconds: edgeload churning (20 slots, a new connection per
# 64-byte echo) and edgeload holding 50 long-lived streams, every byte verified. Every
# INTERVAL seconds, RELOADS reloads. Per reload:
# - ready: from the reload command until the new process serves (edgepoll: the old
#   process logs "pid N is serving"; HAProxy: the master logs "Loading success.").
# - done: until the new process serves and the old one has exited, at most CAP
#   seconds. The streams outlive the cap, so an old process that waits for its
#   connections to end is still alive at the cap, reported as ">= CAP".
# Client errors are both edgeloads' together. A stream cut and reopened would not
# always be an error (edgeload reopens a connection closed between two requests without
# counting one), so the streams' sockets are compared before the first reload and
# after the last: "replaced" counts those gone. Processes and resident memory are the
# peaks, sampled every 0.25 s, of the relay's processes together (HAProxy: master
# and workers).
#
#   bash benches/reload.sh                    # RUNS=2 RELOADS=5 INTERVAL=2 CAP=30
source "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."
source benches/peers/haproxy.sh
source benches/sighup.sh
RUNS=${RUNS:-2}
RELOADS=${RELOADS:-5}
INTERVAL=${INTERVAL:-2}
CAP=${CAP:-30}
# The streams last past the last reload's cap, so that no old process is let go by
# the clients leaving before the cap is reached.
LOAD_S=$((RELOADS * INTERVAL + CAP + 3))
for tool in haproxy python3; do
    command -v "$tool" >/dev/null || { echo "needs $tool: apt-get install -y haproxy python3" >&2; exit 1; }
done
# A successor is no child of this script: stop whichever still runs at exit.
trap 'kill_successors "$BIN_DIR/edgepoll" "$WORK"/relay-*.log; cleanup' EXIT

# master_cli COMMAND: sends COMMAND to HAProxy's master CLI and prints the answer. The
# master answers and closes once the client has shut its side down.
master_cli() {
    python3 - "$WORK/master.sock" "$1" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\n")
s.shutdown(socket.SHUT_WR)
out = b""
while True:
    d = s.recv(65536)
    if not d:
        break
    out += d
sys.stdout.write(out.decode())
PY
}

# relay_pids KIND: the relay's processes now (edgepoll: every process listening or
# handing over on RELAY_PORT; HAProxy: the master and its workers, old ones included).
relay_pids() {
    case $1 in
        edgepoll) pgrep -f "edgepoll relay --listen 127.0.0.1:$RELAY_PORT " || true ;;
        haproxy) echo "$RELAY_PID"; pgrep -P "$RELAY_PID" || true ;;
    esac
}

# sample KIND FILE: until killed, writes "peak_processes peak_rss_kib" of the relay
# into FILE every 0.25 s.
sample() {
    local kind=$1 file=$2 n rss pid kib max_n=0 max_rss=0
    while true; do
        n=0 rss=0
        for pid in $(relay_pids "$kind"); do
            gone "$pid" && continue
            kib=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null) || continue
            n=$((n + 1)) rss=$((rss + ${kib:-0}))
        done
        ((n <= max_n)) || max_n=$n
        ((rss <= max_rss)) || max_rss=$rss
        # Renamed into place, so that killing the sampler never leaves it empty.
        echo "$max_n $max_rss" >"$file.new"
        mv "$file.new" "$file"
        sleep 0.25
    done
}

# start_relay KIND: starts the relay on core 0 in front of the backend; sets RELAY_PID
# (edgepoll: the process serving; HAProxy: the master) and RELAY_LOG.
start_relay() {
    RELAY_PORT=$(free_port)
    RELAY_LOG=$WORK/relay-$1.log
    # Created here, not by the background redirection, which may come after the first
    # look at it.
    : >"$RELAY_LOG"
    case $1 in
        edgepoll)
            RUST_LOG=info taskset -c 0 "$BIN_DIR/edgepoll" relay --listen "127.0.0.1:$RELAY_PORT" \
                --workers 1 --metrics-listen off --upstream "127.0.0.1:$BACKEND_PORT" >"$RELAY_LOG" 2>&1 &
            RELAY_PID=$!
            BG_PIDS+=("$RELAY_PID")
            await_line "$RELAY_LOG" ' listening on '
            ;;
        haproxy)
            haproxy_conf "$WORK/haproxy.cfg" "$RELAY_PORT" "$BACKEND_PORT" \
                "stats socket $WORK/admin.sock mode 600 level admin expose-fd listeners"
            rm -f "$WORK/master.sock"
            taskset -c 0 haproxy -W -S "$WORK/master.sock" -f "$WORK/haproxy.cfg" >"$RELAY_LOG" 2>&1 &
            RELAY_PID=$!
            BG_PIDS+=("$RELAY_PID")
            await_line "$RELAY_LOG" 'Loading success'
            ;;
    esac
}

# stop_relay KIND: stops the relay and waits until every process of it has exited.
stop_relay() {
    case $1 in
        edgepoll) stop_reloaded "$RELAY_PID" ;;
        haproxy) stop_pid "$RELAY_PID" ;;
    esac
    local i
    for i in $(seq 200); do
        [[ -z $(relay_pids "$1") ]] && return
        sleep 0.05
    done
}

# watch_exit PID START_MS FILE READY_MS: in the background, waits until PID has exited
# or CAP seconds after START_MS have passed, then appends "READY_MS done_ms" to FILE
# (done_ms -1: alive at the cap) and PID.
watch_exit() {
    local pid=$1 start=$2 file=$3 ready=$4
    (
        while (($(now_ms) - start < CAP * 1000)); do
            if gone "$pid"; then
                echo "$ready $(($(now_ms) - start)) $pid" >>"$file"
                exit 0
            fi
            sleep 0.01
        done
        echo "$ready -1 $pid" >>"$file"
    ) &
    WATCHERS+=("$!")
}

# reload KIND FILE: one reload, timed into FILE.
reload() {
    local kind=$1 file=$2 start before old ready=-1
    case $kind in
        edgepoll)
            # Synchronous: the next SIGHUP must go to the successor.
            edgepoll_reload "$RELAY_LOG" "$RELAY_PID" "$CAP"
            echo "$READY_MS $RELOAD_MS" >>"$file"
            RELAY_PID=$NEXT_PID
            ;;
        haproxy)
            old=$(sed -nE 's/.*New worker \(([0-9]+)\) forked.*/\1/p' "$RELAY_LOG" | tail -1)
            before=$(count_lines "$RELAY_LOG" 'Loading success')
            start=$(now_ms)
            master_cli reload >/dev/null
            while (($(now_ms) - start < CAP * 1000)); do
                if (($(count_lines "$RELAY_LOG" 'Loading success') > before)); then
                    ready=$(($(now_ms) - start))
                    break
                fi
                sleep 0.005
            done
            watch_exit "$old" "$start" "$file" "$ready"
            ;;
    esac
}

# errors FILE: "connect read write timeout mismatch requests" from edgeload's JSON.
errors() {
    python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
e = r["errors"]
print(*(e[k] for k in ("connect", "read", "write", "timeout", "mismatch")), r["requests"])' "$1"
}

# one_run KIND: the load and the reloads; appends to $WORK/KIND.{reloads,errors,peaks,done,replaced}.
one_run() {
    local kind=$1 i next wait churn streams sampler status=0
    start_relay "$kind"
    WATCHERS=()
    sample "$kind" "$WORK/$kind.peak" &
    sampler=$!
    BG_PIDS+=("$sampler")
    taskset -c 1 "$BIN_DIR/edgeload" -c 20 --reconnect -d "${LOAD_S}s" --json \
        "tcp://127.0.0.1:$RELAY_PORT" >"$WORK/churn.json" &
    churn=$!
    taskset -c 1 "$BIN_DIR/edgeload" -c 50 -d "${LOAD_S}s" --json \
        "tcp://127.0.0.1:$RELAY_PORT" >"$WORK/streams.json" &
    streams=$!
    BG_PIDS+=("$churn" "$streams")
    local before
    for i in $(seq 100); do
        (($(socket_inodes "$streams" | wc -l) == 50)) && break
        sleep 0.05
    done
    before=$(socket_inodes "$streams")
    next=$(($(now_ms) + INTERVAL * 1000))
    for i in $(seq "$RELOADS"); do
        wait=$((next - $(now_ms)))
        ((wait <= 0)) || sleep "$((wait / 1000)).$(printf %03d $((wait % 1000)))"
        next=$((next + INTERVAL * 1000))
        reload "$kind" "$WORK/$kind.reloads"
    done
    # Taken before the load ends: a stream cut and reopened holds a new socket.
    replaced "$before" "$(socket_inodes "$streams")" >>"$WORK/$kind.replaced"
    wait "$churn" || status=$?
    wait "$streams" || status=$?
    ((status == 0)) || echo "$kind: an edgeload exited $status (1: an echoed byte differed)" >&2
    # Not a bare `wait`: that would wait for the backend too.
    ((${#WATCHERS[@]} == 0)) || wait "${WATCHERS[@]}"
    kill "$sampler"
    wait "$sampler" 2>/dev/null || true
    cat "$WORK/$kind.peak" >>"$WORK/$kind.peaks"
    stop_relay "$kind"
    # Read once the relay has stopped, so that every exit is in the log.
    local note
    case $kind in
        edgepoll)
            count_lines "$RELAY_LOG" 'reloaded: took over' >>"$WORK/$kind.done"
            note="connections moved per reload: $(sed -nE 's/.*with ([0-9]+) connections? moved.*/\1/p' "$RELAY_LOG" | tr '\n' ' ')"
            ;;
        haproxy)
            echo $(($(count_lines "$RELAY_LOG" 'Loading success') - 1)) >>"$WORK/$kind.done"
            # An old worker that did not exit cleanly, as the master reports it.
            grep -E 'Former worker \([0-9]+\) exited with code [1-9]' "$RELAY_LOG" >>"$WORK/haproxy.crashes" || true
            note="old workers exited: $(grep -oE 'Former worker \([0-9]+\) exited with code [0-9]+[^.]*' "$RELAY_LOG" | paste -sd';' -)"
            ;;
    esac
    echo "$(errors "$WORK/churn.json") $(errors "$WORK/streams.json")" >>"$WORK/$kind.errors"
    echo "run $kind: reloads (ready_ms done_ms): $(tail -n "$RELOADS" "$WORK/$kind.reloads" | paste -sd, -)," \
        "errors churn/streams (connect read write timeout mismatch requests): $(tail -1 "$WORK/$kind.errors")," \
        "streams replaced: $(tail -1 "$WORK/$kind.replaced"), peak processes and RSS KiB: $(cat "$WORK/$kind.peak"); $note" >&2
}

BACKEND_PORT=$(free_port)
: >"$WORK/backend.log"
taskset -c 1 "$BIN_DIR/edgepoll" echo --listen "127.0.0.1:$BACKEND_PORT" --workers 1 \
    --metrics-listen off >"$WORK/backend.log" 2>&1 &
BG_PIDS+=("$!")
await_line "$WORK/backend.log" ' listening on '

KINDS=(edgepoll haproxy)
echo "Machine: $(machine). Relay (1 worker or thread) on core 0; the edgepoll echo backend and the load on core 1. $RUNS runs each, alternating, of $RELOADS reloads $INTERVAL s apart under ${LOAD_S} s of load: edgeload -c 20 --reconnect and edgeload -c 50 (long-lived streams), 64-byte echo, every byte verified; cap $CAP s. $(haproxy -v | head -1 | cut -d' ' -f1-3)."
for run in $(seq "$RUNS"); do
    for kind in "${KINDS[@]}"; do one_run "$kind"; done
done

echo
touch "$WORK/haproxy.crashes"
echo "| relay | reloads done | client errors connect / read / write / timeout / mismatch | errors per reload | long-lived streams replaced | requests verified | new process serves after, median (max) ms | reload done (new serves, old exited), median (max) ms | old process still alive at the cap | peak processes | peak RSS MiB |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for kind in "${KINDS[@]}"; do
    python3 - "$kind" "$CAP" "$WORK/$kind.reloads" "$WORK/$kind.errors" "$WORK/$kind.peaks" "$WORK/$kind.done" "$WORK/$kind.replaced" <<'PY'
import statistics, sys
kind, cap = sys.argv[1], int(sys.argv[2])
reloads = [tuple(map(int, l.split())) for l in open(sys.argv[3])]
errors = [list(map(int, l.split())) for l in open(sys.argv[4])]
peaks = [tuple(map(int, l.split())) for l in open(sys.argv[5])]
done = sum(int(l) for l in open(sys.argv[6]))
replaced = [int(l) for l in open(sys.argv[7])]
# Each line: connect read write timeout mismatch requests, for churn then streams.
e = [sum(r[i] + r[i + 6] for r in errors) for i in range(5)]
requests = sum(r[5] + r[11] for r in errors)
def ms(values):
    # A reload that did not finish within the cap counts as the cap, and shows ">=".
    v = [cap * 1000 if x < 0 else x for x in values]
    shown = lambda x: f">= {x:.0f}" if x >= cap * 1000 else f"{x:.0f}"
    return f"{shown(statistics.median(v))} ({shown(max(v))})"
ready = ms([r[0] for r in reloads])
total = ms([r[1] for r in reloads])
alive = sum(1 for r in reloads if r[1] < 0)
name = {"edgepoll": "edgepoll relay (SIGHUP)", "haproxy": "HAProxy -W (master CLI reload)"}[kind]
print(f"| {name} | {done} of {len(reloads)} | {' / '.join(map(str, e))} | {sum(e) / max(done, 1):.2f} | "
      f"{sum(replaced)} of {50 * len(replaced)} | {requests} | {ready} | {total} | {alive} of {len(reloads)} | {max(p[0] for p in peaks)} | "
      f"{max(p[1] for p in peaks) / 1024:.1f} |")
PY
done
if [[ -s $WORK/haproxy.crashes ]]; then
    echo
    echo "HAProxy's master reported $(wc -l <"$WORK/haproxy.crashes") of its old workers exiting with a failure status ($(
        grep -oE 'exited with code .*' "$WORK/haproxy.crashes" | sort | uniq -c |
            sed -E 's/^ *([0-9]+) exited with (.*)/\1 with \2/' | paste -sd, - | sed 's/,/, /g'))."
fi

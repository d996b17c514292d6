#!/usr/bin/env bash
# The access log's cost under connection churn (issue 18): connect, one 64-byte echo,
# close, again (`edgeload --reconnect`, CONNS slots) through a relay with one worker or
# thread on core 0, to an edgepoll echo upstream; the upstream and the load share
# core 1. Every connection makes one record, so churn is the access log's worst case:
# the most records per unit of work.
#
# - churn: edgepoll relay with the access log off, on to a file (text), on to a file
#   (json); HAProxy (Debian's package, tcp mode, one thread) without a log and with
#   `option tcplog`. HAProxy logs through syslog targets only: here `log stdout format
#   raw local0` with HAProxy's stdout redirected to the file (benches/peers/haproxy.sh,
#   haproxy_tcplog_conf). A file descriptor is the nearest HAProxy has to a file of its
#   own (one blocking writev(2) per record, in its only thread); a UDP syslog target or
#   a `ring` forwarded to one would need a syslog daemon to reach a file, whose CPU a
#   per-process figure would leave out. The log files are on the same file system for
#   both (the page cache; nothing is fsynced).
# - stalled: the access log off, against the log to a FIFO that is held open and
#   never read: the writer blocks on the full pipe, the workers' channels fill, and
#   every record after that is dropped and counted. A worker must not slow down.
# - instructions: the churn's contenders under callgrind (user-space instructions per
#   connection, every thread counted), runs of SHORT and LONG differenced: a count
#   that does not move with the machine's other load, as CPU time here does by 20%.
#
# Server CPU is the relay process's user + system time (all its threads: edgepoll's
# access log writer included) from /proc/PID/stat, taken before the load and 0.3 s
# after it (the writer catches up within 10 ms), divided by the connections edgeload
# completed. Each contender gets a fresh process per run. The access log writer
# thread's own share is read apart, exactly, from its /proc/PID/task/TID/schedstat,
# per record written: the formatting and writing, apart from the kernel's TCP work
# that makes up most of the total and most of its noise.
#
# The contenders alternate within each run, starting one further along the list each
# run, after an uncounted warm-up run: every measured run follows another's churn,
# whose TIME_WAIT sockets (tens of thousands; net.ipv4.tcp_tw_reuse lets loopback
# connects reuse them) make the next run's connects dearer, so no contender always
# goes first. Besides the ratio of medians, each run's ratio to the same relay's
# log-off run of that round is given (median and range): those pairs ran within
# seconds of each other, so the machine's drift over the whole benchmark cancels.
#
# Records per connection: the log's lines over the connections edgeload completed
# (slightly above 1: the connections still open when the load stops are logged too,
# and edgeload's first connection only checks that the target answers). A logger that
# lost records would look cheap; the dropped column (edgepoll's
# edgepoll_access_log_records_total{result="dropped"}, scraped 0.3 s after the load)
# shows it did not.
#
#   bash benches/access_log_churn.sh       # RUNS=5 DURATION=5s CONNS=50 SHORT=1s LONG=4s
#   SECTIONS=churn RUNS=3 bash benches/access_log_churn.sh   # sections: churn stalled instructions
source "$(dirname "$0")/lib.sh"
cd "$(dirname "$0")/.."
source benches/peers/haproxy.sh
# Say which command failed, in functions and command substitutions too, before
# set -e ends the script (a silent exit would leave nothing to look at); and let -e
# hold inside command substitutions, which bash otherwise runs without it, so that
# `line=$(one_run ...)` stops at a failure instead of printing half a result.
set -E
shopt -s inherit_errexit
trap 'echo "access_log_churn.sh: line $LINENO: \"$BASH_COMMAND\" failed" >&2' ERR
RUNS=${RUNS:-5}
DURATION=${DURATION:-5s}
CONNS=${CONNS:-50}
SECTIONS=${SECTIONS:-"churn stalled instructions"}
SHORT=${SHORT:-1s}
LONG=${LONG:-4s}
for tool in haproxy curl python3 valgrind; do
    command -v "$tool" >/dev/null ||
        { echo "needs $tool: apt-get install -y haproxy curl python3 valgrind" >&2; exit 1; }
done

# The echo upstream on core 1, shared by every contender of a section.
start_upstream() {
    RUST_LOG=info taskset -c 1 "$BIN_DIR/edgepoll" echo --listen 127.0.0.1:0 --workers 1 \
        --metrics-listen off >"$WORK/upstream.log" 2>&1 &
    UP_PID=$!
    BG_PIDS+=("$UP_PID")
    await_line "$WORK/upstream.log" ' listening on '
    UP_PORT=$(sed -nE 's/.* listening on [^ ,]+:([0-9]+).*/\1/p' "$WORK/upstream.log")
}

# WRAP: a command the relay runs under (callgrind, in the instructions section).
WRAP=()

# start_relay KIND: starts the relay on core 0 in front of the upstream; sets
# RELAY_PID, RELAY_PORT, LOG_FILE (empty without a log) and METRICS (edgepoll's
# metrics address, empty for HAProxy).
start_relay() {
    local kind=$1 i
    LOG_FILE="" METRICS=""
    case $kind in
        edgepoll-*)
            local log=() line
            case $kind in
                edgepoll-text) LOG_FILE=$WORK/access.log; log=(--access-log "$LOG_FILE") ;;
                edgepoll-json) LOG_FILE=$WORK/access.log
                    log=(--access-log "$LOG_FILE" --access-log-format json) ;;
                edgepoll-stalled)
                    # Opened read-write, so that neither this open nor edgepoll's waits
                    # for the other end; nothing ever reads it.
                    mkfifo "$WORK/stall.fifo"
                    exec 7<>"$WORK/stall.fifo"
                    log=(--access-log "$WORK/stall.fifo") ;;
            esac
            # Metrics on for every edgepoll contender alike, to read the access log's
            # counters once at the end; unscraped during the load, they cost nothing
            # measurable (benches/README.md, "Metrics on vs off").
            RUST_LOG=info taskset -c 0 "${WRAP[@]}" "$BIN_DIR/edgepoll" relay --listen 127.0.0.1:0 \
                --workers 1 --metrics-listen 127.0.0.1:0 --upstream "127.0.0.1:$UP_PORT" "${log[@]}" \
                >"$WORK/relay.log" 2>&1 &
            RELAY_PID=$!
            BG_PIDS+=("$RELAY_PID")
            # Up to 30 s: valgrind takes a while to start.
            for i in $(seq 600); do
                grep -q ' listening on ' "$WORK/relay.log" && break
                sleep 0.05
            done
            line=$(grep ' listening on ' "$WORK/relay.log") ||
                { echo "edgepoll did not start within 30 s:" >&2; cat "$WORK/relay.log" >&2; exit 1; }
            RELAY_PORT=$(sed -E 's/.* listening on [^ ,]+:([0-9]+).*/\1/' <<<"$line")
            METRICS=$(sed -nE 's#.*metrics on http://([^/]+)/metrics.*#\1#p' <<<"$line")
            ;;
        haproxy | haproxy-tcplog)
            RELAY_PORT=$(free_port)
            if [[ $kind == haproxy-tcplog ]]; then
                LOG_FILE=$WORK/access.log
                haproxy_tcplog_conf "$WORK/haproxy.cfg" "$RELAY_PORT" "$UP_PORT"
            else
                haproxy_conf "$WORK/haproxy.cfg" "$RELAY_PORT" "$UP_PORT"
            fi
            taskset -c 0 "${WRAP[@]}" haproxy -db -f "$WORK/haproxy.cfg" >"${LOG_FILE:-/dev/null}" \
                2>"$WORK/relay.log" &
            RELAY_PID=$!
            BG_PIDS+=("$RELAY_PID")
            for i in $(seq 600); do
                (exec 3<>"/dev/tcp/127.0.0.1/$RELAY_PORT") 2>/dev/null && return
                sleep 0.05
            done
            echo "HAProxy did not listen on $RELAY_PORT within 30 s:" >&2
            cat "$WORK/relay.log" >&2
            exit 1
            ;;
    esac
}

# writer_ns: the CPU time, in ns, edgepoll's access log writer thread ("edgepoll-log")
# has run so far (schedstat's first field: exact, where /proc/PID/stat counts 10 ms
# ticks); 0 when there is none.
writer_ns() {
    local comm
    for comm in /proc/"$RELAY_PID"/task/*/comm; do
        if [[ $(cat "$comm" 2>/dev/null) == edgepoll-log ]]; then
            cut -d' ' -f1 "${comm%/comm}/schedstat"
            return
        fi
    done
    echo 0
}

# access_log_count RESULT: edgepoll_access_log_records_total{result=RESULT} now.
access_log_count() {
    curl -sSf --max-time 5 "http://$METRICS/metrics" |
        awk -v r="$1" '$1 == "edgepoll_access_log_records_total{result=\"" r "\"}" { print $2 }'
}

# one_run KIND: prints "connections/s cpu_ns_per_connection records_per_connection
# bytes_per_record written dropped writer_ns_per_record" ("-" where a figure does not
# apply).
one_run() {
    local kind=$1 before after written=- dropped=- records=- bytes=- w_before w_after
    start_relay "$kind"
    before=$(cpu_seconds "$RELAY_PID")
    w_before=$(writer_ns)
    taskset -c 1 "$BIN_DIR/edgeload" --json -t1 -c"$CONNS" --reconnect -d"$DURATION" \
        "tcp://127.0.0.1:$RELAY_PORT" >"$WORK/load.json"
    sleep 0.3
    # A relay that died under the load would still show a zombie's /proc/PID/stat.
    if [[ $(cut -d' ' -f3 "/proc/$RELAY_PID/stat") == Z ]]; then
        echo "$kind exited during the load:" >&2
        tail -n 20 "$WORK/relay.log" >&2
        exit 1
    fi
    after=$(cpu_seconds "$RELAY_PID")
    w_after=$(writer_ns)
    if [[ -n $METRICS && $kind != edgepoll-off ]]; then
        written=$(access_log_count written)
        dropped=$(access_log_count dropped)
    fi
    # A stalled writer holds edgepoll's exit for its 2 s stop wait.
    stop_pid "$RELAY_PID"
    if [[ $kind == edgepoll-stalled ]]; then
        exec 7<&-
        rm -f "$WORK/stall.fifo"
    fi
    if [[ -n $LOG_FILE ]]; then
        records=$(wc -l <"$LOG_FILE")
        bytes=$(stat -c %s "$LOG_FILE")
        rm -f "$LOG_FILE"
    fi
    grep -q '"total":0' "$WORK/load.json" || { cat "$WORK/load.json" >&2; exit 1; }
    python3 - "$WORK/load.json" "$before" "$after" "$records" "$bytes" "$written" "$dropped" \
        "$((w_after - w_before))" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
before, after = float(sys.argv[2]), float(sys.argv[3])
records, size, written, dropped, writer = sys.argv[4:9]
n = r["requests"]
# Records per connection: the lines in the file, or without one (the stalled FIFO)
# the records edgepoll counts as written.
logged = records if records != "-" else written
per_conn = "-" if logged == "-" else "%.4f" % (int(logged) / n)
per_record = "-" if records == "-" or int(records) == 0 else "%.0f" % (int(size) / int(records))
# The writer's CPU per record it wrote to a file (the workers drop the others without
# it; a writer stalled on the FIFO wrote a few, and its time means nothing per record).
per_written = "%.0f" % (int(writer) / int(records)) if int(writer) and records not in ("-", "0") else "-"
print("%.0f %.1f %s %s %s %s %s" % (r["requests_per_sec"], (after - before) / n * 1e9,
                                   per_conn, per_record, written, dropped, per_written))
PY
}

# section NAME KIND...: the warm-up, then RUNS rounds of the KINDs, rotated by one per
# round; appends "NAME KIND RUN figures..." lines to $WORK/results.
section() {
    local name=$1 kinds=("${@:2}") run i k line
    start_upstream
    one_run "${kinds[0]}" >/dev/null
    for run in $(seq "$RUNS"); do
        for i in "${!kinds[@]}"; do
            k=${kinds[$(((i + run - 1) % ${#kinds[@]}))]}
            line=$(one_run "$k")
            echo "$name $k $run $line" >>"$WORK/results"
            read -r r c rec b w d wr <<<"$line"
            echo "run $run $k: $r conn/s, $c ns CPU/conn, $rec records/conn, $b B/record, written $w dropped $d, writer $wr ns/record" \
                "(TIME_WAIT $(ss -tan state time-wait | wc -l))" >&2
        done
    done
    stop_pid "$UP_PID"
}

# cg_run KIND DURATION: prints "instructions connections" for one run of KIND under
# callgrind, loaded for DURATION.
cg_run() {
    local kind=$1
    rm -f "$WORK/cg.out"
    WRAP=(valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.out")
    start_relay "$kind"
    WRAP=()
    # A longer timeout than the 2 s default: the relay runs some 50 times slower.
    taskset -c 1 "$BIN_DIR/edgeload" --json -t1 -c"$CONNS" --reconnect -d"$2" --timeout 10s \
        "tcp://127.0.0.1:$RELAY_PORT" >"$WORK/load.json"
    grep -q '"total":0' "$WORK/load.json" || { cat "$WORK/load.json" >&2; exit 1; }
    # SIGTERM: the relay exits, and callgrind writes its counts.
    stop_pid "$RELAY_PID"
    [[ -s $WORK/cg.out ]] || { echo "callgrind wrote no counts for $kind:" >&2; cat "$WORK/relay.log" >&2; exit 1; }
    if [[ -n $LOG_FILE ]]; then rm -f "$LOG_FILE"; fi
    echo "$(awk '/^(summary|totals):/ { print $2; exit }' "$WORK/cg.out") $(json_field "$WORK/load.json" requests)"
}

# instructions: user-space instructions per connection, every thread counted (the
# access log's writer too); each contender loaded for SHORT and for LONG, and the
# difference divided by the difference in connections, which cancels start-up and
# shutdown. Unlike CPU time, the count does not depend on what else the machine does;
# the kernel's share (the system calls) is not in it.
instructions() {
    local kind line ir1 n1 ir2 n2
    start_upstream
    for kind in edgepoll-off edgepoll-text edgepoll-json haproxy haproxy-tcplog; do
        line=$(cg_run "$kind" "$SHORT")
        read -r ir1 n1 <<<"$line"
        line=$(cg_run "$kind" "$LONG")
        read -r ir2 n2 <<<"$line"
        echo "instructions $kind: $ir1 Ir / $n1 connections, $ir2 Ir / $n2 connections" >&2
        echo "instructions $kind 1 $(awk -v a="$ir1" -v b="$ir2" -v x="$n1" -v y="$n2" \
            'BEGIN { printf "%.0f", (b - a) / (y - x) }')" >>"$WORK/results"
    done
    stop_pid "$UP_PID"
}

churn() { section churn edgepoll-off edgepoll-text edgepoll-json haproxy haproxy-tcplog; }
stalled() { section stalled edgepoll-off edgepoll-stalled; }

echo "Machine: $(machine), load average $(cut -d' ' -f1 /proc/loadavg) at the start. Relay (1 worker or thread) on core 0; edgepoll echo upstream and edgeload on core 1. edgeload -c $CONNS --reconnect, one 64-byte echo per connection, $DURATION x $RUNS runs each, alternating. $(haproxy -v | awk 'NR == 1 { print $1, $2, $3 }')."
: >"$WORK/results"
for s in $SECTIONS; do
    "$s"
done
python3 - "$WORK/results" <<'PY'
import statistics, sys
from collections import defaultdict

runs = defaultdict(dict)  # (section, kind) -> run -> figures
for line in open(sys.argv[1]):
    section, kind, run, *f = line.split()
    runs[(section, kind)][int(run)] = f

LABELS = {
    "edgepoll-off": "edgepoll relay, access log off",
    "edgepoll-text": "edgepoll relay, --access-log FILE (text)",
    "edgepoll-json": "edgepoll relay, --access-log FILE --access-log-format json",
    "haproxy": "HAProxy, no log",
    "haproxy-tcplog": "HAProxy, option tcplog, log stdout format raw > FILE",
    "edgepoll-stalled": "edgepoll relay, --access-log to a FIFO nobody reads",
}
# Logging off, the same relay: what "on / off" divides by.
BASE = {"edgepoll-text": "edgepoll-off", "edgepoll-json": "edgepoll-off",
        "edgepoll-stalled": "edgepoll-off", "haproxy-tcplog": "haproxy"}

def col(section, kind, i):
    return [float(f[i]) for f in runs[(section, kind)].values() if f[i] != "-"]

def med(xs):
    return statistics.median(xs) if xs else None

def fmt(x, spec):
    return "-" if x is None else format(x, spec)

def table(section, kinds, title):
    print()
    print(f"### {title}")
    print()
    print("| relay, access log | connections/s (median) | relay CPU ns per connection, median (range) "
          "| log writer thread CPU ns per record (median) | CPU vs edgepoll, log off | CPU, log on / off of the same relay | the same, per run: median (range) "
          "| records written per connection (median) | records dropped (median) | bytes per record |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    off = med(col(section, "edgepoll-off", 1))
    for kind in kinds:
        cpu = col(section, kind, 1)
        m = med(cpu)
        rng = f"{m:.0f} ({min(cpu):.0f} to {max(cpu):.0f})"
        vs_off = fmt(m / off, ".3f") if off else "-"
        on_off = per_run = "-"
        base = BASE.get(kind)
        if base:
            on_off = fmt(m / med(col(section, base, 1)), ".3f")
            mine, theirs = runs[(section, kind)], runs[(section, base)]
            ratios = [float(mine[r][1]) / float(theirs[r][1]) for r in mine if r in theirs]
            per_run = f"{med(ratios):.3f} ({min(ratios):.3f} to {max(ratios):.3f})"
        print(f"| {LABELS[kind]} | {med(col(section, kind, 0)):.0f} | {rng} "
              f"| {fmt(med(col(section, kind, 6)), '.0f')} | {vs_off} | {on_off} "
              f"| {per_run} | {fmt(med(col(section, kind, 2)), '.3f')} "
              f"| {fmt(med(col(section, kind, 5)), '.0f')} | {fmt(med(col(section, kind, 3)), '.0f')} |")

if any(s == "churn" for s, _ in runs):
    table("churn", ["edgepoll-off", "edgepoll-text", "edgepoll-json", "haproxy", "haproxy-tcplog"],
          "Connection churn through the relay, access log off and on")
if any(s == "instructions" for s, _ in runs):
    print()
    print("### User-space instructions per connection (callgrind, every thread)")
    print()
    print("| relay, access log | instructions per connection | log on / off, same relay | added per connection |")
    print("|---|---|---|---|")
    for kind in ["edgepoll-off", "edgepoll-text", "edgepoll-json", "haproxy", "haproxy-tcplog"]:
        if ("instructions", kind) not in runs:
            continue
        n = float(runs[("instructions", kind)][1][0])
        base = BASE.get(kind)
        if base and ("instructions", base) in runs:
            b = float(runs[("instructions", base)][1][0])
            print(f"| {LABELS[kind]} | {n:.0f} | {n / b:.3f} | {n - b:+.0f} |")
        else:
            print(f"| {LABELS[kind]} | {n:.0f} | - | - |")
if any(s == "stalled" for s, _ in runs):
    table("stalled", ["edgepoll-off", "edgepoll-stalled"],
          "A stalled access log (the writer blocked on a full pipe)")
PY

# Helpers for the end-to-end scripts. Source it; every process started through
# `start_bg` is stopped when the script exits, and every run uses its own temp folder.
# shellcheck shell=bash

BIN_DIR=${BIN_DIR:-target/release}
WORK=$(mktemp -d /tmp/edgepoll-e2e.XXXXXX)
BG_PIDS=()

cleanup() {
    local pid
    for pid in "${BG_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
        # A process a test stopped (kill -STOP) takes the signal only once resumed.
        kill -CONT "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

log() { printf '  %s\n' "$*"; }
fail() {
    printf 'FAIL: %s\n' "$*" >&2
    exit 1
}

# start_bg NAME CMD...: runs CMD in the background, output in $WORK/NAME.log.
start_bg() {
    local name=$1
    shift
    "$@" >"$WORK/$name.log" 2>&1 &
    BG_PIDS+=("$!")
    LAST_PID=$!
}

source benches/ports.sh

# wait_for SECONDS DESCRIPTION CMD...: polls CMD every 0.2 s until it succeeds.
wait_for() {
    local secs=$1 what=$2
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || fail "timed out after ${secs}s waiting for $what"
        sleep 0.2
    done
}

# start_nginx PORT: Debian's nginx-light as benches/peers/nginx.sh configures it, on
# 127.0.0.1:PORT, stopped when the script exits.
start_nginx() {
    source benches/peers/nginx.sh
    nginx_conf "$WORK" "$1"
    start_bg nginx nginx -c "$WORK/nginx.conf" -p "$WORK"
    wait_for 10 "nginx to listen" curl -sf "http://127.0.0.1:$1/"
}

# start_edgepoll NAME ARGS...: starts edgepoll on ephemeral ports and sets
# EP_PID, EP_ADDR (host:port) and EP_METRICS (host:port) from its start-up line.
start_edgepoll() {
    local name=$1
    shift
    RUST_LOG=info start_bg "$name" "$BIN_DIR/edgepoll" "$@"
    EP_PID=$LAST_PID
    wait_for 10 "edgepoll to start" grep -q ' listening on ' "$WORK/$name.log"
    local line
    line=$(grep ' listening on ' "$WORK/$name.log")
    EP_ADDR=$(sed -E 's/.* listening on ([^ ,]+).*/\1/' <<<"$line")
    EP_METRICS=$(sed -nE 's#.*metrics on http://([^/]+)/metrics.*#\1#p' <<<"$line")
}

# stop_gracefully PID: SIGTERM, then the exit status must be 0.
stop_gracefully() {
    local pid=$1 status=0
    kill -TERM "$pid"
    wait "$pid" || status=$?
    [[ $status -eq 0 ]] || fail "process $pid exited $status after SIGTERM"
}

# echo_bytes HOST:PORT N: sends N random bytes through an echo server and checks
# that exactly the same N bytes come back.
echo_bytes() {
    local host=${1%:*} port=${1##*:} n=$2
    head -c "$n" /dev/urandom >"$WORK/payload"
    exec 3<>"/dev/tcp/$host/$port"
    cat "$WORK/payload" >&3 &
    local writer=$!
    head -c "$n" <&3 >"$WORK/back"
    wait "$writer"
    exec 3>&- 3<&-
    cmp -s "$WORK/payload" "$WORK/back" || fail "echo of $n bytes came back different"
}

# Reloads under load, for benches/reload.sh and tests/e2e/reload.sh: SIGHUP to edgepoll,
# timed, and the clients' sockets, to tell a connection kept from one replaced. Source
# it; it only defines functions.
#
# A reload replaces the process: the running edgepoll starts its successor as a child,
# hands it everything and exits, so the pid to signal next is the successor's. Both
# write to the same stderr, so the log names it: the old process logs "pid N is
# serving" once the successor serves.
# shellcheck shell=bash

# now_ms: wall-clock time in milliseconds (bash's EPOCHREALTIME, so no fork).
now_ms() {
    local t=${EPOCHREALTIME/[.,]/}
    echo $((t / 1000))
}

# gone PID: true once PID has exited. A zombie counts as exited: a successor's parent
# is the process it replaced, so once that exits it is reparented, and a reaper may
# take its time.
gone() {
    local stat
    # read, not $(<file): under set -e a failed $(<file) ends the script.
    { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 0
    stat=${stat##*) }
    [[ ${stat%% *} == Z ]]
}

# count_lines FILE PATTERN: lines of FILE matching the fixed string PATTERN.
count_lines() { grep -cF -- "$2" "$1" || true; }

# edgepoll_reload LOG PID CAP_S: sends SIGHUP to PID, the edgepoll writing LOG, waits
# for its successor to serve, then for PID to exit, at most CAP_S seconds in all.
# Sets NEXT_PID (the pid serving now: PID itself if the reload failed), READY_MS
# (milliseconds from the signal until the successor serves) and RELOAD_MS (until PID
# had exited as well); each -1 if it did not happen within the cap or the reload
# failed.
edgepoll_reload() {
    local log=$1 pid=$2 cap_ms=$(($3 * 1000)) serving failed start
    serving=$(count_lines "$log" ' is serving')
    failed=$(count_lines "$log" 'reload failed')
    start=$(now_ms)
    kill -HUP "$pid"
    NEXT_PID=$pid
    READY_MS=-1
    RELOAD_MS=-1
    while (($(now_ms) - start < cap_ms)); do
        if (($(count_lines "$log" ' is serving') > serving)); then
            READY_MS=$(($(now_ms) - start))
            NEXT_PID=$(grep -oE 'pid [0-9]+ is serving' "$log" | tail -1 | cut -d' ' -f2)
            break
        fi
        (($(count_lines "$log" 'reload failed') > failed)) && return
        sleep 0.005
    done
    ((READY_MS >= 0)) || return 0
    while (($(now_ms) - start < cap_ms)); do
        if gone "$pid"; then
            RELOAD_MS=$(($(now_ms) - start))
            return
        fi
        sleep 0.005
    done
}

# stop_reloaded PID: SIGTERM to an edgepoll that may not be this shell's child (a
# successor), and waits up to 15 s for it to drain and exit.
stop_reloaded() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 300); do
        gone "$pid" && return
        sleep 0.05
    done
    echo "edgepoll pid $pid still running 15 s after SIGTERM" >&2
    return 1
}

# kill_successors BIN LOG...: SIGTERM to every successor named in LOGs ("pid N is
# serving") that still runs BIN, for an exit trap: a successor is no child of the
# script, so killing the process it started leaves the successors running.
kill_successors() {
    local bin pid
    bin=$(realpath "$1")
    shift
    for pid in $(cat "$@" 2>/dev/null | sed -nE 's/.*pid ([0-9]+) is serving.*/\1/p'); do
        [[ $(readlink "/proc/$pid/exe" 2>/dev/null) == "$bin" ]] && ! gone "$pid" && kill -TERM "$pid" 2>/dev/null
    done
    return 0
}

# socket_inodes PID: the sockets PID holds, one inode number a line, sorted. A client
# whose connection was cut and reopened holds a new socket, with a new inode, even
# when it counts no error for it (edgeload reopens a connection closed between two
# requests without counting one).
socket_inodes() {
    local fd
    for fd in /proc/"$1"/fd/*; do readlink "$fd"; done 2>/dev/null |
        sed -nE 's/^socket:\[([0-9]+)\]$/\1/p' | sort
}

# replaced BEFORE AFTER: how many of the sockets listed in BEFORE are not in AFTER.
replaced() { comm -23 <(echo "$1") <(echo "$2") | grep -c . || true; }

#!/usr/bin/env bash
# Socket activation and readiness with systemd's own tool: systemd-socket-activate (from
# the systemd package) binds a port and execs edgepoll with it as fd 3 (LISTEN_FDS=1,
# LISTEN_PID); bytes echo through the inherited socket, a NOTIFY_SOCKET bound here hears
# READY=1 and, after SIGTERM, STOPPING=1, and edgepoll drains and exits 0.
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/e2e/lib.sh

echo "== systemd: socket activation through systemd-socket-activate"
# The notifications, one per line (newlines inside one shown as '|'), until STOPPING=1.
start_bg notify python3 -u -c '
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
print("bound", flush=True)
while True:
    state = s.recv(4096).decode()
    print(state.replace("\n", "|"), flush=True)
    if state == "STOPPING=1":
        break
' "$WORK/notify"
wait_for 10 "the notification socket" grep -q '^bound$' "$WORK/notify.log"

port=$(free_port)
# systemd-socket-activate passes only the variables named with -E.
start_bg edgepoll systemd-socket-activate -l "127.0.0.1:$port" \
    -E RUST_LOG=info -E NOTIFY_SOCKET="$WORK/notify" \
    "$BIN_DIR/edgepoll" echo --listen 127.0.0.1:0 --metrics-listen off --workers 2
EP_PID=$LAST_PID
wait_for 10 "systemd-socket-activate to listen" grep -q "Listening on 127.0.0.1:$port" "$WORK/edgepoll.log"
# It execs edgepoll (same pid) on the first connection, which waits in the accept
# queue meanwhile: this one.
echo_bytes "127.0.0.1:$port" 100000
wait_for 10 "READY=1" grep -qx 'READY=1' "$WORK/notify.log"
for line in \
    "socket activation: serving the 1 socket the service manager passed (LISTEN_FDS): 127.0.0.1:$port" \
    "--listen 127.0.0.1:0 ignored: the inherited sockets replace it" \
    "echo: listening on 127.0.0.1:$port with 2 workers"; do
    grep -qF -- "$line" "$WORK/edgepoll.log" || {
        cat "$WORK/edgepoll.log"
        fail "the log lacks: $line"
    }
done
echo_bytes "127.0.0.1:$port" 1000000
log "edgepoll served 127.0.0.1:$port, inherited from systemd-socket-activate; --listen ignored"

stop_gracefully "$EP_PID"
wait_for 10 "STOPPING=1" grep -qx 'STOPPING=1' "$WORK/notify.log"
want=$(printf 'bound\nSTATUS=serving echo on 127.0.0.1:%s\nREADY=1\nSTOPPING=1' "$port")
[[ $(cat "$WORK/notify.log") == "$want" ]] || {
    cat "$WORK/notify.log"
    fail "the notifications differ from STATUS=, READY=1, STOPPING=1"
}
log "NOTIFY_SOCKET heard STATUS=serving echo on 127.0.0.1:$port, READY=1, then STOPPING=1; exit 0 after SIGTERM"
echo "systemd: ok"

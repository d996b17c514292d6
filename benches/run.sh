#!/usr/bin/env bash
# Runs every macro benchmark in turn and prints their tables, for pasting into
# benches/README.md. Needs a release build and, for the nginx comparisons,
# `apt-get install -y nginx-light wrk haproxy redis-server redis-tools iperf3`. Takes about 15 minutes with the defaults.
#
#   bash benches/run.sh                       # RUNS and DURATION pass through
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins
for bench in metrics_overhead echo_vs_peers idle_scaling idle_memory churn loadgen_vs_wrk http_vs_nginx relay_vs_haproxy; do
    echo
    echo "## $bench"
    echo
    bash "benches/$bench.sh" 2>/dev/null
done

#!/usr/bin/env bash
# Runs every end-to-end script; needs release binaries and the tools .ci/run installs.
set -euo pipefail
cd "$(dirname "$0")/../.."
passed=0
failed=0
for script in tests/e2e/[a-z]*.sh; do
    case $script in */lib.sh | */run.sh) continue ;; esac
    if bash "$script"; then
        passed=$((passed + 1))
    else
        echo "FAILED: $script"
        failed=$((failed + 1))
    fi
done
echo "e2e: $passed passed, $failed failed"
[[ $failed -eq 0 ]]

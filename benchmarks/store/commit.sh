#!/usr/bin/env bash
# Commit the finished run folders (those with metrics.json) of benchmarks/store, and nothing else.
set -euo pipefail
cd "$(dirname "$0")/../.."
dirs=$(find benchmarks/store -name metrics.json -printf '%h\n' | sort)
[ -n "$dirs" ] || { echo "no finished run"; exit 0; }
git add -- $dirs
new=$(git diff --cached --name-only -- benchmarks/store | grep metrics.json | cut -d/ -f3,5-7 || true)
[ -n "$new" ] || { echo "no new finished run"; exit 0; }
git commit -q -m "benchmarks/store: $(echo "$new" | wc -l) more finished runs: $(echo $new | tr '\n' ' ')" \
  -- benchmarks/store && git log --oneline -1

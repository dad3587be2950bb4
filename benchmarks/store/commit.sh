#!/usr/bin/env bash
# Commit the finished run folders (those with metrics.json) of benchmarks/store, and nothing else: new runs, and
# what later steps add to finished ones (test scores of a chosen candidate, shift_metrics.json,
# corruption_metrics.json). Also force-adds the adapters that benchmarks/store/.gitignore excepts
# (kept_adapters.py: candidates waiting for their test split, standard's chosen banking77 runs) and untracks those no
# longer needed (a candidate that lost the choice; the history keeps them).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -z "$(git diff --cached --name-only -- . ':!benchmarks/store')" ] || { echo "other changes are staged: commit or unstage them first"; exit 1; }
dirs=$(find benchmarks/store -name metrics.json -not -path '*.partial/*' -printf '%h\n' | sort)  # not a run being built
[ -n "$dirs" ] || { echo "no finished run"; exit 0; }
git add -- $dirs
keep=$(.venv/bin/python benchmarks/store/kept_adapters.py)  # a failure stops here (set -e): nothing is untracked
[ -z "$keep" ] || echo "$keep" | xargs git add -f --
git ls-files 'benchmarks/store/*.safetensors' | { grep -vxF -e "${keep:-/nothing/}" || true; } \
  | xargs -r git rm -q --cached --
staged=$(git diff --cached --name-only -- benchmarks/store)
[ -n "$staged" ] || { echo "nothing new in finished runs"; exit 0; }
new=$(echo "$staged" | grep '/metrics.json$' | xargs -r -n1 dirname || true)
others=$(echo "$staged" | grep -v -F "${new:-/nothing/}" | grep -c . || true)
plural() { [ "$1" = 1 ] || echo s; }  # "1 run", "2 runs"
if [ -n "$new" ]; then
  n=$(echo "$new" | grep -c .)
  message="benchmarks/store: $n more finished run$(plural "$n"): $(echo "$new" | cut -d/ -f3,5-7 | paste -sd' ')"
  [ "$others" = 0 ] || message="$message; $others file$(plural "$others") of runs finished before"
else
  message="benchmarks/store: $others file$(plural "$others") of runs finished before (corruption or shift points,"
  message="$message adapters kept or let go)"
fi
# The index, not `git commit -- benchmarks/store`: with paths git commits their working-tree state, and an adapter
# untracked above (still on disk) would be committed again. Nothing else is staged (checked first).
git commit -q -m "$message" && git log --oneline -1

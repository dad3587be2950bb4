#!/usr/bin/env bash
# Publish a rerun kept in benchmarks/store/PRESET as the committed report benchmarks/results/PRESET (what the README
# and benchmarks/results/README.md point at):
#   benchmarks/store/publish.sh PRESET [BENCH OPTIONS]     e.g.
#   benchmarks/store/publish.sh defaults --compare benchmarks/results/standard/results.jsonl
# 1. rebuilds the report from the run folders in benchmarks/store/PRESET (bara bench --report-only: no training;
#    BENCH OPTIONS such as --compare go to it);
# 2. writes the before/after table of the report it replaces against the new one (benchmarks/before_after.py) to
#    benchmarks/results/PRESET-before-after.md (the old report stays in git's history);
# 3. replaces results.md, cost.md, results.jsonl, preset.json, plots/ and any corruption-*.md in benchmarks/results/PRESET.
# It commits nothing: read the diff, then commit. Run it when the rerun is complete (or to look at it so far).
# --no-before-after (anywhere after PRESET) skips step 2: publishing a rerun again as it grows keeps the table of the
# report before the rerun (it would otherwise compare the rerun with its own earlier part).
set -euo pipefail
[ $# -ge 1 ] || { sed -n 2,13p "$0"; exit 2; }
PRESET=$1
shift
BEFORE_AFTER=1 OPTIONS=()
for arg in "$@"; do if [ "$arg" = --no-before-after ]; then BEFORE_AFTER=0; else OPTIONS+=("$arg"); fi; done
set -- "${OPTIONS[@]}"
cd "$(dirname "$0")/../.."
STORE=benchmarks/store/$PRESET
DEST=benchmarks/results/$PRESET
[ -d "$STORE/runs" ] || { echo "no runs in $STORE; fix: start them with benchmarks/store/stream.sh $PRESET ..."; exit 1; }
OMP_NUM_THREADS=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1 .venv/bin/bara bench --preset "$PRESET" --output "$STORE" \
  --report-only --no-progress "$@"
mkdir -p "$DEST"
if [ "$BEFORE_AFTER" = 1 ] && [ -f "$DEST/results.jsonl" ]; then
  .venv/bin/python benchmarks/before_after.py "$DEST/results.jsonl" "$STORE/results.jsonl" \
    > "benchmarks/results/$PRESET-before-after.md"
  echo "wrote benchmarks/results/$PRESET-before-after.md (before: the report in $DEST, after: $STORE's)"
fi
rm -rf "$DEST/plots" "$DEST"/corruption-*.md
cp -r "$STORE"/results.md "$STORE"/cost.md "$STORE"/results.jsonl "$STORE"/preset.json "$STORE"/plots "$DEST"/
for extra in "$STORE"/corruption-*.md; do [ -e "$extra" ] && cp "$extra" "$DEST"/; done
echo "copied the report of $STORE into $DEST; README's 'Results so far' and benchmarks/results/README.md are yours to update"

#!/usr/bin/env bash
# One one-thread stream of a long benchmark into benchmarks/store/PRESET, in the background, with the code of HEAD
# frozen in a copy (so that editing the checkout meanwhile cannot change what the runs import):
#   benchmarks/store/stream.sh PRESET DATASETS METHODS [BENCH OPTIONS]          e.g.
#   benchmarks/store/stream.sh standard banking77,hwu64,clinc150 lora,map,ensemble,temperature,laplace,adalora
#   benchmarks/store/stream.sh standard banking77,hwu64,clinc150 mcdropout,blob,bara
#   benchmarks/store/stream.sh ablations banking77,hwu64 bara,bara-k1 --reuse benchmarks/store/standard
# or of the corruption curves of a store's finished runs (bara corrupt --retrain-missing; METHODS "all" or a list,
# scored in that order, one `bara corrupt --only-method` after another):
#   benchmarks/store/stream.sh --corrupt standard banking77 bara,adalora all
# Two streams run side by side (one per core), with disjoint methods or the same ones: a run one of them trains is
# locked, and the other trains the runs it does not hold first, a whole other dataset where it holds all of one's
# (bara.bench.run); each resumes where it stopped. The log is
# runs/logs/PRESET-METHODS.log (corrupt-PRESET-DATASETS.log). Commit the finished runs with benchmarks/store/commit.sh.
set -euo pipefail
CORRUPT=0
[ "${1:-}" != --corrupt ] || { CORRUPT=1; shift; }
[ $# -ge 3 ] || { sed -n 2,14p "$0"; exit 2; }
PRESET=$1 DATA=$2
shift 2
cd "$(dirname "$0")/../.."
FROZEN=runs/frozen/$(git rev-parse --short HEAD)
if [ ! -d "$FROZEN/src" ]; then mkdir -p "$FROZEN" && git archive HEAD src | tar -x -C "$FROZEN"; fi
mkdir -p runs/logs
# An editable install's finder on sys.meta_path wins over PYTHONPATH: drop it, then import bara from the copy.
RUN="import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]; \
sys.path.insert(0, '$PWD/$FROZEN/src'); import bara; assert bara.__file__.startswith('$PWD/$FROZEN'); \
from bara.cli import main; sys.argv[0] = 'bara'; sys.exit(main())"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
if [ "$CORRUPT" = 1 ]; then
  LOG=runs/logs/corrupt-$PRESET-${DATA//,/_}.log
  echo "== $(date -Is) start corrupt $PRESET $DATA $* (code $FROZEN)" >> "$LOG"
  (
    trap '' HUP  # as nohup: the stream outlives the shell that started it
    # a new clone's store has run folders but no report (not committed): bara corrupt reads its results.jsonl
    [ -f "benchmarks/store/$PRESET/results.jsonl" ] || .venv/bin/python -c "$RUN" bench --preset "$PRESET" \
      --output "benchmarks/store/$PRESET" --report-only --no-progress >> "$LOG" 2>&1 || exit
    for methods in "$@"; do
      only=(); [ "$methods" = all ] || only=(--only-method "$methods")
      .venv/bin/python -c "$RUN" corrupt --bench "benchmarks/store/$PRESET" --data "$DATA" --retrain-missing \
        --no-progress "${only[@]}" >> "$LOG" 2>&1 || exit
    done
  ) &
else
  METHODS=$1
  shift
  LOG=runs/logs/$PRESET-${METHODS//,/_}.log
  echo "== $(date -Is) start $PRESET $DATA $METHODS (code $FROZEN)" >> "$LOG"
  nohup .venv/bin/python -c "$RUN" bench --preset "$PRESET" --output "benchmarks/store/$PRESET" \
    --only-dataset "$DATA" --only-method "$METHODS" --no-progress "$@" >> "$LOG" 2>&1 &
fi
echo "stream started (pid $!), log $LOG"

#!/usr/bin/env bash
# One one-thread stream of a long benchmark into benchmarks/store/PRESET, in the background, with the code of HEAD
# frozen in a copy (so that editing the checkout meanwhile cannot change what the runs import):
#   benchmarks/store/stream.sh PRESET DATASETS METHODS [BENCH OPTIONS]          e.g.
#   benchmarks/store/stream.sh standard banking77,hwu64,clinc150 lora,map,ensemble,temperature,laplace,adalora
#   benchmarks/store/stream.sh standard banking77,hwu64,clinc150 mcdropout,blob,bara
#   benchmarks/store/stream.sh ablations banking77,hwu64 bara,bara-k1 --reuse benchmarks/store/standard
# Two streams with disjoint methods run side by side (one per core); each resumes where it stopped. The log is
# runs/logs/PRESET-METHODS.log. Commit the finished runs with benchmarks/store/commit.sh.
set -euo pipefail
[ $# -ge 3 ] || { sed -n 2,10p "$0"; exit 2; }
PRESET=$1 DATA=$2 METHODS=$3
shift 3
cd "$(dirname "$0")/../.."
FROZEN=runs/frozen/$(git rev-parse --short HEAD)
if [ ! -d "$FROZEN/src" ]; then mkdir -p "$FROZEN" && git archive HEAD src | tar -x -C "$FROZEN"; fi
mkdir -p runs/logs
LOG=runs/logs/$PRESET-${METHODS//,/_}.log
# An editable install's finder on sys.meta_path wins over PYTHONPATH: drop it, then import bara from the copy.
RUN="import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]; \
sys.path.insert(0, '$PWD/$FROZEN/src'); import bara; assert bara.__file__.startswith('$PWD/$FROZEN'); \
from bara.cli import main; sys.argv[0] = 'bara'; sys.exit(main())"
echo "== $(date -Is) start $PRESET $DATA $METHODS (code $FROZEN)" >> "$LOG"
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg nohup \
  .venv/bin/python -c "$RUN" bench --preset "$PRESET" --output "benchmarks/store/$PRESET" --only-dataset "$DATA" \
  --only-method "$METHODS" --no-progress "$@" >> "$LOG" 2>&1 &
echo "stream started (pid $!), log $LOG"

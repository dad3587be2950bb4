"""Re-score finished BaRA (and BLoB) runs of `bara bench --preset standard` to see where the S = 10 predictive's
spread comes from (docs/experiments.md, section 8). Prints one JSON line per run and setting:

  rows        S = 10 with every variable sampled, all 10 copies in one pass (one flipout noise E shared by the
              copies; the default) or one pass per sample (an independent E each): --what rows
  sources     S = 10 sampling only A (gates, pi, theta at their one-pass values) or only the gates (A = mu_A):
              --what sources

  python benchmarks/experiments/mc_sources.py runs/bench-standard --dataset banking77 --what sources
"""
import argparse
import json
from pathlib import Path

import torch

from bara import runs
from bara.methods import base
from bara.methods.bara.layer import BaraLinear
from bara.metrics import evaluate

LOCAL_WEIGHTS, ROWS = BaraLinear.local_weights, base.MAX_ROWS


def one_pass_gates(self, *args):
    """The layer's local weights as in the one-pass prediction, whatever the mode (A keeps its flipout noise)."""
    mode, self.mode = self.mode, "mean"
    try:
        return LOCAL_WEIGHTS(self, *args)
    finally:
        self.mode = mode


def settings(what: str, method):
    """(name, set-up) pairs; each set-up changes the method or module state for one scoring."""
    def rows(n):
        def apply():
            base.MAX_ROWS = n
        return apply

    def sources(a_only):
        def apply():
            BaraLinear.local_weights = one_pass_gates if a_only else LOCAL_WEIGHTS
            method.config.bayes_factors = a_only
        return apply

    if what == "rows":
        return [("S=10 in one pass", rows(ROWS)), ("one pass per sample", rows(64))]
    return [("A only", sources(True)), ("gates only", sources(False))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, help="a `bara bench --preset standard` output folder")
    parser.add_argument("--dataset", default="banking77")
    parser.add_argument("--what", choices=["rows", "sources"], default="sources")
    parser.add_argument("--methods", default="bara", help="comma-separated (rows: bara,blob)")
    args = parser.parse_args()
    chosen = [json.loads(line) for line in (args.output / "results.jsonl").read_text().splitlines()]
    for row in chosen:
        if row["dataset"] != args.dataset or row["variant"] not in args.methods.split(","):
            continue
        folder = args.output / "runs" / args.dataset / row["variant"] / row["run"]
        classifier, method, config = runs.load_adapter(folder)
        task = runs.task_of(config)
        labels = torch.tensor(task.test.labels)
        for name, apply in settings(args.what, method):
            apply()
            probs = runs.predict(classifier, method, task.test, 10, config.train.eval_batch_size, config.train.seed,
                                 progress_bar=False)
            result = evaluate(probs, labels)
            print(json.dumps({"method": row["variant"], "run": row["run"], "setting": name,
                              **{k: result[k] for k in ("accuracy", "ece", "nll", "brier")}}), flush=True)
        BaraLinear.local_weights, base.MAX_ROWS = LOCAL_WEIGHTS, ROWS


if __name__ == "__main__":
    main()

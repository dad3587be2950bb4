"""Re-score finished BaRA (and BLoB) runs of `bara bench --preset standard` to see where the S = 10 predictive's
spread comes from (docs/experiments.md, section 8). Prints one JSON line per run and setting:

  rows        S = 10 with every variable sampled, all 10 copies in one pass (one flipout noise E shared by the
              copies; the default) or one pass per sample (an independent E each): --what rows
  sources     S = 10 sampling only A (gates, pi, theta at their one-pass values) or only the gates (A = mu_A):
              --what sources
  relaxed     S = 10 with every variable sampled, the gates as in training (binary Concrete at the training
              temperature) instead of hard 0/1 gates: --what relaxed
--split validation scores the validation split (for choices), test (the default) the test split; --limit N only
its first N examples. OUTPUT is a `bara bench` output folder (its finished runs of --methods) or one run folder.

  python benchmarks/experiments/mc_sources.py runs/bench-standard --dataset banking77 --what sources
  python benchmarks/experiments/mc_sources.py runs/bench-gate --what relaxed --split validation --methods bara,bara-k2
"""
import argparse
import dataclasses
import json
from pathlib import Path

import torch

from bara import runs
from bara.methods import base
from bara.distributions import BinaryConcrete
from bara.methods.bara import layer
from bara.methods.bara.layer import BaraLinear
from bara.metrics import evaluate

LOCAL_WEIGHTS, ROWS, BERNOULLI = BaraLinear.local_weights, base.MAX_ROWS, torch.bernoulli


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

    def hard(relaxed):
        def apply():
            def concrete(p):  # the layer's test-time gate draw, torch.bernoulli(sigma(l)), as in training instead
                return BinaryConcrete(torch.logit(p, eps=1e-7), method.config.temperature, validate_args=False).sample()
            layer.torch.bernoulli = concrete if relaxed else BERNOULLI
        return apply

    if what == "rows":
        return [("S=10 in one pass", rows(ROWS)), ("one pass per sample", rows(64))]
    if what == "relaxed":
        return [("hard gates", hard(False)), ("relaxed gates", hard(True))]
    return [("A only", sources(True)), ("gates only", sources(False))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path, help="a `bara bench` output folder, or one `bara train` --output")
    parser.add_argument("--dataset", default="banking77")
    parser.add_argument("--what", choices=["rows", "sources", "relaxed"], default="sources")
    parser.add_argument("--split", choices=["test", "validation"], default="test")
    parser.add_argument("--methods", default="bara", help="comma-separated (rows: bara,blob)")
    parser.add_argument("--limit", type=int, default=None, help="score only the split's first N examples")
    args = parser.parse_args()
    if (args.output / "metrics.json").exists():  # one run folder
        folders = [(args.output.name, args.output)]
    else:
        chosen = [json.loads(line) for line in (args.output / "results.jsonl").read_text().splitlines()]
        folders = [(row["variant"], args.output / "runs" / args.dataset / row["variant"] / row["run"]) for row in chosen
                   if row["dataset"] == args.dataset and row["variant"] in args.methods.split(",")]
    for variant, folder in folders:
        classifier, method, config = runs.load_adapter(folder)
        task = runs.task_of(config)
        split = getattr(task, args.split)
        if args.limit:
            split = dataclasses.replace(split, texts=split.texts[:args.limit], labels=split.labels[:args.limit])
        labels = torch.tensor(split.labels)
        for name, apply in settings(args.what, method):
            apply()
            probs = runs.predict(classifier, method, split, 10, config.train.eval_batch_size, config.train.seed,
                                 progress_bar=False)
            result = evaluate(probs, labels)
            print(json.dumps({"method": variant, "run": folder.name, "setting": name,
                              **{k: result[k] for k in ("accuracy", "ece", "nll", "brier")}}), flush=True)
        BaraLinear.local_weights, base.MAX_ROWS, layer.torch.bernoulli = LOCAL_WEIGHTS, ROWS, BERNOULLI


if __name__ == "__main__":
    main()

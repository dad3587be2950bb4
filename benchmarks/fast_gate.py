"""One-pass metrics of saved BaRA adapters with the hard (SPEC's 1[rho > 0.5]) and the expected (rho) local gate,
on the validation and test splits they were trained with.

    python benchmarks/fast_gate.py runs/b77-bara runs/trec-bara

Prints one line per adapter, gate and split: accuracy % / ECE % / NLL / Brier, and the gate diagnostics of that
one-pass prediction (V, mean per-layer std of the hard rank, joint effective rank s̄): deeper layers see the
outputs of earlier ones, so the diagnostics depend on the gate too.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bara import runs  # noqa: E402
from bara.data import load_task  # noqa: E402
from bara.methods.bara.variants import FAST_GATES  # noqa: E402


def main(folders: list[str]) -> None:
    for folder in folders:
        classifier, method, config = runs.load_adapter(folder)
        task = load_task(config.data, max_train=config.max_train, seed=config.train.seed, max_eval=config.max_eval)
        for gate in ("hard", "expected"):
            for layer in method.layers.values():  # the layer chose its one-pass gate when it was built
                layer.config.fast_gate, layer.one_pass_gate = gate, FAST_GATES[gate]
            for name, split in (("validation", task.validation), ("test", task.test)):
                m = runs.score(classifier, method, split, config, 0, progress_bar=False)
                d = m.get("diagnostics", {})
                print(f"{folder} {gate:8s} {name:10s} {m['accuracy'] * 100:.2f} / {m['ece'] * 100:.2f} / "
                      f"{m['nll']:.3f} / {m['brier']:.3f}   V {d.get('selection_variability', 0):.3f}  rank std "
                      f"{d.get('hard_rank_std', 0):.2f}  s̄ {d.get('joint_effective_rank', 0):.2f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

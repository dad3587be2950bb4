"""How large a trained adapter's update is: the mean over its adapted matrices of ||(alpha / r) B A||_F (for BaRA and
BLoB A = mu_A and the gate's z, at most 1, left out), with the mean |A| and |B| entries; docs/experiments.md §36.

    .venv/bin/python benchmarks/experiments/update_norm.py RUN_FOLDER [RUN_FOLDER ...]

A run folder is what ``bara train`` / ``bara bench`` write: the adapter (bara's layers, or peft's LoRA with bara's
config beside it, :func:`bara.runs.meta_file`) and, where there is one, ``metrics.json``, which adds the rate and the
validation NLL. Reads tensors only (safetensors)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from bara import runs

PAIRS = (("bara_A_mu", "bara_B"), ("lora_A.weight", "lora_B.weight"))  # (A, B) suffixes: bara's layers, peft's


def update_norms(folder: str | Path) -> dict[str, float]:
    """{"update": mean ||(alpha / r) B A||_F, "A": mean |A|, "B": mean |B|, "matrices": how many} of one run."""
    folder = Path(folder)
    options = json.loads(runs.meta_file(folder).read_text())["method_config"]
    scale = options["alpha"] / options["r"]
    tensors = load_file(folder / runs.ADAPTER_WEIGHTS)
    norms, a_abs, b_abs = [], [], []
    for name, a in tensors.items():
        for a_suffix, b_suffix in PAIRS:
            if name.endswith(a_suffix):
                b = tensors[name[: -len(a_suffix)] + b_suffix].float()
                norms.append((scale * b @ a.float()).norm().item())
                a_abs.append(a.float().abs().mean().item())
                b_abs.append(b.abs().mean().item())
    if not norms:
        raise SystemExit(f"{folder}: no LoRA or bara adapter matrices in adapter_model.safetensors")
    n = len(norms)
    return {"update": sum(norms) / n, "A": sum(a_abs) / n, "B": sum(b_abs) / n, "matrices": n}


def main(folders: list[str]) -> None:
    if not folders:
        raise SystemExit(__doc__)
    for folder in folders:
        if not runs.has_weights(Path(folder)):
            print(f"{folder}: no adapter weights (not finished, or not kept in the store), skipped")
            continue
        row = update_norms(folder)
        metrics = Path(folder) / runs.METRICS
        extra = ""
        if metrics.exists():
            m = json.loads(metrics.read_text())
            extra = f"  lr {m['config']['train']['lr']:g}  val NLL {m.get('validation', {}).get('nll', float('nan')):.3f}"
        print(f"{folder}: update {row['update']:.2f}  |A| {row['A']:.4f}  |B| {row['B']:.4f}  "
              f"({row['matrices']} matrices){extra}")


if __name__ == "__main__":
    main(sys.argv[1:])

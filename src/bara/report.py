"""Read finished runs (their metrics.json) and lay them out as rows and markdown tables."""

from __future__ import annotations

import json
from pathlib import Path


def load_runs(folders) -> list[dict]:
    """metrics.json of every finished run among ``folders`` (folders without one are unfinished: skipped)."""
    runs = []
    for folder in folders:
        path = Path(folder) / "metrics.json"
        if path.exists():
            runs.append({"run": Path(folder).name, **json.loads(path.read_text())})
    return runs


def row(metrics: dict) -> dict:
    """The numbers worth a table column: validation and test, sampled and one-pass, BaRA's diagnostics."""
    val = metrics.get("validation", {})
    diag = metrics.get("diagnostics") or val.get("diagnostics") or {}
    out = {"run": metrics.get("run", ""), "method": metrics["method"], "data": metrics["data"],
           "seed": metrics["seed"], "samples": metrics["samples"]}
    for prefix, block in (("val", val), ("test", metrics)):
        for key in ("accuracy", "ece", "nll", "brier"):
            if key in block:
                out[f"{prefix}_{key}"] = block[key]
        if "fast_path" in block:
            out[f"{prefix}_fast_accuracy"] = block["fast_path"]["accuracy"]
            out[f"{prefix}_fast_ece"] = block["fast_path"]["ece"]
            out[f"{prefix}_fast_nll"] = block["fast_path"]["nll"]
    for key in ("selection_variability", "hard_rank_std", "joint_effective_rank", "joint_effective_rank_std",
                "global_rank_mean"):
        if key in diag:
            out[key] = diag[key]
    out["train_seconds"] = metrics.get("train_seconds")
    return out


PERCENT = ("accuracy", "ece")


def fmt(key: str, value) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, float):
        if any(key.endswith(p) for p in PERCENT):
            return f"{100 * value:.1f}"
        return f"{value:.3f}"
    return str(value)


def markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(c, r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m bara.report runs/exp/*  : a quick look at finished runs
    import sys

    rows = [row(m) for m in load_runs(sys.argv[1:])]
    cols = ["run", "val_accuracy", "val_ece", "val_nll", "val_fast_accuracy", "val_fast_ece", "val_fast_nll",
            "selection_variability", "hard_rank_std", "joint_effective_rank", "test_accuracy", "test_ece",
            "test_nll", "train_seconds"]
    print(markdown(rows, cols))

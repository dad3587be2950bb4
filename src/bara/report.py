"""Read finished runs (their metrics.json) and lay them out as rows and markdown tables."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .methods import METHODS


# The key of metrics.json of a run trained without its test split (bara.runs.run_train(test=False)): a benchmark's
# grid candidate, scored on validation only until bara.runs.add_test.
TEST_DEFERRED = "test_deferred"


def load_runs(folders) -> list[dict]:
    """metrics.json of every finished run among ``folders`` (folders without one are unfinished, and a benchmark's
    grid candidate whose test split is not scored yet is not finished either: skipped)."""
    runs = []
    for folder in folders:
        path = Path(folder) / "metrics.json"
        if not path.exists():
            continue
        metrics = json.loads(path.read_text())
        if not metrics.get(TEST_DEFERRED):
            runs.append({"run": Path(folder).name, **metrics})
    return runs


def row(metrics: dict) -> dict:
    """The numbers worth a table column: validation and test, sampled and one-pass, and the method's own
    (:meth:`Method.summary <bara.methods.Method.summary>` of its diagnostics)."""
    val = metrics.get("validation", {})
    diag = metrics.get("diagnostics") or val.get("diagnostics") or {}
    out = {"run": metrics.get("run", ""), "method": metrics["method"], "data": metrics["data"],
           "seed": metrics["seed"], "samples": metrics["samples"]}
    method = METHODS.get(metrics["method"])
    # Runs scored before Method.one_pass existed carry the sampled prediction of a method without a one-pass one
    # twice: not a one-pass prediction.
    one_pass = method.one_pass if method is not None else True
    for prefix, block in (("val", val), ("test", metrics)):
        for key in ("accuracy", "ece", "nll", "brier"):
            if key in block:
                out[f"{prefix}_{key}"] = block[key]
        if "fast_path" in block and one_pass:
            out[f"{prefix}_fast_accuracy"] = block["fast_path"]["accuracy"]
            out[f"{prefix}_fast_ece"] = block["fast_path"]["ece"]
            out[f"{prefix}_fast_nll"] = block["fast_path"]["nll"]
    if method is not None:
        out.update(method.summary(diag))
        # the same numbers on the validation split, where choices are made
        out.update({f"val_{k}": v for k, v in method.summary(val.get("diagnostics", {}), validation=True).items()})
    for key in ("train_seconds", "predict_seconds", "predict_seconds_s1", "peak_memory_mb", "trainable_params",
                "torch_threads"):
        out[key] = metrics.get(key)
    out["fast_predict_seconds"] = metrics.get("fast_path", {}).get("predict_seconds") if one_pass else None
    if not one_pass:
        out["predict_seconds_s1"] = None
    return out


PERCENT = ("accuracy", "ece")


def fmt(key: str, value) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, float):
        if any(key.endswith(p) for p in PERCENT):
            return f"{100 * value:.1f}"
        if key.endswith("_mb"):
            return f"{value:.0f}"
        if key.endswith(("_params", "_threads")) or key == "samples":  # counts (a mean of equal ones is a float)
            return f"{value:,.0f}"
        return f"{value:.3f}"
    if isinstance(value, int) and key.endswith("_params"):
        return f"{value:,}"
    return str(value)


def markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(c, r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def mean_std(values) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None for a single value) of the values that are not None."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarize(rows: list[dict], by: str, keys: list[str]) -> list[dict]:
    """One dict per value of ``by`` (in order of appearance): ``n`` rows and ``(mean, std)`` of each key."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(r[by], []).append(r)
    return [{by: name, "n": len(members), **{k: mean_std(m.get(k) for m in members) for k in keys}}
            for name, members in groups.items()]


def summary_markdown(groups: list[dict], by: str, columns: list[tuple[str, str]],
                     best: dict[str, str] | None = None, no_spread: tuple[str, ...] = ()) -> str:
    """Markdown of :func:`summarize`'s output, cells "mean ± std" ("mean" for one seed, and for the keys in
    ``no_spread``), ``columns`` as (key, header). ``best`` maps a key to "max" or "min": the best mean of
    that column is bold (ties too)."""
    best = best or {}
    winners = {}
    for key, direction in best.items():
        means = [g[key][0] for g in groups if g.get(key, (None,))[0] is not None]
        if means:
            winners[key] = fmt(key, max(means) if direction == "max" else min(means))

    def cell(g: dict, key: str) -> str:
        mean, std = g.get(key, (None, None))
        if mean is None:
            return "—"
        text = fmt(key, mean) if std is None or key in no_spread else f"{fmt(key, mean)} ± {fmt(key, std)}"
        return f"**{text}**" if winners.get(key) == fmt(key, mean) else text

    lines = ["| " + " | ".join([by, "n"] + [h for _, h in columns]) + " |", "|" + "---|" * (len(columns) + 2)]
    for g in groups:
        lines.append("| " + " | ".join([str(g[by]), str(g["n"])] + [cell(g, k) for k, _ in columns]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m bara.report runs/exp/*  : a quick look at finished runs
    import sys

    rows = [row(m) for m in load_runs(sys.argv[1:])]
    own = [f"val_{k}" for m in METHODS.values() if any(r["method"] == m.name for r in rows)
           for k, _ in m.report_columns]
    cols = ["run", "val_accuracy", "val_ece", "val_nll", "val_fast_accuracy", "val_fast_ece", "val_fast_nll",
            *[k for k in dict.fromkeys(own) if any(k in r for r in rows)], "test_accuracy", "test_ece", "test_nll",
            "train_seconds"]
    print(markdown(rows, cols))

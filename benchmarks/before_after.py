"""Two reports of the same benchmark side by side, dataset by dataset: each variant's validation numbers (its chosen
candidate, the tuning seed) and test means over seeds, for the sampled and the one-pass predictive, and BaRA's gate
diagnostics beside their nulls — issue 15's before/after table.

    .venv/bin/python benchmarks/before_after.py benchmarks/results/standard/results.jsonl \\
        benchmarks/store/standard/results.jsonl [--variants lora,adalora,blob,bara]

Cells: mean over the rows that have the value (± std over seeds where there are several); — where a report has
none (the diagnostics did not exist before 2026-12-01). Reads results.jsonl only (bara bench's report writes it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bara import report

# (key in results.jsonl, header). val_ keys exist on the chosen candidate's row only (the tuning seed).
NUMBERS = [("val_accuracy", "val acc %"), ("val_ece", "val ECE %"), ("val_nll", "val NLL"),
           ("val_fast_nll", "val NLL one-pass"), ("test_accuracy", "test acc %"), ("test_ece", "test ECE %"),
           ("test_nll", "test NLL"), ("test_fast_accuracy", "test acc % one-pass"),
           ("test_fast_ece", "test ECE % one-pass"), ("test_fast_nll", "test NLL one-pass")]
# BaRA's gate diagnostics on test (means over seeds) and on validation (val_: the chosen candidate).
_GATE = [("decided_share", "decided"), ("decided_share_null", "decided null"), ("gate_mi", "MI bits"),
         ("gate_mi_null", "MI null"), ("shuffle_nll_one_pass", "shuffle ΔNLL one-pass"),
         ("shuffle_nll_sampled", "shuffle ΔNLL S")]
GATE = [(f"val_{k}", f"val {h}") for k, h in _GATE] + [(k, f"test {h}") for k, h in _GATE]
PERCENT = {"val_accuracy", "val_ece", "test_accuracy", "test_ece", "test_fast_accuracy", "test_fast_ece"}
# Each dataset gets two tables: the predictive's numbers (every variant), and the gate's (variants that have one).


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cell(rows: list[dict], key: str) -> str:
    mean, std = report.mean_std(r.get(key) for r in rows)
    if mean is None:
        return "—"
    scale, digits = (100, 1) if key in PERCENT else (1, 3)
    return f"{scale * mean:.{digits}f}" + ("" if std is None else f" ± {scale * std:.{digits}f}")


def table(before: list[dict], after: list[dict], variants: list[str] | None) -> str:
    lines = []
    datasets = list(dict.fromkeys(r["dataset"] for r in before + after))
    for dataset in datasets:
        names = variants or list(dict.fromkeys(r["variant"] for r in before + after if r["dataset"] == dataset))
        lines += ["", f"### {dataset}"]
        for columns in (NUMBERS, GATE):
            shown = [n for n in names if columns is NUMBERS or any(
                r.get(k) is not None for r in before + after if (r["dataset"], r["variant"]) == (dataset, n)
                for k, _ in GATE)]
            if not shown:
                continue
            lines += ["", "| variant | report | n | " + " | ".join(h for _, h in columns) + " |",
                      "|---|---|---|" + "---|" * len(columns)]
            for name in shown:
                for label, rows in (("before", before), ("after", after)):
                    mine = [r for r in rows if (r["dataset"], r["variant"]) == (dataset, name)]
                    if mine:
                        lines.append(f"| {name} | {label} | {len(mine)} | "
                                     + " | ".join(cell(mine, k) for k, _ in columns) + " |")
    return "\n".join(lines).lstrip("\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path, help="the earlier report's results.jsonl")
    parser.add_argument("after", type=Path, help="the later report's results.jsonl")
    parser.add_argument("--variants", help="only these variants, in this order (comma-separated)")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",")] if args.variants else None
    print(table(read(args.before), read(args.after), variants))


if __name__ == "__main__":
    main()

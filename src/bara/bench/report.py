"""Stage 4 of ``bara bench``: the report. results.jsonl, results.md, cost.md and plots/ from the finished runs of
a plan; each method adds its own columns, post-hoc line and plots (:class:`bara.methods.Method`'s reporting
hooks), so nothing here names a method."""

from __future__ import annotations

import collections
import json
import os
import platform
import shlex
import shutil
from datetime import datetime
from pathlib import Path

from .. import report, runs
from ..errors import BaraError
from ..methods import METHODS
from ..plots import scatter_methods, shift_plot
from .plan import (SELECT, Choice, Plan, RunSpec, choices, diverged, finished, sets, shift_results, trained,
                   validation_metrics)
from .presets import Preset


# (key in report.row, header, which mean is best); one-pass columns and the methods' own appear where present.
METRICS = [("test_accuracy", "accuracy %", "max"), ("test_ece", "ECE %", "min"), ("test_nll", "NLL", "min"),
           ("test_brier", "Brier", "min")]
VALIDATION = [(f"val_{k[5:]}", h, b) for k, h, b in METRICS] + [("val_fast_nll", "one-pass NLL", "min")]
ONE_PASS = [("test_fast_accuracy", "one-pass accuracy %", "max"), ("test_fast_ece", "one-pass ECE %", "min"),
            ("test_fast_nll", "one-pass NLL", "min")]
OOD = [("test_ood_auroc", "OOD AUROC", "max")]
OOD_SET = "test_ood_auroc[{}]"  # a row's AUROC against one of several OOD sets, a column of its own each
SHIFTED = [("shift_accuracy", "accuracy %", "max"), ("shift_ece", "ECE %", "min"), ("shift_nll", "NLL", "min"),
           ("shift_brier", "Brier", "min")]
COST = [("train_seconds_per_step", "train s/step"), ("peak_memory_mb", "peak memory MB"),
        ("trainable_params", "trainable params"), ("predict_seconds", "predict s (test, S)"), ("samples", "S"),
        ("predict_seconds_s1", "predict s (S = 1)"), ("fast_predict_seconds", "predict s (one-pass)"),
        ("torch_threads", "threads")]
COST_NOTE = ("Mean over seeds. train s/step: the run's train_seconds (data and model loading, training, any post-hoc "
             "fit) over the steps it trained, both in the session that finished it (a post-hoc method fitted on a "
             "LoRA run of the benchmark: that run's training time added); peak memory: resident memory of the process"
             " during the run (CPU RAM); predict s: one prediction over the test split with the method's S samples (S"
             " = 0: one deterministic pass), with one sample, and the one-pass fast path (— where the method predicts"
             " in one pass anyway); threads: torch's intra-op threads in the run (— where the run predates the "
             "column). Two runs side by side on one machine, one thread each, take longer per step than one run with "
             "both threads, but finish more runs per hour.")
PROTOCOL = ("Every method trains with the same steps, batch size, max length, target modules and seeds; only the "
            "learning rate and the method's own options differ. Learning rates and options are chosen on the "
            "validation split; the test split is never used for a choice.")


# How far a run may fall behind its tuned reference before the --compare table flags it (issue 20's bar for the
# defaults): accuracy in points of a fraction, NLL in nats.
BEHIND = {"test_accuracy": 0.015, "test_nll": 0.05}


def load_references(paths) -> tuple[str, dict[tuple, list[dict]]]:
    """Several ``--compare`` files as one reference (:func:`load_reference`): their names and their runs, which
    must not overlap (two tuned references for the same method, model, data and size would be ambiguous)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    merged: dict[tuple, list[dict]] = {}
    where: dict[tuple, Path] = {}
    for path in paths:
        for key, rows in load_reference(path).items():
            if key in merged:
                raise BaraError(f"--compare: {where[key]} and {path} both hold runs of {key[3]} on {key[1]} at "
                                f"{key[2] or 'all'} training examples; fix: give only one of them")
            merged[key], where[key] = rows, Path(path)
    return "`, `".join(str(p) for p in paths), merged


def load_reference(path: str | Path) -> dict[tuple, list[dict]]:
    """The runs of another benchmark's results.jsonl (``--compare``: a tuned one), by (model, data, training examples,
    method), read with the preset.json beside it (which says the model and each dataset's max_train). Only variants
    named as their method count: the method as that benchmark ran it, not an ablation of it."""
    path = Path(path)
    if not path.is_file() or not (path.parent / "preset.json").is_file():
        raise BaraError(f"--compare {path}: not a results.jsonl with its benchmark's preset.json beside it; fix: give "
                        "the results.jsonl of a 'bara bench' output, e.g. benchmarks/results/standard/results.jsonl")
    try:
        preset = json.loads((path.parent / "preset.json").read_text())["preset"]
        datasets = preset.get("datasets", {})
        reference: dict[tuple, list[dict]] = {}
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row["variant"] == row["method"]:
                size = datasets.get(row["dataset"], {}).get("max_train", preset.get("max_train"))
                reference.setdefault((preset["model"], row["data"], size, row["method"]), []).append(row)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise BaraError(f"--compare {path}: cannot read it with its preset.json ({type(err).__name__}: {err}); fix: "
                        "give the results.jsonl of a 'bara bench' output, as that command wrote it") from None
    return reference


def _row(output: Path, spec: RunSpec, metrics: dict) -> dict:
    history = output / spec.folder / "history.jsonl"
    steps = len(history.read_text().splitlines()) if history.exists() else 0
    row = {"dataset": spec.dataset, "variant": spec.variant, "hash": spec.hash, "lr": spec.config.train.lr,
           **report.row(metrics)}
    # train_seconds and history.jsonl both cover the session that finished the run (after a resume: its part).
    row["train_seconds_per_step"] = row["train_seconds"] / steps if steps and row.get("train_seconds") else None
    if isinstance(spec.ood, str):
        row["ood_data"], row["test_ood_auroc"] = spec.ood, metrics.get("ood_auroc")
    elif spec.ood:
        row["ood_data"] = list(spec.ood)
        row.update({OOD_SET.format(name): metrics.get("ood_auroc_by_set", {}).get(name) for name in spec.ood})
    if spec.shift:  # {shift set: its numbers}, on all of its examples
        shifted = shift_results(output / spec.folder)
        row["shift"] = {name: {k: shifted[name].get(k) for k in ("accuracy", "ece", "nll", "brier", "n")}
                        for name in spec.shifts}
    return row


def _machine() -> str:
    import torch

    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{platform.platform()}, {os.cpu_count()} CPUs{gpu}"


def _header(title: str, preset: Preset, command: str, finished: int, total: int, lost: int = 0) -> list[str]:
    lines = [f"# {title}: preset `{preset.name}`", "",
             f"- command: `{command}`",
             f"- date: {datetime.now().astimezone().isoformat(timespec='seconds')}",
             f"- machine: {_machine()} (where this report was written)",
             f"- preset: `{preset.name}` from {preset.source}",
             f"- finished runs: {finished} of {total}"
             + (f"; {lost} diverged (listed under their dataset)" if lost else "")
             + ("" if finished + lost == total else " (the others are not reported; rerun the command to train them)"),
             ""]
    return lines


def _write_text(path: Path, text: str) -> Path:
    runs.write_atomic(path, lambda tmp: tmp.write_text(text))
    return path


def _copy(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    runs.write_atomic(target, lambda tmp: shutil.copyfile(source, tmp))
    return target


def write_report(plan_: Plan, specs: list[RunSpec], output: Path, command: str,
                 compare: tuple[str, dict] | None = None) -> list[Path]:
    """results.jsonl, results.md, cost.md and plots/ from the finished runs of ``specs``; others are left out.
    ``compare``: (its name, :func:`load_reference`'s runs) adds to each dataset a table of its runs beside them."""
    preset = plan_.preset
    done = [(spec, metrics) for spec in specs if finished(output, spec)
            for metrics in report.load_runs([output / spec.folder])]
    if not done:
        train = shlex.join(w for w in shlex.split(command) if w != "--report-only")  # the user's own preset path
        raise BaraError(f"no finished runs of preset '{preset.name}' in {output}; fix: run '{train}' first")
    rows = [_row(output, spec, metrics) for spec, metrics in done]
    written = [_write_text(output / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))]
    lost = {s.hash: d for s in specs if (d := diverged(output, s))}
    results = _header("Results", preset, command, len(done), len(specs), len(lost)) + _protocol(preset, specs)
    cost = _header("Cost", preset, command, len(done), len(specs), len(lost)) + [COST_NOTE]
    order = {v: i for i, v in enumerate(dict.fromkeys(s.variant for s in specs))}
    chosen = choices(plan_, output)
    for dataset in dict.fromkeys(s.dataset for s in specs):
        dataset_rows = sorted((r for r in rows if r["dataset"] == dataset), key=lambda r: order[r["variant"]])
        n_runs = sum(s.dataset == dataset for s in specs)
        results += ["", f"## {dataset} ({len(dataset_rows)} of {n_runs} runs finished)", "",
                    _schedule(specs, dataset), ""] + _tuning(plan_, dataset, output, chosen)
        cost += ["", f"## {dataset}", ""]
        if not dataset_rows:
            continue
        cost += [_wall_time(plan_, specs, output, dataset), "", _cost_table(dataset_rows)]
        groups, lines = _dataset_results(plan_, specs, dataset, dataset_rows, output, chosen, lost)
        results += lines
        if compare is not None:
            results += _beside_reference(plan_, specs, dataset, dataset_rows, *compare)
        written += _dataset_plots(output / "plots", dataset, groups, output,
                                  [(s, m) for s, m in done if s.dataset == dataset])
        if any(r.get("shift") for r in dataset_rows):
            classes = next((m.get("num_labels") for s, m in done if s.dataset == dataset), None)
            written.append(_shift_plot(output / "plots", dataset, dataset_rows, classes))
    names = [f"{n}-<dataset>-<variant>.png" for n in _run_plots(METHODS.values())]
    results += ["", f"Plots in plots/: {', '.join(names[:-1])} and {names[-1]} (the run of the lowest finished seed), "
                "accuracy-ece-<dataset>.png and accuracy-nll-<dataset>.png (means), and shift-<dataset>.png where a "
                "dataset names shift sets (accuracy, ECE and NLL in domain and on each shift set, mean ± std)."]
    written.append(_write_text(output / "results.md", "\n".join(results) + "\n"))
    written.append(_write_text(output / "cost.md", "\n".join(cost) + "\n"))
    return written


def _protocol(preset: Preset, specs: list[RunSpec]) -> list[str]:
    """results.md's protocol: how every method was run, what the columns mean, and each variant's options."""
    legends = " ".join(dict.fromkeys(m.column_legend for m in METHODS.values() if m.column_legend))
    lines = ["## Protocol", "", f"- {PROTOCOL}", _scope(preset, specs),
             "- Test split; mean ± sample std over seeds (one value: one seed). Accuracy and ECE (15 bins) in %, "
             "NLL and Brier of the averaged predictive; the best mean per column in bold (max for accuracy, min "
             f"for the others). One-pass: the deterministic prediction beside the sampled one. {legends} "
             "OOD AUROC (where a dataset names an OOD set): predictive entropy as the score separating its test "
             "texts from the OOD set's (a column per set where it names several). Under shift (where a dataset "
             "names shift sets): the adapter trained on the dataset, evaluated on every example of another dataset "
             "with the same labels (train, validation and test: it is never trained on), capped as the test split "
             "is; a table per shift set.",
             "", "| variant | method | options |", "|---|---|---|"]
    for variant in dict.fromkeys(s.variant for s in specs):
        spec = next(s for s in specs if s.variant == variant)
        lines.append(f"| {variant} | {spec.config.method} | `{json.dumps(spec.config.method_options)}` |")
    return lines


def _dataset_results(plan_: Plan, specs: list[RunSpec], dataset: str, rows: list[dict], output: Path,
                     chosen: dict[tuple[str, str], Choice], lost: dict) -> tuple[list[dict], list[str]]:
    """The means over seeds of one dataset's finished ``rows`` (by variant) and its tables in results.md."""
    ood_sets = dict.fromkeys(name for s in specs if s.dataset == dataset and not isinstance(s.ood, str)
                             for name in sets(s.ood))
    present = [c for c in OOD + [(OOD_SET.format(n), f"OOD AUROC {n}", "max") for n in ood_sets] + ONE_PASS
               if any(r.get(c[0]) is not None for r in rows)]
    columns = METRICS + present + _method_columns(rows)
    groups = report.summarize(rows, "variant", [c[0] for c in columns])
    lines = [_table(groups, columns)]
    lines += _prediction_choice(plan_, dataset, output, chosen, groups) + _post_hoc(rows)
    if plan_.validate_all:
        scored = [c for c in VALIDATION if any(r.get(c[0]) is not None for r in rows)]
        first, paired = _paired_with_first(rows, "val_nll")
        note = ""
        if any(r.get(PAIRED) is not None for r in paired):
            scored.append((PAIRED, f"Δ NLL vs {first}", "min"))
            note = (f"; Δ NLL vs {first}: the variant's NLL minus {first}'s on the same seed (the same training "
                    "subsample), mean ± std over the seeds both have: with few seeds the paired difference, not "
                    "the means' spread, says whether two variants differ")
        lines += ["", "Validation split, every seed (tune.validate_all), for choices between variants made on "
                  f"validation (one-pass NLL: the deterministic prediction of a sampling method{note}):", "",
                  _table(report.summarize(paired, "variant", [k for k, _, _ in scored]), scored)]
    gone = [f"{s.variant} seed {s.seed} (step {lost[s.hash]['step']})" for s in specs
            if s.dataset == dataset and s.hash in lost]
    if gone:
        lines += ["", "Diverged (non-finite training loss; left out of the means above, and not retried: the "
                  "same settings diverge the same way): " + ", ".join(gone) + "."]
    for shift in dict.fromkeys(name for r in rows for name in r.get("shift", {})):
        mine = _shifted(rows, shift)
        examples = ", ".join(str(n) for n in dict.fromkeys(r["shift_n"] for r in mine))
        lines += ["", f"### {dataset} under shift: tested on `{shift}` (all its examples: {examples})", "",
                  _table(report.summarize(mine, "variant", [k for k, _, _ in SHIFTED]), SHIFTED)]
    return groups, lines


PAIRED = "val_nll_vs_first"


def _paired_with_first(rows: list[dict], key: str) -> tuple[str, list[dict]]:
    """The first variant's name, and ``rows`` with :data:`PAIRED`: each row's ``key`` minus the first variant's at
    the same seed (None for the first variant's own rows and where either is missing)."""
    first = rows[0]["variant"]
    base = {r["seed"]: r.get(key) for r in rows if r["variant"] == first}
    return first, [{**r, PAIRED: r[key] - base[r["seed"]] if r["variant"] != first and r.get(key) is not None
                    and base.get(r["seed"]) is not None else None} for r in rows]


def _beside_reference(plan_: Plan, specs: list[RunSpec], dataset: str, rows: list[dict], name: str,
                      reference: dict[tuple, list[dict]]) -> list[str]:
    """Each variant's test means beside the reference's for the same model, data, training size and method, with
    the differences; "—" where the reference has no such runs."""
    config = next(s.config for s in specs if s.dataset == dataset)
    lines = ["", f"### {dataset} beside the tuned reference `{name}`", "",
             f"Test means over seeds; tuned: the reference's runs of the same method, model `{config.model}`, data and "
             f"training examples ({config.max_train or 'all'}), — where it has none; Δ: these minus the tuned "
             f"(accuracy in points); behind: more than {100 * BEHIND['test_accuracy']:g} points of accuracy or "
             f"{BEHIND['test_nll']:g} NLL worse than the tuned.", "",
             "| variant | n | accuracy % | tuned accuracy % | Δ accuracy | ECE % | tuned ECE % | NLL | tuned NLL "
             "| Δ NLL | behind |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = ("test_accuracy", "test_ece", "test_nll")
    for group in report.summarize(rows, "variant", list(keys)):
        mine = next(r for r in rows if r["variant"] == group["variant"])
        theirs = reference.get((plan_.preset.values["model"], mine["data"], config.max_train, mine["method"]), [])
        tuned = {k: report.mean_std(r.get(k) for r in theirs)[0] for k in keys}
        ours = {k: group[k][0] for k in keys}
        delta = {k: None if None in (ours[k], tuned[k]) else ours[k] - tuned[k] for k in keys}
        behind = "—" if None in delta.values() else ", ".join(
            k[5:] for k in ("test_accuracy", "test_nll")
            if (-delta[k] if k == "test_accuracy" else delta[k]) > BEHIND[k]) or "no"
        signed = lambda k, scale, digits: "—" if delta[k] is None else f"{scale * delta[k]:+.{digits}f}"  # noqa: E731
        lines.append(f"| {group['variant']} | {group['n']} | {report.fmt('test_accuracy', ours['test_accuracy'])} | "
                     f"{report.fmt('test_accuracy', tuned['test_accuracy'])} | {signed('test_accuracy', 100, 1)} | "
                     f"{report.fmt('test_ece', ours['test_ece'])} | {report.fmt('test_ece', tuned['test_ece'])} | "
                     f"{report.fmt('test_nll', ours['test_nll'])} | {report.fmt('test_nll', tuned['test_nll'])} | "
                     f"{signed('test_nll', 1, 3)} | {behind} |")
    return lines


def _cost_table(rows: list[dict]) -> str:
    groups = report.summarize(rows, "variant", [k for k, _ in COST])
    return report.summary_markdown(groups, "variant", COST, no_spread=("trainable_params", "samples", "torch_threads"))


def _wall_time(plan_: Plan, specs: list[RunSpec], output: Path, dataset: str) -> str:
    """What the dataset's runs cost in all: every trained run, the grid's candidates that were not chosen (scored on
    validation only, never tested: not ``finished``) included."""
    walls = [json.loads((output / s.folder / runs.METRICS).read_text()).get("wall_seconds") or 0.0
             for s in plan_.all_runs(specs, dataset, output) if trained(output, s)]
    return (f"Wall time: {sum(walls) / 3600:.2f} h over the {len(walls)} runs of this dataset (the grid's "
            "candidates that lost included): the sum of each run's wall time in the sitting that finished it, where "
            "it was trained (a run copied by --reuse counts its original time).")


def _tuned(plan_: Plan, dataset: str, output: Path) -> list[tuple]:
    """The entries of ``dataset`` that have a grid, each with its candidates ``[(spec, lr, options)]``."""
    return [(e, candidates) for e in plan_.entries
            if e.dataset == dataset and (candidates := plan_.candidates(e, output))]


def _tuning(plan_: Plan, dataset: str, output: Path, chosen: dict[tuple[str, str], Choice]) -> list[str]:
    """The learning rates chosen on validation for ``dataset``: every candidate's validation metrics."""
    tuned = _tuned(plan_, dataset, output)
    if not tuned:
        return []
    lines = [f"Learning rates (and options with a grid) chosen on the validation split (seed {plan_.tune_seed}, "
             f"by validation {plan_.select}; the test split plays no part):", "",
             "| variant | lr | options | val accuracy % | val ECE % | val NLL | chosen |",
             "|---|---|---|---|---|---|---|"]
    for entry, candidates in tuned:
        choice = chosen[dataset, entry.variant]
        for spec, lr, options in candidates:
            shown = ", ".join(f"{k} {v}" for k, v in options.items()) or "—"
            val, lost = validation_metrics(output, spec), diverged(output, spec)
            if lost:
                lines.append(f"| {entry.variant} | {lr:g} | {shown} | — | — | — "
                             f"| diverged at step {lost['step']} |")
                continue
            if not val:
                lines.append(f"| {entry.variant} | {lr:g} | {shown} | — | — | — | (not finished) |")
                continue
            numbers = " | ".join(report.fmt(k, val[k]) for k in ("accuracy", "ece", "nll"))
            mark = "**yes**" if (lr, options) == (choice.lr, choice.options) else ""
            lines.append(f"| {entry.variant} | {lr:g} | {shown} | {numbers} | {mark} |")
    followers = [f"{e.variant} takes {e.lr}'s rate" + (f", its {' and '.join(e.option_grid)} chosen at it (above)"
                                                       if e.option_grid else "")
                 for e in plan_.entries if e.dataset == dataset and isinstance(e.lr, str)]
    if followers:
        lines += ["", "; ".join(followers) + "."]
    return lines + [""]


def _prediction_choice(plan_: Plan, dataset: str, output: Path, chosen: dict[tuple[str, str], Choice],
                       groups: list[dict]) -> list[str]:
    """Sampled or one-pass prediction, chosen per variant like its rate: by the validation metric of the chosen
    candidate. One number per method for readers who want one, without looking at the test split."""
    select, rows = plan_.select, []
    for entry, candidates in _tuned(plan_, dataset, output):
        choice, group = chosen[dataset, entry.variant], next((g for g in groups if g["variant"] == entry.variant), None)
        val = next((validation_metrics(output, c) for c, lr, options in candidates
                    if (lr, options) == (choice.lr, choice.options)), {})
        if group is None or "fast_path" not in val or group.get("test_fast_nll", (None,))[0] is None:
            continue
        sampled, one_pass = val[select], val["fast_path"][select]
        fast = one_pass != sampled and SELECT[select](sampled, one_pass) == one_pass  # a tie keeps the sampled one
        test = "test_fast_" if fast else "test_"
        rows.append({"variant": entry.variant, "n": group["n"], f"val_{select}": (sampled, None),
                     f"val_fast_{select}": (one_pass, None),
                     "chosen": ("one-pass" if fast else f"sampled (S = {val.get('samples', '?')})", None),
                     **{f"test_{k}": group[test + k] for k in ("accuracy", "ece", "nll")}})
    if not rows:
        return []
    name = next(header for key, header, _ in METRICS if key == f"test_{select}")
    columns = [(f"val_{select}", f"val {name} sampled"), (f"val_fast_{select}", f"val {name} one-pass"),
               ("chosen", "chosen"), ("test_accuracy", "accuracy %"), ("test_ece", "ECE %"), ("test_nll", "NLL")]
    return ["", f"Sampled or one-pass, chosen on validation like the rates (validation {select} of the chosen "
            f"candidate, seed {plan_.tune_seed}), with the chosen predictive's test numbers:", "",
            report.summary_markdown(rows, "variant", columns)]


def _post_hoc(rows: list[dict]) -> list[str]:
    """What the post-hoc steps fitted on the validation split, seed by seed (each method's
    :meth:`~bara.methods.Method.fit_summary`), so a reader sees why a post-hoc step moves the numbers or does not."""
    lines, notes = [], {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        own = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["seed"])
        method = METHODS.get(own[0]["method"])
        fitted = method.fit_summary(own) if method is not None else None
        if fitted is not None:
            lines.append(f"- {variant}: {fitted}")
            notes[method.name] = method.fit_note
    if not lines:
        return []
    ordered = [m.fit_note for m in METHODS.values() if m.name in notes and m.fit_note]
    return ["", " ".join(["Post-hoc fits on the validation split.", *ordered]), "", *lines]


def _method_columns(rows: list[dict]) -> list[tuple]:
    """The columns of the methods of ``rows`` (their ``report_columns``, in the registry's order) that some row has
    a value for."""
    present = {r["method"] for r in rows}
    columns = dict.fromkeys(c for m in METHODS.values() if m.name in present for c in m.report_columns)
    return [(k, h, None) for k, h in columns if any(r.get(k) is not None for r in rows)]


def _run_plots(methods) -> list[str]:
    """The plots every run writes and those of ``methods`` (their ``run_files``), by name without ".png"."""
    own = (f[:-len(".png")] for m in methods for f in m.run_files if f.endswith(".png"))
    return list(dict.fromkeys(["reliability", *own]))


def _table(groups: list[dict], columns: list[tuple]) -> str:
    return report.summary_markdown(groups, "variant", [(k, h) for k, h, _ in columns],
                                   best={k: b for k, _, b in columns if b})


def _scope(preset: Preset, specs: list[RunSpec]) -> str:
    first = specs[0].config
    seeds = ", ".join(str(s) for s in dict.fromkeys(s.seed for s in specs))
    cap = lambda n: "all" if n is None else f"{n:,}"  # noqa: E731

    order = list(preset.values.get("datasets", {}))
    specs = sorted(specs, key=lambda s: order.index(s.dataset) if s.dataset in order else len(order))

    def setting(key) -> tuple[object, dict[str, object]]:  # most datasets' value (a tie: the first's), the others
        values = {s.dataset: getattr(s.config, key) for s in specs}
        counts = collections.Counter(values.values())
        common = next(v for v in values.values() if counts[v] == max(counts.values()))
        return common, {d: v for d, v in values.items() if v != common}

    def text(key) -> str:
        common, others = setting(key)
        return cap(common) + (f" ({'; '.join(f'{d}: {cap(v)}' for d, v in others.items())})" if others else "")

    precisions = {s.dataset: s.config.mixed_precision for s in specs}

    def where(p: str) -> str:  # the datasets in precision p
        mine = [d for d, q in precisions.items() if q == p]
        return ("every method" if len(mine) == len(precisions)
                else f"every method of {', '.join(mine)} (float32 elsewhere)")

    precision = "".join(
        f" Mixed precision `{p}` for {where(p)}: the base model's matrix products in {p} under autocast, in training "
        "and prediction; weights, adapters and logits float32." for p in sorted(set(precisions.values()) - {"no"}))
    return (f"- Model `{first.model}`; training examples: {text('max_train')}; validation and test examples: "
            f"{text('max_eval')}; seeds {seeds}.{precision}")


def _schedule(specs: list[RunSpec], dataset: str) -> str:
    mine = [s for s in specs if s.dataset == dataset]
    t = mine[0].config.train
    length = f"{t.steps} steps" if t.steps > 0 else f"{t.epochs:g} epochs"
    rate = lambda s: "not chosen yet" if s.pending else f"{s.config.train.lr:g}"  # noqa: E731
    rates = dict.fromkeys(rate(s) for s in mine)
    lr = next(iter(rates)) if len(rates) == 1 else ", ".join(
        f"{v} {r}" for v, r in dict.fromkeys((s.variant, rate(s)) for s in mine))
    extra = "".join(f" {label} {', '.join(f'`{n}`' for n in sets(value))}." for label, value in (
        ("OOD set:" if isinstance(mine[0].ood, str) else "OOD sets:", mine[0].ood),
        ("Shift: also tested on", mine[0].shift)) if value)
    return (f"Data `{mine[0].config.data}`: {length}, batch size {t.batch_size}, max length {t.max_length}, "
            f"learning rate {lr}.{extra}")


def _shifted(rows: list[dict], shift: str) -> list[dict]:
    """The rows' numbers on the shift set ``shift``, as ``shift_<metric>`` beside each row's variant."""
    return [{"variant": r["variant"], **{f"shift_{k}": v for k, v in r["shift"][shift].items()}}
            for r in rows if shift in r.get("shift", {})]


def _shift_plot(plots: Path, dataset: str, rows: list[dict], num_labels: int | None) -> Path:
    """shift-DATASET.png: each variant's test numbers in domain beside its numbers on each shift set, and the null
    (a uniform prediction over ``num_labels`` classes)."""
    metrics = ("accuracy", "ece", "nll")
    inside = f"{dataset} (test)"
    table = {g["variant"]: {inside: {m: g[f"test_{m}"] for m in metrics}}
             for g in report.summarize(rows, "variant", [f"test_{m}" for m in metrics])}
    names = list(dict.fromkeys(name for r in rows for name in r.get("shift", {})))
    for name in names:
        for g in report.summarize(_shifted(rows, name), "variant", [f"shift_{m}" for m in metrics]):
            table[g["variant"]][name] = {m: g[f"shift_{m}"] for m in metrics}
    return shift_plot(table, [inside] + names, plots / f"shift-{dataset}.png",
                      f"{dataset}: in domain and under shift (test; mean ± std over seeds)", num_labels)


def _dataset_plots(plots: Path, dataset: str, groups: list[dict], output: Path, done: list) -> list[Path]:
    written = []
    points = [{"method": g["variant"], "accuracy %": 100 * g["test_accuracy"][0], "ECE %": 100 * g["test_ece"][0],
               "NLL": g["test_nll"][0]} for g in groups if None not in
              (g["test_accuracy"][0], g["test_ece"][0], g["test_nll"][0])]
    if points:
        written.append(scatter_methods(points, "ECE %", "accuracy %", plots / f"accuracy-ece-{dataset}.png",
                                       f"{dataset}: test accuracy against ECE (mean over seeds)"))
        written.append(scatter_methods(points, "NLL", "accuracy %", plots / f"accuracy-nll-{dataset}.png",
                                       f"{dataset}: test accuracy against NLL (mean over seeds)"))
    lowest: dict[str, RunSpec] = {}
    for spec, _ in done:
        if spec.variant not in lowest or spec.seed < lowest[spec.variant].seed:
            lowest[spec.variant] = spec
    for variant, spec in lowest.items():
        for name in _run_plots([METHODS[spec.config.method]]):
            source = output / spec.folder / f"{name}.png"
            if source.exists():
                written.append(_copy(source, plots / f"{name}-{dataset}-{variant}.png"))
    return written

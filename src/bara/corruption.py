"""Input corruption for the classification track, in the manner of Ovadia et al. (2019, "Can you trust your
model's uncertainty?"): a benchmark's finished adapters score its test split again with seeded character typos
or word dropout at increasing intensity, with no retraining, so that each method's accuracy, ECE and NLL can be
read against the intensity (a method whose uncertainty is worth having gets less confident as its inputs get worse,
and its calibration degrades slowly).

- ``typos`` at p %: each letter, with probability p, gets one of four typing errors, chosen uniformly: deleted,
  doubled, swapped with the next character, or replaced by a random lower-case letter.
- ``word_dropout`` at p %: each whitespace-separated word is dropped with probability p (one word is kept when all
  would go).

The corruption of a text depends only on the kind, the intensity and the run's seed, so every method of a seed
scores the very same corrupted texts. Intensity 0 is the run's own test metrics (metrics.json), not a new pass.

The two corruptions are written here rather than taken from nlpaug: each is a few seeded lines, and nlpaug
would bring its network-loading dependencies (requests, gdown, pandas) for them.

Each run's results go to its folder (``corruption_metrics.json``, updated point by point: an interrupted command
continues where it stopped); the benchmark-level table and plot go to the benchmark's output folder.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import string
import warnings
from pathlib import Path

import numpy as np

from .data.tasks import Split
from .errors import BaraError

KINDS = ("typos", "word_dropout")
INTENSITIES = (0, 5, 10, 20, 40)
RUN_FILE = "corruption_metrics.json"
# Written in a run's folder when its retrain scores other numbers than it stored; committed with the run (a store
# moves between machines), so that every later report names the run as left out and why, and the same kind of machine
# does not retrain it again.
REFUSED_FILE = "retrain_refused.json"
METRICS = ("accuracy", "ece", "nll", "brier", "n")


def typos(text: str, rate: float, rng: random.Random) -> str:
    """``text`` with each letter, with probability ``rate``, deleted, doubled, swapped with the next character or
    replaced by a random letter (one of the four, uniformly)."""
    out, i = [], 0
    while i < len(text):
        char = text[i]
        if not char.isalpha() or rng.random() >= rate:
            out.append(char)
        else:
            error = rng.randrange(4)
            if error == 1:
                out += [char, char]
            elif error == 2 and i + 1 < len(text):
                out += [text[i + 1], char]
                i += 1
            elif error >= 2:  # a replacement (also a swap at the last character)
                out.append(rng.choice(string.ascii_lowercase))
            # error 0: deleted
        i += 1
    return "".join(out)


def word_dropout(text: str, rate: float, rng: random.Random) -> str:
    """``text`` with each word dropped with probability ``rate``; one word (at random) stays if all would go."""
    words = text.split()
    kept = [w for w in words if rng.random() >= rate]
    if words and not kept:
        kept = [rng.choice(words)]
    return " ".join(kept)


CORRUPTIONS = {"typos": typos, "word_dropout": word_dropout}


def check(kind: str, intensity: float) -> None:
    """BaraError unless ``kind`` is a known corruption and ``intensity`` a percentage."""
    if kind not in CORRUPTIONS:
        raise BaraError(f"unknown corruption {kind!r}; fix: use one of {', '.join(KINDS)}")
    if not 0 <= intensity <= 100:
        raise BaraError(f"a corruption intensity is a percentage in [0, 100], got {intensity:g}")


def corrupt(split: Split, kind: str, intensity: float, seed: int) -> Split:
    """``split`` with its texts corrupted by ``kind`` at ``intensity`` percent, seeded by (kind, intensity, seed)."""
    check(kind, intensity)
    rng = random.Random(f"{kind}/{intensity:g}/{seed}")  # a str seed is hashed deterministically (sha512)
    change = CORRUPTIONS[kind]
    return Split(texts=[change(t, intensity / 100, rng) for t in split.texts], labels=list(split.labels),
                 choices=split.choices)


def _scores(metrics: dict) -> dict:
    """The metrics kept per point: the predictive's and, for a sampling method, its one-pass prediction's."""
    kept = {k: metrics[k] for k in METRICS if k in metrics}
    if "fast_path" in metrics:
        kept["fast_path"] = {k: metrics["fast_path"][k] for k in METRICS if k in metrics["fast_path"]}
    return kept


def _scored(folder: Path) -> dict:
    path = folder / RUN_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _unscored(done: dict, kinds, intensities) -> list[tuple[str, float]]:
    """The (kind, intensity) points of ``kinds`` x ``intensities`` that ``done`` (a run's RUN_FILE) lacks."""
    return [(k, i) for k in kinds for i in intensities if f"{i:g}" not in done.get(k, {})]


def _machine() -> dict:
    """What a seeded retrain's numbers depend on besides its config: the kind of CPU and torch's thread count."""
    import platform

    import torch

    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    return {"cpu": cpu or platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()}


def _refusal(folder: Path) -> dict | None:
    path = folder / REFUSED_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _refused_here(folder: Path, here: dict) -> dict | None:
    """The refusal on record in ``folder`` if it was on this kind of machine (``here``, :func:`_machine`'s)."""
    refusal = _refusal(folder)
    return refusal if refusal and all(refusal.get(k) == v for k, v in here.items()) else None


def _refused_reason(refusal: dict) -> str:
    return (f"retrained on {refusal['cpu']} at {refusal['torch_threads']} thread(s) to other {refusal['split']} "
            f"numbers than it stored, --retrain-missing; {REFUSED_FILE}")


def retrain_adapter(folder: Path, progress_bar: bool = True) -> str:
    """Train the finished run in ``folder`` again, from the config in its metrics.json, for its weights: it scores
    the split the run scored (validation if it has it, else test; not its OOD sets), and its adapter files move into
    ``folder`` only when those numbers equal the stored ones to 1e-6 (a seeded run retrains bit for bit on the same
    kind of machine); the stored metrics are never touched. Returns a line saying what matched. BaraError, the
    retrained run left in ``folder/.retrain.partial`` to inspect, when they differ: its corrupted scores would not
    belong with the run's clean ones; the refusal is also recorded in ``folder/retrain_refused.json`` (the machine,
    the stored and the retrained numbers), which a store commits and a retrain that matches removes. A finished
    retrain left there by an earlier call at the same thread count is compared again, not trained again; one stopped
    half-way continues from its checkpoint."""
    import torch

    from . import checkpoint
    from .runs import METRICS as RUN_METRICS, RunConfig, resumable, run_train, write_json

    stored = json.loads((folder / RUN_METRICS).read_text())
    config = RunConfig.from_dict(stored["config"])
    work = folder / ".retrain.partial"
    on_validation = "validation" in stored
    before = json.loads((work / RUN_METRICS).read_text()) if (work / RUN_METRICS).exists() else {}
    # Retrained before here (and refused; the folder is never committed) at this thread count: the same numbers again.
    if before.get("torch_threads") == torch.get_num_threads():
        fresh = before
    else:
        # A retrain stopped half-way continues (resuming is exact); a damaged checkpoint, or one of another config,
        # is trained again from the start. Checked here, before training: an error of the training itself surfaces.
        resume = not before and bool(checkpoint.candidates(work))
        if resume:
            try:
                resumable(work, config)
            except BaraError:
                resume = False
        fresh = run_train(config, work, resume=resume, overwrite=not resume, progress_bar=progress_bar,
                          validation=on_validation, test=not on_validation)
    split, old, new = ("validation", stored["validation"], fresh["validation"]) if on_validation \
        else ("test", stored, fresh)
    differ = {k: (old[k], new[k]) for k in ("accuracy", "nll", "ece") if abs(old[k] - new[k]) > 1e-6}
    if differ:
        record = {"stored": {k: a for k, (a, _) in differ.items()}, "retrained": {k: b for k, (_, b) in differ.items()}}
        write_json(folder / REFUSED_FILE, {**_machine(), "split": split, **record})
        changes = ", ".join(f"{k} {a:.6f} -> {b:.6f}" for k, (a, b) in differ.items())
        raise BaraError(f"{folder} retrained to other {split} numbers ({changes}): another kind of machine, or "
                        f"another thread count (it trained with {stored.get('torch_threads')}; this one "
                        f"{torch.get_num_threads()})?; the retrained run is left in {work}; fix: set "
                        "OMP_NUM_THREADS to the run's, or pass --skip-missing to leave the run out")
    for path in sorted(work.rglob("*")):
        target = folder / path.relative_to(work)
        if path.is_file() and (path.suffix == ".safetensors" or path.name.endswith("_config.json")) \
                and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            path.replace(target)
    shutil.rmtree(work)
    (folder / REFUSED_FILE).unlink(missing_ok=True)
    return f"{folder}: adapter retrained; {split} accuracy {new['accuracy']:.4f}, NLL {new['nll']:.4f} as stored"


def corrupt_run(folder: Path, kinds=KINDS, intensities=INTENSITIES, progress_bar: bool = True) -> dict:
    """Score the finished run in ``folder`` on its corrupted test split at every (kind, intensity) not scored yet;
    returns ``{kind: {intensity: metrics}}`` (intensities as strings, as in the JSON file)."""
    import torch

    from .metrics import evaluate
    from .runs import METRICS as RUN_METRICS, load_adapter, predict, task_of, write_json

    path = folder / RUN_FILE
    done = _scored(folder)
    todo = _unscored(done, kinds, intensities)
    if not todo:
        return done
    run_metrics = json.loads((folder / RUN_METRICS).read_text())
    classifier, method, config = load_adapter(folder)
    task = task_of(config)
    if task.kind != "classification":
        raise BaraError(f"{folder} is a {task.kind} run; text corruption is for classification runs (it would "
                        "change the question but not its choices)")
    samples, batch_size, seed = method.default_samples, config.train.eval_batch_size, config.train.seed
    labels = torch.tensor(task.test.labels)
    for kind, intensity in todo:
        if intensity == 0:  # the clean test split: the run's own test metrics
            point = _scores(run_metrics)
        else:
            split = corrupt(task.test, kind, intensity, seed)
            point = evaluate(predict(classifier, method, split, samples, batch_size, seed, progress_bar), labels)
            if samples > 0 and method.one_pass:
                point["fast_path"] = evaluate(predict(classifier, method, split, 0, batch_size, seed, progress_bar),
                                              labels)
            point = _scores(point)
        done.setdefault(kind, {})[f"{intensity:g}"] = point
        write_json(path, done)
    return done


def _chosen(rows: dict[str, list[dict]], only_method: list[str] | None):
    """The test a row passes to be scored: every row, or those ``only_method`` selects by ``bara bench``'s rule (a
    variant's name selects that variant only; a method's name that no variant has, every variant of it)."""
    from .bench.run import method_matcher, warn_shadowed

    if not only_method:
        return lambda row: True
    names = set(only_method)
    variants = {row["variant"]: row["method"] for finished in rows.values() for row in finished}
    valid = set(variants) | set(variants.values())
    if names - valid:
        raise BaraError(f"--only-method: '{sorted(names - valid)[0]}' has no finished run here; fix: use some of "
                        f"{', '.join(sorted(valid))}")
    warn_shadowed(names, variants)
    match = method_matcher(names, variants)
    return lambda row: match(row["variant"], row["method"])


def _finished_runs(output: Path, dataset: str) -> list[dict]:
    """The rows of the benchmark's results.jsonl for ``dataset`` (the chosen runs: no losing grid candidates)."""
    results = output / "results.jsonl"
    if not results.exists() and (output / "runs").is_dir():  # a benchmark store keeps the run folders, no report
        raise BaraError(f"{output} has run folders but no results.jsonl (no report written here yet); fix: write "
                        f"it with 'bara bench --preset PRESET --output {output} --report-only' (PRESET: the preset "
                        f"that made the runs, e.g. {output.name}), then rerun this command")
    if not results.exists():
        raise BaraError(f"{output} has no results.jsonl; fix: point --bench at the --output folder of a 'bara bench' "
                        "that has finished runs")
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    mine = [r for r in rows if r["dataset"] == dataset]
    if not mine:
        names = sorted({r["dataset"] for r in rows})
        raise BaraError(f"{output}/results.jsonl has no finished run of {dataset!r}; fix: use one of "
                        f"{', '.join(names)} or run 'bara bench --only-dataset {dataset}' first")
    return mine


def _num_labels(output: Path, dataset: str, finished: list[dict]) -> int | None:
    """The classes of ``dataset``, from a finished run's metrics.json (None if none records them)."""
    from .runs import METRICS as RUN_METRICS

    for row in finished:
        path = output / "runs" / dataset / row["variant"] / row["run"] / RUN_METRICS
        classes = json.loads(path.read_text()).get("num_labels") if path.exists() else None
        if classes:
            return int(classes)
    return None


def summarise(points: list[dict], kinds, intensities, one_pass: bool = False) -> dict:
    """``{variant: {kind: {intensity: {metric: (mean, std, n)}}}}`` over seeds, from the per-run points;
    ``one_pass``: of the sampling methods' one-pass predictions instead (the other variants left out)."""
    if one_pass:
        points = [{**p, **p["fast_path"]} for p in points if "fast_path" in p]
    table: dict = {}
    for variant in dict.fromkeys(p["variant"] for p in points):
        for kind in kinds:
            for intensity in intensities:
                mine = [p for p in points if p["variant"] == variant and p["kind"] == kind
                        and p["intensity"] == intensity]
                if not mine:
                    continue
                values = {m: np.array([p[m] for p in mine], dtype=float) for m in ("accuracy", "ece", "nll")}
                table.setdefault(variant, {}).setdefault(kind, {})[intensity] = {
                    m: (v.mean(), v.std(ddof=1) if len(v) > 1 else 0.0, len(v)) for m, v in values.items()}
    return table


def markdown(dataset: str, table: dict, kinds, intensities, command: str, left_out=(),
             num_labels: int | None = None, pending=(), one_pass: dict | None = None,
             scored_by: str | None = None) -> str:
    """The report: one table per corruption, a row per variant, accuracy % / ECE % / NLL per intensity (means over
    seeds); ``left_out`` lists the runs skipped for want of an adapter, each with the reason; ``num_labels`` adds
    the null (a uniform prediction) to read the numbers against; ``pending`` lists the runs not (fully) scored yet,
    which makes the report a partial one; ``one_pass`` (:func:`summarise`'s, of the one-pass predictions) adds a
    row under each sampling method. ``scored_by``: the command that scored the points, when ``command`` only
    rewrote the report from them (``--report-only``): the one that reproduces them is named first."""
    one_pass = one_pass or {}
    said = f"`{command}`"
    if scored_by:
        said = f"`{scored_by}` (this report rewritten from the points it scored: `{command}`)"
    lines = [f"# {dataset}: the test split corrupted", "", said, "",
             "Each cell: accuracy % / ECE % / NLL, mean over seeds, of the method's own predictive (S samples for the "
             "sampling methods). Intensity 0 is the clean test split. Corruptions: see `bara corrupt --help`."
             + (" Under each sampling method, its one-pass prediction on the same inputs (\", one pass\"): the "
                "difference is what its sampling buys." if one_pass else ""), ""]
    if num_labels:
        lines += [f"The null, a uniform prediction over the {num_labels} classes (it knows nothing), scores accuracy "
                  f"{100 / num_labels:.1f} %, NLL ln {num_labels} = {math.log(num_labels):.3f} and an ECE of about "
                  f"0 at every intensity: an NLL above {math.log(num_labels):.3f} is worse than knowing nothing, and "
                  "a low ECE means something only beside the accuracy it comes with.", ""]
    if pending:
        lines += [f"**Partial**: {len(pending)} run(s) not scored yet, their methods' means are over fewer seeds "
                  f"(the same command scores them): {', '.join(pending)}.", ""]
    if left_out:
        lines += [f"Left out (their methods' means are over fewer seeds): {'; '.join(left_out)}.", ""]
    for kind in kinds:
        lines += [f"## {kind.replace('_', ' ')}", "",
                  "| method | " + " | ".join(f"{i:g} %" for i in intensities) + " |",
                  "|---|" + "---|" * len(intensities)]
        for variant, kinds_ in table.items():
            rows = [(variant, kinds_)] + ([(f"{variant}, one pass", one_pass[variant])] if variant in one_pass else [])
            for name, cells_of in rows:
                cells = []
                for intensity in intensities:
                    cell = cells_of.get(kind, {}).get(intensity)
                    cells.append("—" if cell is None else f"{100 * cell['accuracy'][0]:.1f} / "
                                 f"{100 * cell['ece'][0]:.1f} / {cell['nll'][0]:.3f}")
                seeds = max((cell["accuracy"][2] for cell in cells_of.get(kind, {}).values()), default=0)
                label = f"{name} ({seeds} seed{'s' if seeds > 1 else ''})" if pending or left_out else name
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _write_report(output: Path, dataset: str, finished: list[dict], kinds, intensities, command: str,
                  why: dict, scored_by: str | None = None) -> list[Path]:
    """Write ``corruption-DATASET.md``, ``.jsonl`` and ``plots/corruption-DATASET.png`` from the points the runs'
    folders hold now: a run with every point is in the means, one that lacks some is named as not scored yet (a
    partial report), one in ``why`` ({folder: reason}) or with a refused retrain on record (``REFUSED_FILE``, from
    any earlier command) as left out; ``scored_by`` as :func:`markdown`'s."""
    from .checkpoint import write_atomic
    from .plots import corruption_curves

    points, left_out, pending = [], [], []
    for row in finished:
        folder = output / "runs" / dataset / row["variant"] / row["run"]
        name = f"{row['variant']}/{row['run']}"
        scored = _scored(folder)
        unscored = _unscored(scored, kinds, intensities)
        if folder in why:
            left_out.append(f"{name} ({why[folder]})")
        elif unscored and (refusal := _refusal(folder)):
            left_out.append(f"{name} ({_refused_reason(refusal)})")
        elif unscored:
            pending.append(name)
        else:
            points += [{"variant": row["variant"], "method": row["method"], "seed": row["seed"], "run": row["run"],
                        "kind": kind, "intensity": intensity, **scored[kind][f"{intensity:g}"]}
                       for kind in kinds for intensity in intensities]
    table = summarise(points, kinds, intensities)
    num_labels = _num_labels(output, dataset, finished)
    report = output / f"corruption-{dataset}.md"
    one_pass = summarise(points, kinds, intensities, one_pass=True)
    write_atomic(report, lambda tmp: tmp.write_text(markdown(dataset, table, kinds, intensities, command, left_out,
                                                             num_labels, pending, one_pass, scored_by)))
    lines = output / f"corruption-{dataset}.jsonl"
    write_atomic(lines, lambda tmp: tmp.write_text("".join(json.dumps(p) + "\n" for p in points)))
    plot = corruption_curves(table, kinds, intensities, output / "plots" / f"corruption-{dataset}.png",
                             f"{dataset}: test split corrupted (mean ± std over seeds)", num_labels)
    return [report, lines, plot]


def run_corrupt(output: Path, datasets: list[str], kinds=KINDS, intensities=INTENSITIES, progress_bar: bool = True,
                command: str = "bara corrupt", missing: str = "error", report_only: bool = False,
                only_method: list[str] | None = None, scored_by: str | None = None) -> list[Path]:
    """Score every chosen run of ``datasets`` in the benchmark folder ``output`` on corrupted test splits and write
    ``corruption-DATASET.md``, ``corruption-DATASET.jsonl`` and ``plots/corruption-DATASET.png``; returns their paths.
    The report is written before the first run and again after each, from the points scored so far (a run not
    fully scored yet is named there, not averaged), so a long command that stops leaves a partial report to read;
    ``report_only`` writes it and scores nothing (``scored_by``: the command that scores the points, named in that
    report as the one that reproduces them; the CLI derives it from the parsed flag). ``only_method``: score
    only the runs of these variants or methods (the others wait, named in the report as not scored yet): some
    methods first, or two processes side by side.
    A run with points left to score and no adapter in its folder: ``missing`` "error" (BaraError before any work,
    naming them all), "skip" (left out, and listed in the report) or "retrain" (:func:`retrain_adapter`; a run that
    retrains to other numbers than it stored is left out with a warning, and listed in the report)."""
    from tqdm.auto import tqdm

    from .runs import has_weights

    for kind in kinds:
        for intensity in intensities:
            check(kind, intensity)
    rows = {dataset: _finished_runs(output, dataset) for dataset in datasets}
    chosen = _chosen(rows, only_method)
    lacking = []  # every error before any work
    for dataset, finished in rows.items():
        for row in filter(chosen, finished):
            folder = output / "runs" / dataset / row["variant"] / row["run"]
            if not folder.is_dir():
                raise BaraError(f"{folder} is listed in results.jsonl but is not there (a report copied without its "
                                "runs?); fix: point --bench at the folder 'bara bench' trained into")
            if _unscored(_scored(folder), kinds, intensities) and not has_weights(folder):
                lacking.append(folder)
    if report_only:
        return [path for dataset, finished in rows.items()
                for path in _write_report(output, dataset, finished, kinds, intensities, command, {}, scored_by)]
    if lacking and missing == "error":
        raise BaraError(f"{len(lacking)} run(s) to score have no adapter here (trained on another machine?): "
                        f"{', '.join(str(f.relative_to(output)) for f in lacking)}; fix: pass --retrain-missing to "
                        "train them again from their stored config (checked against their stored numbers), or "
                        "--skip-missing to leave them out of the curves")
    why = {folder: "no adapter here, --skip-missing" for folder in lacking if missing == "skip"}
    here = _machine()
    for folder in lacking:  # refused on this kind of machine before: it would retrain to the same numbers
        if missing == "retrain" and (refusal := _refused_here(folder, here)):
            why[folder] = _refused_reason(refusal)
    written = []
    for dataset, finished in rows.items():
        written += _write_report(output, dataset, finished, kinds, intensities, command, why)  # the same paths later
        for row in tqdm(list(filter(chosen, finished)), desc=f"corrupt {dataset}", unit="run",
                        disable=not progress_bar):
            folder = output / "runs" / dataset / row["variant"] / row["run"]
            if folder in why or not _unscored(_scored(folder), kinds, intensities):
                continue
            # Retrained just before it is scored, not all first: a command stopped after N retrains keeps N runs'
            # points (a retrained adapter is not committed, so one not scored yet would be trained again later).
            if folder in lacking:
                try:
                    print(retrain_adapter(folder, progress_bar), flush=True)
                except BaraError as error:  # another kind of machine: the other runs are still worth scoring
                    warnings.warn(f"{error}; it is left out of the curves", UserWarning, stacklevel=2)
                    refusal = _refused_here(folder, here)  # None: the retrain failed for another reason
                    why[folder] = _refused_reason(refusal) if refusal else f"its retrain failed: {error}"
                    _write_report(output, dataset, finished, kinds, intensities, command, why)
                    continue
            corrupt_run(folder, kinds, intensities, progress_bar)
            _write_report(output, dataset, finished, kinds, intensities, command, why)
    return written

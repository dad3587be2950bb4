"""The benchmark harness behind ``bara bench``: a preset (model, datasets, methods, seeds, training settings)
expands to runs; each is trained once by :func:`bara.runs.run_train` into its own folder, then all finished
runs are summarised. One module per stage, each importing only those before it: :mod:`.presets` (read and
resolve a preset) -> :mod:`.plan` (entries, runs, hashes, the choices of the grids) -> :mod:`.run` (train) and
:mod:`.report` (write the report); :func:`run_bench` here strings them together.

Layout of the output folder ``DIR``::

    runs/<dataset>/<variant>/seed<k>-<hash>/   one run; <hash> = run_hash(config, ood, shift), so a changed setting
                                               is a new run; shift_metrics.json beside metrics.json when the
                                               dataset sets `shift` ({shift set: metrics on all its examples})
    results.jsonl   one line per finished run: report.row + dataset, variant, hash
    results.md      per dataset: variant x metric, mean ± std over seeds, best in bold (OOD AUROC where the
                    dataset sets `ood`, one per set); a table "under shift" per set where it sets `shift`
    cost.md         per dataset: variant x (train s/step, peak memory, trainable parameters, prediction time)
    preset.json     the preset as resolved for the last report (what --compare reads beside results.jsonl)
    plots/          reliability-<dataset>-<variant>.png and the method's own plots (Method.run_files; copied
                    from the run of the lowest seed), accuracy-ece-<dataset>.png, accuracy-nll-<dataset>.png

A run is finished when all of its outputs exist: metrics.json (written last by training) with its test split
scored, and shift_metrics.json with every shift set when its dataset sets ``shift``. Finished runs are skipped and
are the only ones reported. A grid's candidates score only their validation split when they train
(``"test_deferred"`` in metrics.json): the one chosen scores its test split, OOD and shift sets from its saved
adapter in the last stage, the others never do. Any other run is (re)started, from its checkpoint when it has one;
one that has metrics.json but lacks its test or shift evaluations only runs those, set by set. The preset format
is documented at the top of ``benchmarks/presets.toml``.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from ..errors import BaraError
from ..runs import write_json
from .plan import (CHECKPOINT_EVERY, DIVERGED, SHIFT, Choice, Entry, Plan, RunSpec, choices, diverged, expand,
                   finished, plan, run_hash)
from .presets import Preset, load_preset, packaged_presets
from .rehash import rehash
from .report import load_reference, load_references, write_report
from .run import ERROR, SECONDS_PER_STEP, check_defaults, estimate, run_steps, select, train_plan


def run_bench(preset: Preset | str, output: str | Path, progress: bool = True, report_only: bool = False,
              only_dataset: str | None = None, only_method: str | None = None, command: str | None = None,
              reuse: str | Path | None = None, announce: bool = False,
              compare: str | Path | list[str | Path] | None = None) -> dict:
    """Train the runs of ``preset`` not yet finished in ``output`` (those of ``only_dataset`` / ``only_method``
    if given), then write the report over every finished run of the preset. Returns the counts and the
    files written; raises BaraError at the end if a run failed. Before training, prints how many runs are left
    and about how long they take (with ``progress`` or ``announce``). ``compare``: another benchmark's results.jsonl
    (a tuned one), or several, whose test means results.md shows beside each run's (:func:`.report.load_reference`).

    Dataset by dataset: first the candidate runs of every learning-rate grid (at the tuning seed), then, with
    the rates chosen on their validation metrics, the runs of every seed (the chosen candidate is one of them)."""
    given = preset.name if isinstance(preset, Preset) else str(preset)
    plan_ = plan(preset)
    specs = expand(plan_)
    selected = select(specs, only_dataset, only_method, warn=True)  # checks the names
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise BaraError(f"--output {output} is a file; fix: give a folder path")
    reuse = Path(reuse) if reuse is not None else None
    if reuse is not None and not (reuse / "runs").is_dir():
        raise BaraError(f"--reuse {reuse} holds no runs/ folder; fix: give the --output folder of another 'bara bench'")
    reference = None if not compare else load_references(compare)  # checked before training
    check_defaults(plan_.all_runs(specs, output=output), [output] + ([reuse] if reuse is not None else []))
    summary = {"runs": len(specs), "selected": 0, "trained": 0, "reused": 0, "skipped": 0, "diverged": 0,
               "failed": []}
    if not report_only:
        summary.update(train_plan(plan_, selected, output, progress, reuse, only_method, announce))
    specs = expand(plan_, output)
    command = command or shlex.join(["bara", "bench", "--preset", given, "--output", str(output)])
    if report_only or not summary["failed"] or any(finished(output, s) for s in specs):
        output.mkdir(parents=True, exist_ok=True)  # beside the report (--compare reads it), --report-only too
        preset_ = plan_.preset
        write_json(output / "preset.json", {"name": preset_.name, "source": preset_.source, "preset": preset_.values})
        summary["written"] = write_report(plan_, specs, output, command, reference)
    if summary["failed"]:
        first = summary["failed"][0]
        raise BaraError(f"{len(summary['failed'])} of {summary['selected']} runs failed (first: {first}, traceback "
                        f"in {output / 'runs' / first / ERROR}); fix: the cause, then rerun the same command "
                        "(finished runs are skipped)")
    return summary


__all__ = ["CHECKPOINT_EVERY", "DIVERGED", "ERROR", "SECONDS_PER_STEP", "SHIFT", "Choice", "Entry", "Plan", "Preset",
           "RunSpec", "choices", "diverged", "estimate", "expand", "finished", "load_preset", "load_reference",
           "load_references", "packaged_presets", "plan", "rehash", "run_bench", "run_hash", "run_steps",
           "write_report"]

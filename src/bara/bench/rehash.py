"""``bara bench --rehash``: keep a benchmark's finished runs after a method's default changed.

A run's hash covers the options its preset sets, and of a grid's options only the values other than the method's
default (so that a candidate at the usual options is the run it was before the option had a grid). When a default
changes, a finished run at the old default no longer names its value, and one at the new default names a value that
is now left out: both would be trained again under a new hash (or refused, :func:`.run.check_run_defaults`). The
weights are the same computation either way, so this renames each such run to the hash its config has now, with the
option written into its config as this version of bara writes it. A run is moved only when its stored config hashes
to its folder's name and its options as trained (adapter config) are what the new config resolves to; the others
are listed, untouched. It trains and scores nothing; under the earlier default it moves them back (tested).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .. import runs
from ..errors import BaraError
from ..methods import get_method
from .plan import Entry, plan, run_hash
from .presets import Preset


def _new_config(entry: Entry, old: runs.RunConfig, trained: dict) -> runs.RunConfig | None:
    """``old`` with its method options as :meth:`Entry.spec` writes them today for the options it was trained with;
    None when today's config would not train what it did (a default changed that the preset does not set)."""
    # Chosen on a grid, of its own or taken from the variant whose rate it follows.
    chosen = (set(old.method_options) - set(entry.config.method_options)) | set(entry.option_grid)
    options = entry.method_options({k: trained[k] for k in sorted(chosen) if k in trained})
    resolved = get_method(old.method, options).config.to_dict()
    if any(resolved[k] != v for k, v in trained.items() if k in resolved):
        return None
    return dataclasses.replace(old, method_options=options)


def rehash(preset: Preset | str, output: str | Path) -> tuple[list[tuple[Path, Path]], list[tuple[Path, str]]]:
    """Rename the finished runs of ``preset`` in ``output`` whose hash changed with a default: ([(from, to)],
    [(folder, why it was left)]). Unfinished runs (no metrics.json) are left: their checkpoint's config is the old
    one, so they start again under the new hash."""
    output, plan_ = Path(output), plan(preset)
    if not (output / "runs").is_dir():
        raise BaraError(f"{output} has no runs/ folder; fix: give --output the folder a 'bara bench' of this preset "
                        "wrote")
    moved, left, moves = [], [], []
    for entry in plan_.entries:
        for folder in sorted((output / "runs" / entry.dataset / entry.variant).glob("seed*-*")):
            if not (folder / runs.METRICS).exists():
                continue
            seed, _, digest = folder.name.partition("-")
            metrics = json.loads((folder / runs.METRICS).read_text())
            old = runs.RunConfig.from_dict(metrics["config"])
            trained = runs.trained_options(json.loads(runs.meta_file(folder).read_text()), old.method)
            if run_hash(old, entry.ood, entry.shift) != digest:
                left.append((folder, "its metrics.json config does not hash to its name"))
                continue
            if trained is None:
                continue  # no options recorded (an adapter saved before they were): nothing to tell them by
            new = _new_config(entry, old, trained)
            if new is None:
                left.append((folder, "trained under a default that changed and that the preset does not set: not a "
                                     "run of this preset any more (move it out to train it again)"))
                continue
            target = folder.with_name(f"{seed}-{run_hash(new, entry.ood, entry.shift)}")
            if target != folder:
                moves.append((folder, target, metrics, new))
    while True:  # a run whose new name is taken by one that stays (two runs of one config: a person has to look)
        moving = {folder for folder, *_ in moves}
        blocked = [m for m in moves if m[1].exists() and m[1] not in moving]
        if not blocked:
            break
        left += [(folder, f"{target.name} exists too") for folder, target, *_ in blocked]
        moves = [m for m in moves if m not in blocked]
    for folder, target, metrics, new in moves:
        metrics["config"] = new.to_dict()
        runs.write_json(folder / runs.METRICS, metrics)
        for meta_path in {runs.meta_file(folder), *folder.glob(f"*/{runs.ADAPTER_CONFIG}")}:
            meta = json.loads(meta_path.read_text())
            if isinstance(meta.get("run"), dict):
                meta["run"]["method_options"] = new.method_options
                runs.write_json(meta_path, meta)
        # Through a temporary name: one run's new name may be another's old one (a value became the default).
        folder.rename(folder.with_name(f".rehash-{folder.name}"))
        moved.append((folder, target))
    for folder, target in moved:
        folder.with_name(f".rehash-{folder.name}").rename(target)
    return moved, left

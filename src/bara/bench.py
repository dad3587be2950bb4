"""The benchmark harness behind ``bara bench``: a preset (model, datasets, methods, seeds, training settings)
expands to runs; each is trained once by :func:`bara.runs.run_train` into its own folder, then all finished
runs are summarised.

Layout of the output folder ``DIR``::

    runs/<dataset>/<variant>/seed<k>-<hash>/   one run; <hash> = run_hash(config, ood, shift), so a changed setting
                                               is a new run; shift_metrics.json beside metrics.json when the
                                               dataset sets `shift`
    results.jsonl   one line per finished run: report.row + dataset, variant, hash
    results.md      per dataset: variant x metric, mean ± std over seeds, best in bold (OOD AUROC where the
                    dataset sets `ood`); a table "under shift" where it sets `shift`
    cost.md         per dataset: variant x (train s/step, peak memory, trainable parameters, prediction time)
    preset.json     the preset as resolved for the last training call
    plots/          reliability-<dataset>-<variant>.png and the method's own plots (Method.run_files; copied
                    from the run of the lowest seed), accuracy-ece-<dataset>.png, accuracy-nll-<dataset>.png

A run is finished when all of its outputs exist: metrics.json (written last by training), and shift_metrics.json
when its dataset sets ``shift``. Finished runs are skipped and are the only ones reported. Any other run is
(re)started, from its checkpoint when it has one; one that has metrics.json but lacks its shift evaluation only
runs that evaluation. The preset format is documented at the top of ``benchmarks/presets.toml``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import platform
import re
import shlex
import shutil
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from . import checkpoint, report, runs
from .data import bigbench, builtin_tasks
from .errors import BaraError, Diverged
from .methods import METHODS
from .plots import scatter_methods
from .runs import RunConfig
from .trainer import TrainConfig, total_steps

CHECKPOINT_EVERY = 100  # steps between checkpoints, so an interrupted run loses at most this much
ERROR = "error.txt"  # traceback of a failed run, beside its partial outputs
DIVERGED = "diverged.json"  # a run whose training diverged: not retried; a grid candidate loses the choice
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")  # dataset and variant names become folder names
PRESET_KEYS = ("model", "seeds", "max_train", "max_eval", "methods", "train", "lr", "tune", "shared_options",
               "options", "datasets", "extends")
TUNE_KEYS = ("seed", "select", "options", "validate_all")
# Validation metrics a learning-rate grid may be chosen by: metrics.json's validation block, and which way is best.
SELECT = {"nll": min, "accuracy": max, "ece": min, "brier": min}
WORST = {min: math.inf, max: -math.inf}  # the score of a candidate that diverged
HARNESS_SET = ("lr", "seed", "checkpoint_every")  # TrainConfig fields a preset does not set in [P.train]
DATASET_KEYS = ("data", "lr", "max_train", "max_eval", "text_column", "label_column", "ood", "shift")
SHIFT = "shift_metrics.json"  # run_eval's metrics of the trained adapter on the `shift` dataset's test split

# (key in report.row, header, which mean is best); one-pass columns and the methods' own appear where present.
METRICS = [("test_accuracy", "accuracy %", "max"), ("test_ece", "ECE %", "min"), ("test_nll", "NLL", "min"),
           ("test_brier", "Brier", "min")]
VALIDATION = [(f"val_{k[5:]}", h, b) for k, h, b in METRICS] + [("val_fast_nll", "one-pass NLL", "min")]
ONE_PASS = [("test_fast_accuracy", "one-pass accuracy %", "max"), ("test_fast_ece", "one-pass ECE %", "min"),
            ("test_fast_nll", "one-pass NLL", "min")]
OOD = [("test_ood_auroc", "OOD AUROC", "max")]
SHIFTED = [("shift_accuracy", "accuracy %", "max"), ("shift_ece", "ECE %", "min"), ("shift_nll", "NLL", "min"),
           ("shift_brier", "Brier", "min")]
COST = [("train_seconds_per_step", "train s/step"), ("peak_memory_mb", "peak memory MB"),
        ("trainable_params", "trainable params"), ("predict_seconds", "predict s (test, S)"), ("samples", "S"),
        ("predict_seconds_s1", "predict s (S = 1)"), ("fast_predict_seconds", "predict s (one-pass)"),
        ("torch_threads", "threads")]
PROTOCOL = ("Every method trains with the same steps, batch size, max length, target modules and seeds; only the "
            "learning rate and the method's own options differ. Learning rates and options are chosen on the "
            "validation split; the test split is never used for a choice.")


@dataclass
class Preset:
    name: str
    source: str  # the file it was read from
    values: dict  # its table, with `extends` resolved


@dataclass(frozen=True)
class RunSpec:
    """One run of a preset: where it goes and the full config it trains with."""

    dataset: str
    variant: str
    seed: int
    hash: str
    config: RunConfig = field(compare=False)
    ood: str | None = None  # dataset whose test texts are the out-of-distribution inputs (AUROC)
    shift: str | None = None  # dataset (same labels) the trained adapter is also evaluated on
    # Waiting for its learning rate to be chosen on validation (hash "", config at the grid's first rate).
    pending: bool = False

    @property
    def folder(self) -> Path:
        """Relative to the benchmark's output folder."""
        return Path("runs", self.dataset, self.variant, f"seed{self.seed}-{self.hash}")

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.variant}/seed{self.seed}-{self.hash}"

    def outputs(self) -> list[Path]:
        """The files whose presence makes the run finished, relative to the benchmark's output folder."""
        return [self.folder / runs.METRICS] + ([self.folder / SHIFT] if self.shift else [])


def finished(output: Path, spec: RunSpec) -> bool:
    return not spec.pending and all((output / path).exists() for path in spec.outputs())


# -- presets ------------------------------------------------------------------------------------------------
def packaged_presets() -> dict[str, dict]:
    return _parse((resources.files("bara") / "benchmarks" / "presets.toml").read_text(), "bara's presets.toml")


def _parse(text: str, where: str) -> dict[str, dict]:
    try:
        presets = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise BaraError(f"{where} is not valid TOML ({err}); fix: correct the file") from None
    for name, table in presets.items():
        if not isinstance(table, dict):
            raise BaraError(f"{where}: top-level key '{name}' is not a preset table; fix: write [{name}] and its "
                            "keys below it")
    return presets


def load_preset(spec: str | Path) -> Preset:
    """A packaged preset by name (``standard``), the only preset of a TOML file (``my.toml``) or one of several
    (``my.toml:NAME``). A file's preset may extend another of the file or a packaged one."""
    text = str(spec)
    match = re.fullmatch(r"(.+\.toml)(?::([^/\\]+))?", text)
    if match:
        path, name = Path(match[1]), match[2]
        if not path.is_file():
            raise BaraError(f"preset file {path} not found; fix: give an existing .toml file, or a packaged preset "
                            f"({', '.join(packaged_presets())})")
        presets, source = _parse(path.read_text(), str(path)), str(path)
        if name is None:
            if len(presets) != 1:
                raise BaraError(f"{path} holds the presets {', '.join(presets) or '(none)'}; fix: pick one with "
                                f"--preset {path}:NAME")
            name = next(iter(presets))
        presets = {**packaged_presets(), **presets}  # the file's own names win
    else:
        presets, source, name = packaged_presets(), "bara/benchmarks/presets.toml", text
    if name not in presets:
        raise BaraError(f"unknown preset '{name}'; fix: use one of {', '.join(presets)}, or a file PATH.toml")
    return Preset(name, source, _resolve(presets, name, ()))


def _merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for key, value in over.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def _resolve(presets: dict, name: str, chain: tuple) -> dict:
    """The preset's table with ``extends`` applied: tables merged key by key, ``methods`` and ``tune`` replaced, and
    ``datasets`` naming which of the parent's datasets run (their settings merged)."""
    if name in chain:
        raise BaraError(f"presets extend each other in a cycle: {' -> '.join(chain + (name,))}; fix: break it")
    table = presets[name]
    unknown = sorted(set(table) - set(PRESET_KEYS))
    if unknown:
        raise BaraError(f"preset '{name}': unknown key(s) {', '.join(unknown)}; fix: use {', '.join(PRESET_KEYS)}")
    parent = table.get("extends")
    if parent is None:
        return _check_own_rates(name, table, dict(table))
    if parent not in presets:
        raise BaraError(f"preset '{name}' extends '{parent}', which is neither in the same file nor a packaged "
                        f"preset; fix: use one of {', '.join(p for p in presets if p != name)}")
    base = _resolve(presets, parent, chain + (name,))
    merged = _merge(base, {k: v for k, v in table.items() if k not in ("extends", "methods", "tune", "datasets")})
    merged["methods"] = table.get("methods", base.get("methods"))
    if "tune" in table or "tune" in base:  # replaced as a whole: an empty [P.tune] drops the parent's option grids
        merged["tune"] = table.get("tune", base.get("tune"))
    if "datasets" in table:
        inherited = base.get("datasets", {})
        merged["datasets"] = {d: _merge(inherited.get(d, {}), s) if isinstance(s, dict) else s
                              for d, s in table["datasets"].items()}
    return _check_own_rates(name, table, merged)


def _check_own_rates(name: str, table: dict, resolved: dict) -> dict:
    """A preset's own learning rates may name only methods and its own variants (a typo would silently fall
    back to the default); rates it inherits for variants it does not run are simply unused."""
    methods = resolved.get("methods")
    names = {n for n in methods if isinstance(n, str)} if isinstance(methods, (list, dict)) else set()
    _check_lr_table(table.get("lr", {}), names, f"preset '{name}', [lr]")
    datasets = table.get("datasets")
    for dataset, settings in (datasets.items() if isinstance(datasets, dict) else ()):
        if isinstance(settings, dict) and "lr" in settings:
            _check_lr_table(settings["lr"], names, f"preset '{name}', dataset '{dataset}'")
    return resolved


# -- runs ---------------------------------------------------------------------------------------------------
def _typed(cls, values: dict, where: str) -> dict:
    """``values`` checked against the fields of dataclass ``cls``; a TOML integer given for a float field
    becomes a float, so that ``epochs = 20`` and ``epochs = 20.0`` are the same run with the same hash."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in values.items():
        if key not in fields:
            raise BaraError(f"{where}: unknown setting '{key}'; fix: use one of {', '.join(sorted(fields))}")
        f = fields[key]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        expected = type(default)
        if expected is float and type(value) is int:
            value = float(value)
        if default is not None and type(value) is not expected:
            raise BaraError(f"{where}: {key} = {value!r} should be of type {expected.__name__}; fix: write e.g. "
                            f"{key} = {json.dumps(default)}")
        out[key] = value
    return out


def _check_name(name: str, kind: str, where: str) -> None:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise BaraError(f"{where}: {kind} name {name!r} cannot be a folder name; fix: use letters, digits, "
                        "'_', '.', '+' and '-'")


def _variants(methods, where: str) -> dict[str, tuple[str, dict]]:
    """Variant name -> (method, its own options), from a list of method names or a table of variants."""
    if isinstance(methods, list):
        if len(set(methods)) != len(methods) or not all(isinstance(m, str) for m in methods):
            raise BaraError(f"{where}: methods must be distinct names, got {methods}; fix: list each once")
        entries = {m: m for m in methods}
    elif isinstance(methods, dict):
        entries = methods
    else:
        raise BaraError(f"{where}: methods must be a list of names or a table of variants; fix: write e.g. "
                        'methods = ["lora", "bara"]')
    if not entries:
        raise BaraError(f"{where}: no methods; fix: list at least one of {', '.join(sorted(METHODS))}")
    variants = {}
    for name, entry in entries.items():
        _check_name(name, "variant", where)
        if isinstance(entry, str):
            method, options = entry, {}
        elif isinstance(entry, dict) and set(entry) <= {"method", "options"} \
                and isinstance(entry.get("options", {}), dict):
            method, options = entry.get("method"), dict(entry.get("options", {}))
        else:
            raise BaraError(f"{where}: variant '{name}' must be a method name or {{method = ..., options = {{...}}}}, "
                            f"got {entry!r}; fix: write {name} = {{method = \"bara\", options = {{gate = \"none\"}}}}")
        if method not in METHODS:
            label = f"unknown method '{method}'" + (f" in variant '{name}'" if name != method else "")
            raise BaraError(f"{where}: {label}; fix: use one of {', '.join(sorted(METHODS))}")
        variants[name] = (method, options)
    return variants


def _learning_rate(preset_lr: dict, dataset_lr, variant: str, method: str, where: str) -> float:
    """The first rate set of: dataset's for the variant, the method; preset's for the variant, the method;
    the dataset's own (a number, or its default); the preset's default."""
    per_dataset = dataset_lr if isinstance(dataset_lr, dict) else {}
    for table, key in ((per_dataset, variant), (per_dataset, method), (preset_lr, variant), (preset_lr, method)):
        if key in table:
            return table[key]
    if dataset_lr is not None and not isinstance(dataset_lr, dict):
        return dataset_lr
    for table in (per_dataset, preset_lr):
        if "default" in table:
            return table["default"]
    raise BaraError(f"{where}: no learning rate for variant '{variant}'; fix: set lr.default = 1e-3 in the preset")


def _check_lr_table(table, names: set, where: str) -> None:
    """A rate is a positive number, a grid (a list of distinct positive numbers, chosen from on validation) or
    the name of the variant whose chosen rate it takes (checked once the variants are known)."""
    if not isinstance(table, dict):
        table = {"default": table}
    for key, value in table.items():
        if key != "default" and key not in names and key not in METHODS:
            raise BaraError(f"{where}: lr for '{key}', which is neither a method nor a variant of this preset; "
                            f"fix: use default or one of {', '.join(sorted(names | set(METHODS)))}")
        grid = value if isinstance(value, list) else [value]
        if isinstance(value, str) or (grid and all(type(v) in (int, float) and v > 0 for v in grid)
                                      and len(set(grid)) == len(grid)):
            continue
        raise BaraError(f"{where}: lr {key} = {value!r} must be a positive number, a list of distinct positive "
                        f"numbers (a grid, chosen from on the validation split) or a variant's name; fix: e.g. "
                        f"{key} = 1e-3, {key} = [1e-3, 3e-3] or {key} = \"lora\"")


@dataclass
class Entry:
    """One (dataset, variant) of a preset, before seeds and a learning rate make it runs."""

    dataset: str
    variant: str
    # A rate; a grid of rates to choose from on the validation split; or the variant whose chosen rate it takes.
    lr: float | tuple[float, ...] | str
    seeds: tuple[int, ...]
    config: RunConfig  # at lr 0 and seed 0, filled in by spec()
    ood: str | None = None
    shift: str | None = None
    # Method options to choose on the validation split together with the rate: option -> values.
    option_grid: dict = field(default_factory=dict)

    def spec(self, lr: float, seed: int, options: dict | None = None, pending: bool = False) -> RunSpec:
        method_options = dict(self.config.method_options)
        defaults = METHODS[self.config.method].config_class().to_dict()
        for key, value in (options or {}).items():
            # A value equal to the option's default is left out, so that the candidate with the usual options is
            # the very run (same hash) it was before the option had a grid.
            method_options.pop(key, None)
            if value != defaults[key]:
                method_options[key] = value
        config = dataclasses.replace(self.config, method_options=method_options,
                                     train=dataclasses.replace(self.config.train, lr=lr, seed=seed))
        return RunSpec(self.dataset, self.variant, seed, "" if pending else run_hash(config, self.ood, self.shift),
                       config, self.ood, self.shift, pending)

    def option_sets(self) -> list[dict]:
        """Every combination of the option grid ([{}] without one), in the grid's order."""
        keys = list(self.option_grid)
        return [dict(zip(keys, values)) for values in itertools.product(*self.option_grid.values())]


@dataclass
class Choice:
    """The learning rate of an entry: set, chosen on validation, or not yet (None)."""

    lr: float | None
    options: dict = field(default_factory=dict)  # options chosen from the entry's option grid
    follows: str | None = None  # the variant whose chosen rate this is


@dataclass
class Plan:
    preset: Preset
    entries: list[Entry]
    tune_seed: int
    select: str  # a key of SELECT
    validate_all: bool = False  # every run scores the validation split, not only the grids' candidates

    def candidates(self, entry: Entry) -> list[tuple[RunSpec, float, dict]]:
        """The runs a grid is chosen from, with their rate and options: one per rate and combination of the
        option grid, at the tuning seed (one of the preset's seeds, so the chosen candidate is also that
        seed's run). None for an entry without a grid, or whose rate follows another variant's."""
        if isinstance(entry.lr, str) or (isinstance(entry.lr, float) and not entry.option_grid):
            return []
        rates = entry.lr if isinstance(entry.lr, tuple) else (entry.lr,)
        return [(entry.spec(lr, self.tune_seed, options), lr, options)
                for lr in rates for options in entry.option_sets()]

    def all_runs(self, specs: list[RunSpec], dataset: str | None = None) -> list[RunSpec]:
        """``specs`` and every grid candidate (of ``dataset`` if given), each run folder once: all the runs a
        benchmark of this plan trains, the unchosen candidates included."""
        every = {s.folder: s for s in specs if dataset in (None, s.dataset)}
        every.update({c.folder: c for e in self.entries if dataset in (None, e.dataset)
                      for c, _, _ in self.candidates(e)})
        return list(every.values())


def plan(preset: Preset | str) -> Plan:
    """Every (dataset, variant) of ``preset`` with its config and learning-rate setting. Names, methods,
    options, rates and grids are all checked here, before anything is trained."""
    if not isinstance(preset, Preset):
        preset = load_preset(preset)
    p, where = preset.values, f"preset '{preset.name}'"
    for key in ("model", "seeds", "methods", "datasets"):
        if key not in p:
            raise BaraError(f"{where} has no '{key}'; fix: set it (see the comments of bara's presets.toml)")
    seeds = p["seeds"]
    if not isinstance(seeds, list) or not seeds or any(type(s) is not int for s in seeds) \
            or len(set(seeds)) < len(seeds):
        raise BaraError(f"{where}: seeds must be a list of distinct integers, got {seeds!r}; fix: seeds = [0, 1, 2]")
    tune = p.get("tune", {})
    if not isinstance(tune, dict) or set(tune) - set(TUNE_KEYS):
        raise BaraError(f"{where}: [tune] takes only {', '.join(TUNE_KEYS)}; fix: e.g. [tune] seed = 0, "
                        'select = "nll"')
    tune_seed, select = tune.get("seed", seeds[0]), tune.get("select", "nll")
    option_grids = tune.get("options", {})
    if not isinstance(option_grids, dict) or not all(isinstance(g, dict) for g in option_grids.values()):
        raise BaraError(f"{where}: [tune.options.METHOD] tables give grids of a method's options; fix: e.g. "
                        "[tune.options.blob] kl_lr = [0.002, 0.01]")
    for name in option_grids:
        if name not in METHODS and name not in (p["methods"] if isinstance(p["methods"], (list, dict)) else ()):
            raise BaraError(f"{where}: [tune.options.{name}] is for neither a method nor a variant of this preset; "
                            f"fix: use one of {', '.join(sorted(METHODS))}")
    if tune_seed not in seeds:
        raise BaraError(f"{where}: tune.seed = {tune_seed!r} is not one of the seeds {seeds}; fix: pick one of them")
    if select not in SELECT:
        raise BaraError(f"{where}: tune.select = {select!r}; fix: use one of {', '.join(SELECT)} (validation metrics)")
    validate_all = tune.get("validate_all", False)
    if not isinstance(validate_all, bool):
        raise BaraError(f"{where}: tune.validate_all = {validate_all!r} must be true or false; fix: validate_all = "
                        "true to score the validation split in every run")
    variants = _variants(p["methods"], where)
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - set(HARNESS_SET)
    shared = _typed(TrainConfig, p.get("train", {}), f"{where}, [train]")
    if set(shared) & set(HARNESS_SET):
        raise BaraError(f"{where}: [train] sets {', '.join(sorted(set(shared) & set(HARNESS_SET)))}; fix: give "
                        "learning rates in [lr] and seeds in seeds (checkpoints are the harness's)")
    options = p.get("options", {})
    for method in options:
        if method not in METHODS:
            raise BaraError(f"{where}: [options.{method}] is for an unknown method; fix: use one of "
                            f"{', '.join(sorted(METHODS))}")
    datasets = p["datasets"]
    if not isinstance(datasets, dict) or not datasets:
        raise BaraError(f"{where}: datasets must hold at least one [datasets.NAME] table; fix: add [datasets.trec]")

    entries = []
    for dataset, settings in datasets.items():
        at = f"{where}, dataset '{dataset}'"
        _check_name(dataset, "dataset", where)
        if not isinstance(settings, dict):
            raise BaraError(f"{at}: its settings must be a table; fix: write [{preset.name}.datasets.{dataset}]")
        unknown = sorted(set(settings) - set(DATASET_KEYS) - train_fields)
        if unknown:
            raise BaraError(f"{at}: unknown setting(s) {', '.join(unknown)}; fix: use "
                            f"{', '.join(DATASET_KEYS + tuple(sorted(train_fields)))}")
        data = settings.get("data", dataset)
        _check_data(data, "data", at)
        ood, shift = settings.get("ood"), settings.get("shift")
        for key, value in (("ood", ood), ("shift", shift)):
            if value is not None:
                _check_data(value, key, at)
                if value == data:
                    raise BaraError(f"{at}: {key} = {value!r} is the dataset it trains on; fix: name another "
                                    "dataset, or leave it out")
        for key in ("max_train", "max_eval"):
            value = settings.get(key, p.get(key))
            if value is not None and (type(value) is not int or value < 1):
                raise BaraError(f"{at}: {key} = {value!r} must be a positive integer; fix: e.g. {key} = 1000, or "
                                "leave it out to keep every example")
        train = {**shared, **_typed(TrainConfig, {k: v for k, v in settings.items() if k in train_fields}, at)}
        rates = {}
        for variant, (method, own) in variants.items():
            merged = {**p.get("shared_options", {}), **options.get(method, {}), **own}
            merged = _typed(METHODS[method].config_class, merged, f"{where}, variant '{variant}'")
            METHODS[method].config_class.from_dict(merged)  # its own checks of the values
            rates[variant] = _learning_rate(p.get("lr", {}), settings.get("lr"), variant, method, at)
            grid = {} if isinstance(rates[variant], str) else _option_grid(
                option_grids.get(variant, option_grids.get(method, {})), method, merged,
                f"{where}, [tune.options] for '{variant}'")
            config = RunConfig(
                model=p["model"], data=data, method=method, method_options=merged,
                max_train=settings.get("max_train", p.get("max_train")),
                max_eval=settings.get("max_eval", p.get("max_eval")),
                text_column=settings.get("text_column", "text"), label_column=settings.get("label_column", "label"),
                train=TrainConfig(**train, lr=0.0, seed=0, checkpoint_every=CHECKPOINT_EVERY))
            entries.append(Entry(dataset, variant, _rate(rates[variant]), tuple(seeds), config, ood, shift, grid))
        for variant, lr in rates.items():
            if isinstance(lr, str) and (lr not in rates or isinstance(rates[lr], str)):
                raise BaraError(f"{at}: '{variant}' takes the learning rate of '{lr}', which is not a variant of "
                                "this preset with a rate or grid of its own; fix: name one, e.g. lora")
    return Plan(preset, entries, tune_seed, select, validate_all)


def _option_grid(table: dict, method: str, merged: dict, where: str) -> dict:
    """An option grid checked against the method's options: every value of the right type and valid."""
    grid = {}
    for key, values in table.items():
        if not isinstance(values, list) or not values or len(set(map(json.dumps, values))) < len(values):
            raise BaraError(f"{where}: {key} = {values!r} must be a list of distinct values; fix: e.g. "
                            f"{key} = [0.002, 0.01]")
        grid[key] = [_typed(METHODS[method].config_class, {key: v}, where)[key] for v in values]
        for value in grid[key]:
            METHODS[method].config_class.from_dict({**merged, key: value})
    return grid


def _rate(lr):
    """A grid of one rate is that rate; a grid keeps its order (ties are broken towards the first rate)."""
    if isinstance(lr, list):
        return float(lr[0]) if len(lr) == 1 else tuple(float(x) for x in lr)
    return lr if isinstance(lr, str) else float(lr)


def choices(plan_: Plan, output: Path | None = None) -> dict[tuple[str, str], Choice]:
    """(dataset, variant) -> its learning rate: set by the preset, or chosen by the validation metric of the
    finished candidate runs in ``output`` (None while one of them is unfinished)."""
    pick = SELECT[plan_.select]
    out = {}
    for entry in plan_.entries:
        candidates = plan_.candidates(entry)
        if candidates:
            scores = [WORST[pick] if diverged(output, spec) else _validation(output, spec).get(plan_.select)
                      for spec, _, _ in candidates]
            if None not in scores and not all(s == WORST[pick] for s in scores):
                best = pick(range(len(candidates)), key=scores.__getitem__)  # min/max keep the first of ties
                out[entry.dataset, entry.variant] = Choice(candidates[best][1], candidates[best][2])
            else:
                out[entry.dataset, entry.variant] = Choice(None)
        elif isinstance(entry.lr, float):
            out[entry.dataset, entry.variant] = Choice(entry.lr)
    configs = {(e.dataset, e.variant): e.config for e in plan_.entries}
    for entry in plan_.entries:
        if isinstance(entry.lr, str):
            leader, theirs = out[entry.dataset, entry.lr], configs[entry.dataset, entry.lr]
            # Of the leader's chosen options, those of the same method that this variant leaves as the leader has
            # them (an ablation that sets an option itself keeps its own value).
            options = {k: v for k, v in leader.options.items() if theirs.method == entry.config.method
                       and entry.config.method_options.get(k) == theirs.method_options.get(k)}
            out[entry.dataset, entry.variant] = Choice(leader.lr, options, follows=entry.lr)
    return out


def diverged(output: Path | None, spec: RunSpec) -> dict | None:
    """What diverged.json says of a run whose training diverged ({"step", "error"}); None otherwise."""
    path = None if output is None else output / spec.folder / DIVERGED
    return json.loads(path.read_text()) if path is not None and path.exists() else None


def _validation(output: Path | None, spec: RunSpec) -> dict:
    """The validation metrics of a finished run; {} while it is unfinished or has none (not yet scored)."""
    if output is None or not finished(output, spec):
        return {}
    return json.loads((output / spec.folder / runs.METRICS).read_text()).get("validation", {})


def expand(preset: Preset | str | Plan, output: Path | None = None) -> list[RunSpec]:
    """Every run of ``preset``: datasets x variants x seeds, in that order, each with its full config. A run
    whose rate is still to be chosen on validation (candidates in ``output`` unfinished) is ``pending``."""
    plan_ = preset if isinstance(preset, Plan) else plan(preset)
    chosen = choices(plan_, output)
    specs = []
    for entry in plan_.entries:
        choice = chosen[entry.dataset, entry.variant]
        for seed in entry.seeds:
            specs.append(entry.spec(choice.lr, seed, choice.options) if choice.lr is not None
                         else entry.spec(_first(entry, plan_), seed, pending=True))
    return specs


def _first(entry: Entry, plan_: Plan) -> float:
    lr = entry.lr
    if isinstance(lr, str):
        lr = next(e.lr for e in plan_.entries if (e.dataset, e.variant) == (entry.dataset, lr))
    return lr[0] if isinstance(lr, tuple) else lr


def _check_data(data, key: str, where: str) -> None:
    """A built-in task, a BIG-bench task name (fetched or not: that is checked before training) or a path."""
    if isinstance(data, str) and (data in builtin_tasks() or data in bigbench.names() or Path(data).exists()):
        return
    raise BaraError(f"{where}: {key} '{data}' is neither a built-in task ({', '.join(builtin_tasks())}, "
                    f"bigbench/TASK) nor an existing file or folder; fix: set {key} = \"PATH\" in its table")


def run_hash(config: RunConfig, ood: str | None = None, shift: str | None = None) -> str:
    """First 12 hex digits of the SHA-256 of the config as canonical JSON (sorted keys, no spaces), with the
    run's ``ood`` and ``shift`` datasets when set (unset, they leave the hash as it was before they existed).
    ``checkpoint_every`` is left out: resuming is exact, so how often a run checkpoints does not change it."""
    values = config.to_dict()
    values["train"] = {k: v for k, v in values["train"].items() if k != "checkpoint_every"}
    if values.get("dtype") == "float32":  # the default leaves the hash as it was before --dtype existed
        del values["dtype"]
    values.update({k: v for k, v in (("ood", ood), ("shift", shift)) if v is not None})
    text = json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _select(specs: list[RunSpec], only_dataset: str | None, only_method: str | None) -> list[RunSpec]:
    """Runs of the named datasets and of the named variants or methods (comma-separated lists)."""
    chosen = specs
    for wanted, valid, keep in (
            (only_dataset, {s.dataset for s in specs}, lambda s, names: s.dataset in names),
            (only_method, {s.variant for s in specs} | {s.config.method for s in specs},
             lambda s, names: s.variant in names or s.config.method in names)):
        if wanted:
            names = {n.strip() for n in wanted.split(",") if n.strip()}
            bad = sorted(names - valid)
            if bad:
                raise BaraError(f"'{bad[0]}' is not in this preset; fix: use one of {', '.join(sorted(valid))}")
            chosen = [s for s in chosen if keep(s, names)]
    return chosen


def _train(selected: list[RunSpec], output: Path, progress: bool, desc: str = "bench",
           validation: bool = False, reuse: Path | None = None, candidates: bool = False) -> dict:
    """Train the unfinished runs of ``selected``, one after another, or copy them from ``reuse`` where it holds
    them finished. ``validation``: they score the validation split (a grid's ``candidates`` are chosen on it; other
    runs skip it unless the preset sets tune.validate_all)."""
    from tqdm.auto import tqdm

    selected = [s for s in selected if not s.pending]
    reused = [s for s in selected if reuse is not None and not finished(output, s) and finished(reuse, s)]
    for spec in reused:  # the same hash: the same config, data, seed and evaluation sets
        target = output / spec.folder
        shutil.rmtree(target, ignore_errors=True)  # a checkpoint of an unfinished run of it
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(reuse / spec.folder, partial)
        partial.rename(target)
    if validation:  # a finished run that becomes a candidate (or is reused) after a change of the preset
        for spec in (s for s in selected if finished(output, s) and not _validation(output, s)):
            runs.add_validation(output / spec.folder, progress_bar=progress)
    lost_before = [s for s in selected if diverged(output, s)]  # the same settings diverge the same way again
    pending = [s for s in selected if not finished(output, s) and s not in lost_before]
    bar = tqdm(total=len(selected), initial=len(selected) - len(pending), desc=desc, unit="run",
               disable=not progress or not selected, dynamic_ncols=True)
    failed, lost = [], []
    for i, spec in enumerate(pending, 1):
        folder = output / spec.folder
        bar.set_postfix_str(spec.name)
        (folder / ERROR).unlink(missing_ok=True)
        start = time.perf_counter()
        try:
            if not (folder / runs.METRICS).exists():
                runs.run_train(spec.config, folder, resume=checkpoint.find(folder) is not None, ood_data=spec.ood,
                               progress_bar=progress, validation=validation)
            if spec.shift:  # from the saved adapter, so an interruption here costs no retraining
                shifted = runs.run_eval(folder, data=spec.shift, progress_bar=progress)
                runs.write_json(folder / SHIFT, shifted)
        except Exception as err:  # one failed run must not stop the others of a long benchmark
            folder.mkdir(parents=True, exist_ok=True)
            (folder / ERROR).write_text(traceback.format_exc())
            message = " ".join(str(err).split()) or type(err).__name__
            if isinstance(err, Diverged):  # an outcome of the method at these settings, not of the harness
                runs.write_json(folder / DIVERGED, {"step": err.step, "error": message})
                lost.append(spec)
                outcome = "this candidate loses the choice" if candidates else "it is left out of the report's means"
                bar.write(f"bench: {spec.name} diverged at step {err.step}: {outcome} and is not retried (delete "
                          f"{folder} to try it again)")
            else:
                failed.append(spec.name)
                bar.write(f"bench: {spec.name} failed: {message} (traceback in {folder / ERROR})")
        else:
            if not progress:  # a line per run for logs of background benchmarks
                print(f"{desc}: {spec.name} finished in {(time.perf_counter() - start) / 60:.1f} min "
                      f"({i} of {len(pending)})", flush=True)
        bar.update(1)
    bar.close()
    return {"trained": len(pending) - len(failed) - len(lost), "reused": len(reused),
            "diverged": len(lost_before) + len(lost),
            "skipped": len(selected) - len(pending) - len(reused) - len(lost_before), "failed": failed}


# Seconds per training step when no finished run of the benchmark says better: MiniLM, batch 32 x 64 tokens, on 2 CPU
# cores (the quick preset: about 2,900 steps in 25 minutes, evaluation included).
SECONDS_PER_STEP = 0.5


def run_steps(config: RunConfig) -> int | None:
    """Training steps of a run, when its config says (--steps, or --epochs over --max-train examples)."""
    if config.train.steps > 0:
        return config.train.steps
    return total_steps(config.train, config.max_train)[0] if config.max_train else None


def estimate(todo: list[RunSpec], output: Path) -> str:
    """How many runs are left to train and about how long they take: at the seconds per step of the benchmark's
    finished runs when there are some, else at SECONDS_PER_STEP."""
    measured = []
    for folder in (output / "runs").glob("*/*/*") if (output / "runs").is_dir() else ():
        try:
            metrics = json.loads((folder / runs.METRICS).read_text())
            steps = run_steps(RunConfig.from_dict(metrics["config"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if steps:
            measured.append(metrics["train_seconds"] / steps)
    per_step = float(sorted(measured)[len(measured) // 2]) if measured else SECONDS_PER_STEP
    source = (f"the median of {len(measured)} finished runs here" if measured
              else "a guess for MiniLM on 2 CPU cores; a causal LM takes several times longer")
    steps = [run_steps(s.config) for s in todo]
    line = f"{len(todo)} runs to train"
    if None in steps:
        return f"{line}; no time estimate (runs of a whole dataset: their steps depend on its size)"
    hours = sum(steps) * per_step / 3600
    return f"{line}, {sum(steps):,} steps: about {hours:.1f} h at {per_step:.2f} s per step ({source}), plus evaluation"


def run_bench(preset: Preset | str, output: str | Path, progress: bool = True, report_only: bool = False,
              only_dataset: str | None = None, only_method: str | None = None, command: str | None = None,
              reuse: str | Path | None = None, announce: bool = False) -> dict:
    """Train the runs of ``preset`` not yet finished in ``output`` (those of ``only_dataset`` / ``only_method``
    if given), then write the report over every finished run of the preset. Returns the counts and the
    files written; raises BaraError at the end if a run failed. Before training, prints how many runs are left
    and about how long they take (with ``progress`` or ``announce``).

    Dataset by dataset: first the candidate runs of every learning-rate grid (at the tuning seed), then, with
    the rates chosen on their validation metrics, the runs of every seed (the chosen candidate is one of them)."""
    given = preset.name if isinstance(preset, Preset) else str(preset)
    plan_ = plan(preset)
    preset = plan_.preset
    specs = expand(plan_)
    selected = _select(specs, only_dataset, only_method)  # checks the names
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise BaraError(f"--output {output} is a file; fix: give a folder path")
    reuse = Path(reuse) if reuse is not None else None
    if reuse is not None and not (reuse / "runs").is_dir():
        raise BaraError(f"--reuse {reuse} holds no runs/ folder; fix: give the --output folder of another 'bara bench'")
    _check_defaults(plan_.all_runs(specs), [output] + ([reuse] if reuse is not None else []))
    summary = {"runs": len(specs), "selected": 0, "trained": 0, "reused": 0, "skipped": 0, "diverged": 0,
               "failed": []}
    if not report_only:
        _check_fetched(selected)
        if progress or announce:
            print(f"bara bench: {estimate([s for s in selected if not finished(output, s)], output)}", flush=True)
        output.mkdir(parents=True, exist_ok=True)
        unchosen = []  # a grid whose every candidate diverged: its runs cannot start
        runs.write_json(output / "preset.json", {"name": preset.name, "source": preset.source, "preset": preset.values})
        for dataset in dict.fromkeys(s.dataset for s in selected):
            wanted = {s.variant for s in selected if s.dataset == dataset}
            chosen = choices(plan_, output)
            leaders = {chosen[dataset, v].follows or v for v in wanted}
            tuning = [c for e in plan_.entries if e.dataset == dataset and e.variant in leaders
                      for c, _, _ in plan_.candidates(e)]
            parts = [_train(tuning, output, progress, f"tune {dataset}", validation=True, reuse=reuse,
                            candidates=True)]
            tried = {c.hash for c in tuning}  # the chosen candidates are runs of the tuning seed: done already
            final = [s for s in _select(expand(plan_, output), dataset, only_method) if s.hash not in tried]
            parts.append(_train(final, output, progress, f"bench {dataset}", validation=plan_.validate_all,
                                reuse=reuse))
            for part in parts:
                for key in ("trained", "reused", "skipped", "diverged"):
                    summary[key] += part[key]
                summary["failed"] += part["failed"]
            for entry in (e for e in plan_.entries if e.dataset == dataset and e.variant in leaders):
                grid = [c for c, _, _ in plan_.candidates(entry)]  # every one diverged: nothing to choose from
                if grid and all(diverged(output, c) for c in grid):
                    unchosen.append(grid[0].name)
        summary["selected"] = (summary["trained"] + summary["reused"] + summary["skipped"] + summary["diverged"]
                               + len(summary["failed"]))
        summary["failed"] += unchosen
    specs = expand(plan_, output)
    command = command or shlex.join(["bara", "bench", "--preset", given, "--output", str(output)])
    if report_only or not summary["failed"] or any(finished(output, s) for s in specs):
        summary["written"] = write_report(plan_, specs, output, command)
    if summary["failed"]:
        first = summary["failed"][0]
        raise BaraError(f"{len(summary['failed'])} of {summary['selected']} runs failed (first: {first}, traceback "
                        f"in {output / 'runs' / first / ERROR}); fix: the cause, then rerun the same command "
                        "(finished runs are skipped)")
    return summary


def _check_defaults(specs: list[RunSpec], folders: list[Path]) -> None:
    """No finished run of ``specs`` in ``folders`` was trained under a method default that has changed since: its
    hash covers only the options the preset sets, so it would be skipped or reused as if it were this version's."""
    for folder in folders:
        for spec in (s for s in specs if finished(folder, s)):
            changed = runs.changed_defaults(folder / spec.folder)
            if changed:
                option, (then, now) = next(iter(changed.items()))
                raise BaraError(
                    f"{folder / spec.folder} was trained with {option} = {then!r}, but this version of bara defaults "
                    f"to {now!r} (a run's hash covers only the options the preset sets); fix: move such runs out of "
                    f"{folder / 'runs'} to train them again, or finish this benchmark with the bara version that "
                    "trained them")


def _check_fetched(specs: list[RunSpec]) -> None:
    """Every BIG-bench dataset the runs need is fetched: one clear error now, not one per failed run later."""
    for name in dict.fromkeys(n for s in specs for n in (s.config.data, s.ood, s.shift) if n):
        if bigbench.is_bigbench(name):
            bigbench.task_folder(name)


# -- report -------------------------------------------------------------------------------------------------
def _row(output: Path, spec: RunSpec, metrics: dict) -> dict:
    history = output / spec.folder / "history.jsonl"
    steps = len(history.read_text().splitlines()) if history.exists() else 0
    row = {"dataset": spec.dataset, "variant": spec.variant, "hash": spec.hash, "lr": spec.config.train.lr,
           **report.row(metrics)}
    # train_seconds and history.jsonl both cover the session that finished the run (after a resume: its part).
    row["train_seconds_per_step"] = row["train_seconds"] / steps if steps and row.get("train_seconds") else None
    if spec.ood:
        row["ood_data"], row["test_ood_auroc"] = spec.ood, metrics.get("ood_auroc")
    if spec.shift:
        shifted = json.loads((output / spec.folder / SHIFT).read_text())
        row["shift_data"] = spec.shift
        row.update({f"shift_{k}": shifted.get(k) for k in ("accuracy", "ece", "nll", "brier")})
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


def write_report(plan_: Plan, specs: list[RunSpec], output: Path, command: str) -> list[Path]:
    """results.jsonl, results.md, cost.md and plots/ from the finished runs of ``specs``; others are left out."""
    preset = plan_.preset
    done = [(spec, metrics) for spec in specs if finished(output, spec)
            for metrics in report.load_runs([output / spec.folder])]
    if not done:
        raise BaraError(f"no finished runs of preset '{preset.name}' in {output}; fix: run 'bara bench --preset "
                        f"{preset.name} --output {output}' without --report-only first")
    rows = [_row(output, spec, metrics) for spec, metrics in done]
    written = [_write_text(output / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))]

    datasets = list(dict.fromkeys(s.dataset for s in specs))
    variants = list(dict.fromkeys(s.variant for s in specs))
    order = {v: i for i, v in enumerate(variants)}
    lost = {s.hash: d for s in specs if (d := diverged(output, s))}
    results = _header("Results", preset, command, len(done), len(specs), len(lost))
    results += ["## Protocol", "", f"- {PROTOCOL}", _scope(preset, specs),
                "- Test split; mean ± sample std over seeds (one value: one seed). Accuracy and ECE (15 bins) in %, "
                "NLL and Brier of the averaged predictive; the best mean per column in bold (max for accuracy, min "
                "for the others). One-pass: the deterministic prediction beside the sampled one. V: selection "
                "variability, rank std: std across instances of the hard effective rank, s̄: joint effective rank. "
                "OOD AUROC (where a dataset names an OOD set): predictive entropy as the score separating its test "
                "texts from the OOD set's. Under shift (where a dataset names a shift set): the adapter trained on "
                "the dataset, evaluated on the test split of another dataset with the same labels.",
                "", "| variant | method | options |", "|---|---|---|"]
    for variant in variants:
        spec = next(s for s in specs if s.variant == variant)
        results.append(f"| {variant} | {spec.config.method} | `{json.dumps(spec.config.method_options)}` |")
    cost = _header("Cost", preset, command, len(done), len(specs), len(lost))
    cost += ["Mean over seeds. train s/step: the run's train_seconds (data and model loading, training, any post-hoc "
             "fit) over the steps it trained, both in the session that finished it; peak memory: resident memory "
             "of the process during the run (CPU RAM); predict s: one prediction over the test split with the "
             "method's S samples (S = 0: one deterministic pass), with one sample, and the one-pass fast path (— "
             "where the method predicts in one pass anyway); threads: torch's intra-op threads in the run (— where "
             "the run predates the column). Two runs side by side on one machine, one thread each, take longer per "
             "step than one run with both threads, but finish more runs per hour."]
    plots, chosen = output / "plots", choices(plan_, output)
    for dataset in datasets:
        dataset_rows = sorted((r for r in rows if r["dataset"] == dataset), key=lambda r: order[r["variant"]])
        n_runs = sum(s.dataset == dataset for s in specs)
        results += ["", f"## {dataset} ({len(dataset_rows)} of {n_runs} runs finished)", "",
                    _schedule(specs, dataset), ""] + _tuning(plan_, dataset, output, chosen)
        cost += ["", f"## {dataset}", ""]
        if not dataset_rows:
            continue
        cost += [_wall_time(plan_, specs, output, dataset), ""]
        present = [c for c in OOD + ONE_PASS if any(r.get(c[0]) is not None for r in dataset_rows)]
        present += _method_columns(dataset_rows)
        columns = METRICS + present
        groups = report.summarize(dataset_rows, "variant", [c[0] for c in columns])
        results.append(_table(groups, columns))
        results += _prediction_choice(plan_, dataset, output, chosen, groups) + _post_hoc(dataset_rows)
        if plan_.validate_all:
            scored = [c for c in VALIDATION if any(r.get(c[0]) is not None for r in dataset_rows)]
            results += ["", "Validation split, every seed (tune.validate_all), for choices between variants made on "
                        "validation (one-pass NLL: the deterministic prediction of a sampling method):", "",
                        _table(report.summarize(dataset_rows, "variant", [k for k, _, _ in scored]), scored)]
        gone = [f"{s.variant} seed {s.seed} (step {lost[s.hash]['step']})" for s in specs
                if s.dataset == dataset and s.hash in lost]
        if gone:
            results += ["", "Diverged (non-finite training loss; left out of the means above, and not retried: the "
                        "same settings diverge the same way): " + ", ".join(gone) + "."]
        shifted = [r for r in dataset_rows if r.get("shift_data")]
        for shift in dict.fromkeys(r["shift_data"] for r in shifted):
            results += ["", f"### {dataset} under shift: tested on `{shift}`", "",
                        _table(report.summarize([r for r in shifted if r["shift_data"] == shift], "variant",
                                                [k for k, _, _ in SHIFTED]), SHIFTED)]
        cost_groups = report.summarize(dataset_rows, "variant", [k for k, _ in COST])
        cost.append(report.summary_markdown(cost_groups, "variant", COST,
                                            no_spread=("trainable_params", "samples", "torch_threads")))
        written += _dataset_plots(plots, dataset, groups, output, [(s, m) for s, m in done if s.dataset == dataset])
    names = [f"{n}-<dataset>-<variant>.png" for n in _run_plots(METHODS.values())]
    results += ["", f"Plots in plots/: {', '.join(names[:-1])} and {names[-1]} (the run of the lowest finished seed), "
                "accuracy-ece-<dataset>.png and accuracy-nll-<dataset>.png (means)."]
    written.append(_write_text(output / "results.md", "\n".join(results) + "\n"))
    written.append(_write_text(output / "cost.md", "\n".join(cost) + "\n"))
    return written


def _wall_time(plan_: Plan, specs: list[RunSpec], output: Path, dataset: str) -> str:
    """What the dataset's finished runs cost in all, the grid's candidates that were not chosen included."""
    walls = [json.loads((output / s.folder / runs.METRICS).read_text()).get("wall_seconds") or 0.0
             for s in plan_.all_runs(specs, dataset) if finished(output, s)]
    return (f"Wall time: {sum(walls) / 3600:.2f} h over the {len(walls)} finished runs of this dataset (the grid's "
            "candidates included): the sum of each run's wall time in the sitting that finished it, where it was "
            "trained (a run copied by --reuse counts its original time).")


def _tuning(plan_: Plan, dataset: str, output: Path, chosen: dict[tuple[str, str], Choice]) -> list[str]:
    """The learning rates chosen on validation for ``dataset``: every candidate's validation metrics."""
    entries = [e for e in plan_.entries if e.dataset == dataset and plan_.candidates(e)]
    if not entries:
        return []
    lines = [f"Learning rates (and options with a grid) chosen on the validation split (seed {plan_.tune_seed}, "
             f"by validation {plan_.select}; the test split plays no part):", "",
             "| variant | lr | options | val accuracy % | val ECE % | val NLL | chosen |",
             "|---|---|---|---|---|---|---|"]
    for entry in entries:
        choice = chosen[dataset, entry.variant]
        for spec, lr, options in plan_.candidates(entry):
            shown = ", ".join(f"{k} {v}" for k, v in options.items()) or "—"
            val, lost = _validation(output, spec), diverged(output, spec)
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
    followers = [f"{e.variant} takes {e.lr}'s" for e in plan_.entries if e.dataset == dataset and isinstance(e.lr, str)]
    if followers:
        lines += ["", "; ".join(followers) + " rate (the same training objective, or a post-hoc step on it)."]
    return lines + [""]


def _prediction_choice(plan_: Plan, dataset: str, output: Path, chosen: dict[tuple[str, str], Choice],
                       groups: list[dict]) -> list[str]:
    """Sampled or one-pass prediction, chosen per variant like its rate: by the validation metric of the chosen
    candidate. One number per method for readers who want one, without looking at the test split."""
    select, rows = plan_.select, []
    for entry in (e for e in plan_.entries if e.dataset == dataset and plan_.candidates(e)):
        choice, group = chosen[dataset, entry.variant], next((g for g in groups if g["variant"] == entry.variant), None)
        val = next((_validation(output, c) for c, lr, options in plan_.candidates(entry)
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
    return (f"- Model `{first.model}`; training examples: {cap(first.max_train)}; validation and test examples: "
            f"{cap(first.max_eval)}; seeds {seeds}.")


def _schedule(specs: list[RunSpec], dataset: str) -> str:
    mine = [s for s in specs if s.dataset == dataset]
    t = mine[0].config.train
    length = f"{t.steps} steps" if t.steps > 0 else f"{t.epochs:g} epochs"
    rate = lambda s: "not chosen yet" if s.pending else f"{s.config.train.lr:g}"  # noqa: E731
    rates = dict.fromkeys(rate(s) for s in mine)
    lr = next(iter(rates)) if len(rates) == 1 else ", ".join(
        f"{v} {r}" for v, r in dict.fromkeys((s.variant, rate(s)) for s in mine))
    extra = "".join(f" {label} `{value}`." for label, value in (("OOD set:", mine[0].ood),
                                                                ("Shift: also tested on", mine[0].shift)) if value)
    return (f"Data `{mine[0].config.data}`: {length}, batch size {t.batch_size}, max length {t.max_length}, "
            f"learning rate {lr}.{extra}")


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

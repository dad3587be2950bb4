"""The training loop shared by every method: accelerate, AdamW, warm-up + linear decay, clipping,
seeded data order, atomic checkpoints and exact resume. Runs data-parallel under ``accelerate launch``."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import checkpoint
from .data import Split
from .errors import BaraError, Diverged
from .heads import Classifier
from .methods import Method, Progress
from .methods.base import to_device


@dataclass
class TrainConfig:
    epochs: float = 20.0
    steps: int = 0  # when > 0, overrides epochs
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_length: int = 64
    seed: int = 0
    checkpoint_every: int = 0  # 0: no intermediate checkpoints
    eval_every: int = 0  # 0: evaluate on validation only at the end

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        """Raise BaraError naming the first option whose value would train silently wrong or crash mid-run."""
        for name, (ok, wanted, example) in RULES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
                flag = "--" + name.replace("_", "-")
                raise BaraError(f"{flag} must be {wanted}, got {value!r}; fix: pass e.g. {flag} {example}")


def _finite(check: Callable[[float], bool]) -> Callable[[float], bool]:
    return lambda v: math.isfinite(v) and check(v)


def _whole(check: Callable[[int], bool]) -> Callable[[float], bool]:
    return lambda v: isinstance(v, int) and check(v)


# option -> (check, what it must be, an example value)
RULES = {
    "epochs": (_finite(lambda v: v > 0), "a number above 0", "20"),
    "steps": (_whole(lambda v: v >= 0), "a whole number >= 0 (0: use --epochs)", "200"),
    "batch_size": (_whole(lambda v: v >= 1), "a whole number >= 1", "32"),
    "eval_batch_size": (_whole(lambda v: v >= 1), "a whole number >= 1", "64"),
    "lr": (_finite(lambda v: v > 0), "a number above 0", "1e-3"),
    "weight_decay": (_finite(lambda v: v >= 0), "a number >= 0", "0.01"),
    "warmup_ratio": (_finite(lambda v: 0 <= v <= 1), "a fraction from 0 to 1", "0.1"),
    "max_grad_norm": (_finite(lambda v: v >= 0), "a number >= 0 (0: no clipping)", "1.0"),
    "max_length": (_whole(lambda v: v >= 1), "a whole number >= 1 (tokens per input)", "64"),
    "seed": (_whole(lambda v: 0 <= v < 2**32), "a whole number from 0 to 2**32 - 1", "0"),
    "checkpoint_every": (_whole(lambda v: v >= 0), "a whole number >= 0 (0: no checkpoints)", "100"),
    "eval_every": (_whole(lambda v: v >= 0), "a whole number >= 0 (0: no validation during training)", "50"),
}


def batches(classifier: Classifier, split: Split, batch_size: int, order: list[int] | None = None) -> DataLoader:
    """Tokenized minibatches of ``split`` in ``order`` (default: as stored)."""
    order = list(range(len(split))) if order is None else order
    # Its own generator: creating an iterator then draws no number from the global RNG, which a
    # resumed run (creating one mid-epoch) would otherwise consume differently from an uninterrupted one.
    return DataLoader(order, batch_size=batch_size, shuffle=False, generator=torch.Generator(),
                      collate_fn=lambda index: classifier.encode(split, index))


def on_device(batch: dict, module: torch.nn.Module) -> dict:
    """Move a batch to the device of ``module``'s parameters (evaluation runs outside accelerate's loaders)."""
    return to_device(batch, next(module.parameters()).device)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of one epoch depends only on (seed, epoch), so a resumed run sees the same batches."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


# --report-to: accelerate's tracker names; each needs the package of its name, installed by bara-peft's extra of
# that name
TRACKERS = ("tensorboard", "wandb", "mlflow")
TRACKING_DIR = "tracking"  # in the run's folder: where a local tracker (tensorboard, mlflow) writes


def check_report_to(report_to) -> None:
    """Before anything is loaded: ``report_to`` is "none", a tracker of TRACKERS whose package is installed, or an
    accelerate ``GeneralTracker`` (the Python API)."""
    from accelerate.tracking import GeneralTracker

    if report_to == "none" or isinstance(report_to, GeneralTracker):
        return
    if report_to not in TRACKERS:
        raise BaraError(f"--report-to must be none or one of {', '.join(TRACKERS)}, got {report_to!r}; fix: pass "
                        "--report-to tensorboard (or none)")
    if importlib.util.find_spec(report_to) is None:
        raise BaraError(f"--report-to {report_to} needs the package {report_to}, which is not installed; fix: pip "
                        f"install 'bara-peft[{report_to}]' (or drop --report-to)")


def tracker_values(values: dict) -> dict:
    """A run's options as trackers take them: numbers, strings and booleans as they are, anything else as text."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}


def use_cpu() -> bool:
    """accelerate only sets up CPU data parallelism (gloo) when asked for the CPU explicitly."""
    return not torch.cuda.is_available()


def distributed_state():
    from accelerate import PartialState

    return PartialState(cpu=use_cpu())


def total_steps(config: TrainConfig, num_train: int, num_processes: int = 1) -> tuple[int, int]:
    per_epoch = math.ceil(num_train / (config.batch_size * num_processes))
    total = config.steps if config.steps > 0 else max(1, math.ceil(config.epochs * per_epoch))
    return total, per_epoch


@torch.no_grad()
def validation_score(classifier: Classifier, method: Method, split: Split, batch_size: int) -> dict:
    from .metrics import evaluate

    probs = torch.cat([method.training_predict(classifier, on_device(b, classifier))[0].cpu()
                       for b in batches(classifier, split, batch_size)])
    scores = evaluate(probs, torch.tensor(split.labels))
    return {"val_accuracy": scores["accuracy"], "val_nll": scores["nll"], "val_ece": scores["ece"]}


# The budget check: validation NLL at this fraction of the steps and at the end (one-pass, on the validation split).
CHECK_AT = 0.8
# A change of the validation NLL over the last 20 % of the steps beyond which the budget is called short (still
# falling) or long (rising again): both 2 % and 0.01 nats (a smaller change matters to nobody); measured in
# docs/experiments.md section 1.
CONVERGED_WITHIN, CONVERGED_WITHIN_NATS = 0.02, 0.01
# At the end within this fraction of the uniform prediction's NLL, log C: the run has not learned anything yet.
CHANCE_WITHIN = 0.02


def check_steps(steps: int) -> tuple[int, ...]:
    """Steps after which the validation split is scored for the budget check (none for runs under 10 steps)."""
    return (max(1, round(CHECK_AT * steps)), steps) if steps >= 10 else ()


def convergence(history: list[dict], num_labels: int) -> dict | None:
    """Did the step budget suffice? From the validation NLL of :func:`check_steps` in the history:
    ``{"val_nll_at_80": a, "val_nll_at_end": b, "change": (b - a) / a, "verdict": "converged" | "still
    falling" | "rising" | "not learning", "advice": ...}`` ("not learning": b still near log C, the uniform
    prediction's NLL over ``num_labels`` classes); None when the history has no such scores (under 10 steps)."""
    scored = {h["step"]: h["val_nll"] for h in history if "val_nll" in h}
    steps = history[-1]["step"] if history else 0
    points = check_steps(steps)
    if not points or any(p not in scored for p in points):
        return None
    before, after = (scored[p] for p in points)
    change = (after - before) / before
    moved = abs(after - before) > CONVERGED_WITHIN_NATS
    trend = f"over the last 20 % of the steps ({before:.4g} -> {after:.4g}, {100 * change:+.1f} %)"
    if after >= (1 - CHANCE_WITHIN) * math.log(num_labels):
        verdict = "not learning"
        advice = (f"validation NLL {after:.4g} at the end, about the chance level log {num_labels} = "
                  f"{math.log(num_labels):.4g}: the run has not learned the task; another --lr (3x either way: a rate "
                  f"too high stalls at the label prior as one too low does) or more steps")
    elif moved and change < -CONVERGED_WITHIN:
        verdict = "still falling"
        advice = f"validation NLL still falling {trend}: more steps (--epochs / --steps) or a higher --lr may do better"
    elif moved and change > CONVERGED_WITHIN:
        verdict = "rising"
        advice = f"validation NLL rising {trend}: fewer steps or a lower --lr may do better (over-fitting)"
    else:
        verdict, advice = "converged", ""
    return {"val_nll_at_80": before, "val_nll_at_end": after, "change": change, "verdict": verdict,
            "advice": advice}


def train(classifier: Classifier, method: Method, train_split: Split, validation_split: Split,
          config: TrainConfig, output_dir: Path, resume: bool = False, progress_bar: bool = True,
          extra: Callable[[], dict] | None = None, report_to="none", tracker_config: dict | None = None) -> list[dict]:
    """Train ``classifier`` (already wrapped by ``method``) in place; return the logged history of every step
    (after a resume too: the checkpoint carries the steps before it). ``extra()``: JSON values each checkpoint
    stores beside the step (the run config, time spent), read back with :func:`checkpoint.read`. ``report_to``:
    an accelerate tracker (see :func:`check_report_to`) that gets every step's record of the history, and
    ``tracker_config`` as the run's configuration."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from transformers import get_linear_schedule_with_warmup

    # Some methods leave parameters out of a given pass (e.g. gates switched off), which DDP must allow.
    tracking = report_to != "none"
    accelerator = Accelerator(cpu=use_cpu(), log_with=report_to if tracking else None,
                              project_dir=str(output_dir / TRACKING_DIR) if tracking else None,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    if tracking:
        accelerator.init_trackers("bara", config=tracker_values(tracker_config or {}))
    steps, per_epoch = total_steps(config, len(train_split), accelerator.num_processes)
    optimizer = torch.optim.AdamW(method.param_groups(classifier, config.lr, config.weight_decay))
    # Not passed to accelerator.prepare, which would step it once per process and change the schedule.
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * steps), steps)
    model, optimizer = accelerator.prepare(classifier, optimizer)

    step, history = 0, []
    global_batch = config.batch_size * accelerator.num_processes
    if resume and (found := checkpoint.newest_whole(output_dir)) is not None:
        step, adapter, history = checkpoint.load(found, optimizer, scheduler, accelerator.process_index)
        method.load_adapter_state(classifier, adapter)

    def save_checkpoint():
        checkpoint.save(output_dir, step, method.adapter_state(classifier), optimizer, scheduler,
                        accelerator.process_index, accelerator.is_main_process, accelerator.wait_for_everyone,
                        history, extra() if extra else None)

    checks = check_steps(steps) if len(validation_split) else ()
    bar = tqdm(total=steps, initial=step, desc=f"train {method.name}", unit="step",
               disable=not (progress_bar and accelerator.is_main_process), dynamic_ncols=True)
    while step < steps:
        epoch, skip = divmod(step, per_epoch)
        loader = accelerator.prepare_data_loader(
            batches(classifier, train_split, config.batch_size, epoch_order(len(train_split), config.seed, epoch)))
        if skip:
            loader = accelerator.skip_first_batches(loader, skip)
        for batch in loader:
            model.train()
            loss, logs = method.loss(model, batch, Progress(step, steps, len(train_split), global_batch))
            if not torch.isfinite(loss):
                kept = "the last good checkpoint is kept in " + str(output_dir / checkpoint.NAME) \
                    if checkpoint.find(output_dir) else "no checkpoint was written yet"
                raise Diverged(f"non-finite training loss at step {step + 1} ({logs}); {kept}; fix: lower --lr"
                               f"{method.diverged_fix}, or check the data", step + 1)
            accelerator.backward(loss)
            if config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            # Before zero_grad: a method may read this step's gradients (to allocate ranks by them).
            method.on_step_end(classifier, Progress(step, steps, len(train_split), global_batch))
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", epoch=epoch + 1)
            record = {"step": step, "loss": loss.item(), **logs}
            curve = config.eval_every and (step % config.eval_every == 0 or step == steps)
            if (curve or step in checks) and accelerator.is_main_process:
                record.update(validation_score(classifier, method, validation_split, config.eval_batch_size))
                if curve:
                    bar.write(" ".join(f"{k}={v:.4g}" for k, v in record.items()))
            history.append(record)
            if tracking:
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                save_checkpoint()
            if step >= steps:
                break
    bar.close()
    if tracking:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    model.eval()
    return history

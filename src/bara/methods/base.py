"""What every fine-tuning method is: a name, a config dataclass and the same few verbs.

The trainer, the evaluator and the benchmark only call these verbs, so no code outside a method's own
module ever asks which method it is running.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import BaraError
from ..heads import Classifier

# Default LoRA targets per architecture (peft's own defaults cover the rest).
TARGET_MODULES = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}
MAX_ROWS = 1024  # Monte-Carlo copies of a batch are stacked into passes of at most this many rows


class Choices(str, Enum):
    """The values a string option takes, each member with a docstring saying what it does (as laplace-torch's
    ``utils/enums.py``). A config keeps the plain string (so saved adapters, the CLI and run hashes see the same
    text as before); :meth:`MethodConfig.validate` checks it against the class given to :func:`option`."""

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)


def option(default, help: str, choices: type[Choices] | None = None):
    """A config field with the help text the CLI shows for it and, for a string option, its :class:`Choices`."""
    metadata = {"help": help} if choices is None else {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class MethodConfig:
    # Options added after adapters had been saved, with the value that reproduces those adapters' predictions
    # (applied when an adapter whose config lacks them is loaded).
    legacy: ClassVar[dict] = {}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "MethodConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise BaraError(f"unknown option(s) {', '.join(unknown)} for this method; fix: use one of {sorted(known)}")
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise BaraError naming the bad value and the fix; here, for an option that is not one of its choices
        (subclasses check their numbers after calling this)."""
        for f in dataclasses.fields(self):
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices is not None and value not in choices.values():
                raise BaraError(f"{f.name}={value!r} is not one of {choices.values()}; fix: pass "
                                f"--{f.name.replace('_', '-')} {choices.values()[0]}")


@dataclass
class Progress:
    """Where training stands; methods use it for warm-ups and dataset-size scaling of KL terms."""

    step: int
    total_steps: int
    num_train: int
    batch_size: int = 1  # instances per optimiser step, over all processes

    @property
    def fraction(self) -> float:
        return self.step / max(self.total_steps, 1)


class Method:
    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    default_samples: ClassVar[int] = 0  # test-time Monte-Carlo samples; 0 = one deterministic pass
    # Whether a sampling method also has a one-pass prediction of its own (the means of its random variables),
    # scored and timed beside the sampled one. An ensemble has none: its "one pass" would be the same K-average.
    one_pass: ClassVar[bool] = True
    # What else to try when training diverges (after "lower --lr"), for the trainer's error message.
    diverged_fix: ClassVar[str] = ""
    # The peak learning rate `bara train` uses when --lr is left out (and a preset that sets none), by the kind of
    # model ("encoder", "causal"), each method's beside the evidence for it. A kind a method does not list (AdaLoRA on
    # causal LMs, where no benchmark has run it) trains at TrainConfig's shared lr.
    default_lr: ClassVar[dict[str, float]] = {}
    # A post-hoc method whose training is exactly another method's (its objective, parameters and options of that
    # method; only fit_posthoc and prediction differ): that method's name. A finished run of it at the same data,
    # seed and schedule is then this method's fit (`bara train --trained-from`; `bara bench` finds it), so the
    # same LoRA is not trained twice.
    trains_as: ClassVar[str | None] = None

    def __init__(self, config: MethodConfig | None = None):
        self.config = config if config is not None else self.config_class()

    # -- building -----------------------------------------------------------------------------------
    def wrap(self, classifier: Classifier) -> None:
        """Inject the adapter into ``classifier.backbone`` in place and leave only its parameters trainable."""
        raise NotImplementedError

    def param_groups(self, classifier: Classifier, lr: float, weight_decay: float) -> list[dict]:
        params = [p for p in classifier.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}]

    # -- training -----------------------------------------------------------------------------------
    def forward(self, model, batch: dict) -> torch.Tensor:
        """Logits of one stochastic training pass. ``model`` is the classifier, possibly wrapped for
        data-parallel training, so methods call it but read nothing else from it."""
        return model(batch["input_ids"], batch["attention_mask"])

    def loss(self, model, batch: dict, progress: Progress) -> tuple[torch.Tensor, dict]:
        """Training objective for one minibatch and the numbers worth logging."""
        nll = F.cross_entropy(self.forward(model, batch), batch["labels"])
        return nll, {"nll": nll.item()}

    def on_step_end(self, classifier: Classifier, progress: Progress) -> None:
        """Called after each optimiser step, while the step's gradients are still in ``.grad`` (AdaLoRA
        allocates ranks here from them); ``progress.step`` counts the steps done, 1 after the first."""

    def fit_posthoc(self, classifier: Classifier, train_batches, validation_batches) -> None:
        """Called once after training (Laplace fits its posterior, temperature scaling its temperature)."""

    # -- prediction ---------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, classifier: Classifier, batch: dict, samples: int) -> torch.Tensor:
        """Class probabilities ``[max(samples, 1), batch, classes]``; ``samples = 0`` is the one-pass prediction."""
        classifier.eval()
        return torch.softmax(classifier(batch["input_ids"], batch["attention_mask"]).float(), -1)[None]

    def training_predict(self, classifier: Classifier, batch: dict) -> torch.Tensor:
        """The one-pass probabilities ``[1, batch, classes]`` of the model as trained, which the trainer scores on
        validation during training: :meth:`predict` without samples, or, for a method with a post-hoc step, the
        trained model's before that step is fitted."""
        return self.predict(classifier, batch, 0)

    def is_fitted(self) -> bool:
        """Whether :meth:`predict` can run: False for a method with a post-hoc step until :meth:`fit_posthoc` ran
        (or its fitted state was loaded with the adapter)."""
        return True

    def check_fitted(self, fitted: bool) -> None:
        """BaraError unless ``fitted``: a method whose prediction needs what :meth:`fit_posthoc` fits never predicts
        without it (as laplace-torch's "Laplace not fitted. Run fit() first.")."""
        if not fitted:
            raise BaraError(f"{self.name} is not fitted: it predicts with what fit_posthoc() fits after training; fix: "
                            "call method.fit_posthoc(classifier, train_batches, validation_batches) first (bara train "
                            "does; with bara.get_model: model.fit_posthoc(train_batches, validation_batches)), or load "
                            "a trained adapter (bara eval, bara.from_pretrained)")

    def diagnostics(self, classifier: Classifier, batches) -> dict:
        """Method-specific numbers for metrics.json (e.g. BaRA's effective ranks, AdaLoRA's ranks)."""
        return {}

    @contextmanager
    def recording(self, seed: int):
        """Around the scoring's sampled prediction (drawn after ``torch.manual_seed(seed)``), whose batches the next
        :meth:`diagnostics` call gets: a method whose diagnostics would sample the same predictive again keeps
        what it needs from this one instead (BaRA). Nothing by default."""
        yield

    def plots(self, classifier: Classifier, diagnostics: dict, output_dir, caption: str = "") -> list[str]:
        """Write method-specific plots into ``output_dir``, titled with ``caption`` (method, data and seed); return
        their file names (among :attr:`run_files`)."""
        return []

    # -- reporting ----------------------------------------------------------------------------------
    # A report reads saved runs (metrics.json), not models, so these belong to the class. The shared report code
    # (bara.report, bara.bench) asks them instead of knowing any method's diagnostics.

    # Columns of the benchmark's results table for this method's :meth:`summary` values, (key, header): shown
    # where a run of the dataset has a value, after the shared columns, in the registry's order of methods.
    report_columns: ClassVar[tuple[tuple[str, str], ...]] = ()
    # Files a run writes beside the shared ones (those :meth:`plots` writes); the benchmark copies each run's
    # ``NAME.png`` into its plots/ as ``NAME-<dataset>-<variant>.png``.
    run_files: ClassVar[tuple[str, ...]] = ()
    # One sentence on what :meth:`fit_summary` lists, for the report's paragraph on post-hoc fits.
    fit_note: ClassVar[str] = ""
    # What the abbreviations of :attr:`report_columns` (and of plots) stand for, in the report's protocol.
    column_legend: ClassVar[str] = ""

    @classmethod
    def summary(cls, diagnostics: dict, validation: bool = False) -> dict:
        """The numbers of ``diagnostics`` (metrics.json's, of the test split or, with ``validation``, of the
        validation split) worth a row of a report: {key: value}, in column order; none by default."""
        return {}

    @classmethod
    def fit_summary(cls, rows: list[dict]) -> str | None:
        """What a post-hoc step fitted in each run of one variant (report rows, by seed), as the text after
        "- VARIANT: " in the report; None where nothing was fitted."""
        return None

    # -- adapters -----------------------------------------------------------------------------------
    def adapter_state(self, classifier: Classifier) -> dict[str, torch.Tensor]:
        """Every tensor the adapter adds or trains (by name), to be saved as safetensors."""
        return {n: p.detach().clone() for n, p in classifier.named_parameters() if p.requires_grad}

    def merged(self, classifier: Classifier) -> torch.nn.Module:
        """The base model with the adapter folded into its weights (``bara export --merge``), predicting as the
        method's one-pass prediction; consumes ``classifier``. BaraError saying why where no such model exists."""
        raise BaraError(f"{self.name} has no merged form; fix: use the adapter itself (bara eval, "
                        "bara.from_pretrained)")

    def peft_adapters(self, classifier: Classifier) -> dict[str, tuple[object, dict[str, torch.Tensor]]]:
        """The adapters peft can load (``peft.PeftModel.from_pretrained``), to be saved as peft saves them:
        {subfolder: (peft config, tensors named as in peft's adapter_model.safetensors)}; none by default. What
        :meth:`adapter_state` holds beyond them is saved beside them, in bara's own file."""
        return {}

    def from_peft_names(self, classifier: Classifier,
                        files: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The tensors of saved peft adapters ({subfolder: tensors}) under their :meth:`adapter_state` names."""
        return {}

    def load_adapter_state(self, classifier: Classifier, state: dict[str, torch.Tensor]) -> None:
        own = {**dict(classifier.named_buffers()), **dict(classifier.named_parameters())}
        expected = set(self.adapter_state(classifier))
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise BaraError(f"adapter does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                            "fix: load it with the base model and method it was trained with")
        with torch.no_grad():
            for name, value in state.items():
                if own[name].shape != value.shape:
                    raise BaraError(f"adapter tensor {name} has shape {tuple(value.shape)}, the model expects "
                                    f"{tuple(own[name].shape)}; fix: use the same base model and rank")
                own[name].copy_(value)


def seeds_of(rows: list[dict]) -> str:
    """The seeds of report rows, as a report lists them ("0, 1, 2")."""
    return ", ".join(str(r["seed"]) for r in rows)


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch with its tensors on ``device`` (other values as they are)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def repeated_passes(classifier: Classifier, batch: dict, samples: int) -> torch.Tensor:
    """Probabilities ``[samples, B, C]`` from ``samples`` copies of the batch, stacked into as few passes as
    ``MAX_ROWS`` allows, so every copy draws its own randomness (dropout masks, BaRA's A and gates) in one forward."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    per_pass = max(1, MAX_ROWS // ids.shape[0])
    probs = []
    for start in range(0, samples, per_pass):
        s = min(per_pass, samples - start)
        logits = classifier(ids.repeat(s, 1), mask.repeat(s, 1)).float()
        probs.append(torch.softmax(logits, -1).view(s, ids.shape[0], -1))
    return torch.cat(probs)

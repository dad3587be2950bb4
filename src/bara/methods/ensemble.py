r"""Deep ensemble of LoRA adapters (Lakshminarayanan et al., 2017; as in the Laplace-LoRA and BLoB
comparisons): K adapters from seeds ``seed + k``, trained together, their probabilities averaged,

.. math:: p(y \mid x) = \frac1K \sum_{k=1}^K \mathrm{softmax}\, f_k(x), \qquad
          \mathcal L = \sum_{k=1}^K \mathrm{CE}\big(f_k(x), y\big).

The K members are K peft adapters (``member0`` ... ``member{K-1}``) in one model, each with its own copy of
an encoder's classification head (peft's per-adapter ``modules_to_save``). They share the frozen backbone
and every minibatch, but no trainable parameter: the summed loss gives each member exactly its own
gradient, so one training loop trains K independent LoRAs. Two couplings remain, both through the shared
trainer: the data order, and gradient clipping, which scales by the norm of all members' gradients
together.

One call of the classifier runs every member (:class:`MemberStack`), so the trainer, data-parallel
training included, sees one forward per step. The saved adapter holds all members; each tensor's name
carries its member.

Prediction returns the members' probabilities as the samples dimension ``[K, B, C]`` for any
``samples > 0`` (the evaluator averages them); ``samples = 0`` returns their mean ``[1, B, C]``: an ensemble
has no cheaper one-pass prediction, so both cost K passes and give the same predictive.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BaraError
from ..heads import Classifier
from .base import Progress, option
from .lora import Lora, LoraConfig, peft_wrap, target_modules


@dataclass
class EnsembleConfig(LoraConfig):
    members: int = option(3, "number of independently seeded LoRA adapters (member k uses seed + k)")

    def validate(self) -> None:
        super().validate()
        if self.members < 1:
            raise BaraError(f"members must be >= 1, got {self.members}; fix: pass --members 3")


class MemberStack(nn.Module):
    """The peft model with K adapters as one module: ``forward`` runs every member on the same inputs and
    concatenates their logits along the batch, ``[K * B, ...]`` (member-major)."""

    def __init__(self, peft_model, members: list[str]):
        super().__init__()
        self.peft_model = peft_model
        self.members = members
        self.config = peft_model.config

    def activate(self, member: str) -> None:
        self.peft_model.set_adapter(member)
        # set_adapter freezes the inactive adapters; all members train together, so undo that.
        self.peft_model.set_requires_grad(self.members, True)

    def forward(self, **kwargs) -> SimpleNamespace:
        logits = []
        for member in self.members:
            self.activate(member)
            logits.append(self.peft_model(**kwargs).logits)
        return SimpleNamespace(logits=torch.cat(logits))


def member_seed(base: int, k: int) -> int:
    return (base + k) % 2**64  # torch seeds are 64-bit


def reinitialise_heads(peft_model, member: str, std: float) -> None:
    """A fresh draw of ``member``'s copy of every fully trained module (an encoder's classification head),
    as transformers initialises a head: N(0, std^2) weights, zero biases. peft copies the one head the
    model was loaded with into every adapter, which would give all members the same head."""
    from peft.utils import ModulesToSaveWrapper

    for wrapper in peft_model.modules():
        if isinstance(wrapper, ModulesToSaveWrapper) and member in wrapper.modules_to_save:
            for module in wrapper.modules_to_save[member].modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=std)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)


class Ensemble(Lora):
    """K LoRA adapters from seeds seed + k, trained in one loop, probabilities averaged."""

    name = "ensemble"
    # LoRA's rate, which standard gives the ensemble (5e-3 on banking77, clinc150 and hwu64):
    # benchmarks/results/standard/results.md, each intent set's "Learning rates ... chosen on the validation split".
    # On causal LMs LoRA's 3e-3 likewise (no benchmark runs the ensemble on one yet).
    default_lr = {"encoder": 5e-3, "causal": 3e-3}
    config_class = EnsembleConfig
    one_pass = False

    def __init__(self, config: EnsembleConfig | None = None):
        super().__init__(config)
        self.default_samples = self.config.members  # the samples dimension is the K members
        # The scoring's member probabilities, batch by batch: while recording, then for the next diagnostics.
        self._record: list[torch.Tensor] | None = None
        self._recorded: list[torch.Tensor] = []

    @property
    def member_names(self) -> list[str]:
        return [f"member{k}" for k in range(self.config.members)]

    peft_root = "backbone.peft_model."

    def peft_model_of(self, classifier: Classifier):
        return classifier.backbone.peft_model

    def adapter_names(self) -> list[str]:
        return self.member_names  # saved as peft saves several adapters: one subfolder each

    def merged(self, classifier: Classifier) -> nn.Module:
        raise BaraError(f"an ensemble is {self.config.members} models whose probabilities are averaged, not one set of "
                        "weights; fix: merge one member, e.g. peft.PeftModel.from_pretrained(base, ADAPTER/member0)"
                        ".merge_and_unload()")

    def wrap(self, classifier: Classifier) -> None:
        """Member k's LoRA (and head) are drawn under seed ``s + k``, where ``s`` is the seed the run set
        before building the model (``torch.initial_seed()``); the global random stream is left as it was."""
        from peft import LoraConfig as PeftLoraConfig

        c = self.config
        config = PeftLoraConfig(r=c.r, lora_alpha=c.alpha, lora_dropout=c.lora_dropout,
                                target_modules=target_modules(c, classifier))
        base_seed = torch.initial_seed()
        head_std = getattr(classifier.backbone.config, "initializer_range", 0.02)
        with torch.random.fork_rng(devices=[]):
            for k, member in enumerate(self.member_names):
                torch.manual_seed(member_seed(base_seed, k))
                if k == 0:
                    peft_wrap(classifier, copy.deepcopy(config), member)
                else:
                    classifier.backbone.add_adapter(member, copy.deepcopy(classifier.backbone.peft_config["member0"]))
                reinitialise_heads(classifier.backbone, member, head_std)
        classifier.backbone = MemberStack(classifier.backbone, self.member_names)
        classifier.backbone.activate(self.member_names[0])

    def member_logits(self, model, batch: dict) -> torch.Tensor:
        """Logits ``[K, B, C]`` of every member in one call of the classifier."""
        logits = model(batch["input_ids"], batch["attention_mask"])
        return logits.view(self.config.members, batch["input_ids"].shape[0], -1)

    def forward(self, model, batch: dict) -> torch.Tensor:
        return self.member_logits(model, batch)

    def loss(self, model, batch: dict, progress: Progress) -> tuple[torch.Tensor, dict]:
        logits = self.member_logits(model, batch)
        nll = torch.stack([F.cross_entropy(member, batch["labels"]) for member in logits])
        return nll.sum(), {"nll": nll.mean().item(), **{f"nll_{k}": v.item() for k, v in enumerate(nll)}}

    @torch.no_grad()
    def predict(self, classifier: Classifier, batch: dict, samples: int) -> torch.Tensor:
        """The members' probabilities ``[K, B, C]`` (``samples > 0``) or their mean ``[1, B, C]`` (``samples = 0``)."""
        classifier.eval()
        probs = torch.softmax(self.member_logits(classifier, batch).float(), -1)
        if samples > 0 and self._record is not None:
            self._record.append(probs.cpu())
        return probs if samples > 0 else probs.mean(0, keepdim=True)

    @contextmanager
    def recording(self, seed: int):
        """The members' probabilities of the scoring's pass are kept for the next :meth:`diagnostics`, which would
        otherwise run every member over the split again (nothing here is random: ``seed`` is not needed)."""
        self._record = []
        try:
            yield
        finally:
            self._record, self._recorded = None, self._record or []

    def diagnostics(self, classifier: Classifier, batches) -> dict:
        """Each member's accuracy and how often the members disagree on the top class."""
        correct, disagree, n = torch.zeros(self.config.members, dtype=torch.float64), 0, 0
        batches, recorded, self._recorded = list(batches), self._recorded, []  # consumed
        if [p.shape[1] for p in recorded] != [len(b["labels"]) for b in batches]:  # not the scoring of these
            recorded = [self.predict(classifier, b, 1) for b in batches]
        for probs, batch in zip(recorded, batches):
            top = probs.argmax(-1).to(batch["labels"].device)  # [K, B]
            correct += (top == batch["labels"]).sum(1)
            disagree += int((top != top[:1]).any(0).sum())
            n += top.shape[1]
        return {"members": self.config.members, "member_accuracy": (correct / max(n, 1)).tolist(),
                "disagreement": disagree / max(n, 1)}

r"""AdaLoRA (Zhang et al., 2023) through peft: the non-Bayesian adaptive-rank anchor.

Each adapted layer is an SVD-shaped update :math:`\Delta W = P \Lambda Q` with ``init_r`` triplets
(peft's ``lora_A`` = Q, ``lora_E`` = diag Λ, ``lora_B`` = P). Training minimises

.. math:: \mathcal L = \mathrm{CE} + \gamma \cdot \frac{1}{|\mathcal M|} \sum_{M \in \mathcal M}
          \lVert M M^\top - I \rVert_F, \qquad \mathcal M = \{Q_\ell\} \cup \{P_\ell^\top\}

(the orthogonality regulariser). peft adds it in ``AdaLoraModel.forward`` only to a loss the model
computes from labels, which the classifier never passes, and a ``PeftModel`` without a task type does not
even call that forward; so :meth:`AdaLora.loss` adds it itself. After every optimiser step peft's
``update_and_allocate`` scores each triplet by a smoothed :math:`|w \cdot \nabla w|` sensitivity and
zeroes the least important :math:`\Lambda` entries down to a cubic budget schedule:
``init_r`` per layer until ``tinit`` steps, ``target_r`` per layer on average from ``total_step - tfinal``
on, where the rank pattern is frozen.

``total_step`` is always the trainer's number of steps. peft needs a value at injection time, before
the trainer has counted its steps, so :meth:`wrap` gives peft a placeholder schedule and the real one
(``total_step``, and ``tinit``/``tfinal`` in steps) is written into peft's config from the first
:class:`Progress` the trainer passes (in :meth:`loss`, before the first step, so a schedule that does
not fit fails before training). peft reads these fields at every call, never at injection.

The rank pattern needs no file of its own: peft prunes a triplet by setting its singular value to exactly
0, so the saved ``lora_E`` carries it, and loading hands it back to peft (a resumed run keeps masking
with it). peft's sensitivity averages are not saved: a run resumed during the pruning phase restarts them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import BaraError
from ..heads import Classifier
from .base import Progress, option
from .lora import Lora, LoraConfig, peft_wrap, target_modules

ADAPTER = "default"


@dataclass
class AdaloraConfig(LoraConfig):
    # r is peft's init_r (the rank each layer starts with); the help is LoraConfig's, which the CLI shows
    r: int = option(12, "adapter rank (for BaRA and AdaLoRA: the maximum rank)")
    target_r: int = option(8, "average rank per layer that AdaLoRA's budget ends at")
    tinit: float = option(0.1, "warm-up before pruning starts: a fraction of the training steps if < 1, else steps")
    tfinal: float = option(0.4, "final phase with the rank pattern fixed: a fraction of the steps if < 1, else steps")
    delta_t: int = option(10, "steps between two rank allocations during pruning (peft's deltaT)")
    orth_reg_weight: float = option(0.5, "weight of AdaLoRA's orthogonality regulariser on P and Q")
    sensitivity_beta: float = option(0.85, "EMA factor of the sensitivity and its uncertainty (peft's beta1 = beta2)")

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.target_r <= self.r:
            raise BaraError(f"target_r must be in [1, r = {self.r}], got {self.target_r}; fix: pass --target-r "
                            f"{min(8, self.r)} (or a larger --r)")
        if self.tinit < 0 or self.tfinal < 0:
            raise BaraError(f"tinit and tfinal must be >= 0, got {self.tinit} and {self.tfinal}")
        if self.tinit < 1 and self.tfinal < 1 and self.tinit + self.tfinal >= 1:
            raise BaraError(f"tinit + tfinal = {self.tinit + self.tfinal:g} of training leaves no pruning phase; "
                            "fix: pass e.g. --tinit 0.1 --tfinal 0.4")
        if self.delta_t < 1:
            raise BaraError(f"delta_t must be >= 1, got {self.delta_t}")
        if self.orth_reg_weight < 0:
            raise BaraError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if not 0 < self.sensitivity_beta < 1:
            raise BaraError(f"sensitivity_beta must be in (0, 1), got {self.sensitivity_beta}")


def schedule_steps(value: float, total_steps: int) -> int:
    """``value`` < 1 is a fraction of ``total_steps``, otherwise a number of steps."""
    return round(value * total_steps) if value < 1 else int(value)


def orthogonality_penalty(factors: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    r"""Mean over the factors of :math:`\lVert Q Q^\top - I \rVert_F` (``lora_A``) and
    :math:`\lVert P^\top P - I \rVert_F` (``lora_B``), as peft's ``AdaLoraModel.forward``."""
    terms = []
    for name, p in factors:
        cov = p @ p.T if "lora_A" in name else p.T @ p
        terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)))
    return torch.stack(terms).mean()


class AdaLora(Lora):
    """peft's AdaLoRA with the rank budget scheduled over the trainer's steps."""

    name = "adalora"
    # Chosen on validation for MiniLM at 1,000 examples: 1e-2 on banking77 and clinc150 (on hwu64 5e-3, ahead by
    # 0.005 nats of validation NLL):
    # benchmarks/results/standard/results.md, each intent set's "Learning rates ... chosen on the validation split".
    default_lr = {"encoder": 1e-2}
    config_class = AdaloraConfig

    def wrap(self, classifier: Classifier) -> None:
        from peft import AdaLoraConfig as PeftAdaLoraConfig

        c = self.config
        # A placeholder schedule (peft insists on one); the real one is set from the trainer's Progress.
        peft_wrap(classifier, PeftAdaLoraConfig(
            init_r=c.r, target_r=c.target_r, lora_alpha=c.alpha, lora_dropout=c.lora_dropout,
            target_modules=target_modules(c, classifier), tinit=0, tfinal=0, total_step=1, deltaT=c.delta_t,
            beta1=c.sensitivity_beta, beta2=c.sensitivity_beta, orth_reg_weight=c.orth_reg_weight), ADAPTER)
        self.peft_model = classifier.backbone
        self.factors = [(n, p) for n, p in self.peft_model.named_parameters()
                        if ("lora_A" in n or "lora_B" in n) and ADAPTER in n]
        self.total_steps: int | None = None

    @property
    def peft_config(self):
        return self.peft_model.peft_config[ADAPTER]

    @property
    def tuner(self):
        """peft's AdaLoraModel: owns ``update_and_allocate`` and the rank allocator."""
        return self.peft_model.base_model

    def set_schedule(self, total_steps: int) -> None:
        """Write the trainer's step count into peft's schedule (idempotent)."""
        if total_steps == self.total_steps:
            return
        c, config = self.config, self.peft_config
        tinit, tfinal = schedule_steps(c.tinit, total_steps), schedule_steps(c.tfinal, total_steps)
        if tinit >= total_steps - tfinal:
            raise BaraError(f"AdaLoRA's schedule has no pruning phase: tinit = {tinit} and tfinal = {tfinal} steps of "
                            f"{total_steps}; fix: lower --tinit/--tfinal or train for more steps")
        config.total_step, config.tinit, config.tfinal = total_steps, tinit, tfinal
        self.total_steps = total_steps

    def loss(self, model, batch: dict, progress: Progress) -> tuple[torch.Tensor, dict]:
        self.set_schedule(progress.total_steps)
        nll = F.cross_entropy(self.forward(model, batch), batch["labels"])
        orth = orthogonality_penalty(self.factors)
        return nll + self.config.orth_reg_weight * orth, {"nll": nll.item(), "orth": orth.item()}

    def on_step_end(self, classifier: Classifier, progress: Progress) -> None:
        """Allocate ranks from this step's gradients; ``progress.step`` counts the steps done (1, 2, ...),
        so with tfinal = 0 the final allocation still happens, at the last step."""
        self.set_schedule(progress.total_steps)
        self.tuner.update_and_allocate(progress.step)

    # -- ranks ----------------------------------------------------------------------------------------
    def rank_pattern(self) -> dict[str, torch.Tensor]:
        """Per adapted layer (peft's ``lora_E`` name), which of the ``init_r`` triplets are kept (bool):
        peft's pattern once it has allocated, else the non-zero singular values (all of them after training
        without pruning; a pruned triplet has its singular value exactly 0)."""
        found = self.peft_config.rank_pattern or {}
        pattern = {}
        for n, p in self.tuner.model.named_parameters():
            if f"lora_E.{ADAPTER}" in n:
                kept = found.get(n, found.get(n.replace(f".{ADAPTER}", "")))
                pattern[n] = (p.detach() != 0).flatten().cpu() if kept is None else torch.as_tensor(kept).bool()
        return pattern

    def diagnostics(self, classifier: Classifier, batches) -> dict:
        """The rank of each adapted layer after allocation, their total, and the budgets."""
        ranks = {n.replace(f".lora_E.{ADAPTER}", ""): int(kept.sum()) for n, kept in self.rank_pattern().items()}
        return {"ranks": ranks, "total_rank": sum(ranks.values()), "mean_rank": sum(ranks.values()) / len(ranks),
                "init_r": self.config.r, "target_r": self.config.target_r,
                "budget_init": self.config.r * len(ranks), "budget_target": self.config.target_r * len(ranks)}

    # -- adapters -------------------------------------------------------------------------------------
    def saved_peft_config(self, classifier: Classifier, adapter: str):
        """Without the rank pattern: the tensors are saved at full rank, pruned triplets with E = 0 (peft would
        resize the modules to the pattern before loading, and the full tensors would not fit)."""
        config = super().saved_peft_config(classifier, adapter)
        config.rank_pattern = None
        return config

    def load_adapter_state(self, classifier: Classifier, state: dict[str, torch.Tensor]) -> None:
        """The pruned triplets are the zero singular values, so the saved ``lora_E`` carries the rank
        pattern; it is handed back to peft, which keeps masking with it if training resumes in the final phase."""
        super().load_adapter_state(classifier, state)
        self.peft_config.rank_pattern = None
        pattern = self.rank_pattern()
        if not all(kept.all() for kept in pattern.values()):
            self.peft_config.rank_pattern = {n: kept.tolist() for n, kept in pattern.items()}

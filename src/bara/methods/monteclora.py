r"""MonteCLoRA (Sengupta et al., 2024) through peft: ``LoraConfig(monteclora_config=MontecloraConfig(...))``.

peft's variant perturbs each adapted layer's A with N Monte-Carlo components and mixes them with Dirichlet
weights, in every training pass,

.. math:: A_\text{eff} = \sum_{n=1}^{N} w_n (A + ε_n), \qquad ε_n \sim N(0, c^2 Σ), \;
          Σ \sim \text{Wishart}, \; w \sim \text{Dirichlet (log-normal approximation)},

with ``c = sample_scaler``, and adds the KL of its variational factors (weighted by ``kl_loss_weight``,
averaged over the layers: ``LoraModel._get_monteclora_loss``) to the task loss. peft samples only while the
LoRA layer is in training mode; in eval mode it is plain LoRA. So prediction with S samples switches the LoRA
layers alone (not their dropout, not the backbone's) to training mode for S passes, each with its own draw;
``samples = 0`` is the deterministic pass with the mean A.

Every pass draws its noise from torch's global generator: peft's sampler pre-draws a buffer of noise when it
is built and refills it every ``buffer_size`` passes, which a checkpoint does not record, so a resumed run or a
reloaded adapter would replay other noise. Here the buffer holds one draw and is refilled before each pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import BaraError
from ..heads import Classifier
from .base import Progress, option
from .lora import Lora, LoraConfig, peft_wrap, target_modules


@dataclass
class MonteCLoraConfig(LoraConfig):
    # Defaults are peft's MontecloraConfig's.
    monteclora_samples: int = option(8, "MonteCLoRA's Monte-Carlo components of A mixed in each pass (peft's "
                                        "num_samples)")
    sample_scaler: float = option(1e-4, "MonteCLoRA's scale of the noise on A")
    kl_loss_weight: float = option(1e-5, "MonteCLoRA's weight of its variational KL in the loss")
    dirichlet_prior: float = option(0.1, "MonteCLoRA's Dirichlet concentration of the prior on the mixture weights")
    use_entropy: bool = option(False, "MonteCLoRA: add the sum of squared mixture weights to the loss (keeps the "
                                      "weights from collapsing)")

    def validate(self) -> None:
        super().validate()
        if self.monteclora_samples < 1:
            raise BaraError(f"monteclora_samples must be >= 1, got {self.monteclora_samples}; fix: pass "
                            "--monteclora-samples 8")
        if self.dirichlet_prior <= 0:
            raise BaraError(f"dirichlet_prior must be > 0, got {self.dirichlet_prior}; fix: pass --dirichlet-prior 0.1")
        for name in ("sample_scaler", "kl_loss_weight"):
            if getattr(self, name) < 0:
                raise BaraError(f"{name} must be >= 0, got {getattr(self, name)}; fix: pass a value >= 0")


def monteclora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """peft's LoRA layers that carry a MonteCLoRA sampler."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and hasattr(m, "lora_monteclora_sampler")]


def draw_fresh_noise(layers: list[torch.nn.Module]) -> None:
    """Make each sampler's next pass draw from torch's global generator now (see the module docstring)."""
    for layer in layers:
        for sampler in layer.lora_monteclora_sampler.values():
            sampler.sampler.index = sampler.sampler.buffer_size  # peft refills a used-up buffer on the next get()


class MonteCLora(Lora):
    """peft's MonteCLoRA: trained with its variational loss, predicted with S stochastic passes."""

    name = "monteclora"
    # LoRA's rate (the same LoRA fit under a perturbation): not yet measured for MonteCLoRA itself.
    # On causal LMs LoRA's 3e-3, which multiple-choice gives it on all three sets
    # (benchmarks/results/multiple-choice/results.md).
    default_lr = {"encoder": 5e-3, "causal": 3e-3}
    config_class = MonteCLoraConfig
    default_samples = 10

    def wrap(self, classifier: Classifier) -> None:
        from peft import LoraConfig as PeftLoraConfig, MontecloraConfig

        c = self.config
        variant = MontecloraConfig(num_samples=c.monteclora_samples, use_entropy=c.use_entropy,
                                   dirichlet_prior=c.dirichlet_prior, sample_scaler=c.sample_scaler,
                                   kl_loss_weight=c.kl_loss_weight, buffer_size=1)
        peft_wrap(classifier, PeftLoraConfig(r=c.r, lora_alpha=c.alpha, lora_dropout=c.lora_dropout,
                                             target_modules=target_modules(c, classifier),
                                             monteclora_config=variant))

    def from_peft_names(self, classifier: Classifier,
                        files: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        # On the meta device (the size check before loading) peft defers the samplers to the first forward, so the
        # shaped model names none of their tensors: peft's X.lora_monteclora_sampler.Y is ours by rule instead.
        mark, samplers, rest = ".lora_monteclora_sampler.", {}, {}
        for folder, tensors in files.items():
            rest[folder] = {k: v for k, v in tensors.items() if mark not in k}
            for key in tensors.keys() - rest[folder].keys():
                head, tail = key.split(mark, 1)
                samplers[f"{self.peft_root}{head}{mark}{folder or 'default'}.{tail}"] = tensors[key]
        return {**super().from_peft_names(classifier, rest), **samplers}

    def forward(self, model, batch: dict) -> torch.Tensor:
        draw_fresh_noise(monteclora_layers(model))
        return super().forward(model, batch)

    def loss(self, model, batch: dict, progress: Progress) -> tuple[torch.Tensor, dict]:
        from peft.tuners.lora import LoraModel

        nll, logs = super().loss(model, batch, progress)
        # As peft's MontecloraTrainerMixin: the loss of each LoraModel, averaged over its layers.
        variational = sum(m._get_monteclora_loss() for m in model.modules() if isinstance(m, LoraModel))
        if not torch.is_tensor(variational):
            return nll, logs
        return nll + variational, {**logs, "variational": variational.item()}

    @torch.no_grad()
    def predict(self, classifier: Classifier, batch: dict, samples: int) -> torch.Tensor:
        classifier.eval()
        if samples == 0:
            return super().predict(classifier, batch, 0)
        layers = monteclora_layers(classifier)
        for layer in layers:
            layer.training = True  # peft samples A in training mode; the layer's own dropout module stays off
        try:
            probs = []
            for _ in range(samples):  # one draw per layer per pass, shared by the batch: S passes
                draw_fresh_noise(layers)
                probs.append(torch.softmax(classifier(batch["input_ids"], batch["attention_mask"]).float(), -1))
            return torch.stack(probs)
        finally:
            for layer in layers:
                layer.training = False

r"""MC dropout (Gal and Ghahramani, 2016) on LoRA: the adapter's input dropout stays on at test time, and
the predictive is the mean over S dropout masks,

.. math:: p(y \mid x) \approx \frac1S \sum_{s=1}^S \mathrm{softmax}\, f(x;\, m_s),
          \qquad m_s \sim \mathrm{Bernoulli}(1 - p)

Only the LoRA dropout modules are switched on; the backbone's own dropout stays off, so the samples
differ only through the adapter. Training is plain LoRA with ``lora_dropout = p``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BaraError
from ..heads import Classifier
from .base import option, repeated_passes
from .lora import Lora, LoraConfig


@dataclass
class McDropoutConfig(LoraConfig):
    lora_dropout: float = option(0.1, "dropout on the adapter's input")  # kept on at test time

    def validate(self) -> None:
        super().validate()
        if self.lora_dropout <= 0:
            raise BaraError(f"mcdropout needs lora_dropout > 0, got {self.lora_dropout}; fix: pass --lora-dropout 0.1")


def lora_dropouts(classifier: Classifier) -> list[nn.Module]:
    """The input-dropout modules of every peft LoRA layer (none of the backbone's own)."""
    from peft.tuners.lora import LoraLayer

    return [d for m in classifier.modules() if isinstance(m, LoraLayer) for d in m.lora_dropout.values()]


class McDropout(Lora):
    """LoRA with its dropout kept on at test time: ``predict(samples=S)`` averages S dropout masks;
    ``samples=0`` is the deterministic pass with dropout off (plain LoRA)."""

    name = "mcdropout"
    # Chosen on validation for MiniLM at 1,000 examples, on banking77, clinc150 and hwu64 alike:
    # benchmarks/results/standard/results.md, each intent set's "Learning rates ... chosen on the validation split".
    # On causal LMs LoRA's 3e-3, which multiple-choice gives it on all three sets
    # (benchmarks/results/multiple-choice/results.md).
    default_lr = {"encoder": 5e-3, "causal": 3e-3}
    config_class = McDropoutConfig
    default_samples = 10

    @torch.no_grad()
    def predict(self, classifier: Classifier, batch: dict, samples: int) -> torch.Tensor:
        classifier.eval()
        if samples == 0:
            return torch.softmax(classifier(batch["input_ids"], batch["attention_mask"]).float(), -1)[None]
        dropouts = lora_dropouts(classifier)
        for d in dropouts:
            d.train()
        try:
            return repeated_passes(classifier, batch, samples)
        finally:
            for d in dropouts:
                d.eval()

"""BLoB (Wang et al., 2024): LoRA with a Gaussian posterior on A (sigma = rho^2, flipout) and a point
estimate of B, KL to N(0, 0.2^2). It is BaRA's layer with the gate off (z = 1), so both share one code path."""

from __future__ import annotations

from dataclasses import dataclass

from .bara import Bara, BaraConfig
from .base import option
from .lora import LoraConfig


@dataclass
class BlobConfig(LoraConfig):
    prior_sigma: float = option(0.2, "prior std of A: N(0, prior_sigma^2)")
    init_sigma: float = option(0.05, "epsilon: posterior std parameter rho ~ U(eps/sqrt2, eps), sigma = rho^2")
    kl_warmup: float = option(0.1, "fraction of training over which the KL weight rises 0 -> 1")
    kl_scale: float = option(1.0, "extra multiplier on the KL term")
    kl_step: str = option("sgd", "how KL(q(A) || prior) is minimised: sgd (as BLoB's code: a separate plain-SGD "
                                 "step after each AdamW step, lr kl_lr with warm-up and linear decay, weighted by "
                                 "BLoB's KL reweighting) | loss (in the objective, by AdamW: the ELBO as written)")
    kl_lr: float = option(0.002, "learning rate of the kl_step=sgd step (BLoB: 0.002 for RoBERTa, 0.01 for LLaMA)")
    kl_gamma: float = option(8.0, "BLoB's reweighting: the KL weight of step t is 2^i / (2^(M+1) - 1), i = t mod "
                                  "M, M = 100 N^(pi/gamma) / batch size; 0 = a weight 1/M with M = batches per "
                                  "epoch")


class Blob(Bara):
    name = "blob"
    config_class = BlobConfig
    default_samples = 10

    def __init__(self, config: BlobConfig | None = None):
        self.blob_config = config or BlobConfig()
        super().__init__(BaraConfig(**self.blob_config.to_dict(), gate="none"))

"""BLoB (Wang et al., 2024): LoRA with a Gaussian posterior on A (sigma = rho^2, flipout) and a point
estimate of B, KL to N(0, 0.2^2): the posterior of :mod:`.factor_posterior`. It runs as BaRA's layer with the gate
off (z = 1), whose config its saved adapters hold (docs/ARCHITECTURE.md says why it stays so)."""

from __future__ import annotations

from dataclasses import dataclass

from .bara import Bara, BaraConfig
from .base import option
from .factor_posterior import FactorPosteriorConfig, SigmaParam


@dataclass
class BlobConfig(FactorPosteriorConfig):
    """LoRA's options and those of BLoB's posterior on A (shared with BaRA). BLoB keeps its own sigma = rho^2,
    stepped only by its SGD KL step, as in its code (BaRA's default is log sigma)."""

    sigma_param: str = option("rho2", "free parameter of sigma_A: rho2 (BLoB's sigma = rho^2 and log(sigma + 1e-6) "
                                      "in the KL, stepped only by the SGD KL step as in BLoB's code) or log",
                              SigmaParam)


class Blob(Bara):
    name = "blob"
    # Chosen on validation for MiniLM at 1,000 examples, on banking77, clinc150 and hwu64 alike:
    # benchmarks/results/standard/results.md, each intent set's "Learning rates ... chosen on the validation split".
    default_lr = {"encoder": 5e-3}
    config_class = BlobConfig
    default_samples = 10

    def __init__(self, config: BlobConfig | None = None):
        self.blob_config = config or BlobConfig()
        # No gate: no local magnitude and no disentanglement penalty; these stay at the values BLoB's saved adapters
        # hold, so a change of BaRA's defaults is not a change of BLoB's.
        super().__init__(BaraConfig(**self.blob_config.to_dict(), gate="none", orth_reg=0.0, theta_shape=1.0,
                                    theta_rate=1.0))

r"""BLoB (Wang et al., 2024): LoRA with a Gaussian posterior on A and a point estimate of B.

.. math:: h = W_0 x + \frac{\alpha}{r} B A x, \qquad q(A) = \mathcal N(\mu_A, \sigma_A^2),\ \sigma_A = \rho^2,
          \qquad p(A) = \mathcal N(0, 0.2^2)

with flipout, BLoB's plain-SGD step on its KL after each AdamW step (its KL reweighting), S = 10 sampled passes at
test time: the posterior of :mod:`.factor_posterior` in its layer
(:class:`~bara.methods.factor_posterior.FactorLinear`), trained and scored by
:class:`~bara.methods.factor_method.FactorPosteriorMethod`, which BaRA builds its gate on.

Adapters saved while BLoB ran as BaRA's layer with the gate off hold a whole ``BaraConfig`` (``gate="none"``,
``orth_reg``, ``theta_*``, ...) as their ``method_config``, and the same tensors (``bara_A_mu``, ``bara_A_rho``,
``bara_B``) that BLoB saves now. They load with the same predictions: loading reads only the options
:class:`BlobConfig` has (:func:`bara.runs.trained_options`), and BaRA's options there are the values under which
BaRA's layer was BLoB (no gate, no penalty, one training sample, a Gaussian A).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import option
from .factor_method import FactorPosteriorMethod
from .factor_posterior import FactorPosteriorConfig, SigmaParam


@dataclass
class BlobConfig(FactorPosteriorConfig):
    """LoRA's options and those of BLoB's posterior on A (shared with BaRA). BLoB keeps its own sigma = rho^2,
    stepped only by its SGD KL step, as in its code (BaRA's default is log sigma)."""

    sigma_param: str = option("rho2", "free parameter of sigma_A: rho2 (BLoB's sigma = rho^2 and log(sigma + 1e-6) "
                                      "in the KL, stepped only by the SGD KL step as in BLoB's code) or log",
                              SigmaParam)


class Blob(FactorPosteriorMethod):
    """BLoB: the posterior's method as it stands (the module docstring has its formulas)."""

    name = "blob"
    # Chosen on validation for MiniLM at 1,000 examples, on banking77, clinc150 and hwu64 alike:
    # benchmarks/results/standard/results.md, each intent set's "Learning rates ... chosen on the validation split".
    # On causal LMs LoRA's 3e-3, which multiple-choice gives BLoB on all three sets
    # (benchmarks/results/multiple-choice/results.md).
    default_lr = {"encoder": 5e-3, "causal": 3e-3}
    config_class = BlobConfig

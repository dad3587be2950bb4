r"""BaRA's ablation switches of the local gate as small strategy objects, chosen once when a layer is built (as
peft's ``LoraVariant``), so :meth:`BaraLinear.local_weights <bara.methods.bara.layer.BaraLinear.local_weights>`
reads as the formula :math:`z = g\,\theta` instead of a branch per switch:

- ``estimator``: how a training pass draws the relaxed gate g from its logits, through which the gradient flows;
- ``allocation``: how the factors' gates combine into the gate probabilities ρ and gates g;
- ``slab``: what the local weight z is made of (the binary gate g, the magnitude θ, or both);
- ``fast_gate``: the gate of the one-pass prediction.

Each keeps the order of the random draws of the branches it replaced (the noise of g, then of θ).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.distributions import Gamma, kl_divergence

from ...distributions import BinaryConcrete, Weibull, hard_concrete_sample, straight_through_sample
from .config import BaraConfig


# -- estimator: the relaxed training sample of g ---------------------------------------------------------------
class Concrete:
    """The binary Concrete relaxation (Maddison et al. 2017)."""

    shift = 0.0  # added to the logits wherever the probability that g is non-zero enters (KL, expected gate)

    def __init__(self, temperature: float):
        self.temperature = temperature

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        return BinaryConcrete(logits, self.temperature, validate_args=False).rsample()


class HardConcrete(Concrete):
    """The stretched and clipped Concrete (Louizos et al. 2018): g is non-zero with probability
    σ(ℓ + τ log(−γ/ζ)), not σ(ℓ), so the KL, the sampled and the expected gate all use that probability."""

    def __init__(self, temperature: float):
        super().__init__(temperature)
        self.shift = -temperature * math.log(0.1 / 1.1)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        return hard_concrete_sample(logits, self.temperature)


class StraightThrough(Concrete):
    """An exact 0/1 sample forward, the Concrete's gradient backward."""

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        return straight_through_sample(logits, self.temperature)


# -- allocation: how the factors' gates combine ----------------------------------------------------------------
class Independent:
    """Each factor gated on its own: ρ_k = cond_k, g_k = v_k, and each gate's KL counts in full."""

    def expected(self, cond: torch.Tensor) -> torch.Tensor:
        return cond

    def chain(self, cond: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ρ, g, the weight of each gate's KL) from the conditional probabilities and draws."""
        return cond, v, torch.ones_like(cond)


class StickBreaking(Independent):
    """Stick-breaking IBP (Teh et al. 2007) per instance: factor k is on only if factor k - 1 is and the instance
    keeps going (probability cond_k, prior π_k). Gates are nested by construction, and the KL of the chain is
    Σ_k P(g_{k-1} = 1) KL(Bern(cond_k) ‖ Bern(π_k))."""

    def expected(self, cond: torch.Tensor) -> torch.Tensor:
        return cond.cumprod(-1)  # independent π: E[Π] = Π E

    def chain(self, cond: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rho, g = cond.cumprod(-1), v.cumprod(-1)
        reach = torch.cat([torch.ones_like(rho[..., :1]), rho[..., :-1]], -1)
        return rho, g, reach


# -- slab: what z = g θ is made of -----------------------------------------------------------------------------
class SpikeAndSlab:
    """z = g θ: a binary gate g (with its KL) times a magnitude θ ~ Weibull (with its KL, weighted by ρ)."""

    gated = True  # g is drawn, and has a KL

    def draw_gate(self, logits: torch.Tensor, cond: torch.Tensor, train: bool,
                  estimator: Concrete) -> torch.Tensor:
        """The draws of g: relaxed while training, exact Bernoulli ones otherwise."""
        return estimator.sample(logits) if train else torch.bernoulli(cond)

    def magnitude(self, kappa: torch.Tensor, mean: torch.Tensor, rho: torch.Tensor, mode: str,
                  prior: Callable[[], Gamma]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """θ and, while training, its KL to the Gamma prior weighted per gate; the mean m in one pass."""
        if mode == "mean":
            return mean, None
        q_theta = Weibull(kappa, mean, validate_args=False)
        theta = q_theta.rsample()
        if mode != "train":
            return theta, None
        return theta, self.kl_weight(rho) * kl_divergence(q_theta, prior())

    def kl_weight(self, rho: torch.Tensor) -> torch.Tensor:
        return rho  # θ matters only where g is on

    def deterministic(self, mean: torch.Tensor) -> torch.Tensor | float:
        """The magnitude of the deterministic gate's z = ρ θ."""
        return mean


class BinarySlab(SpikeAndSlab):
    """θ = 1: the gate alone."""

    def magnitude(self, kappa, mean, rho, mode, prior):
        return torch.ones_like(rho), None

    def deterministic(self, mean):
        return 1.0


class MagnitudeSlab(SpikeAndSlab):
    """g = 1: the magnitude alone, every factor on."""

    gated = False

    def draw_gate(self, logits, cond, train, estimator):
        return torch.ones_like(cond)

    def kl_weight(self, rho):
        return torch.ones_like(rho)


# -- fast_gate: the one-pass prediction's gate -----------------------------------------------------------------
def expected_gate(rho: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """g = ρ, the mean gate."""
    return rho


def hard_gate(rho: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """g = 1[ρ > 0.5]: pruning then keeps predictions exactly."""
    return hard


ESTIMATORS = {"concrete": Concrete, "hard_concrete": HardConcrete, "straight_through": StraightThrough}
ALLOCATIONS = {"independent": Independent, "stick": StickBreaking}
SLABS = {"both": SpikeAndSlab, "binary": BinarySlab, "magnitude": MagnitudeSlab}
FAST_GATES = {"expected": expected_gate, "hard": hard_gate}


def variants(config: BaraConfig) -> tuple[Concrete, Independent, SpikeAndSlab, Callable]:
    """The strategies ``config``'s switches choose: (estimator, allocation, slab, one-pass gate)."""
    return (ESTIMATORS[config.estimator](config.temperature), ALLOCATIONS[config.allocation](),
            SLABS[config.slab](), FAST_GATES[config.fast_gate])

r"""BaRA's ablation switches as small strategy objects, chosen once when a layer or the method is built (as peft's
``LoraVariant``), so :meth:`BaraLinear.local_weights <bara.methods.bara.layer.BaraLinear.local_weights>` reads as
the formula :math:`z = g\,\theta` and :meth:`Bara.loss <bara.methods.bara.model.Bara.loss>` as the objective,
instead of a branch per switch:

- ``gate``: which gates there are (:class:`GlobalLocal` and its ablations): whether a gate network forms z, whether
  Δ comes from the input, the kind of q(π) (with ``pi_update``: :class:`FixedPi`, :class:`KumaraswamyPi`,
  :class:`SviBetaPi`), how ρ, g, z and the local KL or the L1 penalty are formed (:meth:`GlobalLocal.weights`),
  what the loss adds, and so whether the diagnostics have gate information and a shuffle test, and whether the
  model merges into one weight matrix;
- ``estimator``: how a training pass draws the relaxed gate g from its logits, through which the gradient flows;
- ``allocation``: how the factors' gates combine into the gate probabilities ρ and gates g;
- ``slab``: what the local weight z is made of (the binary gate g, the magnitude θ, or both);
- ``fast_gate``: the gate of the one-pass prediction.

Each keeps the order of the random draws of the branches it replaced (π, then the noise of g, then of θ).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
from torch.distributions import Gamma, kl_divergence

from ...distributions import (BinaryConcrete, GateBeta, Kumaraswamy, Weibull, hard_concrete_sample, inverse_softplus,
                              kumaraswamy_params, straight_through_sample)
from .config import BaraConfig

if TYPE_CHECKING:
    from .layer import BaraLinear


# -- q(π): the global gate's posterior, by gate and pi_update ---------------------------------------------------
class FixedPi:
    """No q(π) (gate=local, deterministic, none): π̂ = pi_init, a constant without a KL."""

    inferred = False  # there is a q(π), with its KL_π
    svi = False  # q(π)'s tensors are buffers, moved by the conjugate SVI step (else parameters, KL_π in the loss)

    def initial(self, config: BaraConfig) -> dict[str, float]:
        """q(π)'s tensors at the start, by name, each the same for every factor: E[π] = pi_init."""
        return {}


class KumaraswamyPi(FixedPi):
    """q(π) = Kumaraswamy(a, b), free parameters (through softplus) under Adam at gate_lr, KL_π in the loss:
    pi_update=gradient, and gate=global whatever pi_update (without a local gate no usage reaches q(π))."""

    inferred = True

    def initial(self, config):  # Kumaraswamy(1, 1/pi_init - 1)
        with torch.device("cpu"):  # numbers, also while the layer is built on the meta device (adapter size checks)
            return {"bara_pi_a": inverse_softplus(1.0).item(),
                    "bara_pi_b": inverse_softplus(1.0 / config.pi_init - 1.0).item()}

    def posterior(self, layer: BaraLinear) -> Kumaraswamy:
        return Kumaraswamy(*kumaraswamy_params(layer.bara_pi_a, layer.bara_pi_b), validate_args=False)


class SviBetaPi(FixedPi):
    """q(π) = Beta(α, β), buffers moved after every step towards the conjugate optimum given the batch's usage
    (:meth:`BaraLinear.svi_step <bara.methods.bara.layer.BaraLinear.svi_step>`): pi_update=svi with gate=both."""

    inferred = svi = True

    def initial(self, config):  # Beta(2 pi_init, 2 (1 - pi_init))
        return {"bara_pi_alpha": 2.0 * config.pi_init, "bara_pi_beta": 2.0 * (1.0 - config.pi_init)}

    def posterior(self, layer: BaraLinear) -> GateBeta:
        return GateBeta(layer.bara_pi_alpha, layer.bara_pi_beta, validate_args=False)


# -- gate: which gates multiply the factors ---------------------------------------------------------------------
class GlobalLocal:
    r"""gate=both (BaRA): logit ρ = logit π + Δ(x) with π ~ q(π), g ~ Bernoulli(ρ) with its KL to Bernoulli(π̂),
    z = g θ; the local KL (of g and θ) enters the loss."""

    network = True  # a gate network reads the context and forms z (false: z = 1)
    input_dependent = True  # Δ comes from the input: a shuffle test has something to shuffle, no one matrix holds z
    local_kl = True  # the loss has the local KL of the instance's gates
    gate_kl = True  # that KL has g's part, KL(Bernoulli(ρ) ‖ Bernoulli(π̂)) (θ's is the slab's)
    l1 = False  # the loss has SoRA's L1 penalty on z (in place of the local KL)

    def __init__(self, config: BaraConfig):
        self.pi = SviBetaPi() if config.pi_update == "svi" else KumaraswamyPi()

    def weights(self, layer: BaraLinear, delta: torch.Tensor, kappa: torch.Tensor, magnitude: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        r"""(z, ρ, g, the local KL per gate, the L1 penalty per instance (and token) or None) from the gate
        network's Δ and θ's Weibull(κ, m): g and θ drawn (g relaxed while training, with its KL; θ's KL weighted by
        ρ); in one pass, the one-pass gate of :math:`\rho = E_{q(\pi)}[\sigma(\mathrm{logit}\,\pi + \Delta)]`
        times m."""
        one_pass = layer.mode == "mean"
        kl = torch.zeros_like(delta)
        if one_pass:
            rho = layer.expected_rho(delta)
        else:
            # The local KL enters only the training loss: prediction skips it.
            rho, g, kl_gate = layer.drawn_gate(delta, layer.mode == "train" and self.gate_kl and layer.slab.gated)
            if kl_gate is not None:
                kl = kl + kl_gate
        if not layer.slab.gated:
            g = rho = torch.ones_like(delta)
        elif one_pass:
            g = (rho > 0.5).float()
        theta, kl_theta = layer.theta(kappa, magnitude, rho)
        if kl_theta is not None:
            kl = kl + kl_theta
        return (layer.one_pass_gate(rho, g) if one_pass else g) * theta, rho, g, kl, None


class GlobalOnly(GlobalLocal):
    """gate=global: the per-layer gate only, Δ = 0 (the gate network reads a zero context, for θ): z is the same for
    every input, so the model merges; q(π) is always the Kumaraswamy, g has no KL (π carries it, as KL_π)."""

    input_dependent = gate_kl = False

    def __init__(self, config):
        self.pi = KumaraswamyPi()

    def weights(self, layer, delta, kappa, magnitude):
        return super().weights(layer, torch.zeros_like(delta), kappa, magnitude)


class LocalOnly(GlobalLocal):
    """gate=local: the per-instance gate only, its prior Bernoulli(pi_init) (no q(π))."""

    def __init__(self, config):
        self.pi = FixedPi()


class Deterministic(LocalOnly):
    """gate=deterministic (SoRA-like): z = ρ m with ρ its expectation in every mode: nothing drawn, no KL, an L1
    penalty on z in the loss; g = 1[ρ > 0.5] only for the diagnostics."""

    local_kl = gate_kl = False
    l1 = True

    def weights(self, layer, delta, kappa, magnitude):
        rho = layer.expected_rho(delta)
        z = rho * layer.slab.deterministic(magnitude)
        return z, rho, (rho > 0.5).float(), torch.zeros_like(delta), z.abs().sum(-1)


class NoGate(LocalOnly):
    """gate=none: z = 1, every factor always on (exactly BLoB): no gate network, no q(π), nothing in the loss."""

    network = input_dependent = local_kl = gate_kl = False


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


GATES = {"both": GlobalLocal, "global": GlobalOnly, "local": LocalOnly, "deterministic": Deterministic,
         "none": NoGate}
ESTIMATORS = {"concrete": Concrete, "hard_concrete": HardConcrete, "straight_through": StraightThrough}
ALLOCATIONS = {"independent": Independent, "stick": StickBreaking}
SLABS = {"both": SpikeAndSlab, "binary": BinarySlab, "magnitude": MagnitudeSlab}
FAST_GATES = {"expected": expected_gate, "hard": hard_gate}


def variants(config: BaraConfig) -> tuple[Concrete, Independent, SpikeAndSlab, Callable]:
    """The strategies ``config``'s switches choose: (estimator, allocation, slab, one-pass gate)."""
    return (ESTIMATORS[config.estimator](config.temperature), ALLOCATIONS[config.allocation](),
            SLABS[config.slab](), FAST_GATES[config.fast_gate])


def gating(config: BaraConfig) -> GlobalLocal:
    """The strategy ``config.gate`` chooses (with ``pi_update``, its q(π))."""
    return GATES[config.gate](config)

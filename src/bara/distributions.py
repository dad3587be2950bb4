r"""Variational distributions of the BaRA gate and their closed-form KL divergences.

Every random quantity of the gate is a ``torch.distributions.Distribution`` with ``rsample`` and
``log_prob``; every KL is registered with ``@register_kl(P, Q)`` and called as
``torch.distributions.kl_divergence(q, p)``. The layer code never spells out a KL formula.

===========================  ==========================  ======================================
variable                     q                           prior p
===========================  ==========================  ======================================
global gate :math:`\pi_k`    :class:`Kumaraswamy` (a, b)  ``Beta(alpha0 / r, 1)``
local magnitude θ            :class:`Weibull` (κ, m)      ``Gamma(a_θ, rate b_θ)``
global gate, ``pi_update``   :class:`GateBeta` (α, β)     ``Beta(alpha0 / r, 1)`` (torch's KL)
``= svi``
local gate g                 :class:`GateBernoulli` /     ``GateBernoulli(π̂)``
                             concrete
factor A                     :class:`FactorNormal` (μ, σ)  ``Normal(0, σ_p)``
===========================  ==========================  ======================================

Where a class here stands beside one of torch's (``Weibull``, ``Kumaraswamy``, ``Bernoulli``, ``Normal``), its
docstring says in a line why; its ``mean``, ``mode`` and ``entropy`` are torch's formulas where torch has them.

All gate maths runs in float32 whatever the base model's dtype: half-precision inputs are cast up
(float64 is kept, which the gradient checks in the tests use). Uniform noise is drawn from
U(1e-6, 1 - 1e-6) so that no logarithm in a reparameterisation sees 0 or 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.distributions import (Bernoulli, Beta, Distribution, Gamma, Normal, RelaxedBernoulli,
                                 TransformedDistribution, constraints, kl_divergence)
from torch.distributions import Kumaraswamy as TorchKumaraswamy
from torch.distributions import Weibull as TorchWeibull
from torch.distributions.kl import register_kl
from torch.distributions.relaxed_bernoulli import LogitRelaxedBernoulli
from torch.distributions.transforms import SigmoidTransform
from torch.distributions.utils import broadcast_all

__all__ = [
    "EULER_GAMMA",
    "UNIFORM_EPS",
    "WEIBULL_SAMPLE_MAX",
    "BinaryConcrete",
    "FactorNormal",
    "GateBernoulli",
    "Kumaraswamy",
    "Weibull",
    "hard_concrete_prob_nonzero",
    "hard_concrete_sample",
    "GateBeta",
    "inverse_softplus",
    "kl_bernoulli",
    "kl_bernoulli_logits",
    "kl_factor_normal",
    "kl_gate_bernoulli",
    "kl_kumaraswamy_beta",
    "kl_normal_normal_prior",
    "kl_weibull_gamma",
    "kumaraswamy_params",
    "straight_through_sample",
    "weibull_params",
]

EULER_GAMMA = 0.5772156649015329
UNIFORM_EPS = 1e-6  # noise u ~ U(UNIFORM_EPS, 1 - UNIFORM_EPS)
WEIBULL_SAMPLE_MAX = 10.0  # θ samples are clamped to at most this (docs/ARCHITECTURE.md, the local gate)
PROB_EPS = 1e-6  # probabilities (π samples, Bernoulli parameters) live in [PROB_EPS, 1 - PROB_EPS]

KUMARASWAMY_PARAM_RANGE = (1e-2, 1e2)
WEIBULL_CONCENTRATION_MAX = 100.0
WEIBULL_MEAN_RANGE = (1e-3, 10.0)


def _float32(x) -> torch.Tensor:
    """Return ``x`` as a floating tensor of at least float32 precision (half precision is cast up)."""
    x = torch.as_tensor(x)
    if not x.is_floating_point() or torch.finfo(x.dtype).bits < 32:
        x = x.to(torch.float32)
    return x


def _uniform(shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """u ~ U(UNIFORM_EPS, 1 - UNIFORM_EPS), drawn affinely (no mass piles up at the ends)."""
    u = torch.rand(shape, dtype=like.dtype, device=like.device)
    return UNIFORM_EPS + (1.0 - 2.0 * UNIFORM_EPS) * u


def inverse_softplus(y) -> torch.Tensor:
    r"""Inverse of softplus: :math:`x = y + \log(1 - e^{-y})`, for y > 0 (used to initialise free parameters)."""
    y = _float32(y)
    return y + torch.log(-torch.expm1(-y))


# --------------------------------------------------------------------------------------------------
# Parameter maps from the gate network's free outputs (docs/ARCHITECTURE.md, the variational posterior)
# --------------------------------------------------------------------------------------------------


def kumaraswamy_params(free_a, free_b) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Kumaraswamy parameters from free ones.

    :math:`a = \mathrm{clamp}(\mathrm{softplus}(\tilde a), 10^{-2}, 10^{2})`, and likewise b.
    """
    lo, hi = KUMARASWAMY_PARAM_RANGE
    a = F.softplus(_float32(free_a)).clamp(lo, hi)
    b = F.softplus(_float32(free_b)).clamp(lo, hi)
    return a, b


def weibull_params(kappa_free, mean_free) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Weibull parameters from free ones.

    :math:`\kappa = \min(1 + \mathrm{softplus}(\tilde\kappa), 100)` (κ ≥ 1 keeps the density bounded at 0),
    :math:`m = \mathrm{clamp}(\mathrm{softplus}(\tilde m), 10^{-3}, 10)`.
    """
    kappa = (1.0 + F.softplus(_float32(kappa_free))).clamp(max=WEIBULL_CONCENTRATION_MAX)
    mean = F.softplus(_float32(mean_free)).clamp(*WEIBULL_MEAN_RANGE)
    return kappa, mean


# --------------------------------------------------------------------------------------------------
# Weibull (local magnitude θ)
# --------------------------------------------------------------------------------------------------


class Weibull(Distribution):
    r"""Mean-parameterised Weibull distribution, the variational posterior of the local magnitude θ.

    With concentration κ and mean m the scale is :math:`\lambda = m / \Gamma(1 + 1/\kappa)`, so that
    :math:`E[\theta] = m`. Density:

    .. math:: q(\theta) = \frac{\kappa}{\lambda} \Big(\frac{\theta}{\lambda}\Big)^{\kappa - 1}
              e^{-(\theta/\lambda)^\kappa}, \qquad \theta > 0.

    ``rsample`` inverts the CDF: :math:`\theta = \lambda\,(-\log(1 - u))^{1/\kappa}`,
    :math:`u \sim U(10^{-6}, 1 - 10^{-6})`, then clamps θ to at most ``WEIBULL_SAMPLE_MAX`` = 10
    (the clamp removes the far tail; ``mean`` still reports m).

    Not torch's ``Weibull(scale, concentration)``: the gate network outputs the mean m (the KL to the Gamma prior
    needs m, and a bounded m keeps θ's scale in range), and the noise is kept off 0 and 1 and θ clamped.
    """

    arg_constraints = {"concentration": constraints.positive, "mean": constraints.positive}
    support = constraints.positive
    has_rsample = True

    def __init__(self, concentration, mean, validate_args=None):
        self.concentration, self._mean = broadcast_all(_float32(concentration), _float32(mean))
        self.scale = self._mean * torch.exp(-torch.lgamma(1.0 + self.concentration.reciprocal()))
        super().__init__(self.concentration.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(Weibull, _instance)
        batch_shape = torch.Size(batch_shape)
        new.concentration = self.concentration.expand(batch_shape)
        new._mean = self._mean.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        super(Weibull, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> torch.Tensor:
        return self._mean

    @property
    def variance(self) -> torch.Tensor:
        r""":math:`\lambda^2 [\Gamma(1 + 2/\kappa) - \Gamma(1 + 1/\kappa)^2]` (of the unclamped law)."""
        g2 = torch.exp(torch.lgamma(1.0 + 2.0 / self.concentration))
        return self.scale.pow(2) * g2 - self._mean.pow(2)

    @property
    def mode(self) -> torch.Tensor:
        r""":math:`\lambda ((\kappa - 1)/\kappa)^{1/\kappa}` (0 at κ = 1), torch's."""
        return self._torch().mode

    def entropy(self) -> torch.Tensor:
        r""":math:`\gamma_e (1 - 1/\kappa) + \log(\lambda/\kappa) + 1` (of the unclamped law), torch's."""
        return self._torch().entropy()

    def _torch(self) -> TorchWeibull:
        return TorchWeibull(self.scale, self.concentration, validate_args=False)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        u = _uniform(self._extended_shape(sample_shape), self.scale)
        return self.icdf(u).clamp(max=WEIBULL_SAMPLE_MAX)

    def log_prob(self, value) -> torch.Tensor:
        r""":math:`\log\kappa - \log\lambda + (\kappa - 1)\log(\theta/\lambda) - (\theta/\lambda)^\kappa`."""
        if self._validate_args:
            self._validate_sample(value)
        log_ratio = torch.log(value) - torch.log(self.scale)
        return (
            torch.log(self.concentration)
            - torch.log(self.scale)
            + (self.concentration - 1.0) * log_ratio
            - torch.exp(self.concentration * log_ratio)
        )

    def cdf(self, value) -> torch.Tensor:
        r""":math:`F(\theta) = 1 - e^{-(\theta/\lambda)^\kappa}`."""
        return -torch.expm1(-torch.pow(value / self.scale, self.concentration))

    def icdf(self, value) -> torch.Tensor:
        r""":math:`F^{-1}(u) = \lambda (-\log(1 - u))^{1/\kappa}` (unclamped)."""
        return self.scale * torch.pow(-torch.log1p(-value), self.concentration.reciprocal())


# --------------------------------------------------------------------------------------------------
# Kumaraswamy (global gate π)
# --------------------------------------------------------------------------------------------------


class Kumaraswamy(Distribution):
    r"""Kumaraswamy(a, b) on (0, 1), the variational posterior of the global gate π.

    .. math:: q(\pi) = a b\, \pi^{a-1} (1 - \pi^a)^{b-1}, \qquad
              E[\pi] = b\, B(1 + 1/a, b).

    ``rsample``: :math:`\pi = (1 - u^{1/b})^{1/a}`, :math:`u \sim U(10^{-6}, 1 - 10^{-6})`, computed
    in log space as :math:`\exp(\log(-\mathrm{expm1}(\log u / b)) / a)` so large b keeps its precision,
    and clamped to [1e-6, 1 - 1e-6] so that logit(π) and log q(π) stay finite in float32.

    Not torch's ``Kumaraswamy``: its samples (a chain of transforms of a uniform) reach 0 and 1 in float32, where
    logit π is infinite; the gate needs logit π itself (:meth:`rsample_logit`) and a quadrature over it.
    """

    arg_constraints = {"concentration1": constraints.positive, "concentration0": constraints.positive}
    support = constraints.unit_interval
    has_rsample = True

    def __init__(self, concentration1, concentration0, validate_args=None):
        self.concentration1, self.concentration0 = broadcast_all(
            _float32(concentration1), _float32(concentration0)
        )
        super().__init__(self.concentration1.shape, validate_args=validate_args)

    @property
    def a(self) -> torch.Tensor:
        return self.concentration1

    @property
    def b(self) -> torch.Tensor:
        return self.concentration0

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(Kumaraswamy, _instance)
        batch_shape = torch.Size(batch_shape)
        new.concentration1 = self.concentration1.expand(batch_shape)
        new.concentration0 = self.concentration0.expand(batch_shape)
        super(Kumaraswamy, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def _moment(self, n: int) -> torch.Tensor:
        r""":math:`E[\pi^n] = b\, B(1 + n/a, b)`."""
        a, b = self.concentration1, self.concentration0
        s = 1.0 + n / a
        return torch.exp(torch.log(b) + torch.lgamma(s) + torch.lgamma(b) - torch.lgamma(s + b))

    @property
    def mean(self) -> torch.Tensor:
        return self._moment(1)

    @property
    def variance(self) -> torch.Tensor:
        return self._moment(2) - self._moment(1).pow(2)

    @property
    def mode(self) -> torch.Tensor:
        r""":math:`((a - 1)/(ab - 1))^{1/a}` for a, b ≥ 1 (NaN otherwise: the density is unbounded at an end).
        Not torch's: its ``Kumaraswamy.mode`` (2.13) takes log(1 − b), NaN for every b > 1."""
        a, b = self.concentration1, self.concentration0
        mode = torch.exp((torch.log(a - 1.0) - torch.log(a * b - 1.0)) / a)
        return mode.masked_fill((a < 1) | (b < 1), math.nan)

    def entropy(self) -> torch.Tensor:
        r""":math:`(1 - 1/b) + (1 - 1/a)(\psi(b + 1) + \gamma_e) - \log a - \log b`, torch's."""
        return self._torch().entropy()

    def _torch(self) -> TorchKumaraswamy:
        return TorchKumaraswamy(self.concentration1, self.concentration0, validate_args=False)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        u = _uniform(self._extended_shape(sample_shape), self.concentration1)
        log_one_minus = torch.log(-torch.expm1(torch.log(u) / self.concentration0))  # log(1 - u^{1/b})
        return torch.exp(log_one_minus / self.concentration1).clamp(PROB_EPS, 1.0 - PROB_EPS)

    def rsample_logit(self, sample_shape=torch.Size()) -> torch.Tensor:
        r"""logit π of a reparameterised sample, computed in log space with no clamp, so every draw keeps its
        gradient to (a, b) (clamping π at 1 - 1e-6 cut it for a fifth of the draws at b ≈ 0.11).

        With :math:`\log v = \log u / b`: :math:`\log\pi = \log(1 - v) / a` and
        :math:`\log(1 - \pi) = \log(-\mathrm{expm1}(\log\pi))`, which for :math:`v < e^{-20}` (π within
        float32's reach of 1) is evaluated as its expansion :math:`\log v - \log a`.
        """
        u = _uniform(self._extended_shape(sample_shape), self.concentration1)
        return _kumaraswamy_logit(u, self.concentration1, self.concentration0)

    def logit_quadrature(self, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Nodes ``[n, *batch]`` and weights ``[n]`` with :math:`E_q[f(\mathrm{logit}\,\pi)] \approx \sum_j w_j
        f(\mathrm{node}_j)`: the logits of the quantiles :math:`(j - 1/2)/n` (the closed-form inverse CDF)."""
        u = (torch.arange(n, dtype=self.concentration1.dtype, device=self.concentration1.device) + 0.5) / n
        u = u.view(n, *([1] * len(self.batch_shape)))
        # The Kumaraswamy inverse CDF at 1 - u is (1 - u^(1/b))^(1/a): the same map as rsample's at u.
        nodes = _kumaraswamy_logit(u, self.concentration1, self.concentration0).flip(0)
        return nodes, torch.full((n,), 1.0 / n, dtype=nodes.dtype, device=nodes.device)

    def log_prob(self, value) -> torch.Tensor:
        r""":math:`\log a + \log b + (a - 1)\log\pi + (b - 1)\log(1 - \pi^a)`."""
        if self._validate_args:
            self._validate_sample(value)
        a, b = self.concentration1, self.concentration0
        log_v = torch.log(value)
        return torch.log(a) + torch.log(b) + (a - 1.0) * log_v + (b - 1.0) * torch.log(-torch.expm1(a * log_v))

    def cdf(self, value) -> torch.Tensor:
        r""":math:`F(\pi) = 1 - (1 - \pi^a)^b`."""
        return 1.0 - torch.pow(1.0 - torch.pow(value, self.concentration1), self.concentration0)


def _kumaraswamy_logit(u: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """logit of (1 - u^(1/b))^(1/a) without leaving log space (see :meth:`Kumaraswamy.rsample_logit`)."""
    log_v = torch.log(u) / b
    # log(1 - v) = log1mexp(log v): expm1 near v = 1, log1p for small v (else 1 - v rounds to 1 below v ~ 6e-8)
    log_pi = torch.where(log_v > -0.6931, torch.log(-torch.expm1(log_v)), torch.log1p(-torch.exp(log_v))) / a
    near_one = log_v < -20.0  # v = u^(1/b) < 2e-9: 1 - pi = v / a to float32 precision
    log_one_minus = torch.where(near_one, log_v - torch.log(a),
                                torch.log(-torch.expm1(torch.minimum(log_pi, torch.full_like(log_pi, -1e-30)))))
    return log_pi - log_one_minus


# --------------------------------------------------------------------------------------------------
# Beta (global gate π under pi_update = svi)
# --------------------------------------------------------------------------------------------------

GAMMA_SAMPLE_MIN = 1e-30  # Gamma draws below this (shape << 1) are floored so their log stays finite


class GateBeta(Beta):
    r"""torch's Beta(α, β), with the two extras the gate needs: a logit sample and a logit quadrature.

    ``pi_update = svi`` keeps q(π) in the Beta family because the Beta is conjugate to the Bernoulli gates: the
    optimal q(π_k) given the gates' usage is Beta(α0/r + Σ_n ρ_nk, 1 + Σ_n (1 - ρ_nk)), the target of the
    stochastic natural-gradient step (Hoffman et al. 2013). Its parameters are updated in closed form, not by
    gradients, so the samples below carry none.
    """

    def rsample_logit(self, sample_shape=torch.Size()) -> torch.Tensor:
        r"""logit π = log X - log Y with X ~ Gamma(α), Y ~ Gamma(β): exact, and finite where π rounds to 0 or 1."""
        shape = self._extended_shape(sample_shape)
        x = torch._standard_gamma(self.concentration1.expand(shape)).clamp(min=GAMMA_SAMPLE_MIN)
        y = torch._standard_gamma(self.concentration0.expand(shape)).clamp(min=GAMMA_SAMPLE_MIN)
        return torch.log(x) - torch.log(y)

    def logit_quadrature(self, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Nodes ``[m, *batch]`` and weights ``[m]`` with :math:`E_q[f(\mathrm{logit}\,\pi)] \approx \sum_j w_j
        f(\mathrm{node}_j)`. logit π = log X - log Y with X ~ Gamma(α), Y ~ Gamma(β) independent, so the nodes are
        the differences of k = ⌈√n⌉ quantiles (j - 1/2)/k of each (a product rule of m = k² nodes). A normal
        approximation of logit π fails where α or β is small (logit π is then far from symmetric)."""
        k = math.ceil(math.sqrt(n))
        log_x = gamma_log_quantiles(self.concentration1, k)
        log_y = gamma_log_quantiles(self.concentration0, k)
        nodes = (log_x[:, None] - log_y[None, :]).reshape(k * k, *self.batch_shape)
        return nodes, torch.full((k * k,), 1.0 / (k * k), dtype=nodes.dtype, device=nodes.device)


def gamma_log_quantiles(shape: torch.Tensor, k: int, iterations: int = 64) -> torch.Tensor:
    """log of the quantiles (j - 1/2)/k, j = 1..k, of Gamma(shape, 1): ``[k, *shape.shape]``, by bisection on
    log x of the regularised incomplete gamma function (torch has no inverse), in float64 so that the far left
    tail of a small shape (quantiles like 1e-150) is not lost."""
    a = shape.detach().double()
    u = ((torch.arange(k, dtype=torch.float64, device=a.device) + 0.5) / k).view(k, *([1] * a.dim()))
    lo = torch.full((k, *a.shape), -740.0, dtype=torch.float64, device=a.device)
    hi = torch.log(a + 10 * a.sqrt() + 20).expand_as(lo).clone()
    for _ in range(iterations):
        mid = (lo + hi) / 2
        below = torch.special.gammainc(a.expand_as(mid), mid.exp()) < u
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return ((lo + hi) / 2).to(_float32(shape).dtype)


# --------------------------------------------------------------------------------------------------
# Binary concrete relaxations of the local gate g
# --------------------------------------------------------------------------------------------------


def _concrete(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    r"""Unclamped binary-concrete sample :math:`\sigma((\ell + \log u - \log(1 - u)) / \tau)`."""
    u = _uniform(logits.shape, logits)
    return torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)


class BinaryConcrete(RelaxedBernoulli):
    r"""Binary concrete (relaxed Bernoulli, Maddison et al. 2017; Jang et al. 2017) with logits ℓ.

    ``rsample``: :math:`y = \sigma((\ell + L) / \tau)`, :math:`L = \log u - \log(1 - u)` logistic noise,
    :math:`u \sim U(10^{-6}, 1 - 10^{-6})`, clamped to [1e-6, 1 - 1e-6] so y is strictly inside (0, 1)
    in float32. As τ → 0, y → Bernoulli(σ(ℓ)). ``log_prob`` is torch's ``RelaxedBernoulli`` density.
    """

    def __init__(self, logits, temperature: float = 2.0 / 3.0, validate_args=None):
        logits = _float32(logits)
        temperature = torch.as_tensor(temperature, dtype=logits.dtype, device=logits.device)
        # RelaxedBernoulli.__init__, but with validate_args passed on to the base distribution (torch does not).
        base = LogitRelaxedBernoulli(temperature, logits=logits, validate_args=validate_args)
        TransformedDistribution.__init__(self, base, SigmoidTransform(), validate_args=validate_args)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        logits = self.logits.expand(self._extended_shape(sample_shape))
        return _concrete(logits, self.temperature).clamp(PROB_EPS, 1.0 - PROB_EPS)


def hard_concrete_sample(
    logits, temperature: float = 2.0 / 3.0, stretch: tuple[float, float] = (-0.1, 1.1)
) -> torch.Tensor:
    r"""Hard-concrete sample (Louizos, Welling & Kingma 2018), one per element of ``logits``.

    :math:`s = \sigma((\ell + \log u - \log(1 - u)) / \tau)`, stretched to
    :math:`\bar s = s (\zeta - \gamma) + \gamma` with ``stretch`` = (γ, ζ) = (-0.1, 1.1), then
    :math:`z = \min(1, \max(0, \bar s))`: exact zeros and ones occur with positive probability while
    the gradient flows through the interior.
    """
    lo, hi = stretch
    s = _concrete(_float32(logits), temperature)
    return (s * (hi - lo) + lo).clamp(0.0, 1.0)


def hard_concrete_prob_nonzero(
    logits, temperature: float = 2.0 / 3.0, stretch: tuple[float, float] = (-0.1, 1.1)
) -> torch.Tensor:
    r""":math:`P(z \neq 0) = \sigma(\ell - \tau \log(-\gamma / \zeta))` for a hard-concrete z (the L0 penalty)."""
    lo, hi = stretch
    return torch.sigmoid(_float32(logits) - temperature * math.log(-lo / hi))


def straight_through_sample(logits, temperature: float = 2.0 / 3.0) -> torch.Tensor:
    r"""Straight-through binary gate: exact 0/1 forward, binary-concrete gradient backward.

    Forward: :math:`g = 1[y > 1/2]` with y the concrete sample, i.e. :math:`1[\ell + L > 0]`, an
    exact Bernoulli(σ(ℓ)) sample. Backward: :math:`\partial g / \partial \ell := \partial y / \partial \ell`,
    written as ``hard + (y - y.detach())`` so the forward values are exactly 0 or 1.
    """
    soft = _concrete(_float32(logits), temperature)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + (soft - soft.detach())


# --------------------------------------------------------------------------------------------------
# The local gate's Bernoulli and factor A's Normal, as the KLs need them
# --------------------------------------------------------------------------------------------------


class GateBernoulli(Bernoulli):
    """torch's Bernoulli, with a KL (:func:`kl_bernoulli_logits`) that stays finite where torch's is infinite (a
    probability that rounds to 0 or 1 in float32, as a saturated gate's does)."""


class FactorNormal(Normal):
    r"""torch's Normal(μ, σ) for a factor A, carrying how its KL to the N(0, σ_p²) prior takes log σ.

    Not torch's KL: ``log_scale`` gives log σ directly (σ = exp of a free parameter: the KL's gradient
    σ²/σ_p² − 1 is then bounded, no singularity at σ → 0); ``scale_eps`` puts log(σ + eps) in its place, as
    BLoB's code (``kl_div_stable``) does for its σ = ρ², which can reach 0.
    """

    def __init__(self, loc, scale, log_scale=None, scale_eps: float = 0.0, validate_args=None):
        super().__init__(loc, scale, validate_args=validate_args)
        self.log_scale, self.scale_eps = log_scale, scale_eps


# --------------------------------------------------------------------------------------------------
# Closed-form KL divergences (γ_e = Euler's constant, ψ = digamma)
# --------------------------------------------------------------------------------------------------


@register_kl(Weibull, Gamma)
def kl_weibull_gamma(q: Weibull, p: Gamma) -> torch.Tensor:
    r"""KL(Weibull(κ, λ) ‖ Gamma(α, rate β)), Zhang et al. (2018, WHAI):

    .. math:: \frac{\gamma_e \alpha}{\kappa} - \alpha \log\lambda + \log\kappa
              + \beta \lambda \Gamma(1 + 1/\kappa) - \gamma_e - 1 - \alpha\log\beta + \log\Gamma(\alpha).

    :math:`\lambda\Gamma(1 + 1/\kappa)` is the Weibull mean m, used directly.
    """
    kappa, lam, m = q.concentration, q.scale, q.mean
    alpha, beta = _float32(p.concentration), _float32(p.rate)
    return (
        EULER_GAMMA * alpha / kappa
        - alpha * torch.log(lam)
        + torch.log(kappa)
        + beta * m
        - EULER_GAMMA
        - 1.0
        - alpha * torch.log(beta)
        + torch.lgamma(alpha)
    )


@register_kl(Kumaraswamy, Beta)
def kl_kumaraswamy_beta(q: Kumaraswamy, p: Beta) -> torch.Tensor:
    r"""KL(Kumaraswamy(a, b) ‖ Beta(α, 1)), Nalisnick & Smyth (2017) with the prior's β = 1:

    .. math:: \Big(1 - \frac{\alpha}{a}\Big)\Big(-\gamma_e - \psi(b) - \frac1b\Big) + \log(ab)
              - \log\alpha - \frac{b - 1}{b}.

    :math:`\psi(b) + 1/b` is evaluated as :math:`\psi(1 + b)`, which avoids cancellation at small b.
    Raises ``ValueError`` unless the Beta's ``concentration0`` is 1 (the finite-IBP prior).
    """
    if not torch.all(p.concentration0 == 1):
        raise ValueError(
            "kl_kumaraswamy_beta is closed-form only for a Beta(alpha, 1) prior; "
            f"got concentration0 = {p.concentration0}"
        )
    a, b = q.concentration1, q.concentration0
    alpha = _float32(p.concentration1)
    return (
        (1.0 - alpha / a) * (-EULER_GAMMA - torch.digamma(1.0 + b))
        + torch.log(a)
        + torch.log(b)
        - torch.log(alpha)
        - (b - 1.0) / b
    )


def kl_bernoulli(probs_q, probs_p) -> torch.Tensor:
    r"""Elementwise KL(Bernoulli(ρ) ‖ Bernoulli(p)) = ρ log(ρ/p) + (1 − ρ) log((1 − ρ)/(1 − p)): torch's registered
    KL, on probabilities clamped to [1e-6, 1 − 1e-6] first, so the result and its gradients are finite even for
    saturated gates."""
    q = _float32(probs_q).clamp(PROB_EPS, 1.0 - PROB_EPS)
    p = _float32(probs_p).clamp(PROB_EPS, 1.0 - PROB_EPS)
    return kl_divergence(Bernoulli(probs=q, validate_args=False), Bernoulli(probs=p, validate_args=False))


@register_kl(GateBernoulli, GateBernoulli)
def kl_gate_bernoulli(q: GateBernoulli, p: GateBernoulli) -> torch.Tensor:
    """KL(q ‖ p) of two gate Bernoullis: :func:`kl_bernoulli_logits` of their logits."""
    return kl_bernoulli_logits(q.logits, p.logits)


def kl_bernoulli_logits(logits_q, logits_p) -> torch.Tensor:
    r"""Elementwise KL(Bernoulli(σ(ℓ_q)) ‖ Bernoulli(σ(ℓ_p))) from logits, sp = softplus, ρ = σ(ℓ_q):

    .. math::

        \rho\,[\mathrm{sp}(-\ell_p) - \mathrm{sp}(-\ell_q)] + (1 - \rho)\,[\mathrm{sp}(\ell_p) - \mathrm{sp}(\ell_q)].

    torch's registered Bernoulli KL sets the result to inf wherever a probability rounds to 0 or 1; this form stays
    finite and exact for every finite logit.
    """
    lq, lp = _float32(logits_q), _float32(logits_p)
    rho = torch.sigmoid(lq)
    return rho * (F.softplus(-lp) - F.softplus(-lq)) + (1.0 - rho) * (F.softplus(lp) - F.softplus(lq))


def kl_normal_normal_prior(mu, sigma, prior_sigma, log_sigma=None, sigma_eps: float = 0.0) -> torch.Tensor:
    r"""Elementwise KL(N(μ, σ²) ‖ N(0, σ_p²)) = log(σ_p/σ) + (σ² + μ²)/(2σ_p²) − 1/2 (caller sums).

    ``log_sigma``: log σ given directly (its gradient is then σ²/σ_p² − 1, bounded below: no singularity at σ → 0);
    ``sigma_eps``: log(σ + eps) in place of log σ, as BLoB's code (``kl_div_stable``).
    """
    mu, sigma = _float32(mu), _float32(sigma)
    prior_sigma = torch.as_tensor(prior_sigma, dtype=sigma.dtype, device=sigma.device)
    log_q = _float32(log_sigma) if log_sigma is not None else torch.log(sigma + sigma_eps)
    return (
        torch.log(prior_sigma)
        - log_q
        + (sigma.pow(2) + mu.pow(2)) / (2.0 * prior_sigma.pow(2))
        - 0.5
    )


@register_kl(FactorNormal, Normal)
def kl_factor_normal(q: FactorNormal, p: Normal) -> torch.Tensor:
    """KL(q ‖ N(0, σ_p²)): :func:`kl_normal_normal_prior` with q's log σ. Raises ``ValueError`` unless the prior is
    centred (the closed form drops its mean)."""
    if not torch.all(p.loc == 0):
        raise ValueError(f"kl_factor_normal is for a prior N(0, sigma_p^2); got loc = {p.loc}")
    return kl_normal_normal_prior(q.loc, q.scale, p.scale, q.log_scale, q.scale_eps)


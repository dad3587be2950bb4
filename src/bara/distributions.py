r"""Variational distributions of the BaRA gate and their closed-form KL divergences.

Every random quantity of the gate is a ``torch.distributions.Distribution`` with ``rsample`` and
``log_prob``; every KL is registered with ``@register_kl(P, Q)`` and called as
``torch.distributions.kl_divergence(q, p)``. The layer code never spells out a KL formula.

===========================  ==========================  ======================================
variable                     q                           prior p
===========================  ==========================  ======================================
global gate :math:`\pi_k`    :class:`Kumaraswamy` (a, b)  ``Beta(alpha0 / r, 1)``
local magnitude θ            :class:`Weibull` (κ, m)      ``Gamma(a_θ, rate b_θ)``
local gate g                 Bernoulli / concrete         ``Bernoulli(π̂)`` (:func:`kl_bernoulli`)
factor A                     Normal(μ, σ)                 ``Normal(0, σ_p)`` (:func:`kl_normal_normal_prior`)
===========================  ==========================  ======================================

All gate maths runs in float32 whatever the base model's dtype: half-precision inputs are cast up
(float64 is kept, which the gradient checks in the tests use). Uniform noise is drawn from
U(1e-6, 1 - 1e-6) so that no logarithm in a reparameterisation sees 0 or 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.distributions import Beta, Distribution, Gamma, RelaxedBernoulli, TransformedDistribution, constraints
from torch.distributions.kl import register_kl
from torch.distributions.relaxed_bernoulli import LogitRelaxedBernoulli
from torch.distributions.transforms import SigmoidTransform
from torch.distributions.utils import broadcast_all

__all__ = [
    "EULER_GAMMA",
    "UNIFORM_EPS",
    "WEIBULL_SAMPLE_MAX",
    "BinaryConcrete",
    "Kumaraswamy",
    "Weibull",
    "hard_concrete_prob_nonzero",
    "hard_concrete_sample",
    "inverse_softplus",
    "kl_bernoulli",
    "kl_kumaraswamy_beta",
    "kl_normal_normal_prior",
    "kl_weibull_gamma",
    "kumaraswamy_params",
    "straight_through_sample",
    "weibull_params",
]

EULER_GAMMA = 0.5772156649015329
UNIFORM_EPS = 1e-6  # noise u ~ U(UNIFORM_EPS, 1 - UNIFORM_EPS)
WEIBULL_SAMPLE_MAX = 10.0  # θ samples are clamped to at most this (SPEC §1, reparameterisation)
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
# Parameter maps from the gate network's free outputs (SPEC §1, "Variational posterior")
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

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        u = _uniform(self._extended_shape(sample_shape), self.concentration1)
        log_one_minus = torch.log(-torch.expm1(torch.log(u) / self.concentration0))  # log(1 - u^{1/b})
        return torch.exp(log_one_minus / self.concentration1).clamp(PROB_EPS, 1.0 - PROB_EPS)

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
    r"""Elementwise KL(Bernoulli(ρ) ‖ Bernoulli(p)) = ρ log(ρ/p) + (1 − ρ) log((1 − ρ)/(1 − p)).

    Both probabilities are clamped to [1e-6, 1 − 1e-6] first, so the result and its gradients are
    finite even for saturated gates.
    """
    q = _float32(probs_q).clamp(PROB_EPS, 1.0 - PROB_EPS)
    p = _float32(probs_p).clamp(PROB_EPS, 1.0 - PROB_EPS)
    return q * (torch.log(q) - torch.log(p)) + (1.0 - q) * (torch.log1p(-q) - torch.log1p(-p))


def kl_normal_normal_prior(mu, sigma, prior_sigma) -> torch.Tensor:
    r"""Elementwise KL(N(μ, σ²) ‖ N(0, σ_p²)) = log(σ_p/σ) + (σ² + μ²)/(2σ_p²) − 1/2 (caller sums)."""
    mu, sigma = _float32(mu), _float32(sigma)
    prior_sigma = torch.as_tensor(prior_sigma, dtype=sigma.dtype, device=sigma.device)
    return (
        torch.log(prior_sigma)
        - torch.log(sigma)
        + (sigma.pow(2) + mu.pow(2)) / (2.0 * prior_sigma.pow(2))
        - 0.5
    )


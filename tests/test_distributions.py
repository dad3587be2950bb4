"""Tests for bara.distributions: closed-form KLs against Monte Carlo, reparameterisation gradients
against finite differences, sample moments, and finiteness over the whole clamped parameter ranges."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Bernoulli, Beta, Exponential, Gamma, Normal, kl_divergence

from bara.distributions import (
    BinaryConcrete,
    Kumaraswamy,
    Weibull,
    hard_concrete_prob_nonzero,
    hard_concrete_sample,
    inverse_softplus,
    kl_bernoulli,
    kl_kumaraswamy_beta,
    kl_normal_normal_prior,
    kl_weibull_gamma,
    kumaraswamy_params,
    straight_through_sample,
    weibull_params,
)

N_MC = 200_000
N_SE = 4.0  # Monte-Carlo tolerance in standard errors (fixed seeds, so each check is deterministic)
F64 = torch.float64


def t64(*xs):
    return [torch.tensor(x, dtype=F64) for x in xs]


def mc_kl(q, p, n=N_MC):
    """Monte-Carlo KL estimate E_q[log q - log p] and its standard error."""
    x = q.rsample((n,))
    v = q.log_prob(x) - p.log_prob(x)
    return v.mean().item(), (v.std() / math.sqrt(n)).item()


def assert_within_se(estimate, se, exact):
    assert abs(estimate - exact) <= N_SE * se + 1e-6, f"MC {estimate:.5f} ± {se:.5f} vs exact {exact:.5f}"


# --------------------------------------------------------------------------------------------------
# Closed-form KLs against Monte Carlo and independent references
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kappa, mean, alpha, beta",
    [(1.0, 1.0, 1.0, 2.0), (3.0, 0.5, 1.0, 1.0), (10.0, 1.0, 0.3, 0.3), (1.5, 1.5, 2.0, 1.0), (50.0, 0.2, 1.0, 1.0)],
)
def test_kl_weibull_gamma_matches_monte_carlo(kappa, mean, alpha, beta):
    torch.manual_seed(0)
    q, p = Weibull(*t64(kappa, mean)), Gamma(*t64(alpha, beta))
    exact = kl_divergence(q, p).item()
    estimate, se = mc_kl(q, p)
    assert_within_se(estimate, se, exact)


@pytest.mark.parametrize(
    "a, b, alpha", [(1.0, 1.0, 0.125), (2.0, 3.0, 1.0), (0.7, 0.6, 0.125), (5.0, 0.8, 2.0), (1.5, 4.0, 0.5)]
)
def test_kl_kumaraswamy_beta_matches_monte_carlo(a, b, alpha):
    torch.manual_seed(0)
    q, p = Kumaraswamy(*t64(a, b)), Beta(*t64(alpha, 1.0))
    exact = kl_divergence(q, p).item()
    estimate, se = mc_kl(q, p)
    assert_within_se(estimate, se, exact)


@pytest.mark.parametrize("mu, sigma, prior_sigma", [(0.0, 0.05, 0.2), (0.3, 0.1, 0.2), (-1.0, 2.0, 0.5)])
def test_kl_normal_prior_matches_monte_carlo_and_torch(mu, sigma, prior_sigma):
    torch.manual_seed(0)
    mu, sigma, prior_sigma = t64(mu, sigma, prior_sigma)
    exact = kl_normal_normal_prior(mu, sigma, prior_sigma)
    q, p = Normal(mu, sigma), Normal(torch.zeros((), dtype=F64), prior_sigma)
    estimate, se = mc_kl(q, p)
    assert_within_se(estimate, se, exact.item())
    torch.testing.assert_close(exact, kl_divergence(q, p))


def test_kl_bernoulli_matches_exact_sum_and_torch():
    q = torch.tensor([0.01, 0.3, 0.5, 0.9, 0.999], dtype=F64)
    p = torch.tensor([0.5, 0.8, 0.5, 0.1, 0.3], dtype=F64)
    exact = q * torch.log(q / p) + (1 - q) * torch.log((1 - q) / (1 - p))  # the two-point expectation
    torch.testing.assert_close(kl_bernoulli(q, p), exact)
    torch.testing.assert_close(kl_bernoulli(q, p), kl_divergence(Bernoulli(q), Bernoulli(p)))


def test_kl_weibull_gamma_equals_exponential_gamma_at_unit_concentration():
    # Weibull(κ = 1, λ) is Exponential(rate 1/λ); torch registers KL(Exponential ‖ Gamma).
    mean = torch.tensor([0.1, 0.7, 3.0, 9.0])
    alpha, beta = torch.tensor([0.3, 1.0, 2.0, 5.0]), torch.tensor([0.3, 1.0, 0.5, 4.0])
    ours = kl_divergence(Weibull(torch.ones(4), mean), Gamma(alpha, beta))
    torch.testing.assert_close(ours, kl_divergence(Exponential(1.0 / mean), Gamma(alpha, beta)), rtol=1e-5, atol=1e-5)


def test_kl_kumaraswamy_beta_equals_beta_beta_at_unit_b():
    # Kumaraswamy(a, 1) is Beta(a, 1); torch registers KL(Beta ‖ Beta).
    a, alpha = torch.tensor([0.05, 0.5, 1.0, 3.0, 40.0]), torch.tensor([0.125, 1.0, 0.01, 2.0, 0.5])
    ours = kl_divergence(Kumaraswamy(a, torch.ones(5)), Beta(alpha, torch.ones(5)))
    reference = kl_divergence(Beta(a, torch.ones(5)), Beta(alpha, torch.ones(5)))
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_registered_kls_dispatch_to_named_functions():
    q, p = Weibull(torch.tensor(2.0), torch.tensor(0.5)), Gamma(torch.tensor(1.0), torch.tensor(1.0))
    assert kl_divergence(q, p).item() == kl_weibull_gamma(q, p).item()
    q, p = Kumaraswamy(torch.tensor(2.0), torch.tensor(0.5)), Beta(torch.tensor(0.1), torch.tensor(1.0))
    assert kl_divergence(q, p).item() == kl_kumaraswamy_beta(q, p).item()


def test_kl_kumaraswamy_rejects_beta_prior_without_unit_concentration0():
    with pytest.raises(ValueError, match="Beta\\(alpha, 1\\)"):
        kl_divergence(Kumaraswamy(torch.tensor(1.0), torch.tensor(1.0)), Beta(torch.tensor(0.5), torch.tensor(2.0)))


# --------------------------------------------------------------------------------------------------
# KL >= 0, and KL = 0 where q equals p
# --------------------------------------------------------------------------------------------------


def test_kls_are_nonnegative_over_random_parameters():
    g = torch.Generator().manual_seed(0)
    n = 20_000

    def rand(lo, hi):  # log-uniform in [lo, hi], float64 so rounding cannot fake a negative KL
        return torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * torch.rand(n, generator=g, dtype=F64))

    kl_w = kl_divergence(Weibull(1.0 + rand(1e-3, 99.0), rand(1e-3, 10.0)), Gamma(rand(0.05, 10.0), rand(0.05, 10.0)))
    kl_k = kl_divergence(
        Kumaraswamy(rand(1e-2, 1e2), rand(1e-2, 1e2)), Beta(rand(1e-2, 10.0), torch.ones(n, dtype=F64))
    )
    kl_b = kl_bernoulli(torch.rand(n, generator=g, dtype=F64), torch.rand(n, generator=g, dtype=F64))
    kl_n = kl_normal_normal_prior(torch.randn(n, generator=g, dtype=F64), rand(1e-3, 10.0), rand(1e-2, 1.0))
    for kl in (kl_w, kl_k, kl_b, kl_n):
        assert torch.isfinite(kl).all()
        assert kl.min().item() >= -1e-9


def test_kls_vanish_when_q_equals_p():
    beta = torch.tensor([0.3, 1.0, 4.0])
    # Weibull(1, λ) = Exponential(1/λ) = Gamma(1, rate 1/λ); with κ = 1, λ = m.
    assert kl_divergence(Weibull(torch.ones(3), 1.0 / beta), Gamma(torch.ones(3), beta)).abs().max() < 1e-6
    a = torch.tensor([0.05, 1.0, 7.0])
    assert kl_divergence(Kumaraswamy(a, torch.ones(3)), Beta(a, torch.ones(3))).abs().max() < 1e-5
    assert kl_normal_normal_prior(torch.zeros(3), torch.full((3,), 0.2), 0.2).abs().max() < 1e-7
    p = torch.tensor([1e-6, 0.3, 1 - 1e-6])
    assert kl_bernoulli(p, p).abs().max() < 1e-7
    # and are clearly positive when q moves away from p
    one = torch.tensor(1.0)
    assert kl_divergence(Weibull(2.0 * one, one), Gamma(one, one)) > 0.05


# --------------------------------------------------------------------------------------------------
# Densities, sample moments, reparameterisation gradients
# --------------------------------------------------------------------------------------------------


def test_log_probs_match_torch_reference_densities():
    x = torch.tensor([0.01, 0.3, 1.0, 2.5, 7.0], dtype=F64)
    kappa, mean = t64(2.5, 1.2)
    ours = Weibull(kappa, mean)
    reference = torch.distributions.Weibull(ours.scale, kappa)
    torch.testing.assert_close(ours.log_prob(x), reference.log_prob(x))
    pi = torch.tensor([1e-4, 0.1, 0.5, 0.9, 0.999], dtype=F64)
    a, b = t64(0.7, 3.0)
    torch.testing.assert_close(Kumaraswamy(a, b).log_prob(pi), torch.distributions.Kumaraswamy(a, b).log_prob(pi))


@pytest.mark.parametrize("kappa, mean", [(1.0, 0.1), (1.0, 1.0), (2.0, 0.5), (10.0, 2.0), (100.0, 1e-3)])
def test_weibull_sample_mean_and_variance(kappa, mean):
    torch.manual_seed(0)
    d = Weibull(torch.tensor(kappa), torch.tensor(mean))
    assert d.mean.item() == pytest.approx(mean)
    assert d.scale.item() == pytest.approx(mean / math.gamma(1 + 1 / kappa), rel=1e-5)
    x = d.rsample((N_MC,))
    assert x.max().item() <= 10.0 and x.min().item() > 0.0
    se = d.variance.sqrt().item() / math.sqrt(N_MC)
    assert_within_se(x.mean().item(), se, mean)
    assert x.var().item() == pytest.approx(d.variance.item(), rel=0.03)


def test_weibull_samples_are_clamped_to_ten():
    torch.manual_seed(0)
    x = Weibull(torch.tensor(1.0), torch.tensor(10.0)).rsample((10_000,))
    assert x.max().item() == 10.0  # P(θ > 10) = e^{-1} before the clamp
    assert (x == 10.0).float().mean().item() == pytest.approx(math.exp(-1.0), abs=0.02)


@pytest.mark.parametrize("a, b", [(1.0, 0.1), (2.0, 3.0), (0.5, 0.5), (5.0, 1.0), (0.05, 20.0)])
def test_kumaraswamy_sample_mean_and_variance(a, b):
    torch.manual_seed(0)
    d = Kumaraswamy(torch.tensor(a), torch.tensor(b))
    exact_mean = b * math.exp(math.lgamma(1 + 1 / a) + math.lgamma(b) - math.lgamma(1 + 1 / a + b))
    assert d.mean.item() == pytest.approx(exact_mean, rel=1e-4)
    x = d.rsample((N_MC,))
    assert 0.0 < x.min().item() and x.max().item() < 1.0
    se = d.variance.sqrt().item() / math.sqrt(N_MC)
    assert_within_se(x.mean().item(), se, exact_mean)
    assert x.var().item() == pytest.approx(d.variance.item(), rel=0.03)


def test_kumaraswamy_default_init_mean_is_about_091():
    a, b = kumaraswamy_params(inverse_softplus(1.0), inverse_softplus(0.1))
    torch.testing.assert_close((a, b), (torch.tensor(1.0), torch.tensor(0.1)))
    assert Kumaraswamy(a, b).mean.item() == pytest.approx(1 / 1.1, rel=1e-5)  # b·B(2, b) = 1/(1 + b)


def test_weibull_rsample_gradient_matches_finite_differences():
    def sample(kappa, mean):
        torch.manual_seed(1)  # same u on every call: finite differences of θ(κ, m; u)
        return Weibull(kappa, mean).rsample()

    kappa = torch.tensor([1.0, 1.7, 4.0, 20.0, 90.0], dtype=F64, requires_grad=True)
    mean = torch.tensor([0.05, 0.5, 1.0, 2.0, 5.0], dtype=F64, requires_grad=True)
    assert sample(kappa, mean).max().item() < 10.0  # stay off the clamp's kink
    assert torch.autograd.gradcheck(sample, (kappa, mean))


def test_kumaraswamy_rsample_gradient_matches_finite_differences():
    def sample(a, b):
        torch.manual_seed(1)
        return Kumaraswamy(a, b).rsample()

    a = torch.tensor([0.3, 1.0, 2.0, 5.0, 40.0], dtype=F64, requires_grad=True)
    b = torch.tensor([0.5, 0.3, 3.0, 1.0, 60.0], dtype=F64, requires_grad=True)
    x = sample(a, b)
    assert ((x > 1e-6) & (x < 1 - 1e-6)).all()  # stay off the clamp's kinks
    assert torch.autograd.gradcheck(sample, (a, b))


def test_rsample_gradient_of_sample_mean_wrt_mean_is_one():
    torch.manual_seed(0)
    mean = torch.tensor(0.4, requires_grad=True)
    Weibull(torch.tensor(3.0), mean).rsample((N_MC,)).mean().backward()
    assert mean.grad.item() == pytest.approx(1.0, abs=1e-3)  # θ is linear in m for fixed u


def test_parameter_maps_respect_the_spec_ranges():
    free = torch.tensor([-1e4, -20.0, 0.0, 20.0, 1e4])
    a, b = kumaraswamy_params(free, free)
    assert a.min().item() == pytest.approx(1e-2) and a.max().item() == pytest.approx(1e2)
    torch.testing.assert_close(a[2], torch.tensor(math.log(2.0)))
    kappa, mean = weibull_params(free, free)
    assert kappa.min().item() == pytest.approx(1.0) and kappa.max().item() == pytest.approx(100.0)
    assert mean.min().item() == pytest.approx(1e-3) and mean.max().item() == pytest.approx(10.0)
    torch.testing.assert_close(kappa[2], torch.tensor(1.0 + math.log(2.0)))


def test_half_precision_inputs_are_computed_in_float32():
    kappa, mean = weibull_params(torch.zeros(3, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.float16))
    assert kappa.dtype == mean.dtype == torch.float32
    bf16, f16 = torch.ones(2, dtype=torch.bfloat16), torch.ones(2, dtype=torch.float16)
    assert Weibull(bf16, bf16).rsample().dtype == torch.float32
    assert Kumaraswamy(f16, f16).mean.dtype == torch.float32
    assert kl_bernoulli(0.5 * bf16, torch.tensor([0.5, 0.5])).dtype == torch.float32
    assert BinaryConcrete(torch.zeros(2, dtype=torch.bfloat16)).rsample().dtype == torch.float32


def test_invalid_parameters_fail_loudly():
    with pytest.raises(ValueError):
        Weibull(torch.tensor(-1.0), torch.tensor(1.0))
    with pytest.raises(ValueError):
        Kumaraswamy(torch.tensor(1.0), torch.tensor(0.0))


# --------------------------------------------------------------------------------------------------
# No NaN / inf anywhere in the clamped parameter ranges (values and gradients)
# --------------------------------------------------------------------------------------------------

free = st.floats(-20.0, 20.0, allow_nan=False, width=32)
prior = st.floats(1e-2, 10.0, allow_nan=False)


def assert_finite(*tensors):
    for t in tensors:
        assert torch.isfinite(t).all(), t


@settings(max_examples=150, deadline=None)
@given(kappa_free=free, mean_free=free, alpha=prior, beta=prior)
def test_weibull_finite_everywhere(kappa_free, mean_free, alpha, beta):
    kf = torch.tensor([kappa_free], requires_grad=True)
    mf = torch.tensor([mean_free], requires_grad=True)
    q = Weibull(*weibull_params(kf, mf))
    x = q.rsample((256,))
    log_q = q.log_prob(x)
    kl = kl_divergence(q, Gamma(torch.tensor(alpha), torch.tensor(beta)))
    assert_finite(x, log_q, kl)
    assert (x > 0).all() and (x <= 10.0).all() and (kl >= -1e-4).all()
    (x.sum() + log_q.sum() + kl.sum()).backward()
    assert_finite(kf.grad, mf.grad)


@settings(max_examples=150, deadline=None)
@given(a_free=free, b_free=free, alpha=prior)
def test_kumaraswamy_finite_everywhere(a_free, b_free, alpha):
    af = torch.tensor([a_free], requires_grad=True)
    bf = torch.tensor([b_free], requires_grad=True)
    q = Kumaraswamy(*kumaraswamy_params(af, bf))
    x = q.rsample((256,))
    log_q = q.log_prob(x)
    kl = kl_divergence(q, Beta(torch.tensor(alpha), torch.tensor(1.0)))
    assert_finite(x, log_q, kl, torch.logit(x), q.mean)
    assert (x > 0).all() and (x < 1).all() and (kl >= -1e-4).all()
    (x.sum() + log_q.sum() + kl.sum() + q.mean.sum()).backward()
    assert_finite(af.grad, bf.grad)


@settings(max_examples=100, deadline=None)
@given(logit_q=st.floats(-50.0, 50.0, width=32), p=st.floats(0.0, 1.0, width=32))
def test_bernoulli_kl_finite_for_saturated_gates(logit_q, p):
    lq = torch.tensor([logit_q], requires_grad=True)
    pp = torch.tensor([p], requires_grad=True)
    kl = kl_bernoulli(torch.sigmoid(lq), pp)
    assert_finite(kl)
    assert kl.item() >= -1e-6
    kl.sum().backward()
    assert_finite(lq.grad, pp.grad)


# --------------------------------------------------------------------------------------------------
# Binary concrete, hard concrete, straight-through
# --------------------------------------------------------------------------------------------------


def test_binary_concrete_samples_strictly_inside_unit_interval_with_correct_threshold_law():
    torch.manual_seed(0)
    logits = torch.tensor([-50.0, -2.0, 0.0, 1.5, 50.0])
    y = BinaryConcrete(logits).rsample((N_MC,))
    assert y.shape == (N_MC, 5)
    assert (y > 0).all() and (y < 1).all()
    assert torch.isfinite(BinaryConcrete(logits).log_prob(y)).all()
    # 1[y > 1/2] = 1[ℓ + L > 0] is Bernoulli(σ(ℓ)) whatever the temperature
    p = torch.sigmoid(logits)
    freq = (y > 0.5).double().mean(0)
    se = (p * (1 - p) / N_MC).sqrt().clamp_min(1e-6)
    assert ((freq - p).abs() <= N_SE * se).all(), (freq, p)


def test_binary_concrete_rsample_has_gradient_and_sharpens_with_temperature():
    torch.manual_seed(0)
    logits = torch.zeros(10_000, requires_grad=True)
    y = BinaryConcrete(logits).rsample()
    y.sum().backward()
    interior = (y > 1e-6) & (y < 1 - 1e-6)
    assert interior.float().mean() > 0.999
    # dy/dℓ = y (1 - y) / τ off the clamp
    torch.testing.assert_close(logits.grad[interior], (y * (1 - y) / (2 / 3)).detach()[interior])
    cold = BinaryConcrete(torch.zeros(10_000), temperature=0.05).rsample()
    warm = BinaryConcrete(torch.zeros(10_000), temperature=2.0).rsample()
    assert ((cold < 0.01) | (cold > 0.99)).float().mean() > 0.8
    assert ((warm < 0.01) | (warm > 0.99)).float().mean() < 0.05


def test_hard_concrete_has_exact_zeros_and_ones_and_matches_prob_nonzero():
    torch.manual_seed(0)
    logits = torch.zeros(N_MC, requires_grad=True)
    z = hard_concrete_sample(logits)
    assert (z >= 0).all() and (z <= 1).all()
    assert (z == 0).any() and (z == 1).any() and ((z > 0) & (z < 1)).any()
    p = hard_concrete_prob_nonzero(torch.tensor(0.0)).item()
    assert p == pytest.approx(1 / (1 + math.exp(2 / 3 * math.log(0.1 / 1.1))))
    freq = (z > 0).double().mean().item()
    assert abs(freq - p) <= N_SE * math.sqrt(p * (1 - p) / N_MC)
    z.sum().backward()
    interior = (z > 0) & (z < 1)
    assert (logits.grad[interior] > 0).all() and (logits.grad[~interior] == 0).all()


def test_straight_through_is_exactly_binary_with_concrete_gradient():
    torch.manual_seed(0)
    logits = torch.linspace(-3, 3, 100_000, requires_grad=True)
    g = straight_through_sample(logits)
    assert set(g.unique().tolist()) == {0.0, 1.0}
    assert g.mean().item() == pytest.approx(torch.sigmoid(logits.detach()).mean().item(), abs=0.01)
    (g * torch.linspace(1, 2, 100_000)).sum().backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad > 0).mean(dtype=torch.float32) > 0.99


def test_kumaraswamy_logit_sample_keeps_every_gradient_where_the_clamped_sample_lost_a_fifth():
    from bara.distributions import _kumaraswamy_logit

    a, b = torch.tensor(1.0, requires_grad=True), torch.tensor(0.11, requires_grad=True)  # --pi-init 0.9
    torch.manual_seed(0)
    clamped = Kumaraswamy(a, b).rsample((20_000,))
    stuck = (clamped >= 1 - 1e-6).float().mean().item()
    assert stuck > 0.15  # the old path: these draws carry no gradient and a logit of 13.8
    torch.manual_seed(0)
    logits = Kumaraswamy(a, b).rsample_logit((20_000,))
    assert torch.isfinite(logits).all() and logits.max() > 14.0
    grads = torch.autograd.grad(logits, (a, b), grad_outputs=torch.ones_like(logits), is_grads_batched=False)
    assert all(torch.isfinite(g) for g in grads)
    # every draw has a gradient of its own: the per-draw derivative w.r.t. b is never 0
    per_draw = torch.func.vmap(lambda u: torch.func.grad(lambda bb: _kumaraswamy_logit(u, a.detach(), bb))(
        b.detach()))(torch.rand(2_000).clamp(1e-6, 1 - 1e-6))
    assert (per_draw.abs() > 0).all()
    # and the logit is the logit of the (unclamped) sample
    torch.manual_seed(1)
    x = Kumaraswamy(torch.tensor(2.0), torch.tensor(3.0)).rsample((1000,))
    torch.manual_seed(1)
    lg = Kumaraswamy(torch.tensor(2.0), torch.tensor(3.0)).rsample_logit((1000,))
    assert torch.allclose(torch.sigmoid(lg), x, atol=1e-5)


@pytest.mark.parametrize("a, b", [(0.125, 1001.0), (1.0, 1.0), (500.0, 501.0), (3.0, 0.2)])
def test_gate_beta_logit_sample_and_quadrature_match_the_beta(a, b):
    from bara.distributions import GateBeta

    q = GateBeta(torch.tensor([a]), torch.tensor([b]))
    torch.manual_seed(0)
    pi = torch.sigmoid(q.rsample_logit((200_000,)))
    assert pi.mean().item() == pytest.approx(q.mean.item(), abs=3e-3 + 3 * q.variance.sqrt().item() / 400)
    nodes, weights = q.logit_quadrature(64)
    assert weights.sum().item() == pytest.approx(1.0)
    for delta in (-2.0, 0.0, 2.0):
        quad = (weights[:, None] * torch.sigmoid(nodes + delta)).sum(0).item()
        mc = torch.sigmoid(torch.logit(pi.double().clamp(1e-300, 1 - 1e-16)) + delta).mean().item()
        assert quad == pytest.approx(mc, abs=0.01)


def test_kumaraswamy_quadrature_is_the_samplers_mean():
    q = Kumaraswamy(torch.tensor([1.0]), torch.tensor([1.0]))  # pi ~ U(0, 1)
    nodes, weights = q.logit_quadrature(64)
    for delta in (-1.0, 1.0):
        quad = (weights[:, None] * torch.sigmoid(nodes + delta)).sum(0).item()
        # E[sigmoid(logit pi + d)] for pi ~ U(0,1) = integral of e^d pi / (1 - pi + e^d pi) d pi
        c = math.exp(delta)
        reference = c / (c - 1) ** 2 * ((c - 1) - math.log(c))
        assert quad == pytest.approx(reference, abs=2e-3)
    assert (weights[:, None] * torch.sigmoid(nodes - 1.0)).sum().item() == pytest.approx(0.344, abs=0.01)
    assert torch.sigmoid(torch.logit(q.mean) - 1.0).item() == pytest.approx(0.269, abs=0.01)  # not the same


def test_kl_bernoulli_logits_matches_probabilities_and_stays_finite():
    from bara.distributions import kl_bernoulli_logits

    lq, lp = torch.tensor([-3.0, 0.0, 2.0, 40.0, -120.0]), torch.tensor([1.0, 0.5, -2.0, -40.0, 120.0])
    kl = kl_bernoulli_logits(lq, lp)
    torch.testing.assert_close(kl[:3], kl_bernoulli(torch.sigmoid(lq[:3]), torch.sigmoid(lp[:3])), rtol=1e-4,
                               atol=1e-6)
    assert torch.isfinite(kl).all() and (kl >= 0).all()
    assert kl[3].item() == pytest.approx(40.0, rel=1e-3) and kl[4].item() == pytest.approx(120.0, rel=1e-3)


# --------------------------------------------------------------------------------------------------
# torch's interface: registered KLs for every pair, mode and entropy
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dist", [Weibull(torch.tensor(2.5, dtype=F64), torch.tensor(0.8, dtype=F64)),
                                  Kumaraswamy(torch.tensor(2.0, dtype=F64), torch.tensor(3.0, dtype=F64))])
def test_entropy_matches_monte_carlo_and_mode_maximises_the_density(dist):
    torch.manual_seed(0)
    x = dist.rsample((N_MC,))
    v = -dist.log_prob(x)
    assert_within_se(v.mean().item(), (v.std() / math.sqrt(N_MC)).item(), dist.entropy().item())
    grid = torch.linspace(1e-4, 0.9999 if isinstance(dist, Kumaraswamy) else 4.0, 20001, dtype=F64)
    assert dist.mode.item() == pytest.approx(grid[dist.log_prob(grid).argmax()].item(), abs=5e-4)


def test_gate_bernoulli_kl_is_registered_and_finite_where_torchs_is_not():
    from bara.distributions import GateBernoulli

    lq, lp = torch.tensor([-3.0, 0.0, 2.0, 40.0]), torch.tensor([1.0, 0.5, -2.0, -120.0])
    ours = kl_divergence(GateBernoulli(logits=lq), GateBernoulli(logits=lp))
    torch.testing.assert_close(ours[:3], kl_divergence(Bernoulli(logits=lq), Bernoulli(logits=lp))[:3])
    assert torch.isinf(kl_divergence(Bernoulli(logits=lq), Bernoulli(logits=lp))[3])  # σ(-120) rounds to 0
    assert torch.isfinite(ours).all() and ours[3].item() == pytest.approx(120.0, rel=1e-3)


def test_factor_normal_kl_is_torchs_and_needs_a_centred_prior():
    from bara.distributions import FactorNormal

    mu, sigma, prior_sigma = t64(0.3, 0.1, 0.2)
    prior = Normal(torch.zeros((), dtype=F64), prior_sigma)
    torch.testing.assert_close(kl_divergence(FactorNormal(mu, sigma), prior), kl_divergence(Normal(mu, sigma), prior))
    given_log = kl_divergence(FactorNormal(mu, sigma, log_scale=sigma.log()), prior)
    torch.testing.assert_close(given_log, kl_divergence(Normal(mu, sigma), prior))
    with_eps = kl_divergence(FactorNormal(mu, sigma, scale_eps=1e-6), prior)
    assert with_eps.item() == pytest.approx(kl_divergence(Normal(mu, sigma), prior).item() - math.log1p(1e-5))
    with pytest.raises(ValueError, match="N\\(0, sigma_p"):
        kl_divergence(FactorNormal(mu, sigma), Normal(torch.ones((), dtype=F64), prior_sigma))

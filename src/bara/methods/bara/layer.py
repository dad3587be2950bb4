r"""The BaRA layer: LoRA whose rank-1 factors are switched on per instance by a global-local gate.

.. math::
    h_{nt} = W_0 x_{nt} + \frac{\alpha}{r} B\,(z_n \odot A x_{nt}), \qquad z_{nk} = g_{nk}\,\theta_{nk}

- global gate  :math:`\pi_k \sim q = \mathrm{Kumaraswamy}(a_k, b_k)`, prior :math:`\mathrm{Beta}(\alpha_0/r, 1)`
- local gate   :math:`g_{nk} \sim \mathrm{Bernoulli}(\rho_{nk})`, :math:`\mathrm{logit}\,\rho_{nk} =
  \mathrm{logit}\,\hat\pi_k + \Delta_{nk}`; prior :math:`\mathrm{Bernoulli}(\hat\pi_k)`
  (``allocation=stick``: :math:`\rho_{nk} = \prod_{j \le k} \sigma(\mathrm{logit}\,\hat\pi_j + \Delta_{nj})`,
  prior :math:`\prod_{j \le k} \hat\pi_j`: an instance-specific stick-breaking construction of the IBP)
- magnitude    :math:`\theta_{nk} \sim \mathrm{Weibull}(\kappa_{nk}, \lambda_{nk})` with mean :math:`m_{nk}`;
  prior :math:`\mathrm{Gamma}(a_\theta, b_\theta)`
- factors      :math:`A \sim \mathcal N(\mu_A, \sigma_A^2)`, :math:`\sigma_A = \rho^2`, flipout (as BLoB);
  prior :math:`\mathcal N(0, \sigma_p^2)`. B is a point estimate.

:math:`(\Delta, \tilde\kappa, \tilde m)` come from a small gate network reading the context :math:`c_n`, a
masked mean over the instance's tokens (padding never enters it). All gate maths runs in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Beta, Gamma, kl_divergence

from ...distributions import (
    BinaryConcrete, Kumaraswamy, Weibull, hard_concrete_sample, inverse_softplus, kl_bernoulli,
    kl_normal_normal_prior, kumaraswamy_params, straight_through_sample, weibull_params,
)
from .config import BaraConfig

MODES = ("train", "sample", "mean")  # relaxed training sample, hard Monte-Carlo sample, one-pass fast path


def masked_mean(values: torch.Tensor, mask: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """Mean over tokens (dim 1) of ``values [N, T, D]`` where ``mask [N, T]`` is 1; ``causal``: prefix means."""
    m = mask.to(values.dtype).unsqueeze(-1)
    if causal:
        return (values * m).cumsum(1) / m.cumsum(1).clamp(min=1.0)
    # [N, 1, T] @ [N, T, D]: no masked copy of the hidden states (T x D per instance and layer) is allocated.
    return (m.transpose(1, 2) @ values).squeeze(1) / m.sum(1).clamp(min=1.0)


class Flipout(torch.autograd.Function):
    """Flipout's perturbation ``((x ⊙ s_in) @ Eᵀ) ⊙ s_out`` (Wen et al. 2018) without keeping the sign-flipped
    copy of ``x`` for backward: it is rebuilt there from ``x``, which the mean path ``x @ μ_Aᵀ`` keeps anyway.
    Hand-written because autograd would save ``x ⊙ s_in`` ([N, T, d_in] per layer: +12 % train-step memory
    on MiniLM at 32 x 64, benchmarks/speed.py)."""

    @staticmethod
    def forward(ctx, x, sign_in, noise, sign_out):
        ctx.save_for_backward(x, sign_in, noise, sign_out)
        return ((x * sign_in) @ noise.t()) * sign_out

    @staticmethod
    def backward(ctx, grad):
        x, sign_in, noise, sign_out = ctx.saved_tensors
        grad = grad * sign_out
        grad_x = (grad @ noise) * sign_in if ctx.needs_input_grad[0] else None
        grad_noise = None
        if ctx.needs_input_grad[2]:
            grad_noise = grad.reshape(-1, grad.shape[-1]).t() @ (x * sign_in).reshape(-1, x.shape[-1])
        return grad_x, None, grad_noise, None


class BaraLinear(nn.Module):
    """Wraps a frozen ``nn.Linear``; every tensor it adds is named ``bara_*``."""

    def __init__(self, base: nn.Linear, config: BaraConfig):
        super().__init__()
        self.base, self.config = base, config
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scaling = config.alpha / config.r  # fixed by the configured r, so pruning keeps the outputs
        r, d_in = config.r, base.in_features
        self.bara_A_mu = nn.Parameter(torch.empty(r, d_in))
        nn.init.kaiming_uniform_(self.bara_A_mu, a=math.sqrt(5))  # as peft's LoRA A
        if config.bayes_factors:
            eps = config.init_sigma
            self.bara_A_rho = nn.Parameter(torch.empty(r, d_in).uniform_(eps / math.sqrt(2), eps))
        self.bara_B = nn.Parameter(torch.zeros(base.out_features, r))
        if config.uses_pi:  # q(pi) = Kumaraswamy(a, b): a = 1, b = 1/pi_init - 1 gives E[pi] = pi_init
            self.bara_pi_a = nn.Parameter(inverse_softplus(torch.ones(r)))
            self.bara_pi_b = nn.Parameter(inverse_softplus(torch.full((r,), 1.0 / config.pi_init - 1.0)))
        if config.gate != "none":
            if config.context_source == "hidden":
                self.bara_context = nn.Linear(d_in, config.context_dim)
            width = config.context_dim if config.context_source == "hidden" else r
            last = nn.Linear(config.gate_hidden, 3 * r)
            nn.init.normal_(last.weight, std=config.gate_init) if config.gate_init > 0 else nn.init.zeros_(last.weight)
            with torch.no_grad():  # Delta = 0, kappa ~ 10, m = 1 at the start
                last.bias.copy_(torch.cat([torch.zeros(r), inverse_softplus(torch.full((r,), 9.0)),
                                           inverse_softplus(torch.ones(r))]))
            # Pooled transformer states are anisotropic (all inputs share one dominant direction); batch
            # normalisation removes the shared part so the gate reads what distinguishes an instance.
            norm = nn.LayerNorm(width) if config.context_norm == "layer" else nn.BatchNorm1d(width, momentum=0.01)
            self.bara_gate = nn.Sequential(norm, nn.Linear(width, config.gate_hidden), nn.GELU(), last)
        self.mode = "train"
        self.mask: torch.Tensor | None = None  # [N, T], set by the method's hook before every forward
        self.kl_local: torch.Tensor | None = None  # [N] after a forward
        self.penalty: torch.Tensor | None = None  # [N] L1 of z for gate=deterministic
        self.last_rho: torch.Tensor | None = None  # [N, r] instance-level gate probabilities
        self.last_g: torch.Tensor | None = None  # [N, r] hard (or sampled) gates

    @property
    def rank(self) -> int:
        return self.bara_A_mu.shape[0]

    @property
    def sigma_A(self) -> torch.Tensor:
        return self.bara_A_rho ** 2

    # The distributions below skip torch's argument checks: a NaN from diverged training then reaches the loss,
    # where the trainer stops with the step and the fix, instead of a ValueError deep inside torch.

    # -- the global gate ----------------------------------------------------------------------------
    def q_pi(self) -> Kumaraswamy:
        return Kumaraswamy(*kumaraswamy_params(self.bara_pi_a, self.bara_pi_b), validate_args=False)

    def expected_pi(self) -> torch.Tensor:
        """E[pi_k] under q (the fixed prior gate probability for gate=local/deterministic)."""
        if self.config.uses_pi:
            return self.q_pi().mean
        return torch.full((self.rank,), self.config.pi_init, device=self.bara_A_mu.device)

    def kl_global(self) -> torch.Tensor:
        """KL(q(pi) || Beta(alpha0/r, 1)) + KL(q(A) || N(0, sigma_p^2)), summed over the layer."""
        return self.kl_pi() + self.kl_A()

    def kl_pi(self) -> torch.Tensor:
        c = self.config
        if not c.uses_pi:
            return self.bara_A_mu.new_zeros((), dtype=torch.float32)
        q = self.q_pi()
        return kl_divergence(q, Beta(torch.full_like(q.a, c.ibp_alpha / c.r), torch.ones_like(q.a),
                                     validate_args=False)).sum()

    def kl_A(self) -> torch.Tensor:
        if not self.config.bayes_factors:
            return self.bara_A_mu.new_zeros((), dtype=torch.float32)
        return kl_normal_normal_prior(self.bara_A_mu, self.sigma_A, self.config.prior_sigma).sum().float()

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        squeeze = x.dim() == 2
        if squeeze:
            x = x.unsqueeze(1)
        mask = self.mask
        if mask is None or mask.shape != x.shape[:2]:
            mask = x.new_ones(x.shape[:2])
        ax_mean = x @ self.bara_A_mu.t()
        if self.config.lora_dropout and self.mode == "train":  # as LoRA: dropout on the adapter's input
            x_drop = F.dropout(x, self.config.lora_dropout, training=True)
            ax = x_drop @ self.bara_A_mu.t()
        else:
            x_drop, ax = x, ax_mean
        if self.config.bayes_factors and self.mode != "mean":
            # Flipout (Wen et al. 2018): one weight noise per pass, decorrelated per instance by random signs.
            noise = self.sigma_A * torch.randn_like(self.sigma_A)
            sign_in = torch.randint(0, 2, (x.shape[0], 1, x.shape[-1]), device=x.device).to(x.dtype) * 2 - 1
            sign_out = torch.randint(0, 2, (x.shape[0], 1, self.rank), device=x.device).to(x.dtype) * 2 - 1
            ax = ax + Flipout.apply(x_drop, sign_in, noise, sign_out)
        z = self.local_weights(x, ax_mean, mask)
        if z is not None:
            ax = ax * (z.unsqueeze(1) if z.dim() == 2 else z).to(ax.dtype)
        delta = self.scaling * (ax @ self.bara_B.t())
        if squeeze:
            delta = delta.squeeze(1)
        return out + delta

    def local_weights(self, x: torch.Tensor, ax_mean: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """z = g * theta, ``[N, r]`` (instance context) or ``[N, T, r]`` (token/causal); None when gate=none.
        Also stores the per-instance local KL and the diagnostics of this pass."""
        c = self.config
        if c.gate == "none":
            self.kl_local = self.penalty = None
            return None
        source = (x if c.context_source == "hidden" else ax_mean).float()
        context = masked_mean(source, mask) if c.context == "instance" else \
            masked_mean(source, mask, causal=True) if c.context == "causal" else source
        if c.context_source == "hidden":
            context = self.bara_context(context)
        if c.gate == "global":
            context = torch.zeros_like(context)  # nothing depends on the input
        if c.context_norm == "batch":
            norm = self.bara_gate[0]
            # Batch statistics while training (one instance has none), running statistics otherwise.
            norm.train(self.mode == "train" and context.shape[0] > 1)
            flat = context.reshape(-1, context.shape[-1])
            if context.dim() == 3:  # token/causal contexts: statistics over real tokens only
                keep = mask.reshape(-1) > 0
                normed = torch.zeros_like(flat)
                normed[keep] = norm(flat[keep])
            else:
                normed = norm(flat)
            raw = self.bara_gate[1:](normed.reshape(context.shape)).float()
        else:
            raw = self.bara_gate(context).float()
        delta, kappa_free, mean_free = raw.split(self.rank, dim=-1)
        pi = self.expected_pi()
        if c.uses_pi and self.mode != "mean":
            pi = self.q_pi().rsample(delta.shape[:-1])  # one pi sample per instance (and token)
        if c.gate == "global":
            delta = torch.zeros_like(delta)
        logit_rho = torch.logit(pi.clamp(1e-6, 1 - 1e-6)) + delta
        if c.allocation == "stick":
            # Stick-breaking IBP (Teh et al. 2007) per instance: rho_k = prod_{j<=k} sigmoid(l_j), and the prior
            # probability likewise prod_{j<=k} pi_j. Factors are ordered; the gate network picks where to stop.
            log_rho = F.logsigmoid(logit_rho).cumsum(-1)
            logit_rho = log_rho - torch.log1p(-log_rho.exp().clamp(max=1 - 1e-6))
            pi = torch.log(pi.clamp(1e-6, 1.0)).cumsum(-1).exp()
        rho = torch.sigmoid(logit_rho)
        kappa, magnitude = weibull_params(kappa_free, mean_free)
        kl = torch.zeros_like(rho)

        if c.gate == "deterministic":  # SoRA-like: no sampling, no KL, an L1 penalty on z
            z = rho * (magnitude if c.slab != "binary" else 1.0)
            g = (rho > 0.5).float()
            self.penalty = self._instance(z.abs().sum(-1), mask)
        else:
            if c.slab == "magnitude":
                g = torch.ones_like(rho)
            elif self.mode == "train":
                g = {"concrete": lambda: BinaryConcrete(logit_rho, c.temperature, validate_args=False).rsample(),
                     "hard_concrete": lambda: hard_concrete_sample(logit_rho, c.temperature),
                     "straight_through": lambda: straight_through_sample(logit_rho, c.temperature)}[c.estimator]()
            elif self.mode == "sample":
                g = torch.bernoulli(rho)
            else:
                g = (rho > 0.5).float()
            weight = rho if self.mode == "mean" and c.fast_gate == "expected" and c.slab != "magnitude" else g
            train = self.mode == "train"  # the local KL enters only the training loss: prediction skips it
            if c.slab == "binary":
                theta = torch.ones_like(rho)
            elif self.mode == "mean":
                theta = magnitude
            else:
                q_theta = Weibull(kappa, magnitude, validate_args=False)
                theta = q_theta.rsample()
                if train:
                    prior = Gamma(torch.full_like(kappa, c.theta_shape), torch.full_like(kappa, c.theta_rate),
                                  validate_args=False)
                    on = rho if c.slab == "both" else torch.ones_like(rho)
                    kl = kl + on * kl_divergence(q_theta, prior)
            if train and c.gate in ("both", "local") and c.slab != "magnitude":
                kl = kl + kl_bernoulli(rho, pi)
            z = weight * theta
            self.penalty = None
        self.kl_local = self._instance(kl.sum(-1), mask)
        self.last_rho = self._instance(rho.detach(), mask)
        self.last_g = self._instance(g.detach(), mask)
        return z

    def _instance(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token-level values averaged over each instance's real tokens; instance-level ones unchanged."""
        if self.config.context == "instance":
            return values
        return masked_mean(values if values.dim() == 3 else values.unsqueeze(-1), mask).squeeze(-1) \
            if values.dim() == 2 else masked_mean(values, mask)

    # -- pruning ------------------------------------------------------------------------------------
    @torch.no_grad()
    def keep_factors(self, index: torch.Tensor) -> None:
        """Keep only factors ``index`` (pruning, or shaping the layer to a pruned adapter before loading)."""
        def cut(param: nn.Parameter, dim: int, keep: torch.Tensor = index) -> nn.Parameter:
            return nn.Parameter(param.data.index_select(dim, keep).clone(), requires_grad=param.requires_grad)

        r = self.rank
        self.bara_A_mu = cut(self.bara_A_mu, 0)
        self.bara_B = cut(self.bara_B, 1)
        if self.config.bayes_factors:
            self.bara_A_rho = cut(self.bara_A_rho, 0)
        if self.config.uses_pi:
            self.bara_pi_a, self.bara_pi_b = cut(self.bara_pi_a, 0), cut(self.bara_pi_b, 0)
        if self.config.gate != "none":
            last = self.bara_gate[-1]
            rows = torch.cat([index, index + r, index + 2 * r])
            new = nn.Linear(last.in_features, len(rows))
            new.weight, new.bias = cut(last.weight, 0, rows), cut(last.bias, 0, rows)
            self.bara_gate[-1] = new

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.rank}, gate={self.config.gate}"

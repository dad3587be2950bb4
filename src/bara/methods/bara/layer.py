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
- factors      :math:`A \sim \mathcal N(\mu_A, \sigma_A^2)`, free parameter :math:`\log\sigma_A` (or BLoB's
  :math:`\sigma_A = \rho^2`), flipout (as BLoB); prior :math:`\mathcal N(0, \sigma_p^2)`. B is a point estimate.
  BLoB's layer, :class:`~bara.methods.factor_posterior.FactorLinear`, which this one extends with the gate.
- ``pi_update=svi``: :math:`q(\pi_k) = \mathrm{Beta}(\alpha_k, \beta_k)`, moved after every step towards its
  conjugate optimum given the batch's usage (:meth:`BaraLinear.svi_step`)

:math:`(\Delta, \tilde\kappa, \tilde m)` come from a small gate network reading the context :math:`c_n`, a
masked mean over the instance's tokens (padding never enters it). All gate maths runs in float32. The ablation
switches (``gate`` and its q(π), ``estimator``, ``allocation``, ``slab``, ``fast_gate``) are the strategies of
:mod:`.variants`, chosen when the layer is built: this layer holds the pieces (q(π)'s tensors, the gate network,
the expected and the drawn gate, the magnitude θ), the ``gate`` strategy forms z from them.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Beta, Gamma, kl_divergence

from ...distributions import GateBernoulli, GateBeta, Kumaraswamy, inverse_softplus, weibull_params
from ..factor_posterior import FactorLinear, Flipout, cut  # noqa: F401 (Flipout: importable here, as before)
from .config import BaraConfig
from .variants import gating, variants

PI_QUADRATURE_NODES = 64  # quantiles (Kumaraswamy) or Gauss-Hermite nodes (Beta) of q(pi) for the expected gate


def block_roll(n: int, block: int, device=None) -> torch.Tensor:
    """Indices that give each of ``n`` rows the next row of its block of ``block`` consecutive rows (the last
    one the first): a fixed permutation with no fixed point in blocks of two or more rows."""
    index = torch.arange(n, device=device)
    start = index - index % block
    size = torch.clamp(n - start, max=block)
    return start + (index - start + 1) % size


def masked_mean(values: torch.Tensor, mask: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """Mean over tokens (dim 1) of ``values [N, T, D]`` where ``mask [N, T]`` is 1; ``causal``: prefix means."""
    m = mask.to(values.dtype).unsqueeze(-1)
    if causal:
        return (values * m).cumsum(1) / m.cumsum(1).clamp(min=1.0)
    # [N, 1, T] @ [N, T, D]: no masked copy of the hidden states (T x D per instance and layer) is allocated.
    return (m.transpose(1, 2) @ values).squeeze(1) / m.sum(1).clamp(min=1.0)


class BaraLinear(FactorLinear):
    """The posterior's layer (:class:`~bara.methods.factor_posterior.FactorLinear`: A, B, flipout) with BaRA's gate:
    q(pi), the context projection and the gate network, whose z weighs the factors. By ``mode``, the gate is a
    relaxed sample (train), a hard Monte-Carlo sample (sample) or the one-pass gate (mean)."""

    def __init__(self, base: nn.Module, config: BaraConfig):
        super().__init__(base, config)
        self.gating = gating(config)  # which gates there are, and q(pi)'s kind
        for name, value in self.initial_pi().items():  # q(pi)'s tensors
            if self.gating.pi.svi:  # Beta(alpha, beta), updated in closed form (buffers, saved with the adapter)
                self.register_buffer(name, torch.full((config.r,), value))
            else:  # Kumaraswamy(a, b) with free a, b
                setattr(self, name, nn.Parameter(torch.full((config.r,), value)))
        if self.gating.network:  # drawn after the factors' initial values
            for name, module in self._gate_modules().items():
                setattr(self, name, module)
        self.estimator, self.allocation, self.slab, self.one_pass_gate = variants(config)
        self.mask: torch.Tensor | None = None  # [N, T], set by the method's hook before every forward
        self.shuffle_block = 0  # > 0: each instance gets the local gate of another in its block (shuffle test)
        self.kl_local: torch.Tensor | None = None  # [N] after a forward: the local KL summed over the instance's gates
        self.gates: torch.Tensor | None = None  # [N] how many local gates the instance has (r, or r per token)
        self.usage: torch.Tensor | None = None  # [r] mean gate probability over the batch (q(pi)'s SVI step)
        self.penalty: torch.Tensor | None = None  # [N] L1 of z for gate=deterministic
        self.last_rho: torch.Tensor | None = None  # [N, r] instance-level gate probabilities
        self.last_g: torch.Tensor | None = None  # [N, r] hard (or sampled) gates

    @property
    def bayes_factors(self) -> bool:
        return self.config.bayes_factors

    def initial_pi(self) -> dict[str, float]:
        """q(pi)'s tensors at the start, E[pi] = pi_init: Beta(2 pi_init, 2 (1 - pi_init)), or the free parameters of
        Kumaraswamy(1, 1/pi_init - 1); empty without q(pi)."""
        return self.gating.pi.initial(self.config)

    def _gate_modules(self) -> dict[str, nn.Module]:
        """The context projection and gate network as initialised (also the shuffle and null diagnostics' source)."""
        c, r = self.config, self.config.r
        modules = {}
        if c.context_source == "hidden":
            modules["bara_context"] = nn.Linear(self.in_features, c.context_dim)
        width = c.context_dim if c.context_source == "hidden" else r
        last = nn.Linear(c.gate_hidden, 3 * r)
        nn.init.normal_(last.weight, std=c.gate_init) if c.gate_init > 0 else nn.init.zeros_(last.weight)
        with torch.no_grad():  # Delta = 0, kappa ~ 10, m = 1 at the start
            last.bias.copy_(torch.cat([torch.zeros(r), inverse_softplus(torch.full((r,), 9.0)),
                                       inverse_softplus(torch.ones(r))]))
        # Pooled transformer states are anisotropic (all inputs share one dominant direction); batch
        # normalisation removes the shared part so the gate reads what distinguishes an instance.
        norm = nn.LayerNorm(width) if c.context_norm == "layer" else nn.BatchNorm1d(width, momentum=0.01)
        modules["bara_gate"] = nn.Sequential(norm, nn.Linear(width, c.gate_hidden), nn.GELU(), last)
        return modules

    @contextmanager
    def initial_gate(self, seed: int = 0):
        """Within the block the gate network and q(pi) are as initialised (seeded), the context normalisation
        keeps its trained running statistics: the null of the gate diagnostics, on the same inputs."""
        saved = {n: getattr(self, n) for n in ("bara_context", "bara_gate") if hasattr(self, n)}
        init = self.initial_pi()
        pi_saved = {n: getattr(self, n).detach().clone() for n in init}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = self._gate_modules()
        device = self.bara_A_mu.device
        if self.config.context_norm == "batch" and "bara_gate" in saved:  # running statistics, not the affine part
            for name, buffer in saved["bara_gate"][0].named_buffers():
                getattr(fresh["bara_gate"][0], name).copy_(buffer)
        for name, module in fresh.items():
            setattr(self, name, module.to(device))
        with torch.no_grad():
            for n, value in init.items():
                getattr(self, n).fill_(value)
        try:
            yield
        finally:
            for name, module in saved.items():
                setattr(self, name, module)
            with torch.no_grad():
                for n, value in pi_saved.items():
                    getattr(self, n).copy_(value)

    # The distributions below skip torch's argument checks: a NaN from diverged training then reaches the loss,
    # where the trainer stops with the step and the fix, instead of a ValueError deep inside torch.

    # -- the global gate ----------------------------------------------------------------------------
    def q_pi(self) -> Kumaraswamy | GateBeta:
        return self.gating.pi.posterior(self)

    def expected_pi(self) -> torch.Tensor:
        """E[pi_k] under q (the fixed prior gate probability for gate=local/deterministic)."""
        if self.gating.pi.inferred:
            return self.q_pi().mean
        return torch.full((self.rank,), self.config.pi_init, device=self.bara_A_mu.device)

    def logit_pi(self, shape: torch.Size) -> torch.Tensor:
        """Sampled logit pi, ``[*shape, r]``: one draw per instance (and token); a constant without q(pi)."""
        if self.gating.pi.inferred:
            return self.q_pi().rsample_logit(shape)
        return torch.full((*shape, self.rank), math.log(self.config.pi_init / (1 - self.config.pi_init)),
                          device=self.bara_A_mu.device)

    def pi_quadrature(self, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Nodes ``[Q, 1 x dims, r]`` and weights ``[Q, 1 x (dims + 1)]`` on logit pi, for E_q(pi)[f(logit pi)]."""
        if self.gating.pi.inferred:
            nodes, weights = self.q_pi().logit_quadrature(PI_QUADRATURE_NODES)
        else:
            nodes, weights = self.logit_pi(torch.Size([1])), torch.ones(1, device=self.bara_A_mu.device)
        return nodes.view(len(weights), *([1] * dims), -1), weights.view(-1, *([1] * (dims + 1)))

    def kl_global(self) -> torch.Tensor:
        """KL(q(pi) || Beta(alpha0/r, 1)) + KL(q(A) || N(0, sigma_p^2)), summed over the layer."""
        return self.kl_pi() + self.kl_A()

    def kl_pi(self) -> torch.Tensor:
        c = self.config
        if not self.gating.pi.inferred:
            return self.bara_A_mu.new_zeros((), dtype=torch.float32)
        q = self.q_pi()
        return kl_divergence(q, Beta(torch.full_like(q.mean, c.ibp_alpha / c.r), torch.ones_like(q.mean),
                                     validate_args=False)).sum()

    @torch.no_grad()
    def svi_step(self, num_train: int, rate: float) -> None:
        r"""One stochastic natural-gradient step of q(pi) = Beta(alpha, beta) towards its conjugate optimum given
        this step's usage u_k (the batch mean of rho_nk): (alpha, beta) <- (1 - eta)(alpha, beta) + eta (alpha0/r +
        N u_k, 1 + N (1 - u_k)), eta = ``rate`` (Hoffman et al. 2013, SVI for topic models)."""
        if self.usage is None:
            return
        c = self.config
        target_a = c.ibp_alpha / c.r + num_train * self.usage
        target_b = 1.0 + num_train * (1.0 - self.usage)
        self.bara_pi_alpha.mul_(1 - rate).add_(rate * target_a)
        self.bara_pi_beta.mul_(1 - rate).add_(rate * target_b)

    def entanglement(self) -> torch.Tensor:
        """||offdiag(cos(A_i, A_j))||_F + ||offdiag(cos(B_i, B_j))||_F: 0 when the factors' directions are
        orthogonal (AdaLoRA's P and Q), whatever their norms."""
        def offdiag(rows: torch.Tensor) -> torch.Tensor:
            unit = F.normalize(rows.float(), dim=1, eps=1e-8)
            gram = unit @ unit.t()
            return (gram - torch.diag_embed(torch.diagonal(gram))).norm()

        return offdiag(self.bara_A_mu) + offdiag(self.bara_B.t())

    # -- forward ------------------------------------------------------------------------------------
    def factor_weights(self, x: torch.Tensor, ax_mean: torch.Tensor) -> torch.Tensor | None:
        """z from the gate, given the padding mask the method's hook set (every token real without one)."""
        mask = self.mask
        if mask is None:
            mask = x.new_ones(x.shape[:2])
        elif mask.shape != x.shape[:2]:
            raise ValueError(f"BaRA's padding mask has shape {tuple(mask.shape)} but the layer's input has "
                             f"{tuple(x.shape[:2])} (instances, tokens): the mask set before this forward belongs to "
                             "another input; set layer.mask = attention_mask (or None) for every forward")
        return self.local_weights(x, ax_mean, mask)

    def gate_outputs(self, x: torch.Tensor, ax_mean: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The gate network's raw outputs (Delta, kappa~, m~), ``[N, 3r]`` or ``[N, T, 3r]`` (token contexts)."""
        c = self.config
        source = (x if c.context_source == "hidden" else ax_mean).float()
        context = masked_mean(source, mask) if c.context == "instance" else \
            masked_mean(source, mask, causal=True) if c.context == "causal" else source
        if c.context_source == "hidden":
            context = self.bara_context(context)
        if not self.gating.input_dependent:
            context = torch.zeros_like(context)  # gate=global: nothing depends on the input
        if c.context_norm != "batch":
            return self.bara_gate(context).float()
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
        return self.bara_gate[1:](normed.reshape(context.shape)).float()

    def local_weights(self, x: torch.Tensor, ax_mean: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """z, ``[N, r]`` (instance context) or ``[N, T, r]`` (token/causal), as the gate's strategy forms it from the
        gate network's outputs (:meth:`GlobalLocal.weights <.variants.GlobalLocal.weights>`: z = g * theta); None
        when gate=none. Also stores the instance's local KL, its number of gates, the batch's usage and this pass's
        diagnostics."""
        if not self.gating.network:  # gate=none: z = 1
            self.kl_local = self.penalty = self.gates = self.usage = None
            return None
        raw = self.gate_outputs(x, ax_mean, mask)
        if self.shuffle_block:
            raw = raw[block_roll(raw.shape[0], self.shuffle_block, raw.device)]
        delta, kappa_free, mean_free = raw.split(self.rank, dim=-1)
        kappa, magnitude = weibull_params(kappa_free, mean_free)
        z, rho, g, kl, penalty = self.gating.weights(self, delta, kappa, magnitude)
        self.penalty = None if penalty is None else self._instance(penalty, mask)
        token_level = self.config.context != "instance"
        self.kl_local = (kl.sum(-1) * mask).sum(-1) if token_level else kl.sum(-1)  # summed over real tokens
        self.gates = mask.sum(-1) * self.rank if token_level else torch.full_like(self.kl_local, self.rank)
        self.usage = self._instance(rho.detach(), mask).mean(0) if self.mode == "train" else None
        self.last_rho = self._instance(rho.detach(), mask)
        self.last_g = self._instance(g.detach(), mask)
        return z

    def expected_rho(self, delta: torch.Tensor) -> torch.Tensor:
        """rho = E_q(pi)[sigma(logit pi + Delta)] by quadrature over q(pi): the sampler's own mean (not
        sigma(logit E[pi] + Delta)), combined by the allocation."""
        nodes, weights = self.pi_quadrature(delta.dim() - 1)
        return self.allocation.expected((weights * torch.sigmoid(nodes + delta + self.estimator.shift)).sum(0))

    def drawn_gate(self, delta: torch.Tensor, with_kl: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(rho, g, and with ``with_kl`` g's KL to Bernoulli(pi) per gate) for one draw of pi and then of g: relaxed
        while training (the estimator's), exact Bernoulli draws otherwise."""
        logit_pi = self.logit_pi(delta.shape[:-1])
        logits = logit_pi + delta
        shift = self.estimator.shift
        cond = torch.sigmoid(logits + shift)
        rho, g, reach = self.allocation.chain(cond, self.slab.draw_gate(logits, cond, self.mode == "train",
                                                                        self.estimator))
        if not with_kl:
            return rho, g, None
        return rho, g, reach * kl_divergence(GateBernoulli(logits=logits + shift, validate_args=False),
                                             GateBernoulli(logits=logit_pi, validate_args=False))

    def theta(self, kappa: torch.Tensor, mean: torch.Tensor, rho: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """theta by the slab (drawn, or its mean m in one pass) and, while training, its KL to Gamma(a, b)."""
        c = self.config
        return self.slab.magnitude(kappa, mean, rho, self.mode, lambda: Gamma(
            torch.full_like(kappa, c.theta_shape), torch.full_like(kappa, c.theta_rate), validate_args=False))

    def _instance(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token-level values averaged over each instance's real tokens; instance-level ones unchanged."""
        if self.config.context == "instance":
            return values
        return masked_mean(values if values.dim() == 3 else values.unsqueeze(-1), mask).squeeze(-1) \
            if values.dim() == 2 else masked_mean(values, mask)

    # -- pruning ------------------------------------------------------------------------------------
    @torch.no_grad()
    def keep_factors(self, index: torch.Tensor) -> None:
        """Keep only factors ``index``: A, B and sigma_A's parameter, q(pi) and the gate network's outputs."""
        r = self.rank
        super().keep_factors(index)
        for name in self.initial_pi():  # q(pi)'s buffers (SVI) or parameters
            values = getattr(self, name)
            setattr(self, name, values[index] if self.gating.pi.svi else cut(values, 0, index))
        if self.gating.network:
            last = self.bara_gate[-1]
            rows = torch.cat([index, index + r, index + 2 * r])
            new = nn.Linear(last.in_features, len(rows))
            new.weight, new.bias = cut(last.weight, 0, rows), cut(last.bias, 0, rows)
            self.bara_gate[-1] = new

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gate={self.config.gate}"

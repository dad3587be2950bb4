r"""The Gaussian posterior on LoRA's A that BLoB (Wang et al., 2024) introduced and BaRA shares: its options, its
initial value, flipout, its KL to the prior and the plain-SGD step BLoB's code takes on that KL.

.. math:: q(A) = \mathcal N(\mu_A, \sigma_A^2), \qquad p(A) = \mathcal N(0, \sigma_p^2), \qquad
          \sigma_A = e^{s} \;(\texttt{sigma_param=log}) \text{ or } \rho^2 \;(\texttt{rho2}, \text{BLoB's}).

Flipout (Wen et al. 2018) draws one weight noise :math:`E \sim \mathcal N(0, \sigma_A^2)` per pass and decorrelates
it per instance with random signs: :math:`A x \approx \mu_A x + ((x \odot s_{in}) E^\top) \odot s_{out}`.
With ``kl_step=sgd`` (BLoB's code) a second optimiser, plain SGD at ``kl_lr`` with linear warm-up and decay, steps
:math:`w_t\,KL(q(A) \| p(A))` after each AdamW step, :math:`w_t = 2^i/(2^{M+1} - 1)`, :math:`i = t \bmod M`,
:math:`M = 100 N^{\pi/\gamma}/b` (:func:`blob_kl_weight`), and sigma_A's parameter only there.
With ``kl_step=ngvi`` the same step moves mu_A only, and sigma_A is set after every step to where Gaussian VI's
fixed point puts it given the curvature seen so far (:func:`ngvi_sigma_step`, the precision update of variational
online Newton / IVON, Shen et al. 2024):

.. math:: \sigma_A^{-2} = \sigma_p^{-2} + N\,h/\kappa, \qquad
          \hat h = \frac{\partial \bar\ell}{\partial E}\,\frac{E}{\sigma_A^2}
          = \frac{\partial \bar\ell / \partial \log\sigma_A}{\sigma_A^2},

h the bias-corrected running mean (decay ``curvature_decay``) of :math:`\hat h`, floored at 0: Price's theorem
makes :math:`\hat h` an unbiased estimate of :math:`E_q[\partial^2 \bar\ell / \partial A^2]` (the mean NLL's
curvature in each entry of A) from the noise E = sigma_A * eps the pass drew; kappa = ``kl_scale`` tempers it.

:class:`FactorLinear` is the layer of this posterior, :math:`h = W_0 x + \frac{\alpha}{r} B\,(z \odot A x)` with
z = 1: BLoB's layer as it stands, BaRA's (:class:`~bara.methods.bara.layer.BaraLinear`) with its gate's z. Its
parameters are ``bara_A_mu``, ``bara_B`` and ``bara_A_rho`` or ``bara_A_log_sigma``, the names saved adapters hold.
:mod:`.factor_method` is the method both build on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal, kl_divergence

from ..distributions import FactorNormal
from ..errors import BaraError
from .base import Choices, Progress, option
from .lora import LoraConfig

SIGMA_PARAMS = ("bara_A_rho", "bara_A_log_sigma")  # sigma_A's free parameter, by its name


class SigmaParam(Choices):
    """``sigma_param``: the free parameter of sigma_A."""

    LOG = "log"
    """log sigma: the KL's gradient sigma^2 / prior_sigma^2 - 1 is bounded, no singularity."""
    RHO2 = "rho2"
    """BLoB's sigma = rho^2, with log(sigma + 1e-6) in the KL (the faithful option)."""


class KlStep(Choices):
    """``kl_step``: how KL(q(A) || prior) is minimised."""

    SGD = "sgd"
    """A separate plain-SGD step after each AdamW step, as BLoB's code."""
    LOSS = "loss"
    """In the objective with the data term, by AdamW: the ELBO as written."""
    NGVI = "ngvi"
    """mu_A's part as ``sgd``; sigma_A set to VI's fixed point from the NLL's curvature (:func:`ngvi_sigma_step`)."""


class SigmaOptimizer(Choices):
    """``sigma_optimizer``: with ``kl_step=sgd``, what steps sigma_A's parameter."""

    SGD = "sgd"
    """Only the SGD KL step, as BLoB's code."""
    ADAMW = "adamw"
    """AdamW at the main rate as well (bara before 2026-12-01)."""


@dataclass
class FactorPosteriorConfig(LoraConfig):
    """BLoB's Gaussian posterior on A and how its KL is minimised: the options BaRA and BLoB share."""

    # Adapters saved before these options existed store BLoB's rho, which AdamW also stepped.
    legacy = {"sigma_param": "rho2", "sigma_optimizer": "adamw"}

    prior_sigma: float = option(0.2, "prior std of A: N(0, prior_sigma^2)")
    init_sigma: float = option(0.05, "epsilon: sigma_A starts at rho^2 with rho ~ U(eps/sqrt2, eps), as BLoB")
    sigma_param: str = option("log", "free parameter of sigma_A: log (log sigma: the KL's gradient sigma^2 / "
                                     "prior_sigma^2 - 1 is bounded, no singularity) or rho2 (BLoB's sigma = rho^2 "
                                     "and log(sigma + 1e-6) in the KL, the faithful option). With kl_step=sgd it "
                                     "is never in AdamW: only the SGD step moves it, on its NLL gradient plus the "
                                     "weighted KL's, as in BLoB's code", SigmaParam)
    kl_warmup: float = option(0.1, "fraction of training over which the KL weight rises 0 -> 1")
    kl_scale: float = option(1.0, "extra multiplier on the global KL terms")
    # Default "sgd" (as BLoB): measured in docs/experiments.md, section 4.
    kl_step: str = option("sgd", "how KL(q(A) || prior) is minimised: sgd (as BLoB's code: a separate plain-SGD "
                                 "step after each AdamW step, lr kl_lr with warm-up and linear decay, weighted by "
                                 "BLoB's KL reweighting) | loss (in the objective, with the data term, by AdamW: "
                                 "the ELBO as written) | ngvi (mu_A's part as sgd; sigma_A set after every step "
                                 "to Gaussian VI's fixed point 1/sigma^2 = 1/prior_sigma^2 + N h / kl_scale, h a "
                                 "running estimate of the NLL's curvature in A, as IVON: needs sigma_param log)",
                          KlStep)
    sigma_optimizer: str = option("sgd", "with kl_step=sgd, what steps sigma_A's parameter: sgd (only the SGD KL "
                                         "step, as BLoB's code) or adamw (AdamW at the main rate as well: bara "
                                         "before 2026-12-01, which drove rho through 0 and diverged at high rates; "
                                         "kept so those runs are told apart, docs/experiments.md section 10)",
                                  SigmaOptimizer)
    kl_lr: float = option(0.002, "learning rate of the kl_step=sgd step (BLoB: 0.002 for RoBERTa, 0.01 for LLaMA)")
    curvature_decay: float = option(0.98, "with kl_step=ngvi: decay of the running mean of the curvature "
                                          "estimate (bias-corrected; 0.98 averages about the last 50 steps)")
    kl_gamma: float = option(8.0, "BLoB's reweighting: the KL weight of step t is 2^i / (2^(M+1) - 1), i = t mod "
                                  "M, M = 100 N^(pi/gamma) / batch size; 0 = a weight 1/M with M = batches per "
                                  "epoch")
    # Off by default until the benchmark's runs are finished (they trained without it); then chosen on validation.
    max_sigma: float = option(0.0, "upper bound on sigma_A after every step, 0 = none: keeps BLoB's SGD KL step from "
                                   "blowing up at high learning rates (docs/experiments.md section 9); the prior's "
                                   "prior_sigma is where the KL's pull on sigma_A vanishes")

    def validate(self) -> None:
        super().validate()
        for name in ("prior_sigma", "init_sigma", "kl_lr"):
            if getattr(self, name) <= 0:
                raise BaraError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.kl_gamma < 0:
            raise BaraError(f"kl_gamma must be >= 0 (0 = no reweighting), got {self.kl_gamma}")
        if self.max_sigma < 0:
            raise BaraError(f"max_sigma must be >= 0 (0 = no bound), got {self.max_sigma}")
        if not 0 <= self.curvature_decay < 1:
            raise BaraError(f"curvature_decay must be in [0, 1), got {self.curvature_decay}; fix: pass "
                            "--curvature-decay 0.98 (the default: about the last 50 steps) or another value below 1")
        if self.kl_step == "ngvi" and (self.sigma_param != "log" or self.sigma_optimizer != "sgd"):
            raise BaraError("kl_step=ngvi sets sigma_A from the curvature and needs sigma_param=log and "
                            f"sigma_optimizer=sgd, got {self.sigma_param} and {self.sigma_optimizer}; fix: pass "
                            "--sigma-param log (BLoB's default is rho2) and --sigma-optimizer sgd, or another "
                            "--kl-step")


def sigma_parameter(r: int, d_in: int, config: FactorPosteriorConfig) -> tuple[str, nn.Parameter]:
    """sigma_A's free parameter ``[r, d_in]`` as BLoB starts it, sigma_A = rho^2 with rho ~ U(eps/sqrt2, eps):
    (its name, the parameter)."""
    eps = config.init_sigma
    rho = torch.empty(r, d_in).uniform_(eps / math.sqrt(2), eps)
    if config.sigma_param == "rho2":
        return "bara_A_rho", nn.Parameter(rho)
    return "bara_A_log_sigma", nn.Parameter(2.0 * torch.log(rho))


def sigma_of(free: torch.Tensor, config: FactorPosteriorConfig) -> torch.Tensor:
    """sigma_A from its free parameter: rho^2, or exp(log sigma)."""
    return free ** 2 if config.sigma_param == "rho2" else free.exp()


def kl_factors(mu: torch.Tensor, free: torch.Tensor, config: FactorPosteriorConfig) -> torch.Tensor:
    """KL(q(A) || N(0, prior_sigma^2)), summed over the layer's factors; log sigma from the free parameter, or
    log(sigma + 1e-6) for BLoB's rho as in its code."""
    sigma = sigma_of(free, config)
    if config.sigma_param == "rho2":  # BLoB's code: log(sigma + 1e-6) in the KL
        q = FactorNormal(mu, sigma, scale_eps=1e-6, validate_args=False)
    else:
        q = FactorNormal(mu, sigma, log_scale=free, validate_args=False)
    dtype = torch.promote_types(sigma.dtype, torch.float32)
    prior = Normal(torch.zeros((), dtype=dtype, device=sigma.device),
                   torch.tensor(config.prior_sigma, dtype=dtype, device=sigma.device), validate_args=False)
    return kl_divergence(q, prior).sum().float()


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


def flipout(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Flipout's perturbation of A x for ``x [N, T, d_in]``: one noise E = sigma_A * eps per pass, signs per
    instance (drawn in this order: eps, the input signs, the output signs)."""
    noise = sigma * torch.randn_like(sigma)
    sign_in = torch.randint(0, 2, (x.shape[0], 1, x.shape[-1]), device=x.device).to(x.dtype) * 2 - 1
    sign_out = torch.randint(0, 2, (x.shape[0], 1, sigma.shape[0]), device=x.device).to(x.dtype) * 2 - 1
    return Flipout.apply(x, sign_in, noise, sign_out)


# -- the layer -----------------------------------------------------------------------------------------------
class FactorLinear(nn.Module):
    r"""LoRA with the Gaussian posterior on A around a frozen ``nn.Linear`` (or transformers' ``Conv1D``, GPT-2's
    linear layer with its weight stored ``[in, out]``); every tensor it adds is named ``bara_*``.

    .. math:: h = W_0 x + \frac{\alpha}{r} B\,(z \odot A x), \qquad A x = \mu_A \tilde x + \text{flipout}, \qquad
              z = 1

    where :math:`\tilde x` is x after ``lora_dropout`` (training passes only). ``mode``: ``train`` (dropout and a
    flipout draw), ``sample`` (a flipout draw) or ``mean`` (A = mu_A: the one-pass prediction). A gated subclass
    returns its z from :meth:`factor_weights`."""

    # Whether A has its Gaussian posterior: here always; a subclass may read it from its config at every pass (BaRA's
    # point-estimate ablation, which benchmarks/experiments/mc_sources.py also switches on a trained model).
    bayes_factors = True

    def __init__(self, base: nn.Module, config: FactorPosteriorConfig):
        super().__init__()
        self.base, self.config = base, config
        # nn.Linear stores its weight [out, in], Conv1D [in, out].
        self.in_features, self.out_features = base.weight.shape[::-1] if isinstance(base, nn.Linear) \
            else base.weight.shape
        self.scaling = config.alpha / config.r  # fixed by the configured r, so pruning keeps the outputs
        r, d_in = config.r, self.in_features
        # Drawn in this order (A_mu, then sigma's parameter), which every saved run's numbers depend on.
        self.bara_A_mu = nn.Parameter(torch.empty(r, d_in))
        nn.init.kaiming_uniform_(self.bara_A_mu, a=math.sqrt(5))  # as peft's LoRA A
        if self.bayes_factors:
            setattr(self, *sigma_parameter(r, d_in, config))
            if config.kl_step == "ngvi":  # the curvature estimate needs the gradient before the trainer clips it
                self.sigma_free.register_post_accumulate_grad_hook(self._keep_sigma_grad)
        self.sigma_grad: torch.Tensor | None = None
        self.bara_B = nn.Parameter(torch.zeros(self.out_features, r))
        self.mode = "train"  # train: dropout and flipout; sample: flipout; mean: one pass with A = mu_A

    @property
    def rank(self) -> int:
        return self.bara_A_mu.shape[0]

    @property
    def sigma_name(self) -> str:
        """The name of sigma_A's free parameter: ``bara_A_rho`` (BLoB's rho) or ``bara_A_log_sigma``."""
        return "bara_A_rho" if self.config.sigma_param == "rho2" else "bara_A_log_sigma"

    @property
    def sigma_free(self) -> nn.Parameter:
        """The free parameter of sigma_A: log sigma, or BLoB's rho."""
        return getattr(self, self.sigma_name)

    @property
    def sigma_A(self) -> torch.Tensor:
        return sigma_of(self.sigma_free, self.config)

    def _keep_sigma_grad(self, param: torch.Tensor) -> None:
        self.sigma_grad = param.grad.detach().clone()

    def kl_A(self) -> torch.Tensor:
        """KL(q(A) || N(0, prior_sigma^2)), summed over the layer; 0 for a point estimate."""
        if not self.bayes_factors:
            return self.bara_A_mu.new_zeros((), dtype=torch.float32)
        return kl_factors(self.bara_A_mu, self.sigma_free, self.config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        squeeze = x.dim() == 2
        if squeeze:
            x = x.unsqueeze(1)
        x = x.to(self.bara_A_mu.dtype)  # a half-precision base: the adapter computes in its own dtype
        ax_mean = x @ self.bara_A_mu.t()
        if self.config.lora_dropout and self.mode == "train":  # as LoRA: dropout on the adapter's input
            x_drop = F.dropout(x, self.config.lora_dropout, training=True)
            ax = x_drop @ self.bara_A_mu.t()
        else:
            x_drop, ax = x, ax_mean
        if self.bayes_factors and self.mode != "mean":
            ax = ax + flipout(x_drop, self.sigma_A)
        z = self.factor_weights(x, ax_mean)
        if z is not None:
            ax = ax * (z.unsqueeze(1) if z.dim() == 2 else z).to(ax.dtype)
        delta = self.scaling * (ax @ self.bara_B.t())
        if squeeze:
            delta = delta.squeeze(1)
        return out + delta.to(out.dtype)

    def factor_weights(self, x: torch.Tensor, ax_mean: torch.Tensor) -> torch.Tensor | None:
        """z, ``[N, r]`` or ``[N, T, r]``, from the input ``x [N, T, d_in]`` (in the adapter's dtype) and mu_A x;
        None: z = 1, every factor on. Called after flipout's draws, so a gate draws after them."""
        return None

    @torch.no_grad()
    def keep_factors(self, index: torch.Tensor) -> None:
        """Keep only factors ``index`` (pruning, or shaping the layer to a pruned adapter before loading)."""
        self.bara_A_mu = cut(self.bara_A_mu, 0, index)
        self.bara_B = cut(self.bara_B, 1, index)
        if self.bayes_factors:
            setattr(self, self.sigma_name, cut(self.sigma_free, 0, index))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.rank}"


def cut(param: nn.Parameter, dim: int, index: torch.Tensor) -> nn.Parameter:
    """``param`` with only the rows (``dim`` 0) or columns (1) ``index``, trainable as before."""
    return nn.Parameter(param.data.index_select(dim, index).clone(), requires_grad=param.requires_grad)


# -- the KL step ---------------------------------------------------------------------------------------------
def sigma_in_adamw(config: FactorPosteriorConfig) -> bool:
    """Whether AdamW steps sigma_A's parameter (else only the SGD KL step does, as in BLoB's code)."""
    return config.kl_step == "loss" or config.sigma_optimizer == "adamw"


def linear_schedule(step: int, total: int, warmup_fraction: float) -> float:
    """Multiplier of the lr at (0-based) ``step``: linear warm-up over the first fraction, then linear decay to 0
    (transformers' get_linear_schedule_with_warmup)."""
    warmup = int(warmup_fraction * total)
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def blob_kl_weight(step: int, num_train: int, batch_size: int, gamma: float) -> float:
    """BLoB's KL weight at (1-based) ``step``: 2^i / (2^(M+1) - 1) with i cycling 1..M and
    M = int(100 N^(pi/gamma) / b) (Wang et al. 2024, their code); gamma = 0: 1/M with M = ceil(N / b)."""
    if gamma <= 0:
        return 1.0 / max(1, math.ceil(num_train / batch_size))
    m = max(1, int(100 * num_train ** (math.pi / gamma) / batch_size))
    i = (step - 1) % m + 1
    return 2.0 ** (i - m - 1) / (1 - 2.0 ** (-m - 1))  # = 2^i / (2^(M+1) - 1), without overflow


def kl_sgd_step(layers: list, config: FactorPosteriorConfig, progress: Progress) -> None:
    """BLoB's second optimiser: plain SGD at kl_lr (linear warm-up and decay) on w_t KL_A for mu_A and sigma_A's
    parameter, plus, for the latter, the data term's gradient from this step's backward pass (AdamW does not
    own it, so nothing else steps or clears it). With kl_step=ngvi, mu_A's part only (:func:`ngvi_sigma_step` sets
    sigma_A)."""
    c = config
    lr = c.kl_lr * linear_schedule(progress.step - 1, progress.total_steps, c.kl_warmup)
    weight = blob_kl_weight(progress.step, progress.num_train, progress.batch_size, c.kl_gamma)
    with_sigma = c.kl_step != "ngvi"
    params = [p for layer in layers
              for p in ((layer.bara_A_mu, layer.sigma_free) if with_sigma else (layer.bara_A_mu,))]
    with torch.enable_grad():
        kl = c.kl_scale * sum(layer.kl_A() for layer in layers)
        grads = torch.autograd.grad(kl, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.sub_(lr * weight * g.to(p.dtype))
        for layer in layers if c.sigma_optimizer == "sgd" and with_sigma else ():  # else AdamW steps and clears it
            sigma = layer.sigma_free
            if sigma.grad is not None:
                sigma.sub_(lr * sigma.grad)
                sigma.grad = None


@torch.no_grad()
def ngvi_sigma_step(layers: list, config: FactorPosteriorConfig, progress: Progress) -> None:
    """kl_step=ngvi: sigma_A set to Gaussian VI's fixed point given the curvature so far, 1/sigma^2 = 1/prior_sigma^2
    + N h / kl_scale, h the bias-corrected running mean of this step's estimate g E / sigma^2 (g the unclipped
    gradient of the mean NLL in log sigma, the layer's ``sigma_grad``), floored at 0. The running mean is read back
    from sigma_A itself (h = kl_scale (1/sigma^2 - 1/prior_sigma^2) / N), so it needs no state of its own and a
    resumed run continues it. Hand-written: torch has no VI optimiser, and IVON's own (PyPI's ``ivon-opt``) would
    also take over mu_A, which AdamW steps here."""
    c, n, t = config, progress.num_train, progress.step
    decay, prior_precision = c.curvature_decay, 1.0 / c.prior_sigma ** 2
    for layer in layers:
        grad, layer.sigma_grad = layer.sigma_grad, None
        log_sigma = layer.bara_A_log_sigma
        log_sigma.grad = None  # consumed here: AdamW does not own it
        if grad is None:
            continue
        precision = torch.exp(-2.0 * log_sigma.double())
        h_hat = grad.double() * precision
        running = c.kl_scale * (precision - prior_precision).clamp_min(0) / n * (1 - decay ** (t - 1))
        h = ((decay * running + (1 - decay) * h_hat) / (1 - decay ** t)).clamp_min(0)
        log_sigma.copy_((-0.5 * torch.log(prior_precision + n * h / c.kl_scale)).to(log_sigma.dtype))


@torch.no_grad()
def clamp_sigma(layers: list, config: FactorPosteriorConfig) -> None:
    """sigma_A bounded by ``max_sigma`` (after every step; 0 = no bound)."""
    if config.max_sigma <= 0:
        return
    for layer in layers:
        if config.sigma_param == "rho2":
            bound = math.sqrt(config.max_sigma)  # sigma_A = rho^2
            layer.bara_A_rho.clamp_(-bound, bound)
        else:
            layer.bara_A_log_sigma.clamp_(max=math.log(config.max_sigma))

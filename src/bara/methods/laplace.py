r"""Laplace-LoRA (Yang et al., 2024): a post-hoc Laplace approximation over the LoRA parameters.

Training is plain LoRA. Afterwards the trainable parameters θ (the LoRA factors A and B of every adapted
layer, and an encoder's classification head; P numbers in all) get a Gaussian posterior around the trained
θ*, with a prior N(0, δ⁻¹ I):

.. math:: p(θ \mid D) ≈ N(θ^*, Σ), \qquad Σ^{-1} = \mathrm{GGN} + δ I, \qquad
          \mathrm{GGN} = \sum_n J_n^\top Λ_n J_n, \quad Λ_n = \mathrm{diag}(p_n) - p_n p_n^\top,

J_n = ∂f(x_n)/∂θ (C × P) the Jacobian of the class logits, p_n = softmax f(x_n; θ*). The GGN is
block-diagonal over the adapted ``nn.Linear`` modules (a layer's weight W, d_out × d_in, with its bias as
an extra input column when the bias is trained).

**Curvature** (``hessian_structure``). Λ = Σ_c p_c (e_c − p)(e_c − p)ᵀ exactly, so class c contributes
the backward pass of the vector √p_c (p − e_c) (``ggn=exact``: C backward passes per batch), or one label
y ~ Cat(p) contributes p − e_y (``ggn=sampled``: one pass, unbiased). With g_nt the back-propagated
gradient at the layer's output and x_nt its input, for token t of instance n (padding masked out):

- ``kron`` (K-FAC): GGN_l ≈ G_l ⊗ A_l (W flattened row-major). Tokens share the layer, and
  ``kfac_approx`` says how (Eschenhagen et al., 2023):
  expand: A = (1/M) Σ_nt x xᵀ, G = Σ_nt g gᵀ (each of the M real tokens a sample, as Laplace-LoRA's
  K-FAC); reduce: A = (1/N) Σ_n x̄_n x̄_nᵀ (x̄ the token mean), G = Σ_n (Σ_t g_nt)(Σ_t g_nt)ᵀ.
  Both are exact for one instance of one token; reduce also for one sequence when the layer's output
  reaches the logits through a mean over tokens.
- ``diag``: the exact diagonal of the GGN, Σ_n Σ_c (Σ_t g_ntc x_ntᵀ)² elementwise.

When only ``n_fit`` of the N training instances are used, the GGN and the log-likelihood are scaled by
N / n_fit.

**Prior precision** (``prior_precision = 0``, ``prior_fit=marglik``): δ maximises the Laplace approximation of the
evidence,

.. math:: \log p(D \mid δ) ≈ \log p(D \mid θ^*) - \tfrac{δ}{2}\lVert θ^* \rVert^2 + \tfrac{P}{2}\log δ
          - \tfrac12 \log\det(\mathrm{GGN} + δ I),

on a grid of log δ (1e-4 … 1e6), refined by golden-section search around the best grid point. With
K-FAC, log det = Σ_l Σ_ij log(g_i a_j + δ) over the eigenvalues a of A_l and g of G_l. ``prior_fit=val`` (the
default) instead takes the δ of that grid whose probit predictive has the lowest NLL on validation instances (the
per-class Jacobians are computed once and reused for every δ).

**Predictive** (the linearised model, GLM): f(x; θ) ≈ f(x; θ*) + J(x)(θ − θ*), so the logits are
Gaussian, N(f(x; θ*), Σ_f), with, in the eigenbases Q_A, Q_G of each layer's factors,

.. math:: (Σ_f)_{cc'} = \sum_l \sum_{ij} \frac{(Q_G^\top J_l^c Q_A)_{ij}\,(Q_G^\top J_l^{c'} Q_A)_{ij}}
          {g_i a_j + δ}.

J costs one backward pass per class (per test batch). Probabilities: ``samples = 0`` is the probit
approximation softmax(f / √(1 + π/8 diag Σ_f)); ``samples = S > 0`` averages softmax over S logit samples
from N(f, Σ_f). ``link_approx`` picks the default: probit (S = 0) or mc (S = 10). With many classes
(``jacobians=draws``, the default above 10 classes) the linearised model is sampled instead: θ − θ* is drawn
from the posterior (in each layer's eigenbasis) and J(θ − θ*) comes from one forward-mode JVP per draw,
so the cost is S (10 for probit, whose diag Σ_f is then estimated from the draws) JVPs, whatever C.

**Cost.** Fitting: one forward and C (exact) or 1 (sampled) backward passes per training batch. Prediction:
one forward and C backward passes per batch, whatever S (``jacobians=classes``), or S JVPs (``draws``).
Storage: with K-FAC, d_in² + r² floats for each lora_A and r² + d_out² for each lora_B (float32: ~14 MB
for MiniLM q,v, ~125 MB for SmolLM2-135M q,v, against ~0.3 and ~1.8 MB of adapter).

The fitted posterior is saved with the adapter as safetensors, every tensor named ``laplace_*``:
``laplace_A.<layer>`` and ``laplace_G.<layer>`` (kron) or ``laplace_H.<layer>`` (diag), and the scalars
``laplace_prior_precision``, ``laplace_log_likelihood``, ``laplace_n_data``, ``laplace_n_fit``.
Until it is fitted (validation during training) the method predicts like LoRA, from θ*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import BaraError
from ..heads import Classifier
from .base import Choices, option, seeds_of, to_device
from .lora import Lora, LoraConfig

PREFIX = "laplace_"
MC_SAMPLES = 10  # default samples with link_approx=mc
EXACT_GGN_MAX_CLASSES = 10  # ggn=auto: the exact per-class expansion up to this many classes
PRIOR_GRID = (1e-4, 1e6, 101)  # log-spaced grid for the prior precision: low, high, points
JACOBIAN_BUDGET = 2 ** 26  # numbers (256 MB in float32) of per-class Jacobians held at once in prediction


class PriorFit(Choices):
    """``prior_fit``: how the prior precision delta is fitted when ``prior_precision = 0``."""

    MARGLIK = "marglik"
    """Maximise the Laplace marginal likelihood (as Laplace-LoRA)."""
    VAL = "val"
    """The lowest probit NLL on the validation split over a log grid (as laplace-torch's gridsearch)."""


class HessianStructure(Choices):
    """``hessian_structure``: the structure of the curvature (the GGN) of each adapted layer."""

    KRON = "kron"
    """Kronecker-factored (K-FAC)."""
    DIAG = "diag"
    """Diagonal."""


class KfacApprox(Choices):
    """``kfac_approx``: how K-FAC treats the tokens that share a layer's weights."""

    EXPAND = "expand"
    """Each token a sample (as Laplace-LoRA)."""
    REDUCE = "reduce"
    """Token-mean inputs, token-summed gradients."""


class Ggn(Choices):
    """``ggn``: how the softmax GGN of the curvature is formed."""

    AUTO = "auto"
    """Exact up to ``EXACT_GGN_MAX_CLASSES`` classes, sampled above."""
    EXACT = "exact"
    """One backward pass per class."""
    SAMPLED = "sampled"
    """One label drawn per instance (one backward pass)."""


class LinkApprox(Choices):
    """``link_approx``: how the linearised predictive is turned into class probabilities."""

    PROBIT = "probit"
    """The probit approximation (default samples 0)."""
    MC = "mc"
    """The mean softmax of logits sampled from the linearised predictive (default samples ``MC_SAMPLES``)."""


class Jacobians(Choices):
    """``jacobians``: how the linearised predictive gets its logit covariance."""

    AUTO = "auto"
    """classes up to ``EXACT_GGN_MAX_CLASSES`` classes, draws above."""
    CLASSES = "classes"
    """One backward pass per class: exact, its cost grows with the classes."""
    DRAWS = "draws"
    """One forward-mode JVP per posterior draw: its cost is independent of the classes."""


@dataclass
class LaplaceConfig(LoraConfig):
    prior_precision: float = option(0.0, "Laplace prior precision delta of N(0, 1/delta) on the adapter; "
                                         "0 = fit delta as prior_fit says")
    # val by default: the marginal likelihood left the predictive badly under-confident on banking77 (validation
    # ECE 64.9 %, docs/experiments.md section 3), so every benchmark preset has fitted delta on validation since.
    prior_fit: str = option("val", "how delta is fitted when prior_precision = 0: val (the lowest probit NLL on the "
                                   "validation split over a log grid, as laplace-torch's gridsearch) | marglik "
                                   "(maximise the Laplace marginal likelihood, as Laplace-LoRA)", PriorFit)
    prior_fit_max: int = option(512, "validation instances for prior_fit=val, from batches spread over the split "
                                     "(each costs one backward pass per class)")
    hessian_structure: str = option("kron", "Laplace curvature: kron (Kronecker-factored GGN, K-FAC) | diag "
                                            "(diagonal GGN)", HessianStructure)
    kfac_approx: str = option("expand", "how K-FAC treats tokens sharing a layer: expand (each token a sample, "
                                        "as Laplace-LoRA) | reduce (token-mean inputs, token-summed gradients)",
                               KfacApprox)
    ggn: str = option("auto", "softmax GGN for the Laplace curvature: exact (one backward pass per class) | "
                              f"sampled (one label drawn per instance) | auto (exact up to "
                              f"{EXACT_GGN_MAX_CLASSES} classes)", Ggn)
    n_fit: int = option(0, "training instances used for the Laplace curvature, from batches spread over the "
                           "training split (0 = all); the curvature is rescaled to the full split")
    link_approx: str = option("probit", f"Laplace predictive: probit (default samples 0) | mc (default samples "
                                        f"{MC_SAMPLES}, logits sampled from the linearised predictive)", LinkApprox)
    jacobians: str = option("auto", "how the linearised predictive gets its logit covariance: classes (one "
                                    "backward pass per class: exact, cost grows with the classes) | draws (one "
                                    f"forward-mode JVP per posterior draw, {MC_SAMPLES} draws for probit: cost "
                                    f"independent of the classes) | auto (classes up to {EXACT_GGN_MAX_CLASSES} "
                                    "classes)", Jacobians)

    def validate(self) -> None:
        super().validate()
        if self.prior_precision < 0 or not math.isfinite(self.prior_precision):
            raise BaraError(f"prior_precision must be >= 0 (0 = fit it), got {self.prior_precision}; "
                            "fix: pass --prior-precision 0")
        if self.prior_fit_max < 1:
            raise BaraError(f"prior_fit_max must be >= 1, got {self.prior_fit_max}")
        if self.n_fit < 0:
            raise BaraError(f"n_fit must be >= 0 (0 = all training instances), got {self.n_fit}")


# -- the layers and what flows through them ---------------------------------------------------------------
def adapted_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules with a trainable weight, by name; every trainable parameter must be one's
    weight or bias, since the posterior covers exactly these."""
    layers, covered = {}, set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.weight.requires_grad:
            layers[name] = module
            covered.add(id(module.weight))
            if module.bias is not None and module.bias.requires_grad:
                covered.add(id(module.bias))
    stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
    if stray or not layers:
        found = f"{stray[:3]} are trainable outside them" if stray else "the model has none"
        raise BaraError(f"Laplace covers the weights (and biases) of trainable linear layers, but {found}; fix: "
                        "adapt linear layers only (LoRA target_modules)")
    return layers


def has_bias(layer: nn.Linear) -> bool:
    return layer.bias is not None and layer.bias.requires_grad


def layer_params(layer: nn.Linear) -> torch.Tensor:
    """[W | b]: the layer's trainable parameters as one d_out × d_in' matrix."""
    w = layer.weight.detach()
    return torch.cat([w, layer.bias.detach()[:, None]], 1) if has_bias(layer) else w


class LayerTaps:
    """Forward hooks recording, for one forward pass, each layer's input (detached) and output (in the graph)."""

    def __init__(self, layers: dict[str, nn.Linear]):
        self.layers = layers
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}

    def _hook(self, name: str):
        def record(module, args, output):
            if name in self.outputs:
                raise BaraError(f"layer {name} ran twice in one forward pass; Laplace needs each adapted "
                                "layer applied once")
            self.inputs[name], self.outputs[name] = args[0].detach(), output
        return record

    def __enter__(self) -> "LayerTaps":
        self.handles = [layer.register_forward_hook(self._hook(name)) for name, layer in self.layers.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def tokens(t: torch.Tensor, mask: torch.Tensor | None, dtype) -> torch.Tensor:
    """``[B, T, d]`` with padding zeroed; an input without a token axis gets T = 1."""
    t = t.to(dtype)
    if t.dim() == 2:
        return t[:, None]
    t = t.reshape(t.shape[0], -1, t.shape[-1])
    if mask is not None and mask.shape == t.shape[:2]:
        t = t * mask[..., None].to(dtype)
    return t


def token_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, T]`` real-token indicator matching ``tokens(x)``."""
    if mask is not None and mask.shape == x.shape[:2]:
        return mask.to(x.dtype)
    return torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)


def layer_inputs(x: torch.Tensor, layer: nn.Linear, mask: torch.Tensor | None, dtype) -> torch.Tensor:
    """The layer's inputs as tokens, with a column of ones (zero at padding) when its bias is trained."""
    x = tokens(x, mask, dtype)
    return torch.cat([x, token_mask(x, mask)[..., None]], -1) if has_bias(layer) else x


def ggn_vectors(probs: torch.Tensor, exact: bool) -> list[torch.Tensor]:
    """Vectors v with E[Σ v vᵀ] = diag(p) − p pᵀ per row: √p_c (p − e_c) for every class c, or p − e_y for
    one label y ~ Cat(p)."""
    eye = torch.eye(probs.shape[-1], dtype=probs.dtype, device=probs.device)
    if exact:
        return [probs[:, c:c + 1].sqrt() * (probs - eye[c]) for c in range(probs.shape[-1])]
    return [probs - eye[torch.multinomial(probs, 1)[:, 0]]]


# -- curvature ----------------------------------------------------------------------------------------------
class LayerFactors:
    """A layer's curvature, diagonal in some basis: ``eigenvalues`` [d_out, d_in] (float64, on the CPU, where
    the evidence is computed) and the rotations into that basis of the layer's inputs and output gradients."""

    structure: str
    eigenvalues: torch.Tensor

    def like(self, name: str, t: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """``t`` in ``other``'s dtype and device, converted once per dtype and device."""
        cache = self.__dict__.setdefault("_cast", {})
        key = (name, other.dtype, other.device)
        if key not in cache:
            cache[key] = t.to(other)
        return cache[key]

    def posterior_scale(self, delta: float, like: torch.Tensor) -> torch.Tensor:
        """1 / sqrt(eigenvalue + δ): the posterior standard deviations in the layer's basis."""
        return (self.eigenvalues + delta).rsqrt().to(like)

    def sample(self, delta: float, like: torch.Tensor) -> torch.Tensor:
        """θ − θ* ~ N(0, (GGN_l + δ I)⁻¹) for this layer's [W | b], in ``like``'s dtype and device."""
        scale = self.posterior_scale(delta, like)
        return self.from_basis(torch.randn(scale.shape, dtype=like.dtype, device=like.device) * scale)


class KronFactors(LayerFactors):
    """One layer's K-FAC curvature G ⊗ A; in the eigenbases Q_A, Q_G its eigenvalues are g_i a_j."""

    structure = "kron"

    def __init__(self, A: torch.Tensor, G: torch.Tensor):
        self.A, self.G = A, G
        a, self.q_in = torch.linalg.eigh(A.detach().double().cpu())
        g, self.q_out = torch.linalg.eigh(G.detach().double().cpu())
        self.eigenvalues = torch.outer(g.clamp(min=0), a.clamp(min=0))  # [d_out, d_in]: of G ⊗ A

    def rotate_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.like("q_in", self.q_in, x)

    def rotate_grads(self, g: torch.Tensor) -> torch.Tensor:
        return g @ self.like("q_out", self.q_out, g)

    def from_basis(self, w: torch.Tensor) -> torch.Tensor:
        return self.like("q_out", self.q_out, w) @ w @ self.like("q_in", self.q_in, w).t()

    def state(self, name: str) -> dict[str, torch.Tensor]:
        return {f"{PREFIX}A.{name}": self.A, f"{PREFIX}G.{name}": self.G}

    @classmethod
    def from_state(cls, state: dict, name: str) -> "KronFactors":
        return cls(state[f"{PREFIX}A.{name}"], state[f"{PREFIX}G.{name}"])

    def shape(self) -> tuple[int, int]:
        return self.G.shape[0], self.A.shape[0]


class DiagFactors(LayerFactors):
    """One layer's diagonal GGN H (d_out × d_in); the eigenbasis is the parameters themselves."""

    structure = "diag"

    def __init__(self, H: torch.Tensor):
        self.H = H
        self.eigenvalues = H.detach().double().cpu().clamp(min=0)

    def rotate_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def rotate_grads(self, g: torch.Tensor) -> torch.Tensor:
        return g

    def from_basis(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def state(self, name: str) -> dict[str, torch.Tensor]:
        return {f"{PREFIX}H.{name}": self.H}

    @classmethod
    def from_state(cls, state: dict, name: str) -> "DiagFactors":
        return cls(state[f"{PREFIX}H.{name}"])

    def shape(self) -> tuple[int, int]:
        return tuple(self.H.shape)


FACTORS = {"kron": KronFactors, "diag": DiagFactors}


class KronAccumulator:
    def __init__(self, approx: str):
        self.approx, self.A, self.G, self.count = approx, 0.0, 0.0, 0.0

    def add_inputs(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        if self.approx == "reduce":
            mean = x.sum(1) / mask.sum(1).clamp(min=1)[:, None]
            self.A = self.A + mean.T @ mean
            self.count += x.shape[0]
        else:
            flat = x.reshape(-1, x.shape[-1])
            self.A = self.A + flat.T @ flat
            self.count += mask.sum().item()

    def add_grads(self, x: torch.Tensor, g: torch.Tensor) -> None:
        flat = g.sum(1) if self.approx == "reduce" else g.reshape(-1, g.shape[-1])
        self.G = self.G + flat.T @ flat

    def result(self, scale: float, dtype: torch.dtype) -> KronFactors:
        return KronFactors((self.A / max(self.count, 1)).to(dtype), (self.G * scale).to(dtype))


class DiagAccumulator:
    def __init__(self, approx: str):
        self.H = 0.0

    def add_inputs(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        pass

    def add_grads(self, x: torch.Tensor, g: torch.Tensor) -> None:
        per_instance = torch.einsum("bto,bti->boi", g, x)  # each instance's gradient of W
        self.H = self.H + per_instance.pow(2).sum(0)

    def result(self, scale: float, dtype: torch.dtype) -> DiagFactors:
        return DiagFactors((self.H * scale).to(dtype))


ACCUMULATORS = {"kron": KronAccumulator, "diag": DiagAccumulator}


def accumulation_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


@dataclass
class LaplacePosterior:
    """N(θ*, (GGN + δ I)⁻¹) over the layers' parameters, with what the evidence needs."""

    layers: dict[str, LayerFactors]
    log_likelihood: float  # log p(D | θ*), scaled to n_data
    n_data: int
    n_fit: int
    theta_sq: float = 0.0  # ‖θ*‖²
    num_params: int = 0
    prior_precision: float = 1.0

    def bind(self, modules: dict[str, nn.Linear]) -> "LaplacePosterior":
        """Check the factors against the model's layers and read θ* from them."""
        if set(modules) != set(self.layers):
            missing, extra = sorted(set(modules) - set(self.layers)), sorted(set(self.layers) - set(modules))
            raise BaraError(f"the Laplace posterior does not match the adapted layers (missing {missing[:3]}, "
                            f"unexpected {extra[:3]}); fix: load it with the model and method it was fitted on")
        self.theta_sq, self.num_params = 0.0, 0
        for name, module in modules.items():
            theta = layer_params(module)
            if tuple(theta.shape) != tuple(self.layers[name].shape()):
                raise BaraError(f"the Laplace factors of {name} fit shape {self.layers[name].shape()}, the layer "
                                f"has {tuple(theta.shape)}; fix: use the same base model and rank")
            self.theta_sq += theta.double().pow(2).sum().item()
            self.num_params += theta.numel()
        return self

    def log_marginal_likelihood(self, prior_precision: float | None = None) -> float:
        delta = self.prior_precision if prior_precision is None else float(prior_precision)
        log_det = sum(torch.log(f.eigenvalues + delta).sum().item() for f in self.layers.values())
        return (self.log_likelihood - 0.5 * delta * self.theta_sq + 0.5 * self.num_params * math.log(delta)
                - 0.5 * log_det)

    def optimize_prior_precision(self, low: float = PRIOR_GRID[0], high: float = PRIOR_GRID[1],
                                 points: int = PRIOR_GRID[2], refine_steps: int = 40) -> float:
        """Set δ to the maximiser of the evidence: the best of a log grid, refined by golden-section search
        between its grid neighbours (in log δ)."""
        grid = torch.logspace(math.log10(low), math.log10(high), points, dtype=torch.float64).log().tolist()
        f = lambda log_delta: self.log_marginal_likelihood(math.exp(log_delta))  # noqa: E731
        values = [f(t) for t in grid]
        best = max(range(points), key=values.__getitem__)
        lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, points - 1)]
        ratio = (math.sqrt(5) - 1) / 2
        c, d = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        fc, fd = f(c), f(d)
        for _ in range(refine_steps):
            if fc >= fd:
                hi, d, fd = d, c, fc
                c = hi - ratio * (hi - lo)
                fc = f(c)
            else:
                lo, c, fc = c, d, fd
                d = lo + ratio * (hi - lo)
                fd = f(d)
        candidates = [(values[best], grid[best]), (fc, c), (fd, d)]
        self.prior_precision = math.exp(max(candidates)[1])
        return self.prior_precision

    def state(self) -> dict[str, torch.Tensor]:
        state = {}
        for name, factors in self.layers.items():
            state.update({k: v.detach().contiguous() for k, v in factors.state(name).items()})
        scalars = {"prior_precision": self.prior_precision, "log_likelihood": self.log_likelihood,
                   "n_data": self.n_data, "n_fit": self.n_fit}
        state.update({f"{PREFIX}{k}": torch.tensor(float(v), dtype=torch.float64) for k, v in scalars.items()})
        return state

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], modules: dict[str, nn.Linear],
                   structure: str) -> "LaplacePosterior":
        factors = FACTORS[structure]
        try:
            layers = {name: factors.from_state(state, name) for name in modules}
            scalars = {k: state[f"{PREFIX}{k}"].item() for k in ("prior_precision", "log_likelihood", "n_data",
                                                                 "n_fit")}
        except KeyError as err:
            raise BaraError(f"the adapter's Laplace posterior lacks {err} (hessian_structure={structure}); fix: "
                            "re-run 'bara train --method laplace'") from None
        posterior = cls(layers, scalars["log_likelihood"], int(scalars["n_data"]), int(scalars["n_fit"]),
                        prior_precision=scalars["prior_precision"])
        return posterior.bind(modules)


@torch.enable_grad()
def fit_posterior(forward: Callable[[dict], torch.Tensor], modules: dict[str, nn.Linear], batches: Iterable[dict],
                  structure: str = "kron", kfac_approx: str = "expand", exact: bool = True,
                  n_data: int | None = None) -> LaplacePosterior:
    """The GGN curvature of the summed NLL over ``batches`` (dicts with ``labels`` and, for token inputs, an
    optional ``attention_mask``), scaled to ``n_data`` instances, as a posterior with δ = 1."""
    accumulators = {name: ACCUMULATORS[structure](kfac_approx) for name in modules}
    names = list(modules)
    log_likelihood, n_used = 0.0, 0
    for batch in batches:
        mask = batch.get("attention_mask")
        with LayerTaps(modules) as taps:
            logits = forward(batch)
        dtype = accumulation_dtype(logits.device)
        missing = [n for n in names if n not in taps.outputs]
        if missing:
            raise BaraError(f"adapted layers {missing[:3]} did not run in the forward pass; Laplace needs every "
                            "trainable layer on the path to the logits")
        probs = torch.softmax(logits.detach().to(dtype), -1)
        labels = batch["labels"].to(logits.device)
        log_likelihood -= F.cross_entropy(logits.detach().to(dtype), labels, reduction="sum").item()
        n_used += logits.shape[0]
        xs = {n: layer_inputs(taps.inputs[n], modules[n], mask, dtype) for n in names}
        for n in names:
            accumulators[n].add_inputs(xs[n], token_mask(xs[n], mask))
        vectors = ggn_vectors(probs, exact)
        outputs = [taps.outputs[n] for n in names]
        for i, v in enumerate(vectors):
            grads = torch.autograd.grad(logits, outputs, grad_outputs=v.to(logits.dtype),
                                        retain_graph=i < len(vectors) - 1, allow_unused=True)
            for n, g in zip(names, grads):
                if g is not None:
                    accumulators[n].add_grads(xs[n], tokens(g, mask, dtype))
    if n_used == 0:
        raise BaraError("Laplace needs training instances to fit its curvature, got none; fix: give the task a "
                        "training split")
    scale = (n_data or n_used) / n_used
    # Stored in the model's precision (float32 unless it is float64), and used as stored, so that a reloaded
    # posterior predicts exactly as the fitted one.
    stored = torch.float64 if logits.dtype == torch.float64 else torch.float32
    layers = {n: accumulators[n].result(scale, stored) for n in names}
    return LaplacePosterior(layers, log_likelihood * scale, n_data or n_used, n_used).bind(modules)


@torch.enable_grad()
def glm_logits(forward: Callable[[dict], torch.Tensor], modules: dict[str, nn.Linear], posterior: LaplacePosterior,
               batch: dict, num_classes: int, budget: int = JACOBIAN_BUDGET) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[B, C]`` and covariance ``[B, C, C]`` of the linearised model's logits: f(x; θ*) and J Σ Jᵀ.
    Instances go in chunks so that the per-class Jacobians held at once (C × P numbers per instance) stay
    within ``budget`` numbers."""
    size = next(v for v in batch.values() if torch.is_tensor(v)).shape[0]
    chunk = jacobian_chunk(posterior, num_classes, budget)
    means, covariances = [], []
    for start in range(0, size, chunk):
        part = {k: v[start:start + chunk] if torch.is_tensor(v) else v for k, v in batch.items()}
        mean, covariance = _glm_chunk(forward, modules, posterior, part)
        means.append(mean)
        covariances.append(covariance)
    return torch.cat(means), torch.cat(covariances)


def jacobian_chunk(posterior: LaplacePosterior, num_classes: int, budget: int) -> int:
    """Instances per pass so that their per-class Jacobians (C × P numbers each) stay within ``budget``."""
    return max(1, budget // (max(posterior.num_params, 1) * num_classes))


def _glm_chunk(forward, modules, posterior, batch):
    logits, jacobians = rotated_jacobians(forward, modules, posterior, batch)
    delta = posterior.prior_precision
    covariance = logits.new_zeros(logits.shape[0], logits.shape[1], logits.shape[1])
    for n, jacobian in jacobians.items():
        scaled = (jacobian * posterior.layers[n].posterior_scale(delta, jacobian)).flatten(2)
        covariance += scaled @ scaled.transpose(1, 2)
    return logits, covariance


def rotated_jacobians(forward, modules, posterior, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The logits ``[B, C]`` and, per layer, the Jacobian of every class logit with respect to the layer's
    [W | b] in the posterior's eigenbasis, ``[B, C, d_out, d_in']``: one backward pass per class."""
    mask = batch.get("attention_mask")
    names = list(modules)
    with LayerTaps(modules) as taps:
        logits = forward(batch)
    num_classes = logits.shape[-1]
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    xs, jacobians = {}, {}
    for n in names:
        x = layer_inputs(taps.inputs[n], modules[n], mask, dtype)
        xs[n] = posterior.layers[n].rotate_inputs(x)
        d_out, d_in = posterior.layers[n].shape()
        jacobians[n] = torch.zeros(logits.shape[0], num_classes, d_out, d_in, dtype=dtype, device=logits.device)
    outputs = [taps.outputs[n] for n in names]
    for c in range(num_classes):
        v = torch.zeros_like(logits)
        v[:, c] = 1
        grads = torch.autograd.grad(logits, outputs, grad_outputs=v, retain_graph=c < num_classes - 1,
                                    allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                g = posterior.layers[n].rotate_grads(tokens(g, mask, dtype))
                jacobians[n][:, c] = torch.einsum("bto,bti->boi", g, xs[n])
    return logits.detach().to(dtype), jacobians


@torch.enable_grad()
def validation_prior_precision(forward: Callable[[dict], torch.Tensor], modules: dict[str, nn.Linear],
                               posterior: LaplacePosterior, batches: Iterable[dict], num_classes: int, limit: int,
                               grid: tuple = PRIOR_GRID, budget: int = JACOBIAN_BUDGET) -> tuple[float, list]:
    """The δ of a log grid whose probit predictive has the lowest NLL on (at most ``limit``) validation
    instances (laplace-torch's ``gridsearch``). The per-class Jacobians are computed once; every δ reuses
    them. Returns δ and the (δ, NLL) curve."""
    low, high, points = grid
    deltas = torch.logspace(math.log10(low), math.log10(high), points, dtype=torch.float64)
    total, used = torch.zeros(points, dtype=torch.float64), 0
    for batch in batches:
        if used >= limit:
            break
        size = min(len(batch["labels"]), limit - used)
        chunk = jacobian_chunk(posterior, num_classes, budget)
        for start in range(0, size, chunk):
            part = {k: v[start:min(start + chunk, size)] if torch.is_tensor(v) else v for k, v in batch.items()}
            mean, jacobians = rotated_jacobians(forward, modules, posterior, part)
            variance = 0.0  # [B, C, K]: diag Σ_f for every δ of the grid
            for n, jacobian in jacobians.items():
                inverse = 1 / (posterior.layers[n].eigenvalues.flatten()[:, None] + deltas[None])  # [P_l, K]
                variance = variance + jacobian.flatten(2).pow(2) @ inverse.to(jacobian)
            kappa = (1 + math.pi / 8 * variance).rsqrt()
            log_probs = torch.log_softmax(mean[..., None] * kappa, 1)  # [B, C, K]
            labels = part["labels"].to(log_probs.device)
            total -= log_probs.gather(1, labels[:, None, None].expand(-1, 1, points))[:, 0].sum(0).double().cpu()
        used += size
    if used == 0:
        raise BaraError("prior_fit=val needs validation instances, got none; fix: give the task a validation "
                        "split or pass --prior-fit marglik")
    nll = (total / used).tolist()
    best = min(range(points), key=nll.__getitem__)
    return deltas[best].item(), list(zip(deltas.tolist(), nll))


@torch.no_grad()
def glm_logit_draws(root: nn.Module, inputs: tuple, modules: dict[str, nn.Linear], posterior: LaplacePosterior,
                    samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[B, C]`` of the logits and ``samples`` draws ``[S, B, C]`` of J(x)(θ − θ*), θ ~ the posterior:
    the linearised model's logit noise, one forward-mode JVP per draw, so the cost does not grow with the
    number of classes (glm_logits needs a backward pass per class). ``root(*inputs)`` gives the logits and
    ``modules`` are named as in ``root``."""
    keys, primals = [], []
    for name, module in modules.items():
        keys.append(f"{name}.weight")
        primals.append(module.weight.detach())
        if has_bias(module):
            keys.append(f"{name}.bias")
            primals.append(module.bias.detach())

    def logits(*params):
        return functional_call(root, dict(zip(keys, params)), inputs)

    draws, mean = [], None
    # Forward-mode AD has no rule for the fused attention kernels; the math kernel computes the same function.
    with sdpa_kernel(SDPBackend.MATH):
        for _ in range(samples):
            tangents = []
            for name, module in modules.items():
                eps = posterior.layers[name].sample(posterior.prior_precision, module.weight.detach())
                tangents += [eps[:, :-1], eps[:, -1]] if has_bias(module) else [eps]
            mean, draw = jvp(logits, tuple(primals), tuple(tangents))
            draws.append(draw)
    return mean, torch.stack(draws)


def sampled_predictive_probs(mean: torch.Tensor, draws: torch.Tensor, samples: int) -> torch.Tensor:
    """``[max(samples, 1), B, C]`` from logit-noise draws ``[S, B, C]``: the probit approximation with the
    per-class variances estimated from the draws (samples = 0), or the softmax of each mean + draw."""
    if samples == 0:
        kappa = (1 + math.pi / 8 * draws.pow(2).mean(0)).rsqrt()
        return torch.softmax(mean * kappa, -1).float()[None]
    return torch.softmax(mean + draws, -1).float()


def predictive_probs(mean: torch.Tensor, covariance: torch.Tensor, samples: int) -> torch.Tensor:
    """``[max(samples, 1), B, C]``: the probit approximation (samples = 0) or the mean softmax of logit samples
    from N(mean, covariance)."""
    if samples == 0:
        kappa = (1 + math.pi / 8 * covariance.diagonal(dim1=-2, dim2=-1)).rsqrt()
        return torch.softmax(mean * kappa, -1).float()[None]
    eigenvalues, vectors = torch.linalg.eigh(covariance)
    root = vectors * eigenvalues.clamp(min=0).sqrt()[:, None, :]  # root rootᵀ = covariance
    noise = torch.randn(samples, *mean.shape, dtype=mean.dtype, device=mean.device)
    logits = mean + torch.einsum("bcd,sbd->sbc", root, noise)
    return torch.softmax(logits, -1).float()


# -- the method ---------------------------------------------------------------------------------------------
def spread_batches(loader, n_fit: int) -> Iterable[dict]:
    """The first ``n_fit`` instances of batches spread evenly over ``loader`` (all of them when n_fit = 0)."""
    total = len(loader) if hasattr(loader, "__len__") else None
    batch_size = getattr(loader, "batch_size", None)
    if not n_fit or total is None or not batch_size:
        keep = None
    else:
        wanted = min(total, math.ceil(n_fit / batch_size))
        keep = {round(i * total / wanted) for i in range(wanted)}
    used = 0
    for i, batch in enumerate(loader):
        if n_fit and used >= n_fit:
            return
        if keep is not None and i not in keep:
            continue
        if n_fit:
            batch = {k: v[:n_fit - used] if torch.is_tensor(v) else v for k, v in batch.items()}
        used += len(batch["labels"])
        yield batch


def dataset_size(loader) -> int | None:
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None


class Laplace(Lora):
    """LoRA, then a Laplace posterior over the adapter fitted after training (Laplace-LoRA)."""

    name = "laplace"
    # LoRA's rate, which standard gives this post-hoc step on a LoRA fit (5e-3 on every intent set):
    # benchmarks/results/standard/results.md, each intent set's "Learning rates ... chosen on the validation split".
    # On causal LMs LoRA's 3e-3, which multiple-choice gives it on all three sets
    # (benchmarks/results/multiple-choice/results.md).
    default_lr = {"encoder": 5e-3, "causal": 3e-3}
    config_class = LaplaceConfig
    trains_as = "lora"  # the LoRA fit trains as `lora` does, then the post-hoc step

    def __init__(self, config: LaplaceConfig | None = None):
        super().__init__(config)
        self.posterior: LaplacePosterior | None = None
        self.default_samples = 0 if self.config.link_approx == "probit" else MC_SAMPLES

    fit_note = (f"Laplace's prior precision: at the top of its search ({PRIOR_GRID[1]:g}) the posterior adds next to "
                "no spread, and the predictive is the LoRA fit's.")

    @classmethod
    def summary(cls, diagnostics: dict, validation: bool = False) -> dict:
        return {} if validation or "prior_precision" not in diagnostics else {
            "prior_precision": diagnostics["prior_precision"]}

    @classmethod
    def fit_summary(cls, rows: list[dict]) -> str | None:
        if any(r.get("prior_precision") is None for r in rows):
            return None
        top = sum(r["prior_precision"] >= PRIOR_GRID[1] / 1.01 for r in rows)
        return (f"prior precision {', '.join(format(r['prior_precision'], '.3g') for r in rows)} (seeds "
                f"{seeds_of(rows)}; {top} of {len(rows)} at the top)")

    @staticmethod
    def _forward(classifier: Classifier) -> Callable[[dict], torch.Tensor]:
        device = next(classifier.parameters()).device
        return lambda b: classifier(b["input_ids"].to(device), b["attention_mask"].to(device))

    def fit_posthoc(self, classifier: Classifier, train_batches, validation_batches) -> None:
        c = self.config
        classifier.eval()
        modules = adapted_layers(classifier)
        exact = c.ggn == "exact" or (c.ggn == "auto" and len(classifier.label_names) <= EXACT_GGN_MAX_CLASSES)
        device = next(classifier.parameters()).device
        batches = (to_device(b, device) for b in spread_batches(train_batches, c.n_fit))
        self.posterior = fit_posterior(self._forward(classifier), modules, batches, c.hessian_structure,
                                       c.kfac_approx, exact, dataset_size(train_batches))
        if c.prior_precision > 0:
            self.posterior.prior_precision = c.prior_precision
        elif c.prior_fit == "val":
            validation = (to_device(b, device) for b in spread_batches(validation_batches, c.prior_fit_max))
            self.posterior.prior_precision, _ = validation_prior_precision(
                self._forward(classifier), modules, self.posterior, validation, len(classifier.label_names),
                c.prior_fit_max)
        else:
            self.posterior.optimize_prior_precision()

    def training_predict(self, classifier: Classifier, batch: dict) -> torch.Tensor:
        return super().predict(classifier, batch, 0)  # the LoRA fit, before its posterior

    def is_fitted(self) -> bool:
        return self.posterior is not None

    def predict(self, classifier: Classifier, batch: dict, samples: int) -> torch.Tensor:
        self.check_fitted(self.is_fitted())
        classifier.eval()
        num_classes, modules = len(classifier.label_names), adapted_layers(classifier)
        if self.config.jacobians == "classes" or (self.config.jacobians == "auto"
                                                  and num_classes <= EXACT_GGN_MAX_CLASSES):
            mean, covariance = glm_logits(self._forward(classifier), modules, self.posterior, batch, num_classes)
            return predictive_probs(mean, covariance, samples)
        device = next(classifier.parameters()).device
        inputs = (batch["input_ids"].to(device), batch["attention_mask"].to(device))
        mean, draws = glm_logit_draws(classifier, inputs, modules, self.posterior, samples or MC_SAMPLES)
        return sampled_predictive_probs(mean, draws, samples)

    def diagnostics(self, classifier: Classifier, batches) -> dict:
        if self.posterior is None:
            return {}
        p = self.posterior
        low, high, _ = PRIOR_GRID
        return {"prior_precision": p.prior_precision, "log_marginal_likelihood": p.log_marginal_likelihood(),
                "log_likelihood": p.log_likelihood, "prior_precision_fitted": self.config.prior_precision == 0,
                "prior_fit": self.config.prior_fit if self.config.prior_precision == 0 else "given",
                "prior_precision_at_grid_edge": not low * 1.01 < p.prior_precision < high / 1.01,
                "n_data": p.n_data, "n_fit": p.n_fit, "posterior_params": p.num_params,
                "hessian_structure": self.config.hessian_structure}

    def merged(self, classifier: Classifier) -> nn.Module:
        raise BaraError("the Laplace predictive integrates over a posterior around the LoRA weights, which one set of "
                        "weights cannot hold; fix: use the adapter (bara eval), or merge the LoRA alone (its MAP "
                        "weights) with peft: peft.PeftModel.from_pretrained(base, ADAPTER).merge_and_unload()")

    def adapter_state(self, classifier: Classifier) -> dict[str, torch.Tensor]:
        state = super().adapter_state(classifier)
        if self.posterior is not None:
            state.update(self.posterior.state())
        return state

    def load_adapter_state(self, classifier: Classifier, state: dict[str, torch.Tensor]) -> None:
        own = {k: v for k, v in state.items() if k.startswith(PREFIX)}
        self.posterior = None
        super().load_adapter_state(classifier, {k: v for k, v in state.items() if k not in own})
        if not own:
            raise BaraError("the adapter holds no fitted Laplace posterior (no laplace_* tensors); fix: re-run "
                            "'bara train --method laplace'")
        self.posterior = LaplacePosterior.from_state(own, adapted_layers(classifier), self.config.hessian_structure)

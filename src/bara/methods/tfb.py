r"""Training-Free Bayesianization (TFB; Shi, Wang et al., 2025) of a trained LoRA adapter.

Training is plain LoRA. Afterwards each adapted layer's update ΔW = s B A (s = alpha / r) gets a Gaussian
posterior that is isotropic within the column space of B. With B = U D Vᵀ (thin SVD), TFB rewrites the
adapter as B' = U D, A' = Vᵀ A (the same ΔW) and puts q(A'_ij) = N(A'_ij, (σ / d_i)²) on A', so

.. math:: ΔW \sim N\big(s B A,\; σ^2 s^2\, U Uᵀ \otimes I_{d_\text{in}}\big), \qquad
          ΔW x = s B A x + σ s\, U z, \quad z \sim N(0, \lVert x \rVert^2 I_r),

one scalar σ for every layer. Directions that B does not use (d_i = 0) get no noise, as the reference code's
σ / (d_i + 1e-6) on A' multiplied by B' = U D gives. Each instance draws its own weights (the same for all its
tokens), so S samples of a batch go in one stacked pass.

**The search.** σ is the largest value whose S-sample predictive stays within ``tolerance`` of the LoRA
adapter's (σ = 0) on at most ``search_max`` validation instances (the "anchor set"):

- ``search_metric=nll``: NLL(σ) ≤ (1 + tolerance) · NLL(0);
- ``search_metric=accuracy``: accuracy(σ) ≥ accuracy(0) − tolerance.

σ_max = 10 is tried first; if it violates the tolerance, ``search_steps`` bisections in log σ between 1e-5 and
10 follow, and σ is the largest accepted value (0, i.e. LoRA, if none is). Every candidate uses the same
noise draws (common random numbers), so the metric is a smooth function of σ and the bisection is stable.

Where this differs from the reference code (Wang-ML-Lab/bayesian-peft, ``modelwrappers/tfblora*.py``): it
bisects linearly in [0.001, σ_max] and returns the last σ that *violated* the threshold; its NLL criterion
is the absolute relative change of the NLL of the unperturbed model's own predictions (pseudo-labels), further
divided by the number of anchor instances; its noise is BLoB's flipout. Here σ is the largest accepted value,
the criterion is one-sided (a σ that lowers the validation NLL is accepted) on the validation labels, and
each instance draws independent weights.

**Cost.** One forward pass over the anchor set, then ``search_samples`` stacked passes for each of at most
``search_steps + 1`` candidates; nothing is trained. Storage: σ alone (``tfb.sigma``); U is recomputed from
B when predicting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BaraError
from ..heads import Classifier
from .base import Choices, option, repeated_passes, to_device
from .laplace import spread_batches
from .lora import Lora, LoraConfig

SIGMA_RANGE = (1e-5, 10.0)  # the search's bracket for σ (log-spaced bisection)
SEARCH_SEED = 0  # the common random numbers of every candidate σ


class SearchMetric(Choices):
    """``search_metric``: what the search for sigma keeps within ``tolerance`` of the LoRA fit on validation."""

    NLL = "nll"
    """The relative rise of the NLL: NLL(sigma) <= (1 + tolerance) NLL(0)."""
    ACCURACY = "accuracy"
    """The absolute drop of the accuracy: accuracy(sigma) >= accuracy(0) - tolerance."""


@dataclass
class TfbConfig(LoraConfig):
    sigma: float = option(0.0, "TFB's posterior scale sigma of the adapter update; 0 = search the largest sigma "
                               "within --tolerance on the validation split")
    search_metric: str = option("nll", "what TFB's search keeps within --tolerance on validation: nll (relative "
                                       "rise of the NLL) | accuracy (absolute drop of the accuracy)", SearchMetric)
    tolerance: float = option(0.01, "TFB: the validation NLL may rise by this fraction (search_metric=nll), or "
                                    "the accuracy drop by this much (accuracy)")
    search_steps: int = option(8, "TFB: bisections of log sigma between 1e-5 and 10")
    search_samples: int = option(4, "TFB: Monte-Carlo samples per validation instance for each candidate sigma")
    search_max: int = option(512, "TFB: validation instances the search uses, from batches spread over the split")

    def validate(self) -> None:
        super().validate()
        if not (self.sigma >= 0 and math.isfinite(self.sigma)):
            raise BaraError(f"sigma must be >= 0 (0 = search it), got {self.sigma}; fix: pass --sigma 0")
        if not (self.tolerance >= 0 and math.isfinite(self.tolerance)):
            raise BaraError(f"tolerance must be >= 0, got {self.tolerance}; fix: pass --tolerance 0.01")
        for name in ("search_steps", "search_samples", "search_max"):
            if getattr(self, name) < 1:
                raise BaraError(f"{name} must be >= 1, got {getattr(self, name)}; fix: pass "
                                f"--{name.replace('_', '-')} {TfbConfig.__dataclass_fields__[name].default}")


def validation_nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return F.nll_loss(probs.clamp(min=1e-12).log(), labels).item()


def validation_accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return (probs.argmax(-1) == labels).float().mean().item()


# metric name -> (the metric of probabilities [N, C] and labels, whether value v is within tolerance t of base b)
SEARCH_METRICS: dict[str, tuple[Callable, Callable[[float, float, float], bool]]] = {
    "nll": (validation_nll, lambda v, b, t: v <= b * (1 + t)),
    "accuracy": (validation_accuracy, lambda v, b, t: v >= b - t),
}


def largest_within(accepted: Callable[[float], bool], low: float, high: float, steps: int) -> float:
    """The largest σ in [low, high] that ``accepted``, assuming the accepted set is an interval from 0: ``high``
    if accepted, else ``steps`` bisections of log σ; 0 if no candidate is accepted."""
    if accepted(high):
        return high
    best, lo, hi = 0.0, math.log(low), math.log(high)
    for _ in range(steps):
        mid = (lo + hi) / 2
        if accepted(math.exp(mid)):
            best, lo = math.exp(mid), mid
        else:
            hi = mid
    return best


def lora_layers(classifier: Classifier) -> dict[str, nn.Module]:
    """peft's LoRA linear layers, by name."""
    from peft.tuners.lora import Linear

    return {n: m for n, m in classifier.named_modules() if isinstance(m, Linear)}


def column_basis(b: torch.Tensor) -> torch.Tensor:
    """U of B = U D Vᵀ, restricted to the directions B uses (singular values above matrix_rank's tolerance)."""
    u, d, _ = torch.linalg.svd(b.detach().float(), full_matrices=False)
    keep = d > d.max().clamp(min=0) * max(b.shape) * torch.finfo(d.dtype).eps
    return u[:, keep]


class LowRankNoise:
    """While entered, every LoRA layer adds σ s U z (z ~ N(0, ‖x‖² I) per instance) to its output: one draw of
    ΔW from TFB's posterior per instance, from torch's global generator."""

    def __init__(self, classifier: Classifier, sigma: float):
        self.layers, self.sigma = lora_layers(classifier), sigma

    def _hook(self, basis: torch.Tensor, scale: float):
        def add_noise(module, args, output):
            x = args[0].to(output.dtype)
            z = torch.randn(x.shape[0], basis.shape[1], x.shape[-1], dtype=x.dtype, device=x.device)
            u = torch.einsum("b...d,bkd->b...k", x, z)  # z x for each instance's own draw
            return output + (scale * u) @ basis.to(output).T
        return add_noise

    def __enter__(self) -> "LowRankNoise":
        self.handles = []
        for layer in self.layers.values():
            adapter = next(iter(layer.lora_B))
            basis = column_basis(layer.lora_B[adapter].weight)
            if basis.shape[1]:
                scale = self.sigma * layer.scaling[adapter]
                self.handles.append(layer.register_forward_hook(self._hook(basis, scale)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


class TfbScale(nn.Module):
    """Holds σ (−1 until fitted), saved and loaded with the adapter as ``tfb.sigma``."""

    def __init__(self):
        super().__init__()
        self.register_buffer("sigma", torch.tensor(-1.0, dtype=torch.float64))


class Tfb(Lora):
    """LoRA, then TFB's low-rank isotropic Gaussian around it, its scale searched on the validation split."""

    name = "tfb"
    # LoRA's rate: TFB is post-hoc on a LoRA fit, which trains as LoRA does (lora's default_lr, measured).
    default_lr = {"encoder": 5e-3, "causal": 3e-3}
    config_class = TfbConfig
    trains_as = "lora"  # the LoRA fit trains as `lora` does, then the post-hoc step
    default_samples = 10

    def __init__(self, config: TfbConfig | None = None):
        super().__init__(config)
        self.fit_result: dict = {}  # the search, once run in this process

    def wrap(self, classifier: Classifier) -> None:
        super().wrap(classifier)
        classifier.tfb = TfbScale()

    def adapter_state(self, classifier: Classifier) -> dict[str, torch.Tensor]:
        return {**super().adapter_state(classifier), "tfb.sigma": classifier.tfb.sigma.detach().clone()}

    def sampled_probs(self, classifier: Classifier, batch: dict, sigma: float, samples: int) -> torch.Tensor:
        with LowRankNoise(classifier, sigma):
            return repeated_passes(classifier, batch, samples)

    @torch.no_grad()
    def fit_posthoc(self, classifier: Classifier, train_batches, validation_batches) -> None:
        c = self.config
        classifier.eval()
        if c.sigma > 0:
            classifier.tfb.sigma.fill_(c.sigma)
            self.fit_result = {"sigma_searched": False}
            return
        device = classifier.tfb.sigma.device
        anchors = [to_device(b, device) for b in spread_batches(validation_batches, c.search_max)]
        if not anchors:
            raise BaraError("TFB searches its sigma on the validation split, the task has none; fix: give the data a "
                            "validation split, or pass --sigma (e.g. --sigma 0.01)")
        labels = torch.cat([b["labels"] for b in anchors]).cpu()
        metric, within = SEARCH_METRICS[c.search_metric]

        def probs_at(sigma: float) -> torch.Tensor:
            if sigma == 0:
                return torch.cat([super(Tfb, self).predict(classifier, b, 0)[0].cpu() for b in anchors])
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(SEARCH_SEED)
                return torch.cat([self.sampled_probs(classifier, b, sigma, c.search_samples).mean(0).cpu()
                                  for b in anchors])

        values = {0.0: metric(probs_at(0.0), labels)}  # σ -> validation metric, in the order tried

        def accepted(sigma: float) -> bool:
            values[sigma] = metric(probs_at(sigma), labels)
            return within(values[sigma], values[0.0], c.tolerance)

        sigma = largest_within(accepted, *SIGMA_RANGE, c.search_steps)
        classifier.tfb.sigma.fill_(sigma)
        self.fit_result = {"sigma_searched": True, "search_metric": c.search_metric,
                           "validation_metric_lora": values[0.0], "validation_metric_tfb": values[sigma],
                           "search_curve": [[s, v] for s, v in values.items()], "n_anchor": len(labels),
                           "sigma_at_search_edge": sigma in (0.0, SIGMA_RANGE[1])}

    @torch.no_grad()
    def predict(self, classifier: Classifier, batch: dict, samples: int) -> torch.Tensor:
        sigma = classifier.tfb.sigma.item()
        if samples == 0:  # the posterior mean: the LoRA adapter
            return super().predict(classifier, batch, 0)
        if sigma < 0:
            raise BaraError("TFB's sigma is not fitted yet; fix: call fit_posthoc() first (bara train does), or "
                            "predict with samples=0")
        classifier.eval()
        return self.sampled_probs(classifier, batch, sigma, samples)

    report_columns = (("sigma", "σ"),)

    @classmethod
    def summary(cls, diagnostics: dict, validation: bool = False) -> dict:
        return {"sigma": diagnostics["sigma"]} if not validation and "sigma" in diagnostics else {}

    def diagnostics(self, classifier: Classifier, batches) -> dict:
        return {"sigma": classifier.tfb.sigma.item(), **self.fit_result}

r"""Accuracy, calibration and out-of-distribution metrics, used by every method.

Inputs are probabilities ``[N, C]`` or Monte-Carlo samples ``[S, N, C]``, which are averaged into the
predictive :math:`\bar p(y \mid x) = \frac{1}{S} \sum_s p_s(y \mid x)` first, and integer labels ``[N]``.
Everything is computed in float64 on the CPU and returned as plain Python numbers.

Invalid inputs fail loudly (``ValueError``): wrong shapes, labels outside ``[0, C)``, values outside
``[0, 1]``, NaN, or rows that do not sum to 1 within ``1e-3``.

ECE uses ``n_bins`` equal-width bins of the top-class confidence, closed on the right (Guo et al.,
2017): bin :math:`b` holds the instances with confidence in :math:`((b-1)/M, b/M]`, so a confidence of
exactly 1 lands in the last bin. This agrees with torchmetrics' ``multiclass_calibration_error(...,
norm="l1")`` up to float32 rounding on inputs without confidences of exactly 1 or on a bin edge (the
tests check this), but is computed here because torchmetrics (1.9) differs on exactly those: it puts
confidence 1.0 into a 16th bin of its own, uses bins closed on the left, rounds confidences to float32
(so 0.99999999 becomes 1.0), and silently applies a softmax to inputs outside ``[0, 1]``. Computing
ECE from :func:`reliability_bins` also makes the reliability diagram and the number agree exactly.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torchmetrics.functional.classification import binary_auroc

__all__ = [
    "ReliabilityBin",
    "accuracy",
    "brier_score",
    "evaluate",
    "expected_calibration_error",
    "negative_log_likelihood",
    "ood_auroc",
    "predictive",
    "predictive_entropy",
    "reliability_bins",
]

PROB_EPS = 1e-12  # floor under probabilities inside logarithms
SUM_TOL = 1e-3  # allowed |sum_c p_c - 1|
RANGE_TOL = 1e-6  # allowed excursion outside [0, 1] before clamping (float rounding)


class ReliabilityBin(NamedTuple):
    """One confidence bin ``(lower, upper]``; ``confidence`` and ``accuracy`` are NaN when ``count == 0``."""

    lower: float
    upper: float
    confidence: float
    accuracy: float
    count: int


def predictive(probs) -> torch.Tensor:
    r"""Mean predictive ``[N, C]`` (float64, CPU) from ``[N, C]`` or samples ``[S, N, C]``:
    :math:`\bar p = \frac{1}{S} \sum_s p_s`."""
    probs = torch.as_tensor(probs).detach().to("cpu", torch.float64)
    if probs.dim() == 3:
        return probs.mean(0)
    if probs.dim() == 2:
        return probs
    raise ValueError(f"expected probabilities [N, C] or samples [S, N, C], got shape {tuple(probs.shape)}")


def _probabilities(probs) -> torch.Tensor:
    """The predictive, checked to be a probability vector per row (and clamped to [0, 1])."""
    p = predictive(probs)
    if p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError(f"expected at least one instance and one class, got shape {tuple(p.shape)}")
    if not torch.isfinite(p).all():
        raise ValueError("probabilities contain NaN or infinity")
    if p.min() < -RANGE_TOL or p.max() > 1 + RANGE_TOL:
        raise ValueError(f"probabilities must lie in [0, 1], got range [{p.min().item():.6g}, {p.max().item():.6g}] "
                         "(pass probabilities, not logits)")
    error = (p.sum(1) - 1).abs()
    if error.max() > SUM_TOL:
        row = int(error.argmax())
        raise ValueError(f"probabilities must sum to 1 over classes (tolerance {SUM_TOL}); "
                         f"row {row} sums to {p[row].sum().item():.6g}")
    return p.clamp(0, 1)


def _labelled(probs, labels) -> tuple[torch.Tensor, torch.Tensor]:
    p = _probabilities(probs)
    y = torch.as_tensor(labels).detach().cpu()
    if y.dim() != 1 or y.shape[0] != p.shape[0]:
        raise ValueError(f"expected labels [N] = [{p.shape[0]}] for probabilities {tuple(p.shape)}, "
                         f"got shape {tuple(y.shape)}")
    if y.is_floating_point():
        if not torch.equal(y, y.round()):
            raise ValueError("labels must be integers (class indices)")
    elif y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    y = y.long()
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"labels must be in [0, {p.shape[1]}), got range [{int(y.min())}, {int(y.max())}]")
    return p, y


def accuracy(probs, labels) -> float:
    r"""Fraction of instances whose top class is the label:
    :math:`\frac{1}{N} \sum_i [\arg\max_c \bar p_{ic} = y_i]`."""
    p, y = _labelled(probs, labels)
    return (p.argmax(1) == y).double().mean().item()


def reliability_bins(probs, labels, n_bins: int = 15) -> list[ReliabilityBin]:
    r"""Per equal-width bin :math:`B_b = ((b-1)/M, b/M]` of the top-class confidence
    :math:`\max_c \bar p_{ic}`: bounds, mean confidence, accuracy and count (for reliability diagrams)."""
    p, y = _labelled(probs, labels)
    if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    confidence, predicted = p.max(1)
    correct = (predicted == y).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    # right=False: index b means edges[b] < confidence <= edges[b + 1], so 1.0 falls in the last bin
    index = torch.bucketize(confidence, edges[1:-1], right=False)
    count = torch.bincount(index, minlength=n_bins)
    confidence_sum = torch.bincount(index, weights=confidence, minlength=n_bins)
    correct_sum = torch.bincount(index, weights=correct, minlength=n_bins)
    bins = []
    for b in range(n_bins):
        n = int(count[b])
        bins.append(ReliabilityBin(lower=edges[b].item(), upper=edges[b + 1].item(),
                                   confidence=confidence_sum[b].item() / n if n else math.nan,
                                   accuracy=correct_sum[b].item() / n if n else math.nan, count=n))
    return bins


def expected_calibration_error(probs, labels, n_bins: int = 15) -> float:
    r"""Top-label ECE (L1), a fraction in [0, 1]:
    :math:`\sum_b \frac{|B_b|}{N} \, |\mathrm{acc}(B_b) - \mathrm{conf}(B_b)|` over the bins of
    :func:`reliability_bins` (equal width, closed on the right)."""
    bins = reliability_bins(probs, labels, n_bins)
    total = sum(b.count for b in bins)
    return sum(b.count / total * abs(b.accuracy - b.confidence) for b in bins if b.count)


def negative_log_likelihood(probs, labels) -> float:
    r"""Mean negative log-likelihood :math:`-\frac{1}{N} \sum_i \log \max(\bar p_{i y_i}, 10^{-12})`."""
    p, y = _labelled(probs, labels)
    return -torch.log(p[torch.arange(len(y)), y].clamp(min=PROB_EPS)).mean().item()


def brier_score(probs, labels) -> float:
    r"""Multi-class Brier score :math:`\frac{1}{N} \sum_i \sum_c (\bar p_{ic} - [y_i = c])^2`, in [0, 2]."""
    p, y = _labelled(probs, labels)
    onehot = torch.nn.functional.one_hot(y, p.shape[1]).double()
    return ((p - onehot) ** 2).sum(1).mean().item()


def predictive_entropy(probs) -> torch.Tensor:
    r"""Entropy of the predictive per instance, ``[N]`` in nats:
    :math:`H_i = -\sum_c \bar p_{ic} \log \max(\bar p_{ic}, 10^{-12})`."""
    p = _probabilities(probs)
    return -(p * torch.log(p.clamp(min=PROB_EPS))).sum(1)


def ood_auroc(probs_in, probs_out) -> float:
    r"""AUROC of predictive entropy for detecting out-of-distribution inputs (positive class):
    the probability that an OOD instance has higher entropy than an in-distribution one, ties counting
    one half (Mann–Whitney). 0.5 is chance, 1 is perfect separation."""
    p_in, p_out = _probabilities(probs_in), _probabilities(probs_out)
    if p_in.shape[1] != p_out.shape[1]:
        raise ValueError(f"in- and out-of-distribution probabilities need the same classes, "
                         f"got {p_in.shape[1]} and {p_out.shape[1]}")
    entropy = torch.cat([predictive_entropy(p_in), predictive_entropy(p_out)])
    # Scaled into [0, 1] by the maximum entropy log C: torchmetrics would apply a sigmoid to scores
    # outside [0, 1]; harmless for the ranking, but this keeps the scores what they say they are.
    scores = (entropy / max(math.log(p_in.shape[1]), PROB_EPS)).clamp(0, 1)
    target = torch.cat([torch.zeros(len(p_in)), torch.ones(len(p_out))]).long()
    return binary_auroc(scores, target).item()


def evaluate(probs, labels, ood_probs=None, n_bins: int = 15) -> dict:
    """All metrics of one prediction as plain Python numbers: ``accuracy`` and ``ece`` (fractions),
    ``nll``, ``brier``, ``n`` (int) and, with ``ood_probs``, ``ood_auroc``. Samples are averaged first."""
    p, y = _labelled(probs, labels)
    result = {"accuracy": accuracy(p, y), "ece": expected_calibration_error(p, y, n_bins),
              "nll": negative_log_likelihood(p, y), "brier": brier_score(p, y), "n": int(len(y))}
    if ood_probs is not None:
        result["ood_auroc"] = ood_auroc(p, ood_probs)
    return result

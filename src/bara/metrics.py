"""Calibration and accuracy metrics, used by every method. Inputs are probabilities ``[N, C]`` or
Monte-Carlo samples ``[S, N, C]`` (averaged into the predictive first) and integer labels ``[N]``."""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import binary_auroc, multiclass_calibration_error


def predictive(probs: torch.Tensor) -> torch.Tensor:
    """Mean predictive ``[N, C]`` from ``[N, C]`` or ``[S, N, C]``."""
    probs = torch.as_tensor(probs, dtype=torch.float64)
    return probs.mean(0) if probs.dim() == 3 else probs


def _check(p: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p, y = predictive(p), torch.as_tensor(y).long()
    if p.dim() != 2 or y.dim() != 1 or p.shape[0] != y.shape[0]:
        raise ValueError(f"expected probabilities [N, C] and labels [N], got {tuple(p.shape)} and {tuple(y.shape)}")
    if len(y) and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"labels must be in [0, {p.shape[1]}), got range [{int(y.min())}, {int(y.max())}]")
    if not torch.allclose(p.sum(1), torch.ones(len(p), dtype=p.dtype), atol=1e-3):
        raise ValueError("probabilities do not sum to 1 along the class dimension")
    return p, y


def accuracy(p, y) -> float:
    p, y = _check(p, y)
    return (p.argmax(1) == y).double().mean().item()


def expected_calibration_error(p, y, n_bins: int = 15) -> float:
    """ECE with ``n_bins`` equal-width bins on the top-class confidence, L1, as a fraction (torchmetrics)."""
    p, y = _check(p, y)
    return multiclass_calibration_error(p, y, num_classes=p.shape[1], n_bins=n_bins, norm="l1").item()


def negative_log_likelihood(p, y) -> float:
    p, y = _check(p, y)
    return -torch.log(p[torch.arange(len(y)), y].clamp(min=1e-12)).mean().item()


def brier_score(p, y) -> float:
    """Mean over instances of sum_c (p_c - onehot_c)^2."""
    p, y = _check(p, y)
    return ((p - torch.nn.functional.one_hot(y, p.shape[1]).double()) ** 2).sum(1).mean().item()


def predictive_entropy(p) -> torch.Tensor:
    p = predictive(p)
    return -(p * torch.log(p.clamp(min=1e-12))).sum(-1)


def ood_auroc(p_in, p_out) -> float:
    """AUROC of predictive entropy for telling out-of-distribution (positive) from in-distribution inputs."""
    scores = torch.cat([predictive_entropy(p_in), predictive_entropy(p_out)])
    target = torch.cat([torch.zeros(len(predictive(p_in))), torch.ones(len(predictive(p_out)))]).long()
    return binary_auroc(scores, target).item()


def reliability_bins(p, y, n_bins: int = 15) -> list[dict]:
    """Per equal-width confidence bin: bounds, mean confidence, accuracy and count."""
    p, y = _check(p, y)
    confidence, predicted = p.max(1)
    correct = (predicted == y).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    index = torch.bucketize(confidence, edges[1:-1], right=True)  # (lower, upper] as torchmetrics
    bins = []
    for b in range(n_bins):
        inside = index == b
        count = int(inside.sum())
        bins.append({"lower": edges[b].item(), "upper": edges[b + 1].item(), "count": count,
                     "confidence": confidence[inside].mean().item() if count else float("nan"),
                     "accuracy": correct[inside].mean().item() if count else float("nan")})
    return bins


def evaluate(probs, labels, ood_probs=None, n_bins: int = 15) -> dict:
    """accuracy, ece (fractions), nll, brier, n and, with ``ood_probs``, ood_auroc — as plain floats."""
    p, y = _check(probs, labels)
    result = {"accuracy": accuracy(p, y), "ece": expected_calibration_error(p, y, n_bins),
              "nll": negative_log_likelihood(p, y), "brier": brier_score(p, y), "n": len(y)}
    if ood_probs is not None:
        result["ood_auroc"] = ood_auroc(p, ood_probs)
    return result

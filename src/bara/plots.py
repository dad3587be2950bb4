"""Plots every run writes: reliability diagrams, BaRA's effective-rank plots, method scatter plots.
Files are written atomically (temp file + rename) with the Agg back end, so no display is needed."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .metrics import expected_calibration_error, reliability_bins  # noqa: E402


def _save(fig, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def reliability_diagram(probs, labels, path, title: str | None = None, n_bins: int = 15) -> None:
    bins = reliability_bins(probs, labels, n_bins)
    ece = expected_calibration_error(probs, labels, n_bins)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = 1.0 / n_bins
    centers = np.array([(b["lower"] + b["upper"]) / 2 for b in bins])
    acc = np.array([b["accuracy"] for b in bins])
    conf = np.array([b["confidence"] for b in bins])
    counts = np.array([b["count"] for b in bins])
    filled = counts > 0
    top.bar(centers[filled], acc[filled], width=width, edgecolor="black", color="tab:blue", label="accuracy")
    top.bar(centers[filled], conf[filled] - acc[filled], bottom=acc[filled], width=width, color="tab:red",
            alpha=0.3, edgecolor="tab:red", hatch="//", label="gap")
    top.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.legend(loc="upper left", fontsize=8)
    top.set_title(title or f"ECE {100 * ece:.1f}%")
    bottom.bar(centers, counts / max(counts.sum(), 1), width=width, color="gray", edgecolor="black")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("fraction")
    bottom.set_xlim(0, 1)
    _save(fig, path)


def rank_plots(per_instance_rank, global_pi, path, title: str | None = None, layer_names=None) -> None:
    """Histogram of per-instance effective rank and a layers x factors heat map of E[pi]."""
    ranks = np.asarray(per_instance_rank, dtype=float)
    pi = np.asarray(global_pi, dtype=float)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [1, 1.3]})
    left.hist(ranks, bins=min(40, max(5, len(np.unique(ranks)))), color="tab:blue", edgecolor="black")
    left.set_xlabel("per-instance effective rank (hard, mean over layers)")
    left.set_ylabel("instances")
    left.set_title(f"mean {ranks.mean():.2f}, std {ranks.std():.2f}")
    image = right.imshow(pi, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
    right.set_xlabel("factor k")
    right.set_ylabel("layer")
    if layer_names is not None:
        right.set_yticks(range(len(layer_names)))
        right.set_yticklabels(layer_names, fontsize=6)
    right.set_title("E[pi] (global gate)")
    fig.colorbar(image, ax=right)
    if title:
        fig.suptitle(title)
    _save(fig, path)


def scatter_methods(points: list[dict], x: str, y: str, path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for point in points:
        ax.scatter(point[x], point[y], s=40)
        ax.annotate(point["method"], (point[x], point[y]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _save(fig, path)

"""Plots every run writes: reliability diagrams, BaRA's effective-rank plots, method scatter plots.

Figures are drawn with matplotlib's object API on an Agg canvas (``Figure`` + ``FigureCanvasAgg``),
never through ``pyplot``: no display is needed, no figure is left open, and importing this module does
not switch the back end of a user's own session (a notebook keeps its inline plots). Each PNG is
written atomically (:func:`bara.checkpoint.write_atomic`): a reader never sees half a file.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .checkpoint import write_atomic
from .metrics import expected_calibration_error, reliability_bins

__all__ = ["corruption_curves", "learning_curve", "rank_plots", "reliability_diagram", "scatter_methods"]

DPI = 110


def _figure(**kwargs) -> Figure:
    fig = Figure(layout="constrained", **kwargs)  # room for long tick labels (layer names)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path) -> Path:
    """Write ``fig`` as PNG at ``path`` atomically; on any error the old file (if any) is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            fig.savefig(handle, format="png", dpi=DPI, bbox_inches="tight")

    write_atomic(path, write, user_error=False)
    return path


def reliability_diagram(probs, labels, path, title: str | None = None, n_bins: int = 15) -> Path:
    """Per-bin accuracy against confidence, with the diagonal and the gap to it shaded, above a histogram
    of confidences. ``probs`` is ``[N, C]`` or samples ``[S, N, C]``. The title carries the ECE in %
    (``"LoRA — ECE 7.1%"``), unless ``title`` already mentions ECE. Returns the path written."""
    bins = reliability_bins(probs, labels, n_bins)
    ece = expected_calibration_error(probs, labels, n_bins)
    lower = np.array([b.lower for b in bins])
    upper = np.array([b.upper for b in bins])
    acc = np.array([b.accuracy for b in bins])
    conf = np.array([b.confidence for b in bins])
    counts = np.array([b.count for b in bins])
    filled = counts > 0
    centers, width = (lower + upper) / 2, upper - lower

    fig = _figure(figsize=(5, 6))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(centers[filled], acc[filled], width=width[filled], color="tab:blue", edgecolor="black",
            label="accuracy")
    # from accuracy up (over-confident) or down (under-confident) to the bin's mean confidence
    top.bar(centers[filled], conf[filled] - acc[filled], bottom=acc[filled], width=width[filled],
            color="tab:red", alpha=0.3, edgecolor="tab:red", hatch="//", label="gap to confidence")
    top.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.legend(loc="upper left", fontsize=8)
    label = f"ECE {100 * ece:.1f}%"
    top.set_title(label if not title else title if "ECE" in title else f"{title} — {label}")
    bottom.bar(centers, counts / counts.sum(), width=width, color="gray", edgecolor="black")
    bottom.set_xlabel("confidence (top-class probability)")
    bottom.set_ylabel("fraction")
    bottom.set_xlim(0, 1)
    return _save(fig, path)


def rank_plots(per_instance_rank, global_pi, path, title: str | None = None, layer_names=None) -> Path:
    """Left: histogram of the per-instance (hard) rank (1-D). Right: heat map of E[pi], layers x
    factors (2-D, values in [0, 1]; NaN for factors a layer does not have, drawn grey), with a colour
    bar and optional ``layer_names`` for the rows. Returns the path written."""
    ranks = np.asarray(per_instance_rank, dtype=float)
    pi = np.asarray(global_pi, dtype=float)
    if ranks.ndim != 1:
        raise ValueError(f"per_instance_rank must be 1-D, got shape {ranks.shape}")
    if pi.ndim != 2:
        raise ValueError(f"global_pi must be 2-D (layers x factors), got shape {pi.shape}")
    if layer_names is not None and len(layer_names) != pi.shape[0]:
        raise ValueError(f"got {len(layer_names)} layer names for {pi.shape[0]} rows of global_pi")

    fig = _figure(figsize=(11, 0.5 + max(4.0, 0.18 * pi.shape[0])))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.3]})
    finite = ranks[np.isfinite(ranks)]
    if finite.size:
        left.hist(finite, bins=min(40, max(5, len(np.unique(finite)))), color="tab:blue", edgecolor="black")
        left.set_title(f"hard rank: mean {finite.mean():.2f}, std {finite.std():.2f}")
    else:
        left.text(0.5, 0.5, "no instances", ha="center", va="center", transform=left.transAxes)
    left.set_xlabel("hard rank per instance (factors on in the one-pass prediction, mean over layers)")
    left.set_ylabel("instances")

    colormap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgray")
    image = right.imshow(np.ma.masked_invalid(pi), aspect="auto", vmin=0, vmax=1, cmap=colormap,
                         interpolation="nearest")
    right.set_xlabel("factor k")
    right.set_ylabel("layer")
    if layer_names is not None:
        right.set_yticks(range(len(layer_names)))
        right.set_yticklabels(layer_names, fontsize=6)
    right.set_title("E[π] (global gate)")
    fig.colorbar(image, ax=right, label="E[π]")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def scatter_methods(points: list[dict], x: str, y: str, path, title: str) -> Path:
    """Labelled scatter of ``points`` (dicts with ``"method"``, ``x`` and ``y``), e.g. accuracy against
    ECE across methods. Returns the path written."""
    for i, point in enumerate(points):
        missing = [key for key in ("method", x, y) if key not in point]
        if missing:
            raise ValueError(f"point {i} lacks {missing}: {point}")
    fig = _figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    methods = list(dict.fromkeys(point["method"] for point in points))  # one colour and marker per method
    for point in points:
        i = methods.index(point["method"])
        # A legend, not labels beside the points: methods with near-equal numbers would overprint each other.
        ax.scatter(float(point[x]), float(point[y]), s=45, color=f"C{i % 10}", marker="osD^vPX*hp<>"[i % 12],
                   label=point["method"], alpha=0.85)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    ax.margins(0.1)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


CURVE = (("val_accuracy", "validation accuracy %", 100.0), ("val_nll", "validation NLL", 1.0),
         ("val_ece", "validation ECE %", 100.0))


def learning_curve(history: list[dict], path, title: str | None = None) -> Path:
    """Validation accuracy, NLL and ECE against the training step, from the records of ``history`` that hold
    them (``bara train --eval-every N``): the plot that shows whether a step budget has converged."""
    points = [h for h in history if all(key in h for key, _, _ in CURVE)]
    if not points:
        raise ValueError("no record of history holds validation metrics; train with eval_every > 0")
    steps = [h["step"] for h in points]
    fig = _figure(figsize=(12, 3.6))
    for ax, (key, label, scale) in zip(fig.subplots(1, 3), CURVE):
        ax.plot(steps, [scale * h[key] for h in points], marker="o")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


CORRUPTION_PANELS = (("accuracy", "accuracy %", 100.0), ("ece", "ECE %", 100.0), ("nll", "NLL", 1.0))


def _null_line(ax, metric: str, num_labels: int | None) -> None:
    """The null of ``metric`` as a dashed line: a uniform prediction over ``num_labels`` classes (accuracy 1 / C in %,
    NLL ln C; its ECE is about 0, no line)."""
    null = {"accuracy": 100.0 / num_labels, "nll": math.log(num_labels)} if num_labels else {}
    if metric in null:
        ax.axhline(null[metric], color="0.4", linestyle="--", linewidth=1, label="uniform (null)")


def corruption_curves(table: dict, kinds, intensities, path, title: str, num_labels: int | None = None) -> Path:
    """Accuracy, ECE and NLL against the corruption intensity, a row per corruption and a line per method (mean over
    seeds, a band of one standard deviation): ``table`` is :func:`bara.corruption.summarise`'s. ``num_labels`` draws
    the null, a uniform prediction (accuracy 1 / C, NLL ln C), as a dashed line."""
    fig = _figure(figsize=(13, 3.4 * len(kinds)))
    axes = np.atleast_2d(fig.subplots(len(kinds), len(CORRUPTION_PANELS), squeeze=False))
    for row, kind in zip(axes, kinds):
        for ax, (metric, label, scale) in zip(row, CORRUPTION_PANELS):
            for i, (variant, curves) in enumerate(table.items()):
                points = [(x, curves[kind][x][metric]) for x in intensities if x in curves.get(kind, {})]
                if not points:
                    continue
                xs = np.array([x for x, _ in points], dtype=float)
                mean = scale * np.array([m for _, (m, _, _) in points])
                std = scale * np.array([s for _, (_, s, _) in points])
                ax.plot(xs, mean, marker="osD^vPX*hp<>"[i % 12], color=f"C{i % 10}", label=variant)
                ax.fill_between(xs, mean - std, mean + std, color=f"C{i % 10}", alpha=0.12, linewidth=0)
            _null_line(ax, metric, num_labels)
            ax.set_xlabel(f"{kind.replace('_', ' ')} (% corrupted)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.suptitle(title)
    return _save(fig, path)


def shift_plot(table: dict, sets: list[str], path, title: str, num_labels: int | None = None) -> Path:
    """Accuracy, ECE and NLL of each method in domain and under shift: ``sets`` along the x axis (in domain first),
    a marker per method at its mean over seeds with a bar of one standard deviation, the methods side by side.
    ``table``: ``{variant: {set: {"accuracy" | "ece" | "nll": (mean, std)}}}`` (std None for one seed);
    ``num_labels`` draws the null as :func:`corruption_curves` does."""
    fig = _figure(figsize=(13, 4.2))
    axes = fig.subplots(1, len(CORRUPTION_PANELS))
    width = 0.7 / max(len(table), 1)
    for ax, (metric, label, scale) in zip(axes, CORRUPTION_PANELS):
        for i, (variant, by_set) in enumerate(table.items()):
            cells = [(j, by_set[name][metric]) for j, name in enumerate(sets)
                     if name in by_set and by_set[name][metric][0] is not None]
            if not cells:
                continue
            xs = [j + (i - (len(table) - 1) / 2) * width for j, _ in cells]
            ax.errorbar(xs, [scale * m for _, (m, _) in cells], yerr=[scale * (s or 0.0) for _, (_, s) in cells],
                        fmt="osD^vPX*hp<>"[i % 12], color=f"C{i % 10}", label=variant, capsize=2, markersize=5)
        _null_line(ax, metric, num_labels)
        ax.set_xticks(range(len(sets)), [name.rsplit("/", 1)[-1] for name in sets], rotation=15, ha="right",
                      fontsize=8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.suptitle(title)
    return _save(fig, path)

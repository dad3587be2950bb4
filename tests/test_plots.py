"""Plots: valid PNG files of a useful size, written atomically, drawing what the metrics say."""

from __future__ import annotations

import os

import matplotlib
import matplotlib.image
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from bara import plots
from bara.metrics import reliability_bins
from bara.plots import learning_curve, rank_plots, reliability_diagram, scatter_methods

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def assert_only(folder, *names) -> None:
    """Nothing but ``names`` in ``folder``: no temporary file left behind."""
    assert sorted(os.listdir(folder)) == sorted(names)


@pytest.fixture
def probs_labels():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(4, 300, 5, generator=g), dim=-1)  # samples [S, N, C]
    labels = torch.randint(0, 5, (300,), generator=g)
    return probs, labels


@pytest.fixture
def drawn(monkeypatch):
    """Records every figure handed to the atomic writer, then writes it as usual."""
    figures = []
    save = plots._save

    def record(fig, path):
        figures.append(fig)
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", record)
    return figures


def test_reliability_diagram_writes_png(tmp_path, probs_labels):
    path = tmp_path / "reliability.png"
    assert reliability_diagram(*probs_labels, path, title="LoRA") == path
    assert_png(path)
    assert_only(tmp_path, "reliability.png")


def test_reliability_diagram_draws_the_bins_and_ece(tmp_path, drawn):
    # the hand example of test_metrics: ECE 41.25 %
    probs = torch.tensor([[0.90, 0.05, 0.05], [0.05, 0.90, 0.05], [0.20, 0.70, 0.10], [0.25, 0.20, 0.55]])
    labels = torch.tensor([0, 2, 1, 0])
    reliability_diagram(probs, labels, tmp_path / "r.png", title="LoRA")
    top, bottom = drawn[0].axes[:2]
    assert top.get_title() == "LoRA — ECE 41.2%"
    accuracy_bars = top.containers[0]
    filled = [b for b in reliability_bins(probs, labels) if b.count]
    assert [bar.get_height() for bar in accuracy_bars] == pytest.approx([b.accuracy for b in filled])
    gap_bars = top.containers[1]
    assert [bar.get_y() + bar.get_height() for bar in gap_bars] == pytest.approx([b.confidence for b in filled])
    assert sum(bar.get_height() for bar in bottom.containers[0]) == pytest.approx(1.0)


def test_reliability_diagram_titles(tmp_path, drawn, probs_labels):
    reliability_diagram(*probs_labels, tmp_path / "a.png")
    reliability_diagram(*probs_labels, tmp_path / "b.png", title="BaRA on trec — ECE 3.0%")
    assert drawn[0].axes[0].get_title().startswith("ECE ") and drawn[0].axes[0].get_title().endswith("%")
    assert drawn[1].axes[0].get_title() == "BaRA on trec — ECE 3.0%"  # a caller's own ECE is not repeated


def test_reliability_diagram_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError):
        reliability_diagram(torch.full((3, 2), 0.5), torch.tensor([0, 1]), tmp_path / "r.png")
    assert_only(tmp_path)


def test_rank_plots_writes_png(tmp_path, drawn):
    rng = np.random.default_rng(0)
    pi = rng.uniform(size=(6, 8))
    pi[0, 5:] = np.nan  # a layer with fewer factors
    names = [f"layer.{i}.q" for i in range(6)]
    path = tmp_path / "sub" / "rank.png"
    assert rank_plots(rng.integers(1, 9, size=200), pi, path, title="BaRA", layer_names=names) == path
    assert_png(path)
    assert_only(path.parent, "rank.png")
    histogram, heat_map = drawn[0].axes[:2]
    assert sum(bar.get_height() for bar in histogram.patches) == 200
    assert np.array_equal(np.ma.filled(heat_map.images[0].get_array(), np.nan), pi, equal_nan=True)
    assert [t.get_text() for t in heat_map.get_yticklabels()] == names
    assert len(drawn[0].axes) == 3  # the colour bar


def test_rank_plots_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match="1-D"):
        rank_plots(np.ones((2, 3)), np.ones((2, 3)), tmp_path / "r.png")
    with pytest.raises(ValueError, match="2-D"):
        rank_plots(np.ones(5), np.ones(3), tmp_path / "r.png")
    with pytest.raises(ValueError, match="layer names"):
        rank_plots(np.ones(5), np.ones((2, 3)), tmp_path / "r.png", layer_names=["a"])
    assert_only(tmp_path)


def test_scatter_methods_writes_png(tmp_path, drawn):
    points = [{"method": "lora", "accuracy": 0.81, "ece": 0.09}, {"method": "blob", "accuracy": 0.80, "ece": 0.04},
              {"method": "bara", "accuracy": 0.82, "ece": 0.03}]
    path = tmp_path / "scatter.png"
    assert scatter_methods(points, "ece", "accuracy", path, "trec") == path
    assert_png(path)
    assert_only(tmp_path, "scatter.png")
    ax = drawn[0].axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["lora", "blob", "bara"]
    assert [tuple(c.get_offsets()[0]) for c in ax.collections] == [(0.09, 0.81), (0.04, 0.80), (0.03, 0.82)]
    with pytest.raises(ValueError, match="lacks"):
        scatter_methods([{"method": "lora", "ece": 0.1}], "ece", "accuracy", tmp_path / "x.png", "t")


def test_learning_curve_plots_the_validation_records(tmp_path, drawn):
    history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "val_accuracy": 0.5, "val_nll": 1.2, "val_ece": 0.2},
               {"step": 3, "loss": 1.0}, {"step": 4, "loss": 0.8, "val_accuracy": 0.75, "val_nll": 0.7, "val_ece": 0.1}]
    path = tmp_path / "curve.png"
    assert learning_curve(history, path, "lora on toy") == path
    assert_png(path)
    assert_only(tmp_path, "curve.png")
    axes = drawn[0].axes
    assert [ax.get_ylabel() for ax in axes] == ["validation accuracy %", "validation NLL", "validation ECE %"]
    assert [list(ax.lines[0].get_ydata()) for ax in axes] == [[50.0, 75.0], [1.2, 0.7], [20.0, 10.0]]
    assert list(axes[0].lines[0].get_xdata()) == [2, 4]
    with pytest.raises(ValueError, match="eval_every"):
        learning_curve(history[:1], tmp_path / "none.png")
    assert_only(tmp_path, "curve.png")


def test_failed_write_keeps_the_old_file_and_no_temp_file(tmp_path, probs_labels, monkeypatch):
    path = tmp_path / "reliability.png"
    reliability_diagram(*probs_labels, path)
    before = path.read_bytes()

    def broken(self, fname, **kwargs):
        fname.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        reliability_diagram(*probs_labels, path)
    assert path.read_bytes() == before
    assert_only(tmp_path, "reliability.png")


def test_overwrite_replaces_the_file(tmp_path):
    path = tmp_path / "scatter.png"
    path.write_bytes(b"old")
    scatter_methods([{"method": "m", "x": 1.0, "y": 2.0}], "x", "y", path, "t")
    assert_png(path)
    assert_only(tmp_path, "scatter.png")


def test_plotting_leaves_pyplot_and_the_backend_alone(tmp_path, probs_labels):
    backend = matplotlib.get_backend()
    import matplotlib.pyplot as plt

    open_before = plt.get_fignums()
    reliability_diagram(*probs_labels, tmp_path / "r.png")
    assert plt.get_fignums() == open_before  # no figure left open to leak memory over many runs
    assert matplotlib.get_backend() == backend

"""Metrics against hand-computed values, independent numpy implementations and limiting cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import multiclass_calibration_error

from bara.metrics import (
    ReliabilityBin,
    accuracy,
    brier_score,
    evaluate,
    expected_calibration_error,
    negative_log_likelihood,
    ood_auroc,
    predictive,
    predictive_entropy,
    reliability_bins,
)

# Four instances, three classes. Confidences avoid bin edges (k/15): 0.9, 0.9, 0.7, 0.55.
#   i  p                     y  predicted  correct
#   0  [0.90, 0.05, 0.05]    0  0          yes
#   1  [0.05, 0.90, 0.05]    2  1          no
#   2  [0.20, 0.70, 0.10]    1  1          yes
#   3  [0.25, 0.20, 0.55]    0  2          no
# ECE, 15 bins: bin (13/15, 14/15] holds i0, i1: conf 0.9, acc 0.5, |gap| 0.4,  weight 2/4
#               bin (10/15, 11/15] holds i2:     conf 0.7, acc 1,   |gap| 0.3,  weight 1/4
#               bin ( 8/15,  9/15] holds i3:     conf 0.55, acc 0,  |gap| 0.55, weight 1/4
#   ECE = 0.5*0.4 + 0.25*0.3 + 0.25*0.55 = 0.4125
# ECE, 1 bin: |mean conf - acc| = |(0.9+0.9+0.7+0.55)/4 - 0.5| = 0.2625
# NLL = -(ln 0.9 + ln 0.05 + ln 0.7 + ln 0.25)/4 = (0.1053605 + 2.9957323 + 0.3566749 + 1.3862944)/4
# Brier: i0 0.1²+0.05²+0.05² = 0.015; i1 0.05²+0.9²+0.95² = 1.715; i2 0.2²+0.3²+0.1² = 0.14;
#        i3 0.75²+0.2²+0.55² = 0.905; mean = 2.775/4 = 0.69375
HAND_P = torch.tensor([[0.90, 0.05, 0.05], [0.05, 0.90, 0.05], [0.20, 0.70, 0.10], [0.25, 0.20, 0.55]],
                      dtype=torch.float64)
HAND_Y = torch.tensor([0, 2, 1, 0])


def random_probs(n: int, c: int, seed: int, sharpness: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharpness * torch.randn(n, c, generator=g, dtype=torch.float64), dim=1)


def numpy_ece(p: np.ndarray, y: np.ndarray, n_bins: int) -> float:
    """Reference ECE written out bin by bin: bins (lo, hi], the first one also holding 0."""
    confidence, predicted = p.max(1), p.argmax(1)
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for b in range(n_bins):
        inside = (confidence > edges[b]) & (confidence <= edges[b + 1])
        if b == 0:
            inside |= confidence == 0
        if inside.any():
            total += inside.mean() * abs((predicted[inside] == y[inside]).mean() - confidence[inside].mean())
    return total


def mann_whitney_auc(negative: np.ndarray, positive: np.ndarray) -> float:
    """P(positive score > negative score) + 0.5 P(tie), over all pairs."""
    diff = positive[:, None] - negative[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def numpy_entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.clip(p, 1e-12, None))).sum(1)


def test_hand_computed_example():
    assert accuracy(HAND_P, HAND_Y) == pytest.approx(0.5)
    assert expected_calibration_error(HAND_P, HAND_Y) == pytest.approx(0.4125, abs=1e-12)
    assert expected_calibration_error(HAND_P, HAND_Y, n_bins=1) == pytest.approx(0.2625, abs=1e-12)
    nll = -(math.log(0.9) + math.log(0.05) + math.log(0.7) + math.log(0.25)) / 4
    assert negative_log_likelihood(HAND_P, HAND_Y) == pytest.approx(nll, abs=1e-12)
    assert nll == pytest.approx(1.2110155, abs=1e-6)
    assert brier_score(HAND_P, HAND_Y) == pytest.approx(0.69375, abs=1e-12)


def test_hand_computed_reliability_bins():
    bins = reliability_bins(HAND_P, HAND_Y, n_bins=15)
    assert len(bins) == 15 and all(isinstance(b, ReliabilityBin) for b in bins)
    assert [b.count for b in bins] == [0] * 8 + [1, 0, 1, 0, 0, 2, 0]
    assert bins[0].lower == 0 and bins[-1].upper == 1
    assert all(b.upper == pytest.approx(b.lower + 1 / 15) for b in bins)
    assert (bins[13].confidence, bins[13].accuracy) == pytest.approx((0.9, 0.5))
    assert (bins[10].confidence, bins[10].accuracy) == pytest.approx((0.7, 1.0))
    assert (bins[8].confidence, bins[8].accuracy) == pytest.approx((0.55, 0.0))
    assert math.isnan(bins[0].confidence) and math.isnan(bins[0].accuracy)


def test_nll_clamps_zero_probability():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    assert negative_log_likelihood(p, torch.tensor([1, 0])) == pytest.approx((-math.log(1e-12) + math.log(2)) / 2)


def test_perfectly_calibrated_labels_give_small_ece():
    g = torch.Generator().manual_seed(0)
    p = torch.distributions.Dirichlet(torch.full((4,), 0.7)).sample((200_000,))
    y = torch.multinomial(p, 1, generator=g).squeeze(1)
    assert expected_calibration_error(p, y) < 0.01
    # the same confidences with labels that ignore them are badly calibrated
    assert expected_calibration_error(p, torch.randint(0, 4, (200_000,), generator=g)) > 0.2


@pytest.mark.parametrize("confidence", [1.0, 0.999])
def test_confidently_wrong_gives_ece_near_one(confidence):
    p = torch.tensor([[confidence, 1 - confidence]], dtype=torch.float64).repeat(50, 1)
    y = torch.ones(50, dtype=torch.long)
    assert accuracy(p, y) == 0
    assert expected_calibration_error(p, y) == pytest.approx(confidence, abs=1e-9)


@pytest.mark.parametrize("n_bins", [1, 5, 10, 15, 30])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_matches_numpy_and_torchmetrics(seed, n_bins):
    p = random_probs(2000, 5, seed)
    y = torch.randint(0, 5, (2000,), generator=torch.Generator().manual_seed(seed + 100))
    # labels that agree with the prediction more often than chance, so that ECE is not trivially large
    y = torch.where(torch.rand(2000, generator=torch.Generator().manual_seed(seed)) < 0.6, p.argmax(1), y)
    ece = expected_calibration_error(p, y, n_bins)
    assert ece == pytest.approx(numpy_ece(p.numpy(), y.numpy(), n_bins), abs=1e-12)
    # torchmetrics rounds confidences to float32, hence the looser tolerance
    reference = multiclass_calibration_error(p, y, num_classes=5, n_bins=n_bins, norm="l1").item()
    assert ece == pytest.approx(reference, abs=1e-6)


def test_confidence_one_shares_the_last_bin():
    # One instance at confidence 1.0 (wrong), one at 0.95 (right): one bin (14/15, 1] with conf 0.975,
    # acc 0.5, so ECE = 0.475. torchmetrics gives 1.0 a bin of its own and reports 0.5*1 + 0.5*0.05 = 0.525.
    p = torch.tensor([[1.0, 0.0], [0.95, 0.05]], dtype=torch.float64)
    y = torch.tensor([1, 0])
    assert expected_calibration_error(p, y) == pytest.approx(0.475, abs=1e-12)
    assert reliability_bins(p, y)[-1].count == 2


def test_bins_are_closed_on_the_right():
    # confidences exactly on the edges 0.5 and 0.75 of 4 bins (exact in binary) go to the bin below
    p = torch.tensor([[0.5, 0.5], [0.75, 0.25], [0.6, 0.4]], dtype=torch.float64)
    bins = reliability_bins(p, torch.zeros(3, dtype=torch.long), n_bins=4)
    assert [b.count for b in bins] == [0, 1, 2, 0]
    assert (bins[1].upper, bins[2].upper) == (0.5, 0.75)


def test_ece_equals_weighted_gap_of_reliability_bins():
    p, y = random_probs(500, 3, 7), torch.randint(0, 3, (500,))
    bins = reliability_bins(p, y, 10)
    assert sum(b.count for b in bins) == 500
    gap = sum(b.count / 500 * abs(b.accuracy - b.confidence) for b in bins if b.count)
    assert expected_calibration_error(p, y, 10) == pytest.approx(gap, abs=1e-12)


def test_predictive_entropy():
    p = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    assert predictive_entropy(p).tolist() == pytest.approx([math.log(4), 0.0, math.log(2)])
    samples = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # each sample certain, the mean is not
    assert predictive_entropy(samples).tolist() == pytest.approx([math.log(2)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ood_auroc_matches_mann_whitney(seed):
    p_in = random_probs(300, 4, seed, sharpness=4.0)
    p_out = random_probs(200, 4, seed + 10, sharpness=1.5)
    # repeated rows make tied entropies across the two sets, which count one half
    p_out = torch.cat([p_out, p_in[:50]])
    expected = mann_whitney_auc(numpy_entropy(p_in.numpy()), numpy_entropy(p_out.numpy()))
    assert 0.6 < expected < 1
    assert ood_auroc(p_in, p_out) == pytest.approx(expected, abs=1e-6)  # torchmetrics sums in float32


def test_ood_auroc_extremes():
    certain = torch.tensor([[0.99, 0.005, 0.005], [0.005, 0.99, 0.005], [0.9, 0.05, 0.05]])
    uncertain = torch.tensor([[0.4, 0.3, 0.3], [1 / 3, 1 / 3, 1 / 3]])
    assert ood_auroc(certain, uncertain) == 1.0
    assert ood_auroc(uncertain, certain) == 0.0
    assert ood_auroc(certain, certain) == pytest.approx(0.5)


def test_predictive_averages_samples():
    samples = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]])  # [S=2, N=2, C=2]
    mean = predictive(samples)
    assert mean.shape == (2, 2) and mean.dtype == torch.float64
    assert mean.tolist() == [[0.5, 0.5], [0.0, 1.0]]
    flat = torch.tensor([[0.3, 0.7]], dtype=torch.float32)
    assert predictive(flat).dtype == torch.float64 and predictive(flat)[0].tolist() == pytest.approx([0.3, 0.7])


def test_evaluate_on_samples_equals_evaluate_on_their_mean():
    g = torch.Generator().manual_seed(3)
    samples = torch.softmax(2 * torch.randn(8, 400, 6, generator=g), dim=-1)  # float32, as models give
    ood = torch.softmax(torch.randn(8, 100, 6, generator=g), dim=-1)
    y = torch.randint(0, 6, (400,), generator=g)
    on_samples = evaluate(samples, y, ood_probs=ood)
    on_mean = evaluate(samples.double().mean(0), y, ood_probs=ood.double().mean(0))
    assert on_samples.keys() == {"accuracy", "ece", "nll", "brier", "n", "ood_auroc"}
    assert on_samples == pytest.approx(on_mean, abs=1e-12)
    # averaging matters: the mean of the samples is better calibrated than any single sample
    assert on_samples["nll"] < evaluate(samples[0], y)["nll"]


def test_evaluate_returns_plain_python_numbers():
    result = evaluate(HAND_P.float(), HAND_Y.numpy())
    assert set(result) == {"accuracy", "ece", "nll", "brier", "n"}
    assert type(result["n"]) is int and result["n"] == 4
    assert all(type(result[k]) is float for k in ("accuracy", "ece", "nll", "brier"))
    assert result["ece"] == pytest.approx(0.4125, abs=1e-6) and result["accuracy"] == 0.5


def test_metrics_accept_numpy_and_integral_float_labels():
    assert accuracy(HAND_P.numpy(), np.array([0.0, 2.0, 1.0, 0.0])) == 0.5


@pytest.mark.parametrize("probs, labels, message", [
    (torch.full((4, 3), 1 / 3), torch.zeros(5, dtype=torch.long), "labels"),  # N mismatch
    (torch.full((4, 3), 1 / 3), torch.zeros(4, 1, dtype=torch.long), "labels"),  # labels not 1-D
    (torch.full((3,), 1 / 3), torch.zeros(1, dtype=torch.long), "shape"),  # probabilities 1-D
    (torch.full((2, 2, 4, 3), 1 / 3), torch.zeros(4, dtype=torch.long), "shape"),  # 4-D
    (torch.full((0, 3), 1 / 3), torch.zeros(0, dtype=torch.long), "at least one"),
    (torch.full((4, 3), 1 / 3), torch.tensor([0, 1, 3, 0]), r"\[0, 3\)"),  # label == C
    (torch.full((4, 3), 1 / 3), torch.tensor([0, -1, 2, 0]), r"\[0, 3\)"),  # negative label
    (torch.full((4, 3), 1 / 3), torch.tensor([0.0, 0.5, 1.0, 2.0]), "integers"),
    (torch.full((4, 3), 0.3), torch.zeros(4, dtype=torch.long), "sum to 1"),
    (torch.tensor([[0.5, 0.5], [0.6, 0.5]]), torch.zeros(2, dtype=torch.long), "row 1"),
    (torch.tensor([[1.5, -0.5], [0.5, 0.5]]), torch.zeros(2, dtype=torch.long), r"\[0, 1\]"),
    (torch.tensor([[2.0, -1.0]]), torch.zeros(1, dtype=torch.long), "logits"),
    (torch.tensor([[math.nan, 1.0]]), torch.zeros(1, dtype=torch.long), "NaN"),
])
def test_invalid_inputs_raise(probs, labels, message):
    for metric in (accuracy, expected_calibration_error, negative_log_likelihood, brier_score, evaluate):
        with pytest.raises(ValueError, match=message):
            metric(probs, labels)


def test_sum_tolerance_is_one_in_a_thousand():
    y = torch.zeros(1, dtype=torch.long)
    assert accuracy(torch.tensor([[0.6, 0.4005]], dtype=torch.float64), y) == 1.0
    with pytest.raises(ValueError, match="sum to 1"):
        accuracy(torch.tensor([[0.6, 0.402]], dtype=torch.float64), y)


def test_invalid_ood_and_bins_raise():
    with pytest.raises(ValueError, match="same classes"):
        evaluate(HAND_P, HAND_Y, ood_probs=torch.full((5, 4), 0.25))
    with pytest.raises(ValueError, match="sum to 1"):
        evaluate(HAND_P, HAND_Y, ood_probs=torch.full((5, 3), 0.5))
    for n_bins in (0, -1, 2.5):
        with pytest.raises(ValueError, match="n_bins"):
            expected_calibration_error(HAND_P, HAND_Y, n_bins)

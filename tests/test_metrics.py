"""Metrics against torchmetrics and against hand-worked examples."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bayes_peft.evaluation import metrics


def _random(n=500, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(n, c, generator=g, dtype=torch.float64), -1)
    labels = torch.randint(0, c, (n,), generator=g)
    return probs, labels


@pytest.mark.parametrize("n_bins", [5, 10, 15])
@pytest.mark.parametrize("c", [2, 4])
def test_ece_matches_torchmetrics(n_bins, c):
    from torchmetrics.functional.classification import multiclass_calibration_error

    probs, labels = _random(c=c, seed=n_bins)
    expected = multiclass_calibration_error(probs.float(), labels, num_classes=c, n_bins=n_bins, norm="l1")
    assert abs(metrics.ece(probs, labels, n_bins).item() - expected.item()) < 1e-6


def test_nll_and_brier_match_second_implementations():
    # torchmetrics has no NLL of probabilities; torch's nll_loss is the second implementation.
    from torchmetrics.functional import mean_squared_error

    probs, labels = _random()
    expected_nll = torch.nn.functional.nll_loss(probs.log(), labels)
    assert abs(metrics.nll(probs, labels).item() - expected_nll.item()) < 1e-6
    onehot = torch.nn.functional.one_hot(labels, 4).double()
    expected_brier = 4 * mean_squared_error(probs, onehot)  # MSE averages over classes; Brier sums them
    assert abs(metrics.brier(probs, labels).item() - expected_brier.item()) < 1e-6


def test_hand_worked_example():
    # Confidences sit mid-bin: 0.6 or 0.7 would land on a bin edge, where float rounding picks the side.
    probs = torch.tensor([[0.95, 0.05], [0.65, 0.35], [0.25, 0.75], [0.15, 0.85]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0])
    # Brier: 2·0.05² + 2·0.65² + 2·0.25² + 2·0.85² = 0.005 + 0.845 + 0.125 + 1.445 = 2.42, / 4 = 0.605
    assert metrics.brier(probs, labels).item() == pytest.approx(0.605, abs=1e-12)
    # 10 bins, one example each: right at 0.95, wrong at 0.65, right at 0.75, wrong at 0.85
    # ECE = (0.05 + 0.65 + 0.25 + 0.85) / 4 = 0.45
    assert metrics.ece(probs, labels).item() == pytest.approx(0.45, abs=1e-12)
    # 2 bins: (0, .5] is empty; (.5, 1] holds all four: acc 0.5, mean confidence 0.8 → 0.3
    assert metrics.ece(probs, labels, n_bins=2).item() == pytest.approx(0.3, abs=1e-12)
    m = metrics.compute_metrics(probs, labels)
    assert (m.acc, m.n) == (0.5, 4)
    assert m.nll == pytest.approx(-torch.tensor([0.95, 0.35, 0.75, 0.15], dtype=torch.float64).log().mean().item(), abs=1e-12)


def test_confident_error_is_finite_and_bad_shapes_are_refused():
    probs = torch.tensor([[1.0, 0.0]])
    assert torch.isfinite(metrics.nll(probs, torch.tensor([1])))
    with pytest.raises(ValueError, match="labels must lie"):
        metrics.compute_metrics(probs, torch.tensor([2]))
    with pytest.raises(ValueError, match="expected probs"):
        metrics.compute_metrics(probs, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="no examples"):
        metrics.compute_metrics(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))


def test_reliability_diagram_writes_a_png(tmp_path):
    probs, labels = _random()
    path = metrics.reliability_diagram(probs, labels, tmp_path / "sub" / "rel.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@st.composite
def predictions(draw):
    n = draw(st.integers(1, 40))
    c = draw(st.integers(2, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.floats(0.0, 20.0))
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(scale * torch.randn(n, c, generator=g, dtype=torch.float64), -1)
    labels = torch.randint(0, c, (n,), generator=g)
    return probs, labels, seed


@settings(max_examples=60, deadline=None)
@given(predictions(), st.integers(1, 20))
def test_metric_ranges_and_permutation_invariance(prediction, n_bins):
    probs, labels, seed = prediction
    m = metrics.compute_metrics(probs, labels, n_bins)
    assert 0.0 <= m.ece <= 1.0 and 0.0 <= m.brier <= 2.0 and m.nll >= 0.0 and 0.0 <= m.acc <= 1.0
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    permuted = metrics.compute_metrics(probs[order], labels[order], n_bins)
    for a, b in zip((m.acc, m.nll, m.ece, m.brier), (permuted.acc, permuted.nll, permuted.ece, permuted.brier)):
        assert a == pytest.approx(b, abs=1e-12)


def test_metrics_name_their_ece_bins():
    from bayes_peft.evaluation.metrics import compute_metrics

    probs = torch.tensor([[0.9, 0.1], [0.35, 0.65], [0.2, 0.8]])
    metrics = compute_metrics(probs, torch.tensor([0, 0, 1]), n_bins=15)
    assert metrics.n_bins == 15 and "ece(15 bins)" in str(metrics) and metrics.as_dict()["n_bins"] == 15

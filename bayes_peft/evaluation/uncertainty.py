"""Uncertainty a user can act on: per-example scores, OOD detection and selective prediction.

Scores, per example, from the predictive probabilities p̄ ``[N, C]`` and, for a predictive that averages
samples, the sample probabilities p_s ``[S, N, C]`` (natural logarithms throughout):

* ``max_prob``: max_c p̄_c, the confidence (higher = more certain);
* ``entropy``: H[p̄], the total uncertainty;
* ``expected_entropy``: (1/S) Σ_s H[p_s], the aleatoric part;
* ``mutual_information``: H[(1/S) Σ_s p_s] − (1/S) Σ_s H[p_s] ≥ 0, the epistemic part: how much the
  samples disagree.

OOD detection scores in-distribution inputs and out-of-distribution ones with one model and asks how well
an uncertainty separates them: AUROC (out-of-distribution is the positive class, higher uncertainty means
"out") and FPR@95 (the share of out-of-distribution inputs still accepted when the threshold keeps 95% of
the in-distribution ones). Selective prediction answers only the most confident part of the inputs: the
risk–coverage curve and its area (AURC, lower is better).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from torch import Tensor

__all__ = ["UncertaintyScores", "uncertainty_scores", "ood_auroc", "fpr_at_95_tpr", "risk_coverage", "aurc",
           "risk_coverage_of_errors",
           "accuracy_at_coverage", "selective_summary", "ood_summary", "draw_risk_coverage",
           "risk_coverage_plot"]

SCORES = ("max_prob", "entropy", "expected_entropy", "mutual_information")


def _entropy(probs: Tensor) -> Tensor:
    """H[p] over the last dimension, with 0 log 0 = 0."""
    probs = probs.double()
    return -torch.special.xlogy(probs, probs).sum(-1)


@dataclass(frozen=True)
class UncertaintyScores:
    """Per-example scores ``[N]`` (see the module docstring); the sample split is ``None`` without samples."""

    max_prob: Tensor
    entropy: Tensor
    expected_entropy: Optional[Tensor] = None
    mutual_information: Optional[Tensor] = None

    @property
    def available(self) -> list[str]:
        """The names of the scores this prediction has."""
        return [name for name in SCORES if getattr(self, name) is not None]

    def uncertainty(self, name: str) -> Tensor:
        """The score called ``name`` oriented so that higher means more uncertain (``max_prob`` is negated)."""
        if name not in self.available:
            raise ValueError(f"no uncertainty score {name!r} here; available: {self.available}")
        value = getattr(self, name)
        return -value if name == "max_prob" else value


def uncertainty_scores(probs: Tensor, sample_probs: Optional[Tensor] = None) -> UncertaintyScores:
    """Scores from the predictive ``probs`` ``[N, C]`` and, if given, the samples it averages ``[S, N, C]``."""
    if probs.ndim != 2:
        raise ValueError(f"expected probs [N, C], got {tuple(probs.shape)}")
    total = _entropy(probs)
    if sample_probs is None:
        return UncertaintyScores(probs.double().max(-1).values, total)
    if sample_probs.ndim != 3 or sample_probs.shape[1:] != probs.shape:
        raise ValueError(f"expected sample_probs [S, {probs.shape[0]}, {probs.shape[1]}], got {tuple(sample_probs.shape)}")
    expected = _entropy(sample_probs).mean(0)
    # H is concave, so H[mean p_s] ≥ mean H[p_s]; rounding may dip below zero by an ulp. The samples' own mean
    # (the predictive itself in sample mode) keeps the split exact whatever ``probs`` is.
    information = (_entropy(sample_probs.double().mean(0)) - expected).clamp_min(0)
    return UncertaintyScores(probs.double().max(-1).values, total, expected, information)


def _ranks(values: Tensor) -> Tensor:
    """1-based ranks with ties given their average rank (as the Mann–Whitney statistic needs)."""
    values = values.double()
    order = torch.argsort(values, stable=True)
    _, inverse, counts = torch.unique(values[order], return_inverse=True, return_counts=True)
    first = counts.cumsum(0) - counts  # 0-based position of each distinct value's first copy
    ranks = torch.empty_like(values)
    ranks[order] = (first + (counts + 1) / 2).double()[inverse]
    return ranks


def ood_auroc(uncertainty_in: Tensor, uncertainty_out: Tensor) -> float:
    """P(u_out > u_in) + ½ P(u_out = u_in): the area under the ROC curve that tells out-of-distribution
    inputs (positives) from in-distribution ones by an uncertainty (higher = more likely out). 0.5 is chance."""
    n_in, n_out = len(uncertainty_in), len(uncertainty_out)
    if n_in == 0 or n_out == 0:
        raise ValueError("AUROC needs at least one in- and one out-of-distribution score")
    ranks = _ranks(torch.cat([uncertainty_in.double(), uncertainty_out.double()]))
    return float((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out))


def fpr_at_95_tpr(uncertainty_in: Tensor, uncertainty_out: Tensor) -> float:
    """The share of out-of-distribution inputs accepted as in-distribution when the threshold on the
    uncertainty accepts (at least) 95% of the in-distribution ones: lower is better, 0.95 is chance."""
    if len(uncertainty_in) == 0 or len(uncertainty_out) == 0:
        raise ValueError("FPR@95 needs at least one in- and one out-of-distribution score")
    accepted = math.ceil(0.95 * len(uncertainty_in))
    threshold = torch.sort(uncertainty_in.double()).values[accepted - 1]
    return float((uncertainty_out.double() <= threshold).double().mean())


def risk_coverage(probs: Tensor, labels: Tensor, uncertainty: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``(coverage [N], risk [N])``: answering only the k most certain examples (k = 1…N), the share
    answered and the error rate among them. ``uncertainty`` defaults to 1 − max probability.

    Examples of equal uncertainty are answered in a random order, in expectation: of a tied group with
    error rate r, the first j answered hold j·r errors. So the curve does not depend on the examples'
    order, and a predictive that saturates (many confidences of exactly 1.0) gets no credit for an order
    it does not have.
    """
    if uncertainty is None:
        uncertainty = -probs.double().max(-1).values
    return risk_coverage_of_errors(probs.argmax(-1) != labels, uncertainty)


def risk_coverage_of_errors(errors: Tensor, uncertainty: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`risk_coverage` of any answers, given which are wrong (``errors [N]``, bool) and their uncertainty."""
    order = torch.argsort(uncertainty.double(), stable=True)
    errors = errors.double()[order]
    _, counts = torch.unique_consecutive(uncertainty.double()[order], return_counts=True)
    group = torch.repeat_interleave(torch.arange(len(counts), device=errors.device), counts)
    group_errors = torch.zeros(len(counts), dtype=torch.float64, device=errors.device).index_add_(0, group, errors)
    start = counts.cumsum(0) - counts
    answered = torch.arange(1, len(errors) + 1, dtype=torch.float64, device=errors.device)
    within = answered - start[group]  # 1…k inside each tied group
    expected_errors = (group_errors.cumsum(0) - group_errors)[group] + within * (group_errors / counts)[group]
    return answered / len(errors), expected_errors / answered


def aurc(probs: Tensor, labels: Tensor, uncertainty: Optional[Tensor] = None) -> float:
    """The area under the risk–coverage curve, (1/N) Σ_k risk(k/N): lower is better; a perfect ranking of
    the errors reaches its minimum for the model's accuracy."""
    return float(risk_coverage(probs, labels, uncertainty)[1].mean())


def accuracy_at_coverage(probs: Tensor, labels: Tensor, coverage: float, uncertainty: Optional[Tensor] = None) -> float:
    """The accuracy on the most certain ``coverage`` share of the examples (at least one example)."""
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must lie in (0, 1], got {coverage}")
    return _accuracy_at(risk_coverage(probs, labels, uncertainty)[1], coverage)


def _accuracy_at(risk: Tensor, coverage: float) -> float:
    """1 − risk after answering the ``coverage`` share (at least one example)."""
    k = max(1, int(round(coverage * len(risk))))
    return float(1 - risk[k - 1])


def selective_summary(probs: Tensor, labels: Tensor, scores: UncertaintyScores,
                      coverage: float = 0.8) -> dict[str, dict[str, float]]:
    """``{score: {"aurc", "accuracy_at_coverage"}}`` for every score in ``scores``, answering the most certain
    inputs first by that score (one risk–coverage curve a score gives both)."""
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must lie in (0, 1], got {coverage}")
    summary = {}
    for name in scores.available:
        _, risk = risk_coverage(probs, labels, scores.uncertainty(name))
        summary[name] = {"aurc": float(risk.mean()), "accuracy_at_coverage": _accuracy_at(risk, coverage)}
    return summary


def ood_summary(scores_in: UncertaintyScores, scores_out: UncertaintyScores) -> dict[str, dict[str, float]]:
    """``{score: {"auroc", "fpr_at_95_tpr"}}`` for every score both predictions have."""
    return {name: {"auroc": ood_auroc(scores_in.uncertainty(name), scores_out.uncertainty(name)),
                   "fpr_at_95_tpr": fpr_at_95_tpr(scores_in.uncertainty(name), scores_out.uncertainty(name))}
            for name in scores_in.available if name in scores_out.available}


def draw_risk_coverage(ax, predictions: Mapping[str, object]) -> None:
    """Draw the risk–coverage curves (by max probability) of named predictions (anything with ``probs`` and
    ``labels``, e.g. :class:`~bayes_peft.evaluation.evaluator.Prediction`) on a matplotlib axis, each with its AURC."""
    for name, prediction in predictions.items():
        coverage, risk = risk_coverage(prediction.probs.cpu(), prediction.labels.cpu())
        ax.plot(coverage.numpy(), risk.numpy(), linewidth=1, label=f"{name} (AURC {float(risk.mean()):.3f})")
    ax.set_xlabel("coverage (most certain answered first)")
    ax.set_ylabel("risk (error rate of the answered)")
    ax.legend(fontsize=6)


def risk_coverage_plot(predictions: Mapping[str, object], path: Union[str, Path], title: str = "") -> Path:
    """Write :func:`draw_risk_coverage` as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .metrics import save_figure

    fig, ax = plt.subplots(figsize=(5, 4))
    draw_risk_coverage(ax, predictions)
    ax.set_title(title or "risk–coverage")
    return save_figure(fig, path)

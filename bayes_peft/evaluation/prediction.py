"""A predictive's probabilities on a split, with its metrics and uncertainty scores."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor

from .metrics import Metrics, compute_metrics
from .uncertainty import UncertaintyScores, ood_summary, selective_summary, uncertainty_scores

__all__ = ["Prediction"]


@dataclass
class Prediction:
    """Per-example predictive probabilities ``[N, C]`` and labels ``[N]``, on the evaluator's device; for
    the sample-averaged and the linearized predictive also the probabilities of each sample (of the weights,
    or of the logits), ``sample_probs`` ``[S, N, C]``, which split the uncertainty (:meth:`uncertainty`)."""

    probs: Tensor
    labels: Tensor
    sample_probs: Optional[Tensor] = field(default=None, repr=False)

    def metrics(self, n_bins: int = 10) -> Metrics:
        return compute_metrics(self.probs, self.labels, n_bins)

    def uncertainty(self) -> UncertaintyScores:
        """Per-example max probability and entropy, and with samples their split into expected entropy
        (aleatoric) and mutual information (epistemic); see :mod:`bayes_peft.evaluation.uncertainty`."""
        return uncertainty_scores(self.probs, self.sample_probs)

    def selective(self, coverage: float = 0.8) -> dict[str, dict[str, float]]:
        """Selective prediction by each uncertainty score: ``{score: {"aurc", "accuracy_at_coverage"}}``."""
        return selective_summary(self.probs, self.labels, self.uncertainty(), coverage)

    def ood_detection(self, out_of_distribution: "Prediction") -> dict[str, dict[str, float]]:
        """How well each uncertainty score tells this prediction's inputs (in-distribution) from those of
        ``out_of_distribution``, scored by the same model: ``{score: {"auroc", "fpr_at_95_tpr"}}``."""
        return ood_summary(self.uncertainty(), out_of_distribution.uncertainty())

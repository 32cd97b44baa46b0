"""Classification metrics of predictive probabilities: ACC, NLL, ECE, Brier and the reliability diagram.

Every function takes ``probs`` ``[N, C]`` (rows sum to one) and integer ``labels`` ``[N]``, and returns a
mean over the N examples. For a sample-averaged predictive, pass the mean of the sample probabilities,
never probabilities of averaged logits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["Metrics", "accuracy", "nll", "ece", "brier", "compute_metrics", "reliability", "reliability_diagram",
           "binned_reliability", "binned_ece",
           "mean_and_se", "shift_plot"]


@dataclass(frozen=True)
class Metrics:
    """Mean accuracy, negative log-likelihood, expected calibration error and Brier score over ``n`` examples.

    ``ece`` is a fraction (the tables print it ×100) over ``n_bins`` equal-width confidence bins; ECE
    depends on the bin count, so compare figures only at the same one.
    """

    acc: float
    nll: float
    ece: float
    brier: float
    n: int
    n_bins: int = 10

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"acc {self.acc:.4f}  nll {self.nll:.4f}  ece({self.n_bins} bins) {self.ece:.4f}  "
                f"brier {self.brier:.4f}  (n={self.n})")


def _check(probs: Tensor, labels: Tensor) -> None:
    if probs.ndim != 2 or labels.ndim != 1 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"expected probs [N, C] and labels [N], got {tuple(probs.shape)} and {tuple(labels.shape)}")
    if probs.shape[0] == 0:
        raise ValueError("no examples to score")
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(f"labels must lie in [0, {probs.shape[1]})")


def accuracy(probs: Tensor, labels: Tensor) -> Tensor:
    return (probs.argmax(-1) == labels).double().mean()


def nll(probs: Tensor, labels: Tensor) -> Tensor:
    """−log p̄(y), with p̄ clamped at the smallest normal float so that a confident error stays finite."""
    picked = probs.gather(-1, labels[:, None]).squeeze(-1).double()
    return -picked.clamp_min(torch.finfo(probs.dtype).tiny).log().mean()


def brier(probs: Tensor, labels: Tensor) -> Tensor:
    """Σ_c (p̄_c − 1[c = y])², summed over classes (as in the IVON-LoRA tables), averaged over examples."""
    onehot = torch.nn.functional.one_hot(labels, probs.shape[-1]).to(torch.float64)
    return (probs.double() - onehot).square().sum(-1).mean()


def reliability(probs: Tensor, labels: Tensor, n_bins: int = 10) -> tuple[Tensor, Tensor, Tensor]:
    """Per equal-width confidence bin: (count, accuracy, mean confidence), each ``[n_bins]``.

    Bin b holds confidences in (b/n_bins, (b+1)/n_bins]; a confidence of exactly 0 falls in the first bin.
    """
    confidence, predicted = probs.double().max(-1)
    return binned_reliability(confidence, predicted == labels, n_bins)


def binned_reliability(confidence: Tensor, correct: Tensor, n_bins: int = 10) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`reliability` of any confidence ``[N]`` in [0, 1] against whether its answer was ``correct`` ``[N]``
    (a generated answer's probability, say): (count, accuracy, mean confidence) per bin."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    confidence, correct = confidence.double(), correct.double()
    bins = (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64, device=confidence.device).index_add_(0, bins, torch.ones_like(correct))
    hits = torch.zeros_like(count).index_add_(0, bins, correct)
    conf = torch.zeros_like(count).index_add_(0, bins, confidence)
    safe = count.clamp_min(1)
    return count, hits / safe, conf / safe


def ece(probs: Tensor, labels: Tensor, n_bins: int = 10) -> Tensor:
    """Σ_b |B_b|/N · |acc_b − conf_b| over equal-width confidence bins (the L1 calibration error)."""
    return _calibration_error(*reliability(probs, labels, n_bins))


def binned_ece(confidence: Tensor, correct: Tensor, n_bins: int = 10) -> Tensor:
    """:func:`ece` of any confidence ``[N]`` against whether its answer was ``correct`` ``[N]``."""
    return _calibration_error(*binned_reliability(confidence, correct, n_bins))


def _calibration_error(count: Tensor, acc: Tensor, conf: Tensor) -> Tensor:
    return (count / count.sum() * (acc - conf).abs()).sum()


def compute_metrics(probs: Tensor, labels: Tensor, n_bins: int = 10) -> Metrics:
    """All four metrics at once, computed on the tensors' device with a single synchronisation at the end."""
    _check(probs, labels)
    values = torch.stack([accuracy(probs, labels), nll(probs, labels), ece(probs, labels, n_bins),
                          brier(probs, labels)]).tolist()
    return Metrics(*values, n=int(labels.shape[0]), n_bins=n_bins)


def reliability_diagram(probs: Tensor, labels: Tensor, path: Union[str, Path], n_bins: int = 10,
                        title: Optional[str] = None) -> Path:
    """Write a reliability diagram (accuracy against confidence per bin, with the bins' counts) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _check(probs, labels)
    count, acc, conf = (t.cpu() for t in reliability(probs, labels, n_bins))
    edges = torch.linspace(0, 1, n_bins + 1)
    width = 1.0 / n_bins
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    filled = count > 0
    top.bar(edges[:-1][filled], acc[filled], width=width, align="edge", edgecolor="black", label="accuracy")
    top.bar(edges[:-1][filled], (conf - acc)[filled], bottom=acc[filled], width=width, align="edge",
            color="tab:red", alpha=0.35, label="gap to confidence")
    top.plot([0, 1], [0, 1], "k--", linewidth=1)
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.legend(loc="upper left")
    top.set_title(title or f"ECE {ece(probs, labels, n_bins).item():.3f}")
    bottom.bar(edges[:-1], count, width=width, align="edge", color="gray", edgecolor="black")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("examples")
    bottom.set_xlim(0, 1)
    return save_figure(fig, path)


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """The mean of ``values`` (one per seed) and its standard error (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values)) ** 0.5


def shift_plot(metrics: Mapping[str, Mapping[int, Sequence[Metrics]]], path: Union[str, Path], title: str = "",
               baseline: Optional[str] = None) -> Path:
    """Ovadia et al.'s picture of calibration under shift: ECE and NLL against the shift's severity, one line
    per method (``{method: {severity: [Metrics per seed]}}``), mean ± standard error over seeds. The
    ``baseline`` method's line is drawn black and thick, on top, as the one to beat."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    # A comparison has more methods than a colour cycle: colour and marker together tell each line apart.
    colours, markers = plt.get_cmap("tab20").colors, "os^Dv<>pPXh*"
    for ax, (label, get) in zip(axes, (("ECE×100", lambda m: 100 * m.ece), ("NLL", lambda m: m.nll))):
        for k, (method, by_severity) in enumerate(metrics.items()):
            severities = sorted(by_severity)
            means, errors = zip(*(mean_and_se([get(m) for m in by_severity[s]]) for s in severities))
            style = (dict(color="black", linewidth=2.5, zorder=3) if method == baseline else
                     dict(color=colours[(2 * k + k // 10) % len(colours)], linewidth=1.2))
            ax.errorbar(severities, means, yerr=errors, marker=markers[k % len(markers)], markersize=4, capsize=2,
                        label=method, **style)
        ax.set_xlabel("severity (0: the clean test split)")
        ax.set_ylabel(label)
    n_bins = next(iter(next(iter(metrics.values())).values()))[0].n_bins
    axes[0].set_ylabel(f"ECE×100 ({n_bins} bins)")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(title or "calibration under shift", fontsize=10)
    return save_figure(fig, path)


def save_figure(fig, path: Union[str, Path]) -> Path:
    """Write a matplotlib figure as a PNG (creating the folder) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

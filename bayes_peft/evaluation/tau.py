"""τ sweeps: a method's metrics at several posterior scales τ, and IVON-LoRA's error-against-NLL plot."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence, Union

from .metrics import Metrics, mean_and_se, save_figure
from .prediction import Prediction

__all__ = ["TauSweep", "widened_until_bracketed", "tau_tradeoff_plot"]


@dataclass
class TauSweep:
    """The metrics of one method at several τ; ``plot`` draws error against NLL, one point a τ."""

    method: str
    taus: list[float]
    metrics: list[Metrics]
    predictions: list[Prediction] = field(default_factory=list, repr=False)

    @classmethod
    def of(cls, method: str, taus: Sequence[float], predictions: Sequence[Prediction]) -> "TauSweep":
        """The sweep of ``predictions``, one a τ of ``taus``, with their metrics."""
        return cls(method, list(taus), [p.metrics() for p in predictions], list(predictions))

    def best(self, metric: str = "nll") -> float:
        """The τ with the lowest ``metric`` (``"nll"``, ``"ece"`` or ``"brier"``), the smallest τ on a tie.

        Sweep a validation split and use its best τ on the test split, to pick τ without looking at the
        test labels: ``tau = ev.sweep_tau(val_loader, method="sample").best()``.
        """
        if metric not in ("nll", "ece", "brier"):
            raise ValueError(f"metric must be 'nll', 'ece' or 'brier', got {metric!r}")
        return min(zip(self.taus, self.metrics), key=lambda pair: (getattr(pair[1], metric), pair[0]))[0]

    def extended(self, other: "TauSweep") -> "TauSweep":
        """This sweep followed by ``other``'s points (the same method, at larger τ)."""
        return TauSweep(self.method, self.taus + other.taus, self.metrics + other.metrics,
                        self.predictions + other.predictions)

    def table(self) -> str:
        """A markdown table, one row a τ."""
        lines = ["| τ | ACC | NLL | ECE | Brier |", "|---|---|---|---|---|"]
        for tau, m in zip(self.taus, self.metrics):
            lines.append(f"| {tau:g} | {m.acc:.4f} | {m.nll:.4f} | {m.ece:.4f} | {m.brier:.4f} |")
        return "\n".join(lines)

    def plot(self, path: Union[str, Path], others: Sequence["TauSweep"] = (), title: str = "") -> Path:
        """Error against NLL as τ grows (IVON-LoRA's Figure 1), with any other sweeps on the same axes."""
        return tau_tradeoff_plot({sweep.method: [sweep] for sweep in (self, *others)}, path, title)


def widened_until_bracketed(sweep_at: Callable[[Sequence[float]], TauSweep], taus: Sequence[float],
                            ceiling: float, metric: str = "nll", growth: float = 2.0) -> TauSweep:
    """``sweep_at(taus)``, then, while its best τ (by ``metric``) is the largest swept, one more point at
    ``growth`` times that τ, as long as it stays at most ``ceiling``: a grid whose top is the best has not
    bracketed the optimum, and temperature scaling's T has no upper bound either. Returns every point swept."""
    if not taus or any(t < 0 for t in taus) or list(taus) != sorted(taus):
        raise ValueError(f"taus must be ≥ 0 and increasing, got {list(taus)}")
    sweep = sweep_at(list(taus))
    while sweep.best(metric) == sweep.taus[-1] and 0 < sweep.taus[-1] * growth <= ceiling:
        sweep = sweep.extended(sweep_at([sweep.taus[-1] * growth]))
    return sweep


def tau_tradeoff_plot(sweeps: Mapping[str, Sequence[TauSweep]], path: Union[str, Path], title: str = "") -> Path:
    """IVON-LoRA's Figure 1 on the left: test error against NLL as τ moves, one curve per method (``{method:
    [its sweep per seed]}``, every sweep over the same τ grid), each point the mean over seeds with the NLL's
    ± standard-error bars; on the right the same NLLs against τ, where curves that share their error stay
    apart. Only the ends of each curve carry their τ, and an end near one already labelled carries none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (trade, by_tau) = plt.subplots(1, 2, figsize=(11, 4.5))
    # Curves that coincide (every Laplace prior of one checkpoint shares its τ = 0 point, the MAP; a linearized
    # predictive keeps the MAP's error at every τ) stay apart by line style and marker.
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."), ("v", (0, (5, 1)))]
    ends: list[tuple[float, float, str, str]] = []  # (NLL, error, text, colour) of each curve's labelled ends
    for k, (method, runs) in enumerate(sweeps.items()):
        taus = runs[0].taus
        if any(run.taus != taus for run in runs):
            raise ValueError(f"{method}: every seed's sweep must use the same τ grid")
        nll = [mean_and_se([run.metrics[i].nll for run in runs]) for i in range(len(taus))]
        error = [mean_and_se([100 * (1 - run.metrics[i].acc) for run in runs]) for i in range(len(taus))]
        marker, linestyle = styles[k % len(styles)]
        style = dict(marker=marker, linestyle=linestyle, markersize=4, capsize=2,
                     markerfacecolor="none" if k % 2 else None)
        # Only NLL's bars on the left: the error's spread over seeds is the checkpoints', the same at every τ for
        # a linearized predictive, and its bars would hide the curves (the tables give it).
        line = trade.errorbar([m for m, _ in nll], [m for m, _ in error], xerr=[e for _, e in nll], label=method,
                              **style)
        by_tau.errorbar(taus, [m for m, _ in nll], yerr=[e for _, e in nll], label=method,
                        color=line[0].get_color(), **style)
        if (nll[0][0], error[0][0]) == (nll[-1][0], error[-1][0]):  # a curve that τ does not move
            ends.append((nll[0][0], error[0][0], f"τ={taus[0]:g}…{taus[-1]:g}", line[0].get_color()))
        else:
            ends += [(nll[i][0], error[i][0], f"τ={taus[i]:g}", line[0].get_color()) for i in (0, len(taus) - 1)]
    trade.margins(x=0.1, y=0.1)  # room for the end labels
    placed: list[tuple[float, float]] = []  # where labels went, in pixels (a label is about 30 × 10)
    for x, y, text, colour in ends:
        px, py = trade.transData.transform((x, y))
        if any(abs(px - qx) < 30 and abs(py - qy) < 14 for qx, qy in placed):
            continue
        placed.append((px, py))
        trade.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=colour)
    n_seeds = max(len(runs) for runs in sweeps.values())
    trade.set_xlabel("test NLL")
    trade.set_ylabel("test error (%)")
    by_tau.set_xlabel("τ (posterior variance scale)")
    by_tau.set_ylabel("test NLL")
    by_tau.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    seeds = f", mean over {n_seeds} seeds ± the NLL's SE" if n_seeds > 1 else ""
    fig.suptitle(title or "τ trade-off", fontsize=10)
    trade.set_title(f"error against NLL as τ moves{seeds}", fontsize=9)
    by_tau.set_title("NLL against τ", fontsize=9)
    return save_figure(fig, path)

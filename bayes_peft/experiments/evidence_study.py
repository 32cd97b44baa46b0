"""Where the evidence prior can be trusted: Laplace-LoRA's prior precision along a training run.

At checkpoints of one AdamW run, Laplace-LoRA is fitted with two constructions of the Kronecker factors:

- ``"ours"``: this package's KFAC-reduce over the LoRA of q_proj and v_proj, ``laplace.n_kfac`` kept;
- ``"laplace-lora"``: Laplace-LoRA's own, on a run with LoRA on the output layer too: every token position a
  row of the factors, the input factor summed over positions (``kfac="tokens"``), the large factor kept at the
  model's width (full rank on every layer but lm_head's ``lora_B``, whose output is the vocabulary), and the
  output layer's LoRA in the posterior.

At each one it records what the evidence sees (the fitting data's mean Σ_c p_c(1 − p_c), the Fisher's largest
eigenvalue, the effective number of parameters γ at the default evidence's λ*), the λ of every prior, and the
test metrics of the MAP and of the linearized predictive under each prior. The priors
(:data:`EVIDENCE_VARIANTS`, then the validation log-likelihood's) are the evidence as published (centred at
0, every direction), on the kept span only, centred at the adapter's initialisation θ₀, centred with one λ
per kind of layer, centred on the kept span (``prior="evidence"`` now), and the linearised model's evidence
centred at θ₀ (each direction charged as far as the data pin it). If the evidence fails only when
the MAP saturates, its λ* and ECE follow Σ p(1 − p) along training under both constructions; if the
construction is to blame, the two constructions part.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, NamedTuple, Sequence

import torch

from ..config import RunConfig
from ..evaluation.metrics import Metrics, compute_metrics, save_figure
from ..laplace import evidence_prior, fit_laplace, validation_prior
from ..laplace.diagnostics import effective_parameters
from ..laplace.prior import linearized_probs, linearized_terms
from .runs import Checkpoint, train_stages
from .tables import markdown_table

__all__ = ["Factoring", "FACTORINGS", "SETTINGS", "EvidenceVariant", "EVIDENCE_VARIANTS", "papers_optimizer",
           "EvidencePoint", "evidence_along_training", "epoch_steps", "evidence_plot", "evidence_table"]


@dataclass(frozen=True)
class Factoring:
    """How one construction of the factors is trained and fitted: the training (``"adamw"`` or
    ``"adamw_lm_head"``), the positions' ``kfac`` and whether the large factor is kept at the model's width."""

    optimizer: str
    kfac: str
    full_rank: bool


FACTORINGS: dict[str, Factoring] = {"ours": Factoring("adamw", "reduce", False),
                                    "laplace-lora": Factoring("adamw_lm_head", "tokens", True)}


def papers_optimizer(config: RunConfig) -> RunConfig:
    """``config`` trained as both papers train (linear decay of the learning rate to 0, weight decay 0, LoRA
    dropout 0.1, batch 4) for as many epochs as ``config``, at AdamW lr 3.5e-4: the papers' 5e-5 for Llama-2-7B
    (width 4096) times 4096 / 576 for SmolLM2-135M's width, since Adam's learning rate for hidden matrices
    scales as 1 / width (μP, Yang et al. 2022). Weight decay 0 and dropout 0.1 are already every run's."""
    epochs_of_steps = config.train.steps * config.train.batch_size
    return config.override({"train.lr_schedule": "linear", "train.batch_size": 4, "train.adamw_lr": 3.5e-4,
                            "train.steps": max(1, round(epochs_of_steps / 4))})


SETTINGS: dict[str, Callable[[RunConfig], RunConfig]] = {"ours": lambda config: config,
                                                         "papers'": papers_optimizer}

class EvidenceVariant(NamedTuple):
    """One way to read the evidence: centred at θ₀ or 0, on the kept eigenbasis span only, one λ for the model or
    one per kind, or the linearised model's evidence (:func:`bayes_peft.laplace.prior.linearized_log_evidence`)."""

    centred: bool
    subspace: bool
    granularity: str = "model"
    linearized: bool = False


EVIDENCE_VARIANTS: dict[str, EvidenceVariant] = {
    "evidence at 0": EvidenceVariant(False, False),  # Laplace-LoRA's Algorithm 2 as published
    "span at 0": EvidenceVariant(False, True),
    "centred": EvidenceVariant(True, False),
    "centred, per kind": EvidenceVariant(True, False, "kind"),
    "centred span": EvidenceVariant(True, True),  # prior="evidence"
    "linearised, centred": EvidenceVariant(True, False, linearized=True),
}
DEFAULT_EVIDENCE = "centred span"


@dataclass
class EvidencePoint:
    """One checkpoint under one factoring: what the evidence saw, each prior's λ and the test metrics."""

    factoring: str
    step: int
    epoch: float
    p_one_minus_p: float  # mean over the fitting data of Σ_c p_c (1 − p_c)
    largest_eigenvalue: float
    gamma: float  # Σ e / (λ* + e) at the default evidence's λ*
    lambdas: dict[str, list[float]]  # prior → its distinct λ (one, or lora_A's and lora_B's per kind)
    metrics: dict[str, Metrics]  # "MAP" and every prior → test metrics of its linearized predictive

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping) -> "EvidencePoint":
        """A point written by :meth:`to_json`, or by the study before it compared the evidence's variants."""
        if "lambdas" not in data:
            old = {"evidence at 0": "evidence", "span at 0": "subspace", "validation": "validation"}
            data = {**{k: data[k] for k in ("factoring", "step", "epoch", "p_one_minus_p", "largest_eigenvalue",
                                             "gamma")},
                    "lambdas": {new: [data[f"{key}_lambda"]] for new, key in old.items()},
                    "metrics": {"MAP": data["map"], **{new: data[key] for new, key in old.items()}}}
        return cls(**{**data, "metrics": {k: Metrics(**v) for k, v in data["metrics"].items()}})


def epoch_steps(config: RunConfig, epochs: Sequence[float]) -> list[int]:
    """The training steps at the end of ``epochs`` (an epoch: ⌈n_train / batch⌉ steps), capped at the run's."""
    per_epoch = config.train.steps_per_epoch(config.data.n_train)
    return sorted({min(config.train.steps, max(1, round(e * per_epoch))) for e in epochs})


def _point(name: str, factoring: Factoring, checkpoint: Checkpoint, step: int, per_epoch: int) -> EvidencePoint:
    settings, evaluation = checkpoint.config.laplace, checkpoint.config.eval
    width = checkpoint.model.get_base_model().config.hidden_size
    fit = fit_laplace(checkpoint.model, checkpoint.loader("train"), n_kfac=width if factoring.full_rank else settings.n_kfac,
                      prior=1.0, fisher=settings.fisher, kfac=factoring.kfac, progress=checkpoint.config.progress,
                      prior_mean=checkpoint.initial_weights())
    at_zero = fit.with_prior_mean(None)
    priors = {name: evidence_prior(fit if v.centred else at_zero, v.granularity, v.subspace, v.linearized)
              for name, v in EVIDENCE_VARIANTS.items()}
    priors["validation"] = validation_prior(fit, checkpoint.loader("validation"), link=evaluation.link)
    # The test split's Jacobians once: the MAP and every prior's linearized predictive read them.
    test = linearized_terms(fit, checkpoint.loader("test"))
    labels = torch.cat([labels for _, labels, _ in test])

    def metrics(probs):
        return compute_metrics(probs.float(), labels, evaluation.ece_bins)

    def linearized(prior):
        return metrics(linearized_probs(fit.with_prior_precision(prior), test, None, link=evaluation.link))

    largest = max(float(b.eigenvalues.max()) for b in fit.bases.values())
    return EvidencePoint(name, step, step / per_epoch, fit.p_one_minus_p, largest,
                         effective_parameters(fit, priors[DEFAULT_EVIDENCE]),
                         {name: sorted(set(prior.values())) for name, prior in priors.items()},
                         {"MAP": metrics(torch.cat([torch.softmax(logits, -1) for logits, _, _ in test])),
                          **{name: linearized(prior) for name, prior in priors.items()}})


def evidence_along_training(config: RunConfig, run_dir, epochs: Sequence[float],
                            factorings: Mapping[str, Factoring] = FACTORINGS,
                            done: Mapping[tuple[str, int], EvidencePoint] = {},
                            log: Callable[[str], None] = print) -> Iterator[EvidencePoint]:
    """:class:`EvidencePoint` at the end of each of ``epochs`` of ``config``'s run, for every factoring, each
    yielded as soon as it is fitted (a caller saves it; a fit takes minutes on a CPU).

    Each factoring's training runs once, stage by stage (:func:`bayes_peft.experiments.runs.train_stages`), and leaves its
    checkpoints under ``run_dir``, which later calls reuse. ``done``: points of an earlier call by
    ``(factoring, step)``, yielded again without a fit. ``config.data.n_train`` must be set (an epoch's
    length) and the task must hold a validation split (the validation prior's data).
    """
    if not config.data.n_train:
        raise ValueError("the study counts epochs: set data.n_train")
    if not config.data.val_split:
        raise ValueError("the study compares the evidence with the validation prior: it needs data.val_split > 0")
    steps, per_epoch = epoch_steps(config, epochs), config.train.steps_per_epoch(config.data.n_train)
    task = config.load_task()
    for name, factoring in factorings.items():
        missing = [step for step in steps if (name, step) not in done]
        # Lazily: a stage's model is loaded (or trained) only when its point is fitted.
        stages = iter(train_stages(config, factoring.optimizer, Path(run_dir) / factoring.optimizer, missing, task)
                      if missing else ())
        for step in steps:
            if (name, step) in done:
                yield done[name, step]
                continue
            _, checkpoint = next(stages)
            point = _point(name, factoring, checkpoint, step, per_epoch)
            log(f"{name} step {step} (epoch {point.epoch:g}): Σp(1−p) {point.p_one_minus_p:.2e}, largest eigenvalue "
                f"{point.largest_eigenvalue:.3g}, γ {point.gamma:.1f}; λ, NLL, ECE×100: " + "; ".join(
                    f"{prior} {_lambdas(point, prior)}, {m.nll:.3f}, {100 * m.ece:.1f}"
                    for prior, m in point.metrics.items()))
            yield point


def _lambdas(point: EvidencePoint, prior: str) -> str:
    return " / ".join(f"{lam:.3g}" for lam in point.lambdas.get(prior, [])) or "–"


def evidence_table(points: Sequence[EvidencePoint]) -> str:
    """One markdown row per (factoring, checkpoint): what the evidence sees, then for the MAP and each prior its
    λ and test ACC / NLL / ECE×100 (a per-kind prior's λ: lora_A's / lora_B's)."""
    priors = list(dict.fromkeys(prior for p in points for prior in p.metrics))
    columns = ["factoring", "epoch", "step", "Σp(1−p)", "largest eigenvalue", "γ",
               *(f"{prior}: λ; ACC / NLL / ECE×100" if prior != "MAP" else "MAP: ACC / NLL / ECE×100"
                 for prior in priors)]

    def cell(point, prior):
        if prior not in point.metrics:
            return "–"
        m = point.metrics[prior]
        scores = f"{m.acc:.3f} / {m.nll:.3f} / {100 * m.ece:.1f}"
        return scores if prior == "MAP" else f"{_lambdas(point, prior)}; {scores}"

    rows = [[p.factoring, f"{p.epoch:g}", p.step, f"{p.p_one_minus_p:.2e}", f"{p.largest_eigenvalue:.3g}",
             f"{p.gamma:.1f}", *(cell(p, prior) for prior in priors)] for p in points]
    return markdown_table(columns, rows)


def evidence_plot(points_by_setting: Mapping[str, Sequence[EvidencePoint]], path) -> Path:
    """λ and test ECE against the fitting data's Σp(1 − p) (both axes of λ log scale; training runs right to
    left as the MAP grows certain): colour the prior (a per-kind prior's λ is its λs' geometric mean; the MAP's
    ECE in grey), line style the factoring, marker the optimizer setting."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    everything = [p for ps in points_by_setting.values() for p in ps]
    priors = [prior for prior in dict.fromkeys(k for p in everything for k in p.metrics) if prior != "MAP"]
    colours = dict(zip(priors, plt.get_cmap("tab10").colors))
    styles = dict(zip(dict.fromkeys(p.factoring for p in everything), ("-", "--", ":")))
    markers = dict(zip(points_by_setting, "o^sv"))
    fig, (lam_ax, ece_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for setting, points in points_by_setting.items():
        for factoring, style in styles.items():
            mine = [p for p in points if p.factoring == factoring]
            if not mine:
                continue
            x, kw = [p.p_one_minus_p for p in mine], dict(linestyle=style, marker=markers[setting], ms=4, lw=1.3)
            for prior in priors:
                held = [p for p in mine if prior in p.metrics]
                if not held:
                    continue
                xs = [p.p_one_minus_p for p in held]
                lam_ax.plot(xs, [math.exp(sum(map(math.log, p.lambdas[prior])) / len(p.lambdas[prior])) for p in held],
                            color=colours[prior], **kw)
                ece_ax.plot(xs, [100 * p.metrics[prior].ece for p in held], color=colours[prior], **kw)
            ece_ax.plot(x, [100 * p.metrics["MAP"].ece for p in mine], color="grey", alpha=0.6, **kw)
    for ax, title in ((lam_ax, "prior precision λ"), (ece_ax, "test ECE×100")):
        ax.set_xscale("log")
        ax.set_xlabel("fitting data's mean Σ_c p_c (1 − p_c)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    lam_ax.set_yscale("log")
    handles = ([Line2D([], [], color=c, label=f"{prior} prior") for prior, c in colours.items()]
               + [Line2D([], [], color="grey", label="MAP (ECE)")]
               + [Line2D([], [], color="black", linestyle=st, label=f"{f} factors") for f, st in styles.items()]
               + [Line2D([], [], color="black", linestyle="", marker=m, label=f"{s} optimizer") for s, m in markers.items()])
    ece_ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    return save_figure(fig, path)

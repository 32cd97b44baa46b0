"""The methods of the comparison, each one registration: which checkpoint it reads, how it makes its
posterior, and which predictive scores a loader with it.

    from bayes_peft.experiments.methods import Method, register
    register(Method("LA-KFAC prior 10", checkpoint="adamw", predictive="linearized",
                    posterior=lambda c: c.laplace(10.0)))

A registered method runs in :func:`bayes_peft.experiments.compare.compare`, and so in every benchmark script, under
its name. The built-in ones are the rows of the seeds' tables that this package implements.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, Union

import torch

from ..evaluation.calibration import fit_temperature, temperature_scale
from ..evaluation.evaluator import Evaluator
from ..evaluation.prediction import Prediction
from ..evaluation.tau import TauSweep, widened_until_bracketed
from ..laplace.prior import linearized_moments
from ..posteriors.posterior_lora import MCDropout
from .runs import OPTIMIZERS, TRAINED_POSTERIORS, Checkpoint, Optimizer

__all__ = ["Method", "Cost", "TemperatureScaled", "TauTuned", "Laplace", "TauTunedLaplace", "METHODS", "register",
           "tau_methods"]

Predictive = Literal["mean", "sample", "linearized"]


def _no_posterior(checkpoint: Checkpoint) -> None:
    return None


@dataclass(frozen=True)
class Cost:
    """What a method costs, for the comparison's cost column: ``trainings`` (training runs), ``extra`` (passes
    over data after training: a Fisher pass, validation passes) and ``test`` (passes per test example; S is
    ``eval.n_samples``, M the ensemble's size, C the number of choices)."""

    trainings: str = "1"
    extra: str = "none"
    test: str = "1 forward"

    def __str__(self) -> str:
        return f"{self.trainings} / {self.extra} / {self.test}"


@dataclass(frozen=True)
class Method:
    """One row of the comparison.

    Args:
        name: its label in tables and JSON.
        checkpoint: the training it reads (:data:`bayes_peft.experiments.runs.OPTIMIZERS`): ``"adamw"``, ``"ivon"``,
            ``"swag"`` (AdamW with SWAG-LoRA's schedule, collecting its iterates) or ``"adamw_lm_head"``
            (AdamW with LoRA on the output layer too).
        predictive: the evaluator's mode, ``"mean"``, ``"sample"`` (``eval.n_samples`` weight samples, or each
            member of an ensemble once) or ``"linearized"``.
        posterior: the posterior it evaluates with, from the checkpoint (``None``: the weights as trained).
        cost: what it costs beyond its training's forward passes (:class:`Cost`).
    """

    name: str
    checkpoint: Optimizer
    predictive: Predictive
    posterior: Callable[[Checkpoint], Optional[object]] = _no_posterior
    cost: Cost = Cost()

    def predict(self, evaluator: Evaluator, loader, checkpoint: Checkpoint, tau: float = 1.0) -> Prediction:
        """The predictive probabilities of ``loader``'s examples, at ``tau``."""
        return evaluator.predict(loader, self.predictive, n_samples=checkpoint.config.eval.n_samples, tau=tau,
                                 link=checkpoint.config.eval.link, seed=checkpoint.config.seed)

    def sweep(self, evaluator: Evaluator, loader, taus, checkpoint: Checkpoint,
              predictive: Optional[Predictive] = None) -> TauSweep:
        """Its ``predictive`` (default its own) at every τ of ``taus`` on ``loader``
        (:meth:`Evaluator.sweep_tau`, with the run's samples, link and seed)."""
        settings = checkpoint.config.eval
        return evaluator.sweep_tau(loader, taus, predictive or self.predictive, n_samples=settings.n_samples,
                                   link=settings.link, seed=checkpoint.config.seed)

    def settings(self, checkpoint: Checkpoint) -> dict:
        """What the method fitted on its own (a temperature, a τ), for the results' JSON, after ``predict``."""
        return {}

    def prediction_tau(self, evaluator: Evaluator, checkpoint: Checkpoint) -> Optional[float]:
        """The τ at which :meth:`predict` asks the evaluator, so that a τ sweep's point there can stand for
        it (``None``: its probabilities are not a point of a τ sweep)."""
        return 1.0

    def _validation(self, checkpoint: Checkpoint):
        if not checkpoint.task.validation:
            raise ValueError(f"{self.name} fits on the validation split, and this run has none (data.val_split > 0)")
        return checkpoint.loader("validation")


@dataclass(frozen=True)
class TemperatureScaled(Method):
    """The method's predictive with one temperature, fitted by NLL on the validation split (Guo et al. 2017)."""

    def predict(self, evaluator: Evaluator, loader, checkpoint: Checkpoint, tau: float = 1.0) -> Prediction:
        def fitted_temperature() -> float:
            validation = super(TemperatureScaled, self).predict(evaluator, self._validation(checkpoint), checkpoint)
            return fit_temperature(validation.probs, validation.labels)

        temperature = checkpoint.cached(f"temperature:{self.name}", fitted_temperature)
        prediction = super().predict(evaluator, loader, checkpoint, tau)
        return Prediction(temperature_scale(prediction.probs, temperature), prediction.labels)

    def settings(self, checkpoint: Checkpoint) -> dict:
        return {"temperature": checkpoint.fitted(f"temperature:{self.name}")}

    def prediction_tau(self, evaluator: Evaluator, checkpoint: Checkpoint) -> Optional[float]:
        return None


@dataclass(frozen=True)
class TauTuned(Method):
    """The method's predictive at τ*, the τ whose predictive has the lowest NLL on the validation split, from
    ``eval.tune_taus`` and beyond its top while the NLL still falls there (:func:`widened_until_bracketed`): τ chosen
    on the same data, and by the same criterion, as temperature scaling's temperature, so that the two stand on
    equal terms. The test split never enters the choice."""

    def tau(self, evaluator: Evaluator, checkpoint: Checkpoint) -> float:
        """τ*, searched once per checkpoint."""
        def best() -> float:
            validation, settings = self._validation(checkpoint), checkpoint.config.eval
            return widened_until_bracketed(lambda taus: self.sweep(evaluator, validation, taus, checkpoint),
                                           settings.tune_taus, settings.tau_ceiling).best("nll")

        return checkpoint.cached(f"tau:{self.name}", best)

    def predict(self, evaluator: Evaluator, loader, checkpoint: Checkpoint, tau: Optional[float] = None) -> Prediction:
        """The predictive at τ* (a ``tau`` given here is not used: choosing it is the method)."""
        return super().predict(evaluator, loader, checkpoint, self.tau(evaluator, checkpoint))

    def settings(self, checkpoint: Checkpoint) -> dict:
        return {"tau": checkpoint.fitted(f"tau:{self.name}")}

    def prediction_tau(self, evaluator: Evaluator, checkpoint: Checkpoint) -> Optional[float]:
        return self.tau(evaluator, checkpoint)


def _derived_posterior():
    """A Laplace row's posterior field: made from its prior, structure and modules, never an argument, so that a
    row copied with ``dataclasses.replace(row, prior=…)`` gets the posterior of its new prior."""
    return field(init=False, default=_no_posterior)


@dataclass(frozen=True)
class Laplace(Method):
    """A Laplace-LoRA row: the checkpoint's fit (``structure``, ``modules``; :meth:`Checkpoint.laplace`) under
    ``prior``. Linearized, every prior of one KFAC fit predicts a loader from the same Jacobian pass
    (:meth:`Checkpoint.linearized_terms`); a diagonal fit's terms would be every weight's per-example
    gradients, too many to keep, so each of its rows takes its own pass."""

    prior: Union[str, float, None] = None  # None: the configuration's (laplace.prior)
    structure: str = "kfac"
    modules: Optional[tuple[str, ...]] = None

    posterior: Callable[[Checkpoint], Optional[object]] = _derived_posterior()

    def __post_init__(self):
        object.__setattr__(self, "posterior", lambda c: c.laplace(self.prior, self.structure, self.modules))

    def predict(self, evaluator: Evaluator, loader, checkpoint: Checkpoint, tau: float = 1.0) -> Prediction:
        if not self._shares(self.predictive):
            return super().predict(evaluator, loader, checkpoint, tau)
        settings = checkpoint.config.eval
        return evaluator.predict_from_moments(*self._moments(evaluator, loader, checkpoint), settings.n_samples, tau,
                                              settings.link, checkpoint.config.seed)

    def sweep(self, evaluator: Evaluator, loader, taus, checkpoint: Checkpoint,
              predictive: Optional[Predictive] = None) -> TauSweep:
        if not self._shares(predictive or self.predictive):
            return super().sweep(evaluator, loader, taus, checkpoint, predictive)
        settings = checkpoint.config.eval
        return evaluator.sweep_from_moments(*self._moments(evaluator, loader, checkpoint), taus, settings.n_samples,
                                            settings.link, checkpoint.config.seed)

    def _shares(self, predictive: Predictive) -> bool:
        return predictive == "linearized" and self.structure != "diag"

    def _moments(self, evaluator: Evaluator, loader, checkpoint: Checkpoint) -> tuple[list, torch.Tensor]:
        """The logit moments under this row's posterior and the labels, from the fit's shared terms."""
        terms = checkpoint.linearized_terms(loader, self.structure, self.modules)
        return linearized_moments(evaluator.posterior, terms), torch.cat([y for _, y, _ in terms])


@dataclass(frozen=True)
class TauTunedLaplace(TauTuned, Laplace):
    """A Laplace row at τ* (:class:`TauTuned`), sharing its fit's Jacobian passes (:class:`Laplace`)."""

    posterior: Callable[[Checkpoint], Optional[object]] = _derived_posterior()  # TauTuned's field would win


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` (replacing one of the same name); returns it."""
    if method.checkpoint not in OPTIMIZERS:
        raise ValueError(f"{method.name}: checkpoint must be one of {OPTIMIZERS}, got {method.checkpoint!r}")
    if method.predictive not in ("mean", "sample", "linearized"):
        raise ValueError(f"{method.name}: predictive must be mean, sample or linearized, got {method.predictive!r}")
    METHODS[method.name] = method
    return method


_FISHER = "1 Fisher pass"
_LINEARIZED = "1 forward + C−1 backward"
for _method in (
    Method("AdamW (MAP)", "adamw", "mean"),
    TemperatureScaled("Temperature scaling", "adamw", "mean", cost=Cost(extra="1 validation pass")),
    Method("MC-dropout", "adamw", "sample", lambda c: MCDropout(c.model), Cost(test="S forward")),
    Laplace("LA-KFAC evidence", "adamw", "linearized", cost=Cost(extra=_FISHER, test=_LINEARIZED), prior="evidence"),
    Laplace("LA-KFAC evidence (published)", "adamw", "linearized", cost=Cost(extra=_FISHER, test=_LINEARIZED),
            prior="evidence_published"),
    Laplace("LA-KFAC validation", "adamw", "linearized", prior="validation",
            cost=Cost(extra=f"{_FISHER} + linearized validation passes", test=_LINEARIZED)),
    Laplace("LA-diag evidence", "adamw", "linearized", cost=Cost(extra=_FISHER, test=_LINEARIZED), prior="evidence",
            structure="diag"),
    Laplace("LA-diag validation", "adamw", "linearized", prior="validation", structure="diag",
            cost=Cost(extra=f"{_FISHER} + linearized validation passes", test=_LINEARIZED)),
    # Last-layer Laplace reads a run whose LoRA also covers lm_head, and its backward passes stop there.
    Method("AdamW+lm_head (MAP)", "adamw_lm_head", "mean"),
    Laplace("LLLA evidence", "adamw_lm_head", "linearized", prior="evidence", modules=("lm_head",),
            cost=Cost(extra=f"{_FISHER} (to lm_head)", test="1 forward + C−1 backward to lm_head")),
    Laplace("LLLA validation", "adamw_lm_head", "linearized", prior="validation", modules=("lm_head",),
            cost=Cost(extra=f"{_FISHER} (to lm_head) + linearized validation passes",
                      test="1 forward + C−1 backward to lm_head")),
    Method("IVON@mean", "ivon", "mean", lambda c: c.posterior),
    Method("IVON", "ivon", "sample", lambda c: c.posterior, Cost(test="S forward")),
    Method("SWA", "swag", "mean", lambda c: c.posterior),
    Method("SWAG", "swag", "sample", lambda c: c.posterior, Cost(test="S forward")),
    TauTuned("IVON (τ*)", "ivon", "sample", lambda c: c.posterior, Cost(extra="S validation passes a τ", test="S forward")),
    TauTunedLaplace("LA-KFAC evidence (τ*)", "adamw", "linearized", prior="evidence",
                    cost=Cost(extra=f"{_FISHER} + 1 linearized validation pass", test=_LINEARIZED)),
    Method("Checkpoint ensemble", "adamw", "sample", lambda c: c.checkpoint_ensemble(), Cost(test="M forward")),
    Method("LoRA ensemble", "adamw", "sample", lambda c: c.lora_ensemble(), Cost(trainings="M", test="M forward")),
):
    register(_method)


def tau_methods() -> list[str]:
    """The registered methods whose posterior is a Gaussian that τ scales (IVON's and SWAG's samples, every
    linearized Laplace), without the τ* rows that choose their own τ: the curves of a τ trade-off."""
    return [name for name, m in METHODS.items() if not isinstance(m, TauTuned) and
            (m.predictive == "linearized" or (m.predictive == "sample" and m.checkpoint in TRAINED_POSTERIORS))]

"""The methods of the comparison, each one registration: which checkpoint it reads, how it makes its
posterior, and which predictive scores a loader with it.

    from bayes_peft.methods import Method, register
    register(Method("LA-KFAC prior 10", checkpoint="adamw", predictive="linearized",
                    posterior=lambda c: c.laplace(10.0)))

A registered method runs in :func:`bayes_peft.experiment.compare`, and so in every benchmark script, under
its name. The built-in ones are the rows of the seeds' tables that this package implements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

from .calibration import fit_temperature, temperature_scale
from .evaluate import Evaluator, Prediction
from .posterior import MCDropout
from .runs import OPTIMIZERS, Checkpoint, Optimizer

__all__ = ["Method", "TemperatureScaled", "METHODS", "register"]

Predictive = Literal["mean", "sample", "linearized"]


def _no_posterior(checkpoint: Checkpoint) -> None:
    return None


@dataclass(frozen=True)
class Method:
    """One row of the comparison.

    Args:
        name: its label in tables and JSON.
        checkpoint: the training it reads, ``"adamw"``, ``"ivon"`` or ``"swag"`` (AdamW with SWAG-LoRA's
            schedule, collecting its iterates; :mod:`bayes_peft.runs`).
        predictive: the evaluator's mode, ``"mean"``, ``"sample"`` (``eval.n_samples`` weight samples) or
            ``"linearized"``.
        posterior: the posterior it evaluates with, from the checkpoint (``None``: the weights as trained).
    """

    name: str
    checkpoint: Optimizer
    predictive: Predictive
    posterior: Callable[[Checkpoint], Optional[object]] = _no_posterior

    def predict(self, evaluator: Evaluator, loader, checkpoint: Checkpoint) -> Prediction:
        """The predictive probabilities of ``loader``'s examples, at τ = 1."""
        return evaluator.predict(loader, self.predictive, n_samples=checkpoint.config.eval.n_samples,
                                 link=checkpoint.config.eval.link, seed=checkpoint.config.seed)


@dataclass(frozen=True)
class TemperatureScaled(Method):
    """The method's predictive with one temperature, fitted by NLL on the validation split (Guo et al. 2017)."""

    def predict(self, evaluator: Evaluator, loader, checkpoint: Checkpoint) -> Prediction:
        def fitted_temperature() -> float:
            validation = Method.predict(self, evaluator, checkpoint.loader("validation"), checkpoint)
            return fit_temperature(validation.probs, validation.labels)

        temperature = checkpoint.cached(f"temperature:{self.name}", fitted_temperature)
        prediction = Method.predict(self, evaluator, loader, checkpoint)
        return Prediction(temperature_scale(prediction.probs, temperature), prediction.labels)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` (replacing one of the same name); returns it."""
    if method.checkpoint not in OPTIMIZERS:
        raise ValueError(f"{method.name}: checkpoint must be one of {OPTIMIZERS}, got {method.checkpoint!r}")
    if method.predictive not in ("mean", "sample", "linearized"):
        raise ValueError(f"{method.name}: predictive must be mean, sample or linearized, got {method.predictive!r}")
    METHODS[method.name] = method
    return method


for _method in (
    Method("AdamW (MAP)", "adamw", "mean"),
    TemperatureScaled("Temperature scaling", "adamw", "mean"),
    Method("MC-dropout", "adamw", "sample", lambda c: MCDropout(c.model)),
    Method("LA-KFAC evidence", "adamw", "linearized", lambda c: c.laplace("evidence")),
    Method("LA-KFAC validation", "adamw", "linearized", lambda c: c.laplace("validation")),
    Method("LA-diag evidence", "adamw", "linearized", lambda c: c.laplace("evidence", structure="diag")),
    Method("LA-diag validation", "adamw", "linearized", lambda c: c.laplace("validation", structure="diag")),
    Method("IVON@mean", "ivon", "mean", lambda c: c.posterior),
    Method("IVON", "ivon", "sample", lambda c: c.posterior),
    Method("SWA", "swag", "mean", lambda c: c.posterior),
    Method("SWAG", "swag", "sample", lambda c: c.posterior),
):
    register(_method)

"""The evaluation stage and the comparison: every registered method on one task and seed, scored on the
test split and on any out-of-distribution or shifted sets, with typed results that serialise to JSON.

    from bayes_peft.config import preset_config
    from bayes_peft.experiments.compare import compare
    results = compare(preset_config("overfit", seed=0), "runs/overfit/sst2/seed0")
    results["IVON"].metrics, results["IVON"].to_json()

Each optimizer trains once per run folder (:func:`bayes_peft.experiments.runs.train_checkpoint`), and every method
that reads its checkpoint shares it. :func:`score` is the one way a predictive becomes metrics, selective
prediction and OOD detection, for :func:`compare` and for ``bayes-peft evaluate`` alike.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from ..config import RunConfig
from ..data.tasks import Task
from ..evaluation.evaluator import Evaluator
from ..evaluation.prediction import Prediction
from ..evaluation.tau import TauSweep
from ..evaluation.metrics import Metrics
from .methods import METHODS
from .runs import OPTIMIZERS, stage_config, train_checkpoint

__all__ = ["Scores", "ShiftScores", "MethodResult", "score", "compare", "compare_along_training"]


@dataclass
class ShiftScores:
    """One method on an out-of-distribution set: its prediction, how well each uncertainty score tells the
    set from the test split (``{score: {"auroc", "fpr_at_95_tpr"}}``) and, when the set has labels (a
    distribution shift), its metrics."""

    prediction: Prediction
    detection: dict
    metrics: Optional[Metrics] = None

    def to_json(self) -> dict:
        return {"detection": self.detection, **({"metrics": self.metrics.as_dict()} if self.metrics else {})}


@dataclass
class Scores:
    """A predictive scored on the test split (metrics, selective prediction) and on each OOD set."""

    prediction: Prediction
    metrics: Metrics
    selective: dict
    ood: dict[str, ShiftScores] = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {"metrics": self.metrics.as_dict(), "selective": self.selective}
        if self.ood:
            out["ood"] = {name: shifted.to_json() for name, shifted in self.ood.items()}
        return out


@dataclass
class MethodResult(Scores):
    """:class:`Scores` of one method of :func:`compare`, with its wall time (training is charged to the first
    method that reads a checkpoint), what it fitted on validation data (``settings``: a temperature, a τ*)
    and, when asked for, its τ sweep."""

    seconds: float = 0.0
    sweep: Optional[TauSweep] = None
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = super().to_json()
        settings = {"settings": self.settings} if self.settings else {}
        return {"metrics": out["metrics"], "selective": out["selective"], "seconds": self.seconds, **settings, **out}


def score(predict: Callable[[object], Prediction], test, ood: Mapping[str, tuple[Task, object]] = {},
          n_bins: int = 10) -> Scores:
    """Score the predictive ``predict`` (a loader → its :class:`Prediction`) on ``test`` and on each OOD set
    (``{name: (task, loader)}``): the metrics of labelled sets, and OOD detection against the test split."""
    prediction = predict(test)
    scores = Scores(prediction, prediction.metrics(n_bins), prediction.selective())
    for name, (task, loader) in ood.items():
        shifted = predict(loader)
        scores.ood[name] = ShiftScores(shifted, prediction.ood_detection(shifted),
                                       shifted.metrics(n_bins) if task.labelled else None)
    return scores


def compare(config: RunConfig, run_dir, methods: Sequence[str] = tuple(METHODS),
            log: Callable[[str], None] = print, resume_dir: Optional[Path] = None,
            ood: Optional[Mapping[str, Task]] = None,
            sweeps: Mapping[str, Sequence[float]] = {}, task: Optional[Task] = None,
            results_file: str = "results.json", sweep_predictive: Optional[str] = None) -> dict[str, MethodResult]:
    """Every method of ``methods`` (names in :data:`bayes_peft.experiments.methods.METHODS`) on one task and seed, in
    that order.

    ``ood``: tasks of out-of-distribution inputs by name (e.g. :meth:`Task.with_passages`, or another task
    with the same labels, for a distribution shift); each method also predicts their test examples.
    ``sweeps``: ``{method: taus}``, a τ sweep of that method's predictive (or of ``sweep_predictive``: the
    demo sweeps IVON linearized) on the test split (a linearized one computes its moments once, every τ
    from them); the method's own prediction is its sweep's point at the τ it predicts at (1, or a τ* in the
    grid) when the sweep ran its predictive.
    With ``resume_dir``, training continues from the state files ``resume_dir/<optimizer>.resume.pt``.
    ``task``: the task to run on, instead of ``config.load_task()`` (data of one's own, say).
    ``run_dir/results_file`` receives the configuration and every result's JSON as it comes (a study that reuses the
    comparison's checkpoints, a τ sweep or a shift, names its own file so as not to overwrite the comparison's).
    """
    unknown = [m for m in [*methods, *sweeps] if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {list(METHODS)}")
    run_dir = Path(run_dir)
    task = task if task is not None else config.load_task()
    ood = dict(ood or {})
    for name, shifted in ood.items():
        if shifted.labels != task.labels:
            raise ValueError(f"out-of-distribution task {name!r} answers with {shifted.labels}, {task.name} "
                             f"with {task.labels}")
    results: dict[str, MethodResult] = {}
    run_dir.mkdir(parents=True, exist_ok=True)
    for optimizer in OPTIMIZERS:
        wanted = [m for m in methods if METHODS[m].checkpoint == optimizer]
        if not wanted:
            continue
        resume = None if resume_dir is None else Path(resume_dir) / f"{optimizer}.resume.pt"
        checkpoint = train_checkpoint(config, optimizer, run_dir / optimizer, task, resume)
        train_seconds = checkpoint.seconds
        test = checkpoint.loader("test")
        ood_loaders = {name: (t, checkpoint.loader("test", t)) for name, t in ood.items()}
        for name in wanted:
            start = time.perf_counter()
            method = METHODS[name]
            ev = Evaluator(checkpoint.model, method.posterior(checkpoint), task, progress=config.progress)
            sweep = None
            predictive = sweep_predictive or method.predictive
            if name in sweeps:
                sweep = method.sweep(ev, test, sweeps[name], checkpoint, predictive)
                sweep.method = name

            def predict(loader, method=method, ev=ev, sweep=sweep, same=predictive == method.predictive):
                if loader is test and sweep is not None and same:
                    tau = method.prediction_tau(ev, checkpoint)
                    if tau in sweep.taus:  # the same numbers (same τ, same seed), computed once
                        return sweep.predictions[sweep.taus.index(tau)]
                return method.predict(ev, loader, checkpoint)

            scores = score(predict, test, ood_loaders, config.eval.ece_bins)
            seconds = time.perf_counter() - start + train_seconds
            train_seconds = 0.0
            results[name] = MethodResult(**{f.name: getattr(scores, f.name) for f in dataclasses.fields(scores)},
                                         seconds=seconds, sweep=sweep, settings=method.settings(checkpoint))
            log(f"{task.name} seed {config.seed} {name:<20} {scores.metrics}  ({seconds:.0f} s)")
            # After every method, not once at the end: a comparison runs for hours on a CPU.
            (run_dir / results_file).write_text(json.dumps(
                {"config": config.as_dict(), "results": {m: r.to_json() for m, r in results.items()}}, indent=2))
    return {name: results[name] for name in methods}


def compare_along_training(config: RunConfig, run_dir, every: int, methods: Sequence[str] = tuple(METHODS),
                           log: Callable[[str], None] = print) -> dict[int, dict[str, MethodResult]]:
    """:func:`compare` at steps ``every``, ``2·every``, … up to ``config.train.steps``: ``{step: {method: result}}``.

    Each optimizer trains once: every stage continues from the previous one (exactly, the data order
    included) and leaves its checkpoint in ``run_dir/step<k>``, which later calls reuse.
    """
    steps = config.train.steps
    if every < 1 or steps % every:
        raise ValueError(f"every must divide steps ({steps}), got {every}")
    run_dir = Path(run_dir)
    return {step: compare(stage_config(config, step), run_dir / f"step{step}", methods, log, resume_dir=run_dir)
            for step in range(every, steps + 1, every)}

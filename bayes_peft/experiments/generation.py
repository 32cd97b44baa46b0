"""The methods for generated answers, each one registration, and the run that scores them on a generative task.

    from bayes_peft.experiments.generation import compare_generation
    results = compare_generation(preset_config("generation"), "runs/gen/seed0")

Every method answers the test prompts (and each shift's, arithmetic's ``hard``) with
:meth:`~bayes_peft.Evaluator.generate`; its metrics are :meth:`GeneratedAnswers.metrics`. The trainings are those of
the classification runs (:func:`~bayes_peft.experiments.runs.train_checkpoint` on the SFT loss): AdamW (the MAP,
temperature scaling, MC dropout, Laplace, the LoRA ensemble), IVON, and AdamW with SWAG-LoRA's schedule.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

from ..config import RunConfig
from ..evaluation.evaluator import Evaluator
from ..evaluation.generation import GeneratedAnswers, fit_answer_temperature
from ..posteriors.posterior_lora import MCDropout
from .runs import OPTIMIZERS, Checkpoint, Optimizer, train_checkpoint

__all__ = ["GenerationMethod", "GENERATION_METHODS", "compare_generation"]


def _none(checkpoint: Checkpoint) -> None:
    return None


def _one(checkpoint: Checkpoint) -> float:
    return 1.0


def _validation_temperature(checkpoint: Checkpoint) -> float:
    return checkpoint.cached("answer temperature",
                             lambda: fit_answer_temperature(checkpoint.model, checkpoint.loader("validation")))


def _laplace(checkpoint: Checkpoint):
    """Laplace with the run's prior: ``"auto"`` and ``"validation"`` choose λ by the validation answers' NLL under
    the sampled model average (:func:`~bayes_peft.evaluation.generation.answer_validation_prior`)."""
    return checkpoint.laplace()


@dataclass(frozen=True)
class GenerationMethod:
    """One row: the ``checkpoint`` it reads, whether it answers at the ``"mean"`` or by majority over weight
    ``"sample"`` s, its ``posterior`` from the checkpoint, and the ``temperature`` of its scoring."""

    name: str
    checkpoint: Optimizer
    draws: Literal["mean", "sample"]
    posterior: Callable[[Checkpoint], Optional[object]] = _none
    temperature: Callable[[Checkpoint], float] = _one

    def answer(self, evaluator: Evaluator, loader, checkpoint: Checkpoint) -> GeneratedAnswers:
        config = checkpoint.config
        return evaluator.generate(loader, self.draws, n_samples=config.eval.n_samples, seed=config.seed,
                                  max_new_tokens=config.eval.max_new_tokens, temperature=self.temperature(checkpoint))


GENERATION_METHODS: dict[str, GenerationMethod] = {m.name: m for m in (
    GenerationMethod("MAP", "adamw", "mean"),
    GenerationMethod("Temperature scaling", "adamw", "mean", temperature=_validation_temperature),
    GenerationMethod("MC dropout", "adamw", "sample", lambda c: MCDropout(c.model)),
    GenerationMethod("LA-KFAC (sampled)", "adamw", "sample", _laplace),
    GenerationMethod("LoRA ensemble", "adamw", "sample", lambda c: c.lora_ensemble()),
    GenerationMethod("IVON@mean", "ivon", "mean", lambda c: c.posterior),
    GenerationMethod("IVON", "ivon", "sample", lambda c: c.posterior),
    GenerationMethod("SWAG", "swag", "sample", lambda c: c.posterior),
)}


def compare_generation(config: RunConfig, run_dir, methods: Sequence[str] = tuple(GENERATION_METHODS),
                       log: Callable[[str], None] = print, task=None) -> dict[str, dict]:
    """Every method of ``methods`` on ``config``'s generative task (or ``task``) and seed: ``{method: {"test":
    metrics, "levels": {level: metrics}, "shifts": {name: metrics}, "seconds": …}}``, written to
    ``run_dir/generation.json`` after every method (trainings in ``run_dir/<optimizer>``, reused by a later call)."""
    unknown = [m for m in methods if m not in GENERATION_METHODS]
    if unknown:
        raise ValueError(f"unknown generation methods {unknown}; known: {list(GENERATION_METHODS)}")
    run_dir = Path(run_dir)
    task = task if task is not None else config.load_task()
    results: dict[str, dict] = {}
    for optimizer in OPTIMIZERS:
        wanted = [m for m in methods if GENERATION_METHODS[m].checkpoint == optimizer]
        if not wanted:
            continue
        checkpoint = train_checkpoint(config, optimizer, run_dir / optimizer, task)
        train_seconds = checkpoint.seconds
        loaders = {split: task.prompt_loader(checkpoint.tokenizer, split, config.eval.batch_size)
                   for split in ("test", *task.shifts)}
        for name in wanted:
            start = time.perf_counter()
            method = GENERATION_METHODS[name]
            ev = Evaluator(checkpoint.model, method.posterior(checkpoint), task, progress=config.progress,
                           tokenizer=checkpoint.tokenizer)
            answered = {split: method.answer(ev, loader, checkpoint) for split, loader in loaders.items()}
            test = answered.pop("test")
            n_bins = config.eval.ece_bins
            results[name] = {
                "test": test.metrics(n_bins),
                "levels": {level: test.subset(level).metrics(n_bins) for level in sorted(set(test.levels))},
                "shifts": {split: out.metrics(n_bins) for split, out in answered.items()},
                "temperature": method.temperature(checkpoint),
                "seconds": time.perf_counter() - start + train_seconds,
                "answers": {"test": _kept(test), **{split: _kept(out) for split, out in answered.items()}},
            }
            train_seconds = 0.0
            log(f"{task.name} seed {config.seed} {name:<20} " + "  ".join(
                f"{k} {results[name]['test'][k]:.3f}" for k in ("acc", "ece", "brier", "auroc (1 - confidence)")))
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "generation.json").write_text(json.dumps({"config": config.as_dict(), "results": results},
                                                                indent=2))
    return {name: results[name] for name in methods}


def _kept(out: GeneratedAnswers) -> dict:
    """What a later plot or table needs of the answers: correctness, confidence and the uncertainties."""
    return {"correct": out.correct.tolist(), "confidence": out.confidence.tolist(),
            "answer_entropy": out.answer_entropy.tolist(), "mutual_information": out.mutual_information.tolist()}

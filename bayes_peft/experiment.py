"""Train once, evaluate many ways: the runs behind the benchmark scripts and the command line.

A run directory holds one trained adapter per optimizer (``adamw/``, ``ivon/``), each written when its
training ends; a later call finds it and skips the training. Laplace fits on the AdamW checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

from .calibration import fit_temperature, temperature_scale
from .evaluate import Evaluator, Prediction
from .models import load_model
from .posterior import MCDropout, PosteriorLoRA
from .task_data import load_task
from .tasks import Task
from .training import make_optimizer, train

__all__ = ["RunConfig", "METHODS", "MethodContext", "compare", "compare_along_training", "summary",
           "trained_model"]

ADAPTER_FILE = "adapter_model.safetensors"


@dataclass
class RunConfig:
    """Everything one (task, seed) comparison needs; the defaults are the CPU preset's."""

    task: str = "sst2"
    model: str = "smollm2-135m"
    quantization: Optional[str] = None
    seed: int = 0
    steps: int = 150
    batch_size: int = 8
    eval_batch_size: int = 16
    max_length: int = 256
    val_split: float = 0.2
    n_train: Optional[int] = None  # train on a seeded draw of this many examples (default: all)
    n_test: Optional[int] = None
    adamw_lr: float = 1e-3
    ivon_lr: float = 0.03
    ess: float = 1e6
    hess_init: float = 3e-4
    clip_radius: float = 1e-3
    n_samples: int = 10
    n_kfac: int = 10
    laplace_examples: Optional[int] = None  # fit Laplace on this many training examples (default: all)
    ece_bins: int = 10
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def load_task(self) -> Task:
        task = load_task(self.task, val_split=self.val_split, seed=self.seed, max_length=self.max_length)
        return task.subset(n_train=self.n_train, n_test=self.n_test, seed=self.seed).sorted_for_evaluation()


def trained_model(config: RunConfig, optimizer: str, run_dir: Path, task: Task, resume: Optional[Path] = None):
    """``(model, tokenizer, ivon_posterior_or_None, seconds)``: trained with ``optimizer``, or reloaded from
    ``run_dir/optimizer`` when a finished checkpoint is there.

    ``resume``: a training-state file (:func:`bayes_peft.training.train`'s ``checkpoint``) to continue from
    and to leave at ``config.steps``, so that checkpoints at growing step counts train each step once.
    """
    torch.manual_seed(config.seed)
    checkpoint = run_dir / optimizer
    if (checkpoint / ADAPTER_FILE).exists():
        model, tokenizer = load_model(config.model, quantization=config.quantization, adapter=checkpoint)
        posterior = PosteriorLoRA.load(checkpoint, model) if optimizer == "ivon" else None
        return model, tokenizer, posterior, 0.0
    model, tokenizer = load_model(config.model, quantization=config.quantization)
    start = time.perf_counter()
    if optimizer == "ivon":
        opt = make_optimizer("ivon", model, lr=config.ivon_lr, seed=config.seed, ess=config.ess,
                             hess_init=config.hess_init, clip_radius=config.clip_radius)
    else:
        opt = make_optimizer("adamw", model, lr=config.adamw_lr)
    loader = task.loader(tokenizer, "train", config.batch_size, seed=config.seed)
    train(model, task, loader, opt, config.steps, progress=config.progress, desc=f"{optimizer} {task.name}",
          checkpoint=resume, save_every=config.steps)
    posterior = None
    if optimizer == "ivon":
        posterior = PosteriorLoRA.from_ivon(model, opt)
        posterior.save(checkpoint)  # the adapter at the mean, and the posterior
        with torch.no_grad():  # training is over: leave the mean in the model, as a reloaded checkpoint has it
            for p, m in zip(opt.trainable_parameters(), opt.posterior_mean()):
                p.copy_(m)
    else:
        model.save_pretrained(str(checkpoint))
    return model, tokenizer, posterior, time.perf_counter() - start


@dataclass
class MethodContext:
    """What a method's prediction may use beside the evaluator and the loader it scores."""

    validation: "torch.utils.data.DataLoader"
    config: RunConfig
    cache: dict = field(default_factory=dict)  # what a method fits once per checkpoint and reuses on every loader


def _temperature_scaled(ev: Evaluator, loader, context: MethodContext) -> Prediction:
    """MAP's predictive with one temperature fitted on the validation split by NLL."""
    if "temperature" not in context.cache:
        fitted = ev.predict(context.validation, "mean")
        context.cache["temperature"] = fit_temperature(fitted.probs, fitted.labels)
    prediction = ev.predict(loader, "mean")
    return Prediction(temperature_scale(prediction.probs, context.cache["temperature"]), prediction.labels)


def _at_mean(ev: Evaluator, loader, context: MethodContext) -> Prediction:
    return ev.predict(loader, "mean")


def _sampled(ev: Evaluator, loader, context: MethodContext) -> Prediction:
    return ev.predict(loader, "sample", n_samples=context.config.n_samples, seed=context.config.seed)


def _linearized(ev: Evaluator, loader, context: MethodContext) -> Prediction:
    return ev.predict(loader, "linearized", n_samples=context.config.n_samples, seed=context.config.seed)


METHODS: dict[str, tuple[str, Callable[[Evaluator, object, MethodContext], Prediction]]] = {
    # name: (the checkpoint it reads, how it predicts a loader's examples)
    "AdamW (MAP)": ("adamw", _at_mean),
    "Temperature scaling": ("adamw", _temperature_scaled),
    "MC-dropout": ("adamw", _sampled),
    "LA-KFAC evidence": ("adamw", _linearized),
    "LA-KFAC validation": ("adamw", _linearized),
    "IVON@mean": ("ivon", _at_mean),
    "IVON": ("ivon", _sampled),
}


def compare(config: RunConfig, run_dir: Path, methods: Sequence[str] = tuple(METHODS),
            log: Callable[[str], None] = print, resume_dir: Optional[Path] = None,
            ood: Optional[Mapping[str, Task]] = None) -> dict[str, dict]:
    """Every method on one task and seed: ``{method: {"metrics", "prediction", "selective", "seconds",
    "posterior", "test", "model", "tokenizer"}}``, and with ``ood`` also ``"ood"``:
    ``{name: {"prediction", "detection"}}`` and, for a labelled task (a distribution shift), ``"metrics"``.

    ``ood``: tasks of out-of-distribution inputs by name (e.g. :meth:`Task.with_passages`, or another task
    with the same labels, for a distribution shift). Each method also predicts their test examples, and
    ``detection`` says how well each uncertainty score tells them from the in-distribution test examples
    (:meth:`Prediction.ood_detection`); ``selective`` is selective prediction on the test split.
    A method's seconds are its training (the first method on a checkpoint pays it), fitting and evaluation.
    With ``resume_dir``, training continues from the state files ``resume_dir/<optimizer>.resume.pt``.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {list(METHODS)}")
    ood = dict(ood or {})
    run_dir = Path(run_dir)
    task = config.load_task()
    for name, shifted in ood.items():
        if shifted.labels != task.labels:
            raise ValueError(f"out-of-distribution task {name!r} answers with {shifted.labels}, {task.name} "
                             f"with {task.labels}")
    results: dict[str, dict] = {}
    for optimizer in ("adamw", "ivon"):
        wanted = [m for m in methods if METHODS[m][0] == optimizer]
        if not wanted:
            continue
        resume = None if resume_dir is None else Path(resume_dir) / f"{optimizer}.resume.pt"
        model, tokenizer, ivon_posterior, train_seconds = trained_model(config, optimizer, run_dir, task, resume)
        test = task.loader(tokenizer, "test", config.eval_batch_size)
        context = MethodContext(task.loader(tokenizer, "validation", config.eval_batch_size), config)
        ood_loaders = {name: t.loader(tokenizer, "test", config.eval_batch_size) for name, t in ood.items()}
        fitted: dict = {"ivon": ivon_posterior}
        for method in wanted:
            start = time.perf_counter()
            posterior = _posterior_for(method, model, tokenizer, task, config, fitted)
            ev = Evaluator(model, posterior, task, progress=config.progress)
            predict = METHODS[method][1]
            prediction = predict(ev, test, context)
            result = {"metrics": prediction.metrics(config.ece_bins), "prediction": prediction,
                      "selective": prediction.selective(), "posterior": posterior, "test": test, "model": model,
                      "tokenizer": tokenizer}
            if ood:
                result["ood"] = {}
                for name, loader in ood_loaders.items():
                    shifted = predict(ev, loader, context)
                    result["ood"][name] = {"prediction": shifted, "detection": prediction.ood_detection(shifted)}
                    if ood[name].labelled:
                        result["ood"][name]["metrics"] = shifted.metrics(config.ece_bins)
            result["seconds"] = time.perf_counter() - start + train_seconds
            train_seconds = 0.0
            results[method] = result
            log(f"{task.name} seed {config.seed} {method:<20} {result['metrics']}  ({result['seconds']:.0f} s)")
    (run_dir / "results.json").write_text(json.dumps(
        {"config": dataclasses.asdict(config), "results": {m: summary(r) for m, r in results.items()}}, indent=2))
    return results


def summary(result: dict) -> dict:
    """The JSON-ready part of one method's :func:`compare` result: metrics, selective prediction, OOD
    detection (per score) and seconds."""
    out = {"metrics": result["metrics"].as_dict(), "selective": result["selective"], "seconds": result["seconds"]}
    if "ood" in result:
        out["ood"] = {name: {"detection": shifted["detection"],
                             **({"metrics": shifted["metrics"].as_dict()} if "metrics" in shifted else {})}
                      for name, shifted in result["ood"].items()}
    return out


def compare_along_training(config: RunConfig, run_dir: Path, every: int, methods: Sequence[str] = tuple(METHODS),
                           log: Callable[[str], None] = print) -> dict[int, dict[str, dict]]:
    """:func:`compare` at steps ``every``, ``2·every``, … up to ``config.steps``: ``{step: {method: result}}``.

    Each optimizer trains once: every stage continues from the previous one (exactly, the data order
    included) and leaves its checkpoint in ``run_dir/step<k>``, which later calls reuse.
    """
    if every < 1 or config.steps % every:
        raise ValueError(f"every must divide steps ({config.steps}), got {every}")
    run_dir = Path(run_dir)
    return {step: compare(dataclasses.replace(config, steps=step), run_dir / f"step{step}", methods, log,
                          resume_dir=run_dir)
            for step in range(every, config.steps + 1, every)}


def _posterior_for(method: str, model, tokenizer, task: Task, config: RunConfig, fitted: dict):
    """The posterior a method evaluates with; the KFAC factors are fitted once and shared by both priors."""
    if method.startswith("IVON"):
        return fitted["ivon"]
    if method == "MC-dropout":
        return MCDropout(model)
    if method.startswith("LA-KFAC"):
        from .laplace import evidence_prior, fit_laplace, validation_prior

        if "laplace" not in fitted:
            fit_task = task.subset(n_train=config.laplace_examples, seed=config.seed)
            train_loader = fit_task.loader(tokenizer, "train", config.eval_batch_size, shuffle=False)
            fitted["laplace"] = fit_laplace(model, train_loader, n_kfac=config.n_kfac, prior=1.0,
                                            progress=config.progress)
        base = fitted["laplace"]
        if method.endswith("validation"):
            val_loader = task.loader(tokenizer, "validation", config.eval_batch_size)
            return base.with_prior_precision(validation_prior(base, val_loader))
        return base.with_prior_precision(evidence_prior(base))
    return None

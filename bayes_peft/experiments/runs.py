"""The first two stages of a run: train (or reload) a checkpoint, and fit the posteriors that read it.

:func:`train_checkpoint` is the one way a :class:`~bayes_peft.config.RunConfig` becomes a trained model,
for the command line, the demo, :func:`bayes_peft.experiments.compare.compare` and every benchmark script. There
are four trainings: ``"adamw"``, ``"ivon"``, ``"swag"`` (AdamW with SWAG-LoRA's learning-rate schedule,
collecting its iterates) and ``"adamw_lm_head"`` (AdamW with LoRA on the output layer too, for last-layer
Laplace). A checkpoint folder holds the adapter (at IVON's or SWA's mean) and, for IVON and SWAG, the
posterior; an AdamW folder also keeps the weights of its last epochs (the checkpoint ensemble). A later
call finds the folder and trains nothing. The :class:`Checkpoint` it returns fits what its methods need
once and shares it: Laplace's factors (every prior reuses them), the ensembles, the temperature, the loaders.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Optional, Sequence, Union

import torch

from ..config import LR_SCHEDULES, OPTIMIZERS, RunConfig, TrainConfig
from ..data.generative import GenerativeTask
from ..data.tasks import Task
from ..evaluation.generation import answer_validation_prior
from ..models import load_model
from ..posteriors.ensemble import Ensemble, EpochSnapshots, trainable_weights
from ..posteriors.posterior_lora import PosteriorLoRA
from ..posteriors.swag import SWAGCollector
from .training import make_optimizer, train

__all__ = ["Checkpoint", "train_checkpoint", "open_checkpoint", "OPTIMIZERS", "ADAPTER_FILE"]

ADAPTER_FILE = "adapter_model.safetensors"
Optimizer = Literal["adamw", "ivon", "swag", "adamw_lm_head"]
TRAINED_POSTERIORS = ("ivon", "swag")  # the trainings that leave a posterior beside the adapter
CHECKPOINT_ENSEMBLE_DIR = "checkpoint_ensemble"  # in an AdamW folder: the weights of its last epochs
INITIAL_FILE = "initial_lora.safetensors"  # θ₀: the LoRA weights where training started, the Laplace prior's centre


@dataclass
class Checkpoint:
    """A trained model and what its methods fit from it, once each.

    ``posterior`` is the one training left, IVON's or SWAG's (``None`` after AdamW); ``seconds`` and
    ``losses`` are the training's (0 and none when reloaded). The model holds the trained weights (for IVON
    and SWAG, the posterior mean). ``directory`` is the checkpoint's folder.
    """

    optimizer: Optional[Optimizer]
    config: RunConfig
    task: Task
    model: torch.nn.Module
    tokenizer: object
    posterior: Optional[object]
    directory: Optional[Path] = None
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    _cache: dict = field(default_factory=dict, repr=False)

    def loader(self, split: str = "test", task: Optional[Task] = None):
        """An evaluation loader over ``split`` of ``task`` (default: the run's), unshuffled: the same object for
        the same (split, task), so that what is computed once per loader (:meth:`linearized_terms`) is shared
        by every method that reads that split."""
        task = task or self.task
        key = ("loader", split, id(task))
        hit = self._cache.get(key)
        if hit is None or hit[0] is not task:  # the task is held, so its id is not reused meanwhile
            hit = self._cache[key] = (task, task.loader(self.tokenizer, split, self.config.eval.batch_size,
                                                        shuffle=False))
        return hit[1]

    def laplace(self, prior=None, structure: Optional[str] = None, modules: Optional[tuple[str, ...]] = None):
        """Laplace-LoRA on this checkpoint with ``prior`` and ``structure`` (defaults the configuration's):
        ``"auto"`` (validation when the task has a validation split, else evidence), ``"evidence"``,
        ``"validation"`` (on the validation split: the linearized predictive's NLL, or for a generative task the
        sampled model average's NLL of the reference answers) or a fixed λ; ``"kfac"`` or ``"diag"``;
        ``modules`` (default ``laplace.modules``): over the LoRA of these target modules only
        (``("lm_head",)``: LLLA). The curvature of each (structure, modules) is fitted once, on
        ``config.laplace.n_examples`` training examples, and every prior reuses it."""
        from ..laplace import resolve_prior, validation_prior, with_prior

        settings = self.config.laplace
        prior = resolve_prior(settings.prior if prior is None else prior, bool(self.task.validation))
        if prior == "validation" and not self.task.validation:  # refused before the fit, not after it
            raise ValueError("the validation prior needs a validation split (data.val_split > 0; --val-split on "
                             "the command line)")
        fit = self._laplace_fit(structure, modules)
        if prior == "validation" and isinstance(self.task, GenerativeTask):
            lam = answer_validation_prior(fit, self.model, list(self.loader("validation")),
                                          self.config.eval.n_samples, self.config.seed)
            return fit.with_prior_precision(dict.fromkeys(fit.prior_precision, lam))
        if prior == "validation":  # on the validation split's terms, which a τ* sweep of the same fit reuses
            terms = self.linearized_terms(self.loader("validation"), structure, modules)
            return fit.with_prior_precision(validation_prior(fit, None, terms=terms))
        return with_prior(fit, prior, None, settings.granularity)

    def _laplace_key(self, structure: Optional[str], modules: Optional[tuple[str, ...]]) -> tuple[str, Optional[tuple]]:
        settings = self.config.laplace
        modules = settings.modules if modules is None else modules
        return structure or settings.structure, None if modules is None else tuple(modules)

    def _laplace_fit(self, structure: Optional[str], modules: Optional[tuple[str, ...]]):
        from ..laplace import fit_laplace

        settings = self.config.laplace
        structure, modules = self._laplace_key(structure, modules)
        key = f"laplace:{structure}:{modules}"
        if key not in self._cache:
            fit_task = self.task.subset(n_train=settings.n_examples, seed=self.config.seed)
            self._cache[key] = fit_laplace(
                self.model, self.loader("train", fit_task), n_kfac=settings.n_kfac, prior=1.0, fisher=settings.fisher,
                kfac=settings.kfac, progress=self.config.progress, structure=structure, modules=modules,
                prior_mean=self.initial_weights())
        return self._cache[key]

    def initial_weights(self) -> Optional[dict[str, torch.Tensor]]:
        """θ₀, the LoRA weights where this run's training started (the Laplace prior's centre), as
        :func:`train_checkpoint` saved them; ``None`` for an adapter trained elsewhere (the evidence then falls
        back, and says so)."""
        path = None if self.directory is None else self.directory / INITIAL_FILE
        if path is None or not path.exists():
            return None
        from safetensors.torch import load_file

        return self.cached("initial weights", lambda: load_file(str(path), device=str(_device_of(self.model))))

    def linearized_terms(self, loader, structure: Optional[str] = None, modules: Optional[tuple[str, ...]] = None):
        """The λ-free terms of the linearized predictive of the Laplace fit (``structure``, ``modules``) on
        ``loader`` (:func:`bayes_peft.laplace.prior.linearized_terms`: one forward and C − 1 backward passes),
        computed once per loader, so that every prior of the fit predicts from one Jacobian pass. Kept while the
        checkpoint lives: small for KFAC (n_kfac² numbers a layer and example), the per-example gradients of
        every weight for ``"diag"``."""
        from ..laplace.prior import linearized_terms

        key = ("linearized terms", *self._laplace_key(structure, modules), id(loader))
        hit = self._cache.get(key)
        if hit is None or hit[0] is not loader:  # the loader is held, so its id is not reused meanwhile
            hit = self._cache[key] = (loader, linearized_terms(self._laplace_fit(structure, modules), loader))
        return hit[1]

    def cached(self, key: str, make):
        """``make()``, computed once per checkpoint (a method's temperature, say) and reused on every loader."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def fitted(self, key: str) -> Optional[object]:
        """What :meth:`cached` holds under ``key`` (``None`` before it was computed)."""
        return self._cache.get(key)

    def checkpoint_ensemble(self) -> Ensemble:
        """The AdamW run's weights at the end of its last ``train.ensemble.size`` epochs, kept while it trained."""
        folder = None if self.directory is None else self.directory / CHECKPOINT_ENSEMBLE_DIR
        if folder is None or not folder.exists():
            raise ValueError(f"{self.directory} keeps no checkpoint ensemble: only an AdamW training keeps one "
                             "(train it again into an empty folder)")
        return self.cached("checkpoint ensemble", lambda: Ensemble.load(folder, self.model))

    def lora_ensemble(self) -> Ensemble:
        """This run and ``train.ensemble.size − 1`` more AdamW runs on the same data from other initialisation
        seeds (:class:`~bayes_peft.config.EnsembleConfig`), trained once into folders beside this one
        (``adamw_member1``, …) and reused after."""
        return self.cached("lora ensemble", self._train_lora_ensemble)

    def _train_lora_ensemble(self) -> Ensemble:
        if self.optimizer != "adamw" or self.directory is None:
            raise ValueError("a LoRA ensemble grows from an AdamW checkpoint with a folder (train_checkpoint's)")
        settings = self.config.train.ensemble
        members = [trainable_weights(self.model)]
        for k in range(1, settings.size):
            member = self.config.override({"train.init_seed": self.config.init_seed + settings.seed_stride * k})
            trained = train_checkpoint(member, "adamw", self.directory.parent / f"adamw_member{k}", self.task)
            members.append({n: w.cpu() for n, w in trainable_weights(trained.model).items()})
            del trained  # one base model at a time
        return Ensemble(self.model, members, kind="lora")


def train_checkpoint(config: RunConfig, optimizer: Optimizer, directory: Union[str, os.PathLike],
                     task: Optional[Task] = None, resume: Union[str, os.PathLike, None] = None,
                     save_every: Optional[int] = None, reuse: bool = True) -> Checkpoint:
    """Train ``optimizer`` as ``config`` says and save the adapter (and IVON's or SWAG's posterior) in
    ``directory``; with ``reuse``, reload a finished adapter found there instead.

    ``resume``: a training-state file (:func:`bayes_peft.experiments.training.train`'s ``checkpoint``), saved every
    ``save_every`` steps (default: at the end), from which an interrupted or shorter run continues, the
    data order included. ``task`` defaults to ``config.load_task()``.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    task = task if task is not None else config.load_task()
    directory = Path(directory)
    if reuse and (directory / ADAPTER_FILE).exists():
        if not (directory / INITIAL_FILE).exists():  # trained here before θ₀ was kept: the same seed draws it again
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.init_seed)
                fresh, _ = _load(config, lm_head=optimizer == "adamw_lm_head")
            _save_initial(directory / INITIAL_FILE, fresh)
            del fresh
        return open_checkpoint(config, directory, task, optimizer)
    torch.manual_seed(config.init_seed)  # the LoRA initialisation and dropout
    model, tokenizer = _load(config, lm_head=optimizer == "adamw_lm_head")
    _save_initial(directory / INITIAL_FILE, model)  # before IVON puts a sample into the weights
    start = time.perf_counter()
    settings = config.train
    if optimizer == "ivon":
        opt = make_optimizer("ivon", model, seed=config.init_seed, **settings.ivon.kwargs(len(task.train)))
    else:
        opt = make_optimizer("adamw", model, lr=settings.adamw_lr)
    per_epoch = settings.steps_per_epoch(len(task.train))
    scheduler, observers = None, []
    if optimizer == "swag":
        scheduler, observers = swag_schedule(opt, config, len(task.train), model)
    elif optimizer != "ivon":
        scheduler = adamw_schedule(opt, settings)
    if optimizer == "adamw":
        observers = [EpochSnapshots(model, every=per_epoch, keep=settings.ensemble.size)]
    loader = task.loader(tokenizer, "train", settings.batch_size, seed=config.init_seed)
    losses = train(model, task, loader, opt, settings.steps, scheduler=scheduler, progress=config.progress,
                   desc=f"{optimizer} {task.name}", checkpoint=resume, save_every=save_every or settings.steps,
                   observers=observers)
    posterior = None
    if optimizer in TRAINED_POSTERIORS:
        if optimizer == "swag" and observers[0].n == 0:
            observers[0].collect()  # a run shorter than SWAG's start: its last iterate (SWA = the AdamW weights)
        posterior = PosteriorLoRA.from_ivon(model, opt) if optimizer == "ivon" else observers[0].posterior()
        posterior.save(directory)  # the adapter at the mean, and the posterior
        mean = posterior.mean_weights()
        with torch.no_grad():  # training is over: leave the mean in the model, as a reloaded checkpoint has it
            for name, p in model.named_parameters():
                if name in mean:
                    p.copy_(mean[name])
    else:
        if optimizer == "adamw":
            observers[0].keep_if_none()
            observers[0].ensemble().save(directory / CHECKPOINT_ENSEMBLE_DIR)
        # The adapter last: it marks the folder finished. (With lm_head a target and the embeddings tied, peft
        # would also save the frozen embedding matrix; the LoRA is all that trained.)
        model.save_pretrained(str(directory), save_embedding_layers=False)
    return Checkpoint(optimizer, config, task, model, tokenizer, posterior, directory, time.perf_counter() - start,
                      losses)


def _save_initial(path: Path, model: torch.nn.Module) -> None:
    """The model's trainable (LoRA) weights, whole, into ``path``."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({n: w.detach().cpu().contiguous() for n, w in trainable_weights(model).items()}, str(path))


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(p for p in model.parameters() if p.requires_grad).device


def open_checkpoint(config: RunConfig, directory: Union[str, os.PathLike], task: Optional[Task] = None,
                    optimizer: Optional[Optimizer] = None) -> Checkpoint:
    """The adapter saved in ``directory`` (by :func:`train_checkpoint` or ``bayes-peft train``) on
    ``config.model``; for ``optimizer`` ``"ivon"`` or ``"swag"`` also the posterior saved beside it."""
    torch.manual_seed(config.seed)  # LoRA dropout, should the model train on
    model, tokenizer = _load(config, adapter=Path(directory))
    posterior = PosteriorLoRA.load(directory, model) if optimizer in TRAINED_POSTERIORS else None
    return Checkpoint(optimizer, config, task if task is not None else config.load_task(), model, tokenizer, posterior,
                      Path(directory))


def stage_config(config: RunConfig, step: int) -> RunConfig:
    """``config`` trained up to ``step`` only, one stage of a longer run: the learning-rate schedule keeps the
    whole run's horizon."""
    return config.override({"train.steps": step,
                            "train.schedule_steps": config.train.schedule_steps or config.train.steps})


def train_stages(config: RunConfig, optimizer: Optimizer, run_dir: Union[str, os.PathLike], stages: Sequence[int],
                 task: Optional[Task] = None) -> Iterator[tuple[int, Checkpoint]]:
    """``(step, checkpoint)`` at each of ``stages`` (increasing step counts, at most ``config.train.steps``) of one
    run of ``optimizer``, trained once: each stage continues from the last (``run_dir/<optimizer>.resume.pt``,
    the data order included) and leaves its checkpoint in ``run_dir/step<k>/<optimizer>``, which later calls
    reuse."""
    if list(stages) != sorted(set(stages)) or not stages or stages[0] < 1 or stages[-1] > config.train.steps:
        raise ValueError(f"stages must increase from 1 to at most {config.train.steps} steps, got {list(stages)}")
    run_dir = Path(run_dir)
    for step in stages:
        yield step, train_checkpoint(stage_config(config, step), optimizer, run_dir / f"step{step}" / optimizer, task,
                                     resume=run_dir / f"{optimizer}.resume.pt")


def adamw_schedule(optimizer: torch.optim.Optimizer, settings: TrainConfig):
    """AdamW's learning-rate schedule (``settings.lr_schedule``): ``None`` for a constant rate; for
    ``"linear"``, a factor falling from 1 at the first step to 0 at ``settings.schedule_steps`` (default: the
    run's steps), as both papers train."""
    if settings.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {settings.lr_schedule!r}")
    if settings.lr_schedule == "constant":
        return None
    horizon = settings.schedule_steps or settings.steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / horizon))


def swag_schedule(optimizer: torch.optim.Optimizer, config: RunConfig, n_train: int, model: torch.nn.Module):
    """``(scheduler, [collector])`` of SWAG-LoRA's recipe (:class:`~bayes_peft.config.SWAGConfig`): the
    learning rate constant until the start, then falling linearly over the anneal epochs to its SWA value;
    the weights collected ``collections_per_epoch`` times an epoch from the start on.

    torch's ``SWALR`` anneals from its first step and reads the learning rate when it is built, so it cannot
    wait for the start inside one schedule; a ``LambdaLR`` gives the same linear anneal from the start on.
    """
    swag = config.train.swag
    per_epoch = config.train.steps_per_epoch(n_train)
    start, anneal = round(swag.start_epoch * per_epoch), round(swag.anneal_epochs * per_epoch)
    every = max(1, round(per_epoch / swag.collections_per_epoch))

    def factor(step: int) -> float:
        done = min(max(step - start, 0) / anneal, 1.0) if anneal else float(step >= start)
        return 1.0 - (1.0 - swag.lr_ratio) * done

    collector = SWAGCollector(model, swag.max_rank, start=max(start, 1), every=every)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), [collector]


def _load(config: RunConfig, adapter: Optional[Path] = None, lm_head: bool = False):
    """The configuration's model on its device (CUDA when present, unless ``config.device`` says otherwise),
    with a fresh LoRA (also on the output layer with ``lm_head``) or the ``adapter``; a bitsandbytes base
    stays where bitsandbytes put it."""
    model, tokenizer = load_model(config.model, quantization=config.quantization, adapter=adapter,
                                  lora={"lm_head": lm_head})
    if config.quantization is None:
        model.to(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model, tokenizer

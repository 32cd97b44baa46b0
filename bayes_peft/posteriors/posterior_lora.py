"""PosteriorLoRA: one interface to a Gaussian posterior over a model's LoRA weights, whatever fitted it.

Build one from IVON's optimizer state (:meth:`PosteriorLoRA.from_ivon`, a :class:`DiagonalPosterior`), by
a post-hoc Laplace fit (:meth:`PosteriorLoRA.fit_laplace`, a :class:`~bayes_peft.laplace.KFACPosterior`),
from the iterates of any optimizer (:meth:`PosteriorLoRA.from_swag`, a :class:`~bayes_peft.posteriors.swag.SWAGPosterior`)
or from a saved folder (:meth:`PosteriorLoRA.load`, which also reads a saved
:class:`~bayes_peft.posteriors.ensemble.Ensemble`). Every backend answers the same questions, those of
:class:`~bayes_peft.posteriors.gaussian.GaussianLoRA`: ``mean()``, ``sample(tau, generator)``, ``logit_moments``,
``save``. :class:`MCDropout` puts the seeds' dropout baseline behind the same ``mean``/``sample``.

This module sits above the backends (they extend :mod:`bayes_peft.posteriors.gaussian` and never import it), so
that a saved Laplace or SWAG posterior loads in a process that never imported its module.
"""

from __future__ import annotations

import abc
import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from ..laplace import KFACPosterior, fit_laplace
from .ensemble import ENSEMBLE_FILE, Ensemble
from .gaussian import GaussianLoRA, PosteriorFileError, device_generator
from .swag import SWAGCollector, SWAGPosterior

__all__ = ["PosteriorLoRA", "DiagonalPosterior", "MCDropout", "PosteriorFileError"]


class PosteriorLoRA(abc.ABC):
    """A Gaussian posterior over the LoRA weights of a model: build one with :meth:`from_ivon`,
    :meth:`fit_laplace` or :meth:`load`.

    Every backend is a ``PosteriorLoRA`` (``isinstance`` holds) with the methods of
    :class:`~bayes_peft.posteriors.gaussian.GaussianLoRA`.
    """

    @staticmethod
    def from_ivon(model: nn.Module, optimizer) -> "DiagonalPosterior":
        """IVON's N(m, diag(v)) with v = 1 / (ess·(h + δ)), for the parameters of ``model`` it trains."""
        names = {id(p): n for n, p in model.named_parameters()}
        mean, variance = {}, {}
        for p, m, v in zip(optimizer.trainable_parameters(), optimizer.posterior_mean(),
                           optimizer.posterior_variance()):
            if id(p) not in names:
                raise ValueError("the optimizer trains a parameter that is not part of the model")
            mean[names[id(p)]], variance[names[id(p)]] = m, v
        return DiagonalPosterior(model, mean, variance, training=_ivon_training(optimizer))

    @staticmethod
    def fit_laplace(model: nn.Module, train_loader, **kwargs) -> KFACPosterior:
        """Post-hoc Laplace-LoRA; see :func:`bayes_peft.laplace.fit_laplace` for the arguments."""
        return fit_laplace(model, train_loader, **kwargs)

    @staticmethod
    def from_swag(collector: SWAGCollector) -> SWAGPosterior:
        """SWAG's N(θ̄, ½(diag + D Dᵀ/(K − 1))) from the iterates a :class:`~bayes_peft.posteriors.swag.SWAGCollector`
        collected; its mean is SWA."""
        return collector.posterior()

    @staticmethod
    def load(directory: Union[str, os.PathLike], model: nn.Module) -> Union[GaussianLoRA, Ensemble]:
        """Load a posterior of any backend written by ``save`` for ``model`` (same LoRA shapes), or an
        :class:`~bayes_peft.posteriors.ensemble.Ensemble` from a folder its ``save`` wrote."""
        if (Path(directory) / ENSEMBLE_FILE).exists():
            return Ensemble.load(directory, model)
        return GaussianLoRA.load(directory, model)


PosteriorLoRA.register(GaussianLoRA)  # both backends are PosteriorLoRA for isinstance and type checks


class DiagonalPosterior(GaussianLoRA):
    """N(m, diag(v)) over the LoRA weights: IVON's posterior (``PosteriorLoRA.from_ivon``)."""

    kind = "diagonal"

    def __init__(self, model: nn.Module, mean: Mapping[str, Tensor], variance: Mapping[str, Tensor],
                 training: Optional[Mapping[str, Any]] = None):
        """``training``: how the posterior was trained (IVON's settings, written into ``posterior.json``)."""
        super().__init__(model, mean)
        self.training = dict(training or {})
        if set(variance) != set(mean):
            raise ValueError("mean and variance must name the same parameters")
        for name, v in variance.items():
            if v.shape != self._mean[name].shape:
                raise ValueError(f"{name}: variance shape {tuple(v.shape)} != mean shape {tuple(self._mean[name].shape)}")
            if not torch.isfinite(v).all() or (v < 0).any():
                raise ValueError(f"{name}: the variance must be finite and non-negative")
        self.variance = {n: variance[n].detach().to(self._mean[n].device, torch.float32).clone() for n in self._mean}

    def _sample_offsets(self, generator):
        device = next(iter(self._mean.values())).device  # one stream, whatever device_map spread the weights over
        g = device_generator(generator, device)
        return {n: torch.randn(m.shape, generator=g, dtype=m.dtype, device=device).to(m.device) * self.variance[n].sqrt()
                for n, m in self._mean.items()}

    def _layer_covariance(self, name, per_example):
        weighted = per_example * self.variance[name]
        return torch.einsum("cboi,dboi->bcd", weighted, per_example)

    def _tensor_stores(self):
        return [self._mean, self.variance]

    def _state_tensors(self):
        return {**{f"mean.{n}": m for n, m in self._mean.items()},
                **{f"variance.{n}": v for n, v in self.variance.items()}}

    @classmethod
    def _required_tensors(cls, config):
        return [f"{part}.{n}" for n in config["names"] for part in ("mean", "variance")]

    def _config(self):
        return {"training": self.training} if self.training else {}

    @classmethod
    def _from_saved(cls, model, tensors, config):
        names = config["names"]
        return cls(model, {n: tensors[f"mean.{n}"] for n in names}, {n: tensors[f"variance.{n}"] for n in names},
                   training=config.get("training"))


def _ivon_training(optimizer) -> dict[str, Any]:
    """What an IVON run chose and learned, for the posterior's JSON: its settings (``optimizer.settings``),
    the steps, and the spread of the learned Hessian (h / hess_init at the end; the coefficient of variation
    of σ across weights)."""
    with torch.no_grad():
        hess = torch.cat([h.double().reshape(-1) for h in optimizer.hessian()])
        sd = torch.cat([v.double().reshape(-1) for v in optimizer.posterior_variance()]).sqrt()
    settings = optimizer.settings
    return {"optimizer": "ivon", **settings.to_dict(), "steps": optimizer.current_step,
            "hess_over_init_median": float(hess.median() / settings.hess_init),
            "sd_median": float(sd.median()), "sd_cv": float(sd.std() / sd.mean())}


class MCDropout:
    """MC-dropout, the seeds' cheap baseline, behind the posterior interface the evaluator uses.

    ``sample`` switches the model's dropout layers (LoRA dropout included) on for the block, with their
    randomness seeded from ``generator``; ``mean`` is the deterministic model. ``tau`` is not used.
    """

    kind = "mc_dropout"

    def __init__(self, model: nn.Module):
        self.model = model
        self._dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]
        if not self._dropouts:
            raise ValueError("the model has no dropout layers with p > 0; MC-dropout would be deterministic")

    def to(self, device) -> "MCDropout":
        return self

    def mean(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def sample(self, tau: float = 1.0, generator: Optional[torch.Generator] = None) -> Iterator[None]:
        seed = int(torch.randint(2**62, (1,), generator=generator))
        device = next(self.model.parameters()).device
        states = [m.training for m in self._dropouts]
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            try:
                for m in self._dropouts:
                    m.train()
                yield
            finally:
                for m, state in zip(self._dropouts, states):
                    m.train(state)

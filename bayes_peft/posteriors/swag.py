"""SWAG (Maddox et al., NeurIPS 2019) over the LoRA weights: a Gaussian fitted to the iterates of training.

:class:`SWAGCollector` watches any optimizer's iterates (call :meth:`~SWAGCollector.step` after each
``opt.step()``): from ``start`` on, every ``every`` steps it adds the trainable weights θ_i to running first
and second moments and keeps the last K deviations θ_i − θ̄_i (θ̄_i the running mean after θ_i).
:meth:`~SWAGCollector.posterior` turns them into a :class:`SWAGPosterior`:

    Σ = ½ (diag(θ²‾ − θ̄²) + D Dᵀ / (K − 1)),   D = [θ_i − θ̄_i] the last K deviations,

sampled as θ = θ̄ + √τ · (√(½ diag) z₁ + D z₂ / √(2 (K − 1))), z₁ ~ N(0, I_P), z₂ ~ N(0, I_K). The ½ is
Maddox et al.'s convention (each part carries half the covariance); swag-lora's sampler scales the sum by 1
instead, twice this covariance. The mean θ̄ alone is SWA. The deviations couple every layer, so the
linearized predictive sums the low-rank part over layers before squaring it (:meth:`_logit_covariance`).

``torch.optim.swa_utils.AveragedModel`` keeps only the mean, of a deep copy of the whole model (a 7B base
for a few MB of LoRA), so the moments are kept here for the trainable weights alone; ``SWALR`` is the
learning-rate schedule that SWAG-LoRA anneals with, and fits any optimizer as it is.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

from .. import sharding
from .gaussian import GaussianLoRA, device_generator

__all__ = ["SWAGCollector", "SWAGPosterior"]


class SWAGPosterior(GaussianLoRA):
    """N(θ̄, ½ (diag(d) + D Dᵀ / (K − 1))) over the LoRA weights (see :mod:`bayes_peft.posteriors.swag`).

    Args:
        model: the model whose trainable weights the posterior covers.
        mean: θ̄, by parameter name.
        diagonal: d = θ²‾ − θ̄² (clamped at 0), by name.
        deviations: D, by name, ``[K, *shape]``: the same K iterates for every parameter. With K < 2 the
            low-rank part is left out.
    """

    kind = "swag"

    def __init__(self, model: nn.Module, mean: Mapping[str, Tensor], diagonal: Mapping[str, Tensor],
                 deviations: Mapping[str, Tensor]):
        super().__init__(model, mean)
        if set(diagonal) != set(mean) or set(deviations) != set(mean):
            raise ValueError("mean, diagonal and deviations must name the same parameters")
        ranks = {d.shape[0] for d in deviations.values()}
        if len(ranks) > 1:
            raise ValueError(f"every parameter needs the same number of deviations, got {sorted(ranks)}")
        for name, m in self._mean.items():
            if diagonal[name].shape != m.shape or deviations[name].shape[1:] != m.shape:
                raise ValueError(f"{name}: diagonal {tuple(diagonal[name].shape)} or deviations "
                                 f"{tuple(deviations[name].shape)} do not fit the mean {tuple(m.shape)}")
        device = next(iter(self._mean.values())).device
        self.diagonal = {n: diagonal[n].detach().to(device, torch.float32).clamp_min(0).clone() for n in self._mean}
        self.deviations = {n: deviations[n].detach().to(device, torch.float32).clone() for n in self._mean}

    @property
    def rank(self) -> int:
        """K, the number of deviations kept."""
        return next(iter(self.deviations.values())).shape[0]

    def _low_rank_scale(self) -> float:
        """The factor s of the low-rank part s·D z₂ of a sample (0 when K < 2)."""
        return (2.0 * (self.rank - 1)) ** -0.5 if self.rank >= 2 else 0.0

    def _sample_offsets(self, generator: Optional[torch.Generator]) -> dict[str, Tensor]:
        device = next(iter(self._mean.values())).device
        g = device_generator(generator, device)
        z2 = torch.randn(self.rank, generator=g, device=device)  # one draw shared by every layer
        scale = self._low_rank_scale()
        offsets = {}
        for name, m in self._mean.items():
            z1 = torch.randn(m.shape, generator=g, device=device)
            low_rank = torch.tensordot(z2, self.deviations[name], dims=1)
            offsets[name] = (0.5 * self.diagonal[name]).sqrt() * z1 + scale * low_rank
        return offsets

    def _layer_covariance(self, name: str, per_example: Tensor) -> Tensor:
        """The diagonal part of one layer, ½ J_l diag(d_l) J_lᵀ."""
        weighted = per_example * (0.5 * self.diagonal[name])
        return torch.einsum("cboi,dboi->bcd", weighted, per_example)

    def _logit_covariance(self, per_example: Iterable[tuple[str, Tensor]]) -> Tensor:
        """Σ_l ½ J_l diag(d_l) J_lᵀ + (J D)(J D)ᵀ / (2 (K − 1)), with J D summed over layers first."""
        diagonal, projected = 0, 0
        for name, grads in per_example:
            diagonal = diagonal + self._layer_covariance(name, grads)
            projected = projected + torch.einsum("cboi,koi->bck", grads, self.deviations[name])
        scale = self._low_rank_scale()
        return diagonal + scale ** 2 * torch.einsum("bck,bdk->bcd", projected, projected)

    def _tensor_stores(self):
        return [self._mean, self.diagonal, self.deviations]

    def _state_tensors(self):
        return {**{f"mean.{n}": m for n, m in self._mean.items()},
                **{f"diagonal.{n}": d for n, d in self.diagonal.items()},
                **{f"deviations.{n}": d for n, d in self.deviations.items()}}

    def _config(self):
        return {"rank": self.rank}

    @classmethod
    def _required_tensors(cls, config):
        return [f"{part}.{n}" for n in config["names"] for part in ("mean", "diagonal", "deviations")]

    @classmethod
    def _from_saved(cls, model, tensors, config):
        names = config["names"]
        return cls(model, *({n: tensors[f"{part}.{n}"] for n in names} for part in ("mean", "diagonal", "deviations")))


class SWAGCollector:
    """Running moments of ``model``'s trainable weights over training iterates, for SWA and SWAG.

    Call :meth:`step` after every optimizer step: it counts the step and, from step ``start`` on, every
    ``every`` steps, collects the weights (:meth:`collect`). ``max_rank`` is K, the deviations kept (SWAG-LoRA
    and Maddox et al. use 5). The moments are kept in float64 on the weights' device, so that a long run's
    running mean does not drift; :meth:`state_dict` and :meth:`load_state_dict` resume a run exactly. Under
    FSDP2 each rank keeps the moments of its slices of the weights, and :meth:`posterior` gathers them (a
    collective: every rank calls it).
    """

    def __init__(self, model: nn.Module, max_rank: int = 5, start: int = 0, every: int = 1):
        if max_rank < 0 or every < 1 or start < 0:
            raise ValueError(f"need max_rank ≥ 0, every ≥ 1 and start ≥ 0, got {max_rank}, {every}, {start}")
        self.model = model
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("the model has no trainable parameters to collect")
        self.max_rank, self.start, self.every = max_rank, start, every
        self.steps = 0
        self.n = 0  # iterates collected
        self.mean = {n: torch.zeros_like(sharding.local(p), dtype=torch.float64) for n, p in self.params.items()}
        self.sq_mean = {n: torch.zeros_like(m) for n, m in self.mean.items()}
        self.deviations: deque[dict[str, Tensor]] = deque(maxlen=max_rank)

    def step(self) -> bool:
        """Count one optimizer step and collect if one is due; whether it collected."""
        self.steps += 1
        due = self.steps >= self.start and (self.steps - self.start) % self.every == 0
        if due:
            self.collect()
        return due

    @torch.no_grad()
    def collect(self) -> None:
        """Add the weights as they are now to the moments, and their deviation from the new mean."""
        self.n += 1
        weights = {n: sharding.local(p).double() for n, p in self.params.items()}
        for name, w in weights.items():
            self.mean[name].add_(w - self.mean[name], alpha=1.0 / self.n)
            self.sq_mean[name].add_(w * w - self.sq_mean[name], alpha=1.0 / self.n)
        if self.max_rank:
            self.deviations.append({n: (w - self.mean[n]).float() for n, w in weights.items()})

    def posterior(self) -> SWAGPosterior:
        """The SWAG posterior of the iterates collected so far (at least one)."""
        if self.n == 0:
            raise ValueError("no iterate collected yet: call step() after optimizer steps, or collect()")
        whole = lambda name, t: sharding.assemble(self.params[name], t)  # noqa: E731
        mean = {n: whole(n, m) for n, m in self.mean.items()}
        diagonal = {n: whole(n, (self.sq_mean[n] - self.mean[n].square()).clamp_min(0)) for n in self.params}
        deviations = {n: torch.stack([whole(n, d[n]) for d in self.deviations]) if self.deviations
                      else mean[n].new_zeros((0, *mean[n].shape)) for n in self.params}
        return SWAGPosterior(self.model, mean, diagonal, deviations)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "n": self.n, "mean": {n: t.clone() for n, t in self.mean.items()},
                "sq_mean": {n: t.clone() for n, t in self.sq_mean.items()},
                "deviations": [{n: t.clone() for n, t in d.items()} for d in self.deviations],
                "settings": {"max_rank": self.max_rank, "start": self.start, "every": self.every}}

    def load_state_dict(self, state: dict) -> None:
        settings = {"max_rank": self.max_rank, "start": self.start, "every": self.every}
        if state["settings"] != settings:
            raise ValueError(f"the saved collector had {state['settings']}, this one {settings}")
        if set(state["mean"]) != set(self.params):
            raise ValueError("the saved collector watched other parameters than this model's trainable ones")
        self.steps, self.n = int(state["steps"]), int(state["n"])
        for store, saved in ((self.mean, state["mean"]), (self.sq_mean, state["sq_mean"])):
            for name, t in saved.items():
                store[name].copy_(t)
        self.deviations.clear()
        self.deviations.extend({n: t.to(self.mean[n].device) for n, t in d.items()} for d in state["deviations"])

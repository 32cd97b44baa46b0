"""IVON's update rules as pure functions over one parameter group's flat buffers, and the per-step records
they read. :mod:`bayes_peft.ivon` keeps the bookkeeping (samples in the weights, contexts, persistence).

The rules themselves are ivon-opt's (``_new_momentum``, ``_new_hess``, ``_new_param_averages``), called
unchanged, so that the result is bit-identical to ivon-opt's; what is added here is the averaging over MC
samples and the device-side masking that skips a step with a NaN/inf gradient without a host read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import ivon
import torch
from torch import Tensor

__all__ = ["Sample", "GradientSamples", "draw_noise", "all_finite", "updated_group"]


@dataclass
class Sample:
    """Noise currently added to the weights, one flat tensor per parameter group."""

    noise: list[Tensor]  # [numel_g] per group
    train: bool  # a training sample: its gradient feeds the next update


@dataclass
class GradientSamples:
    """Running sums over the MC samples of one step, one flat tensor per parameter group.

    ``n`` counts the samples on the host. ``count`` holds per-element counts, only once some parameter
    had no gradient in some sample (until then every element was seen ``n`` times).
    """

    grad: list[Tensor]
    curvature: list[Tensor]  # noise * grad for 'price', grad**2 for 'gradsq'
    n: int = 0
    count: Optional[list[Tensor]] = None

    @property
    def empty(self) -> bool:
        return self.n == 0

    def per_element_counts(self) -> list[Tensor]:
        """``count``, made per element first if it was not (every element seen ``n`` times)."""
        if self.count is None:
            self.count = [torch.full_like(g, float(self.n)) for g in self.grad]
        return self.count

    def averages(self, group: int) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """(mean gradient, mean curvature, ``[numel]`` mask of the elements seen or ``None`` if all were)."""
        grad, curvature = self.grad[group], self.curvature[group]
        if self.count is None:
            return grad / self.n, curvature / self.n, None
        count = self.count[group]
        n = count.clamp(min=1)
        return grad / n, curvature / n, count > 0


def draw_noise(group: dict, tau: float, generator: Optional[torch.Generator], device, dtype) -> Tensor:
    """``[numel]``: ε·√τ / √(ess·(h + δ)) with ε ~ N(0, I) from ``generator`` (None: torch's global one)."""
    eps = torch.randn(group["numel"], device=device, dtype=dtype, generator=generator)
    return eps * math.sqrt(tau) / (group["ess"] * (group["hess"] + group["weight_decay"])).sqrt()


def all_finite(tensors: list[Tensor]) -> Tensor:
    """A 0-dim bool tensor on the device: are all elements finite? (No host read.)"""
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


def updated_group(group: dict, mean: Tensor, avg_grad: Tensor, avg_curv: Tensor, keep: Tensor, step: int,
                  hess_approx: str, debias: bool, rescale_lr: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One IVON step of a group: ``(mean, momentum, hess)``, each ``[numel]``, where ``keep`` (0-dim or
    ``[numel]``, bool) is true; the old values elsewhere."""
    wd = group["weight_decay"]
    momentum = ivon.IVON._new_momentum(avg_grad, group["momentum"], group["beta1"])
    hess = ivon.IVON._new_hess(hess_approx, group["hess"], avg_curv, avg_curv, slice(None), group["ess"],
                               group["beta2"], wd)
    new_mean = ivon.IVON._new_param_averages(
        mean,
        hess,
        momentum,
        group["lr"] * (group["hess_init"] + wd) if rescale_lr else group["lr"],
        wd,
        group["clip_radius"],
        1.0 - math.pow(group["beta1"], float(step)) if debias else 1.0,
        group["hess_init"],
    )
    return (torch.where(keep, new_mean, mean), torch.where(keep, momentum, group["momentum"]),
            torch.where(keep, hess, group["hess"]))

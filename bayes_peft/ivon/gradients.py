"""The gradient samples of one IVON step: each MC sample's ``p.grad`` gathered into flat sums per group.

A step averages, over its MC samples, the gradient g and a curvature estimate of each weight (noise ⊙ g for
``"price"``, g² for ``"gradsq"``; :func:`curvature_`). :class:`GradientRecorder` gathers one sample's
gradients of a group into one flat buffer with one op, and :class:`GradientSamples` keeps the sums until
the update reads their averages. Parameters without a gradient in a sample are counted per element, so
that they keep their state rather than being averaged with zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import sharding
from .flat import FlatMirror
from .rules import Sample, averages_hess

__all__ = ["GradientSamples", "GradientRecorder", "curvature_"]


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

    def add(self, grads: list[Tensor], curvatures: list[Tensor], seen: Optional[list[Tensor]] = None) -> None:
        """Add one sample's gradients and curvatures; ``seen`` (``[numel]`` 0/1 per group) marks the elements
        that had a gradient, when some had none."""
        torch._foreach_add_(self.grad, grads)
        torch._foreach_add_(self.curvature, curvatures)
        self.count_seen(seen)

    def count_seen(self, seen: Optional[list[Tensor]]) -> None:
        """Count one more sample: of every element, or with ``seen`` of the elements it marks."""
        if seen is not None or self.count is not None:
            counts = self.per_element_counts()
            torch._foreach_add_(counts, seen if seen is not None else [torch.ones_like(c) for c in counts])
        self.n += 1

    def averages(self, group: int) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """(mean gradient, mean curvature, ``[numel]`` mask of the elements seen or ``None`` if all were)."""
        grad, curvature = self.grad[group], self.curvature[group]
        if self.count is None:
            return (grad, curvature, None) if self.n == 1 else (grad / self.n, curvature / self.n, None)
        count = self.count[group]
        n = count.clamp(min=1)
        return grad / n, curvature / n, count > 0


def curvature_(grad: Tensor, noise: Tensor, hess_approx: str, out: Tensor, baseline: Optional[Tensor] = None) -> Tensor:
    """The Hessian information of one gradient sample, into ``out``: noise ⊙ g (``"price"``) or g².

    ``baseline`` (``"price"`` only): noise ⊙ (g − b) instead, for a ``b`` fixed before the noise was drawn
    (the momentum). E[n] = 0 and n is independent of b, so the estimate stays unbiased, and the part of g
    that b predicts (the full-data gradient at the mean, large while the mean still moves) no longer
    multiplies the noise: a control variate.
    """
    if hess_approx != "price":
        return torch.square(grad, out=out)
    if baseline is None:
        return torch.mul(noise, grad, out=out)
    return torch.sub(grad, baseline, out=out).mul_(noise)


class GradientRecorder:
    """Gathers MC samples' gradients of parameter groups into :class:`GradientSamples`.

    ``local_groups`` holds each group's local tensors (this rank's slices where sharded), whose ``[numel]``
    flat layout the sums follow, and ``devices`` each group's device (an empty group's too). The first sample of a step is gathered into buffers kept from step to
    step, so that an ordinary step (one sample) allocates nothing.
    """

    def __init__(self, local_groups: Sequence[Sequence[Tensor]], devices: Sequence[torch.device],
                 dtype: torch.dtype):
        self._mirrors = [(FlatMirror(local), FlatMirror(local)) for local in local_groups]
        self._local_groups = [list(local) for local in local_groups]
        self._first_curvature = [torch.empty(sum(t.numel() for t in local), device=device, dtype=dtype)
                                 for local, device in zip(local_groups, devices)]

    @torch.no_grad()
    def record(self, param_groups: list[dict], sample: Sample, hess_approx: str,
               samples: Optional[GradientSamples]) -> Optional[GradientSamples]:
        """``samples`` (``None`` before a step's first sample) with the gradients in ``p.grad``, taken at
        ``sample``, added; parameters without a gradient are skipped, and a sample with none anywhere is
        not counted."""
        grads = [[None if p.grad is None else sharding.local(p.grad) for p in group["params"]]
                 for group in param_groups]
        if all(g is None for group in grads for g in group):
            return samples
        first = samples is None  # the step's first sample is gathered straight into the sum's buffer
        flat = [mirrors[0 if first else 1].gather(g) for g, mirrors in zip(grads, self._mirrors)]
        outs = self._first_curvature if first else [torch.empty_like(g) for g in flat]
        curvatures = [curvature_(g, noise, hess_approx, out, group["momentum"] if averages_hess(group) else None)
                      for g, noise, out, group in zip(flat, sample.noise, outs, param_groups)]
        seen = None
        if any(g is None for group in grads for g in group):
            seen = [torch.cat([torch.full_like(p, float(g is not None)).reshape(-1) for p, g in zip(local, group)])
                    if local else g_flat.new_zeros(0) for local, group, g_flat in zip(self._local_groups, grads, flat)]
        if first:
            samples = GradientSamples(flat, curvatures)
            samples.count_seen(seen)
        else:
            samples.add(flat, curvatures, seen)
        return samples

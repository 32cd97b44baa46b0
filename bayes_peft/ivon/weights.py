"""What an IVON optimizer's weights hold: the posterior mean, or the mean plus one sample's noise.

IVON keeps the mean itself (one flat buffer per parameter group) and writes either the mean or a sample
around it into the weights, which are views of one flat buffer per group (:mod:`bayes_peft.ivon.flat`), so that
each write is one op; under FSDP2 the weights are this rank's slices (:mod:`bayes_peft.sharding`), which the
buffer mirrors, so that a write is two. :class:`PosteriorWeights` is that bookkeeping: which sample the weights hold, which
one a ``with`` block must put back on exit (a stack, for nested contexts), and the stamps by which a
:class:`~bayes_peft.ivon.guard.WeightGuard` tells IVON's writes from anybody else's.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from .. import sharding
from .flat import FlatWeights, split_like
from .guard import WeightGuard
from .rules import Sample

__all__ = ["PosteriorWeights"]


class PosteriorWeights:
    """The weights of ``groups`` (lists of parameters; of sharded ones, this rank's slices), made views of one
    flat buffer per group or mirrored by it, and the posterior mean they rest at. ``sample`` is the :class:`~bayes_peft.ivon.rules.Sample` whose noise the
    weights hold on top of the mean, ``None`` when they hold the mean."""

    def __init__(self, groups: Sequence[Sequence[Tensor]]):
        self.groups = [[sharding.local(p) for p in g] for g in groups]
        self.weights = [FlatWeights(local, views=not any(sharding.is_sharded(p) for p in g))
                        for local, g in zip(self.groups, groups)]
        self.means = [w.buffer.clone() for w in self.weights]
        self.guard = WeightGuard([p for g in self.groups for p in g])
        self.sample: Optional[Sample] = None
        # The samples that open contexts will put back, outermost first: a state_dict() taken inside a
        # context (as the HF Trainer does when it checkpoints at the mean) saves where training rests.
        self._held: list[Optional[Sample]] = []

    @property
    def resting(self) -> Optional[Sample]:
        """The sample the weights hold outside every open context (what a checkpoint must save)."""
        return self._held[0] if self._held else self.sample

    @property
    def in_context(self) -> bool:
        return bool(self._held)

    @torch.no_grad()
    def install(self, sample: Sample) -> None:
        """Weights at the mean → weights at mean + noise. The mean is re-read if the weights were written
        since IVON wrote them, so edits made at rest count."""
        if self.guard.written():
            self.read_means_from_weights()
        for mean, weights, noise in zip(self.means, self.weights, sample.noise):
            torch.add(mean, noise, out=weights.buffer)
            weights.push()
        self.sample = sample
        self.guard.stamp()

    @torch.no_grad()
    def restore_mean(self, check: bool = True) -> None:
        """Weights at a sample → weights at the mean; ``check`` first that nobody wrote into the sample."""
        if self.sample is None:
            return
        if check:
            self.check_unedited()
        self.write_means()
        self.sample = None

    @torch.no_grad()
    def write_means(self) -> None:
        """Weights ← the stored means, and remember that IVON wrote them."""
        self.guard.check_still_views()
        for mean, weights in zip(self.means, self.weights):
            weights.buffer.copy_(mean)
            weights.push()
        self.guard.stamp()

    @torch.no_grad()
    def read_means_from_weights(self) -> None:
        """Means ← the weights, which hold the mean (a user may have written them at rest)."""
        self.guard.check_still_views()
        for mean, weights in zip(self.means, self.weights):
            mean.copy_(weights.pull())

    def reinstall(self, sample: Optional[Sample]) -> None:
        """Return the weights to the mean, then to ``sample`` if one is given (exactly: mean + its noise)."""
        self.restore_mean()
        if sample is not None:
            self.install(sample)

    def check_unedited(self) -> None:
        """Raise if the weights were written since IVON last wrote them (see :class:`WeightGuard`)."""
        self.guard.check_unedited(self._expected)

    @torch.no_grad()
    def sync_mean_from_weights(self) -> None:
        """At rest at the mean the weights are the truth (a user may have written them); holding a sample,
        they must be as IVON left them."""
        if self.sample is not None:
            self.check_unedited()
            return
        self.read_means_from_weights()
        self.guard.stamp()

    @contextmanager
    def returning_to(self, held: Optional[Sample]) -> Iterator[None]:
        """A block after which the weights hold ``held`` again (the mean for ``None``), also after an exception."""
        self._held.append(held)
        try:
            yield
        finally:
            self._held.pop()
            self.reinstall(held)

    def _expected(self) -> list[Tensor]:
        """What IVON last wrote into each weight: the mean, plus the noise of the sample it holds."""
        out = []
        for gi, (params, mean) in enumerate(zip(self.groups, self.means)):
            flat = mean if self.sample is None else mean + self.sample.noise[gi]
            out.extend(split_like(flat, params))
        return out

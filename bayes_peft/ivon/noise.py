"""Where IVON's noise comes from: the training generator (one a device), and a sample's N(0, I) laid out over the
groups, whether they are whole, sharded by FSDP2 (:mod:`bayes_peft.sharding`) or spread over devices
(:mod:`bayes_peft.ivon.devices`). Every layout draws the noise of each whole group as one process on one device
would, and keeps the elements a group holds here.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from .. import distributed, sharding
from .devices import DeviceLayout
from .rules import draw_noise, scale_noise_

__all__ = ["NoiseSource", "training_generator"]


def training_generator(generator: Optional[torch.Generator], device: torch.device) -> torch.Generator:
    """``generator``, or by default one seeded from torch's global generator (under torch.distributed, rank
    0's seed); refused unless it is on ``device``'s kind and the same on every rank."""
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(distributed.shared_seed())
    elif generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device}, the parameters on {device}")
    distributed.check_identical(
        generator.get_state().cpu().numpy().tobytes(),
        "IVON's generator state: every rank must draw the same weight sample while gradients are averaged "
        "across ranks (seed the generator identically on every rank, or pass none)",
    )
    return generator


class NoiseSource:
    """An optimizer's training generators and the layout of its groups' noise.

    ``generator`` (see :func:`training_generator`) draws on ``device``; with a ``layout`` over several devices,
    each other device gets a generator seeded alike: a copy of its state on a device of its kind, its seed on
    another kind (whose state reads otherwise). :meth:`rewind` returns all to their starting state.
    """

    def __init__(self, generator: Optional[torch.Generator], device: torch.device, layout: Optional[DeviceLayout]):
        self.generator = training_generator(generator, device)
        self.layout = layout
        self.generators = {device: self.generator}
        for other in (layout.devices if layout else []):
            if other != device and other not in self.generators:
                self.generators[other] = _seeded_alike(self.generator, other)
        self._start = self.state()
        self.shards: list[Optional[sharding.ShardIndex]] = []

    def bind(self, groups: Sequence[dict]) -> None:
        """Read where each group's elements sit among its sharded parameters' (none when none is sharded)."""
        self.shards = [sharding.shard_index(g["params"]) for g in groups]

    @property
    def sharded(self) -> bool:
        return any(shard is not None for shard in self.shards)

    def draw(self, groups: Sequence[dict], work: Sequence[Tensor], generator: Optional[torch.Generator],
             tau: float = 1.0) -> list[Tensor]:
        """ε·√τ / √(ess·(h + δ)) for every group, ``[numel]`` on its device (``work[i]`` ``[numel]`` is
        overwritten). ``generator``: the training generator (one a device), ``None`` for torch's global
        ones, or another, whose draws are copied to every device (a test-time sample)."""
        if self.layout is None:
            return [draw_noise(group, tau, generator, w, shard) for group, w, shard in zip(groups, work, self.shards)]
        dtype = groups[0]["hess"].dtype
        if generator is self.generator:
            standard = self.layout.draw(self.generators, dtype)
        elif generator is None:
            standard = self.layout.draw(dict.fromkeys(self.layout.devices), dtype)
        else:
            standard = self.layout.draw_from(generator, dtype)
        return [scale_noise_(group, eps, tau, w) for group, eps, w in zip(groups, standard, work)]

    def state(self) -> dict[str, Tensor]:
        """Every generator's state, by device name."""
        return {str(device): g.get_state() for device, g in self.generators.items()}

    def load_state(self, states: Mapping[str, Tensor]) -> None:
        """Set every generator's state from :meth:`state`; ValueError if one of its devices is missing."""
        missing = [d for d in self.generators if str(d) not in states]
        if missing:
            raise ValueError(f"the state has no generator for {', '.join(map(str, missing))}: it was saved on other "
                             "devices")
        for device, g in self.generators.items():
            g.set_state(states[str(device)].cpu())

    def rewind(self) -> None:
        """Every generator back to its state when this source was made (to draw the first sample again)."""
        self.load_state(self._start)


def _seeded_alike(generator: torch.Generator, device: torch.device) -> torch.Generator:
    other = torch.Generator(device=device)
    if device.type == generator.device.type:
        other.set_state(generator.get_state())
    else:
        other.manual_seed(generator.initial_seed())
    return other

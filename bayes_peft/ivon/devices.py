"""Parameters on several devices (``device_map``, CPU offload): IVON's flat buffers, one a device.

IVON keeps a group's state in flat buffers (:mod:`bayes_peft.ivon.flat`), and a buffer lives on one device.
accelerate's ``device_map="auto"`` puts a model's first layers on ``cuda:0``, the next on ``cuda:1``, the rest
on the CPU, and a LoRA weight lives where its layer does. :func:`split_by_device` cuts each parameter group
that spans devices, in order, into one group per run of consecutive parameters on one device (torch's
learning-rate schedulers then see those groups, each with the options of the group it came from), and
:class:`DeviceLayout` remembers where each group's elements sit in the group the user gave: its *segment*.

**Noise.** Each device draws its own, from its own generator, seeded as the optimizer's: for every group the
user gave, the whole group's noise, of which it keeps its segments' elements. Devices of one kind then draw
what one device would (CUDA's Philox streams depend on the seed and the offset only, on cards of one model;
the CPU's on the seed), so a model spread over several GPUs trains as it would on one. A CPU-offloaded
segment's noise comes from the CPU's stream, another draw of the same distribution. No device waits for
another to draw, and the extra draws are of LoRA's size.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["Segment", "DeviceLayout", "split_by_device"]


class Segment(NamedTuple):
    """Where one device's group sits in the group the user gave: that group's index, its whole ``numel``, and
    the first and the number of elements this group holds in its flat concatenation."""

    group: int
    group_numel: int
    start: int
    numel: int
    device: torch.device


def split_by_device(groups: Sequence[dict]) -> tuple[list[dict], Optional["DeviceLayout"]]:
    """``groups`` (dicts with ``"params"``) as IVON keeps them: each one whose parameters lie on several devices
    split into one group per run of consecutive parameters on one device, with the same options. Returns the
    groups and their :class:`DeviceLayout`, or ``groups`` unchanged and ``None`` when all lie on one device."""
    devices = {p.device for g in groups for p in g["params"]}
    if len(devices) <= 1:
        return list(groups), None
    out, segments = [], []
    for gi, group in enumerate(groups):
        params = list(group["params"])
        whole = sum(p.numel() for p in params)
        start = 0
        runs: list[list[Tensor]] = []
        for p in params:
            if runs and runs[-1][-1].device == p.device:
                runs[-1].append(p)
            else:
                runs.append([p])
        for run in runs:
            numel = sum(p.numel() for p in run)
            out.append({**group, "params": run})
            segments.append(Segment(gi, whole, start, numel, run[0].device))
            start += numel
    return out, DeviceLayout(segments)


class DeviceLayout:
    """Where the groups IVON keeps sit on their devices and in the groups the user gave (:class:`Segment`, one
    per kept group, in order)."""

    def __init__(self, segments: Sequence[Segment]):
        self.segments = list(segments)
        self.devices = list(dict.fromkeys(s.device for s in self.segments))  # in order of first appearance
        self._wholes = list(dict.fromkeys((s.group, s.group_numel) for s in self.segments))

    def draw(self, generators: Mapping[torch.device, Optional[torch.Generator]], dtype: torch.dtype) -> list[Tensor]:
        """ε ~ N(0, I) for every kept group, ``[numel]`` on its device: each device draws every user group's
        whole noise from ``generators[device]`` (``None``: the device's global generator) and keeps its segments'
        elements (views of that draw)."""
        noise: list[Optional[Tensor]] = [None] * len(self.segments)
        for device in self.devices:
            for group, numel in self._wholes:
                whole = torch.randn(numel, device=device, dtype=dtype, generator=generators[device])
                for i, s in enumerate(self.segments):
                    if s.group == group and s.device == device:
                        noise[i] = whole[s.start:s.start + s.numel]
        return noise

    def draw_from(self, generator: torch.Generator, dtype: torch.dtype) -> list[Tensor]:
        """ε for every kept group from one ``generator``, drawn on its device and copied to each group's (for a
        test-time sample: the same draw whatever the layout)."""
        wholes = {group: torch.randn(numel, device=generator.device, dtype=dtype, generator=generator)
                  for group, numel in self._wholes}
        return [wholes[s.group][s.start:s.start + s.numel].to(s.device) for s in self.segments]


"""IVON's checkpoint beyond torch's optimizer state: what an exact resume needs.

ivon-opt's ``state_dict`` misses the step counter, so a resume is not exact. :class:`bayes_peft.IVON`
adds one entry, under :data:`STATE_KEY`: the step counter, the noise generator, the usage style, the mean,
the sample the weights rest at, the NaN bookkeeping and any gradient samples of an unfinished step.
Loading it puts the weights back exactly where they were when it was saved.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .gradients import GradientSamples
from .rules import Sample

__all__ = ["STATE_KEY", "resume_state", "check", "restore"]

STATE_KEY = "bayes_peft"


def resume_state(opt) -> dict:
    """The :data:`STATE_KEY` entry of ``opt.state_dict()`` (copies of ``opt``'s tensors)."""
    resting, samples = opt._weights.resting, opt._samples
    return {
        "current_step": opt.current_step,
        "generators": opt._noise.state(),  # by device
        "autosample": opt._autosample,
        "mean": [m.clone() for m in opt._weights.means],
        "noise": None if resting is None else [n.clone() for n in resting.noise],
        "noise_train": None if resting is None else resting.train,
        "skipped_steps": opt._skipped.state(),
        "gradient_samples": None if samples is None or samples.empty else {
            "grad": [t.clone() for t in samples.grad],
            "curvature": [t.clone() for t in samples.curvature],
            "n": samples.n,
            "count": None if samples.count is None else [t.clone() for t in samples.count],
        },
    }


def check(extra: Optional[dict], state_dict: dict, param_groups: list[dict]) -> dict:
    """``extra`` if it is a bayes_peft.IVON entry for groups shaped like ``param_groups``; else ValueError."""
    if extra is None:
        raise ValueError(f"not a bayes_peft.IVON state dict (no '{STATE_KEY}' entry)")
    saved_numel = [g.get("numel") for g in state_dict["param_groups"]]
    if saved_numel != [g["numel"] for g in param_groups]:
        raise ValueError(
            f"state dict has groups of {saved_numel} elements, this optimizer {[g['numel'] for g in param_groups]}"
        )
    return extra


@torch.no_grad()
def restore(opt, extra: dict) -> None:
    """Put :func:`resume_state`'s entry back into ``opt``, after torch's part of the state is loaded."""
    devices = [opt.group_device(g) for g in opt.param_groups]
    as_buffers = lambda ts: [t.to(device=d, dtype=opt._dtype).clone() for t, d in zip(ts, devices)]  # noqa: E731
    for group, device in zip(opt.param_groups, devices):
        group["momentum"], group["hess"] = (t.to(device=device, dtype=opt._dtype).clone()
                                            for t in (group["momentum"], group["hess"]))
    opt.current_step = int(extra["current_step"])
    if "generators" in extra:
        opt._noise.load_state(extra["generators"])
    else:  # saved before IVON took several devices: its one generator
        opt.generator.set_state(extra["generator"].cpu())
    opt._autosample = bool(extra["autosample"])
    for mean, saved in zip(opt._weights.means, extra["mean"]):
        mean.copy_(saved)
    opt._weights.write_means()
    opt._skipped.load_state(extra.get("skipped_steps", (0, 0)))
    opt._samples = None if extra["gradient_samples"] is None else \
        _gradient_samples(extra["gradient_samples"], as_buffers)
    if extra["noise"] is not None:
        opt._weights.reinstall(Sample(as_buffers(extra["noise"]), bool(extra["noise_train"])))


def _gradient_samples(saved: dict, as_buffers: Callable[[list[Tensor]], list[Tensor]]) -> GradientSamples:
    count = None if saved.get("count") is None else as_buffers(saved["count"])
    # State dicts before "n" kept per-element counts only: the most any element was seen.
    n = saved["n"] if "n" in saved else int(max(int(c.max()) for c in count if c.numel()))
    return GradientSamples(grad=as_buffers(saved["grad"]), curvature=as_buffers(saved["curvature"]), n=n, count=count)

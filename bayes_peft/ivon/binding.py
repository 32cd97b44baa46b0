"""What IVON trains: the parameters it accepts, and following them when they are replaced before the first step.

accelerate's FSDP2 preparation (which the HF Trainer uses) needs the optimizer before it shards the model, and
then replaces each parameter in the optimizer's groups by its sharded DTensor (on one process it may
re-materialise the same parameters instead). Before the first step nothing is lost: :func:`start_again` cuts
the mean to the new slices, makes the buffers anew and draws the first sample again from the generator's
starting state, so the run is the one an optimizer built on those parameters makes. After it, a replacement is
refused: the state would belong to other weights.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from .. import sharding
from .flat import split_like

__all__ = ["SUPPORTED_DTYPES", "trainable_float_params", "replaced",
           "start_again"]

SUPPORTED_DTYPES = (torch.float32, torch.float64)


def trainable_float_params(params: Iterable) -> list:
    """The trainable parameters, in the caller's parameter groups (schedulers index them); refuses none at
    all, low precision, and the meta device."""
    params = list(params)
    if params and isinstance(params[0], dict):
        params = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
        flat = [p for g in params for p in g["params"]]
    else:
        params = flat = [p for p in params if p.requires_grad]
    if not flat:
        raise ValueError("IVON got no trainable parameters (all have requires_grad=False, or none were given)")
    if any(p.is_meta for p in flat):
        raise ValueError("IVON got parameters on the meta device (accelerate's offload streams such weights in at "
                         "each forward): it trains weights that live on a device; keep the LoRA layers on a GPU or "
                         "the CPU in the device_map")
    bad = sorted({str(p.dtype) for p in flat if p.dtype not in SUPPORTED_DTYPES})
    if bad:
        raise ValueError(
            f"IVON needs float32 or float64 parameters, got {', '.join(bad)}: in low precision "
            "beta2 = 1 - 1e-5 rounds to 1 and the Hessian never moves. Keep the LoRA weights in float32 "
            "(peft does so by default, autocast_adapter_dtype=True) and run the base in bf16 if you wish."
        )
    return params


def replaced(opt) -> bool:
    """Whether ``opt``'s groups hold other parameters than it was built on, or its weights new storage."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return [id(p) for p in params] != opt._bound or opt._weights.guard.moved()


@torch.no_grad()
def start_again(opt) -> None:
    """Rebuild ``opt`` on the parameters now in its groups (see the module docstring); RuntimeError after the
    first step or for parameters of other shapes."""
    if opt.current_step or (opt._samples is not None and not opt._samples.empty):
        raise RuntimeError("IVON's parameters were replaced or moved after it had started training (a model "
                           "sharded or moved after the first step); build the optimizer on the parameters it "
                           "will train")
    params = [p for g in opt.param_groups for p in g["params"]]
    means = [m for mean, local in zip(opt._weights.means, opt._weights.groups) for m in split_like(mean, local)]
    if [m.shape for m in means] != [p.shape for p in params]:
        raise RuntimeError("IVON's parameters were replaced by parameters of other shapes")
    for p, mean in zip(params, means):
        sharding.local(p).copy_(sharding.local_slice(p, mean))
    opt._numel, opt._device, opt._dtype = opt._get_param_configs()
    opt._init_buffers()
    opt._noise.rewind()
    opt._bind()

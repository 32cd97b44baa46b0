"""How :class:`bayes_peft.IVON` chooses ess, hess_init and the Hessian schedule when the user leaves them out.

Given by hand, ess and hess_init keep ivon-opt's meaning and rule (``hess_schedule="ema"``): the variance is
1/(ess·(h + δ)) with h a slow EMA that barely leaves ``hess_init``. Left out, with ``n_data`` given, the
posterior is the one the data and the prior define:

* ``ess = n_data``. IVON's objective is then the ELBO of N examples under the prior N(0, 1/(ess·δ)): the
  posterior precision is N·E_q[∇²ℓ̄] + N·δ, with ℓ̄ the mean loss of an example and N·δ the prior's precision
  (``weight_decay`` = δ, ivon-opt's meaning).
* ``hess_schedule="averaged"`` (:func:`bayes_peft.ivon.rules.hess_rate`): h averages IVON's own curvature
  estimate over the run instead of staying near h₀.
* ``weight_decay`` left out: the prior is the initialisation's scale, N(0, v₀) with v₀ the mean square of
  the trainable weights at construction, over the tensors that are not all zero (LoRA: ``lora_A``'s kaiming
  init, variance 1/(3·fan_in); the zero-initialised ``lora_B`` shares it). A LoRA's A *is* a draw from that
  distribution, so the prior says no more than the initialisation already did; its precision 1/v₀ is
  ess·δ, so δ = 1/(n_data·v₀). Without a prior, directions the data do not inform would get a variance
  limited by nothing but the noise of their curvature estimate.
* ``hess_init`` only sets the first step's noise, as h is replaced by the first estimate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..config import IVON_RECIPE
from .rules import HESS_SCHEDULES

__all__ = ["IVONSettings", "resolve_settings", "init_variance", "AUTO_HESS_INIT"]

AUTO_HESS_INIT = 1.0  # the first step's h under the automatic rule (then replaced by the first estimate)


@dataclass(frozen=True)
class IVONSettings:
    """What one IVON run uses, and how it came to: ``automatic`` when ess and hess_init were left out."""

    ess: float
    hess_init: float
    weight_decay: float
    hess_schedule: str
    n_data: Optional[int]
    automatic: bool
    prior: str  # where weight_decay came from: "given", or "init" (the initialisation's scale)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def init_variance(params: Sequence[Tensor]) -> float:
    """v₀: the mean square of ``params`` over the tensors that are not all zero (a zero-initialised tensor, such
    as LoRA's B, carries no scale); ValueError if every one is zero."""
    scaled = [p for p in params if bool(p.detach().ne(0).any())]
    if not scaled:
        raise ValueError("IVON's automatic prior takes its scale from the weights' initialisation, and every "
                         "trainable weight is zero: pass weight_decay (δ, the prior precision per example)")
    return sum(float(p.detach().double().square().sum()) for p in scaled) / sum(p.numel() for p in scaled)


def resolve_settings(params: Sequence[Tensor], n_data: Optional[int] = None, ess: Optional[float] = None,
                     hess_init: Optional[float] = None, weight_decay: Optional[float] = None,
                     hess_schedule: Optional[str] = None) -> IVONSettings:
    """The settings of a run over ``params`` from what the user gave (``None``: not given).

    Neither ess nor hess_init: the automatic rule (needs ``n_data``), with the prior of the initialisation's
    scale unless ``weight_decay`` is given. Either given: ivon-opt's rule with ess (or ``n_data``), hess_init
    (or the IVON-LoRA recipe's, :data:`~bayes_peft.config.IVON_RECIPE`) and weight_decay (or 0), exactly.
    ``hess_schedule`` overrides the schedule either way.
    """
    if n_data is not None and (isinstance(n_data, bool) or int(n_data) != n_data or n_data < 1):
        raise ValueError(f"n_data must be the number of training examples (a positive integer), got {n_data!r}")
    if hess_schedule is not None and hess_schedule not in HESS_SCHEDULES:
        raise ValueError(f"hess_schedule must be one of {HESS_SCHEDULES}, got {hess_schedule!r}")
    for name, value in (("ess", ess), ("hess_init", hess_init)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if weight_decay is not None and not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    prior = "given" if weight_decay is not None else "init"
    if ess is None and hess_init is None:
        if n_data is None:
            raise ValueError("IVON needs n_data (the number of training examples), from which it sets ess and "
                             "learns the Hessian; or ess (and hess_init) by hand, as in ivon-opt")
        if weight_decay is None:
            weight_decay = 1.0 / (n_data * init_variance(params))
        return IVONSettings(ess=float(n_data), hess_init=AUTO_HESS_INIT, weight_decay=float(weight_decay),
                            hess_schedule=hess_schedule or "averaged", n_data=int(n_data), automatic=True, prior=prior)
    if ess is None and n_data is None:
        raise ValueError("IVON needs ess (the effective sample size) when hess_init is given; or n_data alone "
                         "for the automatic rule")
    return IVONSettings(ess=float(ess if ess is not None else n_data),
                        hess_init=float(hess_init if hess_init is not None else IVON_RECIPE.hess_init),
                        weight_decay=float(weight_decay or 0.0), hess_schedule=hess_schedule or "ema",
                        n_data=None if n_data is None else int(n_data), automatic=False,
                        prior="given" if weight_decay is not None else "none")

"""How :class:`bayes_peft.IVON` chooses ess, hess_init and the Hessian schedule when the user leaves them out.

Given by hand, ess and hess_init keep ivon-opt's meaning and rule (``hess_schedule="ema"``): the variance is
1/(ess·(h + δ)) with h a slow EMA that barely leaves ``hess_init``. Left out, IVON chooses one of two rules.

**A prior given** (``weight_decay`` = δ, with ``n_data``): the posterior that prior and N examples define.

* ``ess = n_data``: IVON's objective is the ELBO of N examples under the prior N(0, 1/(ess·δ)), the
  posterior precision N·E_q[∇²ℓ̄] + N·δ, with ℓ̄ the mean loss of an example.
* ``hess_schedule="averaged"`` (:func:`bayes_peft.ivon.rules.hess_rate`): h averages IVON's own curvature
  estimate over the run instead of staying near h₀, which only sets the first step's noise.

Checked against closed-form and numerically optimised mean-field posteriors (``tests/test_ivon_learned.py``).

**No prior given** (a LoRA, the usual call ``bp.IVON(params, lr=0.03)``): the variance of the
initialisation, σ = √v₀ for every weight, with v₀ the mean square of the trainable weights at construction
over the tensors that are not all zero (LoRA: ``lora_A``'s kaiming init, variance 1/(3·fan_in)).

* ``hess_init`` = the IVON-LoRA recipe's h₀ (3e-4): the scale of the mean's preconditioner h + δ, for which
  its learning rate 0.03 and clip radius 1e-3 were tuned;
* ``ess = 1/(h₀·v₀)``, so that the variance at rest, 1/(ess·h₀), is v₀; ``weight_decay`` 0 and
  ivon-opt's ``"ema"`` schedule, h staying near h₀.

Why not the rule above. Measured on the overfit preset (SmolLM2-135M, 96 SST-2 examples; ``benchmarks/ivon_auto.py``,
RESULTS.md): the exact per-example Fisher diagonal of the LoRA weights has median 1.6e-7 (A) and 2.6e-6
(B), 2e-3 at most, so at ess = N the data's precision N·F is below 10⁻⁴ of the initialisation's
1/v₀ ≈ 1,700 for every weight (10⁻⁷ for the median one). That
posterior *is* the prior: its mean pulled back to zero (``lora_A`` decays, ``lora_B`` stays near 0) and
the fine-tuning undone (accuracy 0.805 against 0.886). Fitting the data needs a likelihood tempered by
~10⁵, which is what the paper's ess = 1e7 is; at such a temperature, the variance a weight the data leave
alone should keep is the prior's, and the initialisation's scale is the only one the model defines. For
SmolLM2-135M this gives ess = 5.8e6 (the paper: 1e7, a grid on validation 1e6–1e7); for Llama-2-7B's
q/v projections 4.1e7 (the paper's per-task values 1e6–1e8). At that temperature the data outweigh the
prior (ess·F > 1/v₀) for 4% of the B weights and 0.15% of the A weights, and IVON's curvature estimate cannot
find which within a fine-tuning run: its noise per weight and step is about |g − m|/σ, estimated from the same
Fisher (minibatches of 8, σ = 0.024) as 0.7 for the best-informed B weights (F = 2e-3) and 0.02 for the median
one (F = 2.6e-6), still 17× and 500× their curvature after averaging 360 steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..config import IVON_RECIPE
from .. import sharding
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
    prior: str  # where the variance's scale came from: "given" (weight_decay), "init" (v₀) or "none" (hand-set)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def init_variance(params: Sequence[Tensor]) -> float:
    """v₀: the mean square of ``params`` over the tensors that are not all zero (a zero-initialised tensor, such
    as LoRA's B, carries no scale); ValueError if every one is zero."""
    whole = [sharding.full(p).detach() for p in params]  # under FSDP2, every rank must see every weight
    scaled = [p for p in whole if bool(p.ne(0).any())]
    if not scaled:
        raise ValueError("IVON's automatic variance takes its scale from the weights' initialisation, and every "
                         "trainable weight is zero: pass weight_decay (δ, the prior precision per example) with "
                         "n_data, or ess and hess_init")
    return sum(float(p.double().square().sum()) for p in scaled) / sum(p.numel() for p in scaled)


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
    if ess is None and hess_init is None:
        if weight_decay is not None:
            if n_data is None:
                raise ValueError("IVON's posterior under a given prior (weight_decay) needs n_data, the number "
                                 "of training examples, as its ess")
            return IVONSettings(ess=float(n_data), hess_init=AUTO_HESS_INIT, weight_decay=float(weight_decay),
                                hess_schedule=hess_schedule or "averaged", n_data=int(n_data), automatic=True,
                                prior="given")
        h0 = IVON_RECIPE.hess_init
        return IVONSettings(ess=1.0 / (h0 * init_variance(params)), hess_init=h0, weight_decay=0.0,
                            hess_schedule=hess_schedule or "ema", n_data=None if n_data is None else int(n_data),
                            automatic=True, prior="init")
    if ess is None and n_data is None:
        raise ValueError("IVON needs ess (the effective sample size) when hess_init is given; or n_data alone "
                         "for the automatic rule")
    return IVONSettings(ess=float(ess if ess is not None else n_data),
                        hess_init=float(hess_init if hess_init is not None else IVON_RECIPE.hess_init),
                        weight_decay=float(weight_decay or 0.0), hess_schedule=hess_schedule or "ema",
                        n_data=None if n_data is None else int(n_data), automatic=False,
                        prior="given" if weight_decay is not None else "none")

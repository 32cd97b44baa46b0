"""IVON's update rules as pure functions over one parameter group's flat buffers. :mod:`bayes_peft.ivon.optimizer`
keeps the bookkeeping (the usage styles), with :mod:`bayes_peft.ivon.gradients` (a step's gradient samples),
:mod:`bayes_peft.ivon.weights` (samples in the weights), :mod:`bayes_peft.ivon.nonfinite` (the NaN policy)
and :mod:`bayes_peft.ivon.state` (persistence).

The formulas are those of Shen et al. (ICML 2024, Algorithm 1) as ivon-opt implements them, written here
with in-place ops into preallocated buffers: on a CPU a step is bound by passes over memory, and each
avoided temporary is one pass fewer. ``tests/test_ivon.py`` checks them against ivon-opt itself. A step
with a NaN/inf gradient is skipped on the device (``torch.where``), without a host read.

    m ← β₁ m + (1 − β₁) ĝ
    f = ess · (h + δ) · mean(n ⊙ g)     ('price', n the sample's noise θ − μ; 'gradsq': f = ess · mean(g²))
    h ← β₂ h + (1 − β₂) f + ½ (1 − β₂)² (h − f)² / (h + δ)
    μ ← μ − lr · clip((m / (1 − β₁ᵗ) + δ μ) / (h + δ), ± clip_radius)

That is ivon-opt's rule, ``hess_schedule="ema"``. With β₂ = 1 − 1e-5, h after t steps still holds β₂ᵗ of h₀
(0.997 after 360 steps, 0.905 after 10,000): the posterior variance 1/(ess·(h + δ)) is set by ``hess_init``,
not learned. ``hess_schedule="averaged"`` makes h an estimate of the curvature within the run:

* **An average over the run, not an EMA started at h₀.** f is an unbiased estimate of E_q[diag ∇²ℓ] (Stein's
  lemma: E[n ⊙ g] = Σ E[∇²ℓ] for n ~ N(0, Σ) diagonal), but a noisy one, of relative spread ~2 per step.
  Step t weighs it by the rate r_t = max((η + 1)/(t + η), 1 − β₂): the polynomial-decay average of Shamir
  & Zhang (2013), whose weights grow as t^η. With η = 2 the early steps, taken while the mean was far from
  its optimum and the noise at the wrong scale, fade (the first half of a run holds 1/8 of the weight),
  while the average still counts ~5/9 of the steps; a uniform mean (η = 0) keeps them for good. Once
  r_t reaches 1 − β₂ the rule is ivon-opt's EMA. r_1 = 1: h₀ sets the first sample only.
* **A control variate.** f multiplies the noise by g − m, m the momentum (fixed before the noise was
  drawn): still unbiased, without the noise the full-data gradient adds
  (:func:`bayes_peft.ivon.gradients.curvature_`).
* **The positivity term on the way down only.** ½ r² (h − f)² / (h + δ) keeps h + δ positive when f < h
  (h + δ at least halves). For f > h no positivity is at stake, and with r ≈ 1 the symmetric term would
  add (f − h)²/(2h): after an h₀ below the curvature, a blow-up the average never forgets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..sharding import ShardIndex

__all__ = ["HESS_SCHEDULES", "AVERAGING_POWER", "averages_hess", "Sample", "draw_noise", "scale_noise_", "all_finite",
           "to_device", "scratch_buffers", "hess_rate", "update_group_"]

HESS_SCHEDULES = ("ema", "averaged")  # ivon-opt's fixed β₂, or the curvature averaged over the run
AVERAGING_POWER = 2  # η of the "averaged" schedule: step t weighs ∝ t^η


@dataclass
class Sample:
    """Noise currently added to the weights, one flat tensor per parameter group."""

    noise: list[Tensor]  # [numel_g] per group
    train: bool  # a training sample: its gradient feeds the next update


def draw_noise(group: dict, tau: float, generator: Optional[torch.Generator], work: Tensor,
               shard: Optional[ShardIndex] = None) -> Tensor:
    """``[numel]``: ε·√τ / √(ess·(h + δ)) with ε ~ N(0, I) from ``generator`` (None: torch's global one);
    ``work`` ``[numel]`` is overwritten. With a ``shard``, ε is drawn for the whole group and this rank's
    elements are kept: the same noise as a single process's."""
    hess = group["hess"]
    noise = torch.randn(group["numel"] if shard is None else shard.numel, device=hess.device, dtype=hess.dtype,
                        generator=generator)
    if shard is not None:
        noise = noise.index_select(0, shard.index)
    return scale_noise_(group, noise, tau, work)


def scale_noise_(group: dict, noise: Tensor, tau: float, work: Tensor) -> Tensor:
    """``noise`` ``[numel]`` (ε ~ N(0, I)) ← ε·√τ / √(ess·(h + δ)), in place; ``work`` ``[numel]`` is overwritten."""
    hess = group["hess"]
    if group["weight_decay"] == 0:
        torch.mul(hess, group["ess"], out=work)
    else:
        torch.add(hess, group["weight_decay"], out=work).mul_(group["ess"])
    noise.div_(work.sqrt_())
    return noise if tau == 1.0 else noise.mul_(math.sqrt(tau))


def all_finite(tensors: list[Tensor]) -> Tensor:
    """A 0-dim bool tensor on the first tensor's device: are all elements finite? (No host read, unless a
    tensor lies on another device: a CPU-offloaded one's verdict then waits for the CPU.)

    One reduction per tensor: a NaN or inf anywhere makes the sum NaN or inf. A sum of finite values beyond
    the dtype's range (|Σ| > 3e38 in float32) reads as non-finite too; such a gradient would wreck the
    Hessian estimate anyway.
    """
    device = tensors[0].device
    return torch.isfinite(torch.stack([to_device(t.sum(), device) for t in tensors])).all()


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor`` on ``device``: itself if it is there; to a GPU without waiting for it; to the CPU, which reads
    it at once, after the copy."""
    return tensor.to(device, non_blocking=device.type != "cpu")


def scratch_buffers(numel: int, device, dtype) -> list[Tensor]:
    """The three ``[numel]`` buffers :func:`update_group_` works in."""
    return [torch.empty(numel, device=device, dtype=dtype) for _ in range(3)]


def averages_hess(group: dict) -> bool:
    """Does the group follow the "averaged" Hessian schedule (a group saved before schedules existed: "ema")?"""
    return group.get("hess_schedule", "ema") == "averaged"


def hess_rate(group: dict, step: int) -> float:
    """1 − β₂ of ``step`` (1-based): the group's β₂ for ``"ema"``; for ``"averaged"`` the polynomial-decay
    rate (η + 1)/(t + η) until it falls to 1 − β₂. A host number: no device read."""
    floor = 1.0 - group["beta2"]
    if not averages_hess(group):
        return floor
    return max((AVERAGING_POWER + 1.0) / (step + AVERAGING_POWER), floor)


@torch.no_grad()
def update_group_(group: dict, mean: Tensor, avg_grad: Tensor, avg_curv: Tensor, keep: Tensor, step: int,
                  hess_approx: str, debias: bool, rescale_lr: bool, scratch: list[Tensor]) -> None:
    """One IVON step of a group, in place: ``mean``, ``group["momentum"]`` and ``group["hess"]`` (each
    ``[numel]``) take their new values where ``keep`` (0-dim or ``[numel]``, bool) is true and keep the old
    ones elsewhere. ``avg_curv`` is the mean of ε·g ('price') or of g² ('gradsq'); ``scratch`` comes from
    :func:`scratch_buffers` (its contents are overwritten)."""
    beta1, wd, ess = group["beta1"], group["weight_decay"], group["ess"]
    rate = hess_rate(group, step)
    momentum, hess = group["momentum"], group["hess"]
    new_momentum, new_hess, work = scratch
    torch.lerp(momentum, avg_grad, 1.0 - beta1, out=new_momentum)  # β₁ m + (1 − β₁) ĝ

    # With f = ess·c and c = mean(n ⊙ g)·(h + δ) or mean(g²), t = h − f and r = 1 − β₂:
    # h_new = β₂ h + r f + ½ r² t² / (h + δ) = h − r t + ½ r² t² / (h + δ); "averaged" keeps t² where t > 0.
    hess_wd = hess if wd == 0 else hess + wd
    curvature = torch.mul(avg_curv, hess_wd, out=work) if hess_approx == "price" else avg_curv
    t = torch.add(hess, curvature, alpha=-ess, out=work)
    torch.add(hess, t, alpha=-rate, out=new_hess)
    if averages_hess(group):
        t.clamp_(min=0.0)
    new_hess.addcdiv_(t.square_(), hess_wd, value=0.5 * rate ** 2)

    # μ − lr·clip((m/b + δμ) / (h + δ), ±r), b = 1 − β₁ᵗ; without δ, b moves into the clip bounds and the step:
    # clip(m/(b h), ±r) = clip(m/h, ±r·b) / b.
    bias = 1.0 - math.pow(beta1, float(step)) if debias else 1.0
    lr = group["lr"] * (group["hess_init"] + wd) if rescale_lr else group["lr"]
    radius = group["clip_radius"]
    update = work  # t is spent
    if wd == 0:
        torch.div(new_momentum, new_hess, out=update).clamp_(-radius * bias, radius * bias)
        torch.add(mean, update, alpha=-lr / bias, out=update)
    else:
        torch.div(new_momentum, bias, out=update).add_(mean, alpha=wd).div_(new_hess + wd).clamp_(-radius, radius)
        torch.add(mean, update, alpha=-lr, out=update)
    torch.where(keep, update, mean, out=mean)  # NaN·0 is NaN: only a selection drops a skipped step
    torch.where(keep, new_momentum, momentum, out=momentum)
    torch.where(keep, new_hess, hess, out=hess)

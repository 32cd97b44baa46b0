"""From a Gaussian over the choice logits to predictive probabilities: E[softmax(f)] for f ~ N(μ, Σ).

The linearized predictive gives each example a mean ``[C]`` and a full covariance ``[C, C]`` of its choice
logits. The Jacobians of the choice logits of a fine-tuned LLM are strongly correlated (0.9 and more),
so most of Var f_c is a shift common to every logit, which changes no probability. Every link here
first removes that shift: it works with the centred logits f − mean(f)·1, whose distribution is
N(Pμ, PΣP) with P = I − 11ᵀ/C, so adding any common random vector to the logits changes nothing. (The
per-logit probit softmax(μ / sqrt(1 + π/8·diag Σ)) is not invariant in that way: it shrinks the logits by
the common variance and can flip the argmax.)

Links (``link=``):

* ``"auto"`` (default): ``"quadrature"`` for two choices, ``"mc"`` for more.
* ``"quadrature"``: two choices only. p₁ = E[σ(f₁ − f₀)] by Gauss–Hermite quadrature on the one logit
  difference: within 1e-5 of a dense integral at every width (tests/test_link.py), deterministic, and the argmax is
  always the mean's, since σ(d) − ½ is odd.
* ``"mc"``: any number of choices. The mean of softmax over ``n_samples`` draws of the logits, seeded by
  ``generator``; its error is about 0.5/√n_samples per probability.
* ``"probit"``: two choices only. MacKay's σ(μ_d / sqrt(1 + π/8·σ_d²)) on the difference d = f₁ − f₀;
  within 0.02 of the quadrature (tests/test_link.py), for comparison with the literature.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal, Optional

import torch
from torch import Tensor

__all__ = ["Link", "LINKS", "link_probs", "quadrature_probs", "mc_logit_probs", "mc_logit_samples",
           "probit_probs", "centred"]

Link = Literal["auto", "quadrature", "mc", "probit"]
LINKS = ("auto", "quadrature", "mc", "probit")
QUADRATURE_POINTS = 96


def centred(mean: Tensor, cov: Tensor) -> tuple[Tensor, Tensor]:
    """``(Pμ, PΣP)`` with P = I − 11ᵀ/C: the moments of f − mean(f)·1, for ``[B, C]`` and ``[B, C, C]``."""
    mean = mean - mean.mean(-1, keepdim=True)
    cov = cov - cov.mean(-1, keepdim=True)
    return mean, cov - cov.mean(-2, keepdim=True)


def _difference_moments(mean: Tensor, cov: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance ``[B]`` of d = f₁ − f₀."""
    if mean.shape[-1] != 2:
        raise ValueError(f"this link needs two choices, got {mean.shape[-1]}; use link='mc'")
    variance = cov[..., 1, 1] + cov[..., 0, 0] - cov[..., 0, 1] - cov[..., 1, 0]
    return mean[..., 1] - mean[..., 0], variance.clamp_min(0)


def _two_class(p1: Tensor) -> Tensor:
    return torch.stack([1 - p1, p1], dim=-1)


@lru_cache(maxsize=4)
def _rules(n_points: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gauss–Hermite nodes and weights for E over N(0, 1), and Gauss–Legendre ones on (0, 1)."""
    import numpy as np

    hermite_x, hermite_w = np.polynomial.hermite.hermgauss(n_points)
    legendre_x, legendre_w = np.polynomial.legendre.leggauss(n_points)
    return (torch.from_numpy(math.sqrt(2.0) * hermite_x), torch.from_numpy(hermite_w / math.sqrt(math.pi)),
            torch.from_numpy((legendre_x + 1) / 2), torch.from_numpy(legendre_w / 2))


def quadrature_probs(mean: Tensor, cov: Tensor, n_points: int = QUADRATURE_POINTS) -> Tensor:
    """``[B, 2]``: E[softmax(f)] for two choices, p₁ = E[σ(d)] with d = f₁ − f₀ ~ N(μ_d, σ_d²).

    Where σ_d ≤ 1 the integrand σ(μ_d + σ_d z) is smooth in z, and Gauss–Hermite takes the expectation over
    z ~ N(0, 1). A wide Gaussian makes it a step in z instead, so there the same number is written as
    E[σ(d)] = P(d + L > 0) = E_L[Φ((μ_d + L)/σ_d)] with L standard logistic, which is smooth in L, and
    integrated by Gauss–Legendre over u = σ(L) ∈ (0, 1) (L = logit u has the logistic law).
    """
    mu, variance = _difference_moments(mean.double(), cov.double())
    sd = variance.sqrt()
    hermite_x, hermite_w, legendre_u, legendre_w = (t.to(mu.device) for t in _rules(n_points))
    narrow = (torch.sigmoid(mu[..., None] + sd[..., None] * hermite_x) * hermite_w).sum(-1)
    logistic = torch.logit(legendre_u)
    wide_sd = sd.clamp_min(1.0)[..., None]
    wide = (torch.special.ndtr((mu[..., None] + logistic) / wide_sd) * legendre_w).sum(-1)
    return _two_class(torch.where(sd <= 1.0, narrow, wide)).to(mean.dtype)


def probit_probs(mean: Tensor, cov: Tensor) -> Tensor:
    """``[B, 2]``: MacKay's probit approximation σ(μ_d / sqrt(1 + π/8·σ_d²)) on the logit difference."""
    mu, variance = _difference_moments(mean, cov)
    return _two_class(torch.sigmoid(mu / torch.sqrt(1 + math.pi / 8 * variance)))


def mc_logit_samples(mean: Tensor, cov: Tensor, n_samples: int = 1000,
                     generator: Optional[torch.Generator] = None) -> Tensor:
    """``[S, B, C]``: softmax(f) for ``n_samples`` Monte Carlo draws f of the centred logits.

    ``cov`` may be singular (it always is once centred), so its square root comes from an eigendecomposition:
    the symmetric root V diag(√λ) Vᵀ, which does not depend on the signs eigh picks for the eigenvectors, so
    equal covariances always meet equal noise.
    Every example meets the same ``n_samples`` standard-normal draws (common random numbers), so an
    example's probabilities do not depend on the batch or the shard it is scored in. The noise is drawn on
    ``generator``'s device (the CPU by default) and moved, so a seed gives the same draws on every device.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}")
    mean, cov = centred(mean.double(), cov.double())
    evals, evecs = torch.linalg.eigh(cov)
    root = (evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)) @ evecs.transpose(-1, -2)  # root @ rootᵀ = Σ
    device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn((n_samples, mean.shape[-1]), generator=generator, dtype=torch.float64, device=device)
    logits = mean + torch.einsum("bij,sj->sbi", root, noise.to(mean.device))
    return torch.softmax(logits, dim=-1)


def mc_logit_probs(mean: Tensor, cov: Tensor, n_samples: int = 1000,
                   generator: Optional[torch.Generator] = None) -> Tensor:
    """``[B, C]``: E[softmax(f)] by ``n_samples`` Monte Carlo draws of the centred logits, the mean of
    :func:`mc_logit_samples`; its error is about 0.5/√n_samples per probability."""
    return mc_logit_samples(mean, cov, n_samples, generator).mean(0)


def link_probs(mean: Tensor, cov: Tensor, link: Link = "auto", n_samples: int = 1000,
               generator: Optional[torch.Generator] = None) -> Tensor:
    """``[B, C]`` predictive probabilities from logit moments ``[B, C]``, ``[B, C, C]`` by ``link``."""
    if link not in LINKS:
        raise ValueError(f"link must be one of {LINKS}, got {link!r}")
    if link == "auto":
        link = "quadrature" if mean.shape[-1] == 2 else "mc"
    if link == "quadrature":
        probs = quadrature_probs(mean, cov)
    elif link == "probit":
        probs = probit_probs(mean, cov)
    else:
        probs = mc_logit_probs(mean, cov, n_samples, generator).to(mean.dtype)
    # Without variance the predictive is the softmax itself, exactly: τ = 0 reproduces the mean's predictions.
    no_variance = (cov == 0).flatten(-2).all(-1)
    return torch.where(no_variance[..., None], torch.softmax(mean, -1), probs)

"""What a Laplace-LoRA fit sees and where its predictive variance comes from: the numbers that
``benchmarks/laplace_rank.py`` prints, for any fitted posterior.

- :func:`spread`: one number per example from its choice-logit covariance;
- :func:`logit_difference_variance` and :func:`variance_by_layer_kind`: its mean over a loader, whole or
  split into what the ``lora_A`` and the ``lora_B`` layers contribute;
- :func:`jacobian_share_in_span`: how much of the logit Jacobian the low-rank curvature covers (outside
  its span the posterior is the prior);
- :func:`effective_parameters` and :func:`fitting_data_summary`: what the evidence sees.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import Tensor

from ..data.tasks import choice_logits
from ..posteriors.linearize import choice_logit_grads
from .posterior import KFACPosterior
from .prior import layer_kind

__all__ = ["spread", "logit_difference_variance", "variance_by_layer_kind", "jacobian_share_in_span",
           "effective_parameters", "fitting_data_summary"]

Batches = Iterable[Mapping[str, Tensor]]


def spread(cov: Tensor) -> Tensor:
    """``[B, C, C]`` logit covariances → ``[B]``: Var[f_1 − f_0] for C = 2, the mean of the diagonal otherwise."""
    if cov.shape[-1] == 2:
        return cov[:, 0, 0] + cov[:, 1, 1] - 2 * cov[:, 0, 1]
    return torch.diagonal(cov, dim1=-2, dim2=-1).mean(-1)


def logit_difference_variance(posterior: KFACPosterior, batches: Batches) -> float:
    """The mean over examples of :func:`spread` of the linearized logit covariance."""
    return torch.cat([spread(posterior.logit_moments(batch)[1]) for batch in batches]).mean().item()


def _layer_terms(posterior: KFACPosterior, batches: Batches):
    """``(batch, {layer: (gram, coordinates)})`` at the posterior mean, batch by batch."""
    posterior.model.eval()
    with posterior.mean():
        for batch in batches:
            _, grads = choice_logit_grads(posterior.model, batch)
            yield batch, {name: posterior.layer_terms(name, g.per_example()) for name, g in grads.items()}


def variance_by_layer_kind(posterior: KFACPosterior, batches: Batches) -> dict[str, float]:
    """:func:`logit_difference_variance` split into what the lora_A and the lora_B layers contribute (the
    covariance is a sum over layers)."""
    totals, n = {"lora_A": 0.0, "lora_B": 0.0}, 0
    for batch, terms in _layer_terms(posterior, batches):
        for name, (gram, coords) in terms.items():
            totals[layer_kind(name)] += spread(posterior.combine(name, gram, coords)).sum().item()
        n += batch["labels"].numel()
    return {kind: total / n for kind, total in totals.items()}


def jacobian_share_in_span(posterior: KFACPosterior, batches: Batches) -> float:
    """The share of ‖J‖² (per-example logit gradients, all layers) inside the span of the KFAC curvature."""
    inside = total = 0.0
    for _, terms in _layer_terms(posterior, batches):
        for gram, coords in terms.values():
            inside += coords.square().sum().item()
            total += torch.diagonal(gram, dim1=-2, dim2=-1).sum().item()
    return inside / total


def effective_parameters(posterior: KFACPosterior, prior: Mapping[str, float]) -> float:
    """γ = Σ_i e_i / (λ + e_i) over every layer's Fisher eigenvalues: how many directions the data pin down."""
    return sum(float((b.eigenvalues / (prior[n] + b.eigenvalues)).sum()) for n, b in posterior.bases.items())


def fitting_data_summary(posterior: KFACPosterior, batches: Batches) -> dict[str, float]:
    """How certain the model is on its fitting data and what curvature that leaves: the mean NLL, the mean
    max probability, the mean Σ_c p_c(1 − p_c) (every Fisher scales with it), the Fisher's largest and median
    eigenvalue, and ‖θ*‖² by kind of layer."""
    model = posterior.model
    model.eval()
    with torch.no_grad(), posterior.mean():
        probs = torch.cat([torch.softmax(choice_logits(model, batch).double(), -1) for batch in batches])
    eigenvalues = torch.cat([b.eigenvalues.flatten() for b in posterior.bases.values()])
    norms = {kind: 0.0 for kind in ("lora_A", "lora_B")}
    for name, mean in posterior.mean_weights().items():
        norms[layer_kind(name)] += float(mean.double().square().sum())
    return {"nll": -posterior.log_likelihood / posterior.n_examples,
            "max_prob": float(probs.max(-1).values.mean()),
            "p_one_minus_p": float((probs * (1 - probs)).sum(-1).mean()),
            "largest_eigenvalue": float(eigenvalues.max()), "median_eigenvalue": float(eigenvalues.median()),
            "n_eigenvalues": eigenvalues.numel(), "norm2_lora_A": norms["lora_A"], "norm2_lora_B": norms["lora_B"]}

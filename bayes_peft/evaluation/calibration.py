"""Temperature scaling: the post-hoc baseline every Bayesian method should beat (Guo et al., ICML 2017).

One scalar T > 0 divides the logits; it is fitted by minimising the NLL on held-out data with L-BFGS over
log T. Predictive probabilities stand in for logits: log p differs from the logits by a constant per
example, which the softmax ignores, so softmax(log p / T) is the temperature-scaled predictive.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fit_temperature", "temperature_scale"]


def _log_probs(probs: Tensor) -> Tensor:
    return probs.double().clamp_min(torch.finfo(torch.float64).tiny).log()


def temperature_scale(probs: Tensor, temperature: float) -> Tensor:
    """``[N, C]``: softmax(log ``probs`` / T), in the dtype of ``probs``."""
    if not temperature > 0:
        raise ValueError(f"the temperature must be positive, got {temperature}")
    return torch.softmax(_log_probs(probs) / temperature, dim=-1).to(probs.dtype)


def fit_temperature(probs: Tensor, labels: Tensor, max_iter: int = 100) -> float:
    """The T minimising the NLL of softmax(log ``probs`` / T) on (``probs`` ``[N, C]``, ``labels`` ``[N]``)."""
    if probs.ndim != 2 or labels.shape != probs.shape[:1] or probs.shape[0] == 0:
        raise ValueError(f"expected probs [N, C] and labels [N] with N > 0, got {tuple(probs.shape)}, {tuple(labels.shape)}")
    log_probs = _log_probs(probs)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(log_probs / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())

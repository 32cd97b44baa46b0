"""KFAC factors of the Fisher of the choice log-likelihood over LoRA weights, with a low-rank large factor.

KFAC treats every ``lora_A`` and ``lora_B`` Linear as its own layer. For a layer ``z = a Wᵀ`` with input a
and output gradient g, taken **at the classification position** (the last token, as in Laplace-LoRA), the
Fisher of Σ_n −log p(y_n | x_n) over row-major vec(W) is approximated by

    F ≈ G ⊗ A,   G = Σ_n E_y[g gᵀ]  (d_out × d_out),   A = (1/N) Σ_n a aᵀ  (d_in × d_in),

which is the sum over the N examples (a mean-reduced loss would under-count it by the batch size).
One of the two factors is r × r (small) and kept whole; the other is d × d with d the model width and
is kept as L Lᵀ with L ∈ R^{d × n_kfac} (Algorithm 1 of Laplace-LoRA): after each batch L becomes the top
n_kfac left singular directions of [L, new columns], scaled by their singular values. No d × d matrix is
formed. Factors accumulate in float64. Under torch.distributed each rank passes over its shard and the
factors are merged at the end (see :mod:`bayes_peft.distributed`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal, Mapping, Optional

import torch
from torch import Tensor, nn

from .. import distributed
from ..linearize import capture_io, lora_linears

__all__ = ["Factors", "accumulate_factors", "low_rank_update"]

FisherType = Literal["exact", "mc"]


def low_rank_update(L: Optional[Tensor], columns: Tensor, rank: int) -> Tensor:
    """``[d, ≤rank]``: the best rank-``rank`` root of L Lᵀ + columns columnsᵀ (columns ``[d, m]``)."""
    stacked = columns if L is None else torch.cat([L, columns], dim=1)
    if stacked.shape[1] <= rank:
        return stacked
    # The left singular vectors of [L, C] scaled by their singular values: (U S)(U S)ᵀ = [L, C][L, C]ᵀ.
    U, S, _ = torch.linalg.svd(stacked, full_matrices=False)
    return U[:, :rank] * S[:rank]


@dataclass
class LayerFactors:
    """One layer's Fisher G ⊗ A. ``large_is_input`` tells which factor is the low-rank root ``root`` (L)."""

    small: Tensor  # [r, r], full
    root: Tensor  # [d, k], the large factor is root @ rootᵀ
    large_is_input: bool  # lora_A: the input factor A is large; lora_B: the output factor G is large

    def input_factor(self) -> Tensor:
        return self.root @ self.root.T if self.large_is_input else self.small

    def output_factor(self) -> Tensor:
        return self.small if self.large_is_input else self.root @ self.root.T


@dataclass
class Factors:
    """Every LoRA layer's KFAC factors, and what the evidence needs from the same pass."""

    layers: dict[str, LayerFactors]
    n_examples: int
    log_likelihood: float  # Σ_n log p(y_n | x_n, θ*) over the fitting data


class _Accumulator:
    """Running sums for one layer: small factor in full, large factor as a low-rank root."""

    def __init__(self, d_in: int, d_out: int, n_kfac: int):
        self.large_is_input = d_in >= d_out
        self.n_kfac = n_kfac
        self.small: Optional[Tensor] = None
        self.root: Optional[Tensor] = None

    def add(self, inputs: Tensor, output_grads: Tensor) -> None:
        """``inputs`` ``[B, d_in]`` (one row an example) and ``output_grads`` ``[M, d_out]`` (one row per
        example and class, already weighted so that Σ rows rowsᵀ is this batch's part of G)."""
        large, small = (inputs, output_grads) if self.large_is_input else (output_grads, inputs)
        gram = small.T @ small
        self.small = gram if self.small is None else self.small + gram
        self.root = low_rank_update(self.root, large.T, self.n_kfac)

    def merge_across_ranks(self) -> None:
        """Sum the small factors over ranks; gather the roots and truncate again (L Lᵀ sums exactly
        before the truncation)."""
        self.small = distributed.all_reduce_sum(self.small)
        self.root = low_rank_update(None, distributed.all_gather_cat(self.root, dim=1), self.n_kfac)

    def finish(self, n_examples: int) -> LayerFactors:
        # A carries the 1/N, wherever it lives.
        if self.large_is_input:
            return LayerFactors(self.small, self.root / math.sqrt(n_examples), True)
        return LayerFactors(self.small / n_examples, self.root, False)


def _weighted_targets(log_probs: Tensor, fisher: FisherType, generator: Optional[torch.Generator]) -> Tensor:
    """``[B, C']``: the weights w of Σ_c w_c log p_c whose gradients are the Fisher's columns.

    exact: every class, w_c = sqrt(p_c) (as a constant), so Σ_c (√p_c ∇log p_c)(…)ᵀ = E_y[∇ ∇ᵀ];
    mc: one label y ~ p per example, w = 1.
    """
    probs = log_probs.detach().exp()
    if fisher == "exact":
        return probs.sqrt()
    sampled = torch.multinomial(probs.cpu().double(), 1, generator=generator).to(probs.device)
    return torch.zeros_like(probs).scatter_(1, sampled, 1.0)


def accumulate_factors(model: nn.Module, loader: Iterable[Mapping[str, Tensor]], n_kfac: int = 10,
                       fisher: FisherType = "exact", generator: Optional[torch.Generator] = None,
                       progress: bool = True) -> Factors:
    """One pass over ``loader`` (batches of a :class:`~bayes_peft.Task`) in eval mode: the KFAC factors.

    With ``fisher="exact"`` each batch is repeated C times and replica c back-propagates √p_c·log p_c, so
    one backward pass gives every class's gradient; ``"mc"`` back-propagates the log-likelihood of one
    sampled label per example.
    """
    from tqdm.auto import tqdm

    from ..tasks import choice_logits

    if fisher not in ("exact", "mc"):
        raise ValueError(f"fisher must be 'exact' or 'mc', got {fisher!r}")
    if n_kfac < 1:
        raise ValueError(f"n_kfac must be at least 1, got {n_kfac}")
    layers = lora_linears(model)
    accumulators = {n: _Accumulator(m.in_features, m.out_features, n_kfac) for n, m in layers.items()}
    device = next(iter(layers.values())).weight.device
    was_training = model.training
    model.eval()  # no LoRA dropout: lora_A's input is captured after it
    n_examples, log_likelihood = 0, 0.0
    try:
        for batch in tqdm(loader, desc=f"KFAC ({fisher} Fisher)", disable=not progress, leave=False):
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            size, n_choices = batch["input_ids"].shape[0], batch["choice_ids"].numel()
            replicas = n_choices if fisher == "exact" else 1
            repeated = {k: v.repeat(replicas, *[1] * (v.ndim - 1)) if k not in ("choice_ids", "labels") else v
                        for k, v in batch.items()}
            with torch.enable_grad(), capture_io(layers, last_position=True) as seen:
                log_probs = torch.log_softmax(choice_logits(model, repeated).double(), -1)  # [R·B, C]
                first = log_probs[:size]
                log_likelihood += first.gather(1, batch["labels"][:, None]).sum().item()
                weights = _weighted_targets(first, fisher, generator)  # [B, C] or one-hot
                if fisher == "exact":
                    # Replica c back-propagates w_c · log p_c of its examples.
                    objective = (log_probs.view(n_choices, size, n_choices).diagonal(dim1=0, dim2=2) * weights).sum()
                else:
                    objective = (first * weights).sum()
                names = list(seen)
                grads = torch.autograd.grad(objective, [seen[n][1] for n in names], allow_unused=True)
            for name, grad in zip(names, grads):
                inputs = seen[name][0][:size].double()
                output_grads = (torch.zeros_like(seen[name][1][:, -1]) if grad is None else grad[:, -1]).double()
                accumulators[name].add(inputs, output_grads)
            n_examples += size
    finally:
        model.train(was_training)
    if distributed.active():
        totals = distributed.all_reduce_sum(torch.tensor([float(n_examples), log_likelihood], dtype=torch.float64))
        n_examples, log_likelihood = int(totals[0].item()), float(totals[1].item())
        if any(acc.root is None for acc in accumulators.values()):
            raise ValueError("a rank had no examples to fit on; give every rank a shard of the training data")
        for acc in accumulators.values():
            acc.merge_across_ranks()
    if n_examples == 0:
        raise ValueError("the loader yielded no examples to fit the Laplace approximation on")
    return Factors({n: acc.finish(n_examples) for n, acc in accumulators.items()}, n_examples, log_likelihood)

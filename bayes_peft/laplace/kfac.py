"""KFAC factors of the Fisher of the choice log-likelihood over LoRA weights, with a low-rank large factor.

KFAC treats every ``lora_A`` and ``lora_B`` Linear as its own layer ``z = a Wᵀ``. A LoRA weight is used at
**every position** t of a prompt, so the gradient of one example's choice logits is Σ_t g_t a_tᵀ over its
positions, with a_t the layer's input and g_t the output gradient; the linearized predictive uses exactly
this Jacobian. The Fisher of Σ_n −log p(y_n | x_n) over row-major vec(W) is approximated by

    F ≈ G ⊗ A,   G = Σ_n Σ_k ĝ_nk ĝ_nkᵀ  (d_out × d_out),   A = (1/N) Σ_n â_n â_nᵀ  (d_in × d_in),

summed over the N examples (a mean-reduced loss would under-count it by the batch size), with the k
running over directions u_k whose Σ_k u_k u_kᵀ is the Fisher of the choice logits. How the positions
enter is the ``kfac`` argument (Eschenhagen et al., "Kronecker-Factored Approximate Curvature for Modern
Neural Network Architectures", NeurIPS 2023):

* ``"reduce"`` (default): â_n = mean_t a_t over the prompt's tokens, ĝ_nk = Σ_t g_t. Exact when a_t is
  the same at every position, and the variant that paper derives for a loss with one term per sequence,
  which a classifier of the last token is. It adds B columns per batch to the low-rank factor.
* ``"expand"``: every position is a row of its own, A = (1/N) Σ_n mean_t a_t a_tᵀ and G = Σ_n Σ_t g_t g_tᵀ.
  The variant for a loss with one term per position; it adds B·T columns per batch.
* ``"tokens"``: the construction of Laplace-LoRA's public code as read for issue 26: every position a row of
  both factors and the input factor a sum over positions, A = (1/N) Σ_n Σ_t a_t a_tᵀ, not divided by the
  prompt's length, G = Σ_n Σ_t g_t g_tᵀ. Its A is T times "expand"'s for prompts of T tokens, so its
  curvature is T times larger and the evidence's λ* moves with it. Use it to compare with that paper's fits
  (with ``n_kfac`` at least the layers' width, and the output layer's LoRA, as that code keeps).

Measured on a tiny Llama (``tests/test_laplace.py``; 896 LoRA weights, 12 prompts of several lengths,
no truncation of the factors), the summed Var[f₁ − f₀] of the linearized predictive against that of the
dense posterior (GGN of the full-prompt Jacobians + λI)⁻¹ at the same λ:

    λ                     0.1     0.71 (evidence)   1       10
    KFAC-reduce          1.71×    1.52×             1.47×   1.10×
    KFAC-expand          2.72×    2.19×             2.01×   1.17×
    last token only      5.82×    2.93×             2.53×   1.21×

so "reduce" is the default. Part of the remaining gap is the block-diagonal (per-layer) structure that
every KFAC posterior shares. The last-token factors, used before, leave most of the Jacobian of
``v_proj`` outside the curvature, where the posterior is the prior.

One of the two factors is r × r (small) and kept whole; the other is d × d with d the model width and is
kept as L Lᵀ with L ∈ R^{d × n_kfac} (Algorithm 1 of Laplace-LoRA): after each batch L becomes the top
n_kfac left singular directions of [L, new columns], scaled by their singular values. No d × d matrix is
formed. Factors accumulate in float64. Layers of one shape (every layer's lora_A, say) are stacked and
updated together, with batched matmuls and one batched SVD, so the ops a batch dispatches do not grow
with the number of layers. Under torch.distributed each rank passes over its shard and the factors are
merged at the end (see :mod:`bayes_peft.distributed`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import distributed, sharding
from ..config import KFAC_TYPES
from ..data.generative import IGNORE_INDEX, answer_logits
from ..data.tasks import choice_logits
from ..models import keep_4bit_gradients
from ..posteriors.linearize import capture_io, lora_linears, output_grads

__all__ = ["Factors", "FittingData", "accumulate_factors", "accumulate_diagonal", "fisher_pass", "low_rank_update",
           "sample_lm_targets", "FisherType",
           "KFACType", "KFAC_TYPES"]

FisherType = Literal["exact", "mc"]
KFACType = Literal["reduce", "expand", "tokens"]  # config.KFAC_TYPES


def low_rank_update(L: Optional[Tensor], columns: Tensor, rank: int) -> Tensor:
    """``[..., d, ≤rank]``: the best rank-``rank`` root of L Lᵀ + columns columnsᵀ (columns ``[..., d, m]``),
    for every matrix of a batch at once."""
    stacked = columns if L is None else torch.cat([L, columns], dim=-1)
    if stacked.shape[-1] <= rank:
        return stacked
    # The left singular vectors of [L, C] scaled by their singular values: (U S)(U S)ᵀ = [L, C][L, C]ᵀ.
    U, S, _ = torch.linalg.svd(stacked, full_matrices=False)
    return U[..., :rank] * S[..., None, :rank]


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
class FittingData:
    """What a Fisher pass saw of its data besides the curvature: what the evidence needs, and how saturated
    the model is on them."""

    n_examples: int
    log_likelihood: float  # Σ_n log p(y_n | x_n, θ*)
    p_one_minus_p: float  # the mean over examples of Σ_c p_c (1 − p_c): every Fisher term scales with it


@dataclass
class Factors:
    """Every LoRA layer's KFAC factors, and what the evidence needs from the same pass."""

    layers: dict[str, LayerFactors]
    n_examples: int
    log_likelihood: float  # Σ_n log p(y_n | x_n, θ*) over the fitting data
    p_one_minus_p: float  # FittingData.p_one_minus_p


class _Accumulator:
    """Running sums for the layers ``names`` of one shape, stacked: small factors ``[G, r, r]`` in full,
    large factors as low-rank roots ``[G, d, ≤n_kfac]``."""

    def __init__(self, names: list[str], d_in: int, d_out: int, n_kfac: int):
        self.names = names
        self.large_is_input = d_in >= d_out
        self.n_kfac = n_kfac
        self.small: Optional[Tensor] = None
        self.root: Optional[Tensor] = None

    def add(self, inputs: Tensor, output_grads: Tensor) -> None:
        """Rows ``[G, M, d_in]`` with Σ rows rowsᵀ this batch's part of N·A, and ``[G, M', d_out]`` with
        Σ rows rowsᵀ its part of G, per layer (see :func:`_position_rows`)."""
        large, small = (inputs, output_grads) if self.large_is_input else (output_grads, inputs)
        gram = small.mT @ small
        self.small = gram if self.small is None else self.small + gram
        self.root = low_rank_update(self.root, large.mT, self.n_kfac)

    def merge_across_ranks(self) -> None:
        """Sum the small factors over ranks; gather the roots and truncate again (L Lᵀ sums exactly
        before the truncation)."""
        self.small = distributed.all_reduce_sum(self.small)
        self.root = low_rank_update(None, distributed.all_gather_cat(self.root, dim=-1), self.n_kfac)

    def finish(self, n_examples: int) -> dict[str, LayerFactors]:
        # A carries the 1/N, wherever it lives.
        if self.large_is_input:
            small, root = self.small, self.root / math.sqrt(n_examples)
        else:
            small, root = self.small / n_examples, self.root
        return {name: LayerFactors(small[i], root[i], self.large_is_input) for i, name in enumerate(self.names)}


def _accumulators(layers: Mapping[str, nn.Linear], n_kfac: int) -> list[_Accumulator]:
    """One :class:`_Accumulator` per shape ``(d_in, d_out)`` among ``layers``."""
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name, module in layers.items():
        by_shape.setdefault((module.in_features, module.out_features), []).append(name)
    return [_Accumulator(names, d_in, d_out, n_kfac) for (d_in, d_out), names in by_shape.items()]


def logit_fisher_root(probs: Tensor) -> Tensor:
    """``[B, C, C-1]``: R with R Rᵀ = diag(p) − p pᵀ, the Fisher of log p_y over the C logits, per example.

    That Fisher, Σ_c p_c (e_c − p)(e_c − p)ᵀ, always has the all-ones vector in its null space, so C − 1
    columns carry it exactly: one back-propagation fewer than one per class (a single one for C = 2).
    """
    fisher = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    values, vectors = torch.linalg.eigh(fisher)  # ascending: drop the null direction
    return vectors[:, :, 1:] * values[:, None, 1:].clamp_min(0).sqrt()


def _output_directions(log_probs: Tensor, fisher: FisherType, generator: Optional[torch.Generator]) -> Tensor:
    """``[B, C, K]``: directions u over the choice logits whose back-propagated Σ_k u_k u_kᵀ is the Fisher.

    exact: the K = C − 1 columns of :func:`logit_fisher_root`, so Σ_k u_k u_kᵀ = E_y[∇ log p_y ∇ log p_yᵀ];
    mc: one label y ~ p per example and u = e_y − p = ∇ log p_y over the logits (K = 1).
    """
    probs = log_probs.detach().exp()
    if fisher == "exact":
        return logit_fisher_root(probs)
    sampled = torch.multinomial(probs.cpu().double(), 1, generator=generator).to(probs.device)
    return (torch.zeros_like(probs).scatter_(1, sampled, 1.0) - probs)[:, :, None]


def sample_lm_targets(log_probs: Tensor, labels: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """``[B, W]``: at every position whose label is an answer token (``labels != −100``), a token drawn from the
    model's own next-token distribution there, ``exp(log_probs) [B, W, V]`` (:func:`answer_logits`' positions);
    −100 elsewhere. The gradient of Σ_t log p(ỹ_t) is one Monte Carlo draw whose outer product is unbiased for
    the Fisher of the causal-LM loss Σ_t −log p(y_t | x, y_<t) (draws at different positions are independent,
    so cross terms vanish in expectation)."""
    keep = labels != IGNORE_INDEX
    drawn = torch.multinomial(log_probs.detach()[keep].exp().cpu().double(), 1, generator=generator)[:, 0]
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[keep] = drawn.to(labels.device)
    return targets


def _lm_pass(model, batch: Mapping[str, Tensor], fisher: FisherType,
             generator: Optional[torch.Generator]) -> tuple[Tensor, list[Tensor]]:
    """The causal-LM loss's part of :func:`fisher_pass` for one batch of a generative task: the one objective to
    back-propagate, Σ_t log p(ỹ_t) of :func:`sample_lm_targets`'s draw, and the batch's sums of log p(y) over
    the answer tokens and, per example, of the mean over its answer's positions of Σ_v p_v (1 − p_v)."""
    if fisher != "mc":
        raise ValueError("the exact Fisher of a language model's loss needs a backward pass per vocabulary entry "
                         "and position: use fisher='mc' for a generative task")
    logits, labels = answer_logits(model, batch)  # the positions that predict answer tokens only
    log_probs = torch.log_softmax(logits.double(), -1)
    keep = labels != IGNORE_INDEX
    drawn = torch.where(keep, sample_lm_targets(log_probs, labels, generator), 0)
    objective = (log_probs.gather(-1, drawn[..., None])[..., 0] * keep).sum()
    probs = log_probs.detach().exp()
    spread = ((1 - probs.square().sum(-1)) * keep).sum(1) / keep.sum(1).clamp_min(1)
    observed = log_probs.detach().gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return objective, [(observed * keep).sum(), spread.sum()]


def _position_rows(inputs: Tensor, output_grads: Tensor, mask: Tensor, kfac: KFACType) -> tuple[Tensor, Tensor]:
    """The rows for the factors from every position of a batch, for G stacked layers.

    Args:
        inputs: ``[G, B, T, d_in]``, each layer's input a_t.
        output_grads: ``[G, K, B, T, d_out]``, each layer's output gradient g_t of each Fisher direction.
        mask: ``[B, T]``, 1 at the prompt's tokens and 0 at padding.

    Returns:
        ``(a_rows, g_rows)`` with Σ a_rows a_rowsᵀ this batch's part of N·A and Σ g_rows g_rowsᵀ its part of G,
        per layer: ``[G, B, d_in]`` and ``[G, K·B, d_out]`` for ``"reduce"``, ``[G, B·T, d_in]`` and
        ``[G, K·B·T, d_out]`` for ``"expand"`` and ``"tokens"``.
    """
    weights = mask / mask.sum(1, keepdim=True)  # [B, T]: the mean over a prompt's tokens
    grads = output_grads * mask[:, :, None]  # padding receives no gradient anyway; make it exact
    if kfac == "reduce":
        return torch.einsum("bt,gbti->gbi", weights, inputs), grads.sum(3).flatten(1, 2)
    row_weights = weights if kfac == "expand" else mask  # "tokens": A sums a prompt's positions
    return (row_weights.sqrt()[:, :, None] * inputs).flatten(1, 2), grads.flatten(1, 3)


def _add_batch(accumulators: list[_Accumulator], inputs_by_layer: Mapping[str, Tensor],
               grads_by_layer: Mapping[str, list[Tensor]], mask: Tensor, kfac: KFACType) -> None:
    """Add one batch to every accumulator: a fixed number of ops per shape of layer, whatever the layers.

    ``inputs_by_layer``: each layer's input ``[B, T_l, d_in]``; ``grads_by_layer``: each layer's output
    gradient ``[B, T_l, d_out]`` per Fisher direction; ``mask``: ``[B, T]``. A layer applied at the last
    T_l < T positions only (the output layer, which the model runs at the last position) takes the last
    T_l columns of the mask.
    """
    for acc in accumulators:
        by_length: dict[int, list[str]] = {}
        for name in acc.names:
            by_length.setdefault(inputs_by_layer[name].shape[1], []).append(name)
        rows = {}
        for length, names in by_length.items():
            inputs = torch.stack([inputs_by_layer[n] for n in names]).double()  # [G, B, T_l, d_in]
            grads = torch.stack([g for n in names for g in grads_by_layer[n]])  # [G·K, B, T_l, d_out]
            grads = grads.unflatten(0, (len(names), -1)).double()  # [G, K, B, T_l, d_out]
            a_rows, g_rows = _position_rows(inputs, grads, mask[:, mask.shape[1] - length:], kfac)
            rows.update(zip(names, zip(a_rows, g_rows)))
        if len(by_length) == 1:
            acc.add(a_rows, g_rows)
        else:  # zero rows pad the layers seen at fewer positions: they add nothing to either factor
            acc.add(*(_stack_padded([rows[n][i] for n in acc.names]) for i in (0, 1)))


def _stack_padded(matrices: list[Tensor]) -> Tensor:
    """``[G, max rows, d]``: the ``[rows_g, d]`` matrices stacked, zero rows below the shorter ones."""
    most = max(m.shape[0] for m in matrices)
    return torch.stack([torch.nn.functional.pad(m, (0, 0, 0, most - m.shape[0])) for m in matrices])


def _batch_pass(model: nn.Module, batch: Mapping[str, Tensor], layers: Mapping[str, nn.Module], fisher: FisherType,
                generator: Optional[torch.Generator]) -> tuple[Tensor, dict[str, Tensor], dict[str, list[Tensor]]]:
    """One batch of :func:`fisher_pass`: ``[2]`` (Σ log p(y | x), Σ Σ_c p_c (1 − p_c)), each layer's input and its
    output gradients per direction."""
    with torch.enable_grad(), capture_io(layers) as seen:
        if batch["labels"].dim() == 2:  # a generative task: the causal-LM loss of the answer tokens
            objective, observed = _lm_pass(model, batch, fisher, generator)
            objectives = [objective]
        else:
            logits = choice_logits(model, batch).double()  # [B, C]
            log_probs = torch.log_softmax(logits, -1)
            probs = log_probs.detach().exp()
            observed = [log_probs.detach().gather(1, batch["labels"][:, None]).sum(), (probs * (1 - probs)).sum()]
            directions = _output_directions(log_probs, fisher, generator)  # [B, C, K]
            objectives = [(logits * directions[:, :, k]).sum() for k in range(directions.shape[2])]
        unseen = [n for n in layers if n not in seen]
        if unseen:
            raise ValueError(f"{len(unseen)} LoRA layers (the first: {unseen[0]}) were not called in the "
                             "forward pass, so the Fisher has no data for them")
        grads = output_grads(objectives, [seen[n][1] for n in layers])
    return torch.stack(observed), {n: seen[n][0] for n in layers}, dict(zip(layers, grads))


def fisher_pass(model: nn.Module, loader: Iterable[Mapping[str, Tensor]], fisher: FisherType,
                generator: Optional[torch.Generator], progress: bool, add_batch, desc: str,
                modules: Optional[Sequence[str]] = None) -> tuple[int, float]:
    """One pass over ``loader`` in eval mode with hooks on every LoRA Linear: for each batch, one forward pass
    over the whole prompts and K backward passes along directions u_k over the choice logits whose Σ_k u_k u_kᵀ
    is the Fisher (:func:`_output_directions`; for a generative task's batch, whose ``labels`` are ``[B, T]``, one
    backward pass of the causal-LM loss's Monte Carlo Fisher over every answer position,
    :func:`sample_lm_targets`), then ``add_batch(inputs, grads, mask)`` with each layer's
    input ``[B, T, d_in]``, its output gradient ``[B, T, d_out]`` per direction, and the ``[B, T]`` mask.
    ``modules``: only the LoRA layers of these target modules (``("lm_head",)`` for last-layer Laplace).

    Returns the :class:`FittingData`, summed over ranks under torch.distributed.
    """
    from tqdm.auto import tqdm

    if fisher not in ("exact", "mc"):
        raise ValueError(f"fisher must be 'exact' or 'mc', got {fisher!r}")
    layers = lora_linears(model, modules)
    keep_4bit_gradients(model)
    device = next(iter(layers.values())).weight.device
    was_training = model.training
    model.eval()  # no LoRA dropout: lora_A's input is captured after it
    n_examples = 0
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # Σ_n log p(y_n | x_n), Σ_n Σ_c p_c (1 − p_c)
    padding = sharding.passes_to_match(model, loader)  # agreed before any pass
    last = None
    try:
        for batch in tqdm(loader, desc=f"{desc} ({fisher} Fisher)", disable=not progress, leave=False):
            last = batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            observed, inputs, grads = _batch_pass(model, batch, layers, fisher, generator)
            totals += observed
            add_batch(inputs, grads, batch["attention_mask"].to(torch.float64))
            n_examples += batch["input_ids"].shape[0]
        for _ in range(padding if last is not None else 0):
            _batch_pass(model, last, layers, fisher, generator)  # an FSDP2 model's weights are gathered by every rank
    finally:
        model.train(was_training)
    if distributed.active():
        totals = distributed.all_reduce_sum(torch.cat([totals.new_tensor([n_examples]), totals]))
        n_examples, totals = int(totals[0].item()), totals[1:]
    log_likelihood, p_one_minus_p = totals.tolist()  # one host read for the whole pass
    if n_examples == 0:
        raise ValueError("the loader yielded no examples to fit the Laplace approximation on")
    return FittingData(int(n_examples), log_likelihood, p_one_minus_p / n_examples)


def accumulate_factors(model: nn.Module, loader: Iterable[Mapping[str, Tensor]], n_kfac: int = 10,
                       fisher: FisherType = "exact", generator: Optional[torch.Generator] = None,
                       progress: bool = True, kfac: KFACType = "reduce",
                       modules: Optional[Sequence[str]] = None) -> Factors:
    """One pass over ``loader`` (batches of a :class:`~bayes_peft.Task`) in eval mode: the KFAC factors.

    Each batch costs one forward pass with gradients over the whole prompts and K backward passes; backward
    pass k back-propagates u_k · logits for directions u over the C choice logits: with ``fisher="exact"``
    the K = C − 1 columns of a root of the logit Fisher diag(p) − p pᵀ; with ``"mc"`` the gradient of the
    log-likelihood of one sampled label per example (K = 1). ``kfac`` says how positions enter the factors
    (see the module docstring). ``modules``: only the LoRA layers of these target modules.
    """
    if kfac not in KFAC_TYPES:
        raise ValueError(f"kfac must be one of {KFAC_TYPES}, got {kfac!r}")
    if n_kfac < 1:
        raise ValueError(f"n_kfac must be at least 1, got {n_kfac}")
    layers = lora_linears(model, modules)
    accumulators = _accumulators(layers, n_kfac)
    seen = fisher_pass(model, loader, fisher, generator, progress,
                       lambda inputs, grads, mask: _add_batch(accumulators, inputs, grads, mask, kfac), "KFAC", modules)
    if distributed.active():
        if any(acc.root is None for acc in accumulators):
            raise ValueError("a rank had no examples to fit on; give every rank a shard of the training data")
        for acc in accumulators:
            acc.merge_across_ranks()
    fitted = {name: f for acc in accumulators for name, f in acc.finish(seen.n_examples).items()}
    return Factors({n: fitted[n] for n in layers}, seen.n_examples, seen.log_likelihood, seen.p_one_minus_p)


def accumulate_diagonal(model: nn.Module, loader: Iterable[Mapping[str, Tensor]], fisher: FisherType = "exact",
                        generator: Optional[torch.Generator] = None,
                        progress: bool = True,
                        modules: Optional[Sequence[str]] = None) -> tuple[dict[str, Tensor], FittingData]:
    """The diagonal of the same Fisher without the Kronecker approximation: per layer ``[d_out, d_in]``,
    Σ_n Σ_k (Σ_t g_nkt a_ntᵀ)², the squares of each example's exact gradient along each Fisher direction
    (every position included), of the LoRA layers of ``modules`` (default: all). Returns ``(diagonals,
    FittingData)``."""
    layers = lora_linears(model, modules)
    diagonals = {n: torch.zeros(m.weight.shape, dtype=torch.float64, device=m.weight.device) for n, m in layers.items()}

    def add_batch(inputs, grads, mask):
        for name, diagonal in diagonals.items():
            length = inputs[name].shape[1]  # the output layer runs at the last position only
            masked = torch.stack(grads[name]).double() * mask[:, mask.shape[1] - length:, None]  # [K, B, T_l, d_out]
            per_example = torch.einsum("kbto,bti->kboi", masked, inputs[name].double())
            diagonal += per_example.square().sum((0, 1))

    seen = fisher_pass(model, loader, fisher, generator, progress, add_batch, "diagonal Fisher", modules)
    for diagonal in diagonals.values():
        distributed.all_reduce_sum(diagonal)
    return diagonals, seen

"""Per-example gradients of the choice logits with respect to every LoRA weight, from hooks.

A LoRA weight W ``[d_out, d_in]`` of a ``lora_A``/``lora_B`` Linear enters the model as ``z = a Wᵀ``, so
the gradient of one logit of one example is ``Σ_t g_t a_tᵀ`` over its positions t, where ``a`` is the
layer's input and ``g`` the logit's gradient at the layer's output. Hooks give both.

The softmax ignores a shift shared by all C logits, so only the centred logits P f (P = I − 11ᵀ/C) matter,
and they span C − 1 directions. One forward pass and C − 1 backward passes, one per column u_k of an
orthonormal basis U of that span, give every example's ∂(u_kᵀ f)/∂W at once (examples do not interact in a
batch); U maps them back to ∂(P f)/∂W. Nothing larger than one layer's ``[C, B, d_out, d_in]`` is formed,
never the ``[B, C, P]`` Jacobian.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..data.tasks import choice_logits
from ..models import keep_4bit_gradients

__all__ = ["lora_linears", "linearizable_layers", "capture_io", "output_grads", "LayerGrads", "choice_logit_grads",
           "centred_basis"]


def lora_linears(model: nn.Module, modules: Optional[Sequence[str]] = None) -> dict[str, nn.Linear]:
    """Every ``lora_A``/``lora_B`` Linear of a peft model, by the name of its weight parameter; with
    ``modules`` (target module names, as in ``LoraConfig.target_modules``: ``("lm_head",)``), only theirs."""
    layers = {f"{name}.weight": module for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and (".lora_A." in name or ".lora_B." in name)
              and (modules is None or any(f".{m}.lora_" in f".{name}" for m in modules))}
    if not layers:
        which = "" if modules is None else f" on the modules {list(modules)}"
        raise ValueError(f"the model has no LoRA layers{which} (lora_A/lora_B Linear modules)")
    return layers


def linearizable_layers(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Linear]:
    """The Linear layer of every weight in ``names``, by that name: the LoRA layers, and any other Linear
    trained in full (a peft ``modules_to_save`` head, for instance).

    Raises ``ValueError`` naming every parameter that is not the weight of a Linear layer (an embedding
    LoRA, a bias, a DoRA magnitude, a norm): their per-example gradients are not ``Σ_t g_t a_tᵀ``, so the
    linearized predictive cannot cover them, and leaving them out would understate its variance.
    """
    linears = {f"{name}.weight": module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    names = list(names)
    unsupported = [n for n in names if n not in linears]
    if unsupported:
        raise ValueError(
            f"the linearized predictive covers the weights of Linear layers only, and this posterior also covers "
            f"{len(unsupported)} other parameters: {', '.join(unsupported[:5])}{' …' if len(unsupported) > 5 else ''}. "
            "Use method='sample', or leave these parameters out of the posterior (train them frozen)."
        )
    return {n: linears[n] for n in names}


def output_grads(objectives: Sequence[Tensor], outputs: Sequence[Tensor]) -> list[list[Tensor]]:
    """``[layer][k]``: the gradient of each scalar in ``objectives`` at each tensor of ``outputs`` (layer
    outputs from :func:`capture_io`), zeros where an objective does not reach one; one backward pass per
    objective, the graph kept until the last."""
    per_objective = [torch.autograd.grad(objective, list(outputs), allow_unused=True,
                                         retain_graph=k + 1 < len(objectives)) for k, objective in enumerate(objectives)]
    return [[torch.zeros_like(out) if grads[i] is None else grads[i] for grads in per_objective]
            for i, out in enumerate(outputs)]


def centred_basis(n_choices: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """``[C, C − 1]``: the Helmert basis, orthonormal columns spanning the logit vectors that sum to zero,
    so that U Uᵀ = I − 11ᵀ/C."""
    basis = torch.zeros(n_choices, n_choices - 1, dtype=torch.float64)
    for k in range(1, n_choices):
        basis[:k, k - 1] = 1.0
        basis[k, k - 1] = -float(k)
        basis[:, k - 1] /= math.sqrt(k * (k + 1))
    return basis.to(dtype=dtype, device=device)


@dataclass
class LayerGrads:
    """One LoRA Linear's inputs ``a`` ``[B, T, d_in]``, the gradients ``g`` ``[K, B, T, d_out]`` at its
    output of the logits along each column of ``directions`` ``[C, K]``."""

    inputs: Tensor
    output_grads: Tensor
    directions: Tensor

    def per_example(self) -> Tensor:
        """``[C, B, d_out, d_in]``: ∂(P f)_c(x_b)/∂W, the Jacobian of the centred logits."""
        along = torch.einsum("kbto,bti->kboi", self.output_grads, self.inputs)
        return torch.einsum("ck,kboi->cboi", self.directions, along)


@contextlib.contextmanager
def capture_io(layers: Mapping[str, nn.Linear]) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
    """Record each layer's (input, output) in the forward pass, the input detached; the hooks go on exit,
    whatever happens."""
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    handles = []
    try:
        for name, module in layers.items():
            def hook(module, args, output, name=name):
                seen[name] = (args[0].detach(), output)
            handles.append(module.register_forward_hook(hook))
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def choice_logit_grads(model: nn.Module, batch: Mapping[str, Tensor],
                       layers: Mapping[str, nn.Linear] | None = None) -> tuple[Tensor, dict[str, LayerGrads]]:
    """The choice logits ``[B, C]`` at the current weights, and every LoRA layer's :class:`LayerGrads`
    along the C − 1 directions of :func:`centred_basis`: one forward pass and C − 1 backward passes.

    Run it in ``eval()`` mode: ``lora_A``'s input has already passed through LoRA dropout.
    """
    layers = lora_linears(model) if layers is None else layers
    keep_4bit_gradients(model)
    n_choices = batch["choice_ids"].numel()
    if n_choices < 2:
        raise ValueError(f"a task needs at least two choices for a predictive distribution, got {n_choices}")
    with torch.enable_grad(), capture_io(layers) as seen:
        logits = choice_logits(model, {k: v for k, v in batch.items() if k != "labels"}).float()  # [B, C]
        directions = centred_basis(n_choices, logits.dtype, logits.device)  # [C, K]
        along = logits @ directions  # [B, K]
        names = [n for n in layers if n in seen]
        grads = output_grads([along[:, k].sum() for k in range(n_choices - 1)], [seen[n][1] for n in names])
    out = {name: LayerGrads(seen[name][0].float(), torch.stack(g).float(), directions) for name, g in zip(names, grads)}
    return logits.detach(), out

"""Per-example gradients of the choice logits with respect to every LoRA weight, from hooks.

A LoRA weight W ``[d_out, d_in]`` of a ``lora_A``/``lora_B`` Linear enters the model as ``z = a Wᵀ``, so
the gradient of one logit of one example is ``Σ_t g_t a_tᵀ`` over its positions t, where ``a`` is the
layer's input and ``g`` the logit's gradient at the layer's output. Hooks give both.

To get all C choice logits of every example in one backward pass, the batch is repeated C times and
replica c back-propagates only logit c; examples do not interact inside a batch, so replica c of example
b holds exactly ∂f_c(x_b)/∂W. Nothing larger than one layer's ``[C, B, d_out, d_in]`` is ever formed,
never the ``[B, C, P]`` Jacobian.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from .models import keep_4bit_gradients
from .tasks import choice_logits

__all__ = ["lora_linears", "linearizable_layers", "capture_io", "LayerGrads", "choice_logit_grads"]


def lora_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``lora_A``/``lora_B`` Linear of a peft model, by the name of its weight parameter."""
    layers = {f"{name}.weight": module for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and (".lora_A." in name or ".lora_B." in name)}
    if not layers:
        raise ValueError("the model has no LoRA layers (lora_A/lora_B Linear modules)")
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


@dataclass
class LayerGrads:
    """One LoRA Linear's inputs ``a`` ``[C, B, T, d_in]`` and logit gradients ``g`` ``[C, B, T, d_out]``."""

    inputs: Tensor
    output_grads: Tensor

    def per_example(self) -> Tensor:
        """``[C, B, d_out, d_in]``: ∂f_c(x_b)/∂W."""
        return torch.einsum("cbto,cbti->cboi", self.output_grads, self.inputs)


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
    """The choice logits ``[B, C]`` at the current weights, and every LoRA layer's :class:`LayerGrads`.

    Run it in ``eval()`` mode: ``lora_A``'s input has already passed through LoRA dropout.
    """
    layers = lora_linears(model) if layers is None else layers
    keep_4bit_gradients(model)
    n_choices = batch["choice_ids"].numel()
    batch_size = batch["input_ids"].shape[0]
    repeated = {k: (v.repeat(n_choices, *[1] * (v.ndim - 1)) if k != "choice_ids" and v is not None else v)
                for k, v in batch.items() if k != "labels"}
    with torch.enable_grad(), capture_io(layers) as seen:
        logits = choice_logits(model, repeated)  # [C·B, C]
        # Replica c (rows c·B … c·B+B−1) back-propagates its logit c only.
        picked = logits.view(n_choices, batch_size, n_choices).diagonal(dim1=0, dim2=2)  # [B, C]
        names = [n for n in layers if n in seen]
        grads = torch.autograd.grad(picked.sum(), [seen[n][1] for n in names], allow_unused=True)
    out = {}
    for name, grad in zip(names, grads):
        a = seen[name][0]
        g = torch.zeros_like(seen[name][1]) if grad is None else grad
        out[name] = LayerGrads(a.reshape(n_choices, batch_size, *a.shape[1:]).float(),
                               g.reshape(n_choices, batch_size, *g.shape[1:]).float())
    return logits[:batch_size].detach().float(), out

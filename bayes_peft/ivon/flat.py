"""One flat 1-D buffer behind many tensors, so that one op reads or writes them all.

IVON keeps its state (mean, momentum, Hessian) as one flat buffer per parameter group, so that its update
rules run as a handful of elementwise ops. Between those buffers and the parameters, a per-tensor Python
loop would dispatch several ops per tensor: on a GPU each is a kernel launch, and a LoRA model has hundreds
of tensors. :func:`flatten_into_views` makes the parameters themselves views of one buffer; a
:class:`FlatMirror` gathers tensors that cannot be views (gradients, which autograd allocates) into a
persistent buffer with one ``torch._foreach_copy_``; :class:`FlatWeights` is either, for weights.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["FlatMirror", "FlatWeights", "split_like", "flatten_into_views"]


def split_like(flat: Tensor, tensors: Sequence[Tensor]) -> list[Tensor]:
    """Views of ``flat`` [sum of numels] shaped like ``tensors``, in order."""
    views, offset = [], 0
    for t in tensors:
        views.append(flat[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()
    if offset != flat.numel():
        raise ValueError(f"a flat buffer of {flat.numel()} elements for tensors of {offset}")
    return views


@torch.no_grad()
def flatten_into_views(tensors: Sequence[Tensor]) -> Tensor:
    """Move the tensors' values into one new flat buffer ``[numel]`` and make each tensor a view of its
    slice (``t.data = view``): afterwards one op on the buffer reads or writes them all. Returns the buffer.

    The tensors keep their identity (a Parameter stays the same Parameter), values, shapes and
    ``requires_grad``; they now share one storage, so savers that refuse shared storage (safetensors) need
    ``.clone()`` copies, as peft's ``save_pretrained`` makes itself.
    """
    tensors = list(tensors)
    like = tensors[0] if tensors else torch.zeros(0)
    buffer = torch.cat([t.detach().reshape(-1) for t in tensors]) if tensors else like.new_zeros(0)
    for t, view in zip(tensors, split_like(buffer, tensors)):
        t.data = view
    return buffer


class FlatMirror:
    """A persistent flat buffer ``[numel]`` with views shaped like ``tensors``; :meth:`gather` fills it."""

    def __init__(self, tensors: Sequence[Tensor]):
        like = tensors[0] if tensors else torch.zeros(0)
        self.buffer = torch.zeros(sum(t.numel() for t in tensors), device=like.device, dtype=like.dtype)
        self.views = split_like(self.buffer, tensors)

    @torch.no_grad()
    def gather(self, tensors: Sequence[Optional[Tensor]]) -> Tensor:
        """buffer ← ``tensors`` (shaped like the mirrored ones), a ``None`` entry zeroing its slice, in one
        ``torch._foreach_copy_`` (and one ``_foreach_zero_`` if any is ``None``). Returns the buffer."""
        present = [(v, t) for v, t in zip(self.views, tensors) if t is not None]
        if len(present) < len(self.views):
            torch._foreach_zero_([v for v, t in zip(self.views, tensors) if t is None])
        if present:
            torch._foreach_copy_([v for v, _ in present], [t for _, t in present])
        return self.buffer


class FlatWeights:
    """Weights read and written as one flat buffer ``[numel]``: made its views (``views=True``), or mirrored by
    it, one ``torch._foreach_copy_`` each way. The slices of FSDP2's sharded parameters must be mirrored: FSDP
    gathers them from its own storage, which a view would replace."""

    def __init__(self, tensors: Sequence[Tensor], views: bool):
        self.tensors = list(tensors)
        self._mirror = None if views else FlatMirror(self.tensors)
        self.buffer = flatten_into_views(self.tensors) if views else self._mirror.gather(self.tensors)

    @torch.no_grad()
    def pull(self) -> Tensor:
        """The buffer, holding what the weights hold."""
        if self._mirror is not None:
            self._mirror.gather(self.tensors)
        return self.buffer

    @torch.no_grad()
    def push(self) -> None:
        """The weights ← the buffer, after a write into it."""
        if self._mirror is not None:
            torch._foreach_copy_(self.tensors, self._mirror.views)

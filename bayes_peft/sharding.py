"""Parameters sharded by FSDP2 (``fully_shard``): DTensors, of which each rank holds a slice.

Between FSDP's forward passes a sharded parameter is a DTensor whose local tensor is a slice of FSDP's own
storage. Whatever writes weights (IVON's mean and samples, a posterior's draws) writes each rank's slice in
place (:func:`local`, :func:`local_slice`); whatever reads a whole posterior gathers it (:func:`full`,
:func:`assemble`, collectives that every rank must call). :class:`ShardIndex` says where a rank's elements
sit among a flat group's, so that noise drawn for the whole group can be cut to the slices: a sharded run
then draws what a single process draws.

FSDP2 gathers a sharded model's weights in every forward pass, a collective that every rank must join: a rank
with fewer batches than another makes up the difference (:func:`passes_to_match`).

Plain tensors pass through every function unchanged, so a model without FSDP pays nothing.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Sized

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from . import distributed

__all__ = ["ShardIndex", "is_sharded", "local", "full", "assemble", "local_slice", "shard_index", "passes_to_match",
           "fully_shard_layers"]


class ShardIndex(NamedTuple):
    """Where a group's local elements sit in the whole group: ``index`` ``[local numel]`` into the flat
    concatenation of the full parameters, ``numel`` elements long."""

    numel: int
    index: Tensor


def is_sharded(tensor: Tensor) -> bool:
    return isinstance(tensor, DTensor)


@torch.no_grad()
def local(tensor: Tensor) -> Tensor:
    """This rank's slice of ``tensor`` (a view sharing its storage and version counter); a plain tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


@torch.no_grad()
def full(tensor: Tensor) -> Tensor:
    """The whole of ``tensor``, gathered from every rank (a collective); a plain tensor itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


@torch.no_grad()
def assemble(like: Tensor, values: Tensor) -> Tensor:
    """The whole tensor of which ``values`` is this rank's slice, sharded as ``like`` is (a collective);
    ``values`` itself when ``like`` is a plain tensor."""
    if not is_sharded(like):
        return values
    return DTensor.from_local(values, like.device_mesh, like.placements, shape=like.shape,
                              stride=like.stride()).full_tensor()


@torch.no_grad()
def local_slice(like: Tensor, whole: Tensor) -> Tensor:
    """This rank's slice of ``whole``, sharded as ``like`` is (no communication: every rank holds ``whole``);
    ``whole`` itself when ``like`` is a plain tensor."""
    if not is_sharded(like):
        return whole
    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None).to_local()


@torch.no_grad()
def shard_index(params: Sequence[Tensor]) -> Optional[ShardIndex]:
    """The :class:`ShardIndex` of a group's ``params`` in order, or ``None`` when none is sharded.

    Each parameter's positions are laid out as the parameter and sharded by DTensor's own rule, with no
    communication: every rank holds the full positions, so it keeps its chunk (``src_data_rank=None``).
    """
    if not any(is_sharded(p) for p in params):
        return None
    parts, offset = [], 0
    for p in params:
        positions = torch.arange(offset, offset + p.numel(), device=local(p).device).view(p.shape)
        parts.append(local_slice(p, positions).reshape(-1))
        offset += p.numel()
    return ShardIndex(offset, torch.cat(parts))


def passes_to_match(model: nn.Module, batches: Sized) -> int:
    """How many passes to add to this rank's ``len(batches)`` so that it makes as many as the busiest rank (whose
    outputs are then thrown away): 0, without asking for the length, for a model with no sharded parameter or
    outside torch.distributed."""
    if not distributed.active() or not any(is_sharded(p) for p in model.parameters()):
        return 0
    return distributed.most_over_ranks(len(batches)) - len(batches)


def fully_shard_layers(model: nn.Module, **options) -> nn.Module:
    """FSDP2's usual wrapping of a (peft) transformers model: ``fully_shard`` on every block the model names in
    ``_no_split_modules`` (its decoder layers), then on the root; ``options`` go to each call. In place;
    returns ``model``. Build the optimizer after it (or let accelerate's FSDP2 preparation do both)."""
    from torch.distributed.fsdp import fully_shard

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks = set(getattr(inner, "_no_split_modules", None) or ())
    if not blocks:
        raise ValueError(f"{type(inner).__name__} names no blocks to shard (_no_split_modules); call fully_shard "
                         "on its layers yourself")
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module, **options)
    fully_shard(model, **options)
    return model

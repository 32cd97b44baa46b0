"""What bayes_peft needs from torch.distributed, and nothing when it is not initialised.

Semantics, chosen once for the whole package:
- IVON: every rank draws the **same** weight sample (one generator, seeded identically), and gradients are
  averaged across ranks, by DDP or by ``IVON(sync=True)``. Then 2 ranks × batch b step exactly like one
  process × batch 2b. Ranks with different generators would average gradients taken at different samples
  while each scaled them by its own noise: that is refused at construction.
- Laplace: each rank accumulates its shard; the small factors and the example count are summed, the
  low-rank roots are gathered and re-truncated, so the evidence sees the global N.
- Evaluation: each rank scores a shard without padding (``Task.loader(..., shard=(rank, world))``);
  the probabilities are gathered back into the original order, so the metrics equal a single process's.
"""

from __future__ import annotations

import zlib
import torch
from torch import Tensor

__all__ = ["active", "rank_and_world", "shared_seed", "check_identical", "all_reduce_sum", "all_ranks_true",
           "most_over_ranks", "average_over_ranks_",
           "all_gather_cat", "gather_in_order"]


def active() -> bool:
    """True inside an initialised process group of more than one rank."""
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def rank_and_world() -> tuple[int, int]:
    if not active():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _device_for_collectives() -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def shared_seed() -> int:
    """A seed drawn on rank 0 from torch's global RNG and broadcast to every rank."""
    seed = torch.randint(0, 2**62, (1,))
    if active():
        seed = seed.to(_device_for_collectives())
        torch.distributed.broadcast(seed, src=0)
    return int(seed.item())


def check_identical(data: bytes, what: str) -> None:
    """Raise ValueError unless ``data`` is the same on every rank."""
    if not active():
        return
    checksum = torch.tensor([zlib.crc32(data)], dtype=torch.int64, device=_device_for_collectives())
    low, high = checksum.clone(), checksum.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    if low.item() != high.item():
        raise ValueError(f"{what} differs across ranks")


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over ranks (in place, returned)."""
    if active():
        moved = tensor.to(_device_for_collectives())
        torch.distributed.all_reduce(moved)
        tensor.copy_(moved)
    return tensor


def most_over_ranks(count: int) -> int:
    """The largest ``count`` any rank holds (``count`` itself outside torch.distributed)."""
    if not active():
        return count
    most = torch.tensor([count], dtype=torch.int64, device=_device_for_collectives())
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    return int(most.item())


def all_ranks_true(flag: Tensor) -> Tensor:
    """A 0-dim bool ``flag`` made true only where it is true on every rank: on the device, no host read."""
    if not active():
        return flag
    agreed = flag.to(torch.int32)
    torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
    return agreed.bool()


def average_over_ranks_(tensors: list[Tensor]) -> None:
    """Replace each tensor by its mean over ranks, in place (every rank must pass the same shapes)."""
    world = torch.distributed.get_world_size()
    for t in tensors:
        torch.distributed.all_reduce(t)
        t.div_(world)


def all_gather_cat(tensor: Tensor, dim: int = 0) -> Tensor:
    """Concatenate every rank's ``tensor`` along ``dim`` (sizes along ``dim`` may differ)."""
    if not active():
        return tensor
    device = _device_for_collectives()
    world = torch.distributed.get_world_size()
    moved = tensor.to(device).movedim(dim, 0).contiguous()
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    torch.distributed.all_gather(sizes, torch.tensor([moved.shape[0]], device=device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *moved.shape[1:]), dtype=moved.dtype, device=device)
    padded[: moved.shape[0]] = moved
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    gathered = torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])
    return gathered.movedim(0, dim).to(tensor.device)


def gather_in_order(tensor: Tensor) -> Tensor:
    """Undo the interleaved sharding ``examples[rank::world]``: every rank's rows, in the original order."""
    if not active():
        return tensor
    world = torch.distributed.get_world_size()
    parts = all_gather_cat(tensor)
    out = torch.empty_like(parts)
    offset = 0
    for r in range(world):
        size = len(range(r, parts.shape[0], world))
        out[r::world] = parts[offset: offset + size]
        offset += size
    return out

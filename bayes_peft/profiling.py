"""What a step costs where a CPU cannot show it, counted on any machine.

On a GPU every op that computes launches a kernel, and reading a device value on the host
(``.item()``, ``bool(tensor)``; the aten op ``_local_scalar_dense``) waits for the device. Counting the
aten ops a function dispatches therefore shows, on a CPU and in CI, the per-tensor launches and host
synchronisations that only a GPU profile would otherwise reveal.
"""

from __future__ import annotations

import collections
from typing import Callable

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["dispatched_ops"]


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(fn: Callable[[], object]) -> "collections.Counter[str]":
    """The aten ops ``fn()`` dispatches, counted by name; ``["_local_scalar_dense"]`` is its host reads."""
    with _Count() as mode:
        fn()
    return mode.ops

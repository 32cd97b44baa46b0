"""What a step costs: ops counted on any machine, and times measured in turns.

On a GPU every op that computes launches a kernel, and reading a device value on the host
(``.item()``, ``bool(tensor)``; the aten op ``_local_scalar_dense``) waits for the device. Counting the
aten ops a function dispatches therefore shows, on a CPU and in CI, the per-tensor launches and host
synchronisations that only a GPU profile would otherwise reveal. :func:`median_times_in_turns` times
competing functions (AdamW's step and IVON's, say) alternately in one run, for the benchmark scripts'
ratios.
"""

from __future__ import annotations

import collections
import statistics
import time
from typing import Callable, Mapping

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["dispatched_ops", "median_times_in_turns"]


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


def median_times_in_turns(fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 2,
                          sync: Callable[[], object] = lambda: None) -> dict[str, float]:
    """The median seconds of each ``fns[name]()`` over ``repeats`` rounds after ``warmup``; every round calls
    each function once, in turns, so that a drift in the machine's load hits all alike. ``sync`` waits for
    the device (``torch.cuda.synchronize``) before each clock read."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}

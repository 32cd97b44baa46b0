"""Noticing writes into weights behind the back of an optimizer that keeps its own copy of them.

IVON keeps the posterior mean itself and writes the mean, or a sample around it, into the weights. A user's
``load_state_dict`` or ``copy_`` into weights that hold a sample would be lost at the next step, and a
weight moved to new storage (``.to()``, ``p.data = ...``) would no longer be the view IVON writes into.
:class:`WeightGuard` tells both apart from IVON's own writes by host-side reads of each parameter's
version counter and data pointer, so that an ordinary step pays no device synchronisation for the check.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["WeightGuard"]


class WeightGuard:
    """Watches ``params`` (views of an optimizer's flat buffers, fixed from here on).

    ``stamp()`` after every write of the owner's; ``written()`` says whether anybody wrote since;
    ``check_unedited`` and ``check_still_views`` raise a ``RuntimeError`` that says what went wrong.
    """

    def __init__(self, params: Sequence[Tensor]):
        self.params = list(params)
        self._pointers = [p.data_ptr() for p in self.params]
        self._stamps: list[tuple[int, int]] = []  # (version, data pointer) of each weight at the last stamp()

    def _current(self) -> list[tuple[int, int]]:
        return [(p._version, p.data_ptr()) for p in self.params]

    def stamp(self) -> None:
        """Remember every weight as it is now: the owner has just written it."""
        self._stamps = self._current()

    def written(self) -> bool:
        """Whether a weight was written (or never stamped) since the last :meth:`stamp`."""
        return not self._stamps or self._stamps != self._current()

    def moved(self) -> bool:
        """Whether a weight no longer lives in the storage it had when the guard was built."""
        return any(p.data_ptr() != ptr for p, ptr in zip(self.params, self._pointers))

    def check_still_views(self) -> None:
        """Raise if a weight no longer lives in the storage it had when the guard was built."""
        moved = [i for i, (p, ptr) in enumerate(zip(self.params, self._pointers)) if p.data_ptr() != ptr]
        if moved:
            first = self.params[moved[0]]
            raise RuntimeError(
                f"IVON: {len(moved)} of its {len(self.params)} parameters (the first has shape {tuple(first.shape)}, "
                f"on {first.device}) were moved or given new storage (.to(), .cuda(), p.data = ...) after the "
                "optimizer was built. Move the model before building the optimizer."
            )

    @torch.no_grad()
    def check_unedited(self, expected: Callable[[], list[Tensor]]) -> None:
        """Raise if a weight was written since the last stamp and now holds something other than
        ``expected()`` (what the owner wrote, one tensor a weight; built only when a counter moved).

        Values are compared (one host synchronisation) only for weights whose counter moved, e.g. after a
        broadcast of equal values, which is then no edit.
        """
        moved = {i for i, (p, stamp) in enumerate(zip(self.params, self._stamps)) if (p._version, p.data_ptr()) != stamp}
        if not moved:
            return
        wanted = expected()
        edited = [i for i in sorted(moved)
                  if self.params[i].device != wanted[i].device or self.params[i].dtype != wanted[i].dtype
                  or not torch.equal(self.params[i], wanted[i])]
        if not edited:
            self.stamp()
            return
        first = self.params[edited[0]]
        raise RuntimeError(
            f"IVON: {len(edited)} of its {len(self.params)} parameters (the first has shape {tuple(first.shape)}, "
            f"{first.dtype} on {first.device}) were written after IVON put a posterior sample into them, e.g. by "
            "load_state_dict, set_peft_model_state_dict, copy_ or .to() after the optimizer was built. IVON keeps "
            "the posterior mean itself and would overwrite them. Move the model and load weights before building "
            "the optimizer, or write them inside `with opt.mean_params():`, where the weights hold the mean and "
            "what you write becomes the new mean."
        )

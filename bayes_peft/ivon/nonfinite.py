"""What IVON does with a NaN/inf gradient: skip the step on the device, and report it at the host's pace.

A step whose gradient holds NaN or inf keeps every group's mean, momentum and Hessian (``torch.where`` in
:func:`~bayes_peft.ivon.rules.update_group_`) and adds one to a counter that stays on the device, so that an
ordinary step needs no host synchronisation. :class:`SkippedSteps` keeps that counter and the policy that
reads it: ``"raise"`` reads it every ``check_every`` steps (one synchronisation) and raises
``FloatingPointError`` for the steps skipped since the last read; ``"skip"`` never raises.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["POLICIES", "SkippedSteps"]

POLICIES = ("raise", "skip")


class SkippedSteps:
    """The device's count of skipped steps, and how many of them were reported already."""

    def __init__(self, policy: str, check_every: int, device: torch.device):
        if policy not in POLICIES:
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {policy!r}")
        if int(check_every) < 1:
            raise ValueError(f"nonfinite_check_every must be a positive number of steps, got {check_every}")
        self.policy, self.check_every = policy, int(check_every)
        self.count = torch.zeros((), dtype=torch.int64, device=device)  # on the device: no sync
        self.reported = 0

    def add(self, finite: Tensor) -> None:
        """Count one step as skipped where ``finite`` (a 0-d bool on the counter's device) is false."""
        self.count.add_(finite.logical_not())

    def total(self) -> int:
        """Steps skipped so far (one host synchronisation)."""
        return int(self.count)

    def due(self, step: int) -> bool:
        """Whether the ``"raise"`` policy reads the count after ``step``."""
        return self.policy == "raise" and step % self.check_every == 0

    def unreported(self) -> int:
        """Steps skipped since the last call (one host synchronisation); from here on they count as reported."""
        total = self.total()
        new, self.reported = total - self.reported, total
        return new

    @staticmethod
    def error(new: int, step: int) -> FloatingPointError:
        """What ``"raise"`` raises for ``new`` skipped steps, the last before ``step``."""
        return FloatingPointError(
            f"IVON: the gradient held NaN or inf in {new} step(s) up to step {step}. Those steps were skipped: the "
            "mean, momentum and Hessian are unchanged, and the weights hold the mean (call opt.resample() to go on "
            "training). Pass nonfinite='skip' to skip such steps silently."
        )

    def state(self) -> tuple[int, int]:
        """(skipped so far, reported so far), for a checkpoint."""
        return self.total(), self.reported

    def load_state(self, saved: tuple[int, int]) -> None:
        """Put :meth:`state` back."""
        total, self.reported = saved
        self.count.fill_(total)

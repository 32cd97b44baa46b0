"""IVON, the optimizer that replaces AdamW and keeps a diagonal Gaussian posterior while it trains.

- :mod:`.optimizer`: :class:`IVON`, the thin class that holds the state;
- :mod:`.rules`: the update maths as pure functions (tested against ivon-opt);
- :mod:`.weights`: what the weights hold, the mean or a sample, in one flat buffer (:mod:`.flat`) and
  restored on any exit (:mod:`.guard`);
- :mod:`.state`: what an exact resume needs beyond ivon-opt's ``state_dict``;
- :mod:`.binding`: the parameters it accepts, their noise's generator, and following them when accelerate
  replaces them before the first step.
"""

from .optimizer import IVON

__all__ = ["IVON"]

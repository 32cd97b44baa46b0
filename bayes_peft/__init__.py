"""bayes_peft: Bayesian LoRA fine-tuning of language models.

The public names are imported lazily: ``import bayes_peft`` stays cheap, and torch, transformers and
peft are loaded only when a name that needs them is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {
    "IVON": "bayes_peft.ivon",
    "load_model": "bayes_peft.models",
    "load_task": "bayes_peft.task_data",
    "Task": "bayes_peft.tasks",
    "PosteriorLoRA": "bayes_peft.posterior",
    "Evaluator": "bayes_peft.evaluate",
    "Metrics": "bayes_peft.metrics",
}
_SUBMODULES = {"metrics", "tasks", "task_data", "models", "gaussian", "profiling", "posterior", "evaluate", "training",
               "laplace", "integrations", "uncertainty", "calibration", "config", "runs", "methods", "experiment",
               "benchmarking", "swag", "ensemble", "corruption"}

__all__ = sorted(_PUBLIC)

if TYPE_CHECKING:  # pragma: no cover
    from bayes_peft.evaluate import Evaluator
    from bayes_peft.ivon import IVON
    from bayes_peft.metrics import Metrics
    from bayes_peft.models import load_model
    from bayes_peft.posterior import PosteriorLoRA
    from bayes_peft.task_data import load_task
    from bayes_peft.tasks import Task


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"bayes_peft.{name}")
    raise AttributeError(f"module 'bayes_peft' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC) | _SUBMODULES)

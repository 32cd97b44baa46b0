"""Ensembles of LoRA weights: the last checkpoints of one run, or runs from different seeds.

An :class:`Ensemble` holds M sets of LoRA weights for one model. Its predictive is the average of the
members' probabilities (never of their logits or weights: members from different initialisations are not
close in weight space). The evaluator's ``"sample"`` mode visits each member once, whatever ``n_samples``
says, so that ``Evaluator(model, ensemble).predict(loader, "sample")`` is exactly that average.

- **Checkpoint ensemble** (Laplace-LoRA's baseline): :class:`EpochSnapshots` watches a training run and
  keeps the weights at the end of its last M epochs; ``snapshots.ensemble()``.
- **LoRA ensemble** (Wang et al. 2023, LoRA ensembles): M runs that differ in their LoRA initialisation,
  dropout and data order; :meth:`Ensemble.from_models` or :meth:`Checkpoint.lora_ensemble
  <bayes_peft.experiments.runs.Checkpoint.lora_ensemble>`.

τ does not apply to an ensemble: every member counts once at any τ.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import deque
from pathlib import Path
from typing import Iterator, Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from .. import sharding
from .gaussian import PosteriorFileError, _trainable_by_name as _trainable, swapped_weights

__all__ = ["Ensemble", "EpochSnapshots", "ENSEMBLE_FILE", "trainable_weights"]

ENSEMBLE_FILE = "ensemble.safetensors"
_CONFIG_FILE = "ensemble.json"
_FORMAT_VERSION = 1


def trainable_weights(model: nn.Module) -> dict[str, Tensor]:
    """The model's trainable weights (its LoRA), name → a detached copy (whole: gathered under FSDP2)."""
    return {n: sharding.full(p).detach().clone() for n, p in _trainable(model).items()}


class Ensemble:
    """M sets of LoRA weights (each name → tensor, the model's trainable parameters) for ``model``.

    ``member(i)`` is a context in which the model holds member i; ``draws()`` visits each member once (what
    the evaluator's sample mode averages over). ``kind`` names where the members came from
    (``"checkpoint"`` or ``"lora"``) in saved files and tables.
    """

    def __init__(self, model: nn.Module, members: Sequence[Mapping[str, Tensor]], kind: str = "lora"):
        params = _trainable(model)
        if not members:
            raise ValueError("an ensemble needs at least one member")
        for i, weights in enumerate(members):
            if set(weights) != set(params):
                other = sorted(set(weights) ^ set(params))
                raise ValueError(f"member {i} does not hold the model's trainable weights (differs at {other[:3]})")
            for name, value in weights.items():
                if value.shape != params[name].shape:
                    raise ValueError(f"member {i}: {name} has shape {tuple(value.shape)}, the model "
                                     f"{tuple(params[name].shape)}")
        self.model = model
        self.kind = kind
        self.members = [{n: w.detach().to(params[n].device, params[n].dtype).clone() for n, w in m.items()}
                        for m in members]

    def __len__(self) -> int:
        return len(self.members)

    @classmethod
    def from_models(cls, model: nn.Module, others: Sequence[nn.Module], kind: str = "lora") -> "Ensemble":
        """``model``'s own trained weights and those of ``others`` (the same LoRA shapes), in that order."""
        return cls(model, [trainable_weights(m) for m in (model, *others)], kind)

    def to(self, device: Union[str, torch.device]) -> "Ensemble":
        """Move the members (in place) to ``device``; returns ``self``."""
        self.members = [{n: w.to(device) for n, w in m.items()} for m in self.members]
        return self

    def member(self, index: int) -> contextlib.AbstractContextManager:
        """A context in which the model holds member ``index``; the previous weights come back after it."""
        return swapped_weights(_trainable(self.model), self.members[index])

    def mean(self) -> contextlib.AbstractContextManager:
        raise ValueError("an ensemble has no single weights to predict at: its predictive averages the members' "
                         "probabilities (the evaluator's method='sample')")

    def draws(self) -> Iterator[contextlib.AbstractContextManager]:
        """Every member once, in order: what the evaluator's sample mode averages over."""
        return (self.member(i) for i in range(len(self)))

    # -- persistence -----------------------------------------------------------------------------------

    def save(self, directory: Union[str, os.PathLike]) -> Path:
        """Write ``ensemble.safetensors`` and ``ensemble.json`` into ``directory``; returns it."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"{i}.{n}": w.detach().cpu().contiguous() for i, m in enumerate(self.members) for n, w in m.items()}
        save_file(tensors, str(directory / ENSEMBLE_FILE))
        (directory / _CONFIG_FILE).write_text(json.dumps(
            {"format_version": _FORMAT_VERSION, "kind": self.kind, "size": len(self), "names": list(self.members[0])}))
        return directory

    @classmethod
    def load(cls, directory: Union[str, os.PathLike], model: nn.Module) -> "Ensemble":
        """An ensemble written by :meth:`save`, for ``model`` (the same LoRA shapes)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        try:
            config = json.loads((directory / _CONFIG_FILE).read_text())
            tensors = load_file(str(directory / ENSEMBLE_FILE))
        except FileNotFoundError as error:
            raise PosteriorFileError(f"{directory} holds no saved ensemble ({error.filename} is missing)") from None
        except Exception as error:  # bad JSON, or safetensors' own report of a truncated file
            raise PosteriorFileError(f"{directory}: the saved ensemble is corrupt ({error})") from None
        if config.get("format_version") != _FORMAT_VERSION:
            raise PosteriorFileError(f"{directory}: ensemble format {config.get('format_version')}, this bayes_peft "
                                     f"reads {_FORMAT_VERSION}")
        try:
            members = [{n: tensors[f"{i}.{n}"] for n in config["names"]} for i in range(config["size"])]
        except KeyError as error:
            raise PosteriorFileError(f"{directory}: the saved ensemble lacks {error}") from None
        return cls(model, members, config["kind"])


class EpochSnapshots:
    """A training observer (``train(observers=[...])``) that keeps the trainable weights at the end of the
    last ``keep`` epochs: every ``every`` steps (the steps of one epoch), the oldest falling out.

    ``ensemble()`` is the checkpoint ensemble of what it kept; ``state_dict``/``load_state_dict`` resume a run.
    """

    def __init__(self, model: nn.Module, every: int, keep: int):
        if every < 1 or keep < 1:
            raise ValueError(f"need every ≥ 1 and keep ≥ 1, got {every} and {keep}")
        self.model, self.every, self.keep = model, every, keep
        self.params = _trainable(model)
        self.steps = 0
        self.kept: deque[tuple[int, dict[str, Tensor]]] = deque(maxlen=keep)

    def step(self) -> bool:
        """Count one optimizer step and keep the weights at an epoch's end; whether it kept them."""
        self.steps += 1
        if self.steps % self.every:
            return False
        self.kept.append((self.steps, trainable_weights(self.model)))
        return True

    def keep_if_none(self) -> None:
        """At the end of a run shorter than an epoch: keep its last weights, so that its ensemble is that one
        iterate (the AdamW weights), as SWAG keeps the last iterate of a run shorter than its start."""
        if not self.kept:
            self.kept.append((self.steps, trainable_weights(self.model)))

    def ensemble(self) -> Ensemble:
        """The checkpoint ensemble of the kept snapshots, oldest first."""
        if not self.kept:
            raise ValueError(f"no epoch ended yet ({self.steps} steps of {self.every}): nothing to ensemble")
        return Ensemble(self.model, [weights for _, weights in self.kept], kind="checkpoint")

    def state_dict(self) -> dict:
        return {"steps": self.steps, "kept": [(s, {n: w.clone() for n, w in m.items()}) for s, m in self.kept],
                "settings": {"every": self.every, "keep": self.keep}}

    def load_state_dict(self, state: dict) -> None:
        if state["settings"] != {"every": self.every, "keep": self.keep}:
            raise ValueError(f"the saved snapshots had {state['settings']}, these every={self.every}, keep={self.keep}")
        self.steps = int(state["steps"])
        self.kept.clear()
        self.kept.extend((int(s), {n: w.to(self.params[n].device) for n, w in m.items()}) for s, m in state["kept"])

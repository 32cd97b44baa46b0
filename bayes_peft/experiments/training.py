"""A minimal LoRA training loop over a task, the same for AdamW and IVON (the drop-in contract).

With ``checkpoint=path`` the loop saves everything an exact resume needs every ``save_every`` steps, as one
file written to a temporary name and renamed: an interrupted run (Ctrl-C, a crash) leaves the last good
checkpoint in place, and calling ``train`` again with the same arguments continues from it.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch

from ..data.tasks import Task

__all__ = ["train", "make_optimizer", "cycle", "CheckpointError"]


class CheckpointError(ValueError):
    """A training checkpoint that cannot be read or does not fit the model and optimizer."""


def cycle(loader: Iterable[dict]) -> Iterator[dict]:
    """Batches of ``loader`` forever, one epoch after another (a shuffled loader reshuffles each epoch)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the loader yielded no batches")


def make_optimizer(name: str, model, lr: float, seed: int = 0, **ivon_kwargs) -> torch.optim.Optimizer:
    """``"adamw"`` or ``"ivon"`` over the model's trainable parameters; IVON's noise is seeded with ``seed``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if name == "ivon":
        from ..ivon.optimizer import IVON

        return IVON(params, lr=lr, generator=torch.Generator().manual_seed(seed), **ivon_kwargs)
    raise ValueError(f"optimizer must be 'adamw' or 'ivon', got {name!r}")


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path: Union[str, os.PathLike], model, optimizer, scheduler, step: int, losses: list[float],
                    observers: Sequence = ()) -> None:
    """Everything an exact resume needs, in one file, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "losses": losses, "weights": {n: p.detach().cpu() for n, p in _trainable(model).items()},
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
             "torch_rng": torch.get_rng_state(), "observers": [o.state_dict() for o in observers]}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Union[str, os.PathLike], model, optimizer, scheduler,
                    observers: Sequence = ()) -> tuple[int, list[float]]:
    """Restore :func:`save_checkpoint`'s file into ``model``, ``optimizer``, ``scheduler`` and ``observers``;
    (step, losses)."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # a truncated zip or a foreign file
        raise CheckpointError(f"{path} is not a readable training checkpoint ({error})") from None
    params = _trainable(model)
    if set(state["weights"]) != set(params):
        raise CheckpointError(f"{path} holds weights for other parameters than this model's trainable ones")
    for name, value in state["weights"].items():
        if value.shape != params[name].shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(value.shape)}, the model {tuple(params[name].shape)}")
    with torch.no_grad():
        for name, value in state["weights"].items():
            params[name].copy_(value)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"{path}: the optimizer state does not fit this optimizer ({error})") from None
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    saved = state.get("observers", [])
    if len(saved) != len(observers):
        raise CheckpointError(f"{path} holds the state of {len(saved)} step observers, this run has {len(observers)}")
    for observer, observed in zip(observers, saved):
        observer.load_state_dict(observed)
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"]), list(state["losses"])


def train(model, task: Task, loader: Iterable[dict], optimizer: torch.optim.Optimizer, steps: int,
          scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None, progress: bool = True,
          desc: str = "training", checkpoint: Union[str, os.PathLike, None] = None,
          save_every: int = 50, observers: Sequence = ()) -> list[float]:
    """Run ``steps`` optimizer steps of ``task.loss`` in the plain PyTorch loop; returns the losses.

    Dropout stays on (train mode) as in the seeds' recipes. With IVON the loop is unchanged; afterwards the
    model holds a posterior sample, so evaluate inside ``optimizer.mean_params()`` or via a posterior.
    With ``checkpoint``, a file there is resumed from (its batches are skipped, so the data order is
    that of an uninterrupted run) and the state is saved every ``save_every`` steps and at the end.
    ``observers`` watch the iterates (a :class:`~bayes_peft.posteriors.swag.SWAGCollector`): each one's ``step()`` is
    called after every optimizer step, and its ``state_dict()`` goes into the checkpoint.
    """
    from tqdm.auto import tqdm

    device = next(p for p in model.parameters() if p.requires_grad).device
    start, losses = 0, []
    if checkpoint is not None and Path(checkpoint).exists():
        start, losses = load_checkpoint(checkpoint, model, optimizer, scheduler, observers)
        if start > steps:
            raise CheckpointError(f"{checkpoint} holds a run at step {start}, beyond the {steps} steps asked for")
    model.train()
    batches = itertools.islice(cycle(loader), start, steps)
    bar = tqdm(batches, initial=start, total=steps, desc=desc, unit="step", disable=not progress)
    for step, batch in enumerate(bar, start=start + 1):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        loss = task.loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
        for observer in observers:
            observer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if checkpoint is not None and (step % save_every == 0 or step == steps):
            save_checkpoint(checkpoint, model, optimizer, scheduler, step, losses, observers)
    return losses

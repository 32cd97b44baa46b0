"""A minimal LoRA training loop over a task, the same for AdamW and IVON (the drop-in contract)."""

from __future__ import annotations

import itertools
from typing import Iterable, Iterator, Optional

import torch

from .tasks import Task

__all__ = ["train", "make_optimizer", "cycle"]


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
        from .ivon import IVON

        return IVON(params, lr=lr, generator=torch.Generator().manual_seed(seed), **ivon_kwargs)
    raise ValueError(f"optimizer must be 'adamw' or 'ivon', got {name!r}")


def train(model, task: Task, loader: Iterable[dict], optimizer: torch.optim.Optimizer, steps: int,
          scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None, progress: bool = True,
          desc: str = "training") -> list[float]:
    """Run ``steps`` optimizer steps of ``task.loss`` in the plain PyTorch loop; returns the losses.

    Dropout stays on (train mode) as in the seeds' recipes. With IVON the loop is unchanged; afterwards the
    model holds a posterior sample, so evaluate inside ``optimizer.mean_params()`` or via a posterior.
    """
    from tqdm.auto import tqdm

    device = next(p for p in model.parameters() if p.requires_grad).device
    model.train()
    losses = []
    bar = tqdm(itertools.islice(cycle(loader), steps), total=steps, desc=desc, unit="step", disable=not progress)
    for batch in bar:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        loss = task.loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses

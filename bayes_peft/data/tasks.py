"""Classification tasks for a causal LM: examples, choice tokens, batches and the loss.

A task holds :class:`Example` s (a prompt and a label index). The classifier is the LM's last-position
logits restricted to the tokens of the label words, the *choice tokens*. Batches carry those token ids, so
:meth:`Task.loss` and :func:`choice_logits` need only the model and the batch.

Where the examples come from (the seeds' prompts on data shipped offline, a user's files, the hub) is
:mod:`bayes_peft.data.sources`.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["Example", "Task", "choice_token_ids", "choice_logits"]


@dataclass(frozen=True)
class Example:
    """A prompt split around its one truncatable span: ``prompt = prefix + passage + suffix``.

    Only ``passage`` is shortened when a prompt is too long, so the instruction before it and the answer
    cue after it survive.
    """

    prefix: str
    passage: str
    suffix: str
    label: int

    @property
    def prompt(self) -> str:
        return self.prefix + self.passage + self.suffix


# ----------------------------------------------------------------------------------------------------
# Choice tokens


def choice_token_ids(tokenizer, labels: Sequence[str], context: str = "Answer:") -> list[int]:
    """The token id of each label word as it follows a prompt that ends in ``context``.

    A label is written as it follows the prompt: ``" A"`` with a leading space, ``"A"`` without. Its id is
    what the tokenizer appends to ``context`` when the label follows it, found by tokenising both with the
    tokenizer's own special tokens. That works for byte-level BPE (where ``" A"`` is one token), for
    SentencePiece (where the space becomes ``▁``) and with or without a BOS token.

    Raises:
        ValueError: a label that is several tokens, or not in the vocabulary, or two labels with one id.
    """
    base = tokenizer(context)["input_ids"]
    ids = []
    for label in labels:
        full = tokenizer(context + label)["input_ids"]
        # A tokenizer that appends EOS appends it to both; drop it before comparing.
        if tokenizer.eos_token_id is not None and base and base[-1] == tokenizer.eos_token_id:
            full, ctx = full[:-1], base[:-1]
        else:
            ctx = base
        added = full[len(ctx):] if full[: len(ctx)] == ctx else None
        if added is not None and tokenizer.unk_token_id is not None and tokenizer.unk_token_id in added:
            raise ValueError(f"label {label!r} is not in the tokenizer's vocabulary (it maps to the unknown token)")
        if added is None or len(added) != 1:
            pieces = tokenizer.convert_ids_to_tokens(tokenizer(label, add_special_tokens=False)["input_ids"])
            raise ValueError(
                f"label {label!r} is not one token after {context!r} for this tokenizer (it splits into "
                f"{pieces}); a label must be one token"
            )
        ids.append(added[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"labels {list(labels)} share a token id: {ids}")
    return ids


def choice_logits(model, batch: Mapping[str, Tensor]) -> Tensor:
    """``[B, C]`` logits of the choice tokens at the last position (left padding puts it at -1)."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch.get("position_ids"),
        logits_to_keep=1,
    )
    return out.logits[:, -1, :].index_select(-1, batch["choice_ids"].to(out.logits.device))


# ----------------------------------------------------------------------------------------------------
# Tokenisation with passage truncation


def _fit(tokenizer, example: Example, max_length: int) -> list[int]:
    """Token ids of the prompt, at most ``max_length``, shortening the passage's end first."""
    ids = tokenizer(example.prompt)["input_ids"]
    passage = example.passage
    while len(ids) > max_length and passage:
        n_passage = max(len(tokenizer(passage, add_special_tokens=False)["input_ids"]), 1)
        keep_fraction = max(n_passage - (len(ids) - max_length), 0) / n_passage
        cut = min(int(len(passage) * keep_fraction), len(passage) - 1)  # always shrinks, so it ends
        passage = passage[:cut].rstrip()
        ids = tokenizer(example.prefix + passage + example.suffix)["input_ids"]
    if len(ids) > max_length:
        # Even without its passage the prompt is too long: keep BOS and the end, which holds the cue.
        bos = tokenizer.bos_token_id
        head = ids[:1] if bos is not None and ids[0] == bos else []
        ids = head + ids[len(ids) - (max_length - len(head)):]
    return ids


def left_pad(rows: list[list[int]], pad_id: int) -> dict[str, Tensor]:
    """Rows of token ids padded on the left with ``pad_id``: ``input_ids``, ``attention_mask`` and ``position_ids``."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    # Positions count real tokens only, so a prompt's logits do not depend on the padding of its batch.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}


# ----------------------------------------------------------------------------------------------------
# Tasks


@dataclass
class Task:
    """A multiple-choice classification task: label words and the train/validation/test examples.

    ``labels`` are written as they follow the prompt (``" A"``, ``" True"``). ``context`` is the text that
    ends a prompt, used to find the choice tokens (see :func:`choice_token_ids`). ``labelled`` is False for
    out-of-distribution inputs whose labels are placeholders (:meth:`with_passages`).
    """

    name: str
    labels: list[str]
    train: list[Example]
    test: list[Example]
    validation: list[Example] = field(default_factory=list)
    max_length: int = 256
    context: str = "Answer:"
    labelled: bool = True

    def __post_init__(self):
        if len(self.labels) < 2:
            raise ValueError(f"task {self.name!r} needs at least two labels to choose between, got {self.labels!r}")

    @property
    def num_choices(self) -> int:
        return len(self.labels)

    def majority_rate(self, split: str = "test") -> float:
        """The accuracy of always predicting the most frequent label of ``split``."""
        examples = self._split(split)
        counts = [0] * self.num_choices
        for e in examples:
            counts[e.label] += 1
        return max(counts) / len(examples)

    def subset(self, n_train: Optional[int] = None, n_test: Optional[int] = None, seed: Optional[int] = None) -> "Task":
        """A copy with at most ``n_train`` training and ``n_test`` test examples: the first ones, or a
        random draw with ``seed`` (for test files sorted by topic or label)."""

        def take(examples: list[Example], n: Optional[int]) -> list[Example]:
            if n is None or n >= len(examples):
                return list(examples)
            return examples[:n] if seed is None else random.Random(seed).sample(examples, n)

        return dataclasses.replace(self, train=take(self.train, n_train), test=take(self.test, n_test))

    def sorted_for_evaluation(self) -> "Task":
        """A copy whose validation and test examples are ordered by prompt length, so that evaluation batches
        hold prompts of similar length and little padding is computed (on SST-2 with batches of 16, 39% fewer
        tokens). Predictions then follow the new order; metrics do not depend on it."""
        def by_length(examples: list[Example]) -> list[Example]:
            return sorted(examples, key=lambda e: len(e.prompt))

        return dataclasses.replace(self, validation=by_length(self.validation), test=by_length(self.test))

    def with_passages(self, texts: Sequence[str], name: str) -> "Task":
        """A task of out-of-distribution inputs in this task's prompt: test example i is test example
        i mod n of this task with ``texts[i]`` as its passage (its label is a placeholder, 0).

        For SST-2 that is ``"Review: {text} Sentiment:"``: what the model sees when a user sends it text
        from another domain. Only uncertainty scores of such a task mean anything, never its accuracy.
        """
        if not texts:
            raise ValueError("no texts to put in the prompt")
        hosts = itertools.cycle(self._split("test"))
        test = [Example(host.prefix, text, host.suffix, 0) for text, host in zip(texts, hosts)]
        return dataclasses.replace(self, name=name, train=[], validation=[], test=test, labelled=False)

    def collate(self, tokenizer) -> Callable[[list[Example]], dict]:
        """A ``collate_fn``: tokenise, shorten passages to ``max_length``, pad on the left, add choice ids."""
        choices = torch.tensor(choice_token_ids(tokenizer, self.labels, self.context))
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token to pad with")

        def collate(examples: list[Example]) -> dict:
            batch = left_pad([_fit(tokenizer, e, self.max_length) for e in examples], pad_id)
            batch["labels"] = torch.tensor([e.label for e in examples])
            batch["choice_ids"] = choices
            return batch

        return collate

    def loader(self, tokenizer, split: str = "train", batch_size: int = 8, shuffle: Optional[bool] = None,
               seed: int = 0, shard: Optional[tuple[int, int]] = None) -> torch.utils.data.DataLoader:
        """A ``DataLoader`` over one split; the training split is shuffled by default, with ``seed``.

        ``shard=(rank, world)`` keeps examples ``rank, rank + world, …``: uneven shards, never padded with
        repeats, which :class:`~bayes_peft.Evaluator` gathers back into the original order.
        """
        examples = self._split(split)
        if shard is not None:
            rank, world = shard
            if not 0 <= rank < world:
                raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
            examples = examples[rank::world]
        return torch.utils.data.DataLoader(
            examples,
            batch_size=batch_size,
            shuffle=(split == "train") if shuffle is None else shuffle,
            collate_fn=self.collate(tokenizer),
            generator=torch.Generator().manual_seed(seed),
        )

    def loss(self, model, batch: Mapping[str, Tensor]) -> Tensor:
        """Mean cross-entropy over the choices."""
        logits = choice_logits(model, batch)
        return torch.nn.functional.cross_entropy(logits, batch["labels"].to(logits.device))

    def _split(self, split: str) -> list[Example]:
        if split not in ("train", "validation", "test"):
            raise ValueError(f"split must be 'train', 'validation' or 'test', got {split!r}")
        examples = getattr(self, split)
        if not examples:
            raise ValueError(f"task {self.name!r} has no {split!r} examples")
        return examples

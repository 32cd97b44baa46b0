"""The demo: IVON LoRA fine-tuning of the embedded SmolLM2 on real data, in a few minutes on a CPU.

It loads SmolLM2-135M-Instruct from its package, trains LoRA with :class:`bayes_peft.IVON` on SST-2
with label words, and reports test metrics before training, at the posterior mean, and averaged over
posterior samples.
"""

from __future__ import annotations

import time

import torch

from .evaluate import Evaluator
from .metrics import Metrics
from .models import load_model
from .posterior import PosteriorLoRA
from .tasks import load_task
from .training import make_optimizer, train


def run(steps: int = 60, batch_size: int = 8, n_samples: int = 4, lr: float = 0.03, ess: float = 1e6,
        clip_radius: float = 1e-2, seed: int = 0) -> dict[str, Metrics]:
    """Train and evaluate; returns the metrics by stage and prints a table."""
    torch.manual_seed(seed)
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    task = load_task("sst2", seed=seed)
    print(f"SmolLM2-135M-Instruct with LoRA, task {task.name}: {len(task.train)} train, {len(task.test)} test "
          f"(loaded in {time.perf_counter() - start:.0f} s)")
    test = task.loader(tokenizer, "test", batch_size=32)
    scores = {"zero-shot": Evaluator(model).evaluate(test)}

    opt = make_optimizer("ivon", model, lr=lr, seed=seed, ess=ess, hess_init=3e-4, clip_radius=clip_radius)
    train(model, task, task.loader(tokenizer, "train", batch_size, seed=seed), opt, steps, desc="IVON training")
    evaluator = Evaluator(model, PosteriorLoRA.from_ivon(model, opt), task)
    scores["IVON@mean"] = evaluator.evaluate(test, "mean")
    scores[f"IVON (S={n_samples})"] = evaluator.evaluate(test, "sample", n_samples=n_samples, seed=seed)

    print(f"\n{'model':<16}{'ACC':>8}{'NLL':>8}{'ECE':>8}{'Brier':>8}")
    for name, m in scores.items():
        print(f"{name:<16}{m.acc:>8.3f}{m.nll:>8.3f}{m.ece:>8.3f}{m.brier:>8.3f}")
    print(f"\nmajority class rate {task.majority_rate():.3f}; total {time.perf_counter() - start:.0f} s")
    return scores

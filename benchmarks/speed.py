"""Speed benchmarks. Each part prints ratios measured within one run, never against stored numbers.

Part ``optimizer``: IVON against AdamW per LoRA training step (forward, backward, step, zero_grad) on a
SmolLM2-135M LoRA model. The two runs alternate step by step on identical copies of the model and the
same batches, so drifts in machine load hit both alike; the medians and their ratio are printed.

    python benchmarks/speed.py optimizer --steps 30
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch

import bayes_peft as bp
from bayes_peft.models import load_model


def _timed_step(model, opt, batch) -> tuple[float, float]:
    """(whole step, optimizer part) in seconds."""
    t0 = time.perf_counter()
    loss = model(**batch).logits[:, -1].logsumexp(-1).mean()
    loss.backward()
    t1 = time.perf_counter()
    opt.step()
    opt.zero_grad()
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1


def optimizer_part(args) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    model_adamw, _ = load_model(args.model)
    model_ivon = copy.deepcopy(model_adamw)
    n_lora = sum(p.numel() for p in model_ivon.parameters() if p.requires_grad)
    opts = {
        "AdamW": torch.optim.AdamW(model_adamw.parameters(), lr=5e-5),
        "IVON": bp.IVON(model_ivon.parameters(), lr=0.03, ess=1e7, hess_init=3e-4),
    }
    models = {"AdamW": model_adamw, "IVON": model_ivon}
    vocab = model_adamw.config.vocab_size
    times = {name: ([], []) for name in opts}
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, vocab, (args.batch, args.seq_len))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "logits_to_keep": 1}
        order = ("AdamW", "IVON") if step % 2 == 0 else ("IVON", "AdamW")
        for name in order:
            whole, opt_part = _timed_step(models[name], opts[name], batch)
            if step >= args.warmup:
                times[name][0].append(whole)
                times[name][1].append(opt_part)
    med = {name: (statistics.median(w), statistics.median(o)) for name, (w, o) in times.items()}
    print(f"model {args.model} + LoRA ({n_lora:,} trainable), batch {args.batch}x{args.seq_len}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    print(f"{'':8}{'step median (s)':>18}{'optimizer part (ms)':>22}")
    for name, (whole, opt_part) in med.items():
        print(f"{name:8}{whole:>18.3f}{opt_part * 1e3:>22.2f}")
    print(f"IVON / AdamW per-step wall-time ratio: {med['IVON'][0] / med['AdamW'][0]:.3f}")
    print(f"IVON - AdamW optimizer part: {(med['IVON'][1] - med['AdamW'][1]) * 1e3:+.2f} ms per step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    opt = sub.add_parser("optimizer", help="IVON vs AdamW per training step")
    opt.add_argument("--model", default="smollm2-135m")
    opt.add_argument("--steps", type=int, default=30, help="timed steps per optimizer (>= 20)")
    opt.add_argument("--warmup", type=int, default=3)
    opt.add_argument("--batch", type=int, default=8)
    opt.add_argument("--seq-len", type=int, default=64)
    opt.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.part == "optimizer":
        if args.steps < 20:
            parser.error("--steps must be at least 20")
        optimizer_part(args)


if __name__ == "__main__":
    main()

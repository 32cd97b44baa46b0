"""Speed benchmarks. Each part prints ratios measured within one run, never against stored numbers.

Part ``optimizer``: IVON, and AdamW with a SWAG collection after every step, against AdamW (foreach) per
LoRA training step (forward, backward, step, zero_grad) on a SmolLM2-135M LoRA model (120 LoRA tensors).
The runs alternate step by step on identical copies of the model and the same batches, so drifts in machine
load hit all alike; the medians and their ratios are printed, for the whole step and for the optimizer's
part alone, with the ops each optimizer step dispatches.

    python benchmarks/speed.py optimizer --steps 30

Part ``laplace``: the Laplace fit (exact and MC Fisher) against one training epoch (forward + backward)
over the same batches, its extra peak memory, and bayesian-lora 0.0.6's fit time beside them. The fit
back-propagates the whole prompts once per Fisher direction (C − 1 for the exact Fisher, 1 for MC).

    python benchmarks/speed.py laplace --task sst2     # two choices
    python benchmarks/speed.py laplace --task obqa     # four choices

Part ``evaluator``: the evaluator's sample (S passes) and linearized (one forward, C − 1 backward
directions) predictives against its mean pass, on the same test batches, for two choices (SST-2) and for
five (SST-2 sentences under the five labels " A" … " E": the cost depends on C, not on the labels' sense).

    python benchmarks/speed.py evaluator --n-examples 64
"""

from __future__ import annotations

import argparse
import os
import copy
import platform
import statistics
import time

import torch

import bayes_peft as bp
from bayes_peft.config import IVON_RECIPE
from bayes_peft.models import load_model
from bayes_peft.profiling import dispatched_ops, median_times_in_turns
from bayes_peft.posteriors.swag import SWAGCollector


def _timed_step(model, opt, batch, after_step=None) -> tuple[float, float]:
    """(whole step, optimizer part and ``after_step()``) in seconds."""
    t0 = time.perf_counter()
    loss = model(**batch).logits[:, -1].logsumexp(-1).mean()
    loss.backward()
    t1 = time.perf_counter()
    opt.step()
    opt.zero_grad()
    if after_step is not None:
        after_step()
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1


def optimizer_part(args) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    model_adamw, _ = load_model(args.model)
    model_ivon, model_swag = copy.deepcopy(model_adamw), copy.deepcopy(model_adamw)
    n_lora = sum(p.numel() for p in model_ivon.parameters() if p.requires_grad)
    opts = {
        "AdamW": torch.optim.AdamW(model_adamw.parameters(), lr=5e-5, foreach=True),
        "IVON": bp.IVON(model_ivon.parameters(), **IVON_RECIPE.kwargs()),
        "AdamW+SWAG": torch.optim.AdamW(model_swag.parameters(), lr=5e-5, foreach=True),
    }
    models = {"AdamW": model_adamw, "IVON": model_ivon, "AdamW+SWAG": model_swag}
    collector = SWAGCollector(model_swag, max_rank=5)  # collects after every step: the worst case
    vocab = model_adamw.config.vocab_size
    times = {name: ([], []) for name in opts}
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, vocab, (args.batch, args.seq_len))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "logits_to_keep": 1}
        order = list(opts) if step % 2 == 0 else list(reversed(opts))
        for name in order:
            whole, opt_part = _timed_step(models[name], opts[name], batch,
                                          collector.collect if name == "AdamW+SWAG" else None)
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
    print(f"AdamW with a SWAG collection after every step / AdamW per-step wall-time ratio: "
          f"{med['AdamW+SWAG'][0] / med['AdamW'][0]:.3f} (SWAG-LoRA collects once an epoch)")
    print(f"IVON - AdamW optimizer part: {(med['IVON'][1] - med['AdamW'][1]) * 1e3:+.2f} ms per step")
    print(f"IVON / AdamW optimizer part (step + zero_grad) ratio: {med['IVON'][1] / med['AdamW'][1]:.3f}")
    n_tensors = sum(1 for p in model_ivon.parameters() if p.requires_grad)
    ops = {name: _ops_per_step(models[name], opts[name], batch) for name in opts}
    print(f"ops dispatched by one optimizer step on {n_tensors} tensors: "
          + ", ".join(f"{name} {count}" for name, count in ops.items()))
    isolated_step_ratio([p for p in model_ivon.parameters() if p.requires_grad])


def isolated_step_ratio(like: list, steps: int = 200) -> None:
    """``opt.step()`` alone on copies of ``like`` with fixed gradients, the two optimizers alternating: the
    step without the forward and backward around it (whose memory traffic evicts the optimizer's state
    from the caches in a real loop)."""
    torch.manual_seed(0)
    params = {name: [torch.nn.Parameter(p.detach().clone()) for p in like] for name in ("AdamW", "IVON")}
    opts = {"AdamW": torch.optim.AdamW(params["AdamW"], lr=5e-5, foreach=True),
            "IVON": bp.IVON(params["IVON"], **IVON_RECIPE.kwargs())}
    for name in opts:
        for p in params[name]:
            p.grad = torch.randn_like(p) * 1e-3
    med = {name: 1e3 * t for name, t in median_times_in_turns(
        {name: opt.step for name, opt in opts.items()}, repeats=steps - steps // 10, warmup=steps // 10).items()}
    print(f"optimizer step alone on the same {len(like)} tensors, fixed gradients: AdamW(foreach) {med['AdamW']:.2f} ms, "
          f"IVON {med['IVON']:.2f} ms, ratio {med['IVON'] / med['AdamW']:.2f}")


def _ops_per_step(model, opt, batch) -> int:
    """aten ops dispatched by ``opt.step()`` (a GPU launches a kernel for each op that computes)."""
    model(**batch).logits[:, -1].logsumexp(-1).mean().backward()
    ops = dispatched_ops(opt.step)
    opt.zero_grad()
    return sum(ops.values())


class PeakRSS:
    """The process's peak resident memory above its level on entry, sampled every 5 ms (CPU runs)."""

    def __enter__(self):
        import threading

        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.extra_mib = (self.peak - self.start) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def laplace_part(args) -> None:
    """Fit time against one training epoch, extra memory, and bayesian-lora 0.0.6's fit time beside them."""
    from bayes_peft.laplace import accumulate_factors
    from bayes_peft.models import load_model
    from bayes_peft.data.sources import load_task
    from bayes_peft.data.tasks import choice_logits

    torch.manual_seed(0)
    # No LoRA dropout: bayesian-lora fits in train mode, so dropout would make the two fits differ.
    model, tokenizer = load_model(args.model, lora={"lora_dropout": 0.0})
    task = load_task(args.task).subset(n_train=args.n_examples, seed=0)
    loader = list(task.loader(tokenizer, "train", args.batch, shuffle=False))
    print(f"model {args.model} + LoRA, task {task.name} ({len(task.labels)} choices): {len(task.train)} examples "
          f"in batches of {args.batch}, "
          f"n_kfac {args.n_kfac}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")

    def epoch():
        model.train()
        for batch in loader:
            task.loss(model, batch).backward()
        model.zero_grad()

    epoch()  # warm-up
    timings = {}
    for label, run in (("one training epoch (forward + backward)", epoch),
                       ("bayes_peft fit, exact Fisher", lambda: accumulate_factors(model, loader, args.n_kfac,
                                                                                   progress=False)),
                       ("bayes_peft fit, MC Fisher", lambda: accumulate_factors(
                           model, loader, args.n_kfac, fisher="mc", generator=torch.Generator().manual_seed(0),
                           progress=False))):
        with PeakRSS() as memory:
            start = time.perf_counter()
            result = run()
            seconds = time.perf_counter() - start
        timings[label] = (seconds, memory.extra_mib, result)
    epoch_s = timings["one training epoch (forward + backward)"][0]
    for label, (seconds, extra, _) in timings.items():
        print(f"{label:<42} {seconds:7.1f} s  ratio to the epoch {seconds / epoch_s:5.2f}  extra peak RSS {extra:7.1f} MiB")

    try:
        from bayesian_lora import calculate_kronecker_factors
    except ImportError:
        print("bayesian-lora is not installed (pip install '.[bench]'): no side-by-side run")
        return
    threshold = model.peft_config["default"].r + 1  # every r × r factor full, every larger one low-rank, as ours
    with PeakRSS() as memory:
        start = time.perf_counter()
        calculate_kronecker_factors(model, lambda m, batch: choice_logits(m, batch), loader, n_kfac=args.n_kfac,
                                    lr_threshold=threshold, target_module_keywords=["lora"])
        their_s = time.perf_counter() - start
    # Its factors are a different approximation (last-token activations, a batch-mean loss): time only.
    print(f"{'bayesian-lora 0.0.6 (last-token factors)':<42} {their_s:7.1f} s  ratio to the epoch "
          f"{their_s / epoch_s:5.2f}  extra peak RSS {memory.extra_mib:7.1f} MiB")


def evaluator_part(args) -> None:
    """Seconds of each predictive over the same batches, and their ratios to the mean pass."""
    import dataclasses

    from bayes_peft.data.sources import load_task

    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    opt = bp.IVON(model.parameters(), **IVON_RECIPE.kwargs())
    posterior = bp.PosteriorLoRA.from_ivon(model, opt)  # a diagonal posterior: the evaluator's cost, not its fit
    sst2 = load_task("sst2").subset(n_test=args.n_examples, seed=0).sorted_for_evaluation()
    five = dataclasses.replace(sst2, name="five-choice", labels=[" A", " B", " C", " D", " E"],
                               test=[dataclasses.replace(e, label=i % 5) for i, e in enumerate(sst2.test)])
    print(f"model {args.model} + LoRA, {args.n_examples} test examples in batches of {args.batch}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    ev = bp.Evaluator(model, posterior, progress=False)
    for task in (sst2, five):
        batches = list(task.loader(tokenizer, "test", args.batch))
        ev.predict(batches[:1], "linearized")  # warm-up
        seconds = {}
        for method, kwargs in (("mean", {}), ("sample", {"n_samples": args.samples}), ("linearized", {})):
            start = time.perf_counter()
            ev.predict(batches, method, **kwargs)
            seconds[method] = time.perf_counter() - start
        c = len(task.labels)
        print(f"C = {c}: mean {seconds['mean']:.1f} s; sample S = {args.samples} {seconds['sample']:.1f} s, "
              f"{seconds['sample'] / seconds['mean']:.2f}× the mean; linearized {seconds['linearized']:.1f} s, "
              f"{seconds['linearized'] / seconds['mean']:.2f}× the mean (2C = {2 * c})")


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
    la = sub.add_parser("laplace", help="Laplace fit vs a training epoch, memory, and bayesian-lora 0.0.6")
    la.add_argument("--model", default="smollm2-135m")
    la.add_argument("--task", default="sst2")
    la.add_argument("--n-examples", type=int, default=128)
    la.add_argument("--batch", type=int, default=8)
    la.add_argument("--n-kfac", type=int, default=10)
    ev = sub.add_parser("evaluator", help="sample and linearized predictives against the mean pass, C = 2 and 5")
    ev.add_argument("--model", default="smollm2-135m")
    ev.add_argument("--n-examples", type=int, default=64)
    ev.add_argument("--batch", type=int, default=16)
    ev.add_argument("--samples", type=int, default=10)
    args = parser.parse_args()
    if args.part == "evaluator":
        evaluator_part(args)
    if args.part == "laplace":
        laplace_part(args)
    if args.part == "optimizer":
        if args.steps < 20:
            parser.error("--steps must be at least 20")
        optimizer_part(args)


if __name__ == "__main__":
    main()

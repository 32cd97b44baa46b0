"""GPU check and timings with a randomly initialised model of Llama-2-7B's shapes (no weights needed).

It checks that training, the evaluator (mean, sample, linearized) and the Laplace fit run on CUDA, that
it counts the host synchronisations of each mode by the code that caused them
(``torch.cuda.set_sync_debug_mode("warn")``), and prints the step time of IVON against AdamW, measured
alternately in one run, with peak memory.

    python benchmarks/gpu_check.py --layers 32 --batch 4 --seq-len 256
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
import warnings

import torch

from bayes_peft.config import IVONConfig
from bayes_peft.evaluate import Evaluator
from bayes_peft.ivon import IVON
from bayes_peft.laplace import fit_laplace
from bayes_peft.posterior import PosteriorLoRA
from bayes_peft.tasks import choice_logits


def llama_7b_shaped(layers: int):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        base = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)  # peft keeps the adapters in float32 over a bf16 base
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return model


def batches(n: int, batch: int, seq_len: int, n_choices: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 32000, (batch, seq_len), generator=g)
        out.append({"input_ids": ids.cuda(), "attention_mask": torch.ones_like(ids).cuda(),
                    "position_ids": torch.arange(seq_len).expand(batch, -1).cuda(),
                    "labels": torch.randint(0, n_choices, (batch,), generator=g).cuda(),
                    "choice_ids": torch.tensor([319, 350, 315, 360][:n_choices]).cuda()})
    return out


def _origin(filename: str) -> str:
    for package in ("bayes_peft", "transformers", "peft", "torch"):
        if f"/{package}/" in filename:
            return package
    return filename


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eval-batches", type=int, default=8)
    args = parser.parse_args()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, Llama-2-7B shapes with {args.layers} layers, "
          f"batch {args.batch}×{args.seq_len}")
    model = llama_7b_shaped(args.layers)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"LoRA parameters: {n_lora:,}; base parameters: {sum(p.numel() for p in model.parameters()) - n_lora:,}")
    train = batches(args.steps + 2, args.batch, args.seq_len, 2)
    lora_params = [p for p in model.parameters() if p.requires_grad]
    optimizers = {"AdamW": torch.optim.AdamW(lora_params, lr=5e-5),
                  "IVON": IVON(lora_params, **IVONConfig().kwargs(),
                               generator=torch.Generator(device="cuda").manual_seed(0))}

    def step(opt, batch):
        loss = torch.nn.functional.cross_entropy(choice_logits(model, batch).float(), batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad()

    times = {name: [] for name in optimizers}
    model.train()
    for i, batch in enumerate(train):  # alternate, so that drifts hit both alike; the first 2 are warm-up
        for name, opt in optimizers.items():
            t = timed(lambda: step(opt, batch))
            if i >= 2:
                times[name].append(t)
    adamw, ivon = (statistics.median(times[n]) for n in ("AdamW", "IVON"))
    print(f"training step (median of {args.steps}): AdamW {1e3 * adamw:.1f} ms, IVON {1e3 * ivon:.1f} ms, "
          f"ratio IVON/AdamW {ivon / adamw:.3f}; peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")

    posterior = PosteriorLoRA.from_ivon(model, optimizers["IVON"])
    test = batches(args.eval_batches, args.batch, args.seq_len, 2, seed=1)
    ev = Evaluator(model, posterior, progress=False)
    assert ev.device.type == "cuda"
    for method, kwargs in (("mean", {}), ("sample", {"n_samples": 10}), ("linearized", {})):
        torch.cuda.reset_peak_memory_stats()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                seconds = timed(lambda: ev.predict(test, method, **kwargs))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = collections.Counter(_origin(w.filename) for w in caught if "synchroniz" in str(w.message))
        metrics = ev.evaluate(test, method, **kwargs)
        n = args.eval_batches * args.batch
        print(f"evaluate {method:<10} {seconds:6.2f} s for {n} examples ({n / seconds:.1f} ex/s); "
              f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB; nll {metrics.nll:.3f}; "
              f"host syncs by origin: {dict(syncs) or 'none'}")

    torch.cuda.reset_peak_memory_stats()
    fitted = {}
    seconds = timed(lambda: fitted.setdefault("laplace", fit_laplace(model, test, n_kfac=10, progress=False)))
    laplace = fitted["laplace"]
    print(f"Laplace fit (n_kfac 10) on {args.eval_batches * args.batch} examples: {seconds:.2f} s, "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, λ {next(iter(laplace.prior_precision.values())):.3g}")
    metrics = Evaluator(model, laplace, progress=False).evaluate(test, "linearized")
    print(f"Laplace linearized on CUDA: {metrics}")


if __name__ == "__main__":
    main()

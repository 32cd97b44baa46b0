"""Every GPU criterion in one run, on Llama-2-7B's shapes with random weights, then a smoke run of the
paper preset through the run layer. One verdict line per criterion, the target beside the figure.

Criteria (ratios measured in turns within this run): the IVON optimizer step ÷ fused AdamW's (≤ 1.5);
host synchronisations per IVON step (0); the whole training step IVON ÷ AdamW (≤ 1.02); the Laplace fit
(MC Fisher, two choices) ÷ one training epoch over the same batches (≤ 1.5); sample S = 10 ÷ mean
evaluation (≤ 10.5); linearized ÷ mean (≤ 2C, for C = 2 and 4); and the peak memory of each. The smoke
run trains every registered method of the ``paper`` preset for 2 steps on an 8-bit random Llama-2-7B
configuration (``--smoke-layers`` of its 32 layers), fits, evaluates and scores a shifted set, on
synthetic letter-answer questions in the seeds' prompt; a second one runs every generation method of the
``generation_paper`` preset on synthetic NQ-Open rows: nothing comes from the hub. Then IVON over a model
spread between the GPU and the CPU (``device_map``'s layout), and the HF Trainer under accelerate's FSDP2 plugin.

The device machine has torch, transformers and peft; carry ivon-opt and bitsandbytes as wheels (43 MB):

    pip download --no-deps -d wheels ivon-opt==0.1.3 bitsandbytes==0.50.2          # here; wheels/ is ignored
    run(carry=["wheels"]): pip install --no-deps wheels/*.whl && PYTHONPATH=. python3 benchmarks/gpu_check.py

    python benchmarks/gpu_check.py --dry-run      # any CPU, in CI too: a tiny model through every line but CUDA's
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import tempfile
import traceback
import warnings
from pathlib import Path

import torch

import bayes_peft as bp
from bayes_peft.experiments.benchmarking import header
from bayes_peft.config import IVON_RECIPE, preset_config
from bayes_peft.experiments.compare import compare
from bayes_peft.laplace import fit_laplace
from bayes_peft.experiments.methods import METHODS
from bayes_peft.models import save_random_llama
from bayes_peft.profiling import dispatched_ops, median_times_in_turns
from bayes_peft.data.sources import load_task
from bayes_peft.data.tasks import choice_logits

LLAMA_2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                  vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4, vocab_size=512,
            max_position_embeddings=256)
CHOICES = [" A", " B", " C", " D"]


class Run:
    """The device, its clock and memory readings, and the verdict lines."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.sync = (lambda: None) if dry_run else torch.cuda.synchronize
        self.failed = 0

    def verdict(self, criterion: str, value: float, limit: float, fmt: str = ".3f") -> None:
        status = "dry-run" if self.dry_run else ("PASS" if value <= limit else "FAIL")
        self.failed += status == "FAIL"
        print(f"{status:<8}{criterion}: {value:{fmt}} (target ≤ {limit:g})", flush=True)

    def peak(self) -> str:
        return "n/a on a CPU" if self.dry_run else f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"

    def reset_peak(self) -> None:
        if not self.dry_run:
            torch.cuda.reset_peak_memory_stats()

    @contextlib.contextmanager
    def section(self, name: str):
        """A part whose exception becomes a FAIL line, so that one call reports on every part."""
        try:
            yield
        except Exception:  # noqa: BLE001 - report and go on to the next part
            self.failed += 1
            print(f"FAIL    {name} raised:\n{traceback.format_exc(limit=6)}", flush=True)

    def host_syncs(self, fn) -> int:
        """Host synchronisations of ``fn()``: CUDA's sync debug warnings, or on a CPU its host reads."""
        if self.dry_run:
            return dispatched_ops(fn)["_local_scalar_dense"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)


def lora_llama(shape: dict, layers: int, run: Run):
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_default_dtype(torch.float32 if run.dry_run else torch.bfloat16)
    with run.device:
        base = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **shape))
    torch.set_default_dtype(torch.float32)
    model = get_peft_model(base, bp.models.lora_config())  # peft keeps the adapters in float32
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return model


def batches(n: int, size: int, seq_len: int, n_choices: int, vocab: int, run: Run, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (size, seq_len), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "position_ids": torch.arange(seq_len).expand(size, -1),
                    "labels": torch.randint(0, n_choices, (size,), generator=g),
                    "choice_ids": torch.arange(10, 10 + n_choices)})
    return [{k: v.to(run.device) for k, v in b.items()} for b in out]


def training_step(model, opt, batch) -> None:
    torch.nn.functional.cross_entropy(choice_logits(model, batch).float(), batch["labels"]).backward()
    opt.step()
    opt.zero_grad()


def timings(args, run: Run) -> None:
    shape = TINY if run.dry_run else LLAMA_2_7B
    models = {name: lora_llama(shape, args.layers, run) for name in ("AdamW", "IVON")}
    lora = {name: [p for p in m.parameters() if p.requires_grad] for name, m in models.items()}
    opts = {"AdamW": torch.optim.AdamW(lora["AdamW"], lr=5e-5, fused=True),
            "IVON": bp.IVON(lora["IVON"], **IVON_RECIPE.kwargs(), generator=torch.Generator(run.device).manual_seed(0))}
    print(f"LoRA parameters: {sum(p.numel() for p in lora['IVON']):,} in {len(lora['IVON'])} tensors", flush=True)
    with run.section("optimizer step"):
        for name, params in lora.items():  # fixed gradients: the step alone
            for p in params:
                p.grad = torch.randn_like(p) * 1e-3
        alone = median_times_in_turns({n: o.step for n, o in opts.items()}, args.steps, sync=run.sync)
        run.verdict(f"IVON optimizer step ÷ fused AdamW's ({1e3 * alone['IVON']:.2f} vs {1e3 * alone['AdamW']:.2f} ms)",
                    alone["IVON"] / alone["AdamW"], 1.5)
        run.verdict("host synchronisations per IVON step", run.host_syncs(opts["IVON"].step), 0, fmt="d")
    train = batches(args.steps + 2, args.batch, args.seq_len, 2, shape["vocab_size"], run)
    with run.section("training step"):
        for opt in opts.values():
            opt.zero_grad()
        turn = collections.Counter()

        def step(name):
            training_step(models[name], opts[name], train[turn[name] % len(train)])
            turn[name] += 1

        run.reset_peak()
        whole = median_times_in_turns({n: (lambda n=n: step(n)) for n in opts}, args.steps, sync=run.sync)
        run.verdict(f"whole training step IVON ÷ AdamW ({1e3 * whole['IVON']:.1f} vs {1e3 * whole['AdamW']:.1f} ms; "
                    f"peak {run.peak()} for both models)", whole["IVON"] / whole["AdamW"], 1.02)
    test = batches(args.eval_batches, args.batch, args.seq_len, 2, shape["vocab_size"], run, seed=1)
    with run.section("Laplace fit"):
        model = models["AdamW"]

        def epoch():
            for batch in test:
                torch.nn.functional.cross_entropy(choice_logits(model, batch).float(), batch["labels"]).backward()
            model.zero_grad()

        run.reset_peak()
        fit = median_times_in_turns({"epoch": epoch, "fit": lambda: fit_laplace(
            model, test, n_kfac=10, fisher="mc", prior=1.0, progress=False)}, repeats=1, warmup=1, sync=run.sync)
        run.verdict(f"Laplace fit (MC Fisher, C = 2) ÷ one training epoch ({fit['fit']:.2f} vs {fit['epoch']:.2f} s; "
                    f"peak {run.peak()})", fit["fit"] / fit["epoch"], 1.5)
    with run.section("evaluator"):
        ev = bp.Evaluator(models["IVON"], bp.PosteriorLoRA.from_ivon(models["IVON"], opts["IVON"]), progress=False)
        for n_choices in (2, 4):
            data = batches(args.eval_batches, args.batch, args.seq_len, n_choices, shape["vocab_size"], run, seed=2)
            modes = {"mean": {}, "linearized": {}, **({"sample": {"n_samples": 10}} if n_choices == 2 else {})}
            run.reset_peak()
            seconds = median_times_in_turns({m: (lambda m=m: ev.predict(data, m, **kw)) for m, kw in modes.items()},
                                            repeats=1, warmup=1, sync=run.sync)
            syncs = {m: run.host_syncs(lambda m=m: ev.predict(data, m, **kw)) for m, kw in modes.items()}
            print(f"        evaluation, C = {n_choices}: {', '.join(f'{m} {s:.2f} s' for m, s in seconds.items())}; "
                  f"host syncs {syncs}; peak {run.peak()}", flush=True)
            if n_choices == 2:
                run.verdict("sample (S = 10) ÷ mean evaluation", seconds["sample"] / seconds["mean"], 10.5)
            run.verdict(f"linearized ÷ mean evaluation, C = {n_choices}", seconds["linearized"] / seconds["mean"],
                        2 * n_choices)


def several_devices(args, run: Run) -> None:
    """IVON over a LoRA model spread over two devices as ``device_map`` spreads one (the first decoder layer on
    the GPU, the second, the norm and the head on the CPU; inputs follow by hooks), beside the same model on the
    GPU alone: the first sample's noise on the GPU equals the one-device run's, on the CPU that of a CPU generator
    seeded alike; 10 steps train; a state dict taken at step 5 resumes bit-exactly; a posterior sample predicts;
    host reads per step."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM
    from peft import get_peft_model

    cpu = torch.device("cpu")
    torch.manual_seed(0)
    one = get_peft_model(LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, **TINY)),
                         bp.models.lora_config(lora_dropout=0.0))  # no dropout: a resumed run repeats exactly
    spread = copy.deepcopy(one)
    one.to(run.device)
    spread.to(run.device)
    inner = spread.get_base_model()
    for module in (inner.model.layers[1], inner.model.norm, inner.lm_head):
        module.to(cpu)
        module.register_forward_pre_hook(lambda _, a, kw: _moved((a, kw), cpu), with_kwargs=True)
    ids = torch.randint(3, TINY["vocab_size"], (10, 2, 16), generator=torch.Generator().manual_seed(5))

    def ivon(model):
        return bp.IVON(model.parameters(), lr=0.03, ess=1e5, hess_init=3e-4,
                       generator=torch.Generator(run.device).manual_seed(0))

    def steps(model, opt, batches):
        for batch in batches:
            logits = model(input_ids=batch.to(run.device)).logits
            labels = batch[:, 1:].to(logits.device)
            torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten()).backward()
            opt.step()
            opt.zero_grad()

    opts = {"one": ivon(one), "spread": ivon(spread)}
    devices = sorted({str(p.device) for p in spread.parameters() if p.requires_grad})
    whole = opts["one"]._weights.sample.noise[0]
    layout = opts["spread"]._layout  # on one device (a dry run): none
    starts = [s.start for s in layout.segments] if layout else [0]
    on_cpu = torch.randn(whole.numel(), generator=torch.Generator().manual_seed(0)) / (1e5 * 3e-4) ** 0.5
    expected = torch.cat([(whole if group["params"][0].device.type == run.device.type else on_cpu.to(whole))
                          [start:start + group["numel"]]
                          for group, start in zip(opts["spread"].param_groups, starts)])
    drawn = torch.cat([n.to(whole) for n in opts["spread"]._weights.sample.noise])
    run.verdict(f"IVON over {', '.join(devices)} ({len(opts['spread'].param_groups)} groups): first noise off the "
                "one-device draws (max abs)", float((drawn - expected).abs().max()), 1e-6, fmt=".2e")
    steps(spread, opts["spread"], ids[:5])
    saved = copy.deepcopy(opts["spread"].state_dict())
    again = copy.deepcopy(spread)
    steps(spread, opts["spread"], ids[5:])
    resumed = ivon(again)
    resumed.load_state_dict(saved)
    steps(again, resumed, ids[5:])
    gap = max(float((a - b).abs().max()) for a, b in zip(opts["spread"].posterior_mean(), resumed.posterior_mean()))
    run.verdict("the spread model resumed at step 5: posterior mean off the uninterrupted run's", gap, 0.0, fmt=".2e")
    batch = ids[0].to(run.device)
    with bp.PosteriorLoRA.from_ivon(spread, opts["spread"]).sample(generator=torch.Generator().manual_seed(0)):
        finite = bool(torch.isfinite(spread(input_ids=batch).logits).all())
    run.verdict("a posterior sample over the spread model: non-finite logits", float(not finite), 0.0, fmt="g")
    spread(input_ids=batch).logits.float().mean().backward()
    run.verdict("host reads of the spread model's IVON step (the CPU part's NaN verdict waits for the GPU)",
                run.host_syncs(opts["spread"].step), 1, fmt="d")


def _moved(nested, device: torch.device):
    """``nested`` (tuples, lists, dicts of tensors) with every tensor moved to ``device``."""
    if isinstance(nested, torch.Tensor):
        return nested.to(device)
    if isinstance(nested, (tuple, list)):
        return type(nested)(_moved(x, device) for x in nested)
    if isinstance(nested, dict):
        return {k: _moved(v, device) for k, v in nested.items()}
    return nested


def synthetic_rows(n: int, seed: int) -> list[dict]:
    """Letter-answer questions in OBQA's schema: a question, four choices, the answer's index."""
    g = torch.Generator().manual_seed(seed)
    words = ["stone", "river", "light", "seed", "cloud", "metal", "leaf", "sound", "heat", "salt"]
    pick = lambda: words[int(torch.randint(len(words), (1,), generator=g))]  # noqa: E731
    return [{"question": f"Which {pick()} makes the {pick()} {pick()}?", "choices": [pick() for _ in CHOICES],
             "answer": i % len(CHOICES)} for i in range(n)]


def smoke(args, run: Run, folder: Path) -> None:
    """Every registered method of the paper preset through the run layer, 2 steps each, with a shift set."""
    task = load_task("obqa", data_files={"train": synthetic_rows(24, 0), "test": synthetic_rows(8, 1)},
                     val_split=0.25, max_length=64)
    shift = load_task("arc_easy", data_files={"train": synthetic_rows(4, 2), "test": synthetic_rows(8, 3)},
                      max_length=64)
    corpus = ([e.prompt for e in task.train + task.test + shift.test] + [" ".join(f"Answer:{c}" for c in CHOICES)]) * 5
    shape = dict(TINY if run.dry_run else LLAMA_2_7B, num_hidden_layers=2 if run.dry_run else args.smoke_layers)
    path = save_random_llama(folder / "model", corpus, dtype=None if run.dry_run else torch.bfloat16, **shape)
    quantization = None if args.smoke_quantization == "none" else args.smoke_quantization
    config = preset_config("paper", "obqa", overrides={
        "model": str(path), "quantization": quantization, "train.steps": 2, "eval.n_samples": 2,
        "data.max_length": 64, "progress": False})
    run.reset_peak()
    results = compare(config, folder / "run", list(METHODS), task=task, ood={"arc_easy (synthetic)": shift},
                      log=lambda line: print(f"        {line}", flush=True))
    complete = all(r.ood["arc_easy (synthetic)"].metrics.n == len(shift.test) for r in results.values())
    print(f"{'PASS' if complete else 'FAIL':<8}paper preset smoke run ({quantization or 'no'} quantization): "
          f"{len(results)} of {len(METHODS)} methods trained, fitted, evaluated and scored the shift; peak {run.peak()}",
          flush=True)
    run.failed += not complete


def smoke_generation(args, run: Run, folder: Path) -> None:
    """Every generation method of the ``generation_paper`` preset through the run layer, 2 steps each, on
    synthetic question and answer rows in NQ-Open's schema."""
    from bayes_peft.experiments.generation import GENERATION_METHODS, compare_generation

    g = torch.Generator().manual_seed(4)
    words = ["stone", "river", "light", "seed", "cloud", "metal", "leaf", "sound", "heat", "salt"]
    pick = lambda: words[int(torch.randint(len(words), (1,), generator=g))]  # noqa: E731
    rows = [{"question": f"what makes the {pick()} {pick()}", "answer": [pick(), pick()]} for _ in range(24)]
    task = load_task("nq_open", data_files={"train": rows[:16], "test": rows[16:]}, val_split=0.25, max_length=64)
    corpus = [f"{r['question']}? {' '.join(r['answer'])}" for r in rows] * 5
    shape = dict(TINY if run.dry_run else LLAMA_2_7B, num_hidden_layers=2 if run.dry_run else args.smoke_layers)
    path = save_random_llama(folder / "gen_model", corpus, dtype=None if run.dry_run else torch.bfloat16, **shape)
    quantization = None if args.smoke_quantization == "none" else args.smoke_quantization
    config = preset_config("generation_paper", overrides={
        "model": str(path), "quantization": quantization, "train.steps": 2, "eval.n_samples": 2,
        "eval.max_new_tokens": 3, "data.max_length": 64, "progress": False})
    run.reset_peak()
    results = compare_generation(config, folder / "gen_run", task=task,
                                 log=lambda line: print(f"        {line}", flush=True))
    complete = all(r["test"]["n"] == len(task.test) for r in results.values())
    print(f"{'PASS' if complete else 'FAIL':<8}generation_paper preset smoke run ({quantization or 'no'} quantization): "
          f"{len(results)} of {len(GENERATION_METHODS)} methods trained, fitted and answered; peak {run.peak()}",
          flush=True)
    run.failed += not complete


FSDP2_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
mixed_precision: 'no'
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
"""


def accelerate_fsdp(args, run: Run, folder: Path) -> None:
    """``accelerate launch`` of :func:`fsdp_worker` with :data:`FSDP2_CONFIG` on every GPU (one process on a CPU)."""
    import subprocess
    import sys

    (folder / "fsdp.yaml").write_text(FSDP2_CONFIG)
    processes = 1 if run.dry_run else torch.cuda.device_count()
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(folder / "fsdp.yaml"),
               "--num_processes", str(processes), __file__, "--fsdp-worker", str(folder),
               *(["--dry-run"] if run.dry_run else [])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    report = folder / "fsdp_worker.txt"
    line = report.read_text() if done.returncode == 0 and report.exists() else done.stderr[-2000:]
    passed = done.returncode == 0 and (run.dry_run or line.startswith("sharded"))
    status = "dry-run" if run.dry_run and passed else ("PASS" if passed else "FAIL")
    run.failed += status == "FAIL"
    print(f"{status:<8}HF Trainer + IVON under accelerate's FSDP2 plugin ({processes} processes): {line}", flush=True)


def fsdp_worker(folder: Path, dry_run: bool) -> None:
    """Inside ``accelerate launch``: 4 Trainer steps of IVON over a random Llama's LoRA, then the posterior."""
    import transformers
    from torch.distributed.tensor import DTensor

    from bayes_peft.integrations import Trainer

    shape = dict(TINY, num_hidden_layers=2)
    corpus = [" ".join(f"word{i}" for i in range(j, j + 8)) for j in range(64)]
    model, _ = bp.load_model(save_random_llama(folder / "fsdp_model", corpus, **shape))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (16, 32), generator=g)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(output_dir=str(folder / "trainer"), per_device_train_batch_size=2,
                                          max_steps=4, max_grad_norm=0, report_to=[], save_strategy="no",
                                          disable_tqdm=True, use_cpu=dry_run)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizer_cls_and_kwargs=(bp.IVON, {"lr": 0.03}))
    trainer.train()
    opt = trainer._ivon()
    posterior = bp.PosteriorLoRA.from_ivon(trainer.model, opt)
    sharded = sum(isinstance(p, DTensor) for p in trainer.model.parameters() if p.requires_grad)
    if trainer.is_world_process_zero():
        (folder / "fsdp_worker.txt").write_text(
            f"{'sharded' if sharded else 'not sharded'}: {sharded} LoRA tensors as DTensors, {opt.current_step} IVON "
            f"steps, a posterior over {posterior.num_parameters()} weights")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="a tiny model on the CPU: every line but CUDA's")
    parser.add_argument("--layers", type=int, help="decoder layers of the timed model (default 32; 2 with --dry-run)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed rounds of each optimizer")
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--smoke-layers", type=int, default=4, help="decoder layers of the smoke run's model")
    parser.add_argument("--smoke-quantization", choices=["8bit", "4bit", "none"], default="8bit")
    parser.add_argument("--fsdp-worker", type=Path, help=argparse.SUPPRESS)  # the part accelerate launches
    args = parser.parse_args(argv)
    if args.fsdp_worker is not None:
        fsdp_worker(args.fsdp_worker, args.dry_run)
        return 0
    if args.dry_run:
        args.layers, args.batch, args.seq_len, args.steps, args.eval_batches = args.layers or 2, 2, 16, 3, 2
    args.layers = args.layers or 32
    warnings.filterwarnings("ignore", message="MatMul8bitLt")  # bitsandbytes says so at every 8-bit matmul
    run = Run(args.dry_run)
    what = "CPU dry run, tiny Llama" if args.dry_run else f"{torch.cuda.get_device_name()}, Llama-2-7B shapes"
    print(header(f"{what}, {args.layers} layers, batch {args.batch}×{args.seq_len}, torch {torch.__version__}"))
    with run.section("timings"):
        timings(args, run)
    with run.section("smoke run"), tempfile.TemporaryDirectory() as folder:
        smoke(args, run, Path(folder))
    with run.section("generation smoke run"), tempfile.TemporaryDirectory() as folder:
        smoke_generation(args, run, Path(folder))
    with run.section("several devices"):
        several_devices(args, run)
    with run.section("accelerate FSDP2"), tempfile.TemporaryDirectory() as folder:
        accelerate_fsdp(args, run, Path(folder))
    print(f"{run.failed} criteria failed" if run.failed else "every criterion met" if not args.dry_run else "dry run done")
    return 1 if run.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The seeds' comparison: AdamW (MAP), MC-dropout, LA-KFAC (evidence / validation prior), IVON@mean and IVON.

Rows are methods × metrics (ACC, ECE×100, NLL, Brier), columns the tasks and their average, each cell
mean ± standard error over seeds, as in Table 1 of the IVON-LoRA paper. Checkpoints are trained once per
(task, seed) under --out and reused by every method and by later runs.

    python benchmarks/compare.py --preset overfit --seeds 3
    python benchmarks/compare.py --preset paper --model /path/to/Llama-2-7b-hf     # GPUs
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from bayes_peft.experiment import METHODS, RunConfig, compare, summary

SEED_TASKS = ["winogrande_s", "arc_challenge", "arc_easy", "winogrande_m", "obqa", "boolq"]
# The seeds' per-task IVON hyper-parameters (DESIGN.md §4).
PAPER_IVON = {"winogrande_s": (1e7, 3e-4), "winogrande_m": (1e8, 3e-4), "boolq": (1e7, 3e-4),
              "arc_challenge": (1e6, 1e-3), "arc_easy": (1e6, 1e-3), "obqa": (1e6, 1e-3)}
# A former "cpu" preset (480 examples, 150 steps: 2.5 epochs) was retired: there AdamW is already calibrated,
# so it could show none of the seeds' findings (benchmarks/RESULTS.md, "The methods compared on SST-2").
PRESETS = {
    # The seeds' regime on the CPU: a small training set trained long enough (30 epochs) for AdamW to turn
    # overconfident, as WinoGrande-S does in the papers (10,000 steps of batch 4 on 640 examples).
    "overfit": {"tasks": ["sst2"], "config": dict(model="smollm2-135m", n_train=96, steps=360, batch_size=8,
                                                  adamw_lr=1e-3, ivon_lr=0.03, ess=1e7, hess_init=3e-4,
                                                  clip_radius=1e-3)},
    "paper": {"tasks": SEED_TASKS, "config": dict(model="meta-llama/Llama-2-7b-hf", quantization="8bit",
                                                  steps=10_000, batch_size=4, adamw_lr=5e-5, ivon_lr=0.03,
                                                  clip_radius=1e-3, max_length=512)},
}
METRICS = [("ACC", lambda m: m.acc), ("ECE×100", lambda m: 100 * m.ece), ("NLL", lambda m: m.nll),
           ("Brier", lambda m: m.brier)]
OVERRIDES = ("model", "steps", "n_test", "ess", "hess_init", "ivon_lr", "clip_radius", "adamw_lr", "ece_bins")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options that override a preset's run: --seeds, --model, --steps, --n-test, hyper-parameters."""
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--model", help="a local folder or hub name instead of the preset's model")
    parser.add_argument("--steps", type=int, help="override the preset's training steps")
    parser.add_argument("--n-test", type=int, help="evaluate on a seeded draw of this many test examples")
    for flag in ("ess", "hess-init", "ivon-lr", "clip-radius", "adamw-lr"):
        parser.add_argument(f"--{flag}", type=float, help="override the preset's value")
    parser.add_argument("--ece-bins", type=int, help="ECE's equal-width confidence bins (default 10)")
    parser.add_argument("--no-progress", action="store_true")


def run_config(args: argparse.Namespace, task: str, seed: int) -> RunConfig:
    """The preset's :class:`RunConfig` for one task and seed, with the seeds' per-task IVON values under the
    paper preset and whichever of the command line's overrides the script has."""
    overrides = dict(PRESETS[args.preset]["config"], task=task, seed=seed, progress=not args.no_progress)
    if args.preset == "paper" and task in PAPER_IVON:
        overrides["ess"], overrides["hess_init"] = PAPER_IVON[task]
    for key in OVERRIDES:
        if getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    return RunConfig(**overrides)


def mean_se(values: list[float]) -> str:
    """``"mean ± standard error"`` over seeds (the value alone for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) / math.sqrt(len(values)):.3f}"


def table(results: dict, tasks: list[str], methods: list[str]) -> str:
    """results[task][seed][method] = {"metrics": Metrics, "seconds": float} → the markdown table."""
    lines = [f"| method | metric | {' | '.join(tasks)} | average |", "|---|---|" + "---|" * (len(tasks) + 1)]
    n_bins = next(iter(next(iter(results.values())).values()))[methods[0]]["metrics"].n_bins
    for method in methods:
        for label, get in METRICS:
            label = f"{label} ({n_bins} bins)" if label.startswith("ECE") else label
            cells, per_seed_avg = [], {}
            for task in tasks:
                values = [get(results[task][seed][method]["metrics"]) for seed in sorted(results[task])]
                cells.append(mean_se(values))
                for seed, v in zip(sorted(results[task]), values):
                    per_seed_avg.setdefault(seed, []).append(v)
            average = mean_se([statistics.mean(v) for v in per_seed_avg.values()])
            lines.append(f"| {method} | {label} | {' | '.join(cells)} | {average} |")
    seconds = {m: sum(results[t][s][m]["seconds"] for t in tasks for s in results[t]) for m in methods}
    lines.append("")
    lines.append("Wall time by method (training is charged to the first method that reads a checkpoint): "
                 + ", ".join(f"{m} {s:.0f} s" for m, s in seconds.items()))
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="overfit")
    parser.add_argument("--tasks", nargs="+", help="default: the preset's")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    add_run_options(parser)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compare"))
    args = parser.parse_args(argv)

    preset = PRESETS[args.preset]
    tasks = args.tasks or preset["tasks"]
    started = time.perf_counter()
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} {platform.node()}, {torch.get_num_threads()} threads, "
          f"cuda={torch.cuda.is_available()}, preset {args.preset}")
    results: dict = {}
    for task in tasks:
        for seed in range(args.seeds):
            results.setdefault(task, {})[seed] = compare(run_config(args, task, seed),
                                                         args.out / args.preset / task / f"seed{seed}", args.methods)
    markdown = table(results, tasks, args.methods)
    wall = time.perf_counter() - started
    print(f"\n{markdown}\n\nTotal wall time {wall / 60:.1f} min")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.preset}.md").write_text(markdown + f"\n\nTotal wall time {wall / 60:.1f} min\n")
    (args.out / f"{args.preset}.json").write_text(json.dumps(
        {task: {seed: {m: summary(r) for m, r in runs.items()} for seed, runs in per_task.items()}
         for task, per_task in results.items()}, indent=2))
    return results


if __name__ == "__main__":
    main()

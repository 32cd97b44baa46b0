"""What the benchmark scripts share, so that each is argument parsing and output only: the run options
of a preset, the header line that dates a run, mean ± standard error over seeds, and the method table.

    parser = benchmark_parser(__doc__)
    args = parser.parse_args()
    config = run_config(args, task, seed)        # the preset's, with the command line's overrides
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
from pathlib import Path
from typing import Callable, Optional

from ..config import PRESETS, RunConfig, add_options, overrides_from, preset_config

__all__ = ["benchmark_parser", "run_config", "run_dir", "preset_tasks", "header", "mean_se", "method_table",
           "write_results", "METRICS", "RUN_OPTIONS"]

RUN_OPTIONS = ["model", "steps", "n_train", "n_test", "n_validation", "ess", "hess_init", "ivon_lr", "clip_radius",
               "adamw_lr", "n_samples", "ece_bins"]
BENCHMARK_PRESETS = ("overfit", "paper")
METRICS: list[tuple[str, Callable]] = [("ACC", lambda m: m.acc), ("ECE×100", lambda m: 100 * m.ece),
                                       ("NLL", lambda m: m.nll), ("Brier", lambda m: m.brier)]


def benchmark_parser(doc: Optional[str], methods: bool = True, seeds: bool = True,
                     options: list[str] = RUN_OPTIONS) -> argparse.ArgumentParser:
    """--preset, --out, --no-progress, the configuration ``options`` (by default every run option of a
    preset: --model, --steps, --n-test, IVON's and AdamW's hyper-parameters, --samples, --ece-bins) and,
    as asked, --seeds and --methods (any registered method)."""
    from .methods import METHODS

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=BENCHMARK_PRESETS, default="overfit")
    if seeds:
        parser.add_argument("--seeds", type=int, default=3)
    if methods:
        parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    add_options(parser, options)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compare"),
                        help="checkpoints (reused by later runs and the other scripts) and results")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def run_config(args: argparse.Namespace, task: Optional[str] = None, seed: int = 0) -> RunConfig:
    """The preset's configuration of (``task``, default the preset's first; ``seed``) with the command
    line's overrides."""
    return preset_config(args.preset, task, seed, {**overrides_from(args), "progress": not args.no_progress})


def run_dir(args: argparse.Namespace, config: RunConfig) -> Path:
    """Where a (preset, task, seed) run keeps its checkpoints: shared by every script with the same --out."""
    return args.out / args.preset / config.data.task / f"seed{config.seed}"


def preset_tasks(args: argparse.Namespace) -> tuple[str, ...]:
    return PRESETS[args.preset].tasks


def header(what: str) -> str:
    """``# date time host, threads, cuda, what``: the first line of every benchmark's output."""
    import torch

    return (f"# {datetime.datetime.now():%Y-%m-%d %H:%M} {platform.node()}, {torch.get_num_threads()} threads, "
            f"cuda={torch.cuda.is_available()}, {what}")


def mean_se(values: list[float], digits: int = 3) -> str:
    """``"mean ± standard error"`` over seeds with ``digits`` decimals (the value alone for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values) / math.sqrt(len(values)):.{digits}f}"


def method_table(results: dict, tasks: list[str], methods: list[str]) -> str:
    """``results[task][seed][method]`` (:class:`~bayes_peft.experiments.compare.MethodResult`) → a markdown table,
    rows methods × metrics, columns the tasks and their average, each cell mean ± SE over seeds (IVON-LoRA's
    Table 1), and each method's cost (:class:`~bayes_peft.experiments.methods.Cost`); then the wall time by method."""
    from .methods import METHODS

    lines = [f"| method | cost: trainings / extra passes / test passes | metric | {' | '.join(tasks)} | average |",
             "|---|---|---|" + "---|" * (len(tasks) + 1)]
    n_bins = next(iter(next(iter(results.values())).values()))[methods[0]].metrics.n_bins
    for method in methods:
        for row, (label, get) in enumerate(METRICS):
            label = f"{label} ({n_bins} bins)" if label.startswith("ECE") else label
            cells, per_seed_avg = [], {}
            for task in tasks:
                values = [get(results[task][seed][method].metrics) for seed in sorted(results[task])]
                cells.append(mean_se(values))
                for seed, v in zip(sorted(results[task]), values):
                    per_seed_avg.setdefault(seed, []).append(v)
            average = mean_se([statistics.mean(v) for v in per_seed_avg.values()])
            cost = str(METHODS[method].cost) if row == 0 and method in METHODS else ""
            lines.append(f"| {method if row == 0 else ''} | {cost} | {label} | {' | '.join(cells)} | {average} |")
    seconds = {m: sum(results[t][s][m].seconds for t in tasks for s in results[t]) for m in methods}
    lines.append("")
    lines.append("Wall time by method (training is charged to the first method that reads a checkpoint): "
                 + ", ".join(f"{m} {s:.0f} s" for m, s in seconds.items()))
    return "\n".join(lines)


def write_results(out: Path, stem: str, markdown: str, data: dict, wall_seconds: float) -> None:
    """Print the markdown with the wall time, and write it to ``out/stem.md`` and ``data`` to ``out/stem.json``."""
    text = f"{markdown}\n\nTotal wall time {wall_seconds / 60:.1f} min"
    print(f"\n{text}")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text + "\n")
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2))

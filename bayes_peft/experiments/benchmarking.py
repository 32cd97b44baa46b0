"""What the benchmark scripts share, so that each is argument parsing and output only: the run options
of a preset, the header line that dates a run, mean ± standard error over seeds, and the results' files
(their tables are :mod:`bayes_peft.experiments.tables`).

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
from typing import Optional

from ..config import PRESETS, RunConfig, add_options, overrides_from, preset_config

__all__ = ["benchmark_parser", "run_config", "run_dir", "preset_tasks", "header", "mean_se", "write_results",
           "RUN_OPTIONS"]

RUN_OPTIONS = ["model", "steps", "n_train", "n_test", "n_validation", "ess", "hess_init", "ivon_lr", "clip_radius",
               "adamw_lr", "n_samples", "ece_bins"]
BENCHMARK_PRESETS = ("overfit", "unsaturated", "paper", "generation")


def benchmark_parser(doc: Optional[str], methods: bool = True, seeds: bool = True,
                     options: list[str] = RUN_OPTIONS) -> argparse.ArgumentParser:
    """--preset, --out, --no-progress, the configuration ``options`` (by default every run option of a
    preset: --model, --steps, --n-train, --n-test, --n-validation, IVON's and AdamW's hyper-parameters,
    --samples, --ece-bins) and,
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
    """``"mean ± standard error"`` over seeds with ``digits`` decimals (the value alone for one seed). A seed
    whose value is undefined (NaN: an AUROC where every answer was wrong) is left out and the count said:
    ``"0.812 ± 0.020 (2 of 3)"``; ``"–"`` when none is defined."""
    defined = [v for v in values if not math.isnan(v)]
    if not defined:
        return "–"
    if len(defined) < len(values):
        return f"{mean_se(defined, digits)} ({len(defined)} of {len(values)})"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values) / math.sqrt(len(values)):.{digits}f}"


def write_results(out: Path, stem: str, markdown: str, data: dict, wall_seconds: float) -> None:
    """Print the markdown with the wall time, and write it to ``out/stem.md`` and ``data`` to ``out/stem.json``."""
    text = f"{markdown}\n\nTotal wall time {wall_seconds / 60:.1f} min"
    print(f"\n{text}")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text + "\n")
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2))

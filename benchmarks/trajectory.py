"""Metrics along training (the course report's Figure 1): every method at checkpoints every K steps.

At each checkpoint of AdamW and of IVON it evaluates AdamW (MAP), MC-dropout, Laplace-LoRA on that AdamW
checkpoint (evidence and validation prior), IVON@mean and IVON (S samples), and plots ACC, NLL and ECE
against the step, one line per method. Each optimizer trains once (every stage continues from the last)
and the checkpoints under --out are reused by later runs.

    python benchmarks/trajectory.py --preset overfit --every 60 --n-test 128
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

from bayes_peft.experiment import METHODS, compare_along_training
from bayes_peft.metrics import save_figure

from compare import PRESETS, run_config

PANELS = [("ACC", lambda m: m.acc), ("NLL", lambda m: m.nll), ("ECE", lambda m: m.ece)]


def table(trajectory: dict) -> str:
    """trajectory[step][method] = {"metrics": Metrics, ...} → one markdown row per step and method."""
    lines = ["| step | method | ACC | NLL | ECE | Brier |", "|---|---|---|---|---|---|"]
    for step, results in trajectory.items():
        for method, r in results.items():
            m = r["metrics"]
            lines.append(f"| {step} | {method} | {m.acc:.3f} | {m.nll:.3f} | {m.ece:.3f} | {m.brier:.3f} |")
    return "\n".join(lines)


def plot(trajectory: dict, path: Path, title: str) -> Path:
    """ACC, NLL and ECE against the training step, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(trajectory)
    methods = list(next(iter(trajectory.values())))
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6))
    for ax, (label, get) in zip(axes, PANELS):
        for method in methods:
            ax.plot(steps, [get(trajectory[s][method]["metrics"]) for s in steps], "o-", ms=3, label=method)
        ax.set_xlabel("training step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    fig.suptitle(title)
    return save_figure(fig, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="overfit")
    parser.add_argument("--task", help="default: the preset's first task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=60, help="evaluate every this many steps")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--model", help="a local folder or hub name instead of the preset's model")
    parser.add_argument("--steps", type=int, help="override the preset's training steps")
    parser.add_argument("--n-test", type=int, help="evaluate on a seeded draw of this many test examples")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compare"))
    parser.add_argument("--plot", type=Path, help="default: <out>/trajectory_<preset>_<task>.png")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    preset = PRESETS[args.preset]
    task = args.task or preset["tasks"][0]
    config = run_config(args, task, args.seed)
    started = time.perf_counter()
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} {platform.node()}, {torch.get_num_threads()} threads, "
          f"preset {args.preset}, task {task}, seed {args.seed}, every {args.every} of {config.steps} steps")
    run_dir = args.out / args.preset / task / f"seed{args.seed}" / "trajectory"
    trajectory = compare_along_training(config, run_dir, args.every, args.methods)
    markdown = table(trajectory)
    figure = plot(trajectory, args.plot or args.out / f"trajectory_{args.preset}_{task}.png",
                  f"{task}, {config.n_train or 'all'} training examples, batch {config.batch_size}, seed {args.seed}")
    wall = time.perf_counter() - started
    print(f"\n{markdown}\n\nplot: {figure}\nTotal wall time {wall / 60:.1f} min")
    (run_dir / "trajectory.json").write_text(json.dumps(
        {step: {m: r["metrics"].as_dict() for m, r in results.items()} for step, results in trajectory.items()},
        indent=2))
    return trajectory


if __name__ == "__main__":
    main()

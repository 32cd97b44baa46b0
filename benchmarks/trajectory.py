"""Metrics along training (the course report's Figure 1): every method at checkpoints every K steps.

At each checkpoint of AdamW and of IVON it evaluates every method of compare.py on it and plots ACC, NLL
and ECE against the step, one line per method. Each optimizer trains once (every stage continues from the
last) and the checkpoints under --out are reused by later runs.

    python benchmarks/trajectory.py --preset overfit --every 60 --n-test 128
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bayes_peft.experiments.benchmarking import benchmark_parser, header, run_config, run_dir
from bayes_peft.experiments.compare import compare_along_training
from bayes_peft.evaluation.metrics import save_figure

PANELS = [("ACC", lambda m: m.acc), ("NLL", lambda m: m.nll), ("ECE", lambda m: m.ece)]


def table(trajectory: dict) -> str:
    """trajectory[step][method] = MethodResult → one markdown row per step and method."""
    lines = ["| step | method | ACC | NLL | ECE | Brier |", "|---|---|---|---|---|---|"]
    for step, results in trajectory.items():
        for method, r in results.items():
            m = r.metrics
            lines.append(f"| {step} | {method} | {m.acc:.3f} | {m.nll:.3f} | {m.ece:.3f} | {m.brier:.3f} |")
    return "\n".join(lines)


def plot(trajectory: dict, path: Path, title: str) -> Path:
    """ACC, NLL and ECE against the training step, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(trajectory)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6))
    for ax, (label, get) in zip(axes, PANELS):
        for method in trajectory[steps[0]]:
            ax.plot(steps, [get(trajectory[s][method].metrics) for s in steps], "o-", ms=3, label=method)
        ax.set_xlabel("training step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    fig.suptitle(title)
    return save_figure(fig, path)


def main(argv=None) -> dict:
    parser = benchmark_parser(__doc__, seeds=False)
    parser.add_argument("--task", help="default: the preset's first task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=60, help="evaluate every this many steps")
    parser.add_argument("--plot", type=Path, help="default: <out>/trajectory_<preset>_<task>.png")
    args = parser.parse_args(argv)

    config = run_config(args, args.task, args.seed)
    task = config.data.task
    started = time.perf_counter()
    print(header(f"preset {args.preset}, task {task}, seed {args.seed}, every {args.every} of {config.train.steps} steps"))
    trajectory = compare_along_training(config, run_dir(args, config) / "trajectory", args.every, args.methods)
    figure = plot(trajectory, args.plot or args.out / f"trajectory_{args.preset}_{task}.png",
                  f"{task}, {config.data.n_train or 'all'} training examples, batch {config.train.batch_size}, seed {args.seed}")
    print(f"\n{table(trajectory)}\n\nplot: {figure}\nTotal wall time {(time.perf_counter() - started) / 60:.1f} min")
    (run_dir(args, config) / "trajectory" / "trajectory.json").write_text(json.dumps(
        {step: {m: r.metrics.as_dict() for m, r in results.items()} for step, results in trajectory.items()}, indent=2))
    return trajectory


if __name__ == "__main__":
    main()

"""τ trade-off sweeps for IVON and Laplace-LoRA on the same trained runs: error against NLL.

It reuses (or trains) the checkpoints of benchmarks/compare.py under --out. IVON predicts by averaging
samples from N(m, τ·diag(v)), Laplace (the evidence prior) with its linearized predictive of covariance
τ·JΣJᵀ (both predictives can be switched).

    python benchmarks/tau_sweep.py --preset overfit --taus 0 0.25 0.5 0.75 1 --samples 5
"""

from __future__ import annotations

import time
from pathlib import Path

from bayes_peft.benchmarking import benchmark_parser, header, run_config, run_dir
from bayes_peft.evaluate import Evaluator
from bayes_peft.methods import METHODS
from bayes_peft.runs import train_checkpoint


def main(argv=None):
    parser = benchmark_parser(__doc__, methods=False, seeds=False)
    parser.add_argument("--task", help="default: the preset's first task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--taus", type=float, nargs="+", default=[i / 10 for i in range(11)])
    parser.add_argument("--ivon-method", choices=["sample", "linearized"], default="sample")
    parser.add_argument("--laplace-method", choices=["sample", "linearized"], default="linearized")
    parser.add_argument("--plot", type=Path, default=Path("benchmarks/results/tau_sweep.png"))
    args = parser.parse_args(argv)

    config = run_config(args, args.task, args.seed)
    task = config.load_task()
    started = time.perf_counter()
    print(header(f"task {task.name}, {len(task.test)} test examples"))
    sweeps = []
    for name, predictive in (("IVON", args.ivon_method), ("LA-KFAC evidence", args.laplace_method)):
        method = METHODS[name]
        checkpoint = train_checkpoint(config, method.checkpoint, run_dir(args, config) / method.checkpoint, task)
        sweep = Evaluator(checkpoint.model, method.posterior(checkpoint), task, progress=config.progress).sweep_tau(
            checkpoint.loader("test"), args.taus, predictive, n_samples=config.eval.n_samples, seed=config.seed)
        sweep.method = f"{name} ({predictive})"
        sweeps.append(sweep)
        print(f"\n{sweep.method}\n{sweep.table()}")
    sweeps[0].plot(args.plot, others=sweeps[1:], title=f"{task.name}: error vs NLL as τ goes {args.taus[0]:g}→{args.taus[-1]:g}")
    print(f"\nplot: {args.plot}; wall time {(time.perf_counter() - started) / 60:.1f} min")
    return sweeps


if __name__ == "__main__":
    main()

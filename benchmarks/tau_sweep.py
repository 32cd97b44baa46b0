"""τ trade-off sweeps for IVON and Laplace-LoRA on the same trained runs: error against NLL.

It reuses (or trains) the checkpoints of benchmarks/compare.py under --out: IVON from ``ivon/``, Laplace
fitted on ``adamw/``. IVON predicts by averaging samples from N(m, τ·diag(v)), Laplace with its
linearized predictive of covariance τ·JΣJᵀ (both methods can be switched).

    python benchmarks/tau_sweep.py --preset overfit --taus 0 0.25 0.5 0.75 1 --samples 5
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

import torch

from bayes_peft.evaluate import Evaluator
from bayes_peft.experiment import trained_model
from bayes_peft.laplace import evidence_prior, fit_laplace

from compare import PRESETS, run_config


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="overfit")
    parser.add_argument("--task", help="default: the preset's first task")
    parser.add_argument("--model", help="a local folder or hub name instead of the preset's model")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--n-test", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--taus", type=float, nargs="+", default=[i / 10 for i in range(11)])
    parser.add_argument("--samples", type=int, default=10, help="weight samples per τ (sample method)")
    parser.add_argument("--ivon-method", choices=["sample", "linearized"], default="sample")
    parser.add_argument("--laplace-method", choices=["sample", "linearized"], default="linearized")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compare"))
    parser.add_argument("--plot", type=Path, default=Path("benchmarks/results/tau_sweep.png"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    preset = PRESETS[args.preset]
    config = run_config(args, args.task or preset["tasks"][0], args.seed)
    run_dir = args.out / args.preset / config.task / f"seed{config.seed}"
    task = config.load_task()
    started = time.perf_counter()
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} {platform.node()}, {torch.get_num_threads()} threads, "
          f"task {task.name}, {len(task.test)} test examples")

    sweeps = []
    model, tokenizer, ivon, _ = trained_model(config, "ivon", run_dir, task)
    test = task.loader(tokenizer, "test", config.eval_batch_size)
    sweep = Evaluator(model, ivon, task, progress=config.progress).sweep_tau(
        test, args.taus, method=args.ivon_method, n_samples=args.samples, seed=config.seed)
    sweep.method = f"IVON ({args.ivon_method})"
    sweeps.append(sweep)

    model, tokenizer, _, _ = trained_model(config, "adamw", run_dir, task)
    train = task.loader(tokenizer, "train", config.eval_batch_size, shuffle=False)
    laplace = fit_laplace(model, train, n_kfac=config.n_kfac, prior=1.0, progress=config.progress)
    laplace = laplace.with_prior_precision(evidence_prior(laplace))
    sweep = Evaluator(model, laplace, task, progress=config.progress).sweep_tau(
        test, args.taus, method=args.laplace_method, n_samples=args.samples, seed=config.seed)
    sweep.method = f"LA-KFAC evidence ({args.laplace_method})"
    sweeps.append(sweep)

    for s in sweeps:
        print(f"\n{s.method}\n{s.table()}")
    sweeps[0].plot(args.plot, others=sweeps[1:], title=f"{task.name}: error vs NLL as τ goes {args.taus[0]:g}→{args.taus[-1]:g}")
    print(f"\nplot: {args.plot}; wall time {(time.perf_counter() - started) / 60:.1f} min")
    return sweeps


if __name__ == "__main__":
    main()

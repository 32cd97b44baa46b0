"""τ trade-offs: every Gaussian method of the comparison (IVON's and SWAG's samples, Laplace's linearized
predictive with each prior) at τ from 0 to 4 (beyond 1: wider than the posterior), over seeds, error against NLL
as in IVON-LoRA's Figure 1.

It reuses (or trains) the checkpoints of benchmarks/compare.py under --out. Each method's sweep is its own
predictive at every τ of the grid (the sampled ones draw the same S weight samples, scaled), on the test split.
Prints one table per method (mean ± SE over seeds), writes tau_sweep.json, and plots all curves in one PNG.

    python benchmarks/tau_sweep.py --preset overfit --seeds 3
    python benchmarks/tau_sweep.py --preset overfit --methods IVON "LA-KFAC validation" --taus 0 0.5 1
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bayes_peft.experiments.benchmarking import benchmark_parser, header, run_config, run_dir
from bayes_peft.config import EvalConfig
from bayes_peft.evaluation.tau import tau_tradeoff_plot
from bayes_peft.experiments.compare import compare
from bayes_peft.experiments.methods import tau_methods
from bayes_peft.experiments.tables import tau_tables


def main(argv=None) -> dict:
    parser = benchmark_parser(__doc__, methods=False)
    parser.add_argument("--methods", nargs="+", default=tau_methods(), choices=tau_methods())
    parser.add_argument("--task", help="default: the preset's first task")
    parser.add_argument("--taus", type=float, nargs="+", default=list(EvalConfig.tune_taus))
    parser.add_argument("--plot", type=Path, default=Path("benchmarks/results/tau_sweep.png"))
    args = parser.parse_args(argv)

    started = time.perf_counter()
    print(header(f"preset {args.preset}, τ ∈ {args.taus}"))
    sweeps: dict[str, list] = {m: [] for m in args.methods}
    for seed in range(args.seeds):
        config = run_config(args, args.task, seed)
        results = compare(config, run_dir(args, config), args.methods, sweeps=dict.fromkeys(args.methods, args.taus),
                          results_file="tau_sweep.json")
        for method in args.methods:
            sweeps[method].append(results[method].sweep)
    saved = {m: {seed: [{"tau": t, **run.metrics[i].as_dict()} for i, t in enumerate(run.taus)]
                 for seed, run in enumerate(runs)} for m, runs in sweeps.items()}
    print(f"\n{tau_tables(saved)}")
    tau_tradeoff_plot(sweeps, args.plot, title=f"{config.data.task}, {args.preset} preset: error vs NLL as τ goes "
                                               f"{args.taus[0]:g}→{args.taus[-1]:g}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tau_sweep.json").write_text(json.dumps(saved, indent=2))
    print(f"\nplot: {args.plot}; wall time {(time.perf_counter() - started) / 60:.1f} min")
    return sweeps


if __name__ == "__main__":
    main()

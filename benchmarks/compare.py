"""The seeds' comparison: every registered method (AdamW, temperature scaling, MC-dropout, LA-KFAC and LA
(diag) with the evidence and the validation prior, IVON@mean, IVON, SWA, SWAG) on the preset's tasks.

Rows are methods × metrics (ACC, ECE×100, NLL, Brier), columns the tasks and their average, each cell
mean ± standard error over seeds, as in Table 1 of the IVON-LoRA paper. Checkpoints are trained once per
(task, seed) under --out and reused by every method and by later runs. Presets: bayes_peft.config.PRESETS.

    python benchmarks/compare.py --preset overfit --seeds 3
    python benchmarks/compare.py --preset paper --model /path/to/Llama-2-7b-hf     # GPUs
"""

from __future__ import annotations

import time

from bayes_peft.experiments.benchmarking import (benchmark_parser, header, preset_tasks, run_config, run_dir,
                                                  write_results)
from bayes_peft.experiments.compare import compare
from bayes_peft.experiments.tables import method_table


def main(argv=None) -> dict:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--tasks", nargs="+", help="default: the preset's")
    args = parser.parse_args(argv)

    tasks = args.tasks or list(preset_tasks(args))
    started = time.perf_counter()
    print(header(f"preset {args.preset}"))
    results: dict = {}
    for task in tasks:
        for seed in range(args.seeds):
            config = run_config(args, task, seed)
            results.setdefault(task, {})[seed] = compare(config, run_dir(args, config), args.methods)
    write_results(args.out, args.preset, method_table(results, tasks, args.methods),
                  {task: {seed: {m: r.to_json() for m, r in runs.items()} for seed, runs in per_task.items()}
                   for task, per_task in results.items()}, time.perf_counter() - started)
    return results


if __name__ == "__main__":
    main()

"""Uncertainty a user can act on: out-of-distribution detection, distribution shift and selective prediction.

Each method of compare.py scores the in-distribution test split and the preset's out-of-distribution sets
(bayes_peft.config.PRESETS[...].ood) with the same model; the tables give, mean ± standard error over seeds:

* OOD detection: AUROC (0.5 = chance, higher is better) and FPR@95 (lower is better) of each uncertainty
  score at telling the out-of-distribution inputs from the test split: max probability (MSP) for every
  method, and for the predictives that average samples their mutual information (MI, the epistemic part);
* selective prediction on the test split: AURC (lower is better) and the accuracy on the 80% most certain;
* under a distribution shift with labels (the paper preset), ACC, NLL and ECE on the shifted sets.

Presets: ``overfit`` (CPU; MMLU questions and BoolQ passages in SST-2's prompt; checkpoints shared with
compare.py under --out) and ``paper`` (GPUs; OBQA → ARC-C, ARC-E, MMLU college chemistry and physics).

    python benchmarks/ood.py --preset overfit --seeds 3
    python benchmarks/ood.py --preset paper --model /path/to/Llama-2-7b-hf     # GPUs
"""

from __future__ import annotations

import statistics
import time

from bayes_peft.config import PRESETS
from bayes_peft.evaluation.metrics import save_figure
from bayes_peft.evaluation.uncertainty import draw_risk_coverage
from bayes_peft.experiments.benchmarking import benchmark_parser, header, run_config, run_dir, write_results
from bayes_peft.experiments.compare import compare
from bayes_peft.experiments.tables import OOD_SCORES, ood_auroc, ood_tables


def plot(saved: dict, runs: dict, methods: list[str], sets: list[str], path):
    """AUROC (MSP and MI) per OOD set and method with standard errors, from the results' JSON (``saved``), and
    seed 0's risk–coverage curves, from its predictions (``runs[seed][method]``: compare()'s MethodResult)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sets) + 1, figsize=(4.2 * (len(sets) + 1), 4))
    for ax, name in zip(axes, sets):
        for offset, (label, score) in enumerate(OOD_SCORES):
            bars = [(i + 0.38 * offset, [ood_auroc(name, score)(saved[s][m]) for s in sorted(saved)])
                    for i, m in enumerate(methods)]
            bars = [(x, v) for x, v in bars if None not in v]
            ax.bar([x for x, _ in bars], [statistics.mean(v) for _, v in bars], width=0.36, capsize=2, label=label,
                   yerr=[statistics.stdev(v) / len(v) ** 0.5 if len(v) > 1 else 0.0 for _, v in bars])
        ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(methods)), methods, rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0.3, 1.0)
        ax.set_title(f"OOD AUROC: {name}", fontsize=9)
        ax.legend(fontsize=7)
    draw_risk_coverage(axes[-1], {m: runs[min(runs)][m].prediction for m in methods})
    axes[-1].set_title(f"risk–coverage (MSP), seed {min(runs)}", fontsize=9)
    return save_figure(fig, path)


def main(argv=None) -> dict:
    args = benchmark_parser(__doc__).parse_args(argv)
    ood = PRESETS[args.preset].ood
    started = time.perf_counter()
    print(header(f"preset {args.preset}"))
    runs: dict = {}
    for seed in range(args.seeds):
        config = run_config(args, ood.task, seed)
        sets = ood.load(config)
        runs[seed] = compare(config, run_dir(args, config), args.methods, ood=sets,
                             results_file=f"ood_{args.preset}.json")
    labelled = [name for name in sets if sets[name].labelled]
    saved = {seed: {m: r.to_json() for m, r in per_seed.items()} for seed, per_seed in runs.items()}
    write_results(args.out, f"ood_{args.preset}", ood_tables(saved, args.methods, list(sets), labelled), saved,
                  time.perf_counter() - started)
    print(f"plot: {plot(saved, runs, args.methods, list(sets), args.out / f'ood_{args.preset}.png')}")
    return runs


if __name__ == "__main__":
    main()

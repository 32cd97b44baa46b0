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

from bayes_peft.experiments.benchmarking import benchmark_parser, header, mean_se, run_config, run_dir, write_results
from bayes_peft.config import PRESETS
from bayes_peft.experiments.compare import compare
from bayes_peft.evaluation.metrics import save_figure
from bayes_peft.evaluation.uncertainty import draw_risk_coverage

SCORES = [("MSP", "max_prob"), ("MI", "mutual_information")]


def _cells(runs: dict, method: str, get) -> str:
    values = [get(runs[seed][method]) for seed in sorted(runs)]
    return "–" if any(v is None for v in values) else mean_se(values)


def _auroc(name: str, score: str, key: str = "auroc"):
    return lambda r: r.ood[name].detection.get(score, {}).get(key)


def tables(runs: dict, methods: list[str], sets: list[str], labelled: list[str]) -> str:
    """runs[seed][method] = compare()'s MethodResult → the markdown tables."""
    lines = ["OOD detection (in-distribution: the test split)", "",
             "| method | " + " | ".join(f"{s} AUROC ({label})" for s in sets for label, _ in SCORES) + " | "
             + " | ".join(f"{s} FPR@95 (MSP)" for s in sets) + " |", "|---|" + "---|" * (len(sets) * (len(SCORES) + 1))]
    for m in methods:
        cells = [_cells(runs, m, _auroc(s, score)) for s in sets for _, score in SCORES]
        lines.append(f"| {m} | " + " | ".join(cells + [_cells(runs, m, _auroc(s, "max_prob", "fpr_at_95_tpr"))
                                                       for s in sets]) + " |")
    n_bins = runs[min(runs)][methods[0]].metrics.n_bins
    lines += ["", "Selective prediction on the test split (answering the most certain first, by MSP)", "",
              f"| method | ACC | NLL | ECE×100 ({n_bins} bins) | AURC | accuracy at 80% coverage |", "|---|---|---|---|---|---|"]
    for m in methods:
        gets = [lambda r: r.metrics.acc, lambda r: r.metrics.nll, lambda r: 100 * r.metrics.ece,
                lambda r: r.selective["max_prob"]["aurc"], lambda r: r.selective["max_prob"]["accuracy_at_coverage"]]
        lines.append(f"| {m} | " + " | ".join(_cells(runs, m, get) for get in gets) + " |")
    if labelled:
        lines += ["", "Under distribution shift (ACC / NLL / ECE×100)", "",
                  "| method | " + " | ".join(labelled) + " |", "|---|" + "---|" * len(labelled)]
        for m in methods:
            cells = [" / ".join(_cells(runs, m, lambda r, s=s, k=k: scale * getattr(r.ood[s].metrics, k))
                                for k, scale in (("acc", 1), ("nll", 1), ("ece", 100))) for s in labelled]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: dict, methods: list[str], sets: list[str], path):
    """AUROC (MSP and MI) per OOD set and method with standard errors, and seed 0's risk–coverage curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sets) + 1, figsize=(4.2 * (len(sets) + 1), 4))
    for ax, name in zip(axes, sets):
        for offset, (label, score) in enumerate(SCORES):
            bars = [(i + 0.38 * offset, [_auroc(name, score)(runs[s][m]) for s in sorted(runs)])
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
    write_results(args.out, f"ood_{args.preset}", tables(runs, args.methods, list(sets), labelled),
                  {seed: {m: r.to_json() for m, r in per_seed.items()} for seed, per_seed in runs.items()},
                  time.perf_counter() - started)
    print(f"plot: {plot(runs, args.methods, list(sets), args.out / f'ood_{args.preset}.png')}")
    return runs


if __name__ == "__main__":
    main()

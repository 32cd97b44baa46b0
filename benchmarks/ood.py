"""Uncertainty a user can act on: out-of-distribution detection, distribution shift and selective prediction.

Each method of compare.py scores the in-distribution test split and some out-of-distribution sets with the
same model; the tables give, mean ± standard error over seeds:

* OOD detection: AUROC (0.5 = chance, higher is better) and FPR@95 (lower is better) of each uncertainty
  score at telling the out-of-distribution inputs from the test split: max probability (MSP) for every
  method, and for the predictives that average samples their mutual information (MI, the epistemic part);
* selective prediction on the test split: AURC (lower is better) and the accuracy on the 80% most certain;
* under a distribution shift with labels (the paper preset), ACC, NLL and ECE on the shifted sets.

Presets:

* ``overfit`` (CPU): the SST-2 fine-tune of compare.py's overfit preset (checkpoints shared with it under
  --out). Out-of-distribution inputs are texts from other domains in SST-2's prompt
  ("Review: {text} Sentiment:"): MMLU questions and BoolQ passages, cut to SST-2's length.
* ``paper`` (GPUs): the Laplace-LoRA paper's shift: fine-tune on OBQA, evaluate on ARC-C, ARC-E (small
  shift) and MMLU college chemistry and physics (large shift), in the seeds' letter prompt.

    python benchmarks/ood.py --preset overfit --seeds 3
    python benchmarks/ood.py --preset paper --model /path/to/Llama-2-7b-hf     # GPUs
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from bayes_peft.experiment import METHODS, compare, summary
from bayes_peft.metrics import save_figure
from bayes_peft.task_data import ood_task
from bayes_peft.uncertainty import draw_risk_coverage

from compare import PRESETS, add_run_options, mean_se, run_config

OOD_PRESETS = {
    # texts: OOD text sources put in the task's prompt (n each, first max_words words); shifted: labelled tasks.
    "overfit": {"task": "sst2", "texts": ["mmlu_questions", "boolq_passages"], "n": 136, "max_words": 30, "shifted": []},
    "paper": {"task": "obqa", "texts": [], "shifted": ["arc_challenge", "arc_easy", "mmlu_college_chemistry",
                                                       "mmlu_college_physics"]},
}
SCORES = [("MSP", "max_prob"), ("MI", "mutual_information")]


def ood_sets(preset: dict, config) -> dict:
    """``{name: Task}``: the preset's OOD texts in the task's prompt, and its shifted tasks."""
    task = config.load_task()
    sets = {source: ood_task(source, task, preset["n"], config.seed, preset["max_words"])
            for source in preset["texts"]}
    sets.update({name: ood_task(name, task, config.n_test, config.seed) for name in preset["shifted"]})
    return sets


def _cells(runs: dict, method: str, get) -> str:
    values = [get(runs[seed][method]) for seed in sorted(runs)]
    return "–" if any(v is None for v in values) else mean_se(values)


def _detection(name: str, score: str, key: str):
    return lambda r: r["ood"][name]["detection"].get(score, {}).get(key)


def tables(runs: dict, methods: list[str], sets: list[str], labelled: list[str]) -> str:
    """runs[seed][method] = compare()'s result → the markdown tables."""
    header = "| method | " + " | ".join(f"{s} AUROC ({label})" for s in sets for label, _ in SCORES)
    header += " | " + " | ".join(f"{s} FPR@95 (MSP)" for s in sets) + " |"
    lines = ["OOD detection (in-distribution: the test split)", "", header,
             "|---|" + "---|" * (len(sets) * (len(SCORES) + 1))]
    for method in methods:
        cells = [_cells(runs, method, _detection(s, score, "auroc")) for s in sets for _, score in SCORES]
        cells += [_cells(runs, method, _detection(s, "max_prob", "fpr_at_95_tpr")) for s in sets]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    n_bins = runs[min(runs)][methods[0]]["metrics"].n_bins
    lines += ["", "Selective prediction on the test split (answering the most certain first, by MSP)", "",
              f"| method | ACC | NLL | ECE×100 ({n_bins} bins) | AURC | accuracy at 80% coverage |",
              "|---|---|---|---|---|---|"]
    for method in methods:
        cells = [_cells(runs, method, lambda r: r["metrics"].acc), _cells(runs, method, lambda r: r["metrics"].nll),
                 _cells(runs, method, lambda r: 100 * r["metrics"].ece),
                 _cells(runs, method, lambda r: r["selective"]["max_prob"]["aurc"]),
                 _cells(runs, method, lambda r: r["selective"]["max_prob"]["accuracy_at_coverage"])]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if labelled:
        lines += ["", "Under distribution shift (ACC / NLL / ECE×100)", "",
                  "| method | " + " | ".join(labelled) + " |", "|---|" + "---|" * len(labelled)]
        for method in methods:
            cells = [" / ".join(_cells(runs, method, lambda r, s=s, k=k: scale * getattr(r["ood"][s]["metrics"], k))
                                for k, scale in (("acc", 1), ("nll", 1), ("ece", 100))) for s in labelled]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: dict, methods: list[str], sets: list[str], path: Path) -> Path:
    """AUROC (MSP and MI) per OOD set and method with standard errors, and seed 0's risk–coverage curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sets) + 1, figsize=(4.2 * (len(sets) + 1), 4))
    for ax, name in zip(axes, sets):
        for offset, (label, score) in enumerate(SCORES):
            means, errors, xs = [], [], []
            for i, method in enumerate(methods):
                values = [runs[s][method]["ood"][name]["detection"].get(score, {}).get("auroc") for s in sorted(runs)]
                if None in values:
                    continue
                xs.append(i + 0.38 * offset)
                means.append(statistics.mean(values))
                errors.append(statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0)
            ax.bar(xs, means, width=0.36, yerr=errors, capsize=2, label=label)
        ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(methods)), methods, rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0.3, 1.0)
        ax.set_title(f"OOD AUROC: {name}", fontsize=9)
        ax.legend(fontsize=7)
    first = min(runs)
    draw_risk_coverage(axes[-1], {m: runs[first][m]["prediction"] for m in methods})
    axes[-1].set_title(f"risk–coverage (MSP), seed {first}", fontsize=9)
    return save_figure(fig, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(OOD_PRESETS), default="overfit")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    add_run_options(parser)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compare"),
                        help="checkpoints are shared with compare.py's runs under this folder")
    args = parser.parse_args(argv)

    preset = OOD_PRESETS[args.preset]
    started = time.perf_counter()
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} {platform.node()}, {torch.get_num_threads()} threads, "
          f"cuda={torch.cuda.is_available()}, preset {args.preset}")
    runs: dict = {}
    for seed in range(args.seeds):
        config = run_config(args, preset["task"], seed)
        sets = ood_sets(preset, config)
        runs[seed] = compare(config, args.out / args.preset / config.task / f"seed{seed}", args.methods, ood=sets)
    names = list(sets)
    labelled = [name for name in names if sets[name].labelled]
    markdown = tables(runs, args.methods, names, labelled)
    wall = time.perf_counter() - started
    print(f"\n{markdown}\n\nTotal wall time {wall / 60:.1f} min")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"ood_{args.preset}.md").write_text(markdown + f"\n\nTotal wall time {wall / 60:.1f} min\n")
    (args.out / f"ood_{args.preset}.json").write_text(json.dumps(
        {seed: {m: summary(r) for m, r in per_seed.items()} for seed, per_seed in runs.items()}, indent=2))
    print(f"plot: {plot(runs, args.methods, names, args.out / f'ood_{args.preset}.png')}")
    return runs


if __name__ == "__main__":
    main()

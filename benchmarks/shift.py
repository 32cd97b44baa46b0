"""Calibration under a labelled shift: every method of the comparison on the test split with seeded keyboard
typos at severities 1 to 5 (bayes_peft.corruption), where a weight posterior should beat one temperature.

Temperature scaling's T and the τ* rows' τ are fitted on the in-distribution validation split only. The
checkpoints are compare.py's under --out (trained if missing). Severity 0 is the same test examples, clean.
Prints ACC, NLL, ECE and Brier per method and severity (mean ± SE over seeds), writes shift_<preset>.md/.json,
and draws ECE and NLL against severity (Ovadia et al. 2019) in shift_<preset>.png.

    python benchmarks/shift.py --preset overfit --seeds 3
"""

from __future__ import annotations

import time

from bayes_peft.benchmarking import benchmark_parser, header, mean_se, run_config, run_dir, write_results
from bayes_peft.config import PRESETS
from bayes_peft.experiment import compare
from bayes_peft.metrics import shift_plot

COLUMNS = [("ACC", lambda m: m.acc), ("NLL", lambda m: m.nll), ("ECE×100", lambda m: 100 * m.ece),
           ("Brier", lambda m: m.brier)]


def by_severity(runs: dict, method: str) -> dict[int, list]:
    """``{severity: [Metrics per seed]}`` of one method; severity 0 is the clean test split."""
    out = {0: [runs[seed][method].metrics for seed in sorted(runs)]}
    for name in runs[min(runs)][method].ood:
        out[int(name.removeprefix("typos"))] = [runs[seed][method].ood[name].metrics for seed in sorted(runs)]
    return out


def table(runs: dict, methods: list[str]) -> str:
    severities = sorted(by_severity(runs, methods[0]))
    lines = []
    for label, get in COLUMNS:
        lines += [f"{label} by severity", "", "| method | " + " | ".join(map(str, severities)) + " |",
                  "|---|" + "---|" * len(severities)]
        for method in methods:
            cells = by_severity(runs, method)
            lines.append(f"| {method} | " + " | ".join(mean_se([get(m) for m in cells[s]]) for s in severities) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = benchmark_parser(__doc__).parse_args(argv)
    ood = PRESETS[args.preset].ood
    if ood is None or not ood.severities:
        raise SystemExit(f"the {args.preset} preset defines no corrupted shift (OODSets.severities)")
    started = time.perf_counter()
    print(header(f"preset {args.preset}, keyboard typos at severities {ood.severities}"))
    runs: dict = {}
    for seed in range(args.seeds):
        config, sets = ood.corrupted(run_config(args, ood.task, seed))
        runs[seed] = compare(config, run_dir(args, config), args.methods, ood=sets,
                             results_file=f"shift_{args.preset}.json")
    write_results(args.out, f"shift_{args.preset}", table(runs, args.methods),
                  {seed: {m: r.to_json() for m, r in per_seed.items()} for seed, per_seed in runs.items()},
                  time.perf_counter() - started)
    print("plot:", shift_plot({m: by_severity(runs, m) for m in args.methods}, args.out / f"shift_{args.preset}.png",
                              title=f"{ood.task} with keyboard typos, {args.preset} preset",
                              baseline="Temperature scaling"))
    return runs


if __name__ == "__main__":
    main()

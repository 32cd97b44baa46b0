"""Calibration under a labelled shift: every method of the comparison on the test split with seeded keyboard
typos at severities 1 to 5 (bayes_peft.data.corruption), where a weight posterior should beat one temperature.

Temperature scaling's T and the τ* rows' τ are fitted on the in-distribution validation split only. The
checkpoints are compare.py's under --out (trained if missing). Severity 0 is the same test examples, clean.
Prints ACC, NLL, ECE and Brier per method and severity (mean ± SE over seeds) and each method's paired
difference to temperature scaling in ECE and NLL, writes shift_<preset>.md/.json, and draws ECE and NLL against
severity (Ovadia et al. 2019) in shift_<preset>.png. --from-results rebuilds the tables and the plot from the
results a run left in each seed's folder, without scoring anything.

    python benchmarks/shift.py --preset overfit --seeds 3
"""

from __future__ import annotations

import json
import time

from bayes_peft.config import PRESETS
from bayes_peft.evaluation.metrics import shift_plot
from bayes_peft.experiments.benchmarking import benchmark_parser, header, run_config, run_dir, write_results
from bayes_peft.experiments.compare import compare
from bayes_peft.experiments.tables import by_severity, paired_severity_tables, severity_tables

BASELINE = "Temperature scaling"


def main(argv=None) -> dict:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--from-results", action="store_true",
                        help="rebuild the tables and the plot from each seed's saved results; score nothing")
    args = parser.parse_args(argv)
    ood = PRESETS[args.preset].ood
    if ood is None or not ood.severities:
        raise SystemExit(f"the {args.preset} preset defines no corrupted shift (OODSets.severities)")
    started = time.perf_counter()
    stem = f"shift_{args.preset}"
    print(header(f"preset {args.preset}, keyboard typos at severities {ood.severities}"))
    results: dict = {}
    for seed in range(args.seeds):
        config = run_config(args, ood.task, seed)
        if args.from_results:
            saved = run_dir(args, config) / f"{stem}.json"
            if not saved.exists():
                raise SystemExit(f"{saved} does not exist: run without --from-results first")
            results[seed] = json.loads(saved.read_text())["results"]
            continue
        config, sets = ood.corrupted(config)
        runs = compare(config, run_dir(args, config), args.methods, ood=sets, results_file=f"{stem}.json")
        results[seed] = {method: result.to_json() for method, result in runs.items()}
    missing = sorted({m for per_seed in results.values() for m in args.methods if m not in per_seed})
    if missing:
        raise SystemExit(f"no results for {missing} in every seed's {stem}.json")
    markdown = ("Rebuilt from each seed's saved results (the wall time below is the rebuild's).\n\n"
                if args.from_results else "") + severity_tables(results, args.methods)
    if BASELINE in args.methods:
        markdown += "\n\n" + paired_severity_tables(results, args.methods, BASELINE)
    write_results(args.out, stem, markdown, results, time.perf_counter() - started)
    print("plot:", shift_plot({m: by_severity(results, m) for m in args.methods}, args.out / f"{stem}.png",
                              title=f"{ood.task} with keyboard typos, {args.preset} preset", baseline=BASELINE))
    return results


if __name__ == "__main__":
    main()

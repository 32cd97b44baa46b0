"""Where the evidence prior can be trusted (issue 26): Laplace-LoRA's λ along training, two optimizer settings.

For each setting of bayes_peft.experiments.evidence_study.SETTINGS (the overfit preset's AdamW, and the papers' schedule:
linear decay to 0, batch 4) it trains AdamW once, and once more with LoRA on lm_head, stage by stage, and at
the end of each of --epochs fits Laplace-LoRA with this package's factors and with Laplace-LoRA's own. It prints
one table a setting (what the evidence sees, the priors' λ, test ACC/NLL/ECE of the MAP and of each prior),
writes evidence_study.json after every point (what ran before with other --settings or --factorings stays in
it, a rerun reuses the points it holds unless --refit, and runs of different --settings may share it at once)
and draws λ and ECE against the epoch for everything it holds.

    python benchmarks/evidence_study.py --preset overfit --epochs 1 2 4 8 16 30
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from bayes_peft.experiments.benchmarking import benchmark_parser, header, run_config, run_dir
from bayes_peft.experiments.evidence_study import (FACTORINGS, SETTINGS, EvidencePoint, evidence_along_training,
                                                   evidence_plot, evidence_table)


def main(argv=None) -> dict:
    parser = benchmark_parser(__doc__, methods=False, seeds=False, options=["model", "steps", "n_test", "n_kfac"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=float, nargs="+", default=[1, 2, 4, 8, 16, 30])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--factorings", nargs="+", choices=list(FACTORINGS), default=list(FACTORINGS))
    parser.add_argument("--plot", type=Path, help="default: <out>/evidence_study_<preset>.png")
    parser.add_argument("--refit", action="store_true", help="fit again the points the JSON already holds")
    args = parser.parse_args(argv)

    base = run_config(args, None, args.seed)
    started = time.perf_counter()
    print(header(f"preset {args.preset}, task {base.data.task}, seed {args.seed}, epochs {args.epochs}"))
    out = run_dir(args, base) / "evidence_study" / "evidence_study.json"
    # What ran before stays in the JSON and the plot: other settings and factorings as they were, and the points
    # of this run's own that were fitted before (the JSON is written after every point), unless --refit.
    def saved() -> dict:
        return json.loads(out.read_text()) if out.exists() else {}

    def points(data: dict, settings) -> dict:
        return {s: [EvidencePoint.from_json(p) for p in data[s]] for s in settings if s in data}

    def save(setting):
        # Read again and replace only this setting: a run of the other setting may be writing the same file.
        data = saved()
        data[setting] = [p.to_json() for p in results[setting]]
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(f"{out.name}.{os.getpid()}")
        partial.write_text(json.dumps(data, indent=2))
        partial.replace(out)

    results = points(saved(), SETTINGS)
    factorings = {name: FACTORINGS[name] for name in args.factorings}

    for setting in args.settings:
        config = SETTINGS[setting](base)
        print(f"\n## {setting}: AdamW lr {config.train.adamw_lr:g} ({config.train.lr_schedule}), batch "
              f"{config.train.batch_size}, {config.train.steps} steps")
        folder = run_dir(args, base) / "evidence_study" / setting.rstrip("'")
        earlier_points = results.get(setting, [])
        done = {} if args.refit else {(p.factoring, p.step): p for p in earlier_points if p.factoring in factorings}
        results[setting] = [p for p in earlier_points if p.factoring not in factorings]
        for point in evidence_along_training(config, folder, args.epochs, factorings, done):
            results[setting].append(point)
            save(setting)
        print(f"\n{evidence_table(results[setting])}")
    results.update(points(saved(), [s for s in SETTINGS if s not in args.settings]))  # as others left them
    figure = evidence_plot(results, args.plot or args.out / f"evidence_study_{args.preset}.png")
    print(f"\nplot: {figure}\njson: {out}\nTotal wall time {(time.perf_counter() - started) / 60:.1f} min")
    return results


if __name__ == "__main__":
    main()

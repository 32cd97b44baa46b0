"""Which generated answers to trust: every generation method on a generative task, over seeds.

For each seed, :func:`bayes_peft.experiments.generation.compare_generation` trains AdamW, IVON and SWAG on the SFT
loss (and the LoRA ensemble's members) and every method answers the test prompts and each shift's (arithmetic's
``hard``). Prints, and saves to ``generation_<preset>.json``, the exact-match accuracy, ECE and Brier of the
confidence, AUROC and AURC of telling wrong answers from right ones, per split, mean ± SE over seeds, the paired
differences to temperature scaling, and each method's time (the tables also in ``generation_<preset>.md``); draws
the pooled answers' risk–coverage and reliability curves as PNGs.

    python benchmarks/generation.py --preset generation --seeds 3
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from bayes_peft.evaluation.generation import generation_plots
from bayes_peft.experiments.benchmarking import benchmark_parser, header, run_config, run_dir
from bayes_peft.experiments.generation import GENERATION_METHODS, compare_generation
from bayes_peft.experiments.tables import generation_tables


def main(argv=None) -> dict:
    parser = benchmark_parser(__doc__, methods=False)
    parser.add_argument("--methods", nargs="+", default=list(GENERATION_METHODS), choices=list(GENERATION_METHODS))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.set_defaults(preset="generation", out=Path("benchmarks/results/generation"))
    args = parser.parse_args(argv)

    started = time.perf_counter()
    print(header(f"preset {args.preset}, {args.seeds} seeds"))
    seeds, pooled = {}, {m: {"correct": [], "confidence": []} for m in args.methods}
    for seed in range(args.seeds):
        config = run_config(args, None, seed)
        results = compare_generation(config, run_dir(args, config), args.methods)
        seeds[str(seed)] = {m: {k: v for k, v in r.items() if k != "answers"} for m, r in results.items()}
        for m, r in results.items():
            for key in pooled[m]:
                pooled[m][key] += r["answers"]["test"][key]
    saved = {"command": "python benchmarks/generation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
             "config": config.as_dict(), "seeds": seeds}
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"generation_{args.preset}.json"
    path.write_text(json.dumps(saved, indent=2))
    title = f"{config.data.task}, {args.seeds} seeds pooled"
    generation_plots(pooled, args.results / f"generation_{args.preset}_risk_coverage.png",
                     args.results / f"generation_{args.preset}_reliability.png", title=title)
    tables = generation_tables(saved)
    path.with_suffix(".md").write_text(tables + "\n")  # RESULTS.md shows their summary
    print(f"\n{tables}\n\n{path}; wall time {(time.perf_counter() - started) / 60:.1f} min")
    return saved


if __name__ == "__main__":
    main()

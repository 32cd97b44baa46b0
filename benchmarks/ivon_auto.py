"""IVON's automatic setting against hand-set ones: does a posterior learned from the data match a grid search?

Per seed, on the preset's data (by default the overfit preset; ``--preset unsaturated``, 384 examples for 3
epochs, is the held-out setting, on which nothing is tuned):

- IVON with the IVON-LoRA paper's values (ess 1e7, hess_init 3e-4);
- IVON by a grid, ess ∈ {1e5, 1e6, 1e7, 1e8} at hess_init 3e-4 (``--grid``), each trained, the one with the
  lowest validation NLL of the sampled predictive kept (the test split never enters the choice);
- IVON automatic (``bp.IVON(params, lr, n_data=N)``), at τ = 1 and at τ* chosen on validation (τ > 1 allowed);
- AdamW and temperature scaling, for reference.

Each training is a folder under ``--out``, reused by a later call (so seeds can be added one call at a time:
``--seed-list 1 2``); every seed's rows go into ``ivon_auto_<setting>.json`` beside what an earlier call
wrote, with the learned σ's spread (its coefficient of variation over weights and the median h / hess_init).
``--only-automatic`` trains and scores the automatic rows alone and keeps the seed's other rows from the JSON, for a
change that moves only them (the seed's entry lists the rows it rescored).

    python benchmarks/ivon_auto.py --seed-list 0 1 2
    python benchmarks/ivon_auto.py --preset unsaturated --seed-list 0 --setting heldout
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from bayes_peft.config import IVON_AUTOMATIC, IVON_RECIPE
from bayes_peft.evaluation.evaluator import Evaluator
from bayes_peft.experiments.benchmarking import benchmark_parser, header, run_config
from bayes_peft.experiments.compare import compare
from bayes_peft.experiments.methods import METHODS
from bayes_peft.experiments.runs import train_checkpoint
from bayes_peft.experiments.tables import ivon_auto_tables

GRID = (1e5, 1e6, 1e7, 1e8)
ROWS = {"paper": "IVON, paper (ess 1e7, h₀ 3e-4)", "grid": "IVON, grid pick (validation NLL)",
        "auto": "IVON automatic (τ = 1)", "auto_tau": "IVON automatic (τ*)"}


def _hand_set(ess: float) -> dict:
    return {"train.ivon.ess": ess, "train.ivon.hess_init": IVON_RECIPE.hess_init}


def _validation_nll(config, folder: Path) -> float:
    """The sampled IVON predictive's NLL on the validation split of the run trained in ``folder``."""
    checkpoint = train_checkpoint(config, "ivon", folder / "ivon")
    method = METHODS["IVON"]
    evaluator = Evaluator(checkpoint.model, method.posterior(checkpoint), checkpoint.task, progress=config.progress)
    return method.predict(evaluator, checkpoint.loader("validation"), checkpoint).metrics().nll


def _training(folder: Path) -> dict:
    """What the IVON run in ``folder`` chose and learned (its posterior's JSON)."""
    return json.loads((folder / "ivon" / "posterior.json").read_text()).get("training", {})


def _automatic(base, root: Path) -> dict:
    """The automatic rule's rows (τ = 1 and τ*), its τ* and what it learned."""
    auto = compare(base.override(IVON_AUTOMATIC), root / "automatic", ["IVON", "IVON (τ*)"])
    return {"rows": {ROWS["auto"]: auto["IVON"].metrics.as_dict(), ROWS["auto_tau"]: auto["IVON (τ*)"].metrics.as_dict()},
            "tau_star": auto["IVON (τ*)"].settings["tau"], "training": {ROWS["auto"]: _training(root / "automatic")},
            "config": base.override(IVON_AUTOMATIC).as_dict()}


def rescore_automatic(args, seed: int, earlier: dict) -> dict:
    """``earlier`` (a seed's entry of the JSON) with its automatic rows trained and scored again."""
    new = _automatic(run_config(args, seed=seed), args.out / args.setting / f"seed{seed}")
    rows = {name: new["rows"].get(name, row) for name, row in earlier["rows"].items()}
    return {**earlier, **new, "rows": rows, "training": {**earlier["training"], **new["training"]},
            "rescored": list(new["rows"])}


def run_seed(args, seed: int) -> dict:
    """The rows of one seed, and how they came to be."""
    base = run_config(args, seed=seed)
    root = args.out / args.setting / f"seed{seed}"
    grid = {}
    for ess in args.grid:
        grid[f"{ess:g}"] = _validation_nll(base.override(_hand_set(ess)), root / f"ess{ess:g}")
        print(f"seed {seed} ess {ess:g}: validation NLL {grid[f'{ess:g}']:.4f}", flush=True)
    pick = min(grid, key=grid.get) if grid else None
    rows, settings, tested = {}, {}, {}
    hand_set = [("paper", IVON_RECIPE.ess), *([("grid", float(pick))] if grid else [])]
    for key, ess in hand_set:
        if ess not in tested:  # the grid's pick is often the paper's ess: its test split is scored once
            tested[ess] = compare(base.override(_hand_set(ess)), root / f"ess{ess:g}", ["IVON"])["IVON"]
        rows[ROWS[key]] = tested[ess].metrics.as_dict()
        settings[ROWS[key]] = _training(root / f"ess{ess:g}")
    auto = _automatic(base, root)
    rows.update(auto["rows"])
    reference = compare(base, root / "adamw", ["AdamW (MAP)", "Temperature scaling"])
    rows.update({m: r.metrics.as_dict() for m, r in reference.items()})
    return {**auto, "rows": rows, "grid_validation_nll": grid, "grid_pick": pick,
            "training": {**settings, **auto["training"]}}


def main(argv=None) -> dict:
    parser = benchmark_parser(__doc__, methods=False, seeds=False)
    parser.add_argument("--seed-list", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--setting", default="overfit", help="the name of this data setting in the JSON")
    parser.add_argument("--grid", type=float, nargs="*", default=list(GRID),
                        help="the ess values of the grid row (none: no grid row)")
    parser.add_argument("--only-automatic", action="store_true",
                        help="train and score only the automatic rows; the seed's other rows stay as the JSON has them")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.set_defaults(out=Path("benchmarks/results/ivon_auto"))
    args = parser.parse_args(argv)

    started = time.perf_counter()
    print(header(f"preset {args.preset}, setting {args.setting}, seeds {args.seed_list}"))
    path = args.results / f"ivon_auto_{args.setting}.json"
    saved = json.loads(path.read_text()) if path.exists() else {"seeds": {}}
    missing = [seed for seed in args.seed_list if str(seed) not in saved["seeds"]]
    if args.only_automatic and missing:
        parser.error(f"--only-automatic keeps the other rows of seeds {missing}, which {path} does not have")
    for seed in args.seed_list:
        earlier = saved["seeds"].get(str(seed))
        saved["seeds"][str(seed)] = rescore_automatic(args, seed, earlier) if args.only_automatic else run_seed(args, seed)
        saved["command"] = "python benchmarks/ivon_auto.py " + " ".join(argv if argv is not None else sys.argv[1:])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(saved, indent=2))  # after every seed: a seed takes an hour on a CPU
    print(f"\n{ivon_auto_tables(saved)}\n\n{path}; wall time {(time.perf_counter() - started) / 60:.1f} min")
    return saved


if __name__ == "__main__":
    main()

"""Render every table of benchmarks/RESULTS.md from the JSON its benchmark saved under benchmarks/results/.

RESULTS.md holds prose written by people and tables written by this script: each table sits between
``<!-- table NAME -->`` and ``<!-- end table -->``, and NAME is a key of TABLES below, which says which JSON it
reads and how it is drawn (with the renderers the benchmark scripts print with, bayes_peft.experiments.tables).

    python benchmarks/report.py            # rewrite RESULTS.md's tables from their JSON
    python benchmarks/report.py --check    # exit 1 and show the difference if a table is not what its JSON renders to
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path
from typing import Callable

from bayes_peft.experiments.evidence_study import EvidencePoint, evidence_table
from bayes_peft.experiments.methods import METHODS
from bayes_peft.experiments.tables import (demo_table, fsdp_table, ood_detection_table, paired_severity_tables, paired_table,
                                           recorded_tables, seed_method_tables, selective_table, severity_tables,
                                           ivon_auto_tables, generation_summary, tau_tables)

RESULTS = Path(__file__).with_name("RESULTS.md")
DATA = Path(__file__).with_name("results")
BLOCK = re.compile(r"(<!-- table (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end table -->)", re.S)

# Paired by seed, the differences that decide the comparison (the seed moves every method together).
PAIRS = [("IVON", "SWAG"), ("IVON", "LA-KFAC validation"), ("IVON", "LA-KFAC evidence"),
         ("IVON", "Temperature scaling"), ("LA-KFAC validation", "Temperature scaling"),
         ("LoRA ensemble", "AdamW (MAP)"), ("SWA", "AdamW (MAP)"), ("LLLA validation", "LA-KFAC validation")]
# Under shift, LA-diag equals LA-KFAC, the checkpoint ensemble AdamW and AdamW+lm_head is within AdamW's SE: the
# shift tables leave them out (shift_overfit.json and .md hold every row).
SHIFT_METHODS = ["AdamW (MAP)", "Temperature scaling", "MC-dropout", "LA-KFAC evidence", "LA-KFAC validation",
                 "LA-KFAC evidence (τ*)", "LLLA evidence", "LLLA validation", "IVON@mean", "IVON", "IVON (τ*)", "SWA",
                 "SWAG", "LoRA ensemble"]
SHIFT_PAIRED = ["LA-KFAC validation", "LLLA validation", "LLLA evidence", "IVON", "SWAG", "LoRA ensemble",
                "AdamW (MAP)"]


# The evidence prior's rows (issue 39): the default against the MAP it should improve, as published, and the baseline.
EVIDENCE_PAIRS = [("LA-KFAC evidence", "AdamW (MAP)"), ("LA-KFAC evidence", "LA-KFAC evidence (published)"),
                  ("LA-KFAC evidence", "Temperature scaling")]


def load(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def _every_method() -> str:
    seeds = load("compare/overfit_every_method.json")["seeds"]
    methods = list(seeds["0"])
    return seed_method_tables(seeds, methods, {m: str(METHODS[m].cost) for m in methods}, per_seed=False)


def _selective() -> str:
    runs = load("compare/overfit.json")["sst2"]
    return selective_table(runs, list(runs["0"]))


def _shift() -> str:
    results = load("shift_overfit.json")
    return "\n\n".join([severity_tables(results, SHIFT_METHODS, keys=("ece",)),
                        paired_severity_tables(results, SHIFT_PAIRED, "Temperature scaling")])


def _ood() -> str:
    runs = load("compare/ood_overfit.json")
    first = runs[min(runs)]
    return ood_detection_table(runs, list(first), list(next(iter(first.values()))["ood"]))


def _evidence_rows(preset: str, rows: bool = True) -> str:
    """The evidence prior's compare.py rows on ``preset`` (with ``rows``; the overfit preset's are in the every-method
    table), mean ± SE (the prose gives the seeds that matter), and their paired differences."""
    seeds = load(f"compare/evidence_{preset}.json")["sst2"]
    return "\n\n".join([*([seed_method_tables(seeds, list(seeds["0"]), per_seed=False)] if rows else []),
                        paired_table(seeds, EVIDENCE_PAIRS)])


def _evidence_study(preset: str) -> str:
    data = load(f"evidence_study_{preset}.json")
    tables = {setting: evidence_table([EvidencePoint.from_json(p) for p in points]) for setting, points in data.items()}
    if len(tables) == 1:  # the prose names the one setting
        return next(iter(tables.values()))
    return "\n\n".join(f"Setting \"{setting}\"\n\n{table}" for setting, table in tables.items())


TABLES: dict[str, Callable[[], str]] = {
    "demo": lambda: demo_table(load("demo.json")["results"]),
    "every-method": _every_method,
    "every-method-paired": lambda: paired_table(load("compare/overfit_every_method.json")["seeds"], PAIRS),
    "selective": _selective,
    # The error does not move with τ, and LA-diag's rows are LA-KFAC's within 0.012 NLL: both said in the prose.
    "tau": lambda: tau_tables(load("tau_sweep.json"), [m for m in load("tau_sweep.json") if not m.startswith("LA-diag")],
                              error=False),
    "shift": _shift,
    "ood": _ood,
    "evidence-study-overfit": lambda: _evidence_study("overfit"),
    "evidence-study-unsaturated": lambda: _evidence_study("unsaturated"),
    "evidence-overfit": lambda: _evidence_rows("overfit", rows=False),
    "evidence-unsaturated": lambda: _evidence_rows("unsaturated"),
    "ivon-auto": lambda: ivon_auto_tables(load("ivon_auto_overfit.json")),
    "ivon-auto-heldout": lambda: ivon_auto_tables(load("ivon_auto_heldout.json")),
    "generation": lambda: generation_summary(load("generation_generation.json")),
    "trajectory": lambda: recorded_tables(load("trajectory_overfit.json")),
    "speed-cpu": lambda: recorded_tables(load("speed_cpu.json")),
    "task-baselines": lambda: recorded_tables(load("task_baselines.json")),
    "gpu": lambda: recorded_tables(load("gpu.json")),
    "fsdp": lambda: fsdp_table(load("fsdp_overfit.json")),
}


def render(text: str) -> str:
    """``text`` with every table block replaced by what its JSON renders to. A block whose name is not in
    TABLES, or a table of TABLES with no block, is an error: nothing is dropped or left stale in silence."""
    names = [m["name"] for m in BLOCK.finditer(text)]
    unknown, missing = sorted(set(names) - set(TABLES)), sorted(set(TABLES) - set(names))
    if unknown or missing:
        raise ValueError(f"RESULTS.md's table blocks do not match report.TABLES: unknown {unknown}, missing {missing}")
    return BLOCK.sub(lambda m: f"{m[1]}{TABLES[m['name']]()}\n{m[4]}", text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is out of date")
    args = parser.parse_args(argv)
    text = RESULTS.read_text()
    rendered = render(text)
    if args.check:
        if rendered != text:
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), rendered.splitlines(True),
                                                       "RESULTS.md", "rendered from benchmarks/results/"))
            return 1
        print(f"{RESULTS}: every table is what its JSON renders to")
        return 0
    RESULTS.write_text(rendered)
    print(f"{RESULTS}: {len(TABLES)} tables rendered")
    return 0


if __name__ == "__main__":
    sys.exit(main())

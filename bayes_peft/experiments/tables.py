"""Markdown tables of benchmark results, from the JSON the benchmark scripts save.

One renderer per kind of result, used both by the script that produced it (to print its tables) and by
``benchmarks/report.py`` (to write them into ``benchmarks/RESULTS.md``), so that a table reads the same
wherever it appears and RESULTS.md can be checked against its JSON. Every cell over seeds is mean ± standard
error (:func:`~bayes_peft.experiments.benchmarking.mean_se`). Inputs are the saved JSON, not live objects:

- a comparison's results, ``{seed: {method: MethodResult.to_json()}}`` (compare, shift, OOD);
- a τ sweep's, ``{method: {seed: [{"tau": τ, "acc": …, "nll": …, "ece": …}, …]}}``;
- a recorded benchmark's, ``{"tables": [{"title", "columns", "rows"}]}``, for scripts that print their figures.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

from ..evaluation.metrics import Metrics
from .benchmarking import mean_se
from .methods import METHODS

__all__ = ["ivon_auto_tables", "generation_tables", "generation_summary", "fsdp_table", "markdown_table", "recorded_tables", "by_severity", "severity_tables", "paired_severity_tables",
           "tau_tables", "ood_detection_table", "ood_tables", "ood_auroc", "selective_table", "method_table",
           "seed_method_tables", "paired_table", "demo_table", "metric", "METRIC_COLUMNS", "OOD_SCORES"]

#: The four metrics of every comparison, in the order of the tables: label, key, scale and decimals shown.
METRIC_COLUMNS: list[tuple[str, str, float, int]] = [("ACC", "acc", 1, 3), ("NLL", "nll", 1, 3),
                                                     ("ECE×100", "ece", 100, 1), ("Brier", "brier", 1, 3)]


def metric(result: Union[Metrics, Mapping], key: str, scale: float = 1) -> float:
    """One metric of a :class:`Metrics`, of a result JSON (``{"metrics": {...}}``) or of the metrics' own JSON."""
    if isinstance(result, Metrics):
        return scale * getattr(result, key)
    return scale * (result["metrics"] if "metrics" in result else result)[key]


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """``| a | b |`` lines: the header, the rule and one line per row (cells as given, ``str`` of each)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _titled(title: Optional[str], table: str) -> str:
    return f"{title}\n\n{table}" if title else table


def recorded_tables(recorded: Mapping) -> str:
    """The tables of a benchmark whose script prints its figures: ``{"tables": [{"title", "columns", "rows"}]}``."""
    return "\n\n".join(_titled(t.get("title"), markdown_table(t["columns"], t["rows"])) for t in recorded["tables"])


def by_severity(results: Mapping, method: str) -> dict[int, list[Metrics]]:
    """``{severity: [Metrics per seed]}`` of one method of a shift run (``{seed: {method: result}}``, its OOD
    sets named ``typos<severity>``); severity 0 is the clean test split."""
    seeds = sorted(results)
    out = {0: [Metrics(**results[seed][method]["metrics"]) for seed in seeds]}
    for name in results[seeds[0]][method]["ood"]:
        out[int(name.removeprefix("typos"))] = [Metrics(**results[seed][method]["ood"][name]["metrics"])
                                                for seed in seeds]
    return out


def severity_tables(results: Mapping, methods: Sequence[str],
                    keys: Sequence[str] = ("acc", "nll", "ece", "brier")) -> str:
    """One table per metric of ``keys``: methods × severities, mean ± SE over seeds."""
    severities = sorted(by_severity(results, methods[0]))
    tables = []
    for label, key, scale, digits in [column for column in METRIC_COLUMNS if column[1] in keys]:
        rows = [[method, *(mean_se([metric(m, key, scale) for m in by_severity(results, method)[s]], digits)
                           for s in severities)] for method in methods]
        tables.append(_titled(f"{label} by severity", markdown_table(["method", *map(str, severities)], rows)))
    return "\n\n".join(tables)


def paired_severity_tables(results: Mapping, methods: Sequence[str], baseline: str) -> str:
    """Each method's ECE×100 and NLL minus ``baseline``'s, seed by seed, mean ± SE per severity: below zero,
    it is better calibrated than the baseline there."""
    base = by_severity(results, baseline)
    severities = sorted(base)
    tables = []
    for label, key, scale, digits in [column for column in METRIC_COLUMNS if column[1] in ("ece", "nll")]:
        rows = []
        for method in methods:
            if method != baseline:
                cells = by_severity(results, method)
                rows.append([method, *(mean_se([metric(m, key, scale) - metric(b, key, scale)
                                                for m, b in zip(cells[s], base[s], strict=True)], digits)
                                       for s in severities)])
        tables.append(_titled(f"{label}: method − {baseline}, paired by seed",
                              markdown_table(["method", *map(str, severities)], rows)))
    return "\n\n".join(tables)


def tau_tables(sweeps: Mapping, methods: Optional[Sequence[str]] = None, error: bool = True) -> str:
    """Test error (%) (with ``error``), NLL and ECE×100 by τ: one table each, methods × τ, mean ± SE over seeds."""
    methods = list(methods or sweeps)
    first = next(iter(sweeps[methods[0]].values()))
    taus = [point["tau"] for point in first]
    tables = []
    quantities = [("test error (%)", lambda p: 100 * (1 - p["acc"]), 1)] if error else []
    for label, get, digits in [*quantities, ("NLL", lambda p: p["nll"], 3), ("ECE×100", lambda p: 100 * p["ece"], 1)]:
        rows = []
        for method in methods:
            runs = list(sweeps[method].values())
            rows.append([method, *(mean_se([get(run[i]) for run in runs], digits) for i in range(len(taus)))])
        tables.append(_titled(f"{label} by τ", markdown_table(["method", *(f"τ={t:g}" for t in taus)], rows)))
    return "\n\n".join(tables)


OOD_SCORES = [("MSP", "max_prob"), ("MI", "mutual_information")]


def _cells(results: Mapping, method: str, get: Callable[[Mapping], Optional[float]]) -> str:
    values = [get(results[seed][method]) for seed in sorted(results)]
    return "–" if any(v is None for v in values) else mean_se(values)


def ood_auroc(name: str, score: str, key: str = "auroc") -> Callable[[Mapping], Optional[float]]:
    """A getter of one OOD set's detection figure from a method's result JSON (None where it has no such score)."""
    return lambda result: result["ood"][name]["detection"].get(score, {}).get(key)


def ood_detection_table(results: Mapping, methods: Sequence[str], sets: Sequence[str]) -> str:
    """AUROC by MSP and MI and FPR@95 by MSP of each OOD set against the test split; ``results[seed][method]``
    as saved."""
    columns = ["method", *(f"{s} AUROC ({label})" for s in sets for label, _ in OOD_SCORES),
               *(f"{s} FPR@95 (MSP)" for s in sets)]
    rows = [[m, *(_cells(results, m, ood_auroc(s, score)) for s in sets for _, score in OOD_SCORES),
             *(_cells(results, m, ood_auroc(s, "max_prob", "fpr_at_95_tpr")) for s in sets)] for m in methods]
    return _titled("OOD detection (in-distribution: the test split)", markdown_table(columns, rows))


def ood_tables(results: Mapping, methods: Sequence[str], sets: Sequence[str], labelled: Sequence[str] = ()) -> str:
    """OOD detection, selective prediction on the test split, and the labelled shifts' ACC / NLL / ECE×100."""
    tables = [ood_detection_table(results, methods, sets), selective_table(results, methods)]
    if labelled:
        rows = [[m, *(" / ".join(_cells(results, m, lambda r, s=s, k=k: scale * r["ood"][s]["metrics"][k])
                                 for k, scale in (("acc", 1), ("nll", 1), ("ece", 100))) for s in labelled)]
                for m in methods]
        tables.append(_titled("Under distribution shift (ACC / NLL / ECE×100)",
                              markdown_table(["method", *labelled], rows)))
    return "\n\n".join(tables)


def selective_table(results: Mapping, methods: Sequence[str]) -> str:
    """AURC and the accuracy on the 80% most certain (by max probability) of the test split, mean ± SE over
    seeds; ``results[seed][method]`` as saved."""
    gets = [lambda r: r["selective"]["max_prob"]["aurc"], lambda r: r["selective"]["max_prob"]["accuracy_at_coverage"]]
    return _titled("Selective prediction on the test split (answering the most certain first, by MSP)",
                   markdown_table(["method", "AURC", "accuracy at 80% coverage"],
                                  [[m, *(_cells(results, m, get) for get in gets)] for m in methods]))


def seed_method_tables(results: Mapping, methods: Sequence[str], costs: Mapping[str, str] = {},
                       per_seed: bool = True, titled: bool = True) -> str:
    """``results[seed][method]`` (a result JSON, or its metrics alone) → the table of mean ± SE over seeds (with
    each method's cost where given; its title with ``titled``) and, with ``per_seed``, the table of every seed's
    ACC / NLL / ECE×100."""
    seeds = sorted(results, key=int)
    head = ["method", *(["cost: trainings / extra passes / test passes"] if costs else []),
            *(label for label, *_ in METRIC_COLUMNS)]
    rows = [[m, *([costs.get(m, "")] if costs else []),
             *(mean_se([metric(results[s][m], key, scale) for s in seeds], digits)
               for _, key, scale, digits in METRIC_COLUMNS)] for m in methods]
    seed_rows = [[m, *(" / ".join(f"{metric(results[s][m], key, scale):.{digits}f}"
                                 for _, key, scale, digits in METRIC_COLUMNS[:3]) for s in seeds)] for m in methods]
    tables = [_titled(f"Mean ± SE over {len(seeds)} seeds" if titled else None, markdown_table(head, rows))]
    if per_seed:
        tables.append(_titled("Per seed (ACC / NLL / ECE×100)",
                              markdown_table(["method", *(f"seed {s}" for s in seeds)], seed_rows)))
    return "\n\n".join(tables)


def method_table(results: Mapping, tasks: Sequence[str], methods: Sequence[str]) -> str:
    """``results[task][seed][method]`` (:class:`~bayes_peft.experiments.compare.MethodResult`) → rows methods ×
    metrics, columns the tasks and their average, each cell mean ± SE over seeds (IVON-LoRA's Table 1), with each
    method's cost (:class:`~bayes_peft.experiments.methods.Cost`); then the wall time by method."""
    first = next(iter(next(iter(results.values())).values()))[methods[0]]
    rows = []
    for method in methods:
        for row, (label, key, scale, digits) in enumerate(METRIC_COLUMNS):
            cells, per_seed_average = [], {}
            for task in tasks:
                values = [metric(results[task][seed][method].metrics, key, scale) for seed in sorted(results[task])]
                cells.append(mean_se(values, digits))
                for seed, value in zip(sorted(results[task]), values):
                    per_seed_average.setdefault(seed, []).append(value)
            average = mean_se([sum(v) / len(v) for v in per_seed_average.values()], digits)
            label = f"{label} ({first.metrics.n_bins} bins)" if key == "ece" else label
            cost = str(METHODS[method].cost) if row == 0 and method in METHODS else ""
            rows.append([method if row == 0 else "", cost, label, *cells, average])
    seconds = {m: sum(results[t][s][m].seconds for t in tasks for s in results[t]) for m in methods}
    return (markdown_table(["method", "cost: trainings / extra passes / test passes", "metric", *tasks, "average"],
                           rows)
            + "\n\nWall time by method (training is charged to the first method that reads a checkpoint): "
            + ", ".join(f"{m} {s:.0f} s" for m, s in seconds.items()))


def paired_table(results: Mapping, pairs: Sequence[tuple[str, str]]) -> str:
    """ACC, NLL and ECE×100 of ``a − b`` for each pair, seed by seed, mean ± SE (the seed moves every method
    together, so paired differences resolve what the marginal errors hide)."""
    seeds = sorted(results, key=int)
    rows = [[f"{a} − {b}", *(mean_se([metric(results[s][a], key, scale) - metric(results[s][b], key, scale)
                                      for s in seeds], digits) for _, key, scale, digits in METRIC_COLUMNS[:3])]
            for a, b in pairs]
    return markdown_table(["paired difference over seeds", "ΔACC", "ΔNLL", "ΔECE×100"], rows)


def demo_table(results: Mapping) -> str:
    """The demo's rows (``{method: MethodResult.to_json()}``): ACC, NLL, ECE, Brier and what each method chose
    on validation, as the demo prints them."""
    rows = [[method, *(f"{r['metrics'][k]:.3f}" for k in ("acc", "nll", "ece", "brier")),
             ", ".join(f"{k} {v:.3g}" for k, v in r.get("settings", {}).items())] for method, r in results.items()]
    return markdown_table(["method", "ACC", "NLL", "ECE", "Brier", "chosen on validation"], rows)


def fsdp_table(result: Mapping) -> str:
    """``benchmarks/fsdp.py``'s run: IVON's test metrics at the mean and sampled, with the ranks and the time."""
    rows = [[f"IVON {'at the mean' if method == 'mean' else 'sampled'}", *(
        f"{metric(m, k, 100 if k == 'ece' else 1):.{1 if k == 'ece' else 3}f}" for k in ("acc", "nll", "ece", "brier"))]
        for method, m in result["metrics"].items()]
    title = (f"{result['ranks']} ranks ({result['backend']}), {result['steps']} steps of {result['batch_per_rank']} a "
             f"rank, {result['seconds']:.0f} s")
    return _titled(title, markdown_table(["method", "ACC", "NLL", "ECE×100", "Brier"], rows))


def ivon_auto_tables(saved: Mapping) -> str:
    """``benchmarks/ivon_auto.py``'s JSON → its rows mean ± SE over seeds, their paired differences to the
    grid's pick (from 2 seeds on), and a line of what each seed chose (the grid's ess, τ*) and learned (the
    automatic run's σ)."""
    seeds = saved["seeds"]
    results = {s: seeds[s]["rows"] for s in seeds}
    methods = list(next(iter(results.values())))
    grid = next((m for m in methods if "grid" in m), None)
    baseline = grid or next(m for m in methods if m.startswith("IVON"))  # the paper's values, without a grid
    parts = [seed_method_tables(results, methods, per_seed=False, titled=len(seeds) > 1)]
    if len(seeds) > 1:
        ivon = [m for m in methods if m.startswith("IVON") and m != baseline]
        parts.append(_titled(f"Paired differences to {baseline}", paired_table(results, [(m, baseline) for m in ivon])))
    order = sorted(seeds, key=int)
    runs = [seeds[s] for s in order]
    autos = [next(t for t in run["training"].values() if t.get("automatic")) for run in runs]

    def by_seed(template: str, values) -> str:
        return " / ".join(template.format(v) for v in values)

    grid = (f"the grid's ess {by_seed('{:.0e}', [float(run['grid_pick']) for run in runs])}; "
            if all(run["grid_pick"] for run in runs) else "")
    parts.append(f"Seed {' / '.join(order)}: {grid}τ* {by_seed('{:g}', [run['tau_star'] for run in runs])}; the "
                 f"automatic run's σ median {by_seed('{:.3g}', [a['sd_median'] for a in autos])}, coefficient of "
                 f"variation {by_seed('{:.3f}', [a['sd_cv'] for a in autos])}, median h / h₀ "
                 f"{by_seed('{:.3g}', [a['hess_over_init_median'] for a in autos])}.")
    return "\n\n".join(parts)


#: The columns of a generation table: label, key of GeneratedAnswers.metrics, scale and decimals shown.
GENERATION_COLUMNS: list[tuple[str, str, float, int]] = [
    ("EM", "acc", 1, 3), ("ECE×100", "ece", 100, 1), ("Brier", "brier", 1, 3),
    ("AUROC (1 − conf.)", "auroc (1 - confidence)", 1, 3), ("AURC (1 − conf.)", "aurc (1 - confidence)", 1, 3),
    ("AUROC (MI)", "auroc (mutual information)", 1, 3)]


def generation_tables(saved: Mapping, baseline: str = "Temperature scaling") -> str:
    """From ``{"seeds": {seed: {method: compare_generation's result}}}``: the test split's and each shift's table
    (mean ± SE over seeds, the time of each method) and the paired differences to ``baseline`` on the test split."""
    runs = list(saved["seeds"].values())
    methods = list(runs[0])
    shifts = sorted(runs[0][methods[0]]["shifts"])

    def table(where: Callable[[Mapping], Mapping], with_time: bool) -> str:
        rows = []
        for m in methods:
            cells = [mean_se([scale * where(run[m])[key] for run in runs], digits)
                     for _, key, scale, digits in GENERATION_COLUMNS]
            rows.append([m, *cells, *([mean_se([run[m]["seconds"] for run in runs], 0)] if with_time else [])])
        return markdown_table(["method", *(c[0] for c in GENERATION_COLUMNS), *(["seconds"] if with_time else [])],
                              rows)

    parts = [_titled("test (easy and medium)", table(lambda r: r["test"], True))]
    parts += [_titled(f"shift: {name}", table(lambda r, name=name: r["shifts"][name], False)) for name in shifts]
    if baseline in methods:
        rows = [[m, *(mean_se([scale * (run[m]["test"][key] - run[baseline]["test"][key]) for run in runs], digits)
                      for _, key, scale, digits in GENERATION_COLUMNS)]
                for m in methods if m != baseline]
        parts.append(_titled(f"paired differences to {baseline} (test)",
                             markdown_table(["method", *(c[0] for c in GENERATION_COLUMNS)], rows)))
    return "\n\n".join(parts)


def generation_summary(saved: Mapping) -> str:
    """One table of :func:`generation_tables`' main figures, mean ± SE over seeds: exact match, ECE×100, and the
    AUROC and AURC of 1 − confidence on the test split, the first three on each shift, and each method's time."""
    runs = list(saved["seeds"].values())
    methods = list(runs[0])
    test = [("EM", "acc", 1, 3), ("ECE×100", "ece", 100, 1), ("AUROC", "auroc (1 - confidence)", 1, 3),
            ("AURC", "aurc (1 - confidence)", 1, 3)]
    columns = [(label, None, key, scale, digits) for label, key, scale, digits in test]
    columns += [(f"{shift}: {label}", shift, key, scale, digits)
                for shift in sorted(runs[0][methods[0]]["shifts"]) for label, key, scale, digits in test[:3]]
    rows = []
    for m in methods:
        cells = [mean_se([scale * (run[m]["test"] if where is None else run[m]["shifts"][where])[key] for run in runs],
                         digits) for _, where, key, scale, digits in columns]
        rows.append([m, *cells, mean_se([run[m]["seconds"] for run in runs], 0)])
    return markdown_table(["method", *(c[0] for c in columns), "seconds"], rows)

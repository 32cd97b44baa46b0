"""The demo: AdamW, IVON and Laplace-LoRA on the embedded SmolLM2 and real SST-2 data, on a CPU.

It trains LoRA with AdamW and with IVON, fits Laplace-LoRA on the AdamW adapter, prints the comparison
table, and writes the τ-sweep plot (error against NLL of the linearized predictive, τ = 0…1) and a
reliability diagram per method under ``out``. The Laplace row is its sweep's τ = 1, so its linearized
moments are computed once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from .evaluate import Evaluator
from .experiment import RunConfig, compare
from .laplace import evidence_prior, fit_laplace
from .metrics import reliability_diagram

TAUS = [i / 10 for i in range(11)]


def run(quick: bool = False, out: Path = Path("demo_out"), seed: int = 0, model: str = "smollm2-135m",
        steps: Optional[int] = None) -> dict:
    """Run the demo. Full: 60 steps each, 160 test examples, 4 samples, Laplace fitted on 160 training
    examples. ``quick``: 30 steps, 64 test examples, 2 samples, Laplace on 64."""
    start = time.perf_counter()
    out = Path(out)
    size = 64 if quick else 160
    config = RunConfig(task="sst2", model=model, seed=seed, steps=steps or (30 if quick else 60), n_test=size,
                       n_samples=2 if quick else 4, laplace_examples=size, ess=1e6, hess_init=3e-4,
                       clip_radius=1e-2)
    print(f"bayes_peft demo: SmolLM2-135M-Instruct + LoRA on SST-2, {config.steps} steps each for AdamW and IVON, "
          f"{size} test examples{' (quick)' if quick else ''}; output in {out}/")
    results = compare(config, out / "checkpoints" / ("quick" if quick else "full"), ("AdamW (MAP)", "IVON@mean", "IVON"),
                      log=lambda _: None)

    adamw = results["AdamW (MAP)"]
    fit_on = config.load_task().subset(n_train=size, seed=seed).loader(adamw["tokenizer"], "train", 16, shuffle=False)
    laplace = fit_laplace(adamw["model"], fit_on, n_kfac=config.n_kfac, prior=1.0)
    laplace = laplace.with_prior_precision(evidence_prior(laplace))
    sweeps = []
    for posterior, label in ((results["IVON"]["posterior"], "IVON (linearized)"), (laplace, "LA-KFAC evidence")):
        sweep = Evaluator(posterior.model, posterior).sweep_tau(adamw["test"], TAUS, method="linearized")
        sweep.method = label
        sweeps.append(sweep)
    results["LA-KFAC evidence"] = {"metrics": sweeps[1].metrics[-1], "prediction": sweeps[1].predictions[-1]}

    print(f"\n{'method':<18}{'ACC':>7}{'NLL':>7}{'ECE':>7}{'Brier':>7}")
    for method, r in results.items():
        m, p = r["metrics"], r["prediction"]
        print(f"{method:<18}{m.acc:>7.3f}{m.nll:>7.3f}{m.ece:>7.3f}{m.brier:>7.3f}")
        reliability_diagram(p.probs.cpu(), p.labels.cpu(), out / f"reliability_{_slug(method)}.png",
                            title=f"{method}: ECE {m.ece:.3f}")
    plot = sweeps[0].plot(out / "tau_sweep.png", others=sweeps[1:], title="SST-2: error vs NLL, τ = 0…1")
    for sweep in sweeps:
        print(f"\nτ sweep, {sweep.method}:\n{sweep.table()}")
    print(f"\nplots: {plot}, {out}/reliability_*.png; total {time.perf_counter() - start:.0f} s")
    return results


def _slug(method: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in method.lower()).strip("_")

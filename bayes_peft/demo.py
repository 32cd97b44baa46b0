"""The demo: AdamW, IVON and Laplace-LoRA on the embedded SmolLM2 and real SST-2 data, on a CPU.

It trains LoRA with AdamW and with IVON, fits Laplace-LoRA on the AdamW adapter, prints the comparison
table, and writes the τ-sweep plot and a reliability diagram per method under ``out``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from .evaluate import Evaluator
from .experiment import RunConfig, compare
from .metrics import reliability_diagram

DEMO_METHODS = ("AdamW (MAP)", "LA-KFAC evidence", "IVON@mean", "IVON")


def run(quick: bool = False, out: Path = Path("demo_out"), seed: int = 0, model: str = "smollm2-135m",
        steps: Optional[int] = None) -> dict:
    """Run the demo; ``quick`` trains 40 steps and scores 96 test examples with 3 samples."""
    start = time.perf_counter()
    out = Path(out)
    config = RunConfig(task="sst2", model=model, seed=seed, steps=steps or (40 if quick else 150), n_test=96 if quick else None,
                       n_samples=3 if quick else 10, ess=1e6, hess_init=3e-4, clip_radius=1e-2)
    print(f"bayes_peft demo: SmolLM2-135M-Instruct + LoRA on SST-2, {config.steps} steps each for AdamW and IVON"
          f"{' (quick)' if quick else ''}; output in {out}/")
    results = compare(config, out / "checkpoints" / ("quick" if quick else "full"), DEMO_METHODS, log=lambda _: None)

    print(f"\n{'method':<18}{'ACC':>7}{'NLL':>7}{'ECE':>7}{'Brier':>7}{'time':>8}")
    for method, r in results.items():
        m = r["metrics"]
        print(f"{method:<18}{m.acc:>7.3f}{m.nll:>7.3f}{m.ece:>7.3f}{m.brier:>7.3f}{r['seconds']:>7.0f}s")
        p = r["prediction"]
        reliability_diagram(p.probs.cpu(), p.labels.cpu(), out / f"reliability_{_slug(method)}.png",
                            title=f"{method}: ECE {m.ece:.3f}")

    # τ sweeps with the linearized predictive: one pass each, every τ then costs nothing.
    taus = [i / 10 for i in range(11)]
    sweeps = []
    for method, label in (("IVON", "IVON (linearized)"), ("LA-KFAC evidence", "LA-KFAC (linearized)")):
        r = results[method]
        sweep = Evaluator(r["posterior"].model, r["posterior"], progress=False).sweep_tau(
            r["test"], taus, method="linearized")
        sweep.method = label
        sweeps.append(sweep)
    plot = sweeps[0].plot(out / "tau_sweep.png", others=sweeps[1:], title="SST-2: error vs NLL, τ = 0…1")
    print(f"\nτ sweep ({sweeps[0].method}):\n{sweeps[0].table()}")
    print(f"\nplots: {plot}, {out}/reliability_*.png; total {time.perf_counter() - start:.0f} s")
    return results


def _slug(method: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in method.lower()).strip("_")

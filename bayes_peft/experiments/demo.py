"""The demo: AdamW, IVON and Laplace-LoRA on the embedded SmolLM2 and real SST-2 data, on a CPU.

It fine-tunes LoRA in the regime of the seeds' papers, where AdamW turns overconfident: a small training
set (32 SST-2 examples) trained for many epochs (9). It trains with AdamW and with IVON, fits Laplace-LoRA
on the AdamW adapter with two prior precisions (the evidence's and the validation set's), and sets beside
them the baseline to beat, temperature scaling, and the τ* rows (τ chosen by validation NLL, on the same
validation split as the temperature). It prints the comparison table and a summary line naming the best
method on NLL and on ECE, and writes the τ-sweep plot of the two Laplace rows (error against NLL of the
linearized predictive, τ = 0…4) and a reliability diagram per method under ``out``. The Laplace rows are
their sweeps' τ = 1, so the linearized moments are computed once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from ..config import preset_config
from ..evaluation.metrics import reliability_diagram
from .compare import compare

METHODS = ("AdamW (MAP)", "Temperature scaling", "IVON@mean", "IVON", "IVON (τ*)", "LA-KFAC evidence",
           "LA-KFAC evidence (τ*)", "LA-KFAC validation")
# The rows whose τ sweep the demo plots: Laplace's linearized predictive gives every τ from one Jacobian pass
# (an IVON curve would cost a pass of its own, and IVON's τ* row already sweeps τ on validation).
SWEPT = ("LA-KFAC evidence", "LA-KFAC validation")


def run(quick: bool = False, out: Path = Path("demo_out"), seed: int = 0, model: str = "smollm2-135m",
        steps: Optional[int] = None) -> dict:
    """Run the demo: the ``demo`` preset (32 training examples, 36 steps of 8, i.e. 9 epochs, for AdamW and
    for IVON; 48 test and 24 validation examples; 4 samples; τ* from 0, 0.5, 1 and 2), or with ``quick`` the
    ``demo_quick`` one (16 training examples, 18 steps, 48 test and 24 validation examples, 2 samples)."""
    start = time.perf_counter()
    out = Path(out)
    config = preset_config("demo_quick" if quick else "demo", seed=seed,
                           overrides={"model": model, **({"train.steps": steps} if steps else {})})
    data, train = config.data, config.train
    print(f"bayes_peft demo: SmolLM2-135M-Instruct + LoRA on SST-2, {data.n_train} training examples, {train.steps} "
          f"steps of {train.batch_size} each for AdamW and IVON, {data.n_test} test examples{' (quick)' if quick else ''}; "
          f"output in {out}/")
    results = compare(config, out / "checkpoints" / ("quick" if quick else "full"), METHODS, log=lambda _: None,
                      sweeps=dict.fromkeys(SWEPT, config.eval.taus), sweep_predictive="linearized")

    print(f"\n{'method':<24}{'ACC':>7}{'NLL':>7}{'ECE':>7}{'Brier':>7}  chosen on validation")
    for method, r in results.items():
        m, p = r.metrics, r.prediction
        chosen = ", ".join(f"{k} {v:.3g}" for k, v in r.settings.items())
        print(f"{method:<24}{m.acc:>7.3f}{m.nll:>7.3f}{m.ece:>7.3f}{m.brier:>7.3f}  {chosen}")
        reliability_diagram(p.probs.cpu(), p.labels.cpu(), out / f"reliability_{_slug(method)}.png",
                            title=f"{method}: ECE {m.ece:.3f}")
    print(_verdict(results))
    sweeps = [results[method].sweep for method in SWEPT]
    for sweep, method in zip(sweeps, SWEPT):
        sweep.method = method
    taus = config.eval.taus
    plot = sweeps[0].plot(out / "tau_sweep.png", others=sweeps[1:], title=f"SST-2: error vs NLL, τ = {taus[0]:g}…{taus[-1]:g}")
    for sweep in sweeps:
        print(f"\nτ sweep, {sweep.method}:\n{sweep.table()}")
    print(f"\nplots: {plot}, {out}/reliability_*.png; total {time.perf_counter() - start:.0f} s")
    return results


def _verdict(results: dict) -> str:
    """Two lines: how far AdamW's mean confidence exceeds its accuracy, and the best method on NLL and on
    ECE, with its margin over AdamW and over the runner-up."""
    adamw = results["AdamW (MAP)"]
    m = adamw.metrics
    confidence = float(adamw.prediction.probs.max(-1).values.mean())
    gap = confidence - m.acc
    lines = [f"\nAdamW: mean confidence {confidence:.3f} against accuracy {m.acc:.3f}: "
             + (f"overconfident by {gap:.3f}" if gap > 0 else "not overconfident in this run") + f" (NLL {m.nll:.3f})"]
    parts = []
    for metric in ("nll", "ece"):
        ranked = sorted(results, key=lambda name: getattr(results[name].metrics, metric))
        best, second = ranked[0], ranked[1]
        value = getattr(results[best].metrics, metric)
        parts.append(f"best {metric.upper()}: {best} {value:.3f} (AdamW {getattr(m, metric):.3f}; next {second} "
                     f"{getattr(results[second].metrics, metric):.3f})")
    return "\n".join(lines + ["; ".join(parts)])


def _slug(method: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in method.lower()).strip("_")

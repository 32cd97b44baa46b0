"""The demo: AdamW, IVON and Laplace-LoRA on the embedded SmolLM2 and real SST-2 data, on a CPU.

It fine-tunes LoRA in the regime of the seeds' papers, where AdamW turns overconfident: a small training
set (48 SST-2 examples) trained for many epochs (12). It trains with AdamW and with IVON, fits Laplace-LoRA
on the AdamW adapter with two prior precisions (the evidence's and the validation set's), prints the
comparison table and writes the τ-sweep plot (error against NLL of the linearized predictive, τ = 0…1)
and a reliability diagram per method under ``out``. The Laplace rows are their sweeps' τ = 1, so the
linearized moments are computed once.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional

from .evaluate import Evaluator
from .experiment import RunConfig, compare
from .laplace import evidence_prior, fit_laplace, validation_prior
from .metrics import reliability_diagram

TAUS = [i / 10 for i in range(11)]
EPOCHS = 12


def run(quick: bool = False, out: Path = Path("demo_out"), seed: int = 0, model: str = "smollm2-135m",
        steps: Optional[int] = None) -> dict:
    """Run the demo. Full: 48 training examples, 72 steps of 8 (12 epochs) for AdamW and for IVON, 96 test
    and 96 validation examples, 4 samples. ``quick``: 32 training examples, 48 steps, 64 test and validation
    examples, 2 samples."""
    start = time.perf_counter()
    out = Path(out)
    n_train, n_test = (32, 64) if quick else (48, 96)
    batch_size = 8
    config = RunConfig(task="sst2", model=model, seed=seed, n_train=n_train, n_test=n_test, batch_size=batch_size,
                       steps=steps or EPOCHS * n_train // batch_size, n_samples=2 if quick else 4,
                       ess=1e7, hess_init=3e-4, clip_radius=1e-3)
    print(f"bayes_peft demo: SmolLM2-135M-Instruct + LoRA on SST-2, {n_train} training examples, {config.steps} steps "
          f"of {batch_size} each for AdamW and IVON, {n_test} test examples{' (quick)' if quick else ''}; "
          f"output in {out}/")
    results = compare(config, out / "checkpoints" / ("quick" if quick else "full"), ("AdamW (MAP)", "IVON@mean", "IVON"),
                      log=lambda _: None)

    adamw = results["AdamW (MAP)"]
    task, tokenizer = config.load_task(), adamw["tokenizer"]
    task = dataclasses.replace(task, validation=task.validation[:n_test])  # the validation prior's data
    laplace = fit_laplace(adamw["model"], task.loader(tokenizer, "train", 16, shuffle=False), n_kfac=config.n_kfac,
                          prior=1.0)
    priors = {"LA-KFAC evidence": evidence_prior(laplace),
              "LA-KFAC validation": validation_prior(laplace, task.loader(tokenizer, "validation", 16))}
    sweeps = [_linearized_sweep(results["IVON"]["posterior"], adamw["test"], "IVON (linearized)")]
    for label, prior in priors.items():
        sweeps.append(_linearized_sweep(laplace.with_prior_precision(prior), adamw["test"], label))
        results[label] = {"metrics": sweeps[-1].metrics[-1], "prediction": sweeps[-1].predictions[-1]}

    print(f"\n{'method':<20}{'ACC':>7}{'NLL':>7}{'ECE':>7}{'Brier':>7}")
    for method, r in results.items():
        m, p = r["metrics"], r["prediction"]
        print(f"{method:<20}{m.acc:>7.3f}{m.nll:>7.3f}{m.ece:>7.3f}{m.brier:>7.3f}")
        reliability_diagram(p.probs.cpu(), p.labels.cpu(), out / f"reliability_{_slug(method)}.png",
                            title=f"{method}: ECE {m.ece:.3f}")
    print(_verdict(results))
    plot = sweeps[0].plot(out / "tau_sweep.png", others=sweeps[1:], title="SST-2: error vs NLL, τ = 0…1")
    for sweep in sweeps:
        print(f"\nτ sweep, {sweep.method}:\n{sweep.table()}")
    print(f"\nplots: {plot}, {out}/reliability_*.png; total {time.perf_counter() - start:.0f} s")
    return results


def _linearized_sweep(posterior, test, label: str):
    sweep = Evaluator(posterior.model, posterior).sweep_tau(test, TAUS, method="linearized")
    sweep.method = label
    return sweep


def _verdict(results: dict) -> str:
    """One line: how far AdamW's mean confidence exceeds its accuracy, and which methods lowered its NLL."""
    adamw = results["AdamW (MAP)"]
    m = adamw["metrics"]
    confidence = float(adamw["prediction"].probs.max(-1).values.mean())
    better = [name for name, r in results.items() if name != "AdamW (MAP)" and r["metrics"].nll < m.nll]
    gap = confidence - m.acc
    return (f"\nAdamW: mean confidence {confidence:.3f} against accuracy {m.acc:.3f}: "
            + (f"overconfident by {gap:.3f}" if gap > 0 else "not overconfident in this run")
            + f" (NLL {m.nll:.3f}); " + (f"lower NLL: {', '.join(better)}" if better else "no method lowered its NLL"))


def _slug(method: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in method.lower()).strip("_")

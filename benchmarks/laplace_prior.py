"""How Laplace-LoRA's prior precision λ shapes its linearized predictive on a real model.

On the AdamW checkpoint of benchmarks/compare.py (trained here if missing), fit KFAC once and evaluate the
linearized predictive under each way of choosing λ: the evidence with one λ for all layers (Algorithm 2),
one λ per kind of layer (lora_A, lora_B) or one per layer, and the validation log-likelihood (Algorithm 3). For each it prints the
λ range, the test metrics, the mean variance of the choice-logit difference (laplace_rank.spread) and which layers carry it,
and what the evidence sees: how certain the model is on its fitting data, the Fisher's largest eigenvalue,
‖θ‖² by kind of layer and the effective number of parameters γ = Σ e/(λ + e) at each λ.

    python benchmarks/laplace_prior.py --preset overfit
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

import torch

from bayes_peft.evaluate import Evaluator
from bayes_peft.experiment import RunConfig, trained_model
from bayes_peft.laplace import evidence_prior, fit_laplace, validation_prior
from bayes_peft.laplace.prior import layer_kind
from bayes_peft.linearize import choice_logit_grads

from compare import PRESETS
from laplace_rank import spread


def variance_by_layer_kind(posterior, batches) -> dict[str, float]:
    """The mean over examples of ``spread`` of the logit covariance, split into what the lora_A and the
    lora_B layers contribute (the covariance is a sum over layers)."""
    totals, n = {"lora_A": 0.0, "lora_B": 0.0}, 0
    posterior.model.eval()
    with posterior.mean():
        for batch in batches:
            _, grads = choice_logit_grads(posterior.model, batch)
            for name, g in grads.items():
                cov = posterior.combine(name, *posterior.layer_terms(name, g.per_example()))
                totals[layer_kind(name)] += spread(cov).sum().item()
            n += batch["labels"].numel()
    return {kind: total / n for kind, total in totals.items()}


def effective_parameters(posterior, prior: dict) -> float:
    """γ = Σ_i e_i / (λ + e_i) over every layer's Fisher eigenvalues: how many directions the data pin down."""
    return sum(float((b.eigenvalues / (prior[n] + b.eigenvalues)).sum()) for n, b in posterior.bases.items())


def print_what_the_evidence_sees(fit, model, loader) -> None:
    from bayes_peft.tasks import choice_logits

    model.eval()
    with torch.no_grad():
        probs = torch.cat([torch.softmax(choice_logits(model, batch).double(), -1) for batch in loader])
    norms = {kind: sum(float(fit._mean[n].double().square().sum()) for n in fit.names if layer_kind(n) == kind)
             for kind in ("lora_A", "lora_B")}
    eigenvalues = torch.cat([b.eigenvalues.flatten() for b in fit.bases.values()])
    print(f"fitting data: mean NLL {-fit.log_likelihood / fit.n_examples:.4f}, mean max probability "
          f"{probs.max(-1).values.mean():.4f}, mean Σ_c p_c(1 − p_c) {(probs * (1 - probs)).sum(-1).mean():.2e}; "
          f"Fisher eigenvalues: largest {eigenvalues.max():.3g}, median {eigenvalues.median():.3g}, "
          f"{eigenvalues.numel()} in all; ‖θ‖² lora_A {norms['lora_A']:.1f}, lora_B {norms['lora_B']:.1f}; "
          f"P = {fit.num_parameters():,}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="overfit")
    parser.add_argument("--n-kfac", type=int, default=10)
    parser.add_argument("--n-fit", type=int, help="fit on this many training examples (default: all)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compare"))
    args = parser.parse_args(argv)

    config = RunConfig(**dict(PRESETS[args.preset]["config"], task=PRESETS[args.preset]["tasks"][0]))
    task = config.load_task()
    started = time.perf_counter()
    model, tokenizer, _, _ = trained_model(config, "adamw", args.out / args.preset / task.name / "seed0", task)
    fit_task = task.subset(n_train=args.n_fit, seed=config.seed)
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} {platform.node()}, {torch.get_num_threads()} threads, "
          f"task {task.name}: fit on {len(fit_task.train)} examples, n_kfac {args.n_kfac}, "
          f"{len(task.test)} test examples")
    fit_loader = list(fit_task.loader(tokenizer, "train", 16, shuffle=False))
    fit = fit_laplace(model, fit_loader, n_kfac=args.n_kfac, prior=1.0)
    print_what_the_evidence_sees(fit, model, fit_loader)
    test = list(task.loader(tokenizer, "test", 16))
    priors = {
        "evidence, one λ": evidence_prior(fit),
        "evidence, λ per kind (lora_A, lora_B)": evidence_prior(fit, "kind"),
        "evidence, λ per layer": evidence_prior(fit, "layer"),
        "validation": validation_prior(fit, task.loader(tokenizer, "validation", 16)),
    }
    print("\n| prior | λ min | λ max | γ | ACC | NLL | ECE | Brier | logit spread from lora_A | from lora_B |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    map_metrics = Evaluator(model, fit, task, progress=False).evaluate(test, method="mean")
    print(f"| none (MAP) | – | – | – | {map_metrics.acc:.4f} | {map_metrics.nll:.4f} | {map_metrics.ece:.4f} "
          f"| {map_metrics.brier:.4f} | 0 | 0 |")
    for label, prior in priors.items():
        posterior = fit.with_prior_precision(prior)
        m = Evaluator(model, posterior, task, progress=False).evaluate(test, method="linearized")
        split = variance_by_layer_kind(posterior, test)
        print(f"| {label} | {min(prior.values()):.4g} | {max(prior.values()):.4g} | {effective_parameters(fit, prior):.1f} "
              f"| {m.acc:.4f} | {m.nll:.4f} "
              f"| {m.ece:.4f} | {m.brier:.4f} | {split['lora_A']:.4g} | {split['lora_B']:.4g} |")
    print(f"\nwall time {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()

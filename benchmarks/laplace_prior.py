"""How Laplace-LoRA's prior precision λ shapes its linearized predictive on a real model.

On the AdamW checkpoint of benchmarks/compare.py (trained here if missing), fit KFAC once and evaluate the
linearized predictive under each way of choosing λ: the evidence with one λ for all layers (Algorithm 2),
one λ per kind of layer (lora_A, lora_B) or one per layer, and the validation log-likelihood (Algorithm 3).
For each it prints the λ range, the test metrics, the mean variance of the choice-logit difference and
which layers carry it, and what the evidence sees (bayes_peft.laplace.diagnostics): how certain the model
is on its fitting data, the Fisher's largest eigenvalue, ‖θ‖² by kind of layer and the effective number of
parameters γ = Σ e/(λ + e) at each λ.

    python benchmarks/laplace_prior.py --preset overfit
"""

from __future__ import annotations

import time

from bayes_peft.experiments.benchmarking import benchmark_parser, header, run_config, run_dir
from bayes_peft.evaluation.evaluator import Evaluator
from bayes_peft.laplace import evidence_prior, validation_prior
from bayes_peft.laplace.diagnostics import effective_parameters, fitting_data_summary, variance_by_layer_kind
from bayes_peft.experiments.runs import train_checkpoint


def main(argv=None):
    parser = benchmark_parser(__doc__, methods=False, seeds=False, options=["model", "steps", "n_kfac"])
    parser.add_argument("--n-fit", type=int, help="fit on this many training examples (default: all)")
    args = parser.parse_args(argv)

    config = run_config(args).override({"laplace.n_examples": args.n_fit})
    checkpoint = train_checkpoint(config, "adamw", run_dir(args, config) / "adamw")
    task = checkpoint.task
    started = time.perf_counter()
    fit = checkpoint.laplace(1.0)
    print(header(f"task {task.name}: fit on {fit.n_examples} examples, n_kfac {config.laplace.n_kfac}, "
                 f"{len(task.test)} test examples"))
    seen = fitting_data_summary(fit, checkpoint.loader("train", task.subset(n_train=args.n_fit, seed=config.seed)))
    print(f"fitting data: mean NLL {seen['nll']:.4f}, mean max probability {seen['max_prob']:.4f}, mean Σ_c p_c(1 − p_c) "
          f"{seen['p_one_minus_p']:.2e}; Fisher eigenvalues: largest {seen['largest_eigenvalue']:.3g}, median "
          f"{seen['median_eigenvalue']:.3g}, {seen['n_eigenvalues']} in all; ‖θ‖² lora_A {seen['norm2_lora_A']:.1f}, "
          f"lora_B {seen['norm2_lora_B']:.1f}; P = {fit.num_parameters():,}")
    test = list(checkpoint.loader("test"))
    priors = {"evidence, one λ": evidence_prior(fit), "evidence, λ per kind (lora_A, lora_B)": evidence_prior(fit, "kind"),
              "evidence, λ per layer": evidence_prior(fit, "layer"),
              "validation": validation_prior(fit, checkpoint.loader("validation"))}
    print("\n| prior | λ min | λ max | γ | ACC | NLL | ECE | Brier | logit spread from lora_A | from lora_B |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    m = Evaluator(checkpoint.model, fit, task, progress=False).evaluate(test, method="mean")
    print(f"| none (MAP) | – | – | – | {m.acc:.4f} | {m.nll:.4f} | {m.ece:.4f} | {m.brier:.4f} | 0 | 0 |")
    for label, prior in priors.items():
        posterior = fit.with_prior_precision(prior)
        m = Evaluator(checkpoint.model, posterior, task, progress=False).evaluate(test, method="linearized")
        split = variance_by_layer_kind(posterior, test)
        print(f"| {label} | {min(prior.values()):.4g} | {max(prior.values()):.4g} | {effective_parameters(fit, prior):.1f} "
              f"| {m.acc:.4f} | {m.nll:.4f} | {m.ece:.4f} | {m.brier:.4f} | {split['lora_A']:.4g} | {split['lora_B']:.4g} |")
    print(f"\nwall time {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()

"""How Laplace-LoRA's linearized predictive depends on the rank n_kfac of the large Kronecker factors.

On the AdamW checkpoint of benchmarks/compare.py (trained here if missing), fit KFAC with each n_kfac
on the same training examples and report the mean variance of the choice-logit difference on test
examples, at a common prior precision and at each fit's own evidence-optimal one.

    python benchmarks/laplace_rank.py --preset overfit --ranks 2 5 10 20 --n-fit 96 --n-test 32
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

import torch

from bayes_peft.experiment import RunConfig, trained_model
from bayes_peft.laplace import evidence_prior, fit_laplace

from compare import PRESETS


def spread(cov: torch.Tensor) -> torch.Tensor:
    """[B, C, C] logit covariances → [B]: Var[f_1 − f_0] for C = 2, the mean of the diagonal otherwise."""
    if cov.shape[-1] == 2:
        return cov[:, 0, 0] + cov[:, 1, 1] - 2 * cov[:, 0, 1]
    return torch.diagonal(cov, dim1=-2, dim2=-1).mean(-1)


def logit_difference_variance(posterior, batches) -> float:
    """Mean over examples of ``spread`` of the linearized logit covariance."""
    return torch.cat([spread(posterior.logit_moments(batch)[1]) for batch in batches]).mean().item()


def jacobian_share_in_span(posterior, batches) -> float:
    """The share of ‖J‖² (per-example logit gradients, all layers) inside the span of the KFAC curvature;
    outside it the posterior is the prior, variance 1/λ."""
    from bayes_peft.linearize import choice_logit_grads

    inside = total = 0.0
    posterior.model.eval()
    with posterior.mean():
        for batch in batches:
            _, grads = choice_logit_grads(posterior.model, batch)
            for name, g in grads.items():
                gram, coords = posterior.layer_terms(name, g.per_example())
                inside += coords.square().sum().item()
                total += torch.diagonal(gram, dim1=-2, dim2=-1).sum().item()
    return inside / total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="overfit")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 5, 10, 20])
    parser.add_argument("--n-fit", type=int, default=96, help="training examples the factors are fitted on")
    parser.add_argument("--n-test", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compare"))
    args = parser.parse_args(argv)

    config = RunConfig(**dict(PRESETS[args.preset]["config"], task=PRESETS[args.preset]["tasks"][0]))
    task = config.load_task()
    fit_task = task.subset(n_train=args.n_fit, n_test=args.n_test, seed=0)
    started = time.perf_counter()
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} {platform.node()}, {torch.get_num_threads()} threads, "
          f"task {task.name}: fit on {len(fit_task.train)}, variance on {len(fit_task.test)} test examples")
    model, tokenizer, _, _ = trained_model(config, "adamw", args.out / args.preset / task.name / "seed0", task)
    train = fit_task.loader(tokenizer, "train", 16, shuffle=False)
    test = list(fit_task.loader(tokenizer, "test", 16))
    fits = {k: fit_laplace(model, train, n_kfac=k, prior=1.0) for k in args.ranks}
    common = evidence_prior(fits[max(args.ranks)])  # the highest rank's evidence λ, shared by every fit
    print(f"\ncommon λ = {next(iter(common.values())):.4g} (evidence-optimal at n_kfac={max(args.ranks)})\n")
    print("| n_kfac | Var[f1−f0] at common λ | relative to largest | own evidence λ | Var at own λ | share of ‖J‖² in the KFAC span |")
    print("|---|---|---|---|---|---|")
    reference = logit_difference_variance(fits[max(args.ranks)].with_prior_precision(common), test)
    for k, fit in fits.items():
        at_common = logit_difference_variance(fit.with_prior_precision(common), test)
        own = evidence_prior(fit)
        at_own = logit_difference_variance(fit.with_prior_precision(own), test)
        share = jacobian_share_in_span(fit, test)
        print(f"| {k} | {at_common:.4g} | {at_common / reference:.3f} | {next(iter(own.values())):.4g} | {at_own:.4g} "
              f"| {share:.4f} |")
    print(f"\nwall time {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()

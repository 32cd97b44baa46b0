"""How Laplace-LoRA's linearized predictive depends on the rank n_kfac of the large Kronecker factors.

On the AdamW checkpoint of benchmarks/compare.py (trained here if missing), fit KFAC with each n_kfac
on the same training examples and report the mean variance of the choice-logit difference on test
examples, at a common prior precision and at each fit's own evidence-optimal one.

    python benchmarks/laplace_rank.py --preset overfit --ranks 2 5 10 20 --n-fit 96 --n-test 32
"""

from __future__ import annotations

import time

from bayes_peft.experiments.benchmarking import benchmark_parser, header, run_config, run_dir
from bayes_peft.laplace import evidence_prior, fit_laplace
from bayes_peft.laplace.diagnostics import jacobian_share_in_span, logit_difference_variance
from bayes_peft.experiments.runs import train_checkpoint


def main(argv=None):
    parser = benchmark_parser(__doc__, methods=False, seeds=False, options=["model", "steps"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 5, 10, 20])
    parser.add_argument("--n-fit", type=int, default=96, help="training examples the factors are fitted on")
    parser.add_argument("--n-test", type=int, default=32)
    args = parser.parse_args(argv)

    config = run_config(args)
    checkpoint = train_checkpoint(config, "adamw", run_dir(args, config) / "adamw")
    fit_task = checkpoint.task.subset(n_train=args.n_fit, n_test=args.n_test, seed=0)
    started = time.perf_counter()
    print(header(f"task {fit_task.name}: fit on {len(fit_task.train)}, variance on {len(fit_task.test)} test examples"))
    train = checkpoint.loader("train", fit_task)
    test = list(checkpoint.loader("test", fit_task))
    fits = {k: fit_laplace(checkpoint.model, train, n_kfac=k, prior=1.0) for k in args.ranks}
    common = evidence_prior(fits[max(args.ranks)])  # the highest rank's evidence λ, shared by every fit
    print(f"\ncommon λ = {next(iter(common.values())):.4g} (evidence-optimal at n_kfac={max(args.ranks)})\n")
    print("| n_kfac | Var[f1−f0] at common λ | relative to largest | own evidence λ | Var at own λ | share of ‖J‖² in the KFAC span |")
    print("|---|---|---|---|---|---|")
    reference = logit_difference_variance(fits[max(args.ranks)].with_prior_precision(common), test)
    for k, fit in fits.items():
        at_common = logit_difference_variance(fit.with_prior_precision(common), test)
        own = evidence_prior(fit)
        at_own = logit_difference_variance(fit.with_prior_precision(own), test)
        print(f"| {k} | {at_common:.4g} | {at_common / reference:.3f} | {next(iter(own.values())):.4g} | {at_own:.4g} "
              f"| {jacobian_share_in_span(fit, test):.4f} |")
    print(f"\nwall time {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()

"""The ``bayes-peft`` command line."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bayes-peft",
        description="Bayesian LoRA fine-tuning of language models.",
        epilog="example:\n  bayes-peft demo --steps 60",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="IVON LoRA on the embedded SmolLM2 and real SST-2 data (CPU, minutes)")
    demo.add_argument("--steps", type=int, default=60, help="IVON training steps (default 60)")
    demo.add_argument("--samples", type=int, default=4, help="posterior samples at test time (default 4)")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from bayes_peft.demo import run

        run(steps=args.steps, n_samples=args.samples, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())

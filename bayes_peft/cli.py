"""The ``bayes-peft`` command line: train, laplace, evaluate, sweep, generate and demo.

A mistake in the user's input (a missing file, an unknown task, a bad value) ends with one line on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from pathlib import Path

EXAMPLES = """examples:
  bayes-peft train --task sst2 --optimizer ivon --steps 150 --out runs/ivon
  bayes-peft train --task sst2 --optimizer adamw --lr 1e-3 --out runs/adamw
  bayes-peft train --task sst2 --optimizer swag --out runs/swag
  bayes-peft laplace --adapter runs/adamw --task sst2 --out runs/laplace
  bayes-peft evaluate --adapter runs/ivon --posterior runs/ivon --task sst2 --method sample --samples 10
  bayes-peft evaluate --adapter runs/adamw --posterior runs/laplace --task sst2 --method linearized --json
  bayes-peft evaluate --adapter runs/ivon --posterior runs/ivon --task sst2 --method sample --ood mmlu_questions boolq_passages
  bayes-peft sweep --adapter runs/ivon --posterior runs/ivon --task sst2 --taus 0 0.5 1 --plot tau.png
  bayes-peft generate --adapter runs/ivon --posterior runs/ivon --prompts questions.txt --samples 10
  bayes-peft demo --quick

Own data: --train-file/--test-file (json, jsonl, parquet or csv) with the task's fields, e.g. for sst2
{"sentence": ..., "label": 0|1}; see `help(bayes_peft.load_task)`."""


class UsageError(Exception):
    """A mistake in the user's input: reported in one line, exit code 2."""


def _add_model_and_task(p: argparse.ArgumentParser, adapter: bool) -> None:
    from .config import PRESETS, add_options

    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="start from a benchmark preset's configuration (its data draws, training and Laplace "
                        "settings; bayes_peft.config.PRESETS) instead of the library's defaults")
    add_options(p, ["model", "seed", "n_train", "val_split", "n_test", "max_length",
                    "batch_size" if not adapter else "eval_batch_size"])
    p.add_argument("--quantization", choices=["8bit", "4bit"], help="a bitsandbytes base")
    if adapter:
        p.add_argument("--adapter", required=True, type=Path, help="a trained adapter folder (train's --out)")
    p.add_argument("--task", required=True, help="a task name (see bayes_peft.data.sources.TASKS)")
    p.add_argument("--train-file", type=Path, help="your own training data for the task")
    p.add_argument("--test-file", type=Path, help="your own test data for the task")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _parser() -> argparse.ArgumentParser:
    from .config import KFAC_TYPES, OPTIMIZERS, LaplaceConfig, RunConfig, add_options, shown

    defaults = RunConfig()
    parser = argparse.ArgumentParser(prog="bayes-peft", description="Bayesian LoRA fine-tuning of language models.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="LoRA fine-tuning with AdamW or IVON", epilog=EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_and_task(train, adapter=False)
    add_options(train, ["steps", "ess", "hess_init", "clip_radius"])
    train.add_argument("--optimizer", choices=OPTIMIZERS, default="ivon",
                       help="swag: AdamW with SWAG-LoRA's schedule, collecting its iterates; adamw_lm_head: AdamW "
                            "with LoRA on the output layer too, for laplace --modules lm_head (default %(default)s)")
    train.add_argument("--lr", type=float, metavar="FLOAT", help=f"learning rate (default {shown(defaults.train.adamw_lr)} "
                                                                 f"for AdamW, {shown(defaults.train.ivon.lr)} for IVON)")
    train.add_argument("--out", required=True, type=Path,
                       help="folder for the adapter (and IVON's or SWAG's posterior)")
    train.add_argument("--save-every", type=int, default=50,
                       help="steps between resumable checkpoints (OUT/checkpoint.pt); a rerun resumes from it")

    laplace = sub.add_parser("laplace", help="fit Laplace-LoRA on a trained adapter", epilog=EXAMPLES,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_and_task(laplace, adapter=True)
    add_options(laplace, ["n_kfac"])
    laplace.add_argument("--prior", help="auto (validation when there is a validation split, else evidence), "
                                         f"evidence, validation or a number (default {LaplaceConfig.prior})")
    laplace.add_argument("--fisher", choices=["exact", "mc"], help=f"default {LaplaceConfig.fisher}")
    laplace.add_argument("--structure", choices=["kfac", "diag"],
                         help=f"low-rank Kronecker factors, or the exact diagonal (default {LaplaceConfig.structure})")
    laplace.add_argument("--modules", nargs="+", metavar="MODULE",
                         help="the posterior over these LoRA target modules only: lm_head is last-layer Laplace "
                              "(LLLA; train with --optimizer adamw_lm_head) (default: every LoRA layer)")
    laplace.add_argument("--kfac", choices=KFAC_TYPES,
                         help="how a prompt's positions enter the Kronecker factors; tokens: Laplace-LoRA's own "
                              f"(default {LaplaceConfig.kfac})")
    laplace.add_argument("--granularity", choices=["model", "kind", "layer"],
                         help="with --prior evidence: one λ for the model, per kind of layer, or per layer "
                              f"(default {LaplaceConfig.granularity})")
    laplace.add_argument("--out", required=True, type=Path, help="folder for the posterior")

    for name, helptext in (("evaluate", "ACC/NLL/ECE/Brier of a model, at the mean, sampled or linearized"),
                           ("sweep", "metrics over a grid of τ, with a plot of error against NLL")):
        p = sub.add_parser(name, help=helptext, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_model_and_task(p, adapter=True)
        add_options(p, ["n_samples", "ece_bins"])
        p.add_argument("--posterior", type=Path, help="a saved posterior (IVON's train --out, or laplace --out)")
        p.add_argument("--method", choices=["mean", "sample", "linearized"], default="sample" if name == "sweep" else "mean")
        p.add_argument("--link", choices=["auto", "quadrature", "mc", "probit"],
                       help="how the linearized logit moments become probabilities (bayes_peft.posteriors.link; "
                            f"default {defaults.eval.link})")
        p.add_argument("--taus", type=float, nargs="+", default=list(defaults.eval.taus),
                       help="the τ grid of a sweep" + (" and of --tune-tau" if name == "evaluate" else ""))
        if name == "evaluate":
            p.add_argument("--tau", type=float, default=1.0)
            p.add_argument("--tune-tau", action="store_true",
                           help="use the τ with the lowest NLL on the validation split: of --taus, and beyond "
                                f"(doubling, up to {defaults.eval.tau_ceiling:g}) while the largest is the best")
            p.add_argument("--reliability", type=Path, help="write a reliability diagram PNG here")
            p.add_argument("--risk-coverage", type=Path, help="write the risk–coverage curve PNG here")
            p.add_argument("--ood", nargs="+", default=[], metavar="SOURCE",
                           help="out-of-distribution inputs to tell from the test split (AUROC, FPR@95): a task "
                                "name (a shift with labels), mmlu_questions or boolq_passages (texts in the task's prompt), or a "
                                ".txt/.jsonl file of texts")
            p.add_argument("--ood-n", type=int, default=500, help="a seeded draw of this many OOD inputs a source")
            p.add_argument("--ood-max-words", type=int, help="keep the first words of each OOD text")
        else:
            p.add_argument("--plot", type=Path, default=Path("tau_sweep.png"))

    generate = sub.add_parser("generate", help="answers to your prompts, with their confidence and uncertainty",
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(generate, ["model", "seed", "n_samples"])
    generate.add_argument("--quantization", choices=["8bit", "4bit"], help="a bitsandbytes base")
    generate.add_argument("--adapter", required=True, type=Path, help="a trained adapter folder (train's --out)")
    generate.add_argument("--posterior", type=Path, help="a saved posterior (IVON's train --out, or laplace --out)")
    generate.add_argument("--prompts", required=True, type=Path,
                          help="a .txt file (a prompt a line) or json/jsonl/csv/parquet rows with a 'prompt' field")
    generate.add_argument("--method", choices=["mean", "sample"],
                          help="answer at the posterior mean, or by majority over --samples weight samples "
                               "(default: sample with --posterior, else mean)")
    generate.add_argument("--tau", type=float, default=1.0, help="the posterior's scale τ for the samples")
    generate.add_argument("--temperature", type=float, default=1.0, help="divides the token logits of the confidence")
    generate.add_argument("--max-new-tokens", type=int, default=16)
    generate.add_argument("--json", action="store_true", help="print the result as JSON")
    generate.add_argument("--no-progress", action="store_true", help="no progress bars")

    demo = sub.add_parser("demo", help="AdamW, IVON and Laplace on the embedded SmolLM2 and real data (CPU)")
    demo.add_argument("--quick", action="store_true", help="fewer examples, steps and samples: about 4 minutes on 2 cores")
    demo.add_argument("--out", type=Path, default=Path("demo_out"), help="plots and checkpoints (default %(default)s)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--model", default=defaults.model, help=argparse.SUPPRESS)  # for tests: a tiny stand-in
    demo.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    return parser


def run_config(args: argparse.Namespace):
    """The :class:`~bayes_peft.config.RunConfig` of a subcommand: the library's defaults (or ``--preset``'s
    configuration), then what the command line set."""
    from .config import RunConfig, overrides_from, preset_config

    changes = overrides_from(args)
    changes["progress"] = not args.no_progress
    if getattr(args, "task", None):
        changes["data.task"] = args.task
    if getattr(args, "quantization", None):
        changes["quantization"] = args.quantization
    if getattr(args, "lr", None) is not None:
        changes["train.ivon.lr" if args.optimizer == "ivon" else "train.adamw_lr"] = args.lr
    if getattr(args, "link", None) is not None:
        changes["eval.link"] = args.link
    for key in ("fisher", "kfac", "granularity", "structure"):
        if getattr(args, key, None) is not None:
            changes[f"laplace.{key}"] = getattr(args, key)
    if getattr(args, "prior", None) is not None:
        changes["laplace.prior"] = _prior(args.prior)
    if getattr(args, "modules", None):
        changes["laplace.modules"] = tuple(args.modules)
    if getattr(args, "preset", None):
        return preset_config(args.preset, args.task, overrides=changes)
    return RunConfig().override(changes)


def _prior(text: str):
    from .config import PRIOR_NAMES

    try:
        value = float(text)
    except ValueError:
        if text in PRIOR_NAMES:
            return text
        raise UsageError(f"--prior must be {', '.join(PRIOR_NAMES)} or a positive number, got {text!r}") from None
    if not value > 0:
        raise UsageError(f"--prior must be {', '.join(PRIOR_NAMES)} or a positive number, got {text!r}")
    return value


def _task(args, config):
    if (args.train_file is None) != (args.test_file is None):
        raise UsageError("give both --train-file and --test-file, or neither")
    return config.load_task({"train": args.train_file, "test": args.test_file} if args.train_file else None)


def _checkpoint(args, config=None, task=None):
    """The trained adapter of an evaluating subcommand, with its run configuration and task."""
    from .experiments.runs import open_checkpoint

    config = config or run_config(args)
    _quiet(args)
    return open_checkpoint(config, args.adapter, task or _task(args, config))


def _quiet(args) -> None:
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _posterior(args, model):
    from .posteriors.posterior_lora import PosteriorLoRA

    if args.posterior is None:
        if args.method != "mean":
            raise UsageError(f"--method {args.method} needs --posterior")
        return None
    return PosteriorLoRA.load(args.posterior, model)


def _train(args) -> dict:
    from .experiments.runs import train_checkpoint

    config = run_config(args)
    task = _task(args, config)
    _quiet(args)
    checkpoint = args.out / "checkpoint.pt"
    if checkpoint.exists() and not args.json:
        print(f"resuming from {checkpoint}", file=sys.stderr)
    trained = train_checkpoint(config, args.optimizer, args.out, task, resume=checkpoint, save_every=args.save_every,
                               reuse=False)
    return {"out": str(args.out), "steps": config.train.steps, "first_loss": trained.losses[0],
            "last_loss": trained.losses[-1]}


def _laplace(args) -> dict:
    from .laplace import resolve_prior

    checkpoint = _checkpoint(args)
    posterior = checkpoint.laplace()
    posterior.save(args.out, adapter=False)
    lambdas = set(posterior.prior_precision.values())
    return {"out": str(args.out), "prior": resolve_prior(checkpoint.config.laplace.prior, bool(checkpoint.task.validation)),
            "prior_precision": lambdas.pop() if len(lambdas) == 1 else posterior.prior_precision,
            "n_examples": posterior.n_examples, "mean_p_one_minus_p": posterior.p_one_minus_p}


def _evaluate(args) -> dict:
    from .evaluation.evaluator import Evaluator
    from .experiments.compare import score
    from .evaluation.metrics import reliability_diagram
    from .data.sources import ood_task
    from .evaluation.uncertainty import risk_coverage_plot

    config = run_config(args)
    task = _task(args, config)
    if args.tune_tau and not task.validation:
        raise UsageError("--tune-tau needs a validation split (--val-split > 0)")
    ood = {source: ood_task(source, task, args.ood_n, config.seed, args.ood_max_words) for source in args.ood}
    checkpoint = _checkpoint(args, config, task)
    ev = Evaluator(checkpoint.model, _posterior(args, checkpoint.model), task, progress=config.progress)
    options = dict(n_samples=config.eval.n_samples, link=config.eval.link, seed=config.seed)
    tau = args.tau
    if args.tune_tau:
        tau = ev.tune_tau(checkpoint.loader("validation"), args.taus, args.method, ceiling=config.eval.tau_ceiling,
                          **options).best("nll")
    scores = score(lambda loader: ev.predict(loader, args.method, tau=tau, **options), checkpoint.loader("test"),
                   {source: (shifted, checkpoint.loader("test", shifted)) for source, shifted in ood.items()},
                   config.eval.ece_bins)
    prediction = scores.prediction
    if args.reliability:
        reliability_diagram(prediction.probs.cpu(), prediction.labels.cpu(), args.reliability,
                            n_bins=config.eval.ece_bins, title=f"{task.name}, {args.method}")
    if args.risk_coverage:
        risk_coverage_plot({args.method: prediction}, args.risk_coverage, title=task.name)
    result = {"task": task.name, "method": args.method, "tau": tau, **scores.metrics.as_dict(),
              "aurc": scores.selective["max_prob"]["aurc"], "selective": scores.selective}
    if ood:
        result["ood"] = {source: {"n": len(shifted.prediction.labels), **shifted.to_json()}
                         for source, shifted in scores.ood.items()}
    return result


def _sweep(args) -> dict:
    from .evaluation.evaluator import Evaluator

    checkpoint = _checkpoint(args)
    config = checkpoint.config
    ev = Evaluator(checkpoint.model, _posterior(args, checkpoint.model), checkpoint.task, progress=config.progress)
    sweep = ev.sweep_tau(checkpoint.loader("test"), args.taus, args.method, n_samples=config.eval.n_samples,
                         link=config.eval.link, seed=config.seed, plot=args.plot)
    if not args.json:
        print(sweep.table())
    return {"task": checkpoint.task.name, "method": args.method, "plot": str(args.plot),
            "sweep": [{"tau": t, **m.as_dict()} for t, m in zip(sweep.taus, sweep.metrics)]}


def _prompts(path: Path) -> list[str]:
    from .data.packaged import file_rows

    if not path.is_file():
        raise UsageError(f"--prompts {path} is not a file")
    if path.suffix.lower() == ".txt":
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        rows = file_rows(path, "prompts")
        if rows and "prompt" not in rows[0]:
            raise UsageError(f"{path}: rows need a 'prompt' field, got {sorted(rows[0])}")
        prompts = [str(row["prompt"]).strip() for row in rows]
    if not prompts:
        raise UsageError(f"{path} holds no prompt")
    return prompts


def _generate(args) -> dict:
    from .data.generative import QA, GenerativeTask
    from .evaluation.evaluator import Evaluator
    from .posteriors.posterior_lora import PosteriorLoRA

    prompts = _prompts(args.prompts)
    method = args.method or ("sample" if args.posterior is not None else "mean")
    if method == "sample" and args.posterior is None:
        raise UsageError("--method sample needs --posterior")
    config = run_config(args)
    task = GenerativeTask("prompts", train=[], test=[QA(p, "") for p in prompts])
    checkpoint = _checkpoint(args, config, task)
    posterior = PosteriorLoRA.load(args.posterior, checkpoint.model) if args.posterior is not None else None
    ev = Evaluator(checkpoint.model, posterior, progress=config.progress, tokenizer=checkpoint.tokenizer)
    out = ev.generate(task.prompt_loader(checkpoint.tokenizer, "test", batch_size=8), method,
                      n_samples=config.eval.n_samples, tau=args.tau, max_new_tokens=args.max_new_tokens,
                      seed=config.seed, temperature=args.temperature)
    answers = [{"prompt": p, "answer": a, "confidence": float(c), "answer_entropy": float(h),
                "mutual_information": float(m), "samples": s}
               for p, a, c, h, m, s in zip(prompts, out.answers, out.confidence, out.answer_entropy,
                                           out.mutual_information, out.sample_answers)]
    return {"method": method, "n_samples": 1 if method == "mean" else config.eval.n_samples, "answers": answers}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .posteriors.posterior_lora import PosteriorFileError

    try:
        with _warnings_as_whole_lines():
            if args.command == "demo":
                from .experiments.demo import run

                run(quick=args.quick, out=args.out, seed=args.seed, model=args.model, steps=args.steps)
                return 0
            result = {"train": _train, "laplace": _laplace, "evaluate": _evaluate, "sweep": _sweep,
                      "generate": _generate}[args.command](args)
    except KeyboardInterrupt:
        print(f"bayes-peft {args.command}: interrupted; the last checkpoint is intact, run the same command to resume",
              file=sys.stderr)
        return 130
    except (UsageError, PosteriorFileError, FileNotFoundError, ModuleNotFoundError, KeyError, ValueError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"bayes-peft {args.command}: error: {message}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else _plain(result))
    return 0


@contextlib.contextmanager
def _warnings_as_whole_lines():
    """Print each warning as one ``Category: message`` line on stderr, written through tqdm so that a progress
    bar being drawn is cleared around it instead of cutting it, and without the source line that Python adds
    (``return with_prior(...)``), which reads as a stray line of code once the message scrolls away."""
    from tqdm import tqdm

    def show(message, category, filename, lineno, file=None, line=None):
        tqdm.write(f"{category.__name__}: {message}", file=file or sys.stderr)

    shown_before = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown_before


def _plain(result: dict) -> str:
    """One line of the scalar results, and a line per OOD source with its AUROC by each score; for ``generate``,
    a line per prompt."""
    if "answers" in result:
        return "\n".join(f"{a['answer']!r}  confidence {a['confidence']:.3f}  answer entropy {a['answer_entropy']:.3f}  "
                         f"mutual information {a['mutual_information']:.3f}  <- {a['prompt']!r}" for a in result["answers"])
    lines = ["  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()
                       if not isinstance(v, (dict, list)))]
    for source, shifted in result.get("ood", {}).items():
        scores = ", ".join(f"{score} {d['auroc']:.4f}" for score, d in shifted["detection"].items())
        lines.append(f"ood {source} (n={shifted['n']}): AUROC by {scores}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Zero-shot accuracy, the majority-class rate and a short AdamW LoRA fine-tune, task by task.

This is how the CPU default task is chosen: the task on which a short fine-tune of the embedded SmolLM2
lifts accuracy clearly above the majority class.

    python benchmarks/task_baselines.py --n-test 300 --finetune sst2 boolq_yesno --steps 150
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from bayes_peft.experiments.benchmarking import header
from bayes_peft.config import RunConfig, add_options, overrides_from
from bayes_peft.evaluation.evaluator import Evaluator
from bayes_peft.models import load_model
from bayes_peft.experiments.runs import train_checkpoint
from bayes_peft.data.sources import TASKS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, ["model", "steps", "adamw_lr", "batch_size", "max_length", "seed"])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--n-test", type=int, default=300, help="test examples per task (a seeded draw)")
    parser.add_argument("--finetune", nargs="*", default=["sst2", "boolq_yesno"])
    args = parser.parse_args()
    print(header("task baselines"))

    rows = []
    for name in args.tasks:
        start = time.perf_counter()
        config = RunConfig().override({**overrides_from(args), "data.task": name, "data.n_test": args.n_test,
                                       "data.val_split": None})
        task = config.load_task()
        model, tokenizer = load_model(config.model)  # a fresh LoRA: B = 0, so this is the base model
        zero_shot = Evaluator(model, progress=False).evaluate(task.loader(tokenizer, "test", config.eval.batch_size))
        row = {"task": name, "n": zero_shot.n, "majority": task.majority_rate(), "zero-shot": zero_shot}
        with tempfile.TemporaryDirectory() as folder:
            if name in args.finetune:
                tuned = train_checkpoint(config, "adamw", folder, task, reuse=False)
                row["finetuned"] = Evaluator(tuned.model, progress=False).evaluate(tuned.loader("test"))
                row["loss"] = (statistics.mean(tuned.losses[:10]), statistics.mean(tuned.losses[-10:]))
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        print(_line(row), flush=True)

    print(f"\n| task | n test | majority | zero-shot ACC | zero-shot NLL | AdamW {config.train.steps} steps ACC | "
          "AdamW NLL | train loss first→last 10 | time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(_line(row))


def _line(row: dict) -> str:
    zs, ft = row["zero-shot"], row.get("finetuned")
    tuned = f"{ft.acc:.3f} | {ft.nll:.3f} | {row['loss'][0]:.3f}→{row['loss'][1]:.3f}" if ft else "– | – | –"
    return (f"| {row['task']} | {row['n']} | {row['majority']:.3f} | {zs.acc:.3f} | {zs.nll:.3f} | {tuned} | "
            f"{row['seconds']:.0f} s |")


if __name__ == "__main__":
    main()

"""Zero-shot accuracy, the majority-class rate and a short AdamW LoRA fine-tune, task by task.

This is how the CPU default task is chosen: the task on which a short fine-tune of the embedded SmolLM2
lifts accuracy clearly above the majority class.

    python benchmarks/task_baselines.py --n-test 300 --finetune sst2 boolq_yesno --steps 150
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

from bayes_peft.evaluate import Evaluator
from bayes_peft.models import load_model
from bayes_peft.task_data import TASKS, load_task
from bayes_peft.training import make_optimizer, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--n-test", type=int, default=300, help="test examples per task (a seeded draw)")
    parser.add_argument("--finetune", nargs="*", default=["sst2", "boolq_yesno"])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"# {datetime.date.today()} {platform.node()} {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")

    rows = []
    for name in args.tasks:
        start = time.perf_counter()
        task = load_task(name, seed=args.seed, max_length=args.max_length).subset(n_test=args.n_test, seed=args.seed)
        torch.manual_seed(args.seed)
        model, tokenizer = load_model(args.model)  # a fresh LoRA: B = 0, so this is the base model
        test = task.loader(tokenizer, "test", batch_size=16)
        zero_shot = Evaluator(model, progress=False).evaluate(test)
        row = {"task": name, "n": zero_shot.n, "majority": task.majority_rate(), "zero-shot": zero_shot}
        if name in args.finetune:
            opt = make_optimizer("adamw", model, lr=args.lr)
            losses = train(model, task, task.loader(tokenizer, "train", args.batch_size, seed=args.seed), opt,
                           args.steps, desc=f"AdamW {name}")
            row["finetuned"] = Evaluator(model, progress=False).evaluate(test)
            row["loss"] = (statistics.mean(losses[:10]), statistics.mean(losses[-10:]))
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        print(_line(row), flush=True)

    print(f"\n| task | n test | majority | zero-shot ACC | zero-shot NLL | AdamW {args.steps} steps ACC | "
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

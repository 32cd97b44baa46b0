"""IVON under FSDP2, as a recipe to copy: train, evaluate and save a posterior with the model sharded over ranks.

    torchrun --nproc-per-node 2 benchmarks/fsdp.py                  # CPUs (gloo), or one GPU a rank (nccl)
    torchrun --nproc-per-node 2 benchmarks/fsdp.py --steps 60 --n-train 240

The preset's model (by default the embedded SmolLM2-135M on SST-2) gets ``fully_shard`` on every decoder layer
and at the root (:func:`bayes_peft.sharding.fully_shard_layers`), then ``bp.IVON`` with the preset's setting.
Each rank trains on its shard of the training data (FSDP2 averages the gradients, so the ranks step as one
process with all their batches), gathers the posterior (``PosteriorLoRA.from_ivon``, a collective), and scores
its shard of the test split at the mean and sampled; the evaluator gathers the predictions in order. Rank 0
prints the metrics, writes ``fsdp_<preset>.json`` and the posterior to ``--out``, which loads in one process.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import bayes_peft as bp
from bayes_peft.experiments.benchmarking import benchmark_parser, header, run_config
from bayes_peft.experiments.training import make_optimizer, train
from bayes_peft.sharding import fully_shard_layers


def main(argv=None) -> dict:
    parser = benchmark_parser(__doc__, methods=False, seeds=False)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.set_defaults(out=Path("benchmarks/results/fsdp"))
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    try:
        return _run(args, rank, world, torch.device("cuda") if cuda else torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def _run(args, rank: int, world: int, device: torch.device) -> dict:
    started = time.perf_counter()
    config = run_config(args)
    if rank == 0:
        print(header(f"preset {args.preset}, FSDP2 over {world} ranks ({dist.get_backend()})"), flush=True)
    task = config.load_task()
    model, tokenizer = bp.load_model(config.model, quantization=config.quantization)
    fully_shard_layers(model.to(device))
    opt = make_optimizer("ivon", model, seed=config.init_seed, **config.train.ivon.kwargs(len(task.train)))
    shard = (rank, world)
    per_rank = max(config.train.batch_size // world, 1)
    loader = task.loader(tokenizer, "train", batch_size=per_rank, shuffle=True, seed=config.seed, shard=shard)
    losses = train(model, task, loader, opt, config.train.steps, progress=config.progress and rank == 0)
    posterior = bp.PosteriorLoRA.from_ivon(model, opt)  # every rank: it gathers the shards
    evaluator = bp.Evaluator(model, posterior, task, progress=False)
    test = task.loader(tokenizer, "test", batch_size=config.eval.batch_size, shard=shard)
    metrics = {method: evaluator.evaluate(test, method, n_samples=config.eval.n_samples, seed=config.seed)
               for method in ("mean", "sample")}
    result = {"ranks": world, "backend": dist.get_backend(), "steps": config.train.steps, "batch_per_rank": per_rank,
              "final_loss": losses[-1], "ivon": posterior.training,
              "metrics": {m: v.as_dict() for m, v in metrics.items()}, "seconds": time.perf_counter() - started}
    if rank == 0:
        for method, m in metrics.items():
            print(f"IVON ({method}): {m}", flush=True)
        saved = posterior.save(args.out / "posterior")
        path = args.results / f"fsdp_{args.preset}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        print(f"posterior in {saved}; {path}; wall time {result['seconds']:.0f} s", flush=True)
    return result


if __name__ == "__main__":
    main()

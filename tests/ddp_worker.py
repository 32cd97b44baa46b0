"""Run by tests/test_distributed.py under torchrun: IVON, Laplace and evaluation on 2 gloo ranks."""

import sys

import torch
import torch.distributed as dist

import ddp_cases  # beside this script, which torchrun runs as a file: its folder is on the path


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {
        "ivon": ddp_cases.ivon_means(rank, world),
        "laplace": ddp_cases.laplace_factors(shard=(rank, world)),
        "evaluation": ddp_cases.evaluations(shard=(rank, world)),
        "refused": ddp_cases.differing_generators_refused(rank),
    }
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

"""Run by tests/test_distributed.py under torchrun: IVON, Laplace and evaluation on 2 gloo ranks, under DDP and
FSDP2."""

import sys

import torch
import torch.distributed as dist

import ddp_cases  # beside this script, which torchrun runs as a file: its folder is on the path
import fsdp_cases


def main(out: str, posterior_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {
        "ivon": ddp_cases.ivon_means(rank, world),
        "laplace": ddp_cases.laplace_factors(shard=(rank, world)),
        "evaluation": ddp_cases.evaluations(shard=(rank, world)),
        "refused": ddp_cases.differing_generators_refused(rank),
        "fsdp_ivon": fsdp_cases.ivon_trajectory(rank, world),
        "fsdp_ivon_ops": fsdp_cases.ivon_step_ops(rank, world),
        "fsdp_ivon_switched": fsdp_cases.ivon_sharded_after_construction(rank, world),
        "fsdp_evaluation": fsdp_cases.evaluations(rank, world),
        "fsdp_laplace": fsdp_cases.laplace_fit(rank, world),
        "fsdp_swag": fsdp_cases.swag_and_snapshots(rank, world),
    }
    results["first_samples"] = [None] * world
    dist.all_gather_object(results["first_samples"], ddp_cases.first_sample(rank))
    resumed = fsdp_cases.ivon_resume(rank, world)
    results["fsdp_resume"] = [None] * world
    dist.all_gather_object(results["fsdp_resume"], resumed)  # each rank's own slices
    fsdp_cases.saved_ivon_posterior(posterior_dir, rank, world)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

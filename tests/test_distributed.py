"""torch.distributed semantics: 2 CPU ranks (gloo, launched with torchrun) against one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddp_cases

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "results.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(HERE / "ddp_worker.py"), str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(out, weights_only=False)


def test_ivon_two_ranks_equal_one_rank_with_twice_the_batch(two_ranks):
    single = ddp_cases.ivon_means()
    for a, b in zip(two_ranks["ivon"], single):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert any((a - b).abs().max() > 0 for a, b in zip(single, [p.detach() for p in
                                                                  ddp_cases.tiny_llama_lora(seed=0).parameters()
                                                                  if p.requires_grad]))


def test_laplace_factors_merge_to_the_single_process_ones(two_ranks):
    single = ddp_cases.laplace_factors()
    merged = two_ranks["laplace"]
    assert merged["n"] == single["n"] == len(ddp_cases.WORDS)
    assert merged["log_likelihood"] == pytest.approx(single["log_likelihood"], rel=1e-6)
    for name, (small, large) in single["factors"].items():
        torch.testing.assert_close(merged["factors"][name][0], small, atol=1e-8, rtol=1e-5)
        torch.testing.assert_close(merged["factors"][name][1], large, atol=1e-8, rtol=1e-5)  # L Lᵀ: rotation-free


def test_sharded_evaluation_equals_one_process_exactly(two_ranks):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run: another thread count sums in another order
    try:
        single = ddp_cases.evaluations()
    finally:
        torch.set_num_threads(threads)
    sharded = two_ranks["evaluation"]
    for method in ("mean", "sample", "linearized"):
        assert sharded[method] == single[method], method
    assert sharded["mean"].n == len(ddp_cases.WORDS)  # 7 examples on 2 ranks: no padded repeats


def test_ranks_with_different_ivon_generators_are_refused(two_ranks):
    assert two_ranks["refused"] is True

"""torch.distributed semantics: 2 CPU ranks (gloo, launched with torchrun) against one process, under DDP and
FSDP2 (``fully_shard`` per decoder layer)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bayes_peft as bp
import ddp_cases
import fsdp_cases

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ranks")
    out = folder / "results.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(HERE / "distributed_worker.py"), str(out), str(folder / "fsdp_posterior")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = torch.load(out, weights_only=False)
    results["fsdp_posterior"] = folder / "fsdp_posterior"
    return results


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


def test_ivon_without_a_generator_draws_its_first_sample_alike_on_every_rank(two_ranks):
    rank_0, rank_1 = two_ranks["first_samples"]
    assert all(torch.equal(a, b) for a, b in zip(rank_0, rank_1))
    start = [p.detach() for p in ddp_cases.tiny_llama_lora(seed=0).parameters() if p.requires_grad]
    assert all(not torch.equal(a, b) for a, b in zip(rank_0, start))  # a sample, not the mean


def test_ranks_with_different_ivon_generators_are_refused(two_ranks):
    assert two_ranks["refused"] is True


# ---------------------------------------------------------------- FSDP2


def test_ivon_under_fsdp2_follows_one_process_step_by_step(two_ranks):
    """Mean and Hessian, gathered after each of 20 steps, against one process with both ranks' batches and the
    same generator seed (float64, lora_A split unevenly over the ranks)."""
    single = fsdp_cases.ivon_trajectory()
    sharded = two_ranks["fsdp_ivon"]
    assert sharded["ess"] == single["ess"]  # the automatic rule read the whole weights on every rank
    assert len(sharded["trajectory"]) == fsdp_cases.STEPS
    for (mean_2, hess_2), (mean_1, hess_1) in zip(sharded["trajectory"], single["trajectory"]):
        for a, b in zip(mean_2 + hess_2, mean_1 + hess_1):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    start = [p.detach().double() for p in fsdp_cases.sharded_llama(1).parameters() if p.requires_grad]
    assert max((a - b).abs().max() for a, b in zip(single["trajectory"][-1][0], start)) > 0.05  # it trained


def test_ivon_follows_its_parameters_sharded_after_it_was_built_as_accelerate_does(two_ranks):
    """accelerate's FSDP2 preparation (the HF Trainer's) shards the model after the optimizer is built and puts the
    sharded parameters into its groups: before the first step IVON starts again on them, with the same noise."""
    single = fsdp_cases.ivon_trajectory()
    for (mean_2, hess_2), (mean_1, hess_1) in zip(two_ranks["fsdp_ivon_switched"]["trajectory"], single["trajectory"]):
        for a, b in zip(mean_2 + hess_2, mean_1 + hess_1):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_parameters_replaced_after_the_first_step_are_refused():
    model = fsdp_cases.sharded_llama(1)
    opt = fsdp_cases._optimizer(model)
    fsdp_cases._train(model, opt, fsdp_cases._batches()[:1], 0, 1, record=False)
    opt.param_groups[0]["params"] = [torch.nn.Parameter(p.detach().clone()) for p in opt.param_groups[0]["params"]]
    with pytest.raises(RuntimeError, match="replaced or moved after it had started training"):
        opt.step()


def test_sharded_ivon_resumes_bit_exactly(two_ranks):
    for rank, result in enumerate(two_ranks["fsdp_resume"]):
        (straight, weights), (resumed, resumed_weights) = result["straight"], result["resumed"]
        assert all(torch.equal(a, b) for a, b in zip(weights, resumed_weights)), rank
        for group, again in zip(straight["param_groups"], resumed["param_groups"]):
            assert torch.equal(group["hess"], again["hess"]) and torch.equal(group["momentum"], again["momentum"])
        assert all(torch.equal(a, b) for a, b in zip(straight["bayes_peft"]["mean"], resumed["bayes_peft"]["mean"]))
    slices = [result["straight"][1][0].shape[0] for result in two_ranks["fsdp_resume"]]
    assert slices == [2, 1]  # lora_A's 3 rows: each rank kept its own slice


def test_a_sharded_ivon_step_costs_the_same_ops_for_2_and_4_layers_and_no_host_read(two_ranks):
    ops = two_ranks["fsdp_ivon_ops"]
    assert +ops[2] == +ops[4], (ops[2], ops[4])
    assert ops[2]["_local_scalar_dense"] == 0 and ops[2]["item"] == 0
    assert ops[2]["index_select"] == 1 and ops[2]["allreduce_"] == 1  # the noise's slice; one NaN verdict


def test_a_posterior_saved_under_fsdp2_loads_in_one_process_and_predicts_the_same(two_ranks, tmp_path):
    fsdp_cases.saved_ivon_posterior(tmp_path)
    model = fsdp_cases.sharded_llama(1).float()
    sharded, single = (bp.PosteriorLoRA.load(folder, model) for folder in (two_ranks["fsdp_posterior"], tmp_path))
    assert sharded.training["ess"] == single.training["ess"]
    ids = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(7))
    probabilities = []
    for posterior in (sharded, single):
        with posterior.mean():
            at_mean = model(input_ids=ids).logits.softmax(-1)
        with posterior.sample(generator=torch.Generator().manual_seed(0)):
            sampled = model(input_ids=ids).logits.softmax(-1)
        probabilities.append((at_mean, sampled))
    for a, b in zip(*probabilities):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_evaluation_of_an_fsdp2_model_equals_one_process_exactly(two_ranks):
    """Mean, sampled and linearized predictions of a model sharded by FSDP2, with 4 test batches on rank 0 and 3
    on rank 1 (every rank joins every pass's weight gathering), against one process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run
    try:
        single = fsdp_cases.evaluations()
    finally:
        torch.set_num_threads(threads)
    for method in ("mean", "sample", "linearized"):
        assert two_ranks["fsdp_evaluation"][method] == single[method], method


def test_a_laplace_fit_under_fsdp2_equals_one_process(two_ranks):
    single, sharded = fsdp_cases.laplace_fit(), two_ranks["fsdp_laplace"]
    assert sharded["n"] == single["n"] == len(ddp_cases.WORDS)
    assert sharded["log_likelihood"] == pytest.approx(single["log_likelihood"], rel=1e-6)
    for name, (small, large) in single["factors"].items():
        torch.testing.assert_close(sharded["factors"][name][0], small, atol=1e-8, rtol=1e-5)
        torch.testing.assert_close(sharded["factors"][name][1], large, atol=1e-8, rtol=1e-5)
    assert sharded["prior"] == pytest.approx(single["prior"], rel=1e-6)  # the evidence's λ from the merged fit
    for name, mean in single["mean"].items():
        assert torch.equal(sharded["mean"][name], mean)  # the MAP, gathered whole from the shards


def test_swag_and_snapshots_under_fsdp2_equal_one_process(two_ranks):
    single, sharded = fsdp_cases.swag_and_snapshots(), two_ranks["fsdp_swag"]
    for part in ("mean", "diagonal", "deviations"):
        for name, value in single[part].items():
            torch.testing.assert_close(sharded[part][name], value, atol=1e-6, rtol=1e-6)
    assert len(sharded["members"]) == len(single["members"]) == 2
    for mine, theirs in zip(sharded["members"], single["members"]):
        for name, value in theirs.items():
            torch.testing.assert_close(mine[name], value, atol=1e-10, rtol=0)

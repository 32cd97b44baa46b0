"""The computations that tests/test_distributed.py runs under FSDP2 on 2 ranks and on 1 process, to compare."""

import torch

import bayes_peft as bp
from bayes_peft import sharding
from conftest import tiny_llama_lora

STEPS, PER_RANK, LENGTH = 20, 2, 8


def sharded_llama(world: int) -> torch.nn.Module:
    """The tiny Llama with LoRA of rank 3, so that ``lora_A`` [3, 32] splits unevenly (2 rows and 1), with
    ``fully_shard`` per decoder layer and at the root on 2 ranks; a plain model on 1. In float64: a gradient
    reduced over 2 ranks sums in another order than one process's, and 20 steps would grow float32's 1e-7 to
    the 1e-6 the comparison is held to."""
    model = tiny_llama_lora(seed=0, r=3).double()
    if world > 1:
        sharding.fully_shard_layers(model)
    return model


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (2 * PER_RANK, LENGTH), generator=g) for _ in range(STEPS)]


def _optimizer(model) -> bp.IVON:
    # The automatic rule: its v₀ is read from the whole weights, gathered on every rank.
    return bp.IVON(model.parameters(), lr=0.05, clip_radius=0.1, generator=torch.Generator().manual_seed(0))


def _train(model, opt, batches, rank: int, world: int, record: bool) -> list:
    trajectory = []
    for ids in batches:
        local = ids.chunk(world)[rank]
        model(input_ids=local, labels=local).loss.backward()  # FSDP2 averages the gradient over ranks
        opt.step()
        opt.zero_grad()
        if record:
            trajectory.append((opt.posterior_mean(), opt.hessian()))  # gathered: whole tensors on every rank
    return trajectory


def ivon_trajectory(rank: int = 0, world: int = 1) -> dict:
    """IVON's mean and Hessian after each of 20 steps on global batches of 2·PER_RANK sequences, and its
    settings; rank r takes its slice of each batch."""
    model = sharded_llama(world)
    opt = _optimizer(model)
    return {"trajectory": _train(model, opt, _batches(), rank, world, record=True), "ess": opt.settings.ess}


def ivon_resume(rank: int = 0, world: int = 1) -> dict:
    """Each rank's slices of IVON's state after 20 steps straight, and after 10 steps, a save of every rank's
    own state dict, a new model and optimizer that load it, and 10 more steps."""
    batches = _batches()
    model = sharded_llama(world)
    opt = _optimizer(model)
    _train(model, opt, batches[: STEPS // 2], rank, world, record=False)
    saved = opt.state_dict()
    _train(model, opt, batches[STEPS // 2:], rank, world, record=False)
    straight = opt.state_dict()

    resumed_model = sharded_llama(world)
    resumed = bp.IVON(resumed_model.parameters(), lr=0.05, clip_radius=0.1, generator=torch.Generator().manual_seed(5))
    resumed.load_state_dict(saved)
    _train(resumed_model, resumed, batches[STEPS // 2:], rank, world, record=False)
    again = resumed.state_dict()
    local = lambda model: [sharding.local(p).clone() for p in model.parameters() if p.requires_grad]  # noqa: E731
    return {"straight": (straight, local(model)), "resumed": (again, local(resumed_model))}


def ivon_step_ops(rank: int = 0, world: int = 1) -> dict:
    """The aten ops of one ordinary IVON step (after a first), for 2 and for 4 sharded decoder layers."""
    from bayes_peft.profiling import dispatched_ops

    counts = {}
    for layers in (2, 4):
        model = tiny_llama_lora(seed=0, r=3, layers=layers).double()
        sharding.fully_shard_layers(model)
        opt = _optimizer(model)
        for ids in _batches()[:2]:
            local = ids.chunk(world)[rank]
            model(input_ids=local, labels=local).loss.backward()
            counts[layers] = dispatched_ops(opt.step)
            opt.zero_grad()
    return counts


def saved_ivon_posterior(directory, rank: int = 0, world: int = 1) -> None:
    """The posterior of :func:`ivon_trajectory`'s run, written by rank 0 (every rank gathers)."""
    model = sharded_llama(world)
    opt = _optimizer(model)
    _train(model, opt, _batches(), rank, world, record=False)
    posterior = bp.PosteriorLoRA.from_ivon(model, opt)
    if rank == 0:
        posterior.save(directory, adapter=False)


def evaluations(rank: int = 0, world: int = 1) -> dict:
    """:func:`ddp_cases.evaluations` with the model sharded by FSDP2 on 2 ranks: 7 test examples, one a batch,
    so that rank 0 makes 4 passes and rank 1 makes 3."""
    from ddp_cases import _task, _tokenizer
    from bayes_peft.evaluation.evaluator import Evaluator
    from bayes_peft.posteriors.posterior_lora import DiagonalPosterior

    tok = _tokenizer()
    model = tiny_llama_lora(seed=0, vocab_size=len(tok)).eval()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(3)
    variance = {n: 0.5 * torch.rand(w.shape, generator=g) for n, w in weights.items()}
    if world > 1:
        sharding.fully_shard_layers(model)
    posterior = DiagonalPosterior(model, weights, variance)
    test = _task().loader(tok, "test", batch_size=1, shard=(rank, world) if world > 1 else None)
    ev = Evaluator(model, posterior, progress=False)
    return {m: ev.evaluate(test, m, n_samples=3) for m in ("mean", "sample", "linearized")}


def laplace_fit(rank: int = 0, world: int = 1) -> dict:
    """:func:`ddp_cases.laplace_factors` and the evidence prior of a Laplace fit, with the model sharded by FSDP2
    on 2 ranks (7 training examples, one a batch: rank 0 makes 4 passes, rank 1 makes 3)."""
    from ddp_cases import _task, _tokenizer
    from bayes_peft.laplace import accumulate_factors

    tok = _tokenizer()
    model = tiny_llama_lora(seed=0, vocab_size=len(tok)).eval()
    if world > 1:
        sharding.fully_shard_layers(model)
    loader = _task().loader(tok, "train", batch_size=1, shuffle=False, shard=(rank, world) if world > 1 else None)
    factors = accumulate_factors(model, loader, n_kfac=64, progress=False)  # 64 ≥ every d: no truncation
    posterior = bp.PosteriorLoRA.fit_laplace(model, loader, n_kfac=64, prior="evidence", progress=False)
    return {"n": factors.n_examples, "log_likelihood": factors.log_likelihood,
            "factors": {n: (f.small, f.root @ f.root.T) for n, f in factors.layers.items()},
            "prior": posterior.prior_precision, "mean": posterior.mean_weights()}


def swag_and_snapshots(rank: int = 0, world: int = 1) -> dict:
    """SWAG's moments and the epoch snapshots of 4 AdamW steps on the sharded model: the SWAG posterior's mean,
    diagonal and deviations, and the snapshot ensemble's members, all whole tensors."""
    from bayes_peft.posteriors.ensemble import EpochSnapshots
    from bayes_peft.posteriors.swag import SWAGCollector

    model = sharded_llama(world)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    swag, snapshots = SWAGCollector(model, max_rank=2), EpochSnapshots(model, every=2, keep=2)
    for ids in _batches()[:4]:
        local = ids.chunk(world)[rank]
        model(input_ids=local, labels=local).loss.backward()
        opt.step()
        opt.zero_grad()
        swag.step()
        snapshots.step()
    posterior = swag.posterior()
    return {"mean": posterior.mean_weights(), "diagonal": posterior.diagonal, "deviations": posterior.deviations,
            "members": snapshots.ensemble().members}


def ivon_sharded_after_construction(rank: int = 0, world: int = 1) -> dict:
    """:func:`ivon_trajectory` with the steps accelerate's FSDP2 preparation takes (which the HF Trainer uses):
    IVON built on the whole model, then the model sharded and each parameter in the optimizer's groups replaced
    by its sharded DTensor, matched by name."""
    model = tiny_llama_lora(seed=0, r=3).double()
    opt = _optimizer(model)
    if world > 1:
        before = {name: p for name, p in model.named_parameters()}
        sharding.fully_shard_layers(model)
        after = {id(before[name]): p for name, p in model.named_parameters()}
        for group in opt.param_groups:
            group["params"] = [after[id(p)] for p in group["params"]]
    return {"trajectory": _train(model, opt, _batches(), rank, world, record=True), "ess": opt.settings.ess}

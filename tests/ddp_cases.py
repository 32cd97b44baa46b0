"""The computations that tests/test_distributed.py runs on 2 ranks and on 1 process, to compare."""

import torch

import bayes_peft as bp
from bayes_peft.evaluation.evaluator import Evaluator
from bayes_peft.laplace import accumulate_factors
from bayes_peft.posteriors.posterior_lora import DiagonalPosterior
from bayes_peft.data.tasks import Example, Task
from conftest import tiny_llama_lora

STEPS, PER_RANK, LENGTH = 10, 2, 8
WORDS = ["good", "bad", "fine film", "a dull and long film", "great", "awful acting", "superb"]  # 7: uneven shards


def _tokenizer():
    import conftest

    return conftest.gpt2_style_tokenizer.__wrapped__()


def ivon_means(rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    """10 IVON steps on global batches of 2·PER_RANK sequences; rank r takes its slice of each."""
    model = tiny_llama_lora(seed=0)
    trained = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = bp.IVON(model.parameters(), lr=0.05, ess=1e3, hess_init=0.01, clip_radius=0.1,
                  generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        ids = torch.randint(0, 64, (2 * PER_RANK, LENGTH), generator=g)
        local = ids.chunk(world)[rank]
        trained(input_ids=local, labels=local).loss.backward()  # DDP averages over ranks
        opt.step()
        opt.zero_grad()
    with opt.mean_params():
        return [p.detach().clone() for p in opt.trainable_parameters()]


def _task():
    return Task("toy3", [" A", " B", " C"], train=[Example("Q: ", w, " Answer:", i % 3) for i, w in enumerate(WORDS)],
                test=[Example("Q: ", w, " Answer:", (i + 1) % 3) for i, w in enumerate(WORDS)])


def laplace_factors(shard=None) -> dict:
    tok = _tokenizer()
    model = tiny_llama_lora(seed=0, vocab_size=len(tok)).eval()
    loader = _task().loader(tok, "train", batch_size=2, shuffle=False, shard=shard)
    factors = accumulate_factors(model, loader, n_kfac=64, progress=False)  # 64 ≥ every d: no truncation
    return {"n": factors.n_examples, "log_likelihood": factors.log_likelihood,
            "factors": {n: (f.small, f.root @ f.root.T) for n, f in factors.layers.items()}}


def evaluations(shard=None) -> dict:
    tok = _tokenizer()
    model = tiny_llama_lora(seed=0, vocab_size=len(tok)).eval()
    task = _task()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(3)
    posterior = DiagonalPosterior(model, weights, {n: 0.5 * torch.rand(w.shape, generator=g) for n, w in weights.items()})
    test = task.loader(tok, "test", batch_size=1, shard=shard)  # one example a batch: identical arithmetic
    ev = Evaluator(model, posterior, progress=False)
    return {m: ev.evaluate(test, m, n_samples=3) for m in ("mean", "sample", "linearized")}


def differing_generators_refused(rank: int) -> bool:
    """IVON built with a generator seeded differently on each rank must refuse to start."""
    try:
        bp.IVON(tiny_llama_lora(seed=0).parameters(), lr=0.1, ess=10.0, generator=torch.Generator().manual_seed(rank))
    except ValueError as error:
        return "every rank must draw the same weight sample" in str(error)
    return False


def first_sample(rank: int) -> list[torch.Tensor]:
    """The weights after ``bp.IVON`` without a generator is built on a rank whose global RNG is seeded with its
    rank: its first sample, like every later one, must come from the seed broadcast from rank 0."""
    model = tiny_llama_lora(seed=0)
    torch.manual_seed(rank)
    bp.IVON(model.parameters(), lr=0.1, ess=10.0)
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]

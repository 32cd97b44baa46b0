"""SWAG and SWA against numpy on the raw iterates, Monte Carlo, a dense Jacobian and a fresh process."""

import numpy as np
import pytest
import torch

from bayes_peft.posteriors.posterior_lora import PosteriorLoRA
from bayes_peft.posteriors.swag import SWAGCollector, SWAGPosterior
from conftest import choice_logits_of, load_in_fresh_process, tiny_llama_lora


def _iterates(model, n, seed=0):
    """Put n random iterates into the model's trainable weights, one at a time; yields after each."""
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    for i in range(n):
        with torch.no_grad():
            for p in params:
                p.add_(0.1 * torch.randn(p.shape, generator=g) + 0.01 * i)
        yield i


def _flat(model_or_dict):
    tensors = model_or_dict.values() if isinstance(model_or_dict, dict) else \
        [p for p in model_or_dict.parameters() if p.requires_grad]
    return np.concatenate([t.detach().double().numpy().ravel() for t in tensors])


def test_mean_diagonal_and_deviations_equal_numpy_on_the_collected_iterates():
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    collector = SWAGCollector(model, max_rank=3, start=2, every=2)
    seen = []
    for _ in _iterates(model, 11):
        if collector.step():
            seen.append(_flat(model))
    assert collector.n == len(seen) == 5  # steps 2, 4, 6, 8, 10
    theta = np.stack(seen)  # [n, P]
    running = np.cumsum(theta, 0) / np.arange(1, len(theta) + 1)[:, None]
    posterior = collector.posterior()
    np.testing.assert_allclose(_flat(posterior.mean_weights()), theta.mean(0), atol=1e-6)
    np.testing.assert_allclose(_flat(posterior.diagonal), np.clip(theta.var(0), 0, None), atol=1e-6)
    deviations = np.stack([_flat({n: d[k] for n, d in posterior.deviations.items()}) for k in range(3)])
    np.testing.assert_allclose(deviations, (theta - running)[-3:], atol=1e-6)


def test_samples_have_the_stated_covariance_and_tau_scales_it():
    model = torch.nn.Linear(3, 2)
    collector = SWAGCollector(model, max_rank=4)
    for _ in _iterates(model, 7, seed=3):
        collector.collect()
    posterior = collector.posterior()
    d = _flat(posterior.diagonal)
    D = np.stack([_flat({n: t[k] for n, t in posterior.deviations.items()}) for k in range(4)]).T  # [P, K]
    stated = 0.5 * (np.diag(d) + D @ D.T / 3)
    g = torch.Generator().manual_seed(0)
    draws = np.stack([_flat(posterior._sample_offsets(g)) for _ in range(100_000)])
    np.testing.assert_allclose(np.cov(draws.T), stated, atol=0.03 * np.abs(stated).max())
    assert np.abs(draws.mean(0)).max() < 0.02 * np.sqrt(np.diag(stated)).max()
    # The public sampler puts mean + √τ · (the same offsets) into the weights, and takes them out again.
    mean = _flat(posterior.mean_weights())
    offsets = _flat(posterior._sample_offsets(torch.Generator().manual_seed(5)))
    with posterior.sample(tau=0.3, generator=torch.Generator().manual_seed(5)):
        np.testing.assert_allclose(_flat(model), mean + np.sqrt(0.3) * offsets, atol=1e-6)
    np.testing.assert_allclose(_flat(model), _flat(dict(model.named_parameters())), atol=0)


def test_linearized_covariance_couples_the_layers_and_equals_the_dense_one(gpt2_style_tokenizer, sst_like):
    model = tiny_llama_lora(vocab_size=len(gpt2_style_tokenizer)).eval()
    collector = SWAGCollector(model, max_rank=3)
    for _ in _iterates(model, 5, seed=2):
        collector.collect()
    posterior = collector.posterior()
    weights = posterior.mean_weights()
    batch = sst_like.collate(gpt2_style_tokenizer)(sst_like.test[:4])
    _, cov = posterior.logit_moments(batch, tau=0.5)
    logits_of = choice_logits_of(model, batch)

    jac = torch.func.jacrev(logits_of)(weights)
    J = torch.cat([jac[n].flatten(2) for n in weights], dim=-1).double()  # [B, C, P], every layer
    d = torch.cat([posterior.diagonal[n].flatten() for n in weights]).double()
    D = torch.cat([posterior.deviations[n].flatten(1) for n in weights], dim=1).double().T  # [P, K]
    sigma = 0.5 * (torch.diag(d) + D @ D.T / 2)
    dense = torch.einsum("bcp,pq,bdq->bcd", J, sigma, J)
    centring = torch.eye(2, dtype=torch.float64) - 0.5
    torch.testing.assert_close(cov.double(), 0.5 * centring @ dense @ centring, atol=1e-6, rtol=1e-4)
    within = sum(torch.einsum("bcp,pq,bdq->bcd", jac[n].flatten(2).double(), sigma_n, jac[n].flatten(2).double())
                 for n, sigma_n in _blocks(sigma, weights))
    assert (0.5 * centring @ within @ centring - cov.double()).abs().max() > 1e-4  # the cross-layer terms matter


def _blocks(sigma, weights):
    start = 0
    for name, w in weights.items():
        yield name, sigma[start:start + w.numel(), start:start + w.numel()]
        start += w.numel()


def test_save_and_load_round_trip_also_in_a_fresh_process(tmp_path):
    model = tiny_llama_lora(vocab_size=64)
    collector = SWAGCollector(model, max_rank=2)
    for _ in _iterates(model, 4):
        collector.collect()
    posterior = PosteriorLoRA.from_swag(collector)
    posterior.save(tmp_path, adapter=False)
    loaded = PosteriorLoRA.load(tmp_path, model)
    assert isinstance(loaded, SWAGPosterior) and loaded.rank == 2
    for store in ("diagonal", "deviations"):
        for name, t in getattr(posterior, store).items():
            assert torch.equal(getattr(loaded, store)[name], t)
    assert load_in_fresh_process(tmp_path, "type(p).__name__, p.rank") == "SWAGPosterior 2"


def test_a_resumed_collector_continues_exactly():
    def run(stop_at=None):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        collector = SWAGCollector(model, max_rank=2, start=1, every=2)
        for i in _iterates(model, 9):
            collector.step()
            if i == stop_at:
                state = collector.state_dict()
                collector = SWAGCollector(model, max_rank=2, start=1, every=2)
                collector.load_state_dict(state)
        return collector.posterior()

    straight, resumed = run(), run(stop_at=4)
    for store in ("diagonal", "deviations"):
        for name, t in getattr(straight, store).items():
            assert torch.equal(getattr(resumed, store)[name], t)
    with pytest.raises(ValueError, match="had"):
        SWAGCollector(torch.nn.Linear(4, 3), max_rank=3).load_state_dict(SWAGCollector(torch.nn.Linear(4, 3)).state_dict())
    with pytest.raises(ValueError, match="no iterate"):
        SWAGCollector(torch.nn.Linear(2, 2)).posterior()

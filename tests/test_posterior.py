"""PosteriorLoRA over IVON and the shared evaluator, against dense and independent computations."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bayes_peft as bp
from bayes_peft.evaluation.evaluator import Evaluator
from bayes_peft.posteriors.posterior_lora import DiagonalPosterior, PosteriorFileError, PosteriorLoRA
from bayes_peft.data.tasks import Example, Task, choice_logits
from conftest import choice_logits_of, ivon_posterior, tiny_llama_lora

WORDS = ["good", "bad", "fine film", "a dull and long film", "great", "awful acting", "superb", "weak plot"]


@pytest.fixture
def mc_task():
    examples = [Example("Q: ", w, " Answer:", i % 3) for i, w in enumerate(WORDS)]
    return Task("toy3", [" A", " B", " C"], train=examples, test=examples)


def _lora_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_from_ivon_holds_the_optimizer_mean_and_variance(gpt2_style_tokenizer, sst_like):
    model = tiny_llama_lora(vocab_size=len(gpt2_style_tokenizer))
    posterior, opt = ivon_posterior(model, sst_like, gpt2_style_tokenizer)
    params = opt.trainable_parameters()
    names = {id(p): n for n, p in model.named_parameters()}
    means = opt.posterior_mean()
    for p, m, v in zip(params, means, opt.posterior_variance()):
        assert torch.equal(posterior._mean[names[id(p)]], m) and torch.equal(posterior.variance[names[id(p)]], v)
    with posterior.mean():
        for p, m in zip(params, means):
            assert torch.equal(p, m)
    opt.step()  # the posterior put IVON's sample back exactly: training goes on


@pytest.mark.parametrize("lora", [{}, {"modules_to_save": ["lm_head"]}], ids=["lora", "lora+trained_head"])
def test_linearized_covariance_equals_dense_jacobian(gpt2_style_tokenizer, mc_task, lora):
    """τ·J diag(v) Jᵀ from hooks equals the dense one from torch.func.jacrev over every trainable weight,
    a fully trained head (peft's modules_to_save) included."""
    model = tiny_llama_lora(vocab_size=len(gpt2_style_tokenizer), **lora).eval()
    weights = _lora_weights(model)
    g = torch.Generator().manual_seed(1)
    variance = {n: torch.rand(w.shape, generator=g) * 0.5 for n, w in weights.items()}
    posterior = DiagonalPosterior(model, weights, variance)
    batch = mc_task.collate(gpt2_style_tokenizer)(mc_task.test[:5])

    mean, cov = posterior.logit_moments(batch, tau=0.7)
    logits_of = choice_logits_of(model, batch)

    jac = torch.func.jacrev(logits_of)(weights)  # name → [B, C, *shape]
    dense = sum(torch.einsum("bcp,p,bdp->bcd", j.flatten(2), variance[n].flatten(), j.flatten(2))
                for n, j in jac.items())
    n_choices = dense.shape[-1]
    centring = torch.eye(n_choices) - 1.0 / n_choices  # the softmax sees the centred logits only
    with torch.no_grad():
        torch.testing.assert_close(mean, logits_of(weights), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cov, 0.7 * centring @ dense @ centring, atol=1e-5, rtol=1e-5)
    assert cov.abs().max() > 1e-3  # a real check, not zeros against zeros
    assert _lora_weights(model).keys() == weights.keys()


def test_linearized_refuses_parameters_it_cannot_linearize(gpt2_style_tokenizer, mc_task):
    model = tiny_llama_lora(vocab_size=len(gpt2_style_tokenizer), target_modules=["q_proj", "embed_tokens"])
    weights = _lora_weights(model)
    posterior = DiagonalPosterior(model, weights, {n: torch.full_like(w, 0.1) for n, w in weights.items()})
    batch = mc_task.collate(gpt2_style_tokenizer)(mc_task.test[:3])
    with pytest.raises(ValueError, match=r"Linear layers only.*2 other parameters: .*lora_embedding_A"):
        posterior.logit_moments(batch)
    with posterior.sample(tau=1.0):  # sample mode perturbs them all, as before
        assert torch.isfinite(choice_logits(model, batch)).all()


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_linearized_runs_over_bitsandbytes_bases(tiny_llama_dir, quantization, sst_like):
    model, tokenizer = bp.load_model(tiny_llama_dir, quantization=quantization)
    posterior, _ = ivon_posterior(model, sst_like, tokenizer)
    batch = sst_like.collate(tokenizer)(sst_like.test[:4])
    mean, cov = posterior.logit_moments(batch)
    assert torch.isfinite(mean).all() and torch.isfinite(cov).all()
    assert (torch.linalg.eigvalsh(cov) > -1e-6).all() and cov.abs().max() > 0


def test_contexts_restore_weights_even_after_an_exception(gpt2_style_tokenizer, sst_like):
    model = tiny_llama_lora(vocab_size=len(gpt2_style_tokenizer))
    posterior, _ = ivon_posterior(model, sst_like, gpt2_style_tokenizer)
    before = _lora_weights(model)  # IVON left a training sample in the weights
    for context in (posterior.mean(), posterior.sample(tau=1.0, generator=torch.Generator().manual_seed(0))):
        with pytest.raises(RuntimeError, match="boom"):
            with context:
                assert any(not torch.equal(p, before[n]) for n, p in _lora_weights(model).items())
                raise RuntimeError("boom")
        assert all(torch.equal(p, before[n]) for n, p in _lora_weights(model).items())


def test_save_load_evaluate_identically(tmp_path, gpt2_style_tokenizer, sst_like):
    model = tiny_llama_lora(vocab_size=len(gpt2_style_tokenizer))
    posterior, _ = ivon_posterior(model, sst_like, gpt2_style_tokenizer)
    loader = sst_like.loader(gpt2_style_tokenizer, "test", batch_size=4)
    before = {m: Evaluator(model, posterior, progress=False).evaluate(loader, m, n_samples=3)
              for m in ("mean", "sample", "linearized")}
    posterior.save(tmp_path / "run")
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {"posterior.safetensors", "posterior.json",
                                                              "adapter_model.safetensors", "adapter_config.json"}
    other = tiny_llama_lora(seed=7, vocab_size=len(gpt2_style_tokenizer))  # same shapes, different weights
    loaded = PosteriorLoRA.load(tmp_path / "run", other)
    after = {m: Evaluator(other, loaded, progress=False).evaluate(loader, m, n_samples=3)
             for m in ("mean", "sample", "linearized")}
    # The base weights differ (seed 7), so compare within the same model: reload into the original.
    reloaded = PosteriorLoRA.load(tmp_path / "run", model)
    again = {m: Evaluator(model, reloaded, progress=False).evaluate(loader, m, n_samples=3)
             for m in ("mean", "sample", "linearized")}
    assert again == before
    assert after["mean"] != before["mean"]


def test_load_refuses_other_shapes_and_broken_files(tmp_path, gpt2_style_tokenizer, sst_like):
    model = tiny_llama_lora(vocab_size=len(gpt2_style_tokenizer))
    posterior, _ = ivon_posterior(model, sst_like, gpt2_style_tokenizer)
    run = posterior.save(tmp_path / "run")
    with pytest.raises(PosteriorFileError, match=r"shape \(4, 32\) in the file but \(8, 32\) in the model"):
        PosteriorLoRA.load(run, tiny_llama_lora(r=8, vocab_size=len(gpt2_style_tokenizer)))
    data = (run / "posterior.safetensors").read_bytes()
    (run / "posterior.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PosteriorFileError, match="posterior.safetensors is corrupt or truncated"):
        PosteriorLoRA.load(run, model)
    (run / "posterior.json").write_text('{"kind": "diag')
    with pytest.raises(PosteriorFileError, match="posterior.json is not valid JSON"):
        PosteriorLoRA.load(run, model)
    with pytest.raises(PosteriorFileError, match="does not exist"):
        PosteriorLoRA.load(tmp_path / "nothing", model)


@settings(max_examples=25, deadline=None)
@given(st.floats(0.0, 4.0), st.integers(0, 2**31 - 1))
def test_tau_sampling_scales_the_same_noise_by_sqrt_tau(tau, seed):
    model = tiny_llama_lora()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    variance = {n: torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) for n, w in weights.items()}
    posterior = DiagonalPosterior(model, weights, variance)
    draws = {}
    for t in (1.0, tau):
        with posterior.sample(t, torch.Generator().manual_seed(seed)):
            draws[t] = {n: p.detach().clone() for n, p in model.named_parameters() if n in weights}
    for n, w in weights.items():
        torch.testing.assert_close(draws[tau][n] - w, tau ** 0.5 * (draws[1.0][n] - w), atol=1e-6, rtol=1e-5)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)


def test_tau_sampling_statistics():
    """Over many draws, the offsets have mean 0 and variance τ·v, elementwise."""
    model = tiny_llama_lora()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    name = next(iter(weights))
    variance = {n: 0.1 + torch.rand(w.shape, generator=torch.Generator().manual_seed(2)) for n, w in weights.items()}
    posterior = DiagonalPosterior(model, weights, variance)
    g, tau = torch.Generator().manual_seed(0), 0.3
    offsets = torch.stack([posterior._sample_offsets(g)[name] * tau ** 0.5 for _ in range(4000)])
    ratio = offsets.var(0) / (tau * variance[name])
    assert (ratio - 1).abs().max() < 0.15 and (offsets.mean(0) / (tau * variance[name]).sqrt()).abs().max() < 0.08

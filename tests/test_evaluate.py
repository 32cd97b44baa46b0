"""The shared evaluator: its predictives (mean, sample, linearized), τ sweeps, refusals, and where it runs."""

import math

import pytest
import torch

from bayes_peft.evaluation.evaluator import Evaluator
from bayes_peft.posteriors.posterior_lora import DiagonalPosterior
from bayes_peft.data.tasks import choice_logits
from conftest import ivon_posterior, tiny_llama_lora


def test_the_best_tau_of_a_sweep_has_the_lowest_metric_and_the_smallest_tau_on_a_tie():
    from bayes_peft.evaluation.tau import TauSweep
    from bayes_peft.evaluation.metrics import Metrics

    def m(nll, ece):
        return Metrics(acc=0.8, nll=nll, ece=ece, brier=0.3, n=10)

    sweep = TauSweep("sample", [0.0, 0.5, 1.0, 2.0], [m(0.9, 0.05), m(0.4, 0.09), m(0.4, 0.02), m(0.6, 0.02)])
    assert sweep.best() == 0.5 and sweep.best("ece") == 1.0
    with pytest.raises(ValueError, match="metric must be"):
        sweep.best("acc")


def test_tau_search_doubles_past_the_grid_while_its_top_is_best_and_stops_at_the_ceiling():
    from bayes_peft.evaluation.metrics import Metrics
    from bayes_peft.evaluation.tau import TauSweep, widened_until_bracketed

    def sweep_at(optimum):
        def at(taus):  # a validation NLL whose minimum over τ is at ``optimum``: (log τ − log optimum)²
            asked.append(list(taus))
            return TauSweep("sample", list(taus), [Metrics(acc=0.8, nll=(math.log(max(t, 1e-3) / optimum)) ** 2,
                                                          ece=0.1, brier=0.3, n=10) for t in taus])
        return at

    asked = []
    sweep = widened_until_bracketed(sweep_at(13.0), [0.0, 1.0, 2.0, 4.0], ceiling=64.0)
    # 8 beats 4 and 16 beats 8 (|log 16/13| < |log 8/13|); 32 is worse than 16: bracketed, τ* = 16.
    assert asked == [[0.0, 1.0, 2.0, 4.0], [8.0], [16.0], [32.0]] and sweep.best() == 16.0
    assert sweep.taus == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0] and len(sweep.metrics) == 7
    asked.clear()
    assert widened_until_bracketed(sweep_at(1.5), [0.0, 1.0, 2.0, 4.0], ceiling=64.0).best() == 2.0
    assert asked == [[0.0, 1.0, 2.0, 4.0]]  # bracketed by the grid: nothing more is swept
    asked.clear()
    assert widened_until_bracketed(sweep_at(1e4), [0.0, 1.0], ceiling=8.0).best() == 8.0
    assert asked == [[0.0, 1.0], [2.0], [4.0], [8.0]]  # the ceiling holds, the best is then its top
    with pytest.raises(ValueError, match="increasing"):
        widened_until_bracketed(sweep_at(1.0), [1.0, 0.5], ceiling=8.0)


def test_sample_mode_tau_zero_equals_mean_and_averages_probabilities(gpt2_style_tokenizer, sst_like):
    model = tiny_llama_lora(vocab_size=len(gpt2_style_tokenizer))
    posterior, _ = ivon_posterior(model, sst_like, gpt2_style_tokenizer)
    loader = sst_like.loader(gpt2_style_tokenizer, "test", batch_size=3)
    ev = Evaluator(model, posterior, sst_like, progress=False)
    at_mean = ev.predict(loader, "mean")
    # τ = 0 costs one pass, not S: every draw is the mean, as drawing them by hand shows.
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    at_zero = ev.predict(loader, "sample", n_samples=3, tau=0.0)
    handle.remove()
    assert len(calls) == len(list(loader)) and at_zero.sample_probs.shape[0] == 3
    assert torch.equal(at_zero.probs, at_mean.probs)
    model.eval()
    with torch.no_grad(), posterior.sample(0.0, torch.Generator().manual_seed(0)):
        drawn = torch.cat([choice_logits(model, b).softmax(-1) for b in loader])
    torch.testing.assert_close(drawn, at_mean.probs, rtol=0, atol=0)

    sampled = ev.predict(loader, "sample", n_samples=4, tau=1.0, seed=5)
    generator, manual = torch.Generator().manual_seed(5), []
    model.eval()
    with torch.no_grad():
        for _ in range(4):
            with posterior.sample(1.0, generator):
                manual.append(torch.cat([choice_logits(model, b).softmax(-1) for b in loader]))
    expected = torch.stack(manual).mean(0)
    torch.testing.assert_close(sampled.probs, expected)
    assert not torch.allclose(sampled.probs, at_mean.probs)
    nll = -expected.gather(1, sampled.labels[:, None]).log().mean().item()
    assert sampled.metrics().nll == pytest.approx(nll, abs=1e-6)


def test_sweep_tau_table_and_plot(tmp_path, gpt2_style_tokenizer, sst_like):
    model = tiny_llama_lora(vocab_size=len(gpt2_style_tokenizer))
    posterior, _ = ivon_posterior(model, sst_like, gpt2_style_tokenizer)
    ev = Evaluator(model, posterior, progress=False)
    loader = sst_like.loader(gpt2_style_tokenizer, "test", batch_size=4)
    sweep = ev.sweep_tau(loader, taus=[0, 0.5, 1.0], method="linearized", plot=tmp_path / "tau.png")
    assert sweep.metrics[0] == ev.evaluate(loader, "mean")  # τ = 0 is the mean
    assert sweep.table().count("\n") == 4 and (tmp_path / "tau.png").read_bytes()[:4] == b"\x89PNG"
    # tune_tau sweeps the same points (the moments reused), and past the grid only where its top was the best.
    tuned = ev.tune_tau(loader, taus=[0, 0.5, 1.0], method="linearized", ceiling=4.0)
    assert tuned.taus[:3] == [0, 0.5, 1.0] and tuned.metrics[:3] == sweep.metrics
    assert all(tuned.taus[:i][tuned.metrics[:i].index(min(tuned.metrics[:i], key=lambda m: m.nll))] == tuned.taus[i - 1]
               for i in range(4, len(tuned.taus) + 1))
    assert tuned.metrics[3:] == ev.sweep_tau(loader, taus=tuned.taus[3:], method="linearized").metrics


def test_evaluator_refuses_bad_requests(gpt2_style_tokenizer, sst_like):
    model = tiny_llama_lora(vocab_size=len(gpt2_style_tokenizer))
    loader = sst_like.loader(gpt2_style_tokenizer, "test", batch_size=4)
    with pytest.raises(ValueError, match="needs a posterior"):
        Evaluator(model, progress=False).evaluate(loader, "sample")
    with pytest.raises(ValueError, match="method must be one of"):
        Evaluator(model, progress=False).evaluate(loader, "laplace")


def test_bf16_autocast_runs_and_stays_close(gpt2_style_tokenizer, sst_like):
    model = tiny_llama_lora(vocab_size=len(gpt2_style_tokenizer))
    loader = sst_like.loader(gpt2_style_tokenizer, "test", batch_size=4)
    exact = Evaluator(model, progress=False).predict(loader).probs
    autocast = Evaluator(model, progress=False, autocast=torch.bfloat16).predict(loader).probs
    assert autocast.dtype == torch.float32 and (autocast - exact).abs().max() < 0.02


def test_two_choice_linearized_predictions_keep_the_map_argmax(gpt2_style_tokenizer, sst_like):
    """With the full-covariance link a large variance pulls probabilities towards ½ but never across it."""
    model = tiny_llama_lora(vocab_size=len(gpt2_style_tokenizer))
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    posterior = DiagonalPosterior(model, weights, {n: torch.full_like(w, 0.5) for n, w in weights.items()})
    ev = Evaluator(model, posterior, progress=False)
    loader = sst_like.loader(gpt2_style_tokenizer, "train", batch_size=4, shuffle=False)
    at_mean = ev.predict(loader, "mean").probs
    linearized = ev.predict(loader, "linearized", tau=1e3).probs
    assert torch.equal(linearized.argmax(-1), at_mean.argmax(-1))
    assert (linearized - 0.5).abs().max() < (at_mean - 0.5).abs().max()  # the variance is real and pulls in


def test_an_evaluator_without_a_device_leaves_the_model_and_its_ivon_optimizer_where_they_are(
        gpt2_style_tokenizer, sst_like, monkeypatch):
    """On a GPU machine a model kept on the CPU must stay there: moving it would leave IVON's flat buffer
    behind, and the next step would raise."""
    model = tiny_llama_lora(vocab_size=len(gpt2_style_tokenizer))
    posterior, opt = ivon_posterior(model, sst_like, gpt2_style_tokenizer)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine: nothing may go there
    ev = Evaluator(model, posterior, sst_like, progress=False)
    assert ev.device == torch.device("cpu")
    before = [p.data_ptr() for p in opt.trainable_parameters()]
    ev.evaluate(sst_like.loader(gpt2_style_tokenizer, "test", batch_size=4), "sample", n_samples=2)
    for batch in sst_like.loader(gpt2_style_tokenizer, batch_size=4, seed=1):  # training goes on
        sst_like.loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    assert [p.data_ptr() for p in opt.trainable_parameters()] == before  # still views of IVON's buffer
    assert all(p.device.type == "cpu" for p in model.parameters())
    explicit = Evaluator(model, posterior, device="cpu", progress=False)
    assert explicit.device == torch.device("cpu") and explicit.model is model

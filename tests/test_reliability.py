"""Faults and bad input: interrupted runs, partial and corrupt files, exceptions in contexts, degenerate
curvature, and property tests of the metrics and of τ-sampling."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bayes_peft import metrics
from bayes_peft.cli import main
from bayes_peft.laplace import evidence_prior, fit_laplace
from bayes_peft.laplace.kfac import Factors, LayerFactors
from bayes_peft.laplace.posterior import KFACPosterior
from bayes_peft.linearize import lora_linears
from bayes_peft.posterior import DiagonalPosterior
from bayes_peft.tasks import Example, Task
from bayes_peft.training import CheckpointError, load_checkpoint, make_optimizer, save_checkpoint
from conftest import tiny_llama_lora

ROWS = [{"sentence": s, "label": i % 2} for i, s in enumerate(
    ["dull", "lovely", "flat and long", "a joy", "boring plot", "superb acting", "weak", "moving"])]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "reviews.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS))
    return ["--task", "sst2", "--train-file", str(path), "--test-file", str(path), "--batch-size", "2",
            "--no-progress", "--json"]


def _interrupt_on_call(monkeypatch, n):
    original, calls = Task.loss, {"n": 0}

    def loss(self, model, batch):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return original(self, model, batch)

    monkeypatch.setattr(Task, "loss", loss)


def test_interrupted_cli_training_resumes_exactly(tiny_llama_dir, tmp_path, data, monkeypatch, capsys):
    from safetensors.torch import load_file

    train = ["train", "--model", str(tiny_llama_dir), *data, "--optimizer", "ivon", "--steps", "8", "--save-every", "2"]
    assert main([*train, "--out", str(tmp_path / "straight")]) == 0

    _interrupt_on_call(monkeypatch, 6)  # Ctrl-C in step 6: the checkpoint of step 4 must survive
    assert main([*train, "--out", str(tmp_path / "cut")]) == 130
    assert "the last checkpoint is intact" in capsys.readouterr().err
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4
    monkeypatch.undo()
    assert main([*train, "--out", str(tmp_path / "cut")]) == 0
    a = load_file(str(tmp_path / "straight" / "posterior.safetensors"))
    b = load_file(str(tmp_path / "cut" / "posterior.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_failed_write_never_replaces_a_good_checkpoint(tmp_path, monkeypatch):
    model = tiny_llama_lora()
    opt = make_optimizer("ivon", model, lr=0.05, ess=1e3)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, opt, None, step=2, losses=[1.0, 0.9])

    def broken_save(obj, f):
        with open(f, "wb") as handle:
            handle.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, opt, None, step=4, losses=[1.0, 0.9, 0.8, 0.7])
    monkeypatch.undo()
    assert load_checkpoint(path, model, opt, None)[0] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left behind


def test_corrupt_or_mismatched_files_get_a_clear_error(tiny_llama_dir, tmp_path, data, capsys):
    model = tiny_llama_lora()
    opt = make_optimizer("adamw", model, lr=1e-3)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, opt, None, step=1, losses=[1.0])
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="checkpoint.pt is not a readable training checkpoint"):
        load_checkpoint(path, model, opt, None)
    save_checkpoint(path, model, opt, None, step=1, losses=[1.0])
    other = tiny_llama_lora(r=8)
    with pytest.raises(CheckpointError, match=r"has shape \(4, 32\), the model \(8, 32\)"):
        load_checkpoint(path, other, make_optimizer("adamw", other, lr=1e-3), None)

    assert main(["train", "--model", str(tiny_llama_dir), *data, "--optimizer", "adamw", "--steps", "1",
                 "--out", str(tmp_path / "run")]) == 0
    adapter = tmp_path / "run" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:64])
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tiny_llama_dir), *data, "--adapter", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "adapter_model.safetensors does not load" in err and err.count("\n") == 1


def _no_hooks(model):
    return all(not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks
               for m in lora_linears(model).values())


def _fails_on_call(model, n):
    """Make the first decoder layer raise on its n-th forward call."""
    layer, calls = model.base_model.model.model.layers[0], {"n": 0}

    def hook(module, args):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("injected fault")

    return layer.register_forward_pre_hook(hook)


def test_exceptions_while_fitting_or_linearizing_remove_hooks_and_restore_weights(gpt2_style_tokenizer):
    model = tiny_llama_lora(vocab_size=len(gpt2_style_tokenizer)).eval()
    task = Task("t", [" A", " B"], train=[Example("Q: ", f"item {i}", " Answer:", i % 2) for i in range(8)], test=[])
    loader = list(task.loader(gpt2_style_tokenizer, batch_size=4, shuffle=False))
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    handle = _fails_on_call(model, 2)
    with pytest.raises(RuntimeError, match="injected fault"):
        fit_laplace(model, loader, n_kfac=2, prior=1.0, progress=False)
    handle.remove()
    assert _no_hooks(model)

    posterior = fit_laplace(model, loader, n_kfac=2, prior=1.0, progress=False)
    shifted = {n: w + 1.0 for n, w in weights.items()}
    with torch.no_grad():  # weights other than the mean, to see that they come back
        for n, p in model.named_parameters():
            if n in shifted:
                p.copy_(shifted[n])
    handle = _fails_on_call(model, 1)
    with pytest.raises(RuntimeError, match="injected fault"):
        posterior.logit_moments(loader[0])
    handle.remove()
    assert _no_hooks(model)
    assert all(torch.equal(p, shifted[n]) for n, p in model.named_parameters() if n in shifted)


def _degenerate(model, small, root):
    layers = {n: LayerFactors(small(m), root(m), m.in_features >= m.out_features) for n, m in lora_linears(model).items()}
    return Factors(layers, n_examples=8, log_likelihood=-5.0)


@pytest.mark.parametrize("case", ["zero curvature", "rank one"])
def test_degenerate_curvature_gives_finite_results(case, gpt2_style_tokenizer):
    model = tiny_llama_lora(vocab_size=len(gpt2_style_tokenizer)).eval()
    k = 3

    def small(m):
        r = min(m.in_features, m.out_features)
        return torch.zeros(r, r, dtype=torch.float64) if case == "zero curvature" else torch.ones(r, r, dtype=torch.float64)

    def root(m):
        d = max(m.in_features, m.out_features)
        out = torch.zeros(d, k, dtype=torch.float64)
        if case == "rank one":
            out[:, 0] = 1.0
        return out

    base = KFACPosterior.from_factors(model, _degenerate(model, small, root), dict.fromkeys(
        [n for n in lora_linears(model)], 1.0))
    task = Task("t", [" A", " B"], train=[Example("Q: ", "x y", " Answer:", 0)] * 2, test=[])
    batch = task.collate(gpt2_style_tokenizer)(task.train)
    for lam in [*evidence_prior(base).values()][:1] + [1e-12, 1e12]:
        posterior = base.with_prior_precision(dict.fromkeys(base.names, lam))
        mean, cov = posterior.logit_moments(batch)
        offsets = posterior._sample_offsets(torch.Generator().manual_seed(0))
        assert torch.isfinite(cov).all() and torch.isfinite(mean).all()
        assert all(torch.isfinite(o).all() for o in offsets.values())
    with pytest.raises(ValueError, match="prior precisions must be positive and finite"):
        base.with_prior_precision(dict.fromkeys(base.names, 0.0))


# ---------------------------------------------------------------------------------------------------
# Property tests


@st.composite
def predictions(draw):
    n = draw(st.integers(1, 40))
    c = draw(st.integers(2, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.floats(0.0, 20.0))
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(scale * torch.randn(n, c, generator=g, dtype=torch.float64), -1)
    labels = torch.randint(0, c, (n,), generator=g)
    return probs, labels, seed


@settings(max_examples=60, deadline=None)
@given(predictions(), st.integers(1, 20))
def test_metric_ranges_and_permutation_invariance(prediction, n_bins):
    probs, labels, seed = prediction
    m = metrics.compute_metrics(probs, labels, n_bins)
    assert 0.0 <= m.ece <= 1.0 and 0.0 <= m.brier <= 2.0 and m.nll >= 0.0 and 0.0 <= m.acc <= 1.0
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    permuted = metrics.compute_metrics(probs[order], labels[order], n_bins)
    for a, b in zip((m.acc, m.nll, m.ece, m.brier), (permuted.acc, permuted.nll, permuted.ece, permuted.brier)):
        assert a == pytest.approx(b, abs=1e-12)


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

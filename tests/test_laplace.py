"""Laplace-LoRA against dense oracles built from full-prompt Jacobians on a tiny model (896 LoRA weights)."""

import contextlib
import json
import math

import pytest
import torch

import bayes_peft as bp
from bayes_peft.laplace import EvidenceFallbackWarning, accumulate_factors, evidence_prior, fit_laplace, log_evidence
from bayes_peft.laplace.kfac import Factors, LayerFactors, logit_fisher_root, low_rank_update
from bayes_peft.laplace.posterior import KFACPosterior
from bayes_peft.posteriors.linearize import lora_linears
from bayes_peft.posteriors.posterior_lora import PosteriorLoRA
from bayes_peft.data.tasks import Example, Task, choice_logits
from conftest import choice_logits_of, tiny_llama_lora

WORDS = ["good", "bad", "fine film", "a dull and long film", "great", "awful acting", "superb", "weak plot",
         "lovely", "boring", "moving story", "flat"]


@pytest.fixture(scope="module")
def setup(gpt2_style_tokenizer):
    model = tiny_llama_lora(vocab_size=len(gpt2_style_tokenizer)).eval()
    task = Task("toy3", [" A", " B", " C"],
                train=[Example("Q: ", w, " Answer:", i % 3) for i, w in enumerate(WORDS)], test=[])
    loader = list(task.loader(gpt2_style_tokenizer, batch_size=5, shuffle=False))
    return model, task, loader


@contextlib.contextmanager
def _delta_hooks(layers):
    """Within the block, each layer's input (``inputs[name]``) is recorded and a zero ``deltas[name]`` that
    requires grad is added to its whole output, so that ∂/∂delta is the output gradient at every position."""
    deltas, handles, inputs = {}, [], {}
    for name, module in layers.items():
        def hook(module, args, output, name=name):
            inputs[name] = args[0].detach()
            deltas[name] = torch.zeros_like(output, requires_grad=True)
            return output + deltas[name]
        handles.append(module.register_forward_hook(hook))
    try:
        yield inputs, deltas
    finally:
        for h in handles:
            h.remove()


def _dense_position_terms(model, loader):
    """Independently of the library, per example n and LoRA layer: the inputs a ``[T_n, d_in]`` at the
    prompt's tokens, and √p_c ∂log p_c/∂z ``[C, T_n, d_out]`` at every one of them, from hooks that add a
    zero 'delta' to the layer's whole output; and Σ_n log p(y_n)."""
    layers = lora_linears(model)
    a_rows = {n: [] for n in layers}
    g_rows = {n: [] for n in layers}
    log_lik = 0.0
    for batch in loader:
        with _delta_hooks(layers) as (inputs, deltas):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"]).logits[:, -1, batch["choice_ids"]].double()
        log_probs = torch.log_softmax(logits, -1)
        log_lik += log_probs.gather(1, batch["labels"][:, None]).sum().item()
        per_class = []
        for c in range(log_probs.shape[1]):
            grads = torch.autograd.grad(log_probs[:, c].sum(), [deltas[n] for n in layers], retain_graph=True)
            per_class.append({n: log_probs[:, c].detach().exp().sqrt()[:, None, None] * g.double()
                              for n, g in zip(layers, grads)})
        for b, mask in enumerate(batch["attention_mask"].bool()):
            for n in layers:
                a_rows[n].append(inputs[n][b, mask].double())
                g_rows[n].append(torch.stack([grads[n][b, mask] for grads in per_class]))
    return a_rows, g_rows, log_lik


def _dense_kronecker_terms(a, g, kfac):
    """Per layer (G, A) of KFAC-reduce, KFAC-expand or Laplace-LoRA's token rows, written out from their
    definitions."""
    terms = {}
    for name in a:
        n_examples = len(a[name])
        if kfac == "reduce":
            means = [x.mean(0) for x in a[name]]
            sums = [gc.sum(1) for gc in g[name]]  # [C, d_out] per example
            A = sum(torch.outer(m, m) for m in means) / n_examples
            G = sum(s.T @ s for s in sums)
        else:  # every position a row; "expand" averages a prompt's positions in A, "tokens" sums them
            per_prompt = {"expand": lambda x: x.shape[0], "tokens": lambda x: 1}[kfac]
            A = sum(x.T @ x / per_prompt(x) for x in a[name]) / n_examples
            G = sum(torch.einsum("cto,ctp->op", gc, gc) for gc in g[name])
        terms[name] = (G, A)
    return terms


def _relative_error(ours, reference):
    return ((ours - reference).norm() / reference.norm()).item()


def test_low_rank_update_is_exact_when_rank_suffices_and_best_when_not():
    g = torch.Generator().manual_seed(0)
    cols = [torch.randn(6, 3, generator=g, dtype=torch.float64) for _ in range(4)]
    L = None
    for c in cols:
        L = low_rank_update(L, c, rank=6)
    full = sum(c @ c.T for c in cols)
    torch.testing.assert_close(L @ L.T, full)
    # One batch, truncated: the best rank-2 approximation (Eckart–Young) of that batch's Gram.
    big = torch.randn(6, 9, generator=g, dtype=torch.float64)
    root = low_rank_update(None, big, rank=2)
    values, vectors = torch.linalg.eigh(big @ big.T)
    best = vectors[:, -2:] @ torch.diag(values[-2:]) @ vectors[:, -2:].T
    torch.testing.assert_close(root @ root.T, best)


@pytest.mark.parametrize("n_choices", [2, 3, 5])
def test_logit_fisher_root_has_one_column_fewer_than_classes_and_is_exact(n_choices):
    probs = torch.softmax(torch.randn(7, n_choices, generator=torch.Generator().manual_seed(n_choices),
                                      dtype=torch.float64) * 3, -1)
    root = logit_fisher_root(probs)
    assert root.shape == (7, n_choices, n_choices - 1)
    # Σ_c p_c (e_c − p)(e_c − p)ᵀ, class by class, as the Fisher's definition writes it.
    by_class = sum(probs[:, c, None, None] * torch.einsum("bi,bj->bij", torch.eye(n_choices)[c] - probs,
                                                           torch.eye(n_choices)[c] - probs)
                   for c in range(n_choices))
    torch.testing.assert_close(root @ root.transpose(1, 2), by_class)


@pytest.mark.parametrize("kfac", ["reduce", "expand", "tokens"])
def test_kfac_factors_equal_dense_kronecker_terms_of_every_position(setup, kfac):
    model, _, loader = setup
    factors = accumulate_factors(model, loader, n_kfac=64, progress=False, kfac=kfac)  # 64 ≥ every d: exact
    a, g, log_lik = _dense_position_terms(model, loader)
    assert factors.n_examples == len(WORDS)
    assert factors.log_likelihood == pytest.approx(log_lik, rel=1e-6)
    assert len({x.shape[0] for x in a[next(iter(a))]}) > 1  # prompts of several lengths: padding is exercised
    for name, (G, A) in _dense_kronecker_terms(a, g, kfac).items():
        # (Gradients come from float32 forward passes over differently shaped batches: agree to ~1e-6.)
        layer = factors.layers[name]
        assert _relative_error(layer.input_factor(), A) < 1e-5
        assert _relative_error(layer.output_factor(), G) < 1e-5
    assert max(f.output_factor().abs().max() for f in factors.layers.values()) > 1e-6


def _dense_ggn_and_jacobians(model, loader, names):
    """The GGN Σ_n J_nᵀ (diag p − p pᵀ) J_n over every LoRA weight ``[P, P]`` and the Jacobians ``[N, C, P]`` of
    the choice logits, from torch.func.jacrev over the whole prompts."""
    weights = {n: p.detach() for n, p in model.named_parameters() if n in names}
    jacobians, all_logits = [], []
    for batch in loader:
        logits_of = choice_logits_of(model, batch)
        jac = torch.func.jacrev(logits_of)(weights)
        jacobians.append(torch.cat([jac[n].flatten(2).double() for n in names], 2))
        all_logits.append(logits_of(weights).detach().double())
    J, probs = torch.cat(jacobians), torch.softmax(torch.cat(all_logits), -1)
    fisher = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
    return torch.einsum("bcp,bcd,bdq->pq", J, fisher, J), J


@pytest.fixture(scope="module")
def full_prompt_oracle(setup):
    """KFAC-reduce and KFAC-expand fits without truncation, and the dense GGN and Jacobians beside them."""
    model, _, loader = setup
    fits = {k: fit_laplace(model, loader, n_kfac=64, prior=1.0, kfac=k, progress=False) for k in ("reduce", "expand")}
    return fits, *_dense_ggn_and_jacobians(model, loader, fits["reduce"].names)


@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_kfac_variance_of_a_logit_difference_is_close_to_the_dense_full_ggn_posterior(setup, full_prompt_oracle, lam):
    """Summed Var[f₁ − f₀] under KFAC-reduce within 2× of the dense (GGN + λI)⁻¹ of full-prompt Jacobians
    (measured 1.71× at λ = 0.1 and 1.47× at λ = 1; the last-token fit was 5.8× and 2.5×), and closer than
    KFAC-expand."""
    _, _, loader = setup
    fits, ggn, J = full_prompt_oracle
    difference = J[:, 1] - J[:, 0]
    dense = torch.einsum("np,pq,nq->", difference,
                         torch.linalg.inv(ggn + lam * torch.eye(ggn.shape[0], dtype=ggn.dtype)), difference).item()
    ratios = {}
    for kfac, fit in fits.items():
        posterior = fit.with_prior_precision(dict.fromkeys(fit.names, lam))
        covs = [posterior.logit_moments(batch)[1].double() for batch in loader]
        ratios[kfac] = sum((c[:, 1, 1] + c[:, 0, 0] - 2 * c[:, 0, 1]).sum().item() for c in covs) / dense
    assert 1.0 < ratios["reduce"] < 2.0 and ratios["reduce"] < ratios["expand"]
    assert dense < 0.95 * torch.einsum("np,np->", difference, difference).item() / lam  # the curvature matters here


def test_mc_fisher_is_unbiased_for_the_exact_one(setup):
    model, _, loader = setup
    exact = accumulate_factors(model, loader, n_kfac=64, progress=False)
    g = torch.Generator().manual_seed(0)
    runs = [accumulate_factors(model, loader, n_kfac=64, fisher="mc", generator=g, progress=False) for _ in range(60)]
    name = next(iter(exact.layers))
    mc_mean = torch.stack([r.layers[name].output_factor() for r in runs]).mean(0)
    target = exact.layers[name].output_factor()
    assert (mc_mean - target).norm() / target.norm() < 0.25


@pytest.fixture(scope="module")
def low_rank_posterior(setup):
    model, _, loader = setup
    return fit_laplace(model, loader, n_kfac=3, prior=0.5, progress=False)


@pytest.mark.parametrize("lam", [0.3, 10.0])
def test_linearized_terms_give_the_evaluators_linearized_predictive_under_any_prior(low_rank_posterior, setup, lam):
    """The cache that the validation prior and the evidence study read: probabilities under a λ it was not
    computed with equal the evaluator's linearized predictive of the posterior refitted at that λ."""
    from bayes_peft.evaluation.evaluator import Evaluator
    from bayes_peft.laplace.prior import linearized_probs, linearized_terms

    model, task, loader = setup
    refitted = low_rank_posterior.with_prior_precision(dict.fromkeys(low_rank_posterior.names, lam))
    expected = Evaluator(model, refitted, task, progress=False).predict(loader, "linearized")
    terms = linearized_terms(low_rank_posterior, loader)
    torch.testing.assert_close(linearized_probs(low_rank_posterior, terms, lam).float(), expected.probs,
                               rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.cat([labels for _, labels, _ in terms]), expected.labels)


def _dense_layer_fisher(posterior, name):
    basis = posterior.bases[name]
    q = torch.kron(basis.q_out, basis.q_in)
    return q @ torch.diag(basis.eigenvalues.flatten()) @ q.T


def test_woodbury_covariance_equals_dense_inverse(low_rank_posterior, setup):
    model, _, loader = setup
    factors = accumulate_factors(model, loader, n_kfac=3, progress=False)
    for name, layer in factors.layers.items():
        fisher = torch.kron(layer.output_factor(), layer.input_factor())  # from the low-rank factors
        torch.testing.assert_close(_dense_layer_fisher(low_rank_posterior, name), fisher, atol=1e-9, rtol=1e-7)
        dense = torch.linalg.inv(fisher + 0.5 * torch.eye(fisher.shape[0], dtype=fisher.dtype))
        torch.testing.assert_close(low_rank_posterior.covariance(name), dense, atol=1e-9, rtol=1e-7)


def test_linearized_logit_covariance_equals_dense_jacobian(low_rank_posterior, setup):
    model, _, loader = setup
    batch = loader[0]
    mean, cov = low_rank_posterior.logit_moments(batch, tau=0.8)
    weights = {n: p.detach() for n, p in model.named_parameters() if n in low_rank_posterior.names}
    logits_of = choice_logits_of(model, batch)
    jac = torch.func.jacrev(logits_of)(weights)
    dense = sum(torch.einsum("bcp,pq,bdq->bcd", jac[n].flatten(2).double(), low_rank_posterior.covariance(n),
                             jac[n].flatten(2).double()) for n in weights)
    n_choices = dense.shape[-1]
    centring = torch.eye(n_choices, dtype=torch.float64) - 1.0 / n_choices  # the softmax sees P f only
    torch.testing.assert_close(cov.double(), 0.8 * centring @ dense @ centring, atol=1e-5, rtol=1e-5)
    assert dense.abs().max() > 1e-3


def _dense_log_evidence(posterior):
    """λ by layer → the log evidence from dense per-layer Fishers and torch.linalg.slogdet."""
    fishers = {n: _dense_layer_fisher(posterior, n) for n in posterior.names}
    thetas = {n: posterior._mean[n].double().flatten() for n in posterior.names}

    def evidence(lam_by_layer):
        total = posterior.log_likelihood
        for name, fisher in fishers.items():
            lam, theta = lam_by_layer[name], thetas[name]
            _, logdet = torch.linalg.slogdet(fisher + lam * torch.eye(theta.numel(), dtype=torch.float64))
            total += -0.5 * lam * theta @ theta + 0.5 * theta.numel() * math.log(lam) - 0.5 * logdet
        return float(total)

    return evidence


@pytest.mark.parametrize("lam", [1e-3, 0.5, 40.0])
def test_log_evidence_equals_dense_slogdet(low_rank_posterior, lam):
    ours = log_evidence(low_rank_posterior, lam)
    dense = _dense_log_evidence(low_rank_posterior)(dict.fromkeys(low_rank_posterior.names, lam))
    assert ours == pytest.approx(dense, rel=1e-5)


def _dense_span_evidence(posterior, centre):
    """λ ↦ the evidence on each layer's kept span from its definition in dense parameter space: the span is that of
    the projector Π = Q Qᵀ (Q = Q_out ⊗ Q_in), θ* − ``centre`` is projected by Π, and the log determinant of
    F + λI is taken on the span (Qᵀ(F + λI)Q, F the layer's dense Fisher)."""
    def evidence(lam):
        total = posterior.log_likelihood
        for name in posterior.names:
            basis = posterior.bases[name]
            q = torch.kron(basis.q_out, basis.q_in)
            fisher = _dense_layer_fisher(posterior, name)
            offset = (posterior._mean[name].double() - centre[name].double()).flatten()
            inside = q @ (q.T @ offset)
            _, logdet = torch.linalg.slogdet(q.T @ (fisher + lam * torch.eye(offset.numel(), dtype=torch.float64)) @ q)
            total += -0.5 * lam * inside @ inside + 0.5 * q.shape[1] * math.log(lam) - 0.5 * logdet
        return float(total)

    return evidence


def _grid_maximum(function) -> float:
    best = max((10 ** (k / 4) for k in range(-32, 33)), key=function)
    return max((best * 10 ** (k / 400) for k in range(-100, 101)), key=function)


def test_the_evidence_over_the_informed_subspace_equals_a_dense_restriction_and_its_optimum(low_rank_posterior):
    """The subspace evidence, from its definition in dense parameter space: each layer's span is that of the
    dense projector Π = Q Qᵀ (Q = Q_out ⊗ Q_in), θ is projected by Π, and the log determinant of F + λI is
    taken on the span (Qᵀ(F + λI)Q, F the dense Fisher). Its optimum matches a dense grid search, and it
    differs from the plain evidence's."""
    posterior = low_rank_posterior
    dense = _dense_span_evidence(posterior, {n: torch.zeros_like(m) for n, m in posterior.mean_weights().items()})
    for lam in (1e-3, 0.5, 40.0):
        assert log_evidence(posterior, lam, subspace=True) == pytest.approx(dense(lam), rel=1e-6)
    chosen = evidence_prior(posterior, subspace=True)[posterior.names[0]]
    assert abs(chosen / _grid_maximum(dense) - 1) < 0.01
    assert abs(chosen / evidence_prior(posterior)[posterior.names[0]] - 1) > 0.1


def test_evidence_optimal_lambda_matches_dense_grid_search(low_rank_posterior):
    posterior = low_rank_posterior
    dense = _dense_log_evidence(posterior)
    shared = lambda lam: dense(dict.fromkeys(posterior.names, lam))  # noqa: E731
    chosen = evidence_prior(posterior)[posterior.names[0]]
    best = max((10 ** (k / 4) for k in range(-24, 25)), key=shared)
    best = max((best * 10 ** (k / 400) for k in range(-100, 101)), key=shared)  # steps of 0.6 %
    assert abs(chosen / best - 1) < 0.01
    # Per layer: each layer's λ maximises its own terms.
    per_layer = evidence_prior(posterior, "layer")
    name = posterior.names[1]
    grid = [per_layer[name] * 10 ** (k / 200) for k in range(-60, 61)]
    best = max(grid, key=lambda lam: dense({**per_layer, name: lam}))
    assert abs(per_layer[name] / best - 1) < 0.01
    assert log_evidence(posterior, per_layer) >= log_evidence(posterior, chosen) - 1e-9
    # Per kind: every lora_A shares one λ, every lora_B another, and each maximises its kind's terms.
    per_kind = evidence_prior(posterior, "kind")
    kinds = {kind: [n for n in posterior.names if f".{kind}." in n] for kind in ("lora_A", "lora_B")}
    for kind, members in kinds.items():
        assert len({per_kind[n] for n in members}) == 1
        lam = per_kind[members[0]]
        grid = [lam * 10 ** (k / 200) for k in range(-60, 61)]
        best = max(grid, key=lambda x: dense({**per_kind, **dict.fromkeys(members, x)}))
        assert abs(lam / best - 1) < 0.01
    assert log_evidence(posterior, per_layer) >= log_evidence(posterior, per_kind) >= log_evidence(posterior, chosen) - 1e-9


def test_samples_have_the_laplace_covariance(low_rank_posterior):
    """Along each eigendirection of F the sample variance is 1/(λ + e); off the span it is 1/λ."""
    posterior = low_rank_posterior.with_prior_precision(dict.fromkeys(low_rank_posterior.names, 1e-3))
    name = posterior.names[2]
    basis, lam = posterior.bases[name], posterior.prior_precision[name]
    q = torch.kron(basis.q_out, basis.q_in)  # [P, k]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([posterior._sample_offsets(g)[name].flatten().double() for _ in range(2000)])
    along = (draws @ q).var(0)
    expected = 1 / (lam + basis.eigenvalues.flatten())
    assert ((along / expected - 1).abs() < 0.15).all()  # 2000 draws: a variance is within ~3 % per σ
    off = torch.randn(q.shape[0], generator=g, dtype=torch.float64)
    off = off - q @ (q.T @ off)
    off = off / off.norm()
    assert abs((draws @ off).var().item() * lam - 1) < 0.15
    assert expected.min() * lam < 0.5  # the curvature really shrinks some directions


def test_validation_prior_and_persistence(tmp_path, setup):
    model, _, loader = setup
    posterior = fit_laplace(model, loader, n_kfac=4, prior="validation", val_loader=loader[:1], progress=False)
    lam = posterior.prior_precision[posterior.names[0]]
    assert len(set(posterior.prior_precision.values())) == 1 and 1e-4 <= lam <= 1e6
    posterior.save(tmp_path / "la")
    loaded = PosteriorLoRA.load(tmp_path / "la", model)
    assert isinstance(loaded, KFACPosterior) and loaded.prior_precision == posterior.prior_precision
    for a, b in zip(posterior.logit_moments(loader[0]), loaded.logit_moments(loader[0])):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="needs a val_loader"):
        fit_laplace(model, loader, prior="validation", progress=False)


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_fits_over_bitsandbytes_bases(tiny_llama_dir, quantization):
    model, tokenizer = bp.load_model(tiny_llama_dir, quantization=quantization)
    task = Task("t", [" A", " B"], train=[Example("Q: ", w, " Answer:", i % 2) for i, w in enumerate(WORDS)],
                test=[])
    loader = task.loader(tokenizer, batch_size=4)
    posterior = fit_laplace(model, loader, n_kfac=4, progress=False)
    mean, cov = posterior.logit_moments(next(iter(loader)))
    assert torch.isfinite(mean).all() and torch.isfinite(cov).all() and cov.abs().max() > 0
    assert all(math.isfinite(v) and v > 0 for v in posterior.prior_precision.values())
    base = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(base).__name__ in ("Linear8bitLt", "Linear4bit")  # still quantized: nothing was reloaded


def test_a_fit_batch_dispatches_the_same_ops_for_2_and_8_layers(setup, gpt2_style_tokenizer, monkeypatch):
    """Beyond the model's own forward and backward, a batch of the fit costs a fixed number of ops: layers
    of one shape are stacked, not looped over (each op is a kernel launch on a GPU)."""
    from bayes_peft.laplace import kfac
    from bayes_peft.profiling import dispatched_ops

    _, _, loader = setup
    counted = []
    add_batch = kfac._add_batch
    monkeypatch.setattr(kfac, "_add_batch", lambda *args: counted.append(dispatched_ops(lambda: add_batch(*args))))
    for n_layers in (2, 8):
        model = tiny_llama_lora(vocab_size=len(gpt2_style_tokenizer), layers=n_layers).eval()
        accumulate_factors(model, loader[:2], n_kfac=3, progress=False)
    two_layers, eight_layers = counted[1], counted[3]  # the second batch: a low-rank root exists by then
    assert len(lora_linears(tiny_llama_lora(layers=8))) == 4 * len(lora_linears(tiny_llama_lora(layers=2)))
    assert two_layers == eight_layers, (dict(two_layers), dict(eight_layers))
    assert two_layers["_local_scalar_dense"] == 0


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
    return Factors(layers, n_examples=8, log_likelihood=-5.0, p_one_minus_p=0.1)


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


def test_la_diag_equals_the_diagonal_of_the_dense_exact_fisher_ggn(setup):
    """LA (diag): the diagonal of Σ_n J_nᵀ (diag p − p pᵀ) J_n over every LoRA weight, from torch.func.jacrev over
    the whole prompts, and its evidence is that of the dense diagonal posterior."""
    model, _, loader = setup
    posterior = fit_laplace(model, loader, prior=0.3, structure="diag", progress=False)
    names = posterior.names
    ggn, J = _dense_ggn_and_jacobians(model, loader, names)
    ours = torch.cat([posterior.bases[n].eigenvalues.flatten() for n in names])
    torch.testing.assert_close(ours, torch.diagonal(ggn), rtol=1e-6, atol=1e-10)
    assert ours.max() > 1e-3  # a real check, not zeros against zeros
    theta = torch.cat([posterior.mean_weights()[n].flatten().double() for n in names])
    dense = (posterior.log_likelihood - 0.15 * theta.square().sum() + 0.5 * theta.numel() * math.log(0.3)
             - 0.5 * torch.log(torch.diagonal(ggn) + 0.3).sum())
    assert log_evidence(posterior) == pytest.approx(float(dense), rel=1e-8)
    # The prior precision and the covariance are those of N(θ*, diag(1 / (F + λ))).
    name = names[0]
    torch.testing.assert_close(torch.diagonal(posterior.covariance(name)),
                               1 / (posterior.bases[name].eigenvalues.flatten() + 0.3))
    # Its linearized covariance of the centred logits is P J diag(1 / (F + λ)) Jᵀ P, P = I − 11ᵀ/C, without a
    # projection onto the identity bases.
    assert all(posterior.bases[n].identity for n in names)
    covs = torch.cat([posterior.logit_moments(batch)[1].double() for batch in loader])
    centre = torch.eye(J.shape[1], dtype=J.dtype) - 1 / J.shape[1]
    dense = centre @ torch.einsum("bcp,p,bdp->bcd", J, 1 / (torch.diagonal(ggn) + 0.3), J) @ centre
    torch.testing.assert_close(covs, dense, rtol=1e-4, atol=1e-8)
    kfac = fit_laplace(model, loader, prior=0.3, progress=False)
    assert not any(kfac.bases[n].identity for n in names)
    with pytest.raises(ValueError, match="structure must be"):
        fit_laplace(model, loader, structure="block", progress=False)


def test_last_layer_laplace_holds_the_output_layers_lora_alone_and_its_exact_diagonal(llama_style_tokenizer):
    """LLLA: fit_laplace(modules=("lm_head",)) on a model whose LoRA also targets lm_head covers lm_head's
    lora_A and lora_B and nothing else, with the diagonal of the dense GGN over just those weights (a
    300-token vocabulary keeps that GGN small)."""
    tokenizer = llama_style_tokenizer
    model = tiny_llama_lora(vocab_size=len(tokenizer), target_modules=["q_proj", "v_proj", "lm_head"]).eval()
    task = Task("toy3", [" A", " B", " C"], train=[Example("Q: ", w, " Answer:", i % 3) for i, w in enumerate(WORDS)],
                test=[])
    loader = list(task.loader(tokenizer, batch_size=5, shuffle=False))
    head = [n for n, p in model.named_parameters() if p.requires_grad and ".lm_head." in n]
    assert len(head) == 2
    for structure in ("kfac", "diag"):
        posterior = fit_laplace(model, loader, prior=0.3, structure=structure, modules=("lm_head",), progress=False)
        assert sorted(posterior.names) == sorted(head)
    ggn, _ = _dense_ggn_and_jacobians(model, loader, posterior.names)
    ours = torch.cat([posterior.bases[n].eigenvalues.flatten() for n in posterior.names])
    torch.testing.assert_close(ours, torch.diagonal(ggn), rtol=1e-6, atol=1e-10)
    assert ours.max() > 1e-3
    with pytest.raises(ValueError, match="no LoRA layers on the modules"):
        fit_laplace(model, loader, modules=("k_proj",), progress=False)


@pytest.mark.parametrize("kfac", ["reduce", "expand", "tokens"])
def test_the_output_layer_enters_the_factors_at_the_last_position_where_the_logits_are_read(llama_style_tokenizer,
                                                                                             kfac):
    """The model runs lm_head at the last position only, and its lora_A shares its shape with q_proj's, so one
    stacked accumulator holds layers seen at T positions and at one. Each layer's factors must be those of a
    fit over its own module alone, and lm_head's the definition at the last position (from hooks on a full
    forward pass, independent of the library): A = (1/N) Σ_n a_n aₙᵀ, G = Σ_n Σ_c g_nc g_ncᵀ."""
    tokenizer = llama_style_tokenizer
    model = tiny_llama_lora(vocab_size=len(tokenizer), target_modules=["q_proj", "v_proj", "lm_head"]).eval()
    task = Task("toy3", [" A", " B", " C"], train=[Example("Q: ", w, " Answer:", i % 3) for i, w in enumerate(WORDS)],
                test=[])
    loader = list(task.loader(tokenizer, batch_size=5, shuffle=False))
    every = accumulate_factors(model, loader, n_kfac=64, progress=False, kfac=kfac).layers
    for modules in (("lm_head",), ("q_proj", "v_proj")):
        alone = accumulate_factors(model, loader, n_kfac=64, progress=False, kfac=kfac, modules=modules).layers
        for name, factors in alone.items():
            torch.testing.assert_close(every[name].input_factor(), factors.input_factor(), rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(every[name].output_factor(), factors.output_factor(), rtol=1e-9, atol=1e-12)
    a, g, _ = _dense_position_terms(model, loader)
    for name in (n for n in every if ".lm_head." in n):
        A = sum(torch.outer(x[-1], x[-1]) for x in a[name]) / len(a[name])
        G = sum(gc[:, -1].T @ gc[:, -1] for gc in g[name])
        assert _relative_error(every[name].input_factor(), A) < 1e-5
        assert _relative_error(every[name].output_factor(), G) < 1e-5


def _trained_to_certainty(model, loader, steps):
    """``model`` after ``steps`` AdamW steps on ``loader``'s examples (0: as initialised)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for step in range(steps):
        batch = loader[step % len(loader)]
        loss = torch.nn.functional.cross_entropy(choice_logits(model, batch), batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("steps, saturated", [(0, False), (100, True)])
def test_the_evidence_prior_warns_on_fitting_data_the_model_is_certain_of(gpt2_style_tokenizer, steps, saturated):
    """Trained to certainty on its 12 examples, a tiny model's mean Σ_c p_c(1 − p_c) (measured here from its
    own probabilities, not the fit's) falls below the threshold and the evidence prior warns; untrained, it
    stays silent. The validation prior never warns."""
    import warnings

    from bayes_peft.laplace import SATURATION_THRESHOLD, SaturatedFitWarning

    # (LoRA on q_proj and v_proj alone does not fit these 12 arbitrary labels; with lm_head it does.)
    model = tiny_llama_lora(vocab_size=len(gpt2_style_tokenizer), target_modules=["q_proj", "v_proj", "lm_head"])
    task = Task("toy3", [" A", " B", " C"],
                train=[Example("Q: ", w, " Answer:", i % 3) for i, w in enumerate(WORDS)], test=[])
    loader = list(task.loader(gpt2_style_tokenizer, batch_size=6, shuffle=False))
    model = _trained_to_certainty(model, loader, steps)
    with torch.no_grad():
        probs = torch.cat([torch.softmax(choice_logits(model, b).double(), -1) for b in loader])
    measured = (probs * (1 - probs)).sum(-1).mean().item()
    assert (measured < SATURATION_THRESHOLD) == saturated
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        posterior = fit_laplace(model, loader, n_kfac=4, prior="evidence", progress=False)
        fit_laplace(model, loader, n_kfac=4, prior="validation", val_loader=loader[:1], progress=False)
    assert posterior.p_one_minus_p == pytest.approx(measured, rel=1e-4)
    warned = [w for w in caught if issubclass(w.category, SaturatedFitWarning)]
    assert len(warned) == int(saturated)
    if saturated:
        assert f"{measured:.2g}" in str(warned[0].message) and "prior='validation'" in str(warned[0].message)


def _dense_lm_position_terms(model, loader, seed):
    """Independently of the library but for the sampled tokens (:func:`sample_lm_targets` with the same seeded
    generator): per example and LoRA layer, the inputs at the tokens ``[T_n, d_in]`` and the output gradients of
    Σ_t log p(ỹ_t) over the answer's positions ``[1, T_n, d_out]``, from hooks adding a zero delta."""
    from bayes_peft.laplace.kfac import sample_lm_targets

    layers = lora_linears(model)
    a_rows, g_rows = {n: [] for n in layers}, {n: [] for n in layers}
    generator = torch.Generator().manual_seed(seed)
    for batch in loader:
        with _delta_hooks(layers) as (inputs, deltas):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"]).logits.double()
        width = batch["answer_width"]  # the answers' positions: the last `width` labels of every row
        log_probs = torch.log_softmax(logits[:, -width - 1:-1], -1)
        drawn = sample_lm_targets(log_probs, batch["labels"][:, -width:], generator)
        objective = sum(log_probs[b, t, drawn[b, t]] for b, t in (drawn != -100).nonzero().tolist())
        grads = torch.autograd.grad(objective, [deltas[n] for n in layers])
        for b, mask in enumerate(batch["attention_mask"].bool()):
            for n, g in zip(layers, grads):
                a_rows[n].append(inputs[n][b, mask].double())
                g_rows[n].append(g[b, mask].double()[None])
    return a_rows, g_rows


@pytest.mark.parametrize("kfac", ["reduce", "expand"])
def test_kfac_of_the_language_model_loss_equals_dense_terms_of_every_answer_position(llama_style_tokenizer, kfac):
    """A generative task's batches: one Monte Carlo Fisher direction over the vocabulary at every answer position,
    none at the prompt's or the padding's."""
    from bayes_peft.data.generative import QA, GenerativeTask

    pairs = [("Review: a great film Sentiment:", "positive"), ("Review: the sky is blue Sentiment:", "negative is"),
             ("Review: a long film Sentiment:", "positive"), ("Review: it wins Sentiment:", "negative")]
    task = GenerativeTask("toy", train=[QA(p, a) for p, a in pairs], test=[])
    model = tiny_llama_lora(vocab_size=len(llama_style_tokenizer))
    loader = list(task.loader(llama_style_tokenizer, batch_size=2, shuffle=False))
    factors = accumulate_factors(model, loader, n_kfac=64, fisher="mc", generator=torch.Generator().manual_seed(3),
                                 progress=False, kfac=kfac)
    a, g = _dense_lm_position_terms(model, loader, seed=3)
    assert factors.n_examples == 4
    for name, (G, A) in _dense_kronecker_terms(a, g, kfac).items():
        layer = factors.layers[name]
        assert _relative_error(layer.input_factor(), A) < 1e-5
        assert _relative_error(layer.output_factor(), G) < 1e-5
    assert max(f.output_factor().abs().max() for f in factors.layers.values()) > 1e-6
    with pytest.raises(ValueError, match="fisher='mc'"):
        accumulate_factors(model, loader, n_kfac=4, fisher="exact", progress=False)


# ---------------------------------------------------------------- the prior's centre (issue 39)


def _initialisation(posterior) -> dict:
    """A θ₀ as LoRA's: lora_A at a point away from θ* (its initialisation, the weights shrunk and shifted),
    lora_B at zero."""
    g = torch.Generator().manual_seed(11)
    return {n: torch.zeros_like(m) if "lora_B" in n else 0.6 * m + 0.05 * torch.randn(m.shape, generator=g)
            for n, m in posterior.mean_weights().items()}


def test_the_centred_evidence_of_la_diag_equals_the_dense_ggn_one_and_its_optimum(setup):
    """Centred at θ₀, LA (diag)'s evidence from the diagonal of the dense GGN Σ_n J_nᵀ (diag p − p pᵀ) J_n
    (torch.func.jacrev over the whole prompts) and ‖θ* − θ₀‖², maximised by brute force over a λ grid."""
    model, _, loader = setup
    unit = fit_laplace(model, loader, prior=1.0, structure="diag", progress=False)
    theta0 = _initialisation(unit)
    posterior = fit_laplace(model, loader, prior=1.0, structure="diag", progress=False, prior_mean=theta0)
    names = posterior.names
    ggn, _ = _dense_ggn_and_jacobians(model, loader, names)
    offset = torch.cat([(posterior.mean_weights()[n].double() - theta0[n].double()).flatten() for n in names])

    def dense(lam):
        return float(posterior.log_likelihood - 0.5 * lam * offset.square().sum() + 0.5 * offset.numel() * math.log(lam)
                     - 0.5 * torch.log(torch.diagonal(ggn) + lam).sum())

    for lam in (1e-2, 0.7, 30.0):
        assert log_evidence(posterior, lam) == pytest.approx(dense(lam), rel=1e-8)
    chosen = evidence_prior(posterior)[names[0]]
    assert abs(chosen / _grid_maximum(dense) - 1) < 0.01
    assert abs(chosen / evidence_prior(unit)[names[0]] - 1) > 0.1  # the centre matters here


def test_the_centred_evidence_on_the_kept_span_equals_a_dense_restriction_and_its_optimum(low_rank_posterior, setup):
    """The default evidence, from its definition in dense parameter space: θ* − θ₀ projected onto each layer's
    span Π = Q Qᵀ (Q = Q_out ⊗ Q_in), log det of Qᵀ(F + λI)Q with F the layer's dense Fisher; ``prior="evidence"``
    picks the λ a dense grid search finds."""
    model, _, loader = setup
    theta0 = _initialisation(low_rank_posterior)
    posterior = fit_laplace(model, loader, n_kfac=3, prior="evidence", progress=False, prior_mean=theta0)

    dense = _dense_span_evidence(posterior, theta0)
    for lam in (1e-3, 0.5, 40.0):
        assert log_evidence(posterior, lam, subspace=True) == pytest.approx(dense(lam), rel=1e-6)
    chosen = posterior.prior_precision[posterior.names[0]]
    assert abs(chosen / _grid_maximum(dense) - 1) < 0.01
    uncentred = evidence_prior(low_rank_posterior, subspace=True)[posterior.names[0]]
    assert abs(chosen / uncentred - 1) > 0.1


def test_the_prior_mean_survives_save_and_load(tmp_path, setup, low_rank_posterior):
    model, _, loader = setup
    theta0 = _initialisation(low_rank_posterior)
    posterior = fit_laplace(model, loader, n_kfac=3, prior="evidence", progress=False, prior_mean=theta0)
    posterior.save(tmp_path / "centred", adapter=False)
    assert json.loads((tmp_path / "centred" / "posterior.json").read_text())["prior_centre"] == "prior_mean"
    loaded = PosteriorLoRA.load(tmp_path / "centred", model)
    assert all(torch.equal(loaded.prior_mean[n], posterior.prior_mean[n]) for n in posterior.names)
    assert log_evidence(loaded) == log_evidence(posterior)
    low_rank_posterior.save(tmp_path / "zero", adapter=False)
    assert PosteriorLoRA.load(tmp_path / "zero", model).prior_mean is None
    with pytest.raises(ValueError, match="prior mean of shape"):
        fit_laplace(model, loader, n_kfac=3, prior=1.0, progress=False,
                    prior_mean={n: t[..., :1] for n, t in theta0.items()})


def test_the_evidence_without_a_prior_mean_falls_back_to_the_kept_span_around_zero_and_says_so(setup,
                                                                                             low_rank_posterior):
    model, _, loader = setup
    with pytest.warns(EvidenceFallbackWarning, match="falling back to the evidence on the kept eigenbasis span "
                                                     "centred at 0"):
        posterior = fit_laplace(model, loader, n_kfac=3, prior="evidence", progress=False)
    expected = evidence_prior(low_rank_posterior, subspace=True)
    assert posterior.prior_precision == pytest.approx(expected, rel=1e-9)


def test_the_published_evidence_reads_every_direction_around_zero(setup, low_rank_posterior):
    """``prior="evidence_published"``: Laplace-LoRA's Algorithm 2 as published, for comparisons; the prior mean
    stays with the fit (only the choice of λ ignores it)."""
    model, _, loader = setup
    theta0 = _initialisation(low_rank_posterior)
    posterior = fit_laplace(model, loader, n_kfac=3, prior="evidence_published", progress=False, prior_mean=theta0)
    assert posterior.prior_precision == pytest.approx(evidence_prior(low_rank_posterior), rel=1e-9)
    assert posterior.prior_mean is not None
    with pytest.raises(ValueError, match="evidence_published"):
        fit_laplace(model, loader, n_kfac=3, prior="evidence at zero", progress=False)


def _scaled(posterior, factor: float):
    """The posterior with every Fisher eigenvalue multiplied by ``factor`` (as from ``factor`` times the data)."""
    from bayes_peft.laplace.posterior import LayerEigenbasis

    bases = {n: LayerEigenbasis(b.q_out, b.q_in, factor * b.eigenvalues) for n, b in posterior.bases.items()}
    return KFACPosterior(posterior.model, posterior.mean_weights(), bases, posterior.prior_precision,
                         posterior.n_examples, posterior.log_likelihood, posterior.p_one_minus_p, posterior.prior_mean)


def test_the_linearised_models_evidence_equals_a_dense_gaussian_integral_and_its_optimum(setup, low_rank_posterior):
    """log Z = LL* + (P/2) log λ − ½ log det(F + λI) − ½ dᵀ λ F (F + λI)⁻¹ d, d = θ* − θ₀, from dense per-layer
    Fishers with torch.linalg.slogdet and solve; evidence_prior(linearized=True) finds a dense grid's maximum.
    On the low-rank KFAC fit and on LA (diag), whose F is the dense GGN's diagonal. The tiny model's curvature
    pins nothing against θ₀ (e·d² ≪ 1: the maximum is at λ → ∞), so its Fisher is scaled 100-fold and θ₀ set
    30 times further from θ*, for a maximum inside the range."""
    from bayes_peft.laplace.prior import LAMBDA_RANGE, linearized_log_evidence

    model, _, loader = setup
    start = _initialisation(low_rank_posterior)
    mean = low_rank_posterior.mean_weights()
    theta0 = {n: mean[n] - 30 * (mean[n] - start[n]) for n in start}
    kfac = _scaled(fit_laplace(model, loader, n_kfac=3, prior=1.0, progress=False, prior_mean=theta0), 100.0)
    diag = _scaled(fit_laplace(model, loader, prior=1.0, structure="diag", progress=False, prior_mean=theta0), 100.0)
    ggn, _ = _dense_ggn_and_jacobians(model, loader, diag.names)
    curvature = 100.0 * torch.diagonal(ggn)
    offsets = torch.cat([(mean[n].double() - theta0[n].double()).flatten() for n in diag.names])

    def dense_kfac(lam):
        total = kfac.log_likelihood
        for name in kfac.names:
            fisher = _dense_layer_fisher(kfac, name)
            d = (mean[name].double() - theta0[name].double()).flatten()
            eye = torch.eye(d.numel(), dtype=torch.float64)
            _, logdet = torch.linalg.slogdet(fisher + lam * eye)
            total += (0.5 * d.numel() * math.log(lam) - 0.5 * logdet
                      - 0.5 * lam * d @ fisher @ torch.linalg.solve(fisher + lam * eye, d))
        return float(total)

    def dense_diag(lam):
        return float(diag.log_likelihood + 0.5 * offsets.numel() * math.log(lam) - 0.5 * torch.log(curvature + lam).sum()
                     - 0.5 * (lam * curvature * offsets.square() / (curvature + lam)).sum())

    for posterior, oracle in ((kfac, dense_kfac), (diag, dense_diag)):
        for lam in (1e-2, 0.7, 30.0):
            assert linearized_log_evidence(posterior, lam) == pytest.approx(oracle(lam), rel=1e-7)
        chosen = evidence_prior(posterior, linearized=True)[posterior.names[0]]
        assert 1e3 * LAMBDA_RANGE[0] < chosen < 1e-3 * LAMBDA_RANGE[1]  # inside the range, not at an end
        assert abs(chosen / _grid_maximum(oracle) - 1) < 0.01

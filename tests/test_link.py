"""The links from Gaussian logits to probabilities, against integrals and draws computed independently."""

import math

import numpy as np
import pytest
import torch

from bayes_peft.posteriors.link import link_probs, mc_logit_probs, probit_probs, quadrature_probs


def _dense_expected_sigmoid(mu: float, sd: float) -> float:
    """E[σ(d)], d ~ N(mu, sd²), by the trapezoid rule on 400,001 points over ±12 sd."""
    if sd == 0:
        return 1 / (1 + math.exp(-mu))
    d = np.linspace(mu - 12 * sd, mu + 12 * sd, 400_001)
    density = np.exp(-0.5 * ((d - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))
    sigmoid = np.exp(-np.logaddexp(0.0, -d))
    return float(np.trapezoid(density * sigmoid, d))


def _two_class_moments(mus, sds, shared):
    """Logit moments whose difference f₁ − f₀ has mean ``mus`` and sd ``sds``, plus a large shared variance."""
    mean = torch.stack([torch.zeros(len(mus)), torch.tensor(mus)], 1).double() + 3.0
    var = torch.tensor(sds, dtype=torch.float64) ** 2
    # f0 = s + e0, f1 = s + e1 with Var s = shared and e independent, each with half the difference's variance
    cov = torch.zeros(len(mus), 2, 2, dtype=torch.float64) + shared
    cov[:, 0, 0] += var / 2
    cov[:, 1, 1] += var / 2
    return mean, cov


GRID = [(mu, sd) for mu in (-20.0, -2.0, 0.0, 0.3, 4.0, 40.0) for sd in (0.0, 0.1, 1.0, 1.5, 5.0, 30.0, 300.0)]


def test_quadrature_equals_a_dense_integral_over_every_width():
    mus, sds = zip(*GRID)
    mean, cov = _two_class_moments(mus, sds, shared=250.0)
    ours = quadrature_probs(mean, cov)[:, 1]
    reference = torch.tensor([_dense_expected_sigmoid(mu, sd) for mu, sd in GRID], dtype=torch.float64)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_mc_matches_the_quadrature_for_two_choices():
    mus, sds = zip(*GRID[::3])
    mean, cov = _two_class_moments(mus, sds, shared=100.0)
    mc = mc_logit_probs(mean, cov, 200_000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(mc, quadrature_probs(mean, cov), atol=3e-3, rtol=0)


def test_mc_matches_a_million_independent_draws_for_four_choices():
    rng = np.random.default_rng(0)
    factors = rng.normal(size=(3, 4, 4))
    covs = factors @ factors.transpose(0, 2, 1) + 30.0  # plus a shared variance
    means = rng.normal(size=(3, 4)) * 2
    reference = []
    for mu, sigma in zip(means, covs):
        draws = rng.multivariate_normal(mu, sigma, size=1_000_000)
        draws = np.exp(draws - draws.max(1, keepdims=True))
        reference.append((draws / draws.sum(1, keepdims=True)).mean(0))
    ours = mc_logit_probs(torch.from_numpy(means), torch.from_numpy(covs), 100_000, torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours, torch.from_numpy(np.stack(reference)), atol=3e-3, rtol=0)


@pytest.mark.parametrize("link, n_choices", [("quadrature", 2), ("probit", 2), ("mc", 2), ("mc", 4)])
def test_a_common_random_shift_of_every_logit_changes_no_probability(link, n_choices):
    """f' = f + z·1 for any z jointly Gaussian with f: μ' = μ + m·1, Σ' = Σ + v 11ᵀ + 1wᵀ + w1ᵀ."""
    g = torch.Generator().manual_seed(n_choices)
    root = torch.randn(5, n_choices, n_choices + 1, generator=g, dtype=torch.float64)
    mean = torch.randn(5, n_choices, generator=g, dtype=torch.float64)
    cov = root @ root.transpose(1, 2)
    # z = s·(a·ε) + b with ε the noise behind f: cross-covariance w = s·(root @ a); its own variance v.
    a = torch.randn(5, n_choices + 1, 1, generator=g, dtype=torch.float64)
    w = (root @ a).squeeze(-1) * 4.0
    v = 16.0 * (a.transpose(1, 2) @ a).squeeze() + 100.0
    ones = torch.ones(n_choices, dtype=torch.float64)
    shifted_cov = cov + v[:, None, None] * torch.outer(ones, ones) + w[:, :, None] * ones + ones[:, None] * w[:, None, :]
    shifted_mean = mean + 7.0
    before = link_probs(mean, cov, link, generator=torch.Generator().manual_seed(0))
    after = link_probs(shifted_mean, shifted_cov, link, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(after, before, atol=1e-9, rtol=0)


def test_two_choice_links_keep_the_mean_argmax_and_probit_is_close():
    g = torch.Generator().manual_seed(3)
    mean = torch.randn(2000, 2, generator=g, dtype=torch.float64) * 3
    root = torch.randn(2000, 2, 2, generator=g, dtype=torch.float64) * 5
    cov = root @ root.transpose(1, 2) + 300.0  # the shared variance that flipped argmaxes before
    for link in ("auto", "quadrature", "probit"):
        assert torch.equal(link_probs(mean, cov, link).argmax(-1), mean.argmax(-1))
    assert (probit_probs(mean, cov) - quadrature_probs(mean, cov)).abs().max() < 0.02
    torch.testing.assert_close(link_probs(mean, torch.zeros_like(cov)), torch.softmax(mean, -1))


def test_two_choice_links_refuse_more_choices():
    with pytest.raises(ValueError, match="two choices.*link='mc'"):
        quadrature_probs(torch.zeros(1, 3), torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="link must be one of"):
        link_probs(torch.zeros(1, 2), torch.zeros(1, 2, 2), "laplace_bridge")


def test_mc_probabilities_of_an_example_do_not_depend_on_its_batch():
    g = torch.Generator().manual_seed(5)
    root = torch.randn(6, 3, 3, generator=g, dtype=torch.float64)
    mean, cov = torch.randn(6, 3, generator=g, dtype=torch.float64), root @ root.transpose(1, 2)
    whole = mc_logit_probs(mean, cov, 500, torch.Generator().manual_seed(0))
    parts = [mc_logit_probs(mean[i::2], cov[i::2], 500, torch.Generator().manual_seed(0)) for i in range(2)]
    torch.testing.assert_close(whole[0::2], parts[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(whole[1::2], parts[1], atol=1e-12, rtol=0)

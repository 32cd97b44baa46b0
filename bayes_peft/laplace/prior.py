"""Choosing the prior precision λ: the Laplace evidence (Algorithm 2) or validation likelihood (Algorithm 3).

The log evidence of a Laplace posterior at the trained weights θ*, under the prior N(θ₀, λ⁻¹ I), is

    log p(D | λ) ≈ Σ_n log p(y_n | x_n, θ*) − (λ/2)‖θ* − θ₀‖² + (P/2) log λ − ½ log det(F + λ I),

summed over independent layers when λ is per layer. Its derivative in one layer's λ is
½ [Σ_i e_i / (λ (λ + e_i)) − ‖θ*_l − θ₀_l‖²], which falls strictly with λ, so each optimum is the unique root,
found by bisection on log λ. A shared scalar λ uses the sum of the layers' derivatives.

**Where the prior is centred, and which directions it reads.** θ₀ is where the adapter started (LoRA's
``lora_A`` as initialised, ``lora_B`` = 0). Centred at 0, ‖θ*‖² is mostly ``lora_A``'s random initialisation,
which training never meant to explain, and the stationary point λ = γ / ‖θ*‖² (γ = Σ e/(λ + e) ≤ N(C − 1), the
well-determined directions) comes out far too small. Centred at θ₀ and read on the span of each layer's kept
eigenbasis only (outside it the likelihood is flat), the evidence sees what the data moved. Issue 39 measured
it on SST-2 (480 examples, a MAP that is not saturated): λ* 42.9 and test NLL 0.325, against 2.27 and 0.510
centred at 0, the MAP's 0.333 and the validation prior's 316 and 0.306. ``prior="evidence"`` is that
variant (:func:`with_prior`); a fit with no θ₀ falls back to the kept span centred at 0, and warns
(:class:`EvidenceFallbackWarning`).

The default, ``"auto"``, is the validation prior whenever validation data are given and the evidence
otherwise. The evidence sees the training data only, through a Fisher weighted by p(1 − p): for a MAP that
is certain of its training examples the curvature nearly vanishes, the optimum λ is set by ‖θ*‖² alone,
and the predictive turns nearly uniform (on the overfit preset, 3 seeds: ECE×100 33 against AdamW's 13 and
the validation prior's 6.5; benchmarks/RESULTS.md). The validation log-likelihood scores what the prior is
for, the predictive on held-out data. :func:`with_prior` warns (:class:`SaturatedFitWarning`) when the
evidence is asked for on saturated fitting data.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable, Literal, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from .. import sharding
from ..config import PRIOR_NAMES
from ..posteriors.linearize import choice_logit_grads, linearizable_layers
from ..posteriors.link import Link, link_probs
from .posterior import KFACPosterior

__all__ = ["log_evidence", "linearized_log_evidence", "evidence_prior", "validation_prior", "linearized_terms", "linearized_moments",
           "linearized_probs", "with_prior", "resolve_prior", "layer_kind", "LAMBDA_RANGE", "Granularity",
           "GRANULARITIES", "Prior", "SATURATION_THRESHOLD", "SaturatedFitWarning", "EvidenceFallbackWarning"]

Granularity = Literal["model", "kind", "layer"]
Prior = Union[Literal["auto", "evidence", "evidence_published", "validation"], float]
GRANULARITIES = ("model", "kind", "layer")
LAMBDA_RANGE = (1e-8, 1e8)  # the search interval; an optimum at an end means the data say "no limit"
# The mean Σ_c p_c (1 − p_c) over the fitting data below which the evidence is not to be trusted. From the
# evidence study of the centred, span-restricted evidence (benchmarks/RESULTS.md, seed 0, the overfit and
# unsaturated presets): at 0.1 to 0.24 its test ECE×100 was 6.8 to 10.1 (the MAP's 2.3 to 5.4); at 4.7e-3 and
# below it was 21.7 to 32.7, 2.5 to 3.3 times the MAP's (a predictive near uniform). No point fell between: the
# threshold sits at the gap's geometric middle.
SATURATION_THRESHOLD = 2e-2


class SaturatedFitWarning(UserWarning):
    """The evidence prior was asked for on fitting data the model is certain of."""


class EvidenceFallbackWarning(UserWarning):
    """The evidence prior was asked for on a fit with no prior mean θ₀, and is read around 0 instead."""


def _prior_terms(posterior: KFACPosterior, name: str, subspace: bool) -> tuple[Tensor, int]:
    """(‖θ_l − θ₀_l‖², P_l), θ₀ the prior's centre, or with ``subspace`` the same within the span of the layer's
    kept eigenbasis."""
    basis, offset = posterior.bases[name], posterior.offset_from_prior(name)
    if subspace:
        return basis.project(offset).square().sum(), basis.eigenvalues.numel()
    return offset.square().sum(), basis.n_params


def _layer_log_evidence_terms(posterior: KFACPosterior, name: str, lam: float, subspace: bool = False) -> Tensor:
    """−(λ/2)‖θ_l‖² + (P_l/2) log λ − ½ log det(F_l + λ I), over every direction or over the kept span."""
    basis = posterior.bases[name]
    norm2, n_params = _prior_terms(posterior, name, subspace)
    log_det = torch.log(lam + basis.eigenvalues).sum() if subspace else basis.log_det(lam)
    return -0.5 * lam * norm2 + 0.5 * n_params * math.log(lam) - 0.5 * log_det


def log_evidence(posterior: KFACPosterior, prior_precision: Mapping[str, float] | float | None = None,
                 subspace: bool = False) -> float:
    """The Laplace log evidence under ``prior_precision`` (default: the posterior's own); with ``subspace``,
    over the directions the curvature keeps only (see :func:`evidence_prior`)."""
    if prior_precision is None:
        prior_precision = posterior.prior_precision
    elif not isinstance(prior_precision, Mapping):
        prior_precision = dict.fromkeys(posterior.names, float(prior_precision))
    total = sum(_layer_log_evidence_terms(posterior, n, prior_precision[n], subspace) for n in posterior.names)
    return posterior.log_likelihood + float(total)


def _root(posterior: KFACPosterior, names: Sequence[str], subspace: bool, iterations: int = 200) -> float:
    """The λ shared by ``names`` where d log p(D | λ) / dλ = ½ [Σ_i e_i / (λ (λ + e_i)) − ‖θ‖²] is zero."""
    eigenvalues = [posterior.bases[name].eigenvalues for name in names]
    norm2 = sum(float(_prior_terms(posterior, name, subspace)[0]) for name in names)  # free of λ: once

    def slope(lam: float) -> float:
        return 0.5 * (float(sum((e / (lam * (lam + e))).sum() for e in eigenvalues)) - norm2)  # one host read

    low, high = (math.log(v) for v in LAMBDA_RANGE)
    if slope(math.exp(low)) <= 0:
        return math.exp(low)
    if slope(math.exp(high)) >= 0:
        return math.exp(high)
    for _ in range(iterations):
        mid = 0.5 * (low + high)
        if slope(math.exp(mid)) > 0:
            low = mid
        else:
            high = mid
    return math.exp(0.5 * (low + high))


def _linearized_objective(posterior: KFACPosterior, names: Sequence[str]) -> Callable[[float], float]:
    """λ ↦ the λ-dependent part of :func:`linearized_log_evidence` summed over the layers ``names`` (one λ):
    Σ_l (P_l/2) log λ − ½ log det(F_l + λ I) − ½ Σ_i λ e_i d_i² / (e_i + λ), with d the coordinates of θ* − θ₀ in
    each layer's kept eigenbasis. Outside it e = 0: those directions add nothing but the log λ they cancel."""
    e = torch.cat([posterior.bases[n].eigenvalues.flatten() for n in names]).double()
    squares = torch.cat([posterior.bases[n].project(posterior.offset_from_prior(n)).square().flatten()
                         for n in names]).double()
    kept = e.numel()  # (P/2) log λ − ½ (P − K) log λ over the directions with e = 0 leaves (K/2) log λ

    def objective(lam: float) -> float:
        return float(0.5 * kept * math.log(lam) - 0.5 * torch.log(e + lam).sum()
                     - 0.5 * (lam * e * squares / (e + lam)).sum())

    return objective


def linearized_log_evidence(posterior: KFACPosterior,
                            prior_precision: Mapping[str, float] | float | None = None) -> float:
    """The evidence of the linearised model: the likelihood taken as the Gaussian exp(LL* − ½ (θ − θ*)ᵀ F (θ − θ*))
    around the trained θ* and integrated exactly against the prior N(θ₀, λ⁻¹ I),

        log Z = LL* + (P/2) log λ − ½ log det(F + λ I) − ½ (θ* − θ₀)ᵀ λ F (F + λ I)⁻¹ (θ* − θ₀).

    Where the plain Laplace evidence charges λ‖θ* − θ₀‖² in every direction, this charges a direction only as
    far as the data pin it (λ e / (e + λ)): what the data leave undetermined is explained by the prior, whatever
    it holds (Antorán et al. 2022 evaluate the evidence at the linearised model's optimum for the same reason).
    """
    if prior_precision is None:
        prior_precision = posterior.prior_precision
    elif not isinstance(prior_precision, Mapping):
        prior_precision = dict.fromkeys(posterior.names, float(prior_precision))
    return posterior.log_likelihood + sum(_linearized_objective(posterior, [n])(prior_precision[n])
                                          for n in posterior.names)


def _maximise(objective, points: int = 161, iterations: int = 100) -> float:
    """The λ in :data:`LAMBDA_RANGE` that maximises ``objective(λ)``: the best of a log-spaced grid, refined by
    golden-section search between its neighbours (the objective need not be unimodal over the whole range)."""
    low, high = (math.log(v) for v in LAMBDA_RANGE)
    grid = [low + (high - low) * k / (points - 1) for k in range(points)]
    values = [objective(math.exp(x)) for x in grid]
    best = max(range(points), key=values.__getitem__)
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, points - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(iterations):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if objective(math.exp(c)) >= objective(math.exp(d)):
            b = d
        else:
            a = c
    return math.exp(0.5 * (a + b))


def layer_kind(name: str) -> str:
    """``"lora_A"``, ``"lora_B"`` or the parameter's own name for any other layer."""
    return next((kind for kind in ("lora_A", "lora_B") if f".{kind}." in name), name)


def evidence_prior(posterior: KFACPosterior, granularity: Granularity = "model",
                   subspace: bool = False, linearized: bool = False) -> dict[str, float]:
    """The λ that maximises the log evidence: one for the whole ``"model"``, one per ``"kind"`` of layer
    (every ``lora_A`` shares one, every ``lora_B`` another), or one per ``"layer"``.

    ``subspace``: the evidence of the directions the data inform only, the span of each layer's kept
    eigenbasis (P_l its dimension, ‖θ_l‖² the norm of θ's projection onto it). Outside that span the
    likelihood is flat, and the plain evidence reads θ there only through −(λ/2)‖θ_⊥‖², which, for LoRA's
    untrained random lora_A, pulls λ towards 0. A remedy that issue 26's study tests.

    ``linearized``: maximise :func:`linearized_log_evidence` instead (``subspace`` does not apply: it weighs
    each direction by how far the data determine it).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    key = {"model": lambda name: "", "kind": layer_kind, "layer": lambda name: name}[granularity]
    groups: dict[str, list[str]] = {}
    for name in posterior.names:
        groups.setdefault(key(name), []).append(name)
    prior: dict[str, float] = {}
    for members in groups.values():
        if linearized:
            lam = _maximise(_linearized_objective(posterior, members))
        else:
            lam = _root(posterior, members, subspace)
        prior.update(dict.fromkeys(members, lam))
    return prior


Terms = list[tuple[Tensor, Tensor, dict[str, tuple[Tensor, Tensor]]]]


def linearized_terms(posterior: KFACPosterior, loader: Iterable[Mapping[str, Tensor]]) -> Terms:
    """The λ-free parts of the linearized predictive on ``loader``, batch by batch: the choice logits at the mean
    ``[B, C]``, the labels ``[B]`` and each layer's ``(gram, coordinates)`` (:meth:`KFACPosterior.layer_terms`).
    One pass with per-example gradients; every λ then costs only small tensor products
    (:func:`linearized_probs`)."""
    model = posterior.model
    layers = linearizable_layers(model, posterior.names)
    device = next(iter(layers.values())).weight.device
    cached, padding = [], sharding.passes_to_match(model, loader)
    was_training = model.training
    model.eval()
    try:
        with posterior.mean():
            for batch in loader:
                batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                logits, grads = choice_logit_grads(model, batch, layers)
                terms = {n: posterior.layer_terms(n, g.per_example()) for n, g in grads.items()}
                cached.append((logits.double().detach(), batch["labels"], terms))
            for _ in range(padding if cached else 0):
                choice_logit_grads(model, batch, layers)  # an FSDP2 model's weights are gathered by every rank
    finally:
        model.train(was_training)
    if not cached:
        raise ValueError("the loader yielded no batches")
    return cached


def linearized_moments(posterior: KFACPosterior, terms: Terms,
                       lam: Optional[float] = None) -> list[tuple[Tensor, Tensor]]:
    """Batch by batch, the linearized predictive's logit mean ``[B, C]`` and covariance ``[B, C, C]`` at τ = 1
    (those of :meth:`~bayes_peft.posteriors.gaussian.GaussianLoRA.logit_moments`), from :func:`linearized_terms`, under
    the scalar prior precision ``lam`` (``None``: the posterior's own, layer by layer)."""
    return [(logits, sum(posterior.combine(n, gram, coords, lam) for n, (gram, coords) in layer_terms.items()))
            for logits, _, layer_terms in terms]


def linearized_probs(posterior: KFACPosterior, terms: Terms, lam: float, tau: float = 1.0, link: Link = "auto",
                     seed: int = 0) -> Tensor:
    """``[N, C]``: the linearized predictive's probabilities under the scalar prior precision ``lam``, from
    :func:`linearized_terms`; ``link`` turns the logit moments into probabilities, a Monte Carlo link with the
    same draws in every batch (as the evaluator's)."""
    return torch.cat([link_probs(logits, tau * cov, link, generator=torch.Generator().manual_seed(seed))
                      for logits, cov in linearized_moments(posterior, terms, lam)])


def validation_prior(posterior: KFACPosterior, val_loader: Optional[Iterable[Mapping[str, Tensor]]],
                     grid: Sequence[float] = tuple(10.0 ** (k / 4) for k in range(-16, 25)),
                     tau: float = 1.0, link: Link = "auto", seed: int = 0,
                     terms: Optional[list] = None) -> dict[str, float]:
    """The scalar λ on ``grid`` with the highest validation log-likelihood of the linearized predictive,
    turned into probabilities by ``link`` (the evaluator's default; Monte Carlo links draw the same noise
    for every λ, so that the grid compares like with like).

    The per-example gradients are taken once (:func:`linearized_terms` of ``val_loader``, or ``terms`` already
    taken on the validation split, which then is not read); each λ then costs only small tensor products.
    """
    if terms is None:
        if val_loader is None:
            raise ValueError("validation_prior needs a val_loader or its linearized terms")
        terms = linearized_terms(posterior, val_loader)
    labels = torch.cat([labels for _, labels, _ in terms])

    def val_log_likelihood(lam: float) -> float:
        probs = linearized_probs(posterior, terms, lam, tau, link, seed)
        return probs.gather(1, labels[:, None]).clamp_min(1e-300).log().sum().item()

    best = max(grid, key=val_log_likelihood)
    return dict.fromkeys(posterior.names, float(best))


def resolve_prior(prior: Prior, has_validation: bool) -> Prior:
    """``"auto"`` → ``"validation"`` when there are validation data, else ``"evidence"``; any other prior as
    it is."""
    if prior == "auto":
        return "validation" if has_validation else "evidence"
    return prior


def warn_if_saturated(posterior: KFACPosterior) -> None:
    """Warn (:class:`SaturatedFitWarning`) when the model is nearly certain of its fitting data."""
    seen = posterior.p_one_minus_p
    if seen is not None and seen < SATURATION_THRESHOLD:
        warnings.warn(
            f"the evidence prior on saturated fitting data: the model is certain of them (mean Σ_c p_c(1 − p_c) = "
            f"{seen:.2g}, below {SATURATION_THRESHOLD:g}), so the Fisher nearly vanishes and the evidence's λ is set "
            "by ‖θ − θ₀‖² alone, which tends to make the predictive nearly uniform. Use prior='validation' with "
            "validation data (the default 'auto' does when given them), or fit on examples the model did not "
            "train on.", SaturatedFitWarning, stacklevel=3)


def with_prior(posterior: KFACPosterior, prior: Prior = "auto",
               val_loader: Optional[Iterable[Mapping[str, Tensor]]] = None,
               granularity: Granularity = "model") -> KFACPosterior:
    """``posterior`` with its prior precision chosen by ``prior``: ``"evidence"`` (:func:`evidence_prior` at
    ``granularity``, centred at the posterior's prior mean and on the kept span; warns on saturated fitting
    data, and when there is no prior mean), ``"evidence_published"`` (Laplace-LoRA's Algorithm 2 as published:
    centred at 0, every direction; for comparisons), ``"validation"`` (:func:`validation_prior` on
    ``val_loader``), ``"auto"`` (validation when ``val_loader`` is given, else the evidence) or a fixed
    positive λ."""
    if isinstance(prior, (int, float)) and not isinstance(prior, bool):
        if not prior > 0:
            raise ValueError(f"a fixed prior precision must be positive, got {prior}")
        return posterior.with_prior_precision(dict.fromkeys(posterior.names, float(prior)))
    prior = resolve_prior(prior, val_loader is not None)
    if prior == "evidence":
        warn_if_saturated(posterior)
        if posterior.prior_mean is None:
            warnings.warn(
                "the evidence prior without a prior mean θ₀ (the adapter's initialisation, which the training stage "
                "saves): falling back to the evidence on the kept eigenbasis span centred at 0. Pass "
                "fit_laplace(..., prior_mean=θ₀) to centre it where the adapter started.",
                EvidenceFallbackWarning, stacklevel=3)
        return posterior.with_prior_precision(evidence_prior(posterior, granularity, subspace=True))
    if prior == "evidence_published":  # Laplace-LoRA's Algorithm 2 as published: centred at 0, every direction
        warn_if_saturated(posterior)
        return posterior.with_prior_precision(evidence_prior(posterior.with_prior_mean(None), granularity))
    if prior == "validation":
        if val_loader is None:
            raise ValueError("prior='validation' needs a val_loader")
        return posterior.with_prior_precision(validation_prior(posterior, val_loader))
    raise ValueError(f"prior must be one of {PRIOR_NAMES} or a positive number, got {prior!r}")

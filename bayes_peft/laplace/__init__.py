"""Laplace-LoRA: a post-hoc Gaussian posterior over LoRA weights from low-rank KFAC curvature.

    posterior = bp.PosteriorLoRA.fit_laplace(model, train_loader, n_kfac=10, prior="evidence")
"""

from __future__ import annotations

from typing import Iterable, Literal, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..config import LaplaceConfig
from .kfac import Factors, FisherType, KFACType, accumulate_diagonal, accumulate_factors
from .posterior import KFACPosterior
from .prior import (SATURATION_THRESHOLD, EvidenceFallbackWarning, Granularity, Prior, SaturatedFitWarning,
                    evidence_prior, log_evidence, resolve_prior, validation_prior, with_prior)

Structure = Literal["kfac", "diag"]

__all__ = ["fit_laplace", "Structure", "KFACPosterior", "Factors", "accumulate_factors", "log_evidence", "evidence_prior",
           "validation_prior", "with_prior", "resolve_prior", "SaturatedFitWarning", "EvidenceFallbackWarning",
           "SATURATION_THRESHOLD"]

_DEFAULTS = LaplaceConfig()


def fit_laplace(model: nn.Module, train_loader: Iterable[Mapping[str, Tensor]], n_kfac: int = _DEFAULTS.n_kfac,
                prior: Prior = _DEFAULTS.prior, val_loader: Optional[Iterable[Mapping[str, Tensor]]] = None,
                fisher: FisherType = _DEFAULTS.fisher, granularity: Granularity = _DEFAULTS.granularity,
                generator: Optional[torch.Generator] = None, progress: bool = True,
                kfac: KFACType = _DEFAULTS.kfac, structure: Structure = _DEFAULTS.structure,
                modules: Optional[Sequence[str]] = None,
                prior_mean: Optional[Mapping[str, Tensor]] = None) -> KFACPosterior:
    """Fit Laplace-LoRA around the model's current (trained) LoRA weights.

    Args:
        model: a trained peft model; its LoRA weights are the posterior mean θ*.
        train_loader: batches of a :class:`~bayes_peft.Task` over the training data; one pass, in eval mode
            (no dropout), taking activations and gradients at every position of the prompts.
        n_kfac: the rank kept of each layer's large Kronecker factor.
        prior: ``"auto"`` (the default: ``"validation"`` when ``val_loader`` is given, else ``"evidence"``;
            see :mod:`bayes_peft.laplace.prior` for why), ``"evidence"`` (maximise the Laplace evidence,
            Algorithm 2, centred at ``prior_mean`` and read on the kept eigenbasis span; warns when the model
            is certain of ``train_loader``'s examples, where it collapses), ``"evidence_published"`` (Algorithm
            2 as published, centred at 0 over every direction), ``"validation"`` (maximise the linearized
            predictive's log-likelihood on ``val_loader``, Algorithm 3) or a fixed λ.
        fisher: ``"exact"`` (every class, weighted by its probability) or ``"mc"`` (one sampled label).
        granularity: with ``prior="evidence"``, one λ for the whole ``"model"``, one per ``"kind"`` of layer
            (all ``lora_A``, all ``lora_B``) or one per ``"layer"``.
        generator: the randomness of ``fisher="mc"``.
        kfac: how the positions of a prompt enter the Kronecker factors, ``"reduce"``, ``"expand"`` or
            ``"tokens"`` (Laplace-LoRA's own; see :mod:`bayes_peft.laplace.kfac`).
        structure: ``"kfac"`` (low-rank Kronecker factors per layer) or ``"diag"`` (LA diag: the exact
            diagonal of the same Fisher, every position included; ``n_kfac`` and ``kfac`` do not apply).
        modules: the posterior over the LoRA of these target modules only, the other LoRA weights fixed at
            their trained values: ``("lm_head",)`` is Laplace-LoRA's last-layer Laplace (LLLA), on a model
            whose LoRA targets the output layer (``load_model(lora={"lm_head": True})``). Default: all.
        prior_mean: θ₀, the centre of the prior N(θ₀, λ⁻¹ I), name → tensor for the weights the posterior
            covers: the adapter's initialisation (the run layer's checkpoints keep it). The evidence reads
            ‖θ* − θ₀‖²; without θ₀ it falls back to θ₀ = 0 on the kept span, with a warning.
    """
    if structure == "diag":
        diagonals, seen = accumulate_diagonal(model, train_loader, fisher, generator, progress, modules)
        unit = KFACPosterior.from_diagonal(model, diagonals, seen, dict.fromkeys(diagonals, 1.0),
                                           _covered(prior_mean, diagonals))
    elif structure == "kfac":
        factors = accumulate_factors(model, train_loader, n_kfac, fisher, generator, progress, kfac, modules)
        unit = KFACPosterior.from_factors(model, factors, dict.fromkeys(factors.layers, 1.0),
                                          _covered(prior_mean, factors.layers))
    else:
        raise ValueError(f"structure must be 'kfac' or 'diag', got {structure!r}")
    return with_prior(unit, prior, val_loader, granularity)


def _covered(prior_mean: Optional[Mapping[str, Tensor]], names) -> Optional[dict[str, Tensor]]:
    """The entries of ``prior_mean`` (which may name every trainable weight) for the weights the fit covers."""
    if prior_mean is None:
        return None
    missing = [n for n in names if n not in prior_mean]
    if missing:
        raise ValueError(f"prior_mean has no entry for {len(missing)} fitted weights (the first: {missing[0]})")
    return {n: prior_mean[n] for n in names}

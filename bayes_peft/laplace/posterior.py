"""The Laplace-LoRA posterior: N(θ*, (F + λ I)⁻¹) per layer, with F = G ⊗ A from low-rank KFAC.

Each layer's Fisher is diagonalised from its two factors alone. With the small factor S = Q_s diag(s) Q_sᵀ
and the large one L Lᵀ = Q_L diag(ℓ) Q_Lᵀ (a thin SVD of L), F = Q diag(e) Qᵀ with Q = Q_out ⊗ Q_in
(orthonormal columns, r·n_kfac of them) and e the products of the factors' eigenvalues. Then

    Σ = (F + λ I)⁻¹ = λ⁻¹ I + Q diag(1/(λ + e) − 1/λ) Qᵀ,

which is the Woodbury identity in this basis, needs no inverse of anything but a diagonal, and gives
log det(F + λ I) = Σ_i log(λ + e_i) + (P − r·n_kfac) log λ directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from .. import sharding
from ..posteriors.gaussian import GaussianLoRA, device_generator
from .kfac import Factors, FittingData, LayerFactors

__all__ = ["KFACPosterior", "LayerEigenbasis"]


def _eigh_psd(matrix: Tensor) -> tuple[Tensor, Tensor]:
    values, vectors = torch.linalg.eigh(matrix)
    return values.clamp_min(0), vectors


@dataclass
class LayerEigenbasis:
    """F_l = (Q_out ⊗ Q_in) diag(vec(e)) (Q_out ⊗ Q_in)ᵀ with ``e`` ``[k_out, k_in]`` (outer product)."""

    q_out: Tensor  # [d_out, k_out], orthonormal columns
    q_in: Tensor  # [d_in, k_in]
    eigenvalues: Tensor  # [k_out, k_in]

    def __post_init__(self):
        # LA (diag) holds I ⊗ I: projecting onto it is a copy by two d × d matmuls, a fifth of a linearized pass.
        self.identity = all(q.shape[0] == q.shape[1] and torch.equal(q, torch.eye(q.shape[0], dtype=q.dtype,
                                                                                  device=q.device))
                            for q in (self.q_out, self.q_in))

    @classmethod
    def from_factors(cls, factors: LayerFactors) -> "LayerEigenbasis":
        small_values, small_vectors = _eigh_psd(factors.small)
        U, S, _ = torch.linalg.svd(factors.root, full_matrices=False)
        large_values, large_vectors = S.square(), U
        if factors.large_is_input:
            q_out, out_values, q_in, in_values = small_vectors, small_values, large_vectors, large_values
        else:
            q_out, out_values, q_in, in_values = large_vectors, large_values, small_vectors, small_values
        return cls(q_out, q_in, torch.outer(out_values, in_values))

    @property
    def n_params(self) -> int:
        return self.q_out.shape[0] * self.q_in.shape[0]

    def project(self, matrix: Tensor) -> Tensor:
        """``[..., k_out, k_in]``: the coordinates Q_outᵀ M Q_in of ``[..., d_out, d_in]`` matrices."""
        return matrix if self.identity else self.q_out.T @ matrix @ self.q_in

    def expand(self, coordinates: Tensor) -> Tensor:
        """``[..., d_out, d_in]``: Q_out C Q_inᵀ, the inverse of :meth:`project` on the span."""
        return coordinates if self.identity else self.q_out @ coordinates @ self.q_in.T

    def log_det(self, prior_precision: float) -> Tensor:
        """log det(F + λ I) over the layer's P parameters."""
        k = self.eigenvalues.numel()
        return torch.log(prior_precision + self.eigenvalues).sum() + (self.n_params - k) * torch.log(
            torch.as_tensor(prior_precision, dtype=self.eigenvalues.dtype))


class KFACPosterior(GaussianLoRA):
    """Laplace-LoRA: θ ~ N(θ*, (G ⊗ A + λ_l I)⁻¹) for each LoRA layer l, independent across layers.

    The prior is N(θ₀, λ⁻¹ I), centred at ``prior_mean`` θ₀ (name → tensor; the adapter's initialisation, where
    training started), or at 0 where none is given (``prior_mean is None``). Build it with
    :func:`bayes_peft.laplace.fit_laplace` (``PosteriorLoRA.fit_laplace``).
    """

    kind = "kfac"

    def __init__(self, model: nn.Module, mean: Mapping[str, Tensor], bases: Mapping[str, LayerEigenbasis],
                 prior_precision: Mapping[str, float], n_examples: int, log_likelihood: float,
                 p_one_minus_p: Optional[float] = None, prior_mean: Optional[Mapping[str, Tensor]] = None):
        super().__init__(model, mean)
        if set(bases) != set(self._mean):
            raise ValueError("the Kronecker factors and the mean must name the same LoRA weights")
        self.bases = dict(bases)
        self.prior_precision = {n: float(prior_precision[n]) for n in self._mean}
        if any(not (0 < lam < float("inf")) for lam in self.prior_precision.values()):
            raise ValueError(f"prior precisions must be positive and finite, got {self.prior_precision}")
        self.n_examples = n_examples
        self.log_likelihood = log_likelihood
        # How saturated the model is on the fitting data (kfac.FittingData); None for fits saved before it.
        self.p_one_minus_p = p_one_minus_p
        self.prior_mean = None if prior_mean is None else _prior_mean(prior_mean, self._mean)

    @classmethod
    def from_factors(cls, model: nn.Module, factors: Factors, prior_precision: Mapping[str, float],
                     prior_mean: Optional[Mapping[str, Tensor]] = None) -> "KFACPosterior":
        mean = {n: sharding.full(p).detach() for n, p in model.named_parameters() if n in factors.layers}
        bases = {n: LayerEigenbasis.from_factors(f) for n, f in factors.layers.items()}
        return cls(model, mean, bases, prior_precision, factors.n_examples, factors.log_likelihood,
                   factors.p_one_minus_p, prior_mean)

    @classmethod
    def from_diagonal(cls, model: nn.Module, diagonals: Mapping[str, Tensor], seen: FittingData,
                      prior_precision: Mapping[str, float],
                      prior_mean: Optional[Mapping[str, Tensor]] = None) -> "KFACPosterior":
        """LA (diag): each layer's Fisher is the diagonal ``[d_out, d_in]``, which this class holds as the
        eigenbasis I ⊗ I with those eigenvalues, so that every prior and predictive applies unchanged. The
        identity bases cost d_out² + d_in² numbers a layer: fine for LoRA on a CPU model, wasteful at 7B."""
        mean = {n: sharding.full(p).detach() for n, p in model.named_parameters() if n in diagonals}
        bases = {n: LayerEigenbasis(torch.eye(d.shape[0], dtype=d.dtype, device=d.device),
                                    torch.eye(d.shape[1], dtype=d.dtype, device=d.device), d)
                 for n, d in diagonals.items()}
        return cls(model, mean, bases, prior_precision, seen.n_examples, seen.log_likelihood, seen.p_one_minus_p,
                   prior_mean)

    def with_prior_precision(self, prior_precision: Mapping[str, float]) -> "KFACPosterior":
        """The same fit under other prior precisions (cheap: the eigenbases are shared)."""
        return KFACPosterior(self.model, self._mean, self.bases, prior_precision, self.n_examples, self.log_likelihood,
                             self.p_one_minus_p, self.prior_mean)

    def with_prior_mean(self, prior_mean: Optional[Mapping[str, Tensor]]) -> "KFACPosterior":
        """The same fit with the prior centred at ``prior_mean`` (``None``: at 0)."""
        return KFACPosterior(self.model, self._mean, self.bases, self.prior_precision, self.n_examples,
                             self.log_likelihood, self.p_one_minus_p, prior_mean)

    def offset_from_prior(self, name: str) -> Tensor:
        """θ*_l − θ₀_l (θ*_l where the prior is centred at 0), in float64."""
        mean = self._mean[name].double()
        return mean if self.prior_mean is None else mean - self.prior_mean[name].double()

    # -- the covariance ---------------------------------------------------------------------------------

    def _shrinkage(self, name: str, prior_precision: Optional[float] = None) -> tuple[float, Tensor]:
        """(1/λ, 1/(λ + e) − 1/λ): Σ = λ⁻¹ I + Q diag(shrinkage) Qᵀ."""
        lam = self.prior_precision[name] if prior_precision is None else prior_precision
        return 1.0 / lam, 1.0 / (lam + self.bases[name].eigenvalues) - 1.0 / lam

    def layer_terms(self, name: str, per_example: Tensor) -> tuple[Tensor, Tensor]:
        """The λ-free parts of J_l Σ_l J_lᵀ: the Gram ``[B, C, C]`` of the per-example gradients
        ``[C, B, d_out, d_in]`` and their eigenbasis coordinates ``[C, B, k_out, k_in]``."""
        grads = per_example.double()
        return torch.einsum("cboi,dboi->bcd", grads, grads), self.bases[name].project(grads)

    def combine(self, name: str, gram: Tensor, coords: Tensor, prior_precision: Optional[float] = None) -> Tensor:
        """J_l Σ_l J_lᵀ ``[B, C, C]`` from :meth:`layer_terms`, under this or another prior precision."""
        inv_lam, shrink = self._shrinkage(name, prior_precision)
        return inv_lam * gram + torch.einsum("cboi,oi,dboi->bcd", coords, shrink, coords)

    def _layer_covariance(self, name: str, per_example: Tensor) -> Tensor:
        return self.combine(name, *self.layer_terms(name, per_example)).to(per_example.dtype)

    def _sample_offsets(self, generator: Optional[torch.Generator]) -> dict[str, Tensor]:
        # Σ^{1/2} ε = λ^{-1/2} ε + Q diag((λ + e)^{-1/2} − λ^{-1/2}) Qᵀ ε
        out = {}
        device = next(iter(self._mean.values())).device
        g = device_generator(generator, device)
        for name, mean in self._mean.items():
            basis, lam = self.bases[name], self.prior_precision[name]
            eps = torch.randn(mean.shape, generator=g, dtype=torch.float64, device=device)
            root_shrink = (lam + basis.eigenvalues).rsqrt() - lam ** -0.5
            offset = lam ** -0.5 * eps + basis.expand(root_shrink * basis.project(eps))
            out[name] = offset.to(mean.dtype)
        return out

    def covariance(self, name: str) -> Tensor:
        """The dense ``[P_l, P_l]`` covariance of one layer (row-major vec(W)); for tests and tiny layers."""
        basis = self.bases[name]
        inv_lam, shrink = self._shrinkage(name)
        q = torch.kron(basis.q_out, basis.q_in)
        return inv_lam * torch.eye(basis.n_params, dtype=q.dtype, device=q.device) + q @ torch.diag(shrink.flatten()) @ q.T

    # -- persistence ------------------------------------------------------------------------------------

    def _tensor_stores(self):
        return [self._mean] + ([self.prior_mean] if self.prior_mean is not None else [])  # the bases move in ``to``

    def to(self, device):
        super().to(device)
        for basis in self.bases.values():
            basis.q_out, basis.q_in, basis.eigenvalues = (t.to(device) for t in (basis.q_out, basis.q_in,
                                                                                  basis.eigenvalues))
        return self

    def _state_tensors(self):
        tensors = {f"mean.{n}": m for n, m in self._mean.items()}
        tensors.update({f"prior_mean.{n}": m for n, m in (self.prior_mean or {}).items()})
        for n, b in self.bases.items():
            tensors.update({f"q_out.{n}": b.q_out, f"q_in.{n}": b.q_in, f"eigenvalues.{n}": b.eigenvalues})
        return tensors

    def _config(self):
        return {"prior_precision": self.prior_precision, "n_examples": self.n_examples,
                "log_likelihood": self.log_likelihood, "p_one_minus_p": self.p_one_minus_p,
                "prior_centre": "zero" if self.prior_mean is None else "prior_mean"}

    @classmethod
    def _required_tensors(cls, config):
        parts = ("mean", "q_out", "q_in", "eigenvalues", *(("prior_mean",) if config.get("prior_centre") == "prior_mean"
                                                           else ()))
        return [f"{part}.{n}" for n in config["names"] for part in parts]

    @classmethod
    def _from_saved(cls, model, tensors, config):
        names = config["names"]
        bases = {n: LayerEigenbasis(tensors[f"q_out.{n}"], tensors[f"q_in.{n}"], tensors[f"eigenvalues.{n}"])
                 for n in names}
        prior_mean = {n: tensors[f"prior_mean.{n}"] for n in names} if config.get("prior_centre") == "prior_mean" else None
        return cls(model, {n: tensors[f"mean.{n}"] for n in names}, bases, config["prior_precision"],
                   config["n_examples"], config["log_likelihood"], config.get("p_one_minus_p"), prior_mean)


def _prior_mean(prior_mean: Mapping[str, Tensor], mean: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``prior_mean`` checked against the posterior's ``mean`` (the same names and shapes), as float32 copies
    on the mean's device."""
    if set(prior_mean) != set(mean):
        missing, extra = sorted(set(mean) - set(prior_mean)), sorted(set(prior_mean) - set(mean))
        raise ValueError(f"the prior mean must name the posterior's weights: missing {missing[:2]}, extra {extra[:2]}")
    for name, value in prior_mean.items():
        if value.shape != mean[name].shape:
            raise ValueError(f"{name}: prior mean of shape {tuple(value.shape)}, weights of {tuple(mean[name].shape)}")
    return {n: prior_mean[n].detach().to(mean[n].device, torch.float32).clone() for n in mean}

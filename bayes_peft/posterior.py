"""PosteriorLoRA: one interface to a Gaussian posterior over a model's LoRA weights, whatever fitted it.

Every posterior answers the same questions: ``mean()`` and ``sample(tau, generator)`` put weights into
the model for the length of a ``with`` block and always put the previous ones back; ``logit_moments``
gives the linearized predictive of the choice logits; ``save``/``load`` keep it beside the PEFT adapter
as safetensors plus JSON (never pickle).

Backends: :class:`DiagonalPosterior` (IVON's N(m, diag(v))), and the Laplace-LoRA KFAC posterior in
:mod:`bayes_peft.laplace`.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .linearize import choice_logit_grads, linearizable_layers

__all__ = ["PosteriorLoRA", "DiagonalPosterior", "MCDropout", "PosteriorFileError"]

FORMAT_VERSION = 1
TENSORS_FILE = "posterior.safetensors"
CONFIG_FILE = "posterior.json"


class PosteriorFileError(ValueError):
    """A posterior file that is missing, corrupt, truncated or does not fit the model."""


def _trainable_by_name(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def swapped_weights(params: Mapping[str, nn.Parameter], values: Mapping[str, Tensor]) -> Iterator[None]:
    """Copy ``values`` into ``params`` for the block, then restore the previous weights exactly."""
    saved = {name: params[name].detach().clone() for name in values}
    try:
        with torch.no_grad():
            for name, value in values.items():
                params[name].copy_(value)
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


class PosteriorLoRA(abc.ABC):
    """A Gaussian posterior over the LoRA weights of ``model``, centred at ``mean`` (name → tensor)."""

    kind: ClassVar[str]
    _backends: ClassVar[dict[str, type["PosteriorLoRA"]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            PosteriorLoRA._backends[cls.kind] = cls

    def __init__(self, model: nn.Module, mean: Mapping[str, Tensor]):
        params = _trainable_by_name(model)
        missing = [n for n in mean if n not in params]
        if missing:
            raise ValueError(f"the model has no trainable parameters named {missing[:3]}")
        self.model = model
        self._mean = {n: m.detach().to(params[n].device, torch.float32).clone() for n, m in mean.items()}

    # -- constructors ----------------------------------------------------------------------------------

    @classmethod
    def from_ivon(cls, model: nn.Module, optimizer) -> "DiagonalPosterior":
        """IVON's N(m, diag(v)) with v = 1 / (ess·(h + δ)), for the parameters of ``model`` it trains."""
        names = {id(p): n for n, p in model.named_parameters()}
        mean, variance = {}, {}
        for p, m, v in zip(optimizer.trainable_parameters(), optimizer.posterior_mean(),
                           optimizer.posterior_variance()):
            if id(p) not in names:
                raise ValueError("the optimizer trains a parameter that is not part of the model")
            mean[names[id(p)]], variance[names[id(p)]] = m, v
        return DiagonalPosterior(model, mean, variance)

    @classmethod
    def fit_laplace(cls, model: nn.Module, train_loader, **kwargs) -> "PosteriorLoRA":
        """Post-hoc Laplace-LoRA; see :func:`bayes_peft.laplace.fit_laplace` for the arguments."""
        from .laplace import fit_laplace

        return fit_laplace(model, train_loader, **kwargs)

    @classmethod
    def load(cls, directory: Union[str, os.PathLike], model: nn.Module) -> "PosteriorLoRA":
        """Load a posterior written by :meth:`save` for ``model`` (which must have the same LoRA shapes)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path, tensors_path = directory / CONFIG_FILE, directory / TENSORS_FILE
        try:
            config = json.loads(config_path.read_text())
        except FileNotFoundError:
            raise PosteriorFileError(f"{config_path} does not exist; is {directory} a saved posterior?") from None
        except json.JSONDecodeError as error:
            raise PosteriorFileError(f"{config_path} is not valid JSON ({error})") from None
        kind = config.get("kind")
        if kind not in cls._backends:
            raise PosteriorFileError(f"{config_path}: unknown posterior kind {kind!r}")
        if config.get("format_version") != FORMAT_VERSION:
            raise PosteriorFileError(f"{config_path}: format version {config.get('format_version')}, "
                                     f"this bayes_peft reads {FORMAT_VERSION}")
        try:
            tensors = load_file(str(tensors_path))
        except FileNotFoundError:
            raise PosteriorFileError(f"{tensors_path} does not exist") from None
        except Exception as error:  # safetensors reports a truncated or corrupt file with its own errors
            raise PosteriorFileError(f"{tensors_path} is corrupt or truncated ({error})") from None
        backend = cls._backends[kind]
        backend._check_shapes(model, tensors, config, tensors_path)
        return backend._from_saved(model, tensors, config)

    # -- weights in the model --------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self._mean)

    def num_parameters(self) -> int:
        return sum(m.numel() for m in self._mean.values())

    def to(self, device: Union[str, torch.device]) -> "PosteriorLoRA":
        """Move the posterior's tensors (in place) to ``device``; returns ``self``."""
        for store in self._tensor_stores():
            for key, value in store.items():
                store[key] = value.to(device)
        return self

    def mean(self) -> contextlib.AbstractContextManager:
        """A context in which the model holds the posterior mean (IVON@mean, or the MAP of Laplace)."""
        return swapped_weights(_trainable_by_name(self.model), self._mean)

    def sample(self, tau: float = 1.0, generator: Optional[torch.Generator] = None) -> contextlib.AbstractContextManager:
        """A context in which the model holds one draw from the τ-scaled posterior N(m, τ·Σ).

        ``generator`` makes the draw reproducible: it seeds a generator on the weights' device (so a draw
        on a GPU differs from one on the CPU); by default that device's global RNG.
        """
        if tau < 0:
            raise ValueError(f"tau must be ≥ 0, got {tau}")
        offsets = self._sample_offsets(generator)
        scale = float(tau) ** 0.5
        draw = {n: self._mean[n] + scale * offsets[n] for n in self._mean}
        return swapped_weights(_trainable_by_name(self.model), draw)

    def logit_moments(self, batch: Mapping[str, Tensor], tau: float = 1.0) -> tuple[Tensor, Tensor]:
        """The linearized predictive of the choice logits at the mean: mean ``[B, C]``, covariance ``[B, C, C]``.

        The covariance is τ·P J Σ Jᵀ P, with J the Jacobian of the C choice logits with respect to every
        weight the posterior covers and P = I − 11ᵀ/C: the covariance of the centred logits, all the softmax
        sees (a shift shared by every logit changes no probability). It costs one forward and C − 1 backward
        passes, and is computed layer by layer from per-example gradients (see :mod:`bayes_peft.linearize`).
        A posterior over parameters that are not Linear weights (an embedding LoRA, say) is refused with a
        ``ValueError`` that names them.
        """
        if tau < 0:
            raise ValueError(f"tau must be ≥ 0, got {tau}")
        layers = linearizable_layers(self.model, self._mean)
        was_training = self.model.training
        self.model.eval()
        try:
            with self.mean():
                logits, grads = choice_logit_grads(self.model, batch, layers)
        finally:
            self.model.train(was_training)
        cov = logits.new_zeros(logits.shape[0], logits.shape[1], logits.shape[1])
        for name, layer_grads in grads.items():
            cov += self._layer_covariance(name, layer_grads.per_example())
        return logits, tau * cov

    # -- persistence -----------------------------------------------------------------------------------

    def save(self, directory: Union[str, os.PathLike], adapter: bool = True) -> Path:
        """Write ``posterior.safetensors`` and ``posterior.json`` into ``directory``, and with ``adapter``
        the PEFT adapter at the posterior mean (``save_pretrained``). Each file is written to a temporary
        name and renamed, so a crash never leaves a partial file in place of a good one."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self._state_tensors().items()}
        config = {"kind": self.kind, "format_version": FORMAT_VERSION, "names": self.names,
                  "shapes": {n: list(m.shape) for n, m in self._mean.items()}, **self._config()}
        _atomic_write(directory / TENSORS_FILE, lambda path: save_file(tensors, str(path)))
        _atomic_write(directory / CONFIG_FILE, lambda path: Path(path).write_text(json.dumps(config, indent=2)))
        if adapter and hasattr(self.model, "save_pretrained"):
            with self.mean():
                self.model.save_pretrained(str(directory))
        return directory

    @classmethod
    def _check_shapes(cls, model: nn.Module, tensors: Mapping[str, Tensor], config: Mapping[str, Any],
                      path: Path) -> None:
        params = _trainable_by_name(model)
        for name, shape in config["shapes"].items():
            if name not in params:
                raise PosteriorFileError(f"{path}: the model has no trainable parameter {name!r}")
            if list(params[name].shape) != list(shape):
                raise PosteriorFileError(f"{path}: {name} has shape {tuple(shape)} in the file but "
                                         f"{tuple(params[name].shape)} in the model (different LoRA rank or model?)")
        missing = [n for n in cls._required_tensors(config) if n not in tensors]
        if missing:
            raise PosteriorFileError(f"{path}: missing tensors {missing[:3]}")

    # -- what a backend supplies -----------------------------------------------------------------------

    @abc.abstractmethod
    def _sample_offsets(self, generator: Optional[torch.Generator]) -> dict[str, Tensor]:
        """One draw of θ − m from N(0, Σ) (τ = 1), by parameter name."""

    @abc.abstractmethod
    def _layer_covariance(self, name: str, per_example: Tensor) -> Tensor:
        """``[B, C, C]``: J_l Σ_l J_lᵀ of one layer from its per-example gradients ``[C, B, d_out, d_in]``."""

    @abc.abstractmethod
    def _tensor_stores(self) -> list[dict[str, Tensor]]:
        """The dicts of tensors that ``to`` moves."""

    @abc.abstractmethod
    def _state_tensors(self) -> dict[str, Tensor]:
        """Everything to save, flat, by key."""

    def _config(self) -> dict[str, Any]:
        return {}

    @classmethod
    @abc.abstractmethod
    def _required_tensors(cls, config: Mapping[str, Any]) -> list[str]:
        """The keys that a saved file must hold."""

    @classmethod
    @abc.abstractmethod
    def _from_saved(cls, model: nn.Module, tensors: Mapping[str, Tensor], config: Mapping[str, Any]) -> "PosteriorLoRA":
        """Rebuild from what :meth:`_state_tensors` and :meth:`_config` wrote."""


def device_generator(generator: Optional[torch.Generator], device: torch.device) -> Optional[torch.Generator]:
    """A generator on ``device`` seeded from ``generator``, so that noise is drawn where it is used.

    Drawing on the CPU and copying would synchronise the host with a GPU for every tensor. ``None`` stays
    ``None`` (the device's global RNG).
    """
    if generator is None:
        return None
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator(device=device).manual_seed(seed)


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class DiagonalPosterior(PosteriorLoRA):
    """N(m, diag(v)) over the LoRA weights: IVON's posterior (``PosteriorLoRA.from_ivon``)."""

    kind = "diagonal"

    def __init__(self, model: nn.Module, mean: Mapping[str, Tensor], variance: Mapping[str, Tensor]):
        super().__init__(model, mean)
        if set(variance) != set(mean):
            raise ValueError("mean and variance must name the same parameters")
        for name, v in variance.items():
            if v.shape != self._mean[name].shape:
                raise ValueError(f"{name}: variance shape {tuple(v.shape)} != mean shape {tuple(self._mean[name].shape)}")
            if not torch.isfinite(v).all() or (v < 0).any():
                raise ValueError(f"{name}: the variance must be finite and non-negative")
        self.variance = {n: variance[n].detach().to(self._mean[n].device, torch.float32).clone() for n in self._mean}

    def _sample_offsets(self, generator):
        device = next(iter(self._mean.values())).device
        g = device_generator(generator, device)
        return {n: torch.randn(m.shape, generator=g, dtype=m.dtype, device=device) * self.variance[n].sqrt()
                for n, m in self._mean.items()}

    def _layer_covariance(self, name, per_example):
        weighted = per_example * self.variance[name]
        return torch.einsum("cboi,dboi->bcd", weighted, per_example)

    def _tensor_stores(self):
        return [self._mean, self.variance]

    def _state_tensors(self):
        return {**{f"mean.{n}": m for n, m in self._mean.items()},
                **{f"variance.{n}": v for n, v in self.variance.items()}}

    @classmethod
    def _required_tensors(cls, config):
        return [f"{part}.{n}" for n in config["names"] for part in ("mean", "variance")]

    @classmethod
    def _from_saved(cls, model, tensors, config):
        names = config["names"]
        return cls(model, {n: tensors[f"mean.{n}"] for n in names}, {n: tensors[f"variance.{n}"] for n in names})


class MCDropout:
    """MC-dropout, the seeds' cheap baseline, behind the posterior interface the evaluator uses.

    ``sample`` switches the model's dropout layers (LoRA dropout included) on for the block, with their
    randomness seeded from ``generator``; ``mean`` is the deterministic model. ``tau`` is not used.
    """

    kind = "mc_dropout"

    def __init__(self, model: nn.Module):
        self.model = model
        self._dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]
        if not self._dropouts:
            raise ValueError("the model has no dropout layers with p > 0; MC-dropout would be deterministic")

    def to(self, device) -> "MCDropout":
        return self

    def mean(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def sample(self, tau: float = 1.0, generator: Optional[torch.Generator] = None) -> Iterator[None]:
        seed = int(torch.randint(2**62, (1,), generator=generator))
        device = next(self.model.parameters()).device
        states = [m.training for m in self._dropouts]
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            try:
                for m in self._dropouts:
                    m.train()
                yield
            finally:
                for m, state in zip(self._dropouts, states):
                    m.train(state)

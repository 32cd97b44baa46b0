"""The Gaussian posterior over a model's LoRA weights that every backend extends.

:class:`GaussianLoRA` holds what every backend shares: ``mean()`` and ``sample(tau, generator)`` put weights
into the model for the length of a ``with`` block and always put the previous ones back; ``logit_moments``
gives the linearized predictive of the choice logits; ``save``/``load`` keep it beside the PEFT adapter as
safetensors plus JSON (never pickle). A backend supplies its covariance (how to sample, J Σ Jᵀ per layer)
and what to save. The backends are IVON's :class:`~bayes_peft.posteriors.posterior_lora.DiagonalPosterior` and
:class:`~bayes_peft.laplace.KFACPosterior`; users meet them through :class:`~bayes_peft.PosteriorLoRA`.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .. import sharding
from .linearize import choice_logit_grads, linearizable_layers

__all__ = ["GaussianLoRA", "PosteriorFileError", "swapped_weights", "device_generator"]

FORMAT_VERSION = 1
TENSORS_FILE = "posterior.safetensors"
CONFIG_FILE = "posterior.json"


class PosteriorFileError(ValueError):
    """A posterior file that is missing, corrupt, truncated or does not fit the model."""


def _trainable_by_name(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def swapped_weights(params: Mapping[str, nn.Parameter], values: Mapping[str, Tensor]) -> Iterator[None]:
    """Copy ``values`` (whole tensors) into ``params`` for the block, then restore the previous weights exactly.
    A parameter sharded by FSDP2 takes its rank's slice of the value, in place."""
    slices = {name: sharding.local(params[name]) for name in values}
    saved = {name: weights.clone() for name, weights in slices.items()}
    try:
        with torch.no_grad():
            for name, value in values.items():
                slices[name].copy_(sharding.local_slice(params[name], value.to(slices[name].device)))
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                slices[name].copy_(value)


class GaussianLoRA(abc.ABC):
    """A Gaussian posterior over the LoRA weights of ``model``, centred at ``mean`` (name → tensor)."""

    kind: ClassVar[str]
    _backends: ClassVar[dict[str, type["GaussianLoRA"]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            GaussianLoRA._backends[cls.kind] = cls

    def __init__(self, model: nn.Module, mean: Mapping[str, Tensor]):
        params = _trainable_by_name(model)
        missing = [n for n in mean if n not in params]
        if missing:
            raise ValueError(f"the model has no trainable parameters named {missing[:3]}")
        self.model = model
        self._mean = {n: m.detach().to(params[n].device, torch.float32).clone() for n, m in mean.items()}

    # -- loading ----------------------------------------------------------------------------------------

    @classmethod
    def load(cls, directory: Union[str, os.PathLike], model: nn.Module) -> "GaussianLoRA":
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

    def mean_weights(self) -> dict[str, Tensor]:
        """The posterior mean, name → tensor: the posterior's own tensors, detached, not copies (do not write
        into them; to change the mean, build a new posterior)."""
        return {name: m.detach() for name, m in self._mean.items()}

    def to(self, device: Union[str, torch.device]) -> "GaussianLoRA":
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
        passes, and is computed layer by layer from per-example gradients (see :mod:`bayes_peft.posteriors.linearize`).
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
        # One layer's per-example gradients at a time: all of them at once would hold B·C copies of the LoRA.
        return logits, tau * self._logit_covariance((name, g.per_example()) for name, g in grads.items())

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
            self.model.save_pretrained(str(directory), state_dict=self._adapter_at_mean())
        return directory

    def _adapter_at_mean(self) -> dict[str, Tensor]:
        """The trainable weights with the posterior mean in place of those it covers, whole: from the posterior
        itself where the model's are sharded, so that one rank can write the adapter without the others."""
        weights = {n: p.detach() for n, p in _trainable_by_name(self.model).items()}
        sharded = [n for n, p in weights.items() if sharding.is_sharded(p) and n not in self._mean]
        if sharded:
            raise ValueError(f"the posterior does not cover {len(sharded)} sharded trainable weights (the first: "
                             f"{sharded[0]}); save the adapter with FSDP's own state dict instead (adapter=False)")
        return {**weights, **self._mean}

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

    def _logit_covariance(self, per_example: Iterable[tuple[str, Tensor]]) -> Tensor:
        """``[B, C, C]``: J Σ Jᵀ from each layer's per-example gradients ``[C, B, d_out, d_in]``, layer by
        layer. The layers are independent here (Σ is block-diagonal); a backend whose Σ couples them
        overrides this."""
        return sum(self._layer_covariance(name, g) for name, g in per_example)

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
    def _from_saved(cls, model: nn.Module, tensors: Mapping[str, Tensor], config: Mapping[str, Any]) -> "GaussianLoRA":
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

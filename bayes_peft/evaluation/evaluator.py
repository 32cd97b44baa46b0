"""The shared evaluator: predictions at the mean, sample-averaged or linearized, scored on GPU or CPU.

Work stays on the device: probabilities accumulate there and the host synchronises once per evaluation,
when the metrics are read. Batches are tokenised once and reused by every posterior sample.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterable, Literal, Optional, Sequence, Union

import torch
from torch import Tensor

from .. import distributed, sharding
from ..config import EvalConfig
from ..data.generative import end_token_id, pad_token_id
from ..data.tasks import choice_logits
from ..models import keep_4bit_gradients
from ..posteriors.ensemble import Ensemble
from ..posteriors.gaussian import GaussianLoRA
from ..posteriors.link import LINKS, Link, link_probs, mc_logit_samples
from .generation import GeneratedAnswers, generate_answers
from .prediction import Prediction
from .tau import TauSweep, tau_tradeoff_plot, widened_until_bracketed

# Prediction, TauSweep and tau_tradeoff_plot live in .prediction and .tau; they still import from here.
__all__ = ["Evaluator", "Prediction", "TauSweep", "tau_tradeoff_plot"]

Method = Literal["mean", "sample", "linearized"]
METHODS = ("mean", "sample", "linearized")
N_SAMPLES = EvalConfig.n_samples


class Evaluator:
    """Scores a model, optionally with a :class:`~bayes_peft.PosteriorLoRA`, on a task's batches.

    Args:
        model: the (PEFT) causal LM.
        posterior: the posterior over its LoRA weights; ``None`` scores the weights as they are (MAP).
        task: unused by the computation (batches carry their choice ids); kept for the caller's records.
        device: where to evaluate; the model and posterior move there. Default: where the model is (it is
            never moved unasked, so that an optimizer built over its weights keeps training them).
        autocast: e.g. ``torch.bfloat16`` to run forward passes under autocast on that device.
        progress: show a progress bar.
        tokenizer: the model's tokenizer, which :meth:`generate` decodes answers with.
    """

    def __init__(self, model, posterior=None, task=None, device: Union[str, torch.device, None] = None,
                 autocast: Optional[torch.dtype] = None, progress: bool = True, tokenizer=None):
        if device is None:
            self.device = next(model.parameters()).device
            self.model = model
        else:
            self.device = torch.device(device)
            self.model = model.to(self.device)
        keep_4bit_gradients(model)  # its no-grad passes must not cost the model its 4-bit gradients
        self.posterior = posterior.to(self.device) if posterior is not None else None
        self.task = task
        self.autocast = autocast
        self.progress = progress
        self.tokenizer = tokenizer

    # ------------------------------------------------------------------------------------------------

    def predict(self, loader: Iterable[dict], method: Method = "mean", n_samples: int = N_SAMPLES, tau: float = 1.0,
                link: Link = "auto", seed: int = 0, link_samples: int = 1000) -> Prediction:
        """Predictive probabilities for every example of ``loader``.

        - ``"mean"``: at the posterior mean (IVON@mean, or the MAP weights of a Laplace posterior).
        - ``"sample"``: the mean of the probabilities under ``n_samples`` weight samples from the
          τ-scaled posterior. The S samples are drawn once, from a generator seeded with ``seed``, and
          each one scores the whole loader, so every example sees the same S weight draws. An
          :class:`~bayes_peft.posteriors.ensemble.Ensemble` is averaged over its members instead, each once.
        - ``"linearized"``: the linearized (GLM) predictive with logit covariance τ·J Σ Jᵀ, turned into
          probabilities with the full C × C covariance by ``link`` (see :mod:`bayes_peft.posteriors.link`): exact
          quadrature for two choices, ``link_samples`` Monte Carlo logit draws seeded with ``seed`` for more.
          Apart from those, ``n_samples`` logit draws give ``sample_probs``, which split the uncertainty.
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if method != "mean" and self.posterior is None:
            raise ValueError(f"method {method!r} needs a posterior; this evaluator has none")
        if tau < 0:
            raise ValueError(f"tau must be ≥ 0, got {tau}")
        if link not in LINKS:
            raise ValueError(f"link must be one of {LINKS}, got {link!r}")
        batches = [self._to_device(b) for b in loader]  # tokenised once, reused by every sample
        if not batches:
            raise ValueError("the loader yielded no batches")
        labels = torch.cat([b["labels"] for b in batches])
        was_training = self.model.training
        self.model.eval()
        samples = None
        try:
            if method == "mean":
                probs = self._mean_probs(batches)
            elif method == "sample":
                samples = self._sample_probs(batches, n_samples, tau, seed)
                probs = samples.double().mean(0).float()  # exact sums: τ = 0 gives the mean
            else:
                return self.predict_from_moments(self._logit_moments(batches), labels, n_samples, tau, link, seed,
                                                 link_samples)
        finally:
            self.model.train(was_training)
        return self._gathered(probs, distributed.gather_in_order(labels), samples)

    def predict_from_moments(self, moments: Sequence[tuple[Tensor, Tensor]], labels: Tensor,
                             n_samples: int = N_SAMPLES, tau: float = 1.0, link: Link = "auto", seed: int = 0,
                             link_samples: int = 1000) -> Prediction:
        """The linearized predictive of :meth:`predict` from logit moments already computed at τ = 1 (batch by
        batch, mean ``[B, C]`` and covariance ``[B, C, C]``: :func:`bayes_peft.laplace.prior.linearized_moments`
        gives them for any prior of one Laplace fit from a single Jacobian pass) and their ``labels`` ``[N]``."""
        return self._from_moments(moments, labels, [tau], n_samples, link, seed, link_samples)[0]

    def sweep_from_moments(self, moments: Sequence[tuple[Tensor, Tensor]], labels: Tensor, taus: Sequence[float],
                           n_samples: int = N_SAMPLES, link: Link = "auto", seed: int = 0,
                           link_samples: int = 1000) -> TauSweep:
        """:meth:`sweep_tau` of the linearized predictive from moments already computed at τ = 1 (as
        :meth:`predict_from_moments` takes them)."""
        return TauSweep.of("linearized", taus, self._from_moments(moments, labels, taus, n_samples, link, seed,
                                                                  link_samples))

    def evaluate(self, loader: Iterable[dict], method: Method = "mean", n_samples: int = N_SAMPLES, tau: float = 1.0,
                 link: Link = "auto", seed: int = 0, n_bins: int = 10, return_probs: bool = False,
                 link_samples: int = 1000):
        """:class:`Metrics` of :meth:`predict`; with ``return_probs`` also the :class:`Prediction`."""
        prediction = self.predict(loader, method, n_samples, tau, link, seed, link_samples)
        metrics = prediction.metrics(n_bins)
        return (metrics, prediction) if return_probs else metrics

    def sweep_tau(self, loader: Iterable[dict], taus: Sequence[float] = EvalConfig.taus,
                  method: Method = "sample", n_samples: int = N_SAMPLES, link: Link = "auto", seed: int = 0,
                  plot: Union[str, Path, None] = None, link_samples: int = 1000) -> TauSweep:
        """Metrics at each τ (same seed, so the same noise scaled differently); optionally plot to a PNG.

        The linearized predictive's moments are computed once: its covariance is linear in τ.
        """
        sweep = self._sweeper(loader, method, n_samples, link, seed, link_samples)(taus)
        if plot is not None:
            sweep.plot(plot)
        return sweep

    def tune_tau(self, loader: Iterable[dict], taus: Sequence[float] = EvalConfig.tune_taus,
                 method: Method = "sample", n_samples: int = N_SAMPLES, link: Link = "auto", seed: int = 0,
                 metric: str = "nll", ceiling: float = EvalConfig.tau_ceiling, link_samples: int = 1000) -> TauSweep:
        """The sweep τ* is read from, ``.best(metric)``: ``taus`` on ``loader`` (a validation split), widened by
        doubling τ while its largest is the best, up to ``ceiling`` (:func:`~bayes_peft.evaluation.tau.widened_until_bracketed`)::

            tau = ev.tune_tau(val_loader, method="sample").best()
        """
        return widened_until_bracketed(self._sweeper(loader, method, n_samples, link, seed, link_samples), taus,
                                       ceiling, metric)

    def _sweeper(self, loader: Iterable[dict], method: Method, n_samples: int, link: Link, seed: int,
                 link_samples: int) -> Callable[[Sequence[float]], TauSweep]:
        """A function from τs to the :class:`TauSweep` of ``method`` on ``loader``'s batches, moved to the device
        once (and, linearized, its logit moments computed once: their covariance is linear in τ)."""
        batches = [self._to_device(b) for b in loader]
        if method == "linearized":
            moments, labels = self._logit_moments(batches), torch.cat([b["labels"] for b in batches])
            return lambda taus: self.sweep_from_moments(moments, labels, taus, n_samples, link, seed, link_samples)
        return lambda taus: TauSweep.of(method, taus, [self.predict(batches, method, n_samples, t, link, seed,
                                                                    link_samples) for t in taus])

    def generate(self, loader: Iterable[dict], method: Literal["mean", "sample"] = "mean", n_samples: int = N_SAMPLES,
                 tau: float = 1.0, max_new_tokens: int = EvalConfig.max_new_tokens, seed: int = 0,
                 temperature: float = 1.0) -> GeneratedAnswers:
        """Greedy answers to the prompts of ``loader`` (a :class:`~bayes_peft.data.generative.GenerativeTask`'s
        ``prompt_loader``), with their confidence and uncertainty (:mod:`bayes_peft.evaluation.generation`).

        ``"mean"``: one answer at the posterior mean (the MAP), its confidence the sequence probability.
        ``"sample"``: ``n_samples`` seeded draws from the τ-scaled posterior (an ensemble's members, each once):
        the majority answer, its model-averaged probability, the answer entropy and the mutual information.
        ``temperature`` divides the token logits of the scoring (temperature scaling:
        :func:`~bayes_peft.evaluation.generation.fit_answer_temperature` fits it on validation answers).
        """
        if not temperature > 0:
            raise ValueError(f"the temperature must be positive, got {temperature}")
        if method not in ("mean", "sample"):
            raise ValueError(f"method must be 'mean' or 'sample', got {method!r}")
        if method == "sample" and self.posterior is None:
            raise ValueError("method 'sample' needs a posterior; this evaluator has none")
        if tau < 0 or n_samples < 1 or max_new_tokens < 1:
            raise ValueError(f"need tau ≥ 0, n_samples ≥ 1 and max_new_tokens ≥ 1; got {tau}, {n_samples}, "
                             f"{max_new_tokens}")
        if self.tokenizer is None:
            raise ValueError("generate decodes answers with the tokenizer: Evaluator(..., tokenizer=tokenizer)")
        tokenizer = self.tokenizer
        end_id, pad_id = end_token_id(tokenizer), pad_token_id(tokenizer)
        at_mean = method == "mean" or (tau == 0 and isinstance(self.posterior, GaussianLoRA))

        def draws():
            if at_mean:
                return [self.posterior.mean() if self.posterior is not None else contextlib.nullcontext()]
            return self._draws(n_samples, tau, seed)

        def decode(ids: list[int]) -> str:
            return tokenizer.decode(ids, skip_special_tokens=True).strip()

        batches = list(loader)
        was_training = self.model.training
        self.model.eval()
        try:
            with self._autocast(), self._bar(len(batches), f"generating ({method})") as bar:
                return generate_answers(self.model, draws, batches, decode, end_id, pad_id, max_new_tokens,
                                        progress=bar.update, temperature=temperature)
        finally:
            self.model.train(was_training)

    # ------------------------------------------------------------------------------------------------

    @staticmethod
    def _gathered(probs: Tensor, labels: Tensor, samples: Optional[Tensor]) -> Prediction:
        """Under torch.distributed each rank scored its shard (Task.loader(shard=...)): put them together
        (``labels`` are gathered already)."""
        if samples is not None:
            samples = distributed.gather_in_order(samples.transpose(0, 1)).transpose(0, 1)
        return Prediction(distributed.gather_in_order(probs), labels, samples)

    def _from_moments(self, moments: Sequence[tuple[Tensor, Tensor]], labels: Tensor, taus: Sequence[float],
                      n_samples: int, link: Link, seed: int, link_samples: int) -> list[Prediction]:
        """The linearized predictive at each of ``taus`` from its moments at τ = 1 (labels gathered once)."""
        if any(tau < 0 for tau in taus):
            raise ValueError(f"tau must be ≥ 0, got {list(taus)}")
        if link not in LINKS:
            raise ValueError(f"link must be one of {LINKS}, got {link!r}")
        moments = [(mean.to(self.device), cov.to(self.device)) for mean, cov in moments]
        labels = distributed.gather_in_order(labels.to(self.device))
        return [self._gathered(self._link(moments, tau, link, link_samples, seed), labels,
                               self._logit_samples(moments, tau, n_samples, seed)) for tau in taus]

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def _bar(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not self.progress, leave=False)

    def _probs_of_batches(self, batches: list[dict], bar) -> Tensor:
        out, padding = [], sharding.passes_to_match(self.model, batches)  # agreed before any pass
        # no_grad, not inference_mode: FSDP2 reuses the buffers it gathers weights into, and a tensor made in
        # inference mode can never again be written outside it.
        with torch.no_grad(), self._autocast():
            for batch in batches:
                out.append(torch.softmax(choice_logits(self.model, batch).float(), dim=-1))
                bar.update()
            for _ in range(padding):
                choice_logits(self.model, batches[-1])  # an FSDP2 model's weights are gathered by every rank
        return torch.cat(out)

    def _mean_probs(self, batches: list[dict]) -> Tensor:
        context = self.posterior.mean() if self.posterior is not None else contextlib.nullcontext()
        with context, self._bar(len(batches), "mean") as bar:
            return self._probs_of_batches(batches, bar)

    def _sample_probs(self, batches: list[dict], n_samples: int, tau: float, seed: int) -> Tensor:
        if n_samples < 1:
            raise ValueError(f"n_samples must be at least 1, got {n_samples}")
        if tau == 0 and isinstance(self.posterior, GaussianLoRA):
            # Every draw of a Gaussian at τ = 0 is its mean: one pass gives the S identical samples.
            return self._mean_probs(batches).repeat(n_samples, 1, 1)
        ensemble = isinstance(self.posterior, Ensemble)
        n_draws = len(self.posterior) if ensemble else n_samples
        desc = f"{n_draws} members" if ensemble else f"{n_samples} samples, τ={tau:g}"
        samples = []
        with self._bar(n_draws * len(batches), desc) as bar:
            for draw in self._draws(n_samples, tau, seed):
                with draw:
                    samples.append(self._probs_of_batches(batches, bar))
        return torch.stack(samples)  # [S, N, C]

    def _draws(self, n_samples: int, tau: float, seed: int) -> Iterable[contextlib.AbstractContextManager]:
        """The weight draws of the sample mode: ``n_samples`` seeded posterior samples, drawn one at a time,
        or an ensemble's members, each once (its predictive exactly, whatever ``n_samples``)."""
        if isinstance(self.posterior, Ensemble):
            return self.posterior.draws()
        generator = torch.Generator().manual_seed(seed)
        return (self.posterior.sample(tau=tau, generator=generator) for _ in range(n_samples))

    def _logit_moments(self, batches: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """The linearized moments at τ = 1, batch by batch."""
        if self.posterior is None:
            raise ValueError("method 'linearized' needs a posterior; this evaluator has none")
        out, padding = [], sharding.passes_to_match(self.model, batches)
        with self._bar(len(batches), "linearized") as bar:
            for batch in batches:
                mean, cov = self.posterior.logit_moments(batch, tau=1.0)
                out.append((mean.detach(), cov.detach()))
                bar.update()
            for _ in range(padding):
                self.posterior.logit_moments(batches[-1], tau=1.0)
        return out

    @staticmethod
    def _logit_samples(moments: list[tuple[Tensor, Tensor]], tau: float, n_samples: int, seed: int) -> Tensor:
        """``[S, N, C]``: softmax of ``n_samples`` draws of each example's logits (common random numbers)."""
        with torch.no_grad():
            samples = [mc_logit_samples(mean, tau * cov, n_samples, torch.Generator().manual_seed(seed))
                       for mean, cov in moments]
        return torch.cat(samples, dim=1).float()

    @staticmethod
    def _link(moments: list[tuple[Tensor, Tensor]], tau: float, link: Link, link_samples: int, seed: int) -> Tensor:
        # Every batch meets the same draws, so that an example's probabilities do not depend on its batch or shard.
        with torch.no_grad():
            probs = [link_probs(mean, tau * cov, link, link_samples, torch.Generator().manual_seed(seed))
                     for mean, cov in moments]
        return torch.cat(probs).float()

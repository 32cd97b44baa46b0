"""IVON as a drop-in replacement for AdamW.

:class:`IVON` subclasses ivon-opt's ``ivon.IVON`` (its parameter groups and buffers) and replaces the
bookkeeping around the update, so that the ordinary PyTorch loop trains with IVON's variational
objective; the update rules themselves are in :mod:`bayes_peft.ivon_rules`, tested against ivon-opt::

    opt = bayes_peft.IVON(model.parameters(), lr=0.03, ess=1e7)   # was: torch.optim.AdamW(...)
    for batch in loader:
        loss = loss_fn(model, batch)
        loss.backward()            # the gradient is taken at the current posterior sample
        opt.step()                 # restore the mean, update (m, h), draw the next sample
        opt.zero_grad()

**The sample lives in the weights.** In this drop-in style the model's trainable weights hold a posterior
sample θ = m + ε / sqrt(ess·(h + δ)) between steps, never the mean. The first sample is drawn when the
optimizer is constructed (and re-installed by :meth:`IVON.load_state_dict`); every :meth:`IVON.step`
draws the next one. Predict, evaluate or save at the mean inside :meth:`IVON.mean_params`.

**Write weights only where they hold the mean.** IVON keeps the mean itself and puts it back over the
weights at every step, so a write into weights that hold a sample (``load_state_dict``,
``set_peft_model_state_dict`` or ``copy_`` after the optimizer was built) would be lost. IVON notices
such writes, from the parameters' version counters at no device cost, and raises. Inside
``with opt.mean_params():`` (or at rest between steps in ivon-opt's style) the weights hold the mean, and
what is written there becomes the new mean. Writes through ``.data`` bypass version counters, as they
bypass autograd's own checks, and are not seen.

**ivon-opt's own style keeps working.** ``with opt.sampled_params(train=True): ...backward()`` followed by
``opt.step()`` behaves as in ivon-opt: the first such context switches the optimizer to that explicit
style, after which the weights rest at the mean between steps.

What differs from ivon-opt 0.1.3, and why:

* parameters with ``requires_grad=False`` are left out (``model.parameters()`` of a PEFT model holds the
  frozen base), and parameters whose ``grad`` is ``None`` in a step keep their mean, momentum and Hessian;
* every context restores the weights on exit, also after an exception;
* ``step(closure)`` draws a fresh sample for every one of the ``mc_samples`` closure calls;
* the noise comes from a seedable :class:`torch.Generator`, and ``state_dict`` carries it, the step
  counter, the mean and the current sample, so a resumed run continues bit-identically;
* test-time sampling takes a temperature τ: θ ~ N(m, diag(τ·v)) with v = 1 / (ess·(h + δ));
* the defaults are those of the IVON-LoRA recipe (no weight decay, ``clip_radius=1e-3``,
  ``rescale_lr=False``) rather than ivon-opt's;
* a step costs a fixed number of ops, whatever the number of tensors, and no host synchronisation: the
  weights of a group are views of one flat buffer (build the optimizer after moving the model), and a
  NaN/inf gradient is skipped on the device (see ``nonfinite``).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Optional

import ivon
import torch
from torch import Tensor

from . import distributed
from .config import IVONConfig
from .flat import FlatMirror, flatten_into_views, split_like
from .ivon_rules import GradientSamples, Sample, all_finite, draw_noise, scratch_buffers, update_group_
from .weight_guard import WeightGuard

__all__ = ["IVON"]

Closure = Callable[[], Tensor]
_STATE_KEY = "bayes_peft"
_SUPPORTED_DTYPES = (torch.float32, torch.float64)


def _trainable_only(params: Iterable) -> list:
    """Drop frozen parameters, keeping the caller's parameter groups (schedulers index them)."""
    params = list(params)
    if params and isinstance(params[0], dict):
        return [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
    return [p for p in params if p.requires_grad]


class IVON(ivon.IVON):
    r"""Improved Variational Online Newton, usable wherever ``torch.optim.AdamW`` is.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim`` optimizer. Parameters with
            ``requires_grad=False`` are ignored.
        lr: learning rate (0.03 in the IVON-LoRA recipe).
        ess: effective sample size ρ, usually the training-set size or larger (1e6 to 1e8 for LoRA).
        hess_init: initial Hessian h₀; sets the initial posterior variance 1 / (ess·(h₀ + δ)).
        beta1, beta2: momentum of the gradient and of the Hessian.
        weight_decay: δ, the prior precision per unit of ess.
        mc_samples: samples per step when :meth:`step` is given a closure.
        hess_approx: ``"price"`` (the reparameterisation estimator) or ``"gradsq"``.
        clip_radius: element-wise clip of the preconditioned update.
        sync: average the gradient samples across ``torch.distributed`` ranks, for loops without DDP (DDP
            averages the gradients already). Every rank draws the same sample either way; see
            :mod:`bayes_peft.distributed`.
        debias: divide the momentum by ``1 - beta1**t``.
        rescale_lr: multiply ``lr`` by ``hess_init + weight_decay``, as ivon-opt does by default.
        generator: source of the training noise. By default a fresh generator on the parameters'
            device, seeded from torch's global generator (so ``torch.manual_seed`` makes runs repeatable).
        nonfinite: what :meth:`step` does with a NaN/inf gradient. Either way such a step is skipped on
            the device: mean, momentum and Hessian keep their values, with no host synchronisation.
            ``"raise"`` (default): every ``nonfinite_check_every`` steps, :meth:`step` reads the device's
            count of skipped steps (one synchronisation) and, if it grew, raises ``FloatingPointError``
            with the weights at the mean and the step counter back where the skipped steps found it (call
            :meth:`resample` to go on training); :meth:`posterior_mean` checks too. ``"skip"``: never
            raise; a skipped step still draws the next sample and advances the step counter (which sets
            the momentum's debiasing), and ``skipped_steps`` counts them.
        nonfinite_check_every: how often ``"raise"`` reads the count, in steps. 1 raises at the very
            step, at one host synchronisation per step; the default, 100, keeps a GPU's step free of them.

    The weights must be float32 or float64: in bf16, ``beta2 = 1 - 1e-5`` rounds to 1.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        ess: float,
        hess_init: float = IVONConfig.hess_init,
        beta1: float = 0.9,
        beta2: float = 1.0 - 1e-5,
        weight_decay: float = 0.0,
        mc_samples: int = 1,
        hess_approx: str = "price",
        clip_radius: float = IVONConfig.clip_radius,
        sync: bool = False,
        debias: bool = True,
        rescale_lr: bool = False,
        generator: Optional[torch.Generator] = None,
        nonfinite: str = "raise",
        nonfinite_check_every: int = 100,
    ):
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if int(nonfinite_check_every) < 1:
            raise ValueError(f"nonfinite_check_every must be a positive number of steps, got {nonfinite_check_every}")
        self.nonfinite = nonfinite
        self.nonfinite_check_every = int(nonfinite_check_every)
        params = _trainable_only(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        flat = [p for g in groups for p in g["params"]]
        if not flat:
            raise ValueError("IVON got no trainable parameters (all have requires_grad=False, or none were given)")
        bad = sorted({str(p.dtype) for p in flat if p.dtype not in _SUPPORTED_DTYPES})
        if bad:
            raise ValueError(
                f"IVON needs float32 or float64 parameters, got {', '.join(bad)}: in low precision "
                "beta2 = 1 - 1e-5 rounds to 1 and the Hessian never moves. Keep the LoRA weights in float32 "
                "(peft does so by default, autocast_adapter_dtype=True) and run the base in bf16 if you wish."
            )
        self._initialized = False
        super().__init__(
            params,
            lr=lr,
            ess=ess,
            hess_init=hess_init,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            mc_samples=mc_samples,
            hess_approx=hess_approx,
            clip_radius=clip_radius,
            sync=sync,
            debias=debias,
            rescale_lr=rescale_lr,
        )
        self._initialized = True
        if generator is None:  # under torch.distributed, rank 0's seed: every rank draws the same samples
            generator = torch.Generator(device=self._device).manual_seed(distributed.shared_seed())
        elif generator.device.type != self._device.type:
            raise ValueError(f"generator is on {generator.device}, the parameters on {self._device}")
        distributed.check_identical(
            generator.get_state().cpu().numpy().tobytes(),
            "IVON's generator state: every rank must draw the same weight sample while gradients are averaged "
            "across ranks (seed the generator identically on every rank, or pass none)",
        )
        self.generator = generator
        self._autosample = True  # drop-in style until an explicit sampled_params(train=True)
        # Per group, the weights become views of one flat buffer, so that writing a mean or a sample into
        # them is one op; gradients are gathered with one op into the first buffer, or into the second for
        # a step's later MC samples.
        self._weights = [flatten_into_views(g["params"]) for g in self.param_groups]
        self._guard = WeightGuard(self.trainable_parameters())  # IVON's writes, told from anybody else's
        self._grad_mirrors = [(FlatMirror(g["params"]), FlatMirror(g["params"])) for g in self.param_groups]
        self._first_curvature = [torch.empty(g["numel"], device=self._device, dtype=self._dtype) for g in self.param_groups]
        self._scratch = [scratch_buffers(g["numel"], self._device, self._dtype) for g in self.param_groups]
        self._means = [w.clone() for w in self._weights]
        self._skipped = torch.zeros((), dtype=torch.int64, device=self._device)  # on the device: no sync
        self._skipped_reported = 0
        self._sample: Optional[Sample] = None
        # The samples that open contexts will put back, outermost first: a state_dict() taken inside
        # a context (as the HF Trainer does when it checkpoints at the mean) saves where training rests.
        self._held: list[Optional[Sample]] = []
        self._install(self._draw(generator))

    # ---------------------------------------------------------------- param groups and flat views

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_initialized", False):
            raise NotImplementedError("IVON keeps flat per-group buffers; pass every group to the constructor")
        super().add_param_group(param_group)

    @staticmethod
    def _split(group: dict, flat: Tensor) -> list[Tensor]:
        """Views of ``flat`` shaped like the parameters of ``group``."""
        return split_like(flat, group["params"])

    def trainable_parameters(self) -> list[Tensor]:
        """The parameters IVON trains, in the order of posterior_mean() and posterior_variance()."""
        return [p for g in self.param_groups for p in g["params"]]

    # ---------------------------------------------------------------- sampling

    def _draw(self, generator: Optional[torch.Generator], tau: float = 1.0, train: bool = True) -> Sample:
        """Draw ε / sqrt(ess·(h + δ)) · sqrt(τ) for every group; ``generator=None`` uses the global one."""
        noise = [draw_noise(group, tau, generator, scratch[0]) for group, scratch in zip(self.param_groups, self._scratch)]
        return Sample(noise=noise, train=train)

    @torch.no_grad()
    def _install(self, sample: Sample) -> None:
        """Weights at the mean → weights at mean + noise. The mean is re-read if the weights were written
        since IVON wrote them, so edits made at rest count."""
        if self._guard.written():
            self._read_means_from_weights()
        for mean, weights, noise in zip(self._means, self._weights, sample.noise):
            torch.add(mean, noise, out=weights)
        self._sample = sample
        self._guard.stamp()

    @torch.no_grad()
    def _restore_mean(self, check: bool = True) -> None:
        """Weights at a sample → weights at the mean; ``check`` first that nobody wrote into the sample."""
        if self._sample is None:
            return
        if check:
            self._guard.check_unedited(self._expected_weights)
        self._write_means()
        self._sample = None

    @torch.no_grad()
    def _write_means(self) -> None:
        """Weights ← the stored means, and remember that IVON wrote them."""
        self._guard.check_still_views()
        for mean, weights in zip(self._means, self._weights):
            weights.copy_(mean)
        self._guard.stamp()

    def _read_means_from_weights(self) -> None:
        """Means ← the weights, which hold the mean (a user may have written them at rest)."""
        self._guard.check_still_views()
        for mean, weights in zip(self._means, self._weights):
            mean.copy_(weights)

    def _expected_weights(self) -> list[Tensor]:
        """What IVON last wrote into each weight: the mean, plus the noise of the sample it holds."""
        out = []
        for gi, (group, mean) in enumerate(zip(self.param_groups, self._means)):
            flat = mean if self._sample is None else mean + self._sample.noise[gi]
            out.extend(self._split(group, flat))
        return out

    def _reinstall(self, sample: Optional[Sample]) -> None:
        """Return the weights to the mean, then to ``sample`` if one is given (exactly: mean + its noise)."""
        self._restore_mean()
        if sample is not None:
            self._install(sample)

    def _rest(self) -> None:
        """Put the weights where they rest between steps: a fresh training sample (drop-in) or the mean."""
        if self._autosample:
            if self._sample is None:
                self._install(self._draw(self.generator))
        else:
            self._restore_mean()

    @contextmanager
    def mean_params(self) -> Iterator[None]:
        """Context in which the weights hold the posterior mean m (IVON@mean).

        On exit the weights return to what they held on entry (in a drop-in loop, the current training
        sample), also after an exception.
        """
        held = self._sample
        self._restore_mean()
        self._held.append(held)
        try:
            yield
        finally:
            self._held.pop()
            self._reinstall(held)

    @contextmanager
    def sampled_params(
        self, train: bool = False, tau: float = 1.0, generator: Optional[torch.Generator] = None
    ) -> Iterator[None]:
        """Context in which the weights hold one posterior sample θ ~ N(m, diag(τ·v)).

        Args:
            train: ivon-opt's training style. The sample is drawn from the optimizer's generator
                (τ = 1), and on a normal exit the gradients in ``p.grad`` are recorded for the next
                :meth:`step`. The first such context switches the optimizer to this explicit style:
                afterwards the weights rest at the mean between steps.
            tau: temperature of a test-time sample; τ = 0 is the mean exactly, τ = 1 the posterior.
            generator: source of a test-time sample's noise; by default torch's global generator, so that
                evaluating never shifts the training noise.

        On exit the weights return to what they held on entry, also after an exception (in which case
        no gradient is recorded).
        """
        if tau < 0 or not math.isfinite(tau):
            raise ValueError(f"tau must be a finite number >= 0, got {tau}")
        held = self._sample
        if train:
            if tau != 1.0 or generator is not None:
                raise ValueError("training samples use tau=1 and the optimizer's own generator")
            self._autosample = False
            held = None
            if self._sample is None or not self._sample.train:
                self._restore_mean()
                self._install(self._draw(self.generator))
        else:
            self._restore_mean()
            self._install(self._draw(generator, tau=tau, train=False))
        sample = self._sample
        completed = False
        self._held.append(held)
        try:
            yield
            completed = True
        finally:
            self._held.pop()
            if train and completed:
                self._record_gradients(sample)
            self._reinstall(held)

    # ---------------------------------------------------------------- gradients and update

    def _reset_samples(self) -> None:
        self._samples: Optional[GradientSamples] = None  # made by the step's first gradient sample

    @torch.no_grad()
    def _record_gradients(self, sample: Sample) -> None:
        """Add the gradients at ``sample`` to this step's sums; parameters without a gradient are skipped."""
        params = self.trainable_parameters()
        if all(p.grad is None for p in params):
            return  # no gradient anywhere: not a sample
        samples = self._samples
        first = samples is None  # the step's first sample is gathered straight into the sum's buffer
        grads = [mirrors[0 if first else 1].gather([p.grad for p in group["params"]])
                 for group, mirrors in zip(self.param_groups, self._grad_mirrors)]
        # The first sample's curvature goes into persistent buffers too: an ordinary step allocates nothing.
        outs = self._first_curvature if first else [torch.empty_like(g) for g in grads]
        curvatures = [torch.mul(noise, g, out=out) if self.hess_approx == "price" else torch.square(g, out=out)
                      for g, noise, out in zip(grads, sample.noise, outs)]
        if first:
            samples = self._samples = GradientSamples(grads, curvatures)
        else:
            torch._foreach_add_(samples.grad, grads)
            torch._foreach_add_(samples.curvature, curvatures)
        if samples.count is not None or any(p.grad is None for p in params):
            for group, count in zip(self.param_groups, samples.per_element_counts()):
                seen = [torch.full_like(p, float(p.grad is not None)) for p in group["params"]]
                count.add_(torch.cat([s.reshape(-1) for s in seen]) if seen else count.new_zeros(0))
        samples.n += 1

    @torch.no_grad()
    def step(self, closure: Optional[Closure] = None) -> Optional[Tensor]:
        """Update the posterior from the gradient samples of this step, then draw the next sample.

        Without a closure, the gradient in ``p.grad`` was taken at the sample the weights hold (drop-in
        style), or recorded by ``sampled_params(train=True)`` contexts (ivon-opt style). Several
        ``backward()`` calls before one ``step()`` accumulate at one sample: IVON sees one gradient
        sample of the summed loss, so scale the loss as you would for AdamW.

        With a closure (which computes the loss and calls ``backward()``), the closure runs
        ``mc_samples`` times, each at a fresh sample with the gradients zeroed first; the mean loss is
        returned.
        """
        loss = None
        if self._sample is not None or (self._samples is not None and not self._samples.empty):
            self._guard.check_unedited(self._expected_weights)  # gradients taken where IVON put the weights
        if closure is not None:
            loss = self._run_closure(closure)
        elif self._sample is not None and self._sample.train:
            if self.mc_samples > 1:
                raise ValueError(
                    f"mc_samples={self.mc_samples} needs a closure, or one sampled_params(train=True) context "
                    "per sample: a plain backward() gives one sample per step"
                )
            self._record_gradients(self._sample)
        elif self._autosample and any(p.grad is not None for p in self.trainable_parameters()):
            raise RuntimeError(
                "IVON.step(): the weights hold the posterior mean, not a training sample, so this gradient is "
                "no IVON sample (did an earlier step raise on NaN?); call opt.resample() before the forward pass"
            )
        if self.sync and self._samples is not None and not self._samples.empty and distributed.active():
            self._sync_samples()  # before the NaN check, so that every rank sees the same verdict
        if self._samples is None or self._samples.empty:
            if not self._autosample and closure is None:
                raise RuntimeError(
                    "IVON.step() found no gradient sample: call backward() inside "
                    "`with opt.sampled_params(train=True):`, or pass a closure"
                )
            return loss  # no gradient anywhere: nothing changes, as in torch.optim
        # The weights were checked above and are overwritten below: by the next sample (drop-in) or the mean.
        self._sample = None
        self._update()
        self._reset_samples()
        if self.nonfinite == "raise" and self.current_step % self.nonfinite_check_every == 0:
            try:
                self._raise_on_skipped_steps()
            except FloatingPointError:
                self._write_means()  # the weights hold the mean, as the error says
                raise
        if self._autosample:
            self._install(self._draw(self.generator))  # the stamps still match: the mean buffer is not re-read
        else:
            self._write_means()
        return loss

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a NaN/inf gradient so far (reading it synchronises with the device)."""
        return int(self._skipped)

    def _raise_on_skipped_steps(self) -> None:
        """Raise ``FloatingPointError`` if steps were skipped since the last check (one host synchronisation)."""
        skipped = self.skipped_steps
        new = skipped - self._skipped_reported
        if not new:
            return
        self._skipped_reported = skipped
        last = self.current_step
        self.current_step -= new  # the skipped steps left the state as they found it: the counter too
        raise FloatingPointError(
            f"IVON: the gradient held NaN or inf in {new} step(s) up to step {last}. Those steps were skipped: the "
            "mean, momentum and Hessian are unchanged, and the weights hold the mean (call opt.resample() to go on "
            "training). Pass nonfinite='skip' to skip such steps silently."
        )

    def resample(self) -> None:
        """Draw and install a fresh training sample (drop-in style), e.g. after a step raised on NaN."""
        self._restore_mean()
        self._install(self._draw(self.generator))

    def _run_closure(self, closure: Closure) -> Optional[Tensor]:
        losses = []
        for i in range(self.mc_samples):
            if i > 0 or self._sample is None or not self._sample.train:
                self._restore_mean()
                self._install(self._draw(self.generator))
            sample = self._sample
            self.zero_grad(set_to_none=True)
            try:
                with torch.enable_grad():
                    losses.append(closure())
            except BaseException:
                self._restore_mean()
                self._reset_samples()
                self._rest()
                raise
            self._record_gradients(sample)
            self._restore_mean()
        if any(loss is None for loss in losses):
            return None
        return torch.stack([torch.as_tensor(loss).detach() for loss in losses]).mean()

    def _sync_samples(self) -> None:
        world = torch.distributed.get_world_size()
        samples = self._samples
        # Per-element counts on every rank, so that every rank makes the same collective calls.
        for tensors in (samples.grad, samples.curvature, samples.per_element_counts()):
            for t in tensors:
                torch.distributed.all_reduce(t)
                t.div_(world)

    @torch.no_grad()
    def _update(self) -> None:
        """One IVON update of every group's mean, momentum and Hessian (the weights are left as they are).

        A step whose gradients hold NaN or inf keeps every group's state (``torch.where`` on the device)
        and adds one to the device's count of skipped steps.
        """
        self.current_step += 1
        samples = self._samples
        finite = all_finite(samples.grad)
        self._skipped.add_(finite.logical_not())
        for gi, (group, mean) in enumerate(zip(self.param_groups, self._means)):
            if not group["params"]:
                continue
            avg_grad, avg_curv, seen = samples.averages(gi)
            update_group_(group, mean, avg_grad, avg_curv, finite if seen is None else finite & seen,
                          self.current_step, self.hess_approx, self.debias, self.rescale_lr, self._scratch[gi])

    # ---------------------------------------------------------------- posterior

    @torch.no_grad()
    def posterior_variance(self) -> list[Tensor]:
        """v = 1 / (ess·(h + δ)), one tensor shaped like each trainable parameter, in group order."""
        out = []
        for group in self.param_groups:
            var = 1.0 / (group["ess"] * (group["hess"] + group["weight_decay"]))
            out.extend(v.clone() for v in self._split(group, var))
        return out

    @torch.no_grad()
    def posterior_mean(self) -> list[Tensor]:
        """m, one tensor shaped like each trainable parameter, in group order (copies).

        With ``nonfinite="raise"``, first raises if steps were skipped since the last check.
        """
        if self.nonfinite == "raise":
            self._raise_on_skipped_steps()
        self._sync_mean_from_params()
        return [m.clone() for group, mean in zip(self.param_groups, self._means) for m in self._split(group, mean)]

    # ---------------------------------------------------------------- persistence

    def state_dict(self) -> dict:
        """torch's optimizer state plus what an exact resume needs: step, generator, mean and sample."""
        if not self._held:
            self._sync_mean_from_params()
        resting = self._held[0] if self._held else self._sample
        state = super().state_dict()
        for group in state["param_groups"]:  # the steps update these in place: the snapshot gets its own
            group["momentum"], group["hess"] = group["momentum"].clone(), group["hess"].clone()
        samples = self._samples
        state[_STATE_KEY] = {
            "current_step": self.current_step,
            "generator": self.generator.get_state(),
            "autosample": self._autosample,
            "mean": [m.clone() for m in self._means],
            "noise": None if resting is None else [n.clone() for n in resting.noise],
            "noise_train": None if resting is None else resting.train,
            "skipped_steps": (self.skipped_steps, self._skipped_reported),
            "gradient_samples": None if samples is None or samples.empty else {
                "grad": [t.clone() for t in samples.grad],
                "curvature": [t.clone() for t in samples.curvature],
                "n": samples.n,
                "count": None if samples.count is None else [t.clone() for t in samples.count],
            },
        }
        return state

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict`; the weights then hold exactly what they held when it was saved."""
        state_dict = dict(state_dict)
        extra = state_dict.pop(_STATE_KEY, None)
        if extra is None:
            raise ValueError(f"not a bayes_peft.IVON state dict (no '{_STATE_KEY}' entry)")
        saved_numel = [g.get("numel") for g in state_dict["param_groups"]]
        if saved_numel != [g["numel"] for g in self.param_groups]:
            raise ValueError(
                f"state dict has groups of {saved_numel} elements, this optimizer {[g['numel'] for g in self.param_groups]}"
            )
        self._restore_mean(check=False)  # everything is replaced: the weights too (the HF Trainer loads them first)
        super().load_state_dict(state_dict)
        as_buffer = lambda t: t.to(device=self._device, dtype=self._dtype).clone()  # noqa: E731
        for group in self.param_groups:
            group["momentum"], group["hess"] = as_buffer(group["momentum"]), as_buffer(group["hess"])
        self.current_step = int(extra["current_step"])
        self.generator.set_state(extra["generator"].cpu())
        self._autosample = bool(extra["autosample"])
        for mean, saved in zip(self._means, extra["mean"]):
            mean.copy_(saved)
        self._write_means()
        skipped, self._skipped_reported = extra.get("skipped_steps", (0, 0))
        self._skipped.fill_(skipped)
        self._samples = None if extra["gradient_samples"] is None else \
            self._loaded_gradient_samples(extra["gradient_samples"], as_buffer)
        if extra["noise"] is not None:
            self._reinstall(Sample([as_buffer(n) for n in extra["noise"]], bool(extra["noise_train"])))

    @staticmethod
    def _loaded_gradient_samples(saved: dict, as_buffer: Callable[[Tensor], Tensor]) -> GradientSamples:
        count = None if saved.get("count") is None else [as_buffer(t) for t in saved["count"]]
        # State dicts before "n" kept per-element counts only: the most any element was seen.
        n = saved["n"] if "n" in saved else int(max(int(c.max()) for c in count if c.numel()))
        return GradientSamples(grad=[as_buffer(t) for t in saved["grad"]],
                                curvature=[as_buffer(t) for t in saved["curvature"]], n=n, count=count)

    @torch.no_grad()
    def _sync_mean_from_params(self) -> None:
        """At rest at the mean the weights are the truth (a user may have written them); holding a sample,
        they must be as IVON left them."""
        if self._sample is not None:
            self._guard.check_unedited(self._expected_weights)
            return
        self._read_means_from_weights()
        self._guard.stamp()

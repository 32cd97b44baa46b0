"""IVON as a drop-in replacement for AdamW.

:class:`IVON` subclasses ivon-opt's ``ivon.IVON`` (its parameter groups and buffers) and replaces the
bookkeeping around the update, so that the ordinary PyTorch loop trains with IVON's variational
objective. It keeps the update, the two usage styles and the NaN policy; the update rules are pure
functions in :mod:`bayes_peft.ivon.rules` (tested against ivon-opt), what the weights hold (mean or sample)
is :class:`~bayes_peft.ivon.weights.PosteriorWeights`, and the resume state is :mod:`bayes_peft.ivon.state`::

    opt = bayes_peft.IVON(model.parameters(), lr=0.03, ess=1e7, hess_init=3e-4)   # was: torch.optim.AdamW(...)
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

* ess and hess_init may be left out (:mod:`bayes_peft.ivon.settings`): with a prior (``weight_decay`` and
  ``n_data``) IVON learns the posterior of N examples under it, h averaged over the run, since with
  β₂ = 1 − 1e-5 ivon-opt's h stays at ``hess_init``; with none, the variance is the initialisation's, ess =
  1/(h₀·v₀). ess or hess_init given, ivon-opt's rule applies exactly;
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
  NaN/inf gradient is skipped on the device (see ``nonfinite``);
* parameters sharded by FSDP2 (``fully_shard``) are trained slice by slice on each rank (:mod:`bayes_peft.sharding`):
  mean, momentum and Hessian per slice, as FSDP2 keeps AdamW's moments, since the update is elementwise.
  Every rank draws the noise of the whole group from its identically seeded generator and keeps its slices'
  elements (one draw of the group's full size a sample; LoRA is small beside the base FSDP shards), so 2 ranks
  step exactly as one process with both batches. Reading the posterior out gathers it (a collective).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Optional

import ivon
import torch
from torch import Tensor

from .. import distributed, sharding
from ..config import IVONConfig
from . import binding
from . import state as ivon_state
from .devices import split_by_device
from .flat import split_like
from .gradients import GradientRecorder, GradientSamples
from .noise import NoiseSource
from .nonfinite import SkippedSteps
from .rules import Sample, all_finite, scratch_buffers, to_device, update_group_
from .settings import resolve_settings
from .state import STATE_KEY
from .weights import PosteriorWeights

__all__ = ["IVON"]

Closure = Callable[[], Tensor]


class IVON(ivon.IVON):
    r"""Improved Variational Online Newton, usable wherever ``torch.optim.AdamW`` is.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim`` optimizer. Parameters with
            ``requires_grad=False`` are ignored.
        lr: learning rate (0.03 in the IVON-LoRA recipe).
        n_data: the number of training examples: the ess of the posterior under a given prior
            (``weight_decay``), and recorded in ``opt.settings`` otherwise.
        ess: effective sample size ρ, usually the training-set size or larger (1e6 to 1e8 for LoRA in the
            IVON-LoRA paper). Given (or hess_init given), IVON follows ivon-opt's rule exactly. Left out
            with hess_init (:mod:`bayes_peft.ivon.settings`): ``n_data`` under a given prior; otherwise
            1/(h₀·v₀), which makes every weight's variance the initialisation's v₀ (the mean square of the
            trainable tensors that are not all zero: LoRA's A) at the recipe's h₀, the scale of the step
            that lr 0.03 is tuned for. ``opt.settings`` says what it chose.
        hess_init: initial Hessian h₀; sets the initial posterior variance 1 / (ess·(h₀ + δ)) (default: the
            IVON-LoRA recipe's 3e-4; 1 under a given prior, where h is replaced by the first estimate).
        beta1, beta2: momentum of the gradient and of the Hessian.
        weight_decay: δ, the prior precision per unit of ess (default 0).
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
        hess_schedule: ``"ema"`` (ivon-opt: h ← β₂-EMA from h₀) or ``"averaged"`` (h the run's
            polynomial-decay average of the curvature estimate; :mod:`bayes_peft.ivon.rules`). Default:
            ``"averaged"`` for the posterior under a given prior with ess and hess_init left out, else ``"ema"``.

    The weights must be float32 or float64: in bf16, ``beta2 = 1 - 1e-5`` rounds to 1.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        ess: Optional[float] = None,
        hess_init: Optional[float] = None,
        beta1: float = 0.9,
        beta2: float = 1.0 - 1e-5,
        weight_decay: Optional[float] = None,
        mc_samples: int = 1,
        hess_approx: str = "price",
        clip_radius: float = IVONConfig.clip_radius,
        sync: bool = False,
        debias: bool = True,
        rescale_lr: bool = False,
        generator: Optional[torch.Generator] = None,
        nonfinite: str = "raise",
        nonfinite_check_every: int = 100,
        n_data: Optional[int] = None,
        hess_schedule: Optional[str] = None,
    ):
        self._initialized = False
        params = binding.trainable_float_params(params)
        params, self._layout = split_by_device(params if isinstance(params[0], dict) else [{"params": params}])
        flat = [p for g in params for p in g["params"]]
        self._skipped = SkippedSteps(nonfinite, nonfinite_check_every, flat[0].device)  # ivon-opt's self._device
        if sync and any(sharding.is_sharded(p) for p in flat):
            raise ValueError("sync=True averages whole gradients across ranks; FSDP2 has reduced the sharded "
                             "parameters' gradients already, and each rank holds a different slice of them")
        if self._layout is not None and (sync or any(sharding.is_sharded(p) for p in flat)):
            raise ValueError("IVON takes parameters on several devices (device_map) in one process, without "
                             "FSDP2 or sync=True")
        self.settings = resolve_settings(flat, n_data=n_data, ess=ess, hess_init=hess_init, weight_decay=weight_decay,
                                         hess_schedule=hess_schedule)
        ess, hess_init, weight_decay = self.settings.ess, self.settings.hess_init, self.settings.weight_decay
        super().__init__(params, lr=lr, ess=ess, hess_init=hess_init, beta1=beta1,
                         beta2=beta2, weight_decay=weight_decay, mc_samples=mc_samples, hess_approx=hess_approx,
                         clip_radius=clip_radius, sync=sync, debias=debias, rescale_lr=rescale_lr)
        self._initialized = True
        for group in self.param_groups:
            group.setdefault("hess_schedule", self.settings.hess_schedule)
        self._noise = NoiseSource(generator, self._device, self._layout)
        self.generator = self._noise.generator
        self._autosample = True  # drop-in style until an explicit sampled_params(train=True)
        self._bind()

    def _bind(self) -> None:
        """Build what a step works on over the parameters now in the groups, and install the first sample.

        Per group, the weights become views of one flat buffer (or, sharded, are mirrored by one), so that
        writing a mean or a sample into them is one op; gradients are gathered with one op into the first
        buffer, or into the second for a step's later MC samples."""
        self._bound = [id(p) for g in self.param_groups for p in g["params"]]
        self._weights = PosteriorWeights([g["params"] for g in self.param_groups])
        self._noise.bind(self.param_groups)
        self._recorder = GradientRecorder(self._weights.groups, [self.group_device(g) for g in self.param_groups],
                                          self._dtype)
        self._scratch = [scratch_buffers(g["numel"], self.group_device(g), self._dtype) for g in self.param_groups]
        self._weights.install(self._draw(self.generator))

    @torch.no_grad()
    def _follow_params(self) -> None:
        """Start again, as if built on them, on parameters replaced or given new storage before the first step
        (accelerate's FSDP2 preparation does that); refuse it after (:mod:`bayes_peft.ivon.binding`)."""
        if binding.replaced(self):
            binding.start_again(self)

    # ---------------------------------------------------------------- param groups and flat views

    def _get_param_configs(self):
        """ivon-opt's (each group's ``numel``; the total, the first parameter's device, the one dtype), with
        ``numel`` counting this rank's slices of sharded parameters, and groups on several devices, one each
        (:mod:`bayes_peft.ivon.devices`)."""
        params = [p for g in self.param_groups for p in g["params"]]
        dtypes = sorted({str(p.dtype) for p in params})
        if len(dtypes) > 1:
            raise ValueError(f"IVON keeps its state in one dtype; the trainable parameters are {', '.join(dtypes)}")
        for group in self.param_groups:
            group["numel"] = sum(sharding.local(p).numel() for p in group["params"])
        return sum(g["numel"] for g in self.param_groups), params[0].device, params[0].dtype

    def _init_buffers(self) -> None:
        """ivon-opt's momentum (0) and Hessian (h₀) of each group, on the group's device."""
        for group in self.param_groups:
            zeros = torch.zeros(group["numel"], device=self.group_device(group), dtype=self._dtype)
            group["momentum"] = zeros
            group["hess"] = zeros.add(torch.as_tensor(group["hess_init"]))  # ivon-opt's expression: its rounding

    def group_device(self, group: dict) -> torch.device:
        """The device of ``group``'s parameters and state (one a group: see :mod:`bayes_peft.ivon.devices`)."""
        return group["params"][0].device if group["params"] else self._device

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_initialized", False):
            raise NotImplementedError("IVON keeps flat per-group buffers; pass every group to the constructor")
        super().add_param_group(param_group)

    def _per_parameter(self, flats: list[Tensor]) -> list[Tensor]:
        """One tensor shaped like each trainable parameter, in group order, from one ``[numel]`` tensor per
        group (copies; gathered from every rank where the parameters are sharded, a collective)."""
        return [sharding.assemble(p, values).clone()
                for group, local, flat in zip(self.param_groups, self._weights.groups, flats)
                for p, values in zip(group["params"], split_like(flat, local))]

    def trainable_parameters(self) -> list[Tensor]:
        """The parameters IVON trains, in the order of posterior_mean() and posterior_variance()."""
        return [p for g in self.param_groups for p in g["params"]]

    # ---------------------------------------------------------------- sampling

    def _draw(self, generator: Optional[torch.Generator], tau: float = 1.0, train: bool = True) -> Sample:
        """Draw ε / sqrt(ess·(h + δ)) · sqrt(τ) for every group (:class:`~bayes_peft.ivon.noise.NoiseSource`)."""
        return Sample(self._noise.draw(self.param_groups, [w[0] for w in self._scratch], generator, tau), train)

    def _rest(self) -> None:
        """Put the weights where they rest between steps: a fresh training sample (drop-in) or the mean."""
        if self._autosample:
            if self._weights.sample is None:
                self._weights.install(self._draw(self.generator))
        else:
            self._weights.restore_mean()

    @contextmanager
    def mean_params(self) -> Iterator[None]:
        """Context in which the weights hold the posterior mean m (IVON@mean).

        On exit the weights return to what they held on entry (in a drop-in loop, the current training
        sample), also after an exception.
        """
        self._follow_params()
        held = self._weights.sample
        self._weights.restore_mean()
        with self._weights.returning_to(held):
            yield

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
        self._follow_params()
        if tau < 0 or not math.isfinite(tau):
            raise ValueError(f"tau must be a finite number >= 0, got {tau}")
        held = self._weights.sample
        if train:
            if tau != 1.0 or generator is not None:
                raise ValueError("training samples use tau=1 and the optimizer's own generator")
            self._autosample = False
            held = None
            if self._weights.sample is None or not self._weights.sample.train:
                self._weights.restore_mean()
                self._weights.install(self._draw(self.generator))
        else:
            self._weights.restore_mean()
            self._weights.install(self._draw(generator, tau=tau, train=False))
        sample = self._weights.sample
        with self._weights.returning_to(held):
            yield
            if train:  # not after an exception: its gradients are no sample
                self._record_gradients(sample)

    # ---------------------------------------------------------------- gradients and update

    def _reset_samples(self) -> None:
        self._samples: Optional[GradientSamples] = None  # made by the step's first gradient sample

    def _record_gradients(self, sample: Sample) -> None:
        """Add the gradients at ``sample`` to this step's sums (:mod:`bayes_peft.ivon.gradients`)."""
        self._samples = self._recorder.record(self.param_groups, sample, self.hess_approx, self._samples)

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
        self._follow_params()
        loss = None
        if self._weights.sample is not None or (self._samples is not None and not self._samples.empty):
            self._weights.check_unedited()  # gradients taken where IVON put the weights
        if closure is not None:
            loss = self._run_closure(closure)
        elif self._weights.sample is not None and self._weights.sample.train:
            if self.mc_samples > 1:
                raise ValueError(
                    f"mc_samples={self.mc_samples} needs a closure, or one sampled_params(train=True) context "
                    "per sample: a plain backward() gives one sample per step"
                )
            self._record_gradients(self._weights.sample)
        elif self._autosample and any(p.grad is not None for p in self.trainable_parameters()):
            raise RuntimeError(
                "IVON.step(): the weights hold the posterior mean, not a training sample, so this gradient is "
                "no IVON sample (did an earlier step raise on NaN?); call opt.resample() before the forward pass"
            )
        if self.sync and self._samples is not None and not self._samples.empty and distributed.active():
            # Before the NaN check, so that every rank sees the same verdict; per-element counts on every
            # rank, so that every rank makes the same collective calls.
            samples = self._samples
            distributed.average_over_ranks_([*samples.grad, *samples.curvature, *samples.per_element_counts()])
        if self._samples is None or self._samples.empty:
            if not self._autosample and closure is None:
                raise RuntimeError(
                    "IVON.step() found no gradient sample: call backward() inside "
                    "`with opt.sampled_params(train=True):`, or pass a closure"
                )
            return loss  # no gradient anywhere: nothing changes, as in torch.optim
        # The weights were checked above and are overwritten below: by the next sample (drop-in) or the mean.
        self._weights.sample = None
        self._update()
        self._reset_samples()
        if self._skipped.due(self.current_step):
            try:
                self._raise_on_skipped_steps()
            except FloatingPointError:
                self._weights.write_means()  # the weights hold the mean, as the error says
                raise
        if self._autosample:
            self._weights.install(self._draw(self.generator))  # the stamps still match: the mean buffer is not re-read
        else:
            self._weights.write_means()
        return loss

    @property
    def nonfinite(self) -> str:
        """The NaN/inf policy, ``"raise"`` or ``"skip"`` (:mod:`bayes_peft.ivon.nonfinite`)."""
        return self._skipped.policy

    @property
    def nonfinite_check_every(self) -> int:
        """How often ``"raise"`` reads the device's count of skipped steps, in steps."""
        return self._skipped.check_every

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a NaN/inf gradient so far (reading it synchronises with the device)."""
        return self._skipped.total()

    def _raise_on_skipped_steps(self) -> None:
        """Raise ``FloatingPointError`` if steps were skipped since the last check (one host synchronisation)."""
        new = self._skipped.unreported()
        if new:
            last = self.current_step
            self.current_step -= new  # the skipped steps left the state as they found it: the counter too
            raise self._skipped.error(new, last)

    def resample(self) -> None:
        """Draw and install a fresh training sample (drop-in style), e.g. after a step raised on NaN."""
        self._follow_params()
        self._weights.restore_mean()
        self._weights.install(self._draw(self.generator))

    def _run_closure(self, closure: Closure) -> Optional[Tensor]:
        losses = []
        for i in range(self.mc_samples):
            if i > 0 or self._weights.sample is None or not self._weights.sample.train:
                self._weights.restore_mean()
                self._weights.install(self._draw(self.generator))
            sample = self._weights.sample
            self.zero_grad(set_to_none=True)
            try:
                with torch.enable_grad():
                    losses.append(closure())
            except BaseException:
                self._weights.restore_mean()
                self._reset_samples()
                self._rest()
                raise
            self._record_gradients(sample)
            self._weights.restore_mean()
        if any(loss is None for loss in losses):
            return None
        return torch.stack([torch.as_tensor(loss).detach() for loss in losses]).mean()

    @torch.no_grad()
    def _update(self) -> None:
        """One IVON update of every group's mean, momentum and Hessian (the weights are left as they are).

        A step whose gradients hold NaN or inf keeps every group's state (``torch.where`` on the device)
        and adds one to the device's count of skipped steps.
        """
        self.current_step += 1
        samples = self._samples
        finite = all_finite(samples.grad)
        if self._noise.sharded:
            finite = distributed.all_ranks_true(finite)  # each rank saw its own slices: one verdict for all
        self._skipped.add(finite)
        for gi, (group, mean) in enumerate(zip(self.param_groups, self._weights.means)):
            if not group["params"]:
                continue
            avg_grad, avg_curv, seen = samples.averages(gi)
            here = finite if self._layout is None else to_device(finite, mean.device)
            update_group_(group, mean, avg_grad, avg_curv, here if seen is None else here & seen,
                          self.current_step, self.hess_approx, self.debias, self.rescale_lr, self._scratch[gi])

    # ---------------------------------------------------------------- posterior

    # Under FSDP2 the three readers below gather the whole parameters: every rank must call them.

    @torch.no_grad()
    def posterior_variance(self) -> list[Tensor]:
        """v = 1 / (ess·(h + δ)), one tensor shaped like each trainable parameter, in group order."""
        self._follow_params()
        return self._per_parameter([1.0 / (g["ess"] * (g["hess"] + g["weight_decay"])) for g in self.param_groups])

    @torch.no_grad()
    def hessian(self) -> list[Tensor]:
        """h, the curvature estimate, one tensor shaped like each trainable parameter, in group order."""
        self._follow_params()
        return self._per_parameter([g["hess"] for g in self.param_groups])

    @torch.no_grad()
    def posterior_mean(self) -> list[Tensor]:
        """m, one tensor shaped like each trainable parameter, in group order (copies).

        With ``nonfinite="raise"``, first raises if steps were skipped since the last check.
        """
        self._follow_params()
        if self.nonfinite == "raise":
            self._raise_on_skipped_steps()
        self._weights.sync_mean_from_weights()
        return self._per_parameter(self._weights.means)

    # ---------------------------------------------------------------- persistence

    def state_dict(self) -> dict:
        """torch's optimizer state plus what an exact resume needs: step, generator, mean and sample
        (see :mod:`bayes_peft.ivon.state`)."""
        self._follow_params()
        if not self._weights.in_context:
            self._weights.sync_mean_from_weights()
        state = super().state_dict()
        for group in state["param_groups"]:  # the steps update these in place: the snapshot gets its own
            group["momentum"], group["hess"] = group["momentum"].clone(), group["hess"].clone()
        state[STATE_KEY] = ivon_state.resume_state(self)
        return state

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict`; the weights then hold exactly what they held when it was saved."""
        self._follow_params()
        state_dict = dict(state_dict)
        extra = ivon_state.check(state_dict.pop(STATE_KEY, None), state_dict, self.param_groups)
        self._weights.restore_mean(check=False)  # everything is replaced: the weights too (the HF Trainer loads them first)
        super().load_state_dict(state_dict)
        ivon_state.restore(self, extra)

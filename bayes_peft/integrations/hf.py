"""The Hugging Face Trainer with IVON: evaluation and checkpoints at the posterior mean.

    from bayes_peft.integrations import Trainer
    opt = bp.IVON(model.parameters(), lr=0.03)   # or the recipe's ess=1e7, hess_init=3e-4
    trainer = Trainer(model=model, args=args, train_dataset=..., optimizers=(opt, None))
    # or built by the Trainer, which passes the training set's length as n_data:
    trainer = Trainer(model=model, args=args, train_dataset=..., optimizer_cls_and_kwargs=(bp.IVON, {"lr": 0.03}))

Why a subclass and not a ``TrainerCallback``: a callback is told *after* an evaluation or a save, so it
cannot put the mean into the model *during* one; overriding ``evaluate``, ``predict`` and
``save_model`` (which ``_save_checkpoint`` calls) wraps each in ``IVON.mean_params()``, and so are the
loads of a checkpoint's or the best model's weights, which then become IVON's mean. With any other optimizer it is the plain Trainer.

- Every checkpoint holds the adapter at the mean, ``optimizer.pt`` (IVON's full state, its step counter,
  generator and current sample included) and ``posterior.safetensors``/``posterior.json``. Resuming with
  ``trainer.train(resume_from_checkpoint=...)`` reloads the mean, then the optimizer reinstalls its sample,
  so the run continues exactly.
- Gradient accumulation: the Trainer calls ``step()`` once per ``gradient_accumulation_steps`` backward
  passes, which all see the same weight sample; IVON sees one gradient of the summed loss.
- fp16/bf16 mixed precision: accelerate's GradScaler unscales the gradients before it calls ``step()``,
  so IVON reads true gradients; LoRA weights and IVON's state stay float32.
- ``max_grad_norm``: clipping the gradient also changes IVON's Hessian estimate, which is built from the
  same gradients. The seeds clip IVON's *update* with ``clip_radius`` instead. The Trainer's default is
  1.0, so with an IVON optimizer this Trainer sets ``args.max_grad_norm = 0`` and warns once; pass
  ``max_grad_norm=0`` to silence it.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import transformers

from ..ivon.optimizer import IVON
from ..posteriors.posterior_lora import PosteriorLoRA

__all__ = ["Trainer"]


class Trainer(transformers.Trainer):
    """``transformers.Trainer`` that evaluates, predicts and saves at IVON's posterior mean."""

    def _ivon(self):
        opt = self.optimizer
        opt = getattr(opt, "optimizer", opt)  # accelerate wraps the optimizer
        return opt if isinstance(opt, IVON) else None

    def _at_mean(self):
        ivon = self._ivon()
        return ivon.mean_params() if ivon is not None else contextlib.nullcontext()

    def create_optimizer(self, *args, **kwargs):
        """The optimizer (the one passed in, or a new one); with IVON, gradient clipping is turned off.

        ``optimizer_cls_and_kwargs=(bp.IVON, {"lr": 0.03})`` builds IVON over the trainable parameters with
        ``n_data=len(train_dataset)`` (the ess of a posterior under a given ``weight_decay``; recorded
        otherwise), unless the kwargs set ess or hess_init. (The
        Trainer's weight-decay groups are AdamW's and are not used: IVON's prior is its own.)"""
        cls_and_kwargs = self.optimizer_cls_and_kwargs
        if (self.optimizer is None and cls_and_kwargs is not None and isinstance(cls_and_kwargs[0], type)
                and issubclass(cls_and_kwargs[0], IVON)):
            cls, options = cls_and_kwargs[0], dict(cls_and_kwargs[1])
            if options.get("ess") is None and options.get("hess_init") is None and "n_data" not in options:
                options["n_data"] = len(self.train_dataset)
            self.optimizer = cls([p for p in self.model.parameters() if p.requires_grad], **options)
        optimizer = super().create_optimizer(*args, **kwargs)
        if self._ivon() is not None and self.args.max_grad_norm > 0:
            warnings.warn(
                f"max_grad_norm={self.args.max_grad_norm} would clip the gradients IVON reads, which changes its "
                "Hessian estimate as well as its step; gradient clipping is turned off (args.max_grad_norm = 0). "
                "IVON bounds its update with clip_radius instead. Pass max_grad_norm=0 to silence this warning.",
                stacklevel=2)
            self.args.max_grad_norm = 0.0
        return optimizer

    def evaluate(self, *args, **kwargs):
        with self._at_mean():
            return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        with self._at_mean():
            return super().predict(*args, **kwargs)

    def save_model(self, *args, **kwargs):
        with self._at_mean():
            return super().save_model(*args, **kwargs)

    # Weights are written where they hold the mean, so that IVON adopts them (it refuses writes into a sample).
    def _load_from_checkpoint(self, *args, **kwargs):
        with self._at_mean():
            return super()._load_from_checkpoint(*args, **kwargs)

    def _load_best_model(self, *args, **kwargs):
        with self._at_mean():
            return super()._load_best_model(*args, **kwargs)

    def _save_checkpoint(self, model, trial, *args, **kwargs):
        result = super()._save_checkpoint(model, trial, *args, **kwargs)  # its save_model runs at the mean
        ivon = self._ivon()
        if ivon is not None:
            folder = os.path.join(self._get_output_dir(trial=trial),
                                  f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            PosteriorLoRA.from_ivon(self.accelerator.unwrap_model(model), ivon).save(folder, adapter=False)
        return result

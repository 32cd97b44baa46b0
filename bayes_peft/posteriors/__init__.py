"""Posteriors over LoRA weights behind one interface, :class:`~.posterior_lora.PosteriorLoRA`.

- :mod:`.gaussian`: the Gaussian base every backend shares (mean, samples, linearized logit moments, files);
- :mod:`.posterior_lora`: ``PosteriorLoRA`` and its constructors (IVON, Laplace, SWAG, files), the diagonal
  posterior and MC dropout;
- :mod:`.swag`, :mod:`.ensemble`: SWA/SWAG and checkpoint or LoRA ensembles;
- :mod:`.linearize`, :mod:`.link`: choice-logit Jacobians and the link from logit moments to probabilities.

Laplace-LoRA, a backend of its own, is :mod:`bayes_peft.laplace`.
"""

"""Predictions and their scores: the :class:`~.evaluator.Evaluator` (at the mean, sample-averaged or
linearized, on GPU or CPU, and generated answers), :mod:`.prediction` (a predictive's probabilities),
:mod:`.tau` (τ sweeps), :mod:`.generation` (the confidence and uncertainty of generated answers), :mod:`.metrics`
(ACC, NLL, ECE, Brier), :mod:`.uncertainty` (selective prediction, OOD detection) and :mod:`.calibration`
(temperature scaling, the baseline to beat)."""

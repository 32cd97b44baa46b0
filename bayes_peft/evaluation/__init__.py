"""Predictions and their scores: the :class:`~.evaluator.Evaluator` (at the mean, sample-averaged or
linearized, on GPU or CPU), :mod:`.metrics` (ACC, NLL, ECE, Brier), :mod:`.uncertainty` (selective
prediction, OOD detection) and :mod:`.calibration` (temperature scaling, the baseline to beat)."""

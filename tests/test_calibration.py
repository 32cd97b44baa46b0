"""Temperature scaling, the baseline every Bayesian method must beat."""

import pytest
import torch

from bayes_peft.evaluation.calibration import fit_temperature, temperature_scale


@pytest.mark.parametrize("true_temperature", [0.5, 2.5])
def test_temperature_scaling_recovers_a_known_temperature(true_temperature):
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(20_000, 4, generator=g, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(logits / true_temperature, -1), 1, generator=g).squeeze(-1)
    fitted = fit_temperature(torch.softmax(logits, -1), labels)  # probabilities of the untempered model
    assert fitted == pytest.approx(true_temperature, rel=0.05)
    scaled = temperature_scale(torch.softmax(logits, -1), fitted)
    torch.testing.assert_close(scaled, torch.softmax(logits / fitted, -1))

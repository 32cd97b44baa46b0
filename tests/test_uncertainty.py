"""Uncertainty scores, OOD and selective-prediction metrics, and temperature scaling, against torchmetrics
and hand-worked values."""

import math

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from bayes_peft.calibration import fit_temperature, temperature_scale
from bayes_peft.uncertainty import (accuracy_at_coverage, aurc, fpr_at_95_tpr, ood_auroc, risk_coverage,
                                    uncertainty_scores)


@pytest.mark.parametrize("ties", [False, True])
def test_auroc_equals_torchmetrics_on_random_scores(ties):
    g = torch.Generator().manual_seed(0)
    u_in, u_out = torch.randn(300, generator=g), torch.randn(200, generator=g) + 0.7
    if ties:
        u_in, u_out = u_in.round(decimals=1), u_out.round(decimals=1)
    reference = binary_auroc(torch.cat([u_in, u_out]), torch.cat([torch.zeros(300), torch.ones(200)]).long(),
                             thresholds=None)
    assert ood_auroc(u_in, u_out) == pytest.approx(float(reference), abs=1e-6)
    assert ood_auroc(u_in, u_in + 100) == 1.0 and ood_auroc(u_in, u_in - 100) == 0.0


def test_fpr_at_95_on_a_hand_worked_example():
    u_in = torch.arange(1.0, 21.0)  # 20 in-distribution scores: accepting 95% keeps 1 … 19
    u_out = torch.tensor([0.5, 10.0, 19.0, 19.5, 30.0])  # accepted: 0.5, 10 and 19
    assert fpr_at_95_tpr(u_in, u_out) == pytest.approx(3 / 5)


def test_aurc_and_accuracy_at_coverage_on_a_hand_worked_example():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    labels = torch.tensor([0, 0, 0, 0])  # right, wrong, right, wrong by confidence 0.9, 0.8, 0.7, 0.6
    coverage, risk = risk_coverage(probs, labels)
    torch.testing.assert_close(coverage, torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    torch.testing.assert_close(risk, torch.tensor([0.0, 0.5, 1 / 3, 0.5], dtype=torch.float64))
    assert aurc(probs, labels) == pytest.approx((0 + 0.5 + 1 / 3 + 0.5) / 4)
    assert accuracy_at_coverage(probs, labels, 0.5) == pytest.approx(0.5)
    assert accuracy_at_coverage(probs, labels, 0.25) == 1.0


def test_mutual_information_vanishes_when_samples_agree_and_matches_hand_values_when_they_do_not():
    p = torch.tensor([[0.7, 0.2, 0.1]])
    agree = uncertainty_scores(p, torch.stack([p, p, p]))
    assert float(agree.mutual_information) == pytest.approx(0.0, abs=1e-12)
    assert float(agree.expected_entropy) == pytest.approx(float(agree.entropy))

    samples = torch.tensor([[[0.9, 0.1]], [[0.1, 0.9]]])
    split = uncertainty_scores(samples.mean(0), samples)
    h_sample = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert float(split.entropy) == pytest.approx(math.log(2))
    assert float(split.expected_entropy) == pytest.approx(h_sample)
    assert float(split.mutual_information) == pytest.approx(math.log(2) - h_sample)
    certain = uncertainty_scores(torch.tensor([[0.5, 0.5]]), torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))
    assert float(certain.mutual_information) == pytest.approx(math.log(2))  # all of it epistemic


@pytest.mark.parametrize("true_temperature", [0.5, 2.5])
def test_temperature_scaling_recovers_a_known_temperature(true_temperature):
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(20_000, 4, generator=g, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(logits / true_temperature, -1), 1, generator=g).squeeze(-1)
    fitted = fit_temperature(torch.softmax(logits, -1), labels)  # probabilities of the untempered model
    assert fitted == pytest.approx(true_temperature, rel=0.05)
    scaled = temperature_scale(torch.softmax(logits, -1), fitted)
    torch.testing.assert_close(scaled, torch.softmax(logits / fitted, -1))


def test_sample_mode_predictions_carry_their_samples_and_split_the_entropy(gpt2_style_tokenizer):
    import bayes_peft as bp
    from bayes_peft.tasks import Example, Task
    from conftest import tiny_llama_lora

    model = tiny_llama_lora(vocab_size=len(gpt2_style_tokenizer))
    opt = bp.IVON(model.parameters(), lr=0.03, ess=50.0, hess_init=0.1, generator=torch.Generator().manual_seed(0))
    posterior = bp.PosteriorLoRA.from_ivon(model, opt)
    task = Task("toy", [" yes", " no"], train=[], test=[Example("Q: ", w, " Answer:", i % 2)
                                                         for i, w in enumerate(["good", "bad", "fine", "dull"])])
    loader = task.loader(gpt2_style_tokenizer, "test", batch_size=3)
    prediction = bp.Evaluator(model, posterior, task, progress=False).predict(loader, "sample", n_samples=4)
    assert prediction.sample_probs.shape == (4, 4, 2)
    torch.testing.assert_close(prediction.probs, prediction.sample_probs.double().mean(0).float())
    scores = prediction.uncertainty()
    torch.testing.assert_close(scores.entropy, scores.expected_entropy + scores.mutual_information)
    assert bool((scores.mutual_information > 0).all())  # the samples disagree (a wide posterior)
    assert bp.Evaluator(model, posterior, task, progress=False).predict(loader, "mean").uncertainty().mutual_information is None

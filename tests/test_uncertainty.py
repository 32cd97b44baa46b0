"""Uncertainty scores, OOD and selective-prediction metrics, and temperature scaling, against torchmetrics
and hand-worked values."""

import math

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from bayes_peft.evaluation.uncertainty import (accuracy_at_coverage, aurc, fpr_at_95_tpr, ood_auroc, risk_coverage,
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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fpr_at_95_matches_the_torchmetrics_roc_curve(seed):
    """In-distribution inputs are the positives, scored by −uncertainty: FPR at the first ROC point with TPR ≥ 0.95."""
    from torchmetrics.functional.classification import binary_roc

    g = torch.Generator().manual_seed(seed)
    u_in, u_out = torch.randn(300, generator=g), 0.8 + torch.randn(170, generator=g)
    fpr, tpr, _ = binary_roc(-torch.cat([u_in, u_out]), torch.cat([torch.ones(300), torch.zeros(170)]).long())
    expected = fpr[int(torch.nonzero(tpr >= 0.95)[0])]
    assert fpr_at_95_tpr(u_in, u_out) == pytest.approx(float(expected), abs=1e-7)


def test_tied_confidences_are_answered_in_expectation_so_the_order_of_examples_does_not_matter():
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.4, 0.6]])
    labels = torch.tensor([0, 1, 0, 0, 1])  # four tied at confidence 1, one of them wrong; then a right one
    _, risk = risk_coverage(probs, labels)
    torch.testing.assert_close(risk, torch.tensor([0.25, 0.25, 0.25, 0.25, 0.2], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randint(-2, 3, (200, 3), generator=g).double(), -1)  # many exact ties
    labels = torch.randint(0, 3, (200,), generator=g)
    permutation = torch.randperm(200, generator=g)
    assert aurc(probs[permutation], labels[permutation]) == pytest.approx(aurc(probs, labels), abs=1e-12)


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


def test_sample_mode_predictions_carry_their_samples_and_split_the_entropy(gpt2_style_tokenizer):
    import bayes_peft as bp
    from bayes_peft.data.tasks import Example, Task
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


def _toy_task_and_loader(tokenizer):
    from bayes_peft.data.tasks import Example, Task

    task = Task("toy", [" yes", " no"], train=[Example("Q: ", w, " Answer:", i % 2) for i, w in
                                                enumerate(["good", "bad", "fine", "dull", "great", "weak"])],
                test=[Example("Q: ", w, " Answer:", i % 2) for i, w in enumerate(["good", "bad", "fine", "dull"])])
    return task, task.loader(tokenizer, "test", batch_size=3)


def test_the_linearized_predictive_splits_its_uncertainty_with_draws_of_the_logit_gaussian(gpt2_style_tokenizer):
    """Its logit samples average to the quadrature predictive (a different computation of the same integral),
    their log-odds have the variance of the linearized moments, and τ = 0 leaves no epistemic part."""
    import bayes_peft as bp
    from bayes_peft.laplace import fit_laplace
    from conftest import tiny_llama_lora

    model = tiny_llama_lora(vocab_size=len(gpt2_style_tokenizer))
    task, loader = _toy_task_and_loader(gpt2_style_tokenizer)
    posterior = fit_laplace(model, task.loader(gpt2_style_tokenizer, "train", 3, shuffle=False), n_kfac=4,
                            prior=0.05, progress=False)
    ev = bp.Evaluator(model, posterior, task, progress=False)
    prediction = ev.predict(loader, "linearized", n_samples=40_000, seed=1)
    assert prediction.sample_probs.shape == (40_000, 4, 2)
    torch.testing.assert_close(prediction.sample_probs.double().mean(0), prediction.probs.double(), atol=6e-3, rtol=0)
    mean, cov = zip(*(posterior.logit_moments(batch) for batch in loader))
    cov = torch.cat(cov).double()
    difference_variance = cov[:, 1, 1] + cov[:, 0, 0] - 2 * cov[:, 0, 1]
    assert float(difference_variance.min()) > 0.05  # wide enough that the samples disagree
    log_odds = prediction.sample_probs.double().log().diff(dim=-1).squeeze(-1)
    torch.testing.assert_close(log_odds.var(0), difference_variance, rtol=0.05, atol=0)
    scores = prediction.uncertainty()
    assert bool((scores.mutual_information > 0).all())
    torch.testing.assert_close(scores.expected_entropy + scores.mutual_information,
                               uncertainty_scores(prediction.sample_probs.double().mean(0)).entropy)
    assert float(ev.predict(loader, "linearized", tau=0.0).uncertainty().mutual_information.abs().max()) == 0


def test_prediction_summaries_name_every_score_and_agree_with_the_functions():
    from bayes_peft.evaluation.prediction import Prediction

    g = torch.Generator().manual_seed(0)
    samples_in = torch.softmax(torch.randn(5, 50, 3, generator=g), -1)
    samples_out = torch.softmax(0.3 * torch.randn(5, 40, 3, generator=g), -1)  # flatter: more uncertain
    labels = torch.randint(0, 3, (50,), generator=g)
    inside = Prediction(samples_in.mean(0), labels, samples_in)
    outside = Prediction(samples_out.mean(0), torch.zeros(40, dtype=torch.long), samples_out)
    detection = inside.ood_detection(outside)
    assert list(detection) == ["max_prob", "entropy", "expected_entropy", "mutual_information"]
    scores_in, scores_out = inside.uncertainty(), outside.uncertainty()
    assert detection["entropy"]["auroc"] == ood_auroc(scores_in.entropy, scores_out.entropy) > 0.5
    assert detection["max_prob"]["fpr_at_95_tpr"] == fpr_at_95_tpr(-scores_in.max_prob, -scores_out.max_prob)
    selective = inside.selective(coverage=0.5)
    assert selective["mutual_information"]["aurc"] == aurc(inside.probs, labels, scores_in.mutual_information)
    assert selective["max_prob"]["accuracy_at_coverage"] == accuracy_at_coverage(inside.probs, labels, 0.5)
    # Without samples only the predictive's own scores exist, and a comparison keeps the common ones.
    assert list(Prediction(inside.probs, labels).ood_detection(outside)) == ["max_prob", "entropy"]

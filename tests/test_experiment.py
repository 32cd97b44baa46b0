"""The evaluation stage: score() and compare()'s typed results and their JSON."""

import dataclasses
import json

import pytest
import torch

from bayes_peft.config import preset_config
from bayes_peft.evaluation.prediction import Prediction
from bayes_peft.experiments.compare import compare, score
from bayes_peft.data.tasks import Task


def test_score_gives_metrics_selective_prediction_and_ood_detection():
    g = torch.Generator().manual_seed(0)
    sets = {"test": torch.softmax(3 * torch.randn(50, 2, generator=g), -1),
            "shifted": torch.softmax(0.3 * torch.randn(40, 2, generator=g), -1)}
    labels = {"test": torch.randint(0, 2, (50,), generator=g), "shifted": torch.randint(0, 2, (40,), generator=g)}
    shifted_task = Task("shifted", [" a", " b"], train=[], test=[], labelled=True)
    texts_task = Task("texts", [" a", " b"], train=[], test=[], labelled=False)
    scores = score(lambda name: Prediction(sets[name], labels[name]), "test",
                   {"shift": (shifted_task, "shifted"), "texts": (texts_task, "shifted")}, n_bins=15)
    test = Prediction(sets["test"], labels["test"])
    assert scores.metrics == test.metrics(15) and scores.selective == test.selective()
    assert scores.ood["shift"].detection == test.ood_detection(Prediction(sets["shifted"], labels["shifted"]))
    assert scores.ood["shift"].metrics.n == 40 and scores.ood["texts"].metrics is None
    saved = scores.to_json()
    assert list(saved) == ["metrics", "selective", "ood"] and "metrics" not in saved["ood"]["texts"]


def test_compare_returns_typed_results_in_the_order_asked_and_sweeps_reuse_the_prediction(tiny_llama_dir, tmp_path):
    config = preset_config("overfit", overrides={"model": str(tiny_llama_dir), "train.steps": 2, "data.n_test": 6,
                                                 "progress": False, "eval.n_samples": 3})
    methods = ["IVON", "LA-KFAC validation", "AdamW (MAP)"]
    swept = compare(config, tmp_path, methods, log=lambda _: None, sweeps={"LA-KFAC validation": [0.0, 1.0]})
    assert list(swept) == methods
    plain = compare(config, tmp_path, ["LA-KFAC validation"], log=lambda _: None)["LA-KFAC validation"]
    la = swept["LA-KFAC validation"]
    assert la.sweep.taus == [0.0, 1.0] and swept["IVON"].sweep is None
    # The τ = 1 point of a linearized sweep is the method's own prediction, samples and all.
    assert torch.equal(la.prediction.probs, plain.prediction.probs)
    assert torch.equal(la.prediction.sample_probs, plain.prediction.sample_probs)
    assert la.metrics == plain.metrics == la.sweep.metrics[1]
    saved = json.loads((tmp_path / "results.json").read_text())["results"]["LA-KFAC validation"]
    assert list(saved) == ["metrics", "selective", "seconds"] and saved["metrics"] == plain.metrics.as_dict()


def test_compare_refuses_ood_sets_with_other_labels(tiny_llama_dir, tmp_path):
    config = preset_config("overfit", overrides={"model": str(tiny_llama_dir), "train.steps": 1, "progress": False})
    other = Task("letters", [" A", " B"], train=[], test=[])
    with pytest.raises(ValueError, match="answers with"):
        compare(config, tmp_path, ["AdamW (MAP)"], ood={"letters": other})


def test_compare_saves_each_result_as_it_comes(tiny_llama_dir, tmp_path, monkeypatch):
    from bayes_peft.experiments import methods as registry

    config = preset_config("overfit", overrides={"model": str(tiny_llama_dir), "train.steps": 1, "data.n_test": 4,
                                                 "progress": False})
    def fails(checkpoint):
        raise RuntimeError("out of memory")

    broken = dataclasses.replace(registry.METHODS["AdamW (MAP)"], name="broken", posterior=fails)
    monkeypatch.setitem(registry.METHODS, "broken", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        compare(config, tmp_path, ["AdamW (MAP)", "broken"], log=lambda _: None)
    saved = json.loads((tmp_path / "results.json").read_text())["results"]
    assert list(saved) == ["AdamW (MAP)"] and saved["AdamW (MAP)"]["metrics"]["n"] == 4

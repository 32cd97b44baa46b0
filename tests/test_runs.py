"""The training stage: a checkpoint is trained once and reloaded after, and what its methods fit is shared."""

import pytest
import torch

from bayes_peft.config import preset_config
from bayes_peft.posterior import DiagonalPosterior
from bayes_peft.runs import open_checkpoint, train_checkpoint


@pytest.fixture
def config(tiny_llama_dir):
    return preset_config("overfit", overrides={"model": str(tiny_llama_dir), "train.steps": 2, "data.n_test": 6,
                                               "progress": False})


def _lora(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_finished_checkpoint_is_reloaded_not_retrained(config, tmp_path):
    trained = train_checkpoint(config, "ivon", tmp_path / "ivon")
    assert trained.seconds > 0 and len(trained.losses) == 2 and isinstance(trained.ivon, DiagonalPosterior)
    again = train_checkpoint(config, "ivon", tmp_path / "ivon")
    assert again.seconds == 0.0 and again.losses == []
    weights, reloaded = _lora(trained.model), _lora(again.model)
    assert weights.keys() == reloaded.keys() and all(torch.equal(weights[n], reloaded[n]) for n in weights)
    for name, v in trained.ivon.variance.items():  # the posterior came back with the adapter
        assert torch.equal(again.ivon.variance[name], v)
    opened = open_checkpoint(config, tmp_path / "ivon")
    assert opened.ivon is None and all(torch.equal(weights[n], w) for n, w in _lora(opened.model).items())


def test_laplace_factors_are_fitted_once_and_every_prior_reuses_them(config, tmp_path, monkeypatch):
    checkpoint = train_checkpoint(config, "adamw", tmp_path / "adamw")
    fits = []
    import bayes_peft.laplace as laplace

    original = laplace.fit_laplace
    monkeypatch.setattr(laplace, "fit_laplace", lambda *a, **k: fits.append(1) or original(*a, **k))
    evidence, fixed = checkpoint.laplace("evidence"), checkpoint.laplace(3.0)
    validation = checkpoint.laplace("validation")
    assert len(fits) == 1
    assert all(evidence.bases[n] is fixed.bases[n] is validation.bases[n] for n in evidence.names)
    assert set(fixed.prior_precision.values()) == {3.0} and evidence.n_examples == len(checkpoint.task.train)
    with pytest.raises(ValueError, match="positive"):
        checkpoint.laplace(-1.0)


def test_bad_requests_are_refused(config, tmp_path):
    with pytest.raises(ValueError, match="optimizer must be one of"):
        train_checkpoint(config, "sgd", tmp_path / "sgd")
    checkpoint = train_checkpoint(config.override({"data.val_split": None}), "adamw", tmp_path / "adamw")
    with pytest.raises(ValueError, match="validation prior needs a validation split"):
        checkpoint.laplace("validation")

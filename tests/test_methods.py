"""A method is one registration: registered once, it runs through the comparison and its JSON."""

import json

import pytest
import torch

from bayes_peft.config import preset_config
from bayes_peft.evaluation.evaluator import Evaluator
from bayes_peft.experiments.compare import compare
from bayes_peft.laplace import fit_laplace
from bayes_peft.experiments.methods import METHODS, Method, register
from bayes_peft.models import load_model

TOY = "LA-KFAC λ=10 (toy)"


@pytest.fixture
def toy_method():
    method = register(Method(TOY, checkpoint="adamw", predictive="linearized", posterior=lambda c: c.laplace(10.0)))
    yield method
    del METHODS[TOY]


def test_a_registered_method_runs_through_the_comparison(toy_method, tiny_llama_dir, tmp_path):
    config = preset_config("overfit", overrides={"model": str(tiny_llama_dir), "train.steps": 2, "data.n_test": 6,
                                                 "progress": False})
    results = compare(config, tmp_path, ["AdamW (MAP)", TOY], log=lambda _: None)
    assert list(results) == ["AdamW (MAP)", TOY]
    toy = results[TOY]
    assert toy.metrics.n == 6 and "mutual_information" in toy.selective  # linearized: its logit draws split it

    # The same numbers by hand: Laplace with λ = 10 on the saved AdamW adapter, its linearized predictive.
    model, tokenizer = load_model(str(tiny_llama_dir), adapter=tmp_path / "adamw")
    task = config.load_task()
    posterior = fit_laplace(model, task.loader(tokenizer, "train", 16, shuffle=False), n_kfac=10, prior=10.0,
                            progress=False)
    by_hand = Evaluator(model, posterior, progress=False).predict(task.loader(tokenizer, "test", 16), "linearized")
    torch.testing.assert_close(toy.prediction.probs, by_hand.probs, rtol=1e-5, atol=1e-6)

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"][TOY]["metrics"]["n"] == 6 and saved["config"]["train"]["steps"] == 2


def test_bad_registrations_and_unknown_methods_are_refused(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="checkpoint must be"):
        register(Method("x", checkpoint="sgd", predictive="mean"))
    with pytest.raises(ValueError, match="predictive must be"):
        register(Method("x", checkpoint="adamw", predictive="median"))
    assert "x" not in METHODS
    with pytest.raises(ValueError, match="unknown methods"):
        compare(preset_config("overfit"), tmp_path, ["AdamW (MAP)", "nope"])


def test_the_built_in_methods_are_the_rows_of_the_comparison():
    assert list(METHODS)[:19] == ["AdamW (MAP)", "Temperature scaling", "MC-dropout", "LA-KFAC evidence",
                                  "LA-KFAC evidence (published)", "LA-KFAC validation", "LA-diag evidence", "LA-diag validation", "AdamW+lm_head (MAP)",
                                  "LLLA evidence", "LLLA validation", "IVON@mean", "IVON", "SWA", "SWAG",
                                  "IVON (τ*)", "LA-KFAC evidence (τ*)", "Checkpoint ensemble", "LoRA ensemble"]
    assert {m.checkpoint for name, m in METHODS.items() if name.startswith("IVON")} == {"ivon"}


def test_a_tau_star_method_chooses_tau_on_validation_data_alone(tiny_llama_dir, tmp_path):
    import dataclasses

    config = preset_config("overfit", overrides={"model": str(tiny_llama_dir), "train.steps": 2, "data.n_test": 6,
                                                 "eval.n_samples": 2, "eval.tune_taus": (0.0, 0.5, 1.0),
                                                 "progress": False})
    rows = ["IVON (τ*)", "LA-KFAC evidence (τ*)"]
    task = config.load_task()
    first = compare(config, tmp_path, rows, log=lambda _: None, task=task)
    swapped = dataclasses.replace(task, test=task.train[:6])  # other test examples, the same validation split
    second = compare(config, tmp_path, rows, log=lambda _: None, task=swapped)
    for row in rows:
        tau = first[row].settings["tau"]
        assert second[row].settings["tau"] == tau
        assert not torch.equal(first[row].prediction.probs, second[row].prediction.probs)
    # By hand: the τ with the lowest validation NLL of IVON's sampled predictive, of the grid and, while its top is
    # the best, of the grid with twice its top added (whole sweeps again), then the test at it.
    from bayes_peft.experiments.runs import open_checkpoint

    checkpoint = open_checkpoint(config, tmp_path / "ivon", task, "ivon")
    ev = Evaluator(checkpoint.model, checkpoint.posterior, progress=False)
    taus = [0.0, 0.5, 1.0]
    sweep = ev.sweep_tau(checkpoint.loader("validation"), taus, "sample", n_samples=2, seed=0)
    while sweep.best("nll") == taus[-1] and 2 * taus[-1] <= config.eval.tau_ceiling:
        taus.append(2 * taus[-1])
        sweep = ev.sweep_tau(checkpoint.loader("validation"), taus, "sample", n_samples=2, seed=0)
    assert first["IVON (τ*)"].settings["tau"] == sweep.best("nll")
    at_best = ev.predict(checkpoint.loader("test"), "sample", n_samples=2, tau=sweep.best("nll"), seed=0)
    torch.testing.assert_close(first["IVON (τ*)"].prediction.probs, at_best.probs)
    saved = json.loads((tmp_path / "results.json").read_text())["results"]["IVON (τ*)"]["settings"]["tau"]
    assert saved == first["IVON (τ*)"].settings["tau"]


def test_the_priors_of_one_kfac_fit_share_each_loaders_jacobian_pass(tiny_llama_dir, tmp_path, monkeypatch):
    """LA-KFAC with the evidence, with the validation prior and at τ* read one Jacobian pass over the test split
    between them, and each predicts what the evaluator's own linearized predictive gives for its posterior."""
    from bayes_peft.posteriors import gaussian
    from bayes_peft.laplace import prior as prior_module
    from bayes_peft.experiments.runs import train_checkpoint

    config = preset_config("overfit", overrides={"model": str(tiny_llama_dir), "train.steps": 2, "data.n_test": 6,
                                                 "data.n_validation": 4, "eval.batch_size": 2, "progress": False,
                                                 "eval.n_samples": 4})
    rows = ["LA-KFAC evidence", "LA-KFAC validation", "LA-KFAC evidence (τ*)"]
    checkpoint = train_checkpoint(config, "adamw", tmp_path / "adamw")
    n_test, n_val = len(list(checkpoint.loader("test"))), len(list(checkpoint.loader("validation")))
    assert (n_test, n_val) == (3, 2)
    passes = []
    for module in (gaussian, prior_module):
        def counted(model, batch, layers, grads=module.choice_logit_grads):
            passes.append(len(batch["labels"]))
            return grads(model, batch, layers)
        monkeypatch.setattr(module, "choice_logit_grads", counted)
    results = compare(config, tmp_path, rows, log=lambda _: None)
    # The test split once for the three rows, the validation split once for the validation prior's search and
    # τ*'s sweep (without sharing: the test split three times, the validation split twice).
    assert len(passes) == n_test + n_val
    monkeypatch.undo()

    for row in rows:
        method = METHODS[row]
        posterior = method.posterior(checkpoint)
        tau = results[row].settings.get("tau", 1.0)
        by_hand = Evaluator(checkpoint.model, posterior, progress=False).predict(
            checkpoint.loader("test"), "linearized", n_samples=4, tau=tau, link=config.eval.link, seed=config.seed)
        torch.testing.assert_close(results[row].prediction.probs, by_hand.probs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(results[row].prediction.sample_probs, by_hand.sample_probs, rtol=1e-4, atol=1e-5)


def test_a_laplace_row_makes_its_posterior_from_its_prior_also_when_copied():
    import dataclasses

    from bayes_peft.experiments.methods import Laplace, TauTunedLaplace

    class Fits:
        def laplace(self, prior, structure, modules):
            return (prior, structure, modules)

    row = METHODS["LA-KFAC evidence"]
    assert row.posterior(Fits()) == ("evidence", "kfac", None)
    copied = dataclasses.replace(row, name="LA-KFAC λ=3", prior=3.0)
    assert copied.posterior(Fits()) == (3.0, "kfac", None)
    tuned = dataclasses.replace(METHODS["LA-KFAC evidence (τ*)"], prior="validation")
    assert tuned.posterior(Fits()) == ("validation", "kfac", None)
    for row in (Laplace, TauTunedLaplace):  # the posterior is the fields', not an argument
        with pytest.raises(TypeError):
            row("x", "adamw", "linearized", posterior=lambda c: None)

"""The training stage: a checkpoint is trained once and reloaded after, and what its methods fit is shared."""

import dataclasses

import pytest
import torch

from bayes_peft.config import SWAGConfig, preset_config
from bayes_peft.posteriors.posterior_lora import DiagonalPosterior
from bayes_peft.experiments.runs import open_checkpoint, train_checkpoint


@pytest.fixture
def config(tiny_llama_dir):
    return preset_config("overfit", overrides={"model": str(tiny_llama_dir), "train.steps": 2, "data.n_test": 6,
                                               "progress": False})


def _lora(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_finished_checkpoint_is_reloaded_not_retrained(config, tmp_path):
    trained = train_checkpoint(config, "ivon", tmp_path / "ivon")
    assert trained.seconds > 0 and len(trained.losses) == 2 and isinstance(trained.posterior, DiagonalPosterior)
    again = train_checkpoint(config, "ivon", tmp_path / "ivon")
    assert again.seconds == 0.0 and again.losses == []
    weights, reloaded = _lora(trained.model), _lora(again.model)
    assert weights.keys() == reloaded.keys() and all(torch.equal(weights[n], reloaded[n]) for n in weights)
    for name, v in trained.posterior.variance.items():  # the posterior came back with the adapter
        assert torch.equal(again.posterior.variance[name], v)
    opened = open_checkpoint(config, tmp_path / "ivon")
    assert opened.posterior is None and all(torch.equal(weights[n], w) for n, w in _lora(opened.model).items())


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


def test_the_training_keeps_where_it_started_and_the_laplace_prior_is_centred_there(config, tmp_path):
    """θ₀ is the LoRA as initialised, saved before IVON puts its first sample into the weights: lora_B at zero,
    lora_A at its draw. A folder this stage trained before θ₀ was kept gets the same θ₀ again, from the init seed;
    an adapter opened from elsewhere has none."""
    from safetensors.torch import load_file

    from bayes_peft.experiments.runs import INITIAL_FILE
    from bayes_peft.laplace import EvidenceFallbackWarning

    checkpoint = train_checkpoint(config, "ivon", tmp_path / "ivon")
    initial = load_file(str(tmp_path / "ivon" / INITIAL_FILE))
    assert initial.keys() == _lora(checkpoint.model).keys()
    assert all(t.abs().max() == 0 for n, t in initial.items() if "lora_B" in n)
    assert all(t.abs().max() > 0 for n, t in initial.items() if "lora_A" in n)
    adamw = train_checkpoint(config, "adamw", tmp_path / "adamw")
    posterior = adamw.laplace("evidence")
    saved = load_file(str(tmp_path / "adamw" / INITIAL_FILE))
    assert all(torch.equal(saved[n], initial[n]) for n in initial)  # one init seed: one θ₀
    assert all(torch.equal(posterior.prior_mean[n], saved[n]) for n in posterior.names)
    (tmp_path / "adamw" / INITIAL_FILE).unlink()  # as in a folder trained before θ₀ was kept
    foreign = open_checkpoint(config, tmp_path / "adamw", optimizer="adamw")  # as an adapter trained elsewhere
    assert foreign.initial_weights() is None
    with pytest.warns(EvidenceFallbackWarning):
        foreign.laplace("evidence")
    again = train_checkpoint(config, "adamw", tmp_path / "adamw").initial_weights()  # its own folder: drawn again
    assert again is not None and all(torch.equal(again[n], saved[n]) for n in saved)


def test_bad_requests_are_refused(config, tmp_path):
    with pytest.raises(ValueError, match="optimizer must be one of"):
        train_checkpoint(config, "sgd", tmp_path / "sgd")
    checkpoint = train_checkpoint(config.override({"data.val_split": None}), "adamw", tmp_path / "adamw")
    with pytest.raises(ValueError, match="validation prior needs a validation split"):
        checkpoint.laplace("validation")


def test_the_swag_training_follows_swag_loras_schedule_and_keeps_swa_in_the_model(config, tmp_path):
    from bayes_peft.experiments.runs import swag_schedule

    config = config.override({"train.steps": 60, "data.n_train": 16, "train.batch_size": 4})  # 4 steps an epoch
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([param], lr=1e-3)
    scheduler, (collector,) = swag_schedule(opt, config, n_train=16, model=torch.nn.Linear(2, 2))
    lrs = []
    for _ in range(60):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    start, anneal = 8 * 4, 5 * 4  # SWAG-LoRA: from epoch 8, annealed over 5 epochs
    assert lrs[:start + 1] == [1e-3] * (start + 1)
    assert lrs[start + anneal // 2] == pytest.approx(1e-3 * (1 - (1 - 1 / 6) / 2))
    assert lrs[start + anneal:] == [pytest.approx(1e-3 / 6)] * (60 - start - anneal)
    assert (collector.start, collector.every, collector.max_rank) == (start, 4, 5)

    squeezed = SWAGConfig().compressed(epochs=2)
    short = swag_schedule(opt, config.override({f"train.swag.{k}": v for k, v in dataclasses.asdict(squeezed).items()}),
                          n_train=16, model=torch.nn.Linear(2, 2))[1][0]
    assert (short.start, short.every) == (4, 1)  # epoch 8/9 of 2 (step 3.6 of 4 a epoch), 9 collections an epoch

    trained = train_checkpoint(config, "swag", tmp_path / "swag")
    posterior = trained.posterior
    assert posterior.rank == 5  # collected at steps 32, 36, ..., 60 (once an epoch from the start), the last 5 kept
    mean = posterior.mean_weights()
    assert all(torch.equal(p.detach(), mean[n]) for n, p in trained.model.named_parameters() if n in mean)
    again = train_checkpoint(config, "swag", tmp_path / "swag")
    assert again.seconds == 0.0 and all(torch.equal(again.posterior.deviations[n], d)
                                        for n, d in posterior.deviations.items())


def test_a_swag_run_shorter_than_its_start_keeps_its_last_iterate(config, tmp_path):
    trained = train_checkpoint(config, "swag", tmp_path / "swag")  # 2 steps, SWAG starts after 8 epochs
    assert trained.posterior.rank == 1
    assert all(float(d.abs().max()) == 0 for d in trained.posterior.diagonal.values())


def test_an_adamw_run_keeps_its_last_epochs_and_grows_a_lora_ensemble_beside_it(config, tmp_path):
    config = config.override({"data.n_train": 16, "train.batch_size": 8, "train.steps": 8})  # 2 steps an epoch
    trained = train_checkpoint(config, "adamw", tmp_path / "seed0" / "adamw")
    snapshots = trained.checkpoint_ensemble()
    assert snapshots.kind == "checkpoint" and len(snapshots) == 3  # the ends of epochs 2, 3 and 4
    final = _lora(trained.model)
    assert all(torch.equal(snapshots.members[-1][n], w) for n, w in final.items())  # the last is the adapter's
    assert any(not torch.equal(snapshots.members[0][n], w) for n, w in final.items())
    reopened = open_checkpoint(config, tmp_path / "seed0" / "adamw", optimizer="adamw")
    assert all(torch.equal(reopened.checkpoint_ensemble().members[0][n], w) for n, w in snapshots.members[0].items())

    ensemble = trained.lora_ensemble()
    assert ensemble.kind == "lora" and len(ensemble) == 3 and trained.lora_ensemble() is ensemble
    assert all(torch.equal(ensemble.members[0][n], w) for n, w in final.items())  # this run is member 0
    for k in (1, 2):  # the others: the same data, other initialisation seeds, each saved in its own folder
        member = open_checkpoint(config, tmp_path / "seed0" / f"adamw_member{k}")
        assert all(torch.equal(ensemble.members[k][n], w) for n, w in _lora(member.model).items())
        assert any(not torch.equal(ensemble.members[k][n], w) for n, w in final.items())
    by_hand = train_checkpoint(config.override({"train.init_seed": 1000}), "adamw", tmp_path / "by_hand")
    assert all(torch.equal(ensemble.members[1][n], w) for n, w in _lora(by_hand.model).items())

    ivon = train_checkpoint(config, "ivon", tmp_path / "seed0" / "ivon")
    with pytest.raises(ValueError, match="keeps no checkpoint ensemble"):
        ivon.checkpoint_ensemble()
    with pytest.raises(ValueError, match="grows from an AdamW checkpoint"):
        ivon.lora_ensemble()


def test_the_last_layer_training_puts_lora_on_the_output_layer_and_llla_covers_it_alone(config, tmp_path):
    trained = train_checkpoint(config, "adamw_lm_head", tmp_path / "adamw_lm_head")
    head = {n for n in _lora(trained.model) if ".lm_head." in n}
    assert len(head) == 2 and len(_lora(trained.model)) > 2
    llla = trained.laplace(1.0, modules=("lm_head",))
    assert set(llla.names) == head
    reopened = open_checkpoint(config, tmp_path / "adamw_lm_head")
    assert {n for n in _lora(reopened.model) if ".lm_head." in n} == head


def test_the_linear_schedule_falls_to_zero_and_a_run_in_stages_equals_one_at_once(config, tmp_path):
    """The papers' AdamW schedule: the learning rate falls linearly from lr at the first step to 0 at the
    run's last; trained in stages (1 step, then 2 more from the saved state) the run keeps the whole run's
    horizon and ends with the same weights as 3 steps at once."""
    from bayes_peft.experiments.runs import adamw_schedule, train_stages

    linear = config.override({"train.steps": 3, "train.lr_schedule": "linear"})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    scheduler = adamw_schedule(optimizer, linear.train)
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.3, 0.2, 0.1, 0.0])
    assert adamw_schedule(optimizer, config.train) is None
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        adamw_schedule(optimizer, config.override({"train.lr_schedule": "cosine"}).train)

    at_once = _lora(train_checkpoint(linear, "adamw", tmp_path / "at_once").model)
    stages = dict(train_stages(linear, "adamw", tmp_path / "stages", [1, 3]))
    assert list(stages) == [1, 3] and (tmp_path / "stages" / "step1" / "adamw").is_dir()
    staged = _lora(stages[3].model)
    assert all(torch.equal(at_once[n], staged[n]) for n in at_once)
    first = _lora(stages[1].model)
    assert any(not torch.equal(first[n], staged[n]) for n in first)  # the second stage trained
    with pytest.raises(ValueError, match="stages must increase"):
        list(train_stages(linear, "adamw", tmp_path / "bad", [2, 1]))

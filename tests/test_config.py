"""The configuration is the one home of every default: the command line, the library's signatures and the
presets all read it, so that none can drift from another."""

import inspect

import pytest
import torch

import bayes_peft as bp
from bayes_peft.cli import _parser, run_config
from bayes_peft.config import (IVON_AUTOMATIC, IVON_RECIPE, PRESETS, EvalConfig, IVONConfig, LaplaceConfig, RunConfig,
                               TrainConfig, preset_config, shown)
from bayes_peft.evaluation.evaluator import Evaluator
from bayes_peft.laplace import fit_laplace

ADAPTER = ["--task", "sst2", "--adapter", "runs/x"]
SUBCOMMANDS = {
    "train ivon": ["train", "--task", "sst2", "--out", "runs/x"],
    "train adamw": ["train", "--task", "sst2", "--out", "runs/x", "--optimizer", "adamw"],
    "laplace": ["laplace", *ADAPTER, "--out", "runs/y"],
    "evaluate": ["evaluate", *ADAPTER],
    "sweep": ["sweep", *ADAPTER],
}


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_takes_the_librarys_defaults(name):
    """What `bayes-peft <subcommand>` runs with when no option is given is the library's RunConfig."""
    config = run_config(_parser().parse_args(SUBCOMMANDS[name]))
    library = RunConfig()
    assert config.train == library.train  # IVON's lr, ess, hess_init, clip_radius; AdamW's lr; steps
    assert config.laplace == library.laplace  # n_kfac, the prior, the Fisher
    assert config.eval == library.eval  # n_samples, ECE bins, link
    assert config.data.val_split == library.data.val_split and config.seed == library.seed
    assert config.model == library.model and config.data.task == "sst2"


def test_the_cli_options_land_where_the_library_reads_them():
    args = _parser().parse_args(["train", "--task", "sst2", "--out", "x", "--ess", "1e8", "--hess-init", "1e-3",
                                 "--clip-radius", "0.01", "--lr", "0.1", "--steps", "7", "--batch-size", "3"])
    config = run_config(args)
    assert config.train.ivon == IVONConfig(lr=0.1, ess=1e8, hess_init=1e-3, clip_radius=0.01)
    assert config.train.steps == 7 and config.train.batch_size == 3
    adamw = run_config(_parser().parse_args(["train", "--task", "sst2", "--out", "x", "--optimizer", "adamw",
                                             "--lr", "0.002"]))
    assert adamw.train.adamw_lr == 0.002 and adamw.train.ivon == IVONConfig()
    laplace = run_config(_parser().parse_args(["laplace", *ADAPTER, "--out", "y", "--n-kfac", "4", "--prior", "2.5",
                                               "--batch-size", "5"]))
    assert laplace.laplace.n_kfac == 4 and laplace.laplace.prior == 2.5 and laplace.eval.batch_size == 5
    sampled = run_config(_parser().parse_args(["evaluate", *ADAPTER, "--samples", "3", "--ece-bins", "15"]))
    assert sampled.eval.n_samples == 3 and sampled.eval.ece_bins == 15


def test_the_cli_help_shows_the_librarys_values(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default {shown(IVONConfig().ess)})" in text and f"(default {IVONConfig().clip_radius:g})" in text
    assert f"{TrainConfig().adamw_lr:g} for AdamW, {IVONConfig().lr:g} for IVON)" in text


def test_the_librarys_signatures_default_to_the_configuration():
    ivon = inspect.signature(bp.IVON).parameters
    assert bp.IVON([torch.nn.Parameter(torch.ones(2))], lr=0.1).settings.automatic == IVONConfig().automatic
    assert bp.IVON([torch.nn.Parameter(torch.ones(2))], lr=0.1, ess=10.0).settings.hess_init == IVON_RECIPE.hess_init
    assert ivon["clip_radius"].default == IVONConfig().clip_radius
    laplace = inspect.signature(fit_laplace).parameters
    assert laplace["n_kfac"].default == LaplaceConfig().n_kfac and laplace["prior"].default == LaplaceConfig().prior
    assert laplace["fisher"].default == LaplaceConfig().fisher
    for method in (Evaluator.predict, Evaluator.evaluate, Evaluator.sweep_tau):
        assert inspect.signature(method).parameters["n_samples"].default == EvalConfig().n_samples


def test_override_by_dotted_path_and_its_errors():
    config = RunConfig().override({"train.ivon.ess": 1e8, "seed": 3, "data.n_test": 5})
    assert config.train.ivon.ess == 1e8 and config.seed == 3 and config.data.n_test == 5
    assert config.train.ivon.lr == IVONConfig().lr and RunConfig().train.ivon.ess == IVONConfig().ess  # a copy
    with pytest.raises(ValueError, match="unknown setting 'train.ivon.esss'"):
        RunConfig().override({"train.ivon.esss": 1.0})
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("nope")


def test_presets_hold_the_values_their_results_were_measured_with():
    overfit = preset_config("overfit", seed=2)
    assert (overfit.data.task, overfit.data.n_train, overfit.train.steps, overfit.train.batch_size) == ("sst2", 96, 360, 8)
    assert overfit.train.ivon == IVONConfig(lr=0.03, ess=1e7, hess_init=3e-4, clip_radius=1e-3) == IVON_RECIPE
    assert overfit.override(IVON_AUTOMATIC).train.ivon.automatic and not IVON_RECIPE.automatic
    assert RunConfig().train.ivon.automatic and preset_config("demo").train.ivon.automatic  # the default
    assert overfit.train.adamw_lr == 1e-3 and overfit.seed == 2
    unsaturated = preset_config("unsaturated").train  # issue 39's setting: 384 examples, 3 epochs of batch 8
    assert (preset_config("unsaturated").data.n_train, unsaturated.steps, unsaturated.batch_size) == (384, 144, 8)
    assert (unsaturated.adamw_lr, unsaturated.lr_schedule) == (2e-4, "linear")
    # The seeds' per-task IVON values (DESIGN.md §4) apply under the paper preset, and overrides win over them.
    expected = {"winogrande_s": (1e7, 3e-4), "winogrande_m": (1e8, 3e-4), "boolq": (1e7, 3e-4),
                "arc_challenge": (1e6, 1e-3), "arc_easy": (1e6, 1e-3), "obqa": (1e6, 1e-3)}
    for task, (ess, hess_init) in expected.items():
        ivon = preset_config("paper", task).train.ivon
        assert (ivon.ess, ivon.hess_init) == (ess, hess_init), task
    assert preset_config("paper", "obqa", overrides={"train.ivon.ess": 5.0}).train.ivon.ess == 5.0
    paper = preset_config("paper", "boolq")
    assert (paper.quantization, paper.train.batch_size, paper.train.steps, paper.train.adamw_lr) == ("8bit", 4, 10_000, 5e-5)
    assert paper.train.lr_schedule == "linear" and overfit.train.lr_schedule == "constant"
    demo = preset_config("demo")
    assert (demo.data.n_train, demo.data.n_test, demo.data.n_validation, demo.train.steps, demo.eval.n_samples) == (
        32, 48, 24, 36, 4)
    assert demo.eval.tune_taus == (0.0, 0.5, 1.0, 2.0)  # the demo's τ* grid, for its 5 minutes
    generation = preset_config("generation")
    assert (generation.data.task, generation.laplace.fisher, generation.laplace.prior) == ("arithmetic", "mc", "validation")
    assert generation.train.ivon.lr * generation.train.ivon.clip_radius == pytest.approx(generation.train.adamw_lr)
    paper_generation = preset_config("generation_paper")
    assert (paper_generation.data.task, paper_generation.quantization, paper_generation.train.adamw_lr) == (
        "nq_open", "8bit", 5e-5)
    assert set(PRESETS) == {"overfit", "unsaturated", "paper", "demo", "demo_quick", "generation", "generation_paper"}

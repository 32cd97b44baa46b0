"""The benchmark scripts start and run end to end with a tiny random Llama standing in for the real model."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from bayes_peft.experiments.evidence_study import EVIDENCE_VARIANTS
from bayes_peft.experiments.methods import METHODS

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name):
    """A benchmark script as a module; scripts import only the library, never each other."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paper_preset_runs_a_few_steps_on_a_tiny_llama(tiny_llama_dir, tmp_path):
    compare = _script("compare")
    argv = ["--preset", "paper", "--model", str(tiny_llama_dir), "--tasks", "winogrande_s", "--seeds", "1",
            "--steps", "2", "--n-test", "6", "--n-train", "16", "--n-validation", "8", "--out", str(tmp_path),
            "--no-progress"]
    results = compare.main(argv)
    runs = results["winogrande_s"][0]
    assert set(runs) == set(METHODS)
    saved = json.loads((tmp_path / "paper" / "winogrande_s" / "seed0" / "results.json").read_text())
    assert saved["config"]["quantization"] == "8bit" and saved["config"]["train"]["ivon"]["ess"] == 1e7
    assert saved["config"]["train"]["steps"] == 2 and saved["config"]["train"]["batch_size"] == 4
    assert saved["config"]["train"]["lr_schedule"] == "linear"  # both papers decay AdamW's rate to 0
    assert all(r.metrics.n == 6 for r in runs.values())
    # The checkpoints are reused: a second run trains nothing.
    again = compare.main(argv)["winogrande_s"][0]
    assert again["AdamW (MAP)"].metrics == runs["AdamW (MAP)"].metrics
    assert again["IVON@mean"].metrics == runs["IVON@mean"].metrics
    table = (tmp_path / "paper.md").read_text()
    assert "| IVON | 1 / none / S forward | ACC |" in table and "| LoRA ensemble | M / none / M forward | ACC |" in table
    assert table.count("| ECE×100 (10 bins) |") == len(METHODS)
    # Two steps leave IVON's Hessian at hess_init, so its σ is the 1/√(ess·hess_init) ivon_noise predicts.
    noise = _script("ivon_noise").noise_scale(tmp_path / "paper" / "winogrande_s" / "seed0")
    assert noise["median σ"] == pytest.approx(noise["predicted σ"], rel=1e-2)
    assert noise["rms lora_A"] > 0 and noise["σ / rms lora_B"] > 0


def test_overfit_preset_and_its_trajectory_run_a_few_steps_on_a_tiny_llama(tiny_llama_dir, tmp_path):
    compare, trajectory = _script("compare"), _script("trajectory")
    common = ["--preset", "overfit", "--model", str(tiny_llama_dir), "--steps", "2", "--n-test", "6",
              "--n-validation", "8", "--out", str(tmp_path), "--no-progress"]
    runs = compare.main(common + ["--seeds", "1"])["sst2"][0]
    assert set(runs) == set(METHODS)
    saved = json.loads((tmp_path / "overfit" / "sst2" / "seed0" / "results.json").read_text())["config"]
    assert saved["data"]["n_train"] == 96 and saved["train"]["batch_size"] == 8 and saved["train"]["steps"] == 2

    stages = trajectory.main(common + ["--every", "1", "--plot", str(tmp_path / "trajectory.png")])
    assert list(stages) == [1, 2] and all(set(r) == set(METHODS) for r in stages.values())
    # Trained stage by stage (1 step, then 1 more from the saved state), the same as 2 steps at once.
    for method in ("AdamW (MAP)", "IVON@mean", "SWA"):
        assert stages[2][method].metrics == runs[method].metrics, method
    assert (tmp_path / "trajectory.png").read_bytes()[:4] == b"\x89PNG"
    again = trajectory.main(common + ["--every", "1", "--plot", str(tmp_path / "again.png")])  # reuses every stage
    assert again[1]["IVON"].metrics == stages[1]["IVON"].metrics


def test_tau_sweep_runs_every_gaussian_method_over_seeds_and_plots(tiny_llama_dir, tmp_path):
    from bayes_peft.config import preset_config
    from bayes_peft.experiments.compare import compare

    sweep = _script("tau_sweep")
    argv = ["--preset", "paper", "--model", str(tiny_llama_dir), "--task", "winogrande_s", "--seeds", "2",
            "--methods", "IVON", "LA-KFAC validation", "--steps", "2", "--n-test", "6", "--n-train", "16",
            "--n-validation", "8", "--taus", "0", "0.5", "1", "--samples", "2", "--out", str(tmp_path),
            "--plot", str(tmp_path / "tau.png"), "--no-progress"]
    sweeps = sweep.main(argv)
    assert list(sweeps) == ["IVON", "LA-KFAC validation"]
    assert all(len(runs) == 2 and all(run.taus == [0, 0.5, 1] for run in runs) for runs in sweeps.values())
    assert (tmp_path / "tau.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "tau_sweep.json").read_text())
    assert [row["tau"] for row in saved["IVON"]["1"]] == [0, 0.5, 1]
    # τ = 0 is IVON@mean: every sample is the mean.
    config = preset_config("paper", "winogrande_s", 1, {"model": str(tiny_llama_dir), "train.steps": 2,
                                                         "data.n_test": 6, "data.n_train": 16, "data.n_validation": 8,
                                                         "eval.n_samples": 2, "progress": False})
    at_mean = compare(config, tmp_path / "paper" / "winogrande_s" / "seed1", ["IVON@mean"], log=lambda _: None)
    torch.testing.assert_close(sweeps["IVON"][1].predictions[0].probs, at_mean["IVON@mean"].prediction.probs)
    assert (tmp_path / "paper" / "winogrande_s" / "seed1" / "tau_sweep.json").exists()


def test_laplace_prior_splits_the_logit_variance_into_its_layers(gpt2_style_tokenizer):
    """The lora_A and lora_B shares that laplace_prior.py prints add up to the whole linearized variance."""
    from bayes_peft.laplace import fit_laplace
    from bayes_peft.laplace.diagnostics import logit_difference_variance, variance_by_layer_kind
    from bayes_peft.data.tasks import Example, Task
    from conftest import tiny_llama_lora

    model = tiny_llama_lora(vocab_size=len(gpt2_style_tokenizer)).eval()
    task = Task("toy2", [" A", " B"], train=[Example("Q: ", w, " Answer:", i % 2) for i, w in
                                           enumerate(["good", "bad", "fine film", "dull", "great", "weak"])], test=[])
    batches = list(task.loader(gpt2_style_tokenizer, batch_size=3, shuffle=False))
    posterior = fit_laplace(model, batches, n_kfac=2, prior=0.5, progress=False)
    split = variance_by_layer_kind(posterior, batches)
    assert min(split.values()) > 0
    assert sum(split.values()) == pytest.approx(logit_difference_variance(posterior, batches), rel=1e-6)


def test_the_paper_preset_shift_evaluation_runs_end_to_end_on_a_tiny_llama(tiny_llama_dir, tmp_path):
    """OBQA → ARC-C, ARC-E, MMLU chemistry and physics: every method, two steps, 6 examples a set and 8 of OBQA's
    validation examples for what is chosen on validation, 2 samples."""
    ood = _script("ood")
    runs = ood.main(["--preset", "paper", "--model", str(tiny_llama_dir), "--seeds", "1", "--steps", "2",
                     "--n-test", "6", "--n-train", "16", "--n-validation", "8", "--samples", "2",
                     "--out", str(tmp_path), "--no-progress"])[0]
    shifted = ["arc_challenge", "arc_easy", "mmlu_college_chemistry", "mmlu_college_physics"]
    for method, result in runs.items():
        assert list(result.ood) == shifted
        for name in shifted:
            assert result.ood[name].metrics.n == 6
            detection = result.ood[name].detection
            assert all(0 <= d["auroc"] <= 1 and 0 <= d["fpr_at_95_tpr"] <= 1 for d in detection.values())
            # The predictives that average samples (of weights or of logits) split their uncertainty.
            has_split = METHODS[method].predictive != "mean"
            assert ("mutual_information" in detection) == has_split, method
    markdown = (tmp_path / "ood_paper.md").read_text()
    assert markdown.count("| IVON |") == 3 and "mmlu_college_physics AUROC (MI)" in markdown
    saved = json.loads((tmp_path / "ood_paper.json").read_text())
    assert saved["0"]["IVON"]["ood"]["arc_easy"]["metrics"]["n"] == 6
    assert (tmp_path / "ood_paper.png").read_bytes()[:4] == b"\x89PNG"


def test_the_overfit_preset_puts_other_domains_texts_in_the_sst2_prompt(tiny_llama_dir, tmp_path):
    ood = _script("ood")
    runs = ood.main(["--preset", "overfit", "--model", str(tiny_llama_dir), "--seeds", "1", "--steps", "2",
                     "--n-test", "6", "--methods", "AdamW (MAP)", "IVON", "--out", str(tmp_path),
                     "--no-progress"])[0]
    for result in runs.values():
        assert list(result.ood) == ["mmlu_questions", "boolq_passages"]
        assert all(r.metrics is None for r in result.ood.values())  # placeholder labels: no accuracy
        assert all(len(r.prediction.probs) == 136 for r in result.ood.values())
    assert "FPR@95" in (tmp_path / "ood_overfit.md").read_text()


def test_the_gpu_check_runs_every_part_on_a_cpu(capsys):
    """`gpu_check.py --dry-run` goes through every line the GPU run uses but CUDA's, so that the GPU call
    cannot fail on a typo: a verdict line per criterion, and the paper preset's smoke run through the run layer."""
    assert _script("gpu_check").main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    for criterion in ("IVON optimizer step ÷ fused AdamW's", "host synchronisations per IVON step: 0 (target ≤ 0)",
                      "whole training step IVON ÷ AdamW", "Laplace fit (MC Fisher, C = 2) ÷ one training epoch",
                      "sample (S = 10) ÷ mean evaluation", "linearized ÷ mean evaluation, C = 2",
                      "linearized ÷ mean evaluation, C = 4"):
        assert f"dry-run {criterion}" in out, criterion
    assert f"PASS    paper preset smoke run (8bit quantization): {len(METHODS)} of {len(METHODS)} methods" in out
    from bayes_peft.experiments.generation import GENERATION_METHODS

    n = len(GENERATION_METHODS)
    assert f"PASS    generation_paper preset smoke run (8bit quantization): {n} of {n} methods" in out
    assert "FAIL" not in out


def test_the_evidence_study_runs_both_settings_and_factorings_on_a_tiny_llama(tiny_llama_dir, tmp_path):
    study = _script("evidence_study")
    argv = ["--preset", "overfit", "--model", str(tiny_llama_dir), "--steps", "2", "--n-test", "6",
            "--epochs", "0.1", "--out", str(tmp_path), "--plot", str(tmp_path / "evidence.png"), "--no-progress"]
    results = study.main(argv)
    assert list(results) == ["ours", "papers'"]
    # 96 examples: 12 steps an epoch of batch 8 and 24 of the papers' batch 4, so epoch 0.1 is step 1, or 2 of 4.
    for setting, step in (("ours", 1), ("papers'", 2)):
        points = results[setting]
        assert [(p.factoring, p.step) for p in points] == [("ours", step), ("laplace-lora", step)]
        assert all(p.epoch == pytest.approx(0.1, abs=0.02) for p in points)
        assert all(0 < p.p_one_minus_p < 1 for p in points)
        assert all(list(p.metrics) == ["MAP", *EVIDENCE_VARIANTS, "validation"] for p in points)
        assert all(lam > 0 for p in points for lams in p.lambdas.values() for lam in lams)
        assert all(len(p.lambdas["centred, per kind"]) in (1, 2) and len(p.lambdas["centred span"]) == 1
                   for p in points)
        assert all(m.n == 6 for p in points for m in p.metrics.values())
    assert (tmp_path / "evidence.png").read_bytes()[:4] == b"\x89PNG"
    path = tmp_path / "overfit" / "sst2" / "seed0" / "evidence_study" / "evidence_study.json"
    saved = json.loads(path.read_text())
    assert set(saved) == {"ours", "papers'"} and len(saved["ours"]) == 2
    # A later run of one setting and one factoring reuses its checkpoints, refits what it ran, keeps the rest.
    again = study.main(argv + ["--settings", "ours", "--factorings", "ours", "--refit"])
    assert list(again) == ["ours", "papers'"] and again["papers'"][0].metrics == results["papers'"][0].metrics
    assert [p.factoring for p in again["ours"]] == ["laplace-lora", "ours"]
    assert again["ours"][0].metrics == results["ours"][1].metrics  # laplace-lora's point, kept from the JSON
    assert again["ours"][1].lambdas == results["ours"][0].lambdas  # ours, computed again
    assert set(json.loads(path.read_text())) == {"ours", "papers'"}


def test_the_evidence_study_saves_every_point_and_a_rerun_fits_only_the_missing(tiny_llama_dir, tmp_path, monkeypatch):
    study = _script("evidence_study")
    from bayes_peft.experiments import evidence_study

    argv = ["--preset", "overfit", "--model", str(tiny_llama_dir), "--steps", "2", "--n-test", "4", "--epochs", "0.1",
            "--settings", "ours", "--out", str(tmp_path), "--plot", str(tmp_path / "evidence.png"), "--no-progress"]
    path = tmp_path / "overfit" / "sst2" / "seed0" / "evidence_study" / "evidence_study.json"
    fit, fitted = evidence_study._point, []

    def dies_after_the_first(name, *args):
        if fitted:
            raise KeyboardInterrupt
        fitted.append(name)
        return fit(name, *args)

    monkeypatch.setattr(evidence_study, "_point", dies_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        study.main(argv)
    saved = json.loads(path.read_text())["ours"]
    assert [p["factoring"] for p in saved] == ["ours"]  # the first point outlived the crash

    def counts(name, *args):
        # Meanwhile a run of the other setting writes its point into the same JSON.
        path.write_text(json.dumps({**json.loads(path.read_text()), "papers'": saved}))
        fitted.append(name)
        return fit(name, *args)

    fitted.clear()
    monkeypatch.setattr(evidence_study, "_point", counts)
    results = study.main(argv)
    assert fitted == ["laplace-lora"]  # ours came from the JSON
    assert [p.factoring for p in results["ours"]] == ["ours", "laplace-lora"]
    assert results["ours"][0].to_json() == saved[0]
    assert [p.to_json() for p in results["papers'"]] == json.loads(path.read_text())["papers'"] == saved


def test_shift_scores_every_severity_with_t_and_tau_from_clean_validation(tiny_llama_dir, tmp_path, monkeypatch):
    """shift.py: the clean test split (severity 0) and the typo sets 1–5 for each method and seed, in the table,
    the JSON and the plot; temperature scaling's T and IVON (τ*)'s τ are what a run without any shifted set
    fits, so the shift never enters them. --from-results rebuilds the same tables from the saved results."""
    from bayes_peft.config import preset_config
    from bayes_peft.experiments.benchmarking import mean_se
    from bayes_peft.experiments.compare import compare

    shift = _script("shift")
    methods = ["AdamW (MAP)", "Temperature scaling", "IVON (τ*)"]
    argv = ["--preset", "overfit", "--model", str(tiny_llama_dir), "--seeds", "2", "--steps", "2", "--samples", "2",
            "--methods", *methods, "--out", str(tmp_path), "--no-progress"]
    results = shift.main(argv)
    for seed in (0, 1):
        for method in methods:
            result = results[seed][method]
            assert list(result["ood"]) == [f"typos{s}" for s in (1, 2, 3, 4, 5)]
            assert result["metrics"]["n"] == 96 and all(r["metrics"]["n"] == 96 for r in result["ood"].values())
        config = preset_config("overfit", "sst2", seed, {"model": str(tiny_llama_dir), "train.steps": 2,
                                                         "data.n_test": 96, "eval.n_samples": 2, "progress": False})
        clean = compare(config, tmp_path / "overfit" / "sst2" / f"seed{seed}", methods[1:], log=lambda _: None,
                        results_file="clean.json")
        for method in methods[1:]:
            assert results[seed][method]["settings"] == clean[method].settings, method
            assert results[seed][method]["metrics"] == clean[method].metrics.as_dict(), method
    markdown = (tmp_path / "shift_overfit.md").read_text()
    assert "| method | 0 | 1 | 2 | 3 | 4 | 5 |" in markdown and markdown.count("| Temperature scaling |") == 4
    # The paired differences to temperature scaling, seed by seed: AdamW's at severity 0 by hand.
    by_hand = [100 * (results[s]["AdamW (MAP)"]["metrics"]["ece"] - results[s]["Temperature scaling"]["metrics"]["ece"])
               for s in (0, 1)]
    assert f"| AdamW (MAP) | {mean_se(by_hand, digits=1)} |" in markdown  # ECE×100 with one decimal
    saved = json.loads((tmp_path / "shift_overfit.json").read_text())
    assert saved["1"]["IVON (τ*)"]["ood"]["typos5"]["metrics"]["n"] == 96
    assert (tmp_path / "shift_overfit.png").read_bytes()[:4] == b"\x89PNG"

    (tmp_path / "shift_overfit.png").unlink()
    monkeypatch.setattr(shift, "compare", lambda *a, **k: pytest.fail("--from-results scored again"))
    rebuilt_results = shift.main(argv + ["--from-results"])
    assert rebuilt_results == {seed: json.loads(json.dumps(results[seed])) for seed in (0, 1)}
    rebuilt = (tmp_path / "shift_overfit.md").read_text()
    note, rebuilt = rebuilt.split("\n\n", 1)
    assert note.startswith("Rebuilt from each seed's saved results")
    assert rebuilt.rsplit("Total wall time", 1)[0] == markdown.rsplit("Total wall time", 1)[0]
    assert (tmp_path / "shift_overfit.png").exists()


def test_results_md_tables_are_what_their_json_renders_to(tmp_path, monkeypatch):
    """RESULTS.md's tables are rendered from benchmarks/results/ by report.py: a table edited by hand, or a
    JSON that changed without a new render, fails here. The check itself can fail: a figure changed in a
    JSON changes its table, and a table block with no renderer (or a renderer with no block) is refused."""
    report = _script("report")
    text = report.RESULTS.read_text()
    assert report.render(text) == text, "RESULTS.md is out of date: run python benchmarks/report.py"
    assert len(text.splitlines()) < 500
    assert report.main(["--check"]) == 0

    data = tmp_path / "results"
    shutil.copytree(report.DATA, data, ignore=shutil.ignore_patterns("*.png"))
    sweep = json.loads((data / "tau_sweep.json").read_text())
    sweep["IVON"]["0"][0]["nll"] += 0.1
    (data / "tau_sweep.json").write_text(json.dumps(sweep))
    monkeypatch.setattr(report, "DATA", data)
    assert report.main(["--check"]) == 1
    changed = {line for line in report.render(text).splitlines()} - set(text.splitlines())
    assert len(changed) == 1 and next(iter(changed)).startswith("| IVON | 0.667 ± 0.")
    with pytest.raises(ValueError, match=r"unknown \['nope'\], missing \[\]"):
        report.render(text + "\n<!-- table nope -->\n<!-- end table -->\n")
    with pytest.raises(ValueError, match=r"unknown \[\], missing \['gpu'\]"):
        report.render(text.replace("<!-- table gpu -->", "<!-- gpu -->"))


def test_the_generation_benchmark_runs_every_method_on_a_tiny_llama(tiny_llama_dir, tmp_path):
    from bayes_peft.experiments.generation import GENERATION_METHODS

    saved = _script("generation").main(["--model", str(tiny_llama_dir), "--seeds", "1", "--steps", "2",
                                         "--n-train", "8", "--n-test", "3", "--n-validation", "4", "--out",
                                         str(tmp_path / "runs"), "--results", str(tmp_path), "--no-progress"])
    run = saved["seeds"]["0"]
    assert set(run) == set(GENERATION_METHODS)
    for name, result in run.items():
        assert result["test"]["n"] == 3 and result["shifts"]["hard"]["n"] == 3, name
        assert set(result["levels"]) <= {"easy", "medium"} and result["seconds"] > 0
    assert run["Temperature scaling"]["temperature"] != 1.0
    assert json.loads((tmp_path / "generation_generation.json").read_text())["seeds"]["0"].keys() == run.keys()
    assert (tmp_path / "generation_generation_risk_coverage.png").exists()
    assert (tmp_path / "generation_generation_reliability.png").exists()
    assert "| method | EM | ECE×100 |" in (tmp_path / "generation_generation.md").read_text()



def test_the_fsdp_recipe_trains_evaluates_and_saves_on_two_ranks(tiny_llama_dir, tmp_path):
    """`torchrun --nproc-per-node 2 benchmarks/fsdp.py` (gloo on a CPU): every rank trains its shard of the
    sharded model, the metrics cover the whole test split, and the posterior rank 0 saved loads in one process."""
    import os
    import subprocess
    import sys

    import bayes_peft as bp

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(BENCHMARKS.parent)}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(BENCHMARKS / "fsdp.py"), "--model", str(tiny_llama_dir), "--steps", "2", "--n-train", "8",
         "--n-test", "7", "--samples", "2", "--out", str(tmp_path / "out"), "--results", str(tmp_path),
         "--no-progress"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "fsdp_overfit.json").read_text())
    assert result["ranks"] == 2 and result["backend"] == "gloo" and result["batch_per_rank"] == 4
    assert {m: r["n"] for m, r in result["metrics"].items()} == {"mean": 7, "sample": 7}
    assert "IVON (mean): acc" in run.stdout
    model, _ = bp.load_model(str(tiny_llama_dir))
    posterior = bp.PosteriorLoRA.load(tmp_path / "out" / "posterior", model)
    assert posterior.training["steps"] == 2
    adapted, _ = bp.load_model(str(tiny_llama_dir), adapter=tmp_path / "out" / "posterior")  # written by rank 0 alone
    weights = {n: p for n, p in adapted.named_parameters() if n in posterior.names}
    assert len(weights) == len(posterior.names)
    assert all(torch.equal(weights[n], m) for n, m in posterior.mean_weights().items())


def test_ivon_auto_rescores_the_automatic_rows_alone_and_keeps_the_others(tiny_llama_dir, tmp_path):
    ivon_auto = _script("ivon_auto")
    argv = ["--preset", "overfit", "--model", str(tiny_llama_dir), "--steps", "2", "--n-test", "6",
            "--n-validation", "8", "--grid", "1e5", "1e7", "--out", str(tmp_path / "runs"),
            "--results", str(tmp_path), "--no-progress"]
    first = ivon_auto.main(argv + ["--seed-list", "0"])["seeds"]["0"]
    assert first["grid_pick"] in ("100000", "1e+07") and set(first["grid_validation_nll"]) == {"100000", "1e+07"}
    assert first["training"]["IVON automatic (τ = 1)"]["ess"] > 0 and "rescored" not in first

    seed = tmp_path / "runs" / "overfit" / "seed0"
    for folder in ("adamw", "ess100000", "ess1e+07", "automatic"):
        shutil.rmtree(seed / folder)  # a stage that is run again would train again and leave its folder
    again = ivon_auto.main(argv + ["--seed-list", "0", "--only-automatic"])["seeds"]["0"]
    assert sorted(p.name for p in seed.iterdir()) == ["automatic"]
    assert again["rescored"] == ["IVON automatic (τ = 1)", "IVON automatic (τ*)"]
    assert again["rows"] == first["rows"] and list(again["rows"]) == list(first["rows"])  # a deterministic retraining
    assert {k: again[k] for k in first} == first
    with pytest.raises(SystemExit):  # seed 1 has no other rows to keep
        ivon_auto.main(argv + ["--seed-list", "1", "--only-automatic"])

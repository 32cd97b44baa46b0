"""Every bayes-peft subcommand on a tiny random Llama and a small local dataset file."""

import json
import warnings

import pytest

from bayes_peft.cli import main

ROWS = [{"sentence": s, "label": i % 2} for i, s in enumerate(
    ["dull", "lovely", "flat and long", "a joy", "boring plot", "superb acting", "weak", "moving", "bad", "great"])]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "reviews.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS))
    return ["--task", "sst2", "--train-file", str(path), "--test-file", str(path), "--batch-size", "4",
            "--no-progress"]


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def test_train_laplace_evaluate_sweep(tiny_llama_dir, tmp_path, data, capsys):
    model = ["--model", str(tiny_llama_dir)]
    for optimizer in ("adamw", "ivon", "swag", "adamw_lm_head"):
        assert main(["train", *model, *data, "--optimizer", optimizer, "--steps", "3", "--out",
                     str(tmp_path / optimizer), "--json"]) == 0
        assert _json(capsys)["steps"] == 3 and (tmp_path / optimizer / "adapter_model.safetensors").exists()
    assert (tmp_path / "ivon" / "posterior.safetensors").exists() and (tmp_path / "swag" / "posterior.safetensors").exists()
    assert (tmp_path / "adamw" / "checkpoint_ensemble" / "ensemble.safetensors").exists()  # 2 steps an epoch: steps 2, 3

    # Last-layer Laplace: over the output layer's LoRA alone.
    assert main(["laplace", *model, *data, "--adapter", str(tmp_path / "adamw_lm_head"), "--modules", "lm_head",
                 "--prior", "1", "--out", str(tmp_path / "llla"), "--json"]) == 0
    assert _json(capsys)["n_examples"] == 8
    saved = json.loads((tmp_path / "llla" / "posterior.json").read_text())["names"]
    assert len(saved) == 2 and all(".lm_head.lora_" in n for n in saved)

    assert main(["laplace", *model, *data, "--adapter", str(tmp_path / "adamw"), "--n-kfac", "4",
                 "--out", str(tmp_path / "la"), "--json"]) == 0
    fitted = _json(capsys)
    assert fitted["n_examples"] == 8  # the library's default holds out 20% as validation
    assert fitted["prior"] == "validation" and 0 < fitted["mean_p_one_minus_p"] < 1
    _the_cli_and_the_library_choose_the_same_default_prior(model, data, tmp_path, fitted["prior_precision"])
    assert main(["laplace", *model, *data, "--adapter", str(tmp_path / "adamw"), "--structure", "diag",
                 "--prior", "validation", "--out", str(tmp_path / "la_diag"), "--json"]) == 0
    assert _json(capsys)["n_examples"] == 8

    results = {}
    for adapter, posterior, method in (("adamw", None, "mean"), ("adamw", "la", "linearized"),
                                       ("ivon", "ivon", "sample"), ("swag", "swag", "sample"),
                                       ("adamw_lm_head", "llla", "linearized"),
                                       ("adamw", "adamw/checkpoint_ensemble", "sample")):
        extra = ["--posterior", str(tmp_path / posterior)] if posterior else []
        assert main(["evaluate", *model, *data, "--adapter", str(tmp_path / adapter), *extra, "--method", method,
                     "--samples", "2", "--reliability", str(tmp_path / f"{method}.png"), "--json"]) == 0
        results[f"{adapter} {posterior} {method}"] = _json(capsys)
        assert (tmp_path / f"{method}.png").exists()
    assert all(r["n"] == len(ROWS) and 0 <= r["acc"] <= 1 for r in results.values())

    # Out-of-distribution inputs (MMLU questions and a user's texts in the SST-2 prompt) and τ from validation.
    (tmp_path / "other.txt").write_text("the mitochondria is the powerhouse of the cell\nsolve for x: 2x = 4\n")
    ivon = [*model, *data, "--adapter", str(tmp_path / "ivon"), "--posterior", str(tmp_path / "ivon"),
            "--method", "sample", "--samples", "2", "--ood", "mmlu_questions", str(tmp_path / "other.txt"), "--ood-n", "8",
            "--val-split", "0.3", "--tune-tau", "--taus", "0", "0.5", "--risk-coverage", str(tmp_path / "rc.png")]
    assert main(["evaluate", *ivon, "--json"]) == 0
    result = _json(capsys)
    assert result["tau"] in (0, 0.5) and result["n"] == len(ROWS) and (tmp_path / "rc.png").exists()
    assert result["ood"]["mmlu_questions"]["n"] == 8 and result["ood"][str(tmp_path / "other.txt")]["n"] == 2
    detection = result["ood"]["mmlu_questions"]["detection"]
    assert set(detection) == {"max_prob", "entropy", "expected_entropy", "mutual_information"}
    assert all(0 <= d["auroc"] <= 1 for d in detection.values()) and "metrics" not in result["ood"]["mmlu_questions"]
    assert set(result["selective"]["max_prob"]) == {"aurc", "accuracy_at_coverage"}
    assert main(["evaluate", *ivon]) == 0
    assert "ood mmlu_questions (n=8): AUROC by max_prob" in capsys.readouterr().out

    assert main(["sweep", *model, *data, "--adapter", str(tmp_path / "ivon"), "--posterior", str(tmp_path / "ivon"),
                 "--method", "linearized", "--taus", "0", "1", "--plot", str(tmp_path / "tau.png"), "--json"]) == 0
    assert [row["tau"] for row in _json(capsys)["sweep"]] == [0, 1] and (tmp_path / "tau.png").exists()


def _the_cli_and_the_library_choose_the_same_default_prior(model, data, tmp_path, cli_prior):
    """``bayes-peft laplace`` without --prior, and ``fit_laplace`` with its defaults on the same split, choose
    the same λ: both the validation prior, as a validation split exists."""
    import inspect

    from bayes_peft.cli import _parser, run_config
    from bayes_peft.config import LaplaceConfig
    from bayes_peft.laplace import fit_laplace
    from bayes_peft.experiments.runs import open_checkpoint

    assert inspect.signature(fit_laplace).parameters["prior"].default == LaplaceConfig().prior == "auto"
    args = _parser().parse_args(["laplace", *model, *data, "--adapter", str(tmp_path / "adamw"), "--n-kfac", "4",
                                 "--out", str(tmp_path / "unused")])
    config = run_config(args)
    assert config.laplace.prior == "auto"
    paths = {"train": args.train_file, "test": args.test_file}
    checkpoint = open_checkpoint(config, tmp_path / "adamw", config.load_task(paths))
    fit = {prior: fit_laplace(checkpoint.model, checkpoint.loader("train"), n_kfac=4, progress=False,
                              val_loader=checkpoint.loader("validation"), **({} if prior is None else {"prior": prior}))
           for prior in (None, "validation", "evidence")}
    assert set(fit[None].prior_precision.values()) == set(fit["validation"].prior_precision.values()) == {cli_prior}
    assert set(fit["evidence"].prior_precision.values()) != {cli_prior}


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--task", "nope", "--adapter", "x"], "unknown task 'nope'"),
    (["evaluate", "--task", "sst2", "--adapter", "/no/such/adapter"], "holds no PEFT adapter"),
    (["train", "--task", "sst2", "--train-file", "/no/file.jsonl", "--test-file", "/no/file.jsonl", "--out", "x"],
     "does not exist"),
    (["train", "--task", "sst2", "--train-file", "a.jsonl", "--out", "x"], "give both --train-file"),
    (["evaluate", "--task", "sst2", "--adapter", "x", "--ood", "arc_easy"], "a shift needs the same label words"),
    (["evaluate", "--task", "sst2", "--adapter", "x", "--ood", "/no/texts.txt"], "neither one of"),
    (["evaluate", "--task", "sst2", "--adapter", "x", "--val-split", "0", "--tune-tau"], "--tune-tau needs a validation split"),
    (["laplace", "--task", "sst2", "--adapter", "x", "--prior", "-1", "--out", "y"], "--prior must be auto, evidence"),
])
def test_user_mistakes_get_one_line_and_exit_code_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_preset_starts_the_configuration_and_the_command_line_overrides_it():
    """``--preset overfit`` gives the benchmark's data draw and training (so that ``laplace`` fits a benchmark
    checkpoint on its own 96 examples), and options given beside it win."""
    from bayes_peft.cli import _parser, run_config
    from bayes_peft.config import RunConfig, preset_config

    args = _parser().parse_args(["laplace", "--preset", "overfit", "--task", "sst2", "--adapter", "a", "--out", "b"])
    assert run_config(args) == preset_config("overfit", "sst2", overrides={"progress": True})
    args = _parser().parse_args(["train", "--preset", "overfit", "--task", "sst2", "--steps", "5", "--seed", "2",
                                 "--n-train", "40", "--out", "x"])
    config = run_config(args)
    assert (config.seed, config.train.steps, config.data.n_train, config.train.batch_size) == (2, 5, 40, 8)
    plain = run_config(_parser().parse_args(["train", "--task", "sst2", "--out", "x"]))
    assert plain == RunConfig().override({"data.task": "sst2", "progress": True})


def test_a_warning_prints_whole_on_stderr_beside_a_progress_bar(capsys):
    """The CLI prints each warning as one `Category: message` line through tqdm, never Python's default
    source-line form, and gives the default back when it returns."""
    from tqdm import tqdm

    from bayes_peft.cli import _warnings_as_whole_lines
    from bayes_peft.laplace import SaturatedFitWarning

    shown_before = warnings.showwarning
    with _warnings_as_whole_lines(), tqdm(total=2, desc="fit") as bar:
        bar.update()
        warnings.warn("the evidence prior on saturated fitting data: the model is certain", SaturatedFitWarning)
        bar.update()
    assert warnings.showwarning is shown_before
    captured = capsys.readouterr()
    assert "SaturatedFitWarning: the evidence prior on saturated fitting data: the model is certain\n" in captured.err
    assert "warnings.warn(" not in captured.err and captured.out == ""


def test_train_on_answers_and_generate_with_a_confidence(tiny_llama_dir, tmp_path, capsys):
    """``bayes-peft train --task qa`` with a user's prompt/answer files, then ``generate`` on a prompts file."""
    rows = [{"prompt": f"Review: {s} Sentiment:", "answer": "positive" if i % 2 else "negative"}
            for i, (s) in enumerate(r["sentence"] for r in ROWS)]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    model = ["--model", str(tiny_llama_dir)]
    assert main(["train", *model, "--task", "qa", "--train-file", str(path), "--test-file", str(path),
                 "--optimizer", "ivon", "--steps", "2", "--batch-size", "4", "--out", str(tmp_path / "ivon"),
                 "--no-progress", "--json"]) == 0
    assert _json(capsys)["steps"] == 2
    (tmp_path / "prompts.txt").write_text("Review: a joy Sentiment:\nReview: dull Sentiment:\n")
    run = ["generate", *model, "--adapter", str(tmp_path / "ivon"), "--posterior", str(tmp_path / "ivon"),
           "--prompts", str(tmp_path / "prompts.txt"), "--samples", "2", "--max-new-tokens", "3", "--no-progress"]
    assert main([*run, "--json"]) == 0
    result = _json(capsys)
    assert result["method"] == "sample" and result["n_samples"] == 2
    assert [a["prompt"] for a in result["answers"]] == ["Review: a joy Sentiment:", "Review: dull Sentiment:"]
    assert all(0 < a["confidence"] <= 1 and len(a["samples"]) == 2 for a in result["answers"])
    assert main(run) == 0
    assert "confidence" in capsys.readouterr().out
    assert main(["generate", *model, "--adapter", str(tmp_path / "ivon"), "--prompts", str(tmp_path / "prompts.txt"),
                 "--method", "sample"]) == 2
    assert "--method sample needs --posterior" in capsys.readouterr().err

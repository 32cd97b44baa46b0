"""The training loop's checkpoints: an interrupted run resumes exactly, a failed write never replaces a good
file, and corrupt or mismatched files get a clear error."""

import json

import pytest
import torch

from bayes_peft.cli import main
from bayes_peft.data.tasks import Task
from bayes_peft.experiments.training import CheckpointError, load_checkpoint, make_optimizer, save_checkpoint
from conftest import tiny_llama_lora

ROWS = [{"sentence": s, "label": i % 2} for i, s in enumerate(
    ["dull", "lovely", "flat and long", "a joy", "boring plot", "superb acting", "weak", "moving"])]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "reviews.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS))
    return ["--task", "sst2", "--train-file", str(path), "--test-file", str(path), "--batch-size", "2",
            "--no-progress", "--json"]


def _interrupt_on_call(monkeypatch, n):
    original, calls = Task.loss, {"n": 0}

    def loss(self, model, batch):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return original(self, model, batch)

    monkeypatch.setattr(Task, "loss", loss)


def test_interrupted_cli_training_resumes_exactly(tiny_llama_dir, tmp_path, data, monkeypatch, capsys):
    from safetensors.torch import load_file

    train = ["train", "--model", str(tiny_llama_dir), *data, "--optimizer", "ivon", "--steps", "8", "--save-every", "2"]
    assert main([*train, "--out", str(tmp_path / "straight")]) == 0

    _interrupt_on_call(monkeypatch, 6)  # Ctrl-C in step 6: the checkpoint of step 4 must survive
    assert main([*train, "--out", str(tmp_path / "cut")]) == 130
    assert "the last checkpoint is intact" in capsys.readouterr().err
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4
    monkeypatch.undo()
    assert main([*train, "--out", str(tmp_path / "cut")]) == 0
    a = load_file(str(tmp_path / "straight" / "posterior.safetensors"))
    b = load_file(str(tmp_path / "cut" / "posterior.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_failed_write_never_replaces_a_good_checkpoint(tmp_path, monkeypatch):
    model = tiny_llama_lora()
    opt = make_optimizer("ivon", model, lr=0.05, ess=1e3)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, opt, None, step=2, losses=[1.0, 0.9])

    def broken_save(obj, f):
        with open(f, "wb") as handle:
            handle.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, opt, None, step=4, losses=[1.0, 0.9, 0.8, 0.7])
    monkeypatch.undo()
    assert load_checkpoint(path, model, opt, None)[0] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left behind


def test_corrupt_or_mismatched_files_get_a_clear_error(tiny_llama_dir, tmp_path, data, capsys):
    model = tiny_llama_lora()
    opt = make_optimizer("adamw", model, lr=1e-3)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, opt, None, step=1, losses=[1.0])
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="checkpoint.pt is not a readable training checkpoint"):
        load_checkpoint(path, model, opt, None)
    save_checkpoint(path, model, opt, None, step=1, losses=[1.0])
    other = tiny_llama_lora(r=8)
    with pytest.raises(CheckpointError, match=r"has shape \(4, 32\), the model \(8, 32\)"):
        load_checkpoint(path, other, make_optimizer("adamw", other, lr=1e-3), None)

    assert main(["train", "--model", str(tiny_llama_dir), *data, "--optimizer", "adamw", "--steps", "1",
                 "--out", str(tmp_path / "run")]) == 0
    adapter = tmp_path / "run" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:64])
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tiny_llama_dir), *data, "--adapter", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "adapter_model.safetensors does not load" in err and err.count("\n") == 1

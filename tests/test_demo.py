"""The demo runs end to end on a tiny stand-in for SmolLM2."""

from bayes_peft.cli import main


def test_demo_runs_on_a_tiny_stand_in(tiny_llama_dir, tmp_path, capsys):
    assert main(["demo", "--quick", "--model", str(tiny_llama_dir), "--steps", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "IVON@mean" in out and "LA-KFAC evidence" in out and "LA-KFAC validation" in out and "AdamW: mean confidence" in out
    assert (tmp_path / "tau_sweep.png").exists() and (tmp_path / "reliability_ivon.png").exists()

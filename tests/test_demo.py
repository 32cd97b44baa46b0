"""The demo runs end to end on a tiny stand-in for SmolLM2."""

from bayes_peft.cli import main


def test_demo_runs_on_a_tiny_stand_in(tiny_llama_dir, tmp_path, capsys):
    assert main(["demo", "--quick", "--model", str(tiny_llama_dir), "--steps", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "IVON@mean" in out and "LA-KFAC evidence" in out and "LA-KFAC validation" in out and "AdamW: mean confidence" in out
    # The baseline to beat and the τ* rows, with what each chose on validation, and one line naming the best.
    rows = {line.split("  ")[0].strip(): line for line in out.splitlines() if line.startswith(("Temperature", "IVON (τ*)",
                                                                                              "LA-KFAC evidence (τ*)"))}
    assert "temperature " in rows["Temperature scaling"] and "tau " in rows["IVON (τ*)"] and "tau " in rows["LA-KFAC evidence (τ*)"]
    summary = next(line for line in out.splitlines() if line.startswith("best NLL: "))
    assert "; best ECE: " in summary and "(AdamW " in summary
    assert (tmp_path / "tau_sweep.png").exists() and (tmp_path / "reliability_ivon.png").exists()

"""How large IVON's posterior noise is next to the LoRA weights it perturbs, for trained runs of compare.py.

IVON's posterior standard deviation is σ = 1/√(ess·(h + δ)) (δ the weight decay, 0 here). Over a short run
with β2 = 1 − 1e-5 the Hessian estimate h barely moves from hess_init, so σ ≈ 1/√(ess·hess_init). When σ
is of the order of the weights, samples (and the training that sees them) are mostly noise. For each run
directory this prints that prediction, the measured σ and the size of the mean weights, lora_A and lora_B
apart.

    python benchmarks/ivon_noise.py benchmarks/results/compare/overfit/sst2/seed0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def noise_scale(run_dir: Path) -> dict[str, float]:
    """``run_dir`` holds compare.py's ``results.json`` and the IVON posterior under ``ivon/``."""
    # What the run chose (posterior.json's "training", also under IVON's automatic rule), else what it was given
    ivon = (json.loads((run_dir / "ivon" / "posterior.json").read_text()).get("training")
            or json.loads((run_dir / "results.json").read_text())["config"]["train"]["ivon"])
    tensors = load_file(run_dir / "ivon" / "posterior.safetensors")
    row = {"ess": ivon["ess"], "hess_init": ivon["hess_init"], "predicted σ": (ivon["ess"] * ivon["hess_init"]) ** -0.5}
    stds = torch.cat([t.flatten() for k, t in tensors.items() if k.startswith("variance.")]).sqrt()
    row["median σ"] = stds.median().item()
    for kind in ("lora_A", "lora_B"):
        means = torch.cat([t.flatten() for k, t in tensors.items() if k.startswith("mean.") and f".{kind}." in k])
        row[f"rms {kind}"] = means.pow(2).mean().sqrt().item()
        row[f"σ / rms {kind}"] = row["median σ"] / row[f"rms {kind}"]
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="compare.py's <out>/<preset>/<task>/seed<k>")
    args = parser.parse_args(argv)
    rows = {str(d): noise_scale(d) for d in args.run_dirs}
    columns = list(next(iter(rows.values())))
    print("| run | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:.3g}" for c in columns) + " |")


if __name__ == "__main__":
    main()

"""The README's runnable example must keep running as the API changes."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    runnable = [b for b in blocks if "opt.step()" in b and "model =" in b]
    assert runnable, "the README lost its runnable example"
    namespace: dict = {}
    exec(compile(runnable[0], str(README), "exec"), namespace)
    p_mean, p_bayes = namespace["p_mean"], namespace["p_bayes"]
    assert p_mean.shape == p_bayes.shape == (256, 2)
    # Trained, and the sample average is a proper distribution that differs from the mean prediction.
    acc = (p_mean.argmax(-1) == namespace["y"]).float().mean()
    assert acc > 0.6
    assert (p_bayes.sum(-1) - 1).abs().max() < 1e-5
    assert not (p_bayes - p_mean).abs().max() < 1e-6


def test_the_readme_quotes_its_figures_from_results_md():
    """Every figure in the README's results paragraphs (from the overfit regime on) and in its opening
    paragraph on the demo stands in benchmarks/RESULTS.md, whose tables are rendered from the benchmarks' JSON."""
    text = README.read_text()
    results = (README.parent / "benchmarks" / "RESULTS.md").read_text().replace("-", "−")
    quoted = text[text.index("In the `overfit` regime"):text.index("## Licence")]
    demo = text[:text.index("`bayes_peft` makes")]
    figures = re.findall(r"[−-]?\d+\.\d+(?: ± \d+\.\d+)?", quoted) + re.findall(r"\b0\.\d{3}\b", demo)
    assert len(figures) > 40
    assert [f for f in figures if f.replace("-", "−") not in results] == []

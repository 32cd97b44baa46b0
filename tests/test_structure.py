"""The package's shape: its modules depend on each other one way, and a saved posterior of either backend
loads in a fresh process through the one interface."""

import ast
from pathlib import Path

import torch

PACKAGE = Path(__file__).resolve().parents[1] / "bayes_peft"


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The bayes_peft modules ``path`` imports anywhere in it (a lazy import inside a function counts)."""
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:  # `from . import distributed` imports a module, not a name
                candidate = f"{target}.{alias.name}"
                as_path = PACKAGE.parent / candidate.replace(".", "/")
                found.add(candidate if as_path.with_suffix(".py").exists() or as_path.is_dir() else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.startswith("bayes_peft") and m != module}


def test_no_module_imports_one_that_imports_it_back():
    graph = {_module(p): _imports(p) for p in PACKAGE.rglob("*.py")}
    assert "bayes_peft.linearize" in graph["bayes_peft.laplace.kfac"]  # the walk sees real edges

    def cycle_from(start):
        stack, on_path, done = [(start, iter(sorted(graph.get(start, ()))))], [start], set()
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                on_path.pop()
                done.add(node)
            elif child in on_path:
                return on_path[on_path.index(child):] + [child]
            elif child not in done:
                stack.append((child, iter(sorted(graph.get(child, ())))))
                on_path.append(child)
        return None

    cycles = [c for c in map(cycle_from, sorted(graph)) if c]
    assert not cycles, " -> ".join(cycles[0])


def test_a_saved_laplace_posterior_loads_in_a_fresh_process(tmp_path):
    """`bayes-peft evaluate --posterior runs/laplace` runs in a new process that never imported the Laplace
    code: the interface must know the backend (it once answered "unknown posterior kind 'kfac'")."""
    from bayes_peft.laplace import fit_laplace
    from conftest import load_in_fresh_process, tiny_llama_lora

    model = tiny_llama_lora(vocab_size=64)
    batch = {"input_ids": torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(0)),
             "attention_mask": torch.ones(4, 6, dtype=torch.long), "labels": torch.tensor([0, 1, 0, 1]),
             "choice_ids": torch.tensor([3, 5])}
    fit_laplace(model, [batch], n_kfac=2, prior=0.7, progress=False).save(tmp_path, adapter=False)
    report = ("type(p).__name__, isinstance(p, PosteriorLoRA), sorted(set(p.prior_precision.values())), "
              "'bayes_peft.laplace' in sys.modules")
    assert load_in_fresh_process(tmp_path, report) == "KFACPosterior True [0.7] True"


def test_scripts_and_tests_import_the_library_not_each_other_by_path():
    """Benchmark scripts and tests reach code through the installed package (and pytest's conftest), never
    by editing the import path: a script that needs another's code means that code belongs in the library."""
    root = PACKAGE.parent
    offenders = [str(p.relative_to(root)) for folder in ("benchmarks", "tests") for p in (root / folder).rglob("*.py")
                 if "sys.path" in p.read_text() and p != Path(__file__)]
    assert not offenders, offenders
    scripts = {p.stem for p in (root / "benchmarks").glob("*.py")}
    for path in (root / "benchmarks").glob("*.py"):
        imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & scripts, (path.name, imported & scripts)

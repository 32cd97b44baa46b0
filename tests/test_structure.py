"""The package's shape: its modules depend on each other one way, and a saved posterior of either backend
loads in a fresh process through the one interface."""

import ast
import importlib
import re
import sys
import warnings
from pathlib import Path

import pytest
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


# The package's layers, lowest first: a module may import from its own layer and the ones below it, never
# from one above. The package's own __init__ is the façade over all of them and stands outside the order.
LAYERS = (
    ("distributed", "models", "profiling", "sharding"),
    ("data",),
    ("config",),
    ("ivon",),
    ("posteriors", "laplace"),
    ("evaluation",),
    ("experiments", "integrations"),
    ("cli",),
)


def _layer(module: str) -> int:
    top = module.split(".")[1]
    return next(i for i, names in enumerate(LAYERS) if top in names)


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _upward(graph: dict[str, set[str]]) -> list[str]:
    """Every import in ``graph`` that runs from a module to a layer above the module's own."""
    return sorted(f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
                  for module, imports in graph.items() for target in imports
                  if target != "bayes_peft" and _layer(target) > _layer(module))


def test_every_module_belongs_to_a_layer_and_imports_none_above_its_own():
    graph = {module: imports for module, imports in _graph().items() if module != "bayes_peft"}
    assert {module.split(".")[1] for module in graph} == {name for names in LAYERS for name in names}
    assert "bayes_peft.evaluation.metrics" in graph["bayes_peft.evaluation.prediction"]  # the walk sees real edges
    assert not _upward(graph), "\n".join(_upward(graph))
    # Importing the package root from inside it would pull every layer back in through the façade.
    assert not [module for module, imports in graph.items() if "bayes_peft" in imports]


def test_the_layer_check_catches_an_upward_import_and_allows_a_downward_one():
    assert _upward({"bayes_peft.data.tasks": {"bayes_peft.evaluation.metrics", "bayes_peft.models"},
                    "bayes_peft.laplace.prior": {"bayes_peft.posteriors.link"}}) == [
        "bayes_peft.data.tasks (layer 1) imports bayes_peft.evaluation.metrics (layer 5)"]


def test_no_module_imports_one_that_imports_it_back():
    graph = _graph()
    assert "bayes_peft.posteriors.linearize" in graph["bayes_peft.laplace.kfac"]  # the walk sees real edges

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


PUBLIC_NAMES = ["Evaluator", "IVON", "Metrics", "PosteriorLoRA", "Task", "load_model", "load_task"]


def test_the_public_names_are_pinned():
    import bayes_peft as bp

    assert bp.__all__ == PUBLIC_NAMES
    assert all(getattr(bp, name).__name__ == name for name in PUBLIC_NAMES)
    assert bp.IVON is importlib.import_module("bayes_peft.ivon").IVON


def test_every_path_the_readme_names_imports_without_a_deprecation_warning():
    """`from bayes_peft.x import a, b` lines and `bayes_peft.x.y` names in the README's prose resolve, from
    the layout as it is (no moved-module alias; the old flat paths the README names as such are the next
    test's)."""
    from bayes_peft import MOVED_MODULES

    text = (PACKAGE.parent / "README.md").read_text()
    dotted = set(re.findall(r"\bbayes_peft(?:\.\w+)+", text))
    dotted |= {f"{module}.{name.strip()}" for module, names in re.findall(r"^from (bayes_peft[\w.]*) import ([\w, ]+)",
                                                                             text, flags=re.M)
               for name in names.split(",")}
    dotted = {path for path in dotted if path.split(".")[1] not in MOVED_MODULES}
    assert len(dotted) > 15  # the README names the paths users need
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for path in sorted(dotted):
            assert _resolve(path) is not None, path


def test_every_flat_path_of_the_old_layout_is_the_moved_module_with_a_deprecation_warning():
    import bayes_peft

    for old, new in bayes_peft.MOVED_MODULES.items():
        sys.modules.pop(f"bayes_peft.{old}", None)
        bayes_peft.__dict__.pop(old, None)
        with pytest.warns(DeprecationWarning, match=f"bayes_peft.{old} moved to bayes_peft.{new}"):
            module = importlib.import_module(f"bayes_peft.{old}")
        assert module is importlib.import_module(f"bayes_peft.{new}") and module.__spec__.name == f"bayes_peft.{new}"
        bayes_peft.__dict__.pop(old, None)
        with pytest.warns(DeprecationWarning, match=f"bayes_peft.{old} moved"):
            assert getattr(bayes_peft, old) is module  # `bp.metrics`, `from bayes_peft import metrics`


def _resolve(path: str):
    """The module or attribute a dotted path names: the longest importable module, then attributes."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            target = getattr(target, name)
        return target
    return None

"""The package's imports point down the layers that docs/design.md draws ("Layers and imports"), and form no cycle.

Every import of an hmlm module counts: at the top of a module, inside a function, and under `if TYPE_CHECKING`
(an annotation that names a higher module is a coupling all the same). Read from the source with `ast`, so the
check needs no import of torch and sees every branch.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hmlm"

# From the bottom. A module may import from its own layer (without a cycle) and the layers below. The first
# prefix that matches a module's name gives its layer.
LAYERS: list[tuple[str, ...]] = [
    ("hmlm.errors", "hmlm.devices", "hmlm.precision"),  # foundations
    ("hmlm.data",),  # corpora: knows nothing of the model
    ("hmlm.cell",),  # the specification: the reference step
    ("hmlm.fast.kernels",),  # a layer step's elementwise work, per backend
    ("hmlm.fast",),  # the whole sequence, forward and backward; COPY skipping
    ("hmlm.model",),  # HMLSTM, CharLM, the prior
    ("hmlm.config", "hmlm.checkpoint", "hmlm.graphs"),  # what runs and checkpoints hold; captured model calls
    ("hmlm.analysis",),  # evaluate, sample, boundaries, locks
    ("hmlm.training",),  # the trainer and what it needs
    ("hmlm.bench",),  # throughput, launches
    ("hmlm.commands", "hmlm.cli", "hmlm.__main__", "hmlm"),  # the commands' work; entry points
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    for rank, prefixes in enumerate(LAYERS):
        # "hmlm" itself is the package's __init__ only, not everything under it
        if any(module == prefix or (prefix != "hmlm" and module.startswith(prefix + ".")) for prefix in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS here and to docs/design.md")


def imports(module: str) -> set[str]:
    """The hmlm modules that `module` imports, anywhere in its source."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *base.split(".")])
                base = base.strip(".")
            # `from hmlm.fast import kernels` imports the module hmlm.fast.kernels; `from hmlm.model import CharLM`
            # imports hmlm.model
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names}
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: imports(module) for module in MODULES}


def test_every_module_is_in_a_layer():
    for module in MODULES:
        layer(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    upward = sorted(name for name in GRAPH[module] if layer(name) > layer(module))
    assert not upward, f"{module} (layer {layer(module)}) imports from higher layers: {upward}"


def test_no_import_cycles():
    cycles, state = [], dict.fromkeys(MODULES, 0)  # 0 unseen, 1 on the path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for name in sorted(GRAPH[module]):
            if state[name] == 1:
                cycles.append(path[path.index(name) :] + [name])
            elif state[name] == 0:
                visit(name, [*path, name])
        state[module] = 2

    for module in sorted(MODULES):
        if state[module] == 0:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_data_and_the_model_do_not_know_each_other():
    for module, names in GRAPH.items():
        if module.startswith("hmlm.data"):
            assert all(n == "hmlm.errors" or n.startswith("hmlm.data") for n in names), (module, names)
        if module.startswith(("hmlm.cell", "hmlm.fast", "hmlm.model")):
            assert not any(n.startswith("hmlm.data") for n in names), (module, names)


def test_the_checker_sees_imports_in_functions_and_under_type_checking(tmp_path):
    """The walk above is what the other tests rest on: an import inside a function or under TYPE_CHECKING counts."""
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from hmlm.model import CharLM\n"
    source += "def f():\n    from hmlm.fast import kernels\n"
    tree = ast.parse(source)
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert names == {"typing", "hmlm.model", "hmlm.fast"}
    assert "hmlm.model" in imports("hmlm.analysis.evaluate")  # a module-level import
    assert "hmlm.fast.kernels.cpu" in imports("hmlm.fast.kernels")  # inside a function


def test_modules_and_classes_stay_small():
    """A module that a newcomer reads in one sitting: at most 500 lines, and no class over 200."""
    too_big = []
    for module, path in MODULES.items():
        source = path.read_text()
        if source.count("\n") > 500:
            too_big.append(f"{module}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 200:
                too_big.append(f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_big, too_big

"""The package's imports flow one way: CLI, then orchestration, then training and evaluation, then data and model
surgery, then leaves. A module may import its own level or lower ones, never a higher one, and the imports within a
level form no cycle (lazy imports inside functions included, in every form: absolute, relative, `import elo_cpt`)."""

from __future__ import annotations

import ast
from pathlib import Path

import elo_cpt

PACKAGE = Path(elo_cpt.__file__).parent
LEVELS = {
    0: {"errors", "config", "configparse", "checkpoint", "costmodel", "demo", "report", "report_figures",
        "study_report", "samples", "precision", "hub", "distributed", "modelcard", "findings", "files", "report_chat"},
    1: {"corpus", "tokencache", "data", "surgery", "backward_step", "stageclock", "chatvector", "chatdata", "chattokens", "vocabulary"},
    2: {"engine", "train", "evaluation", "lmeval", "chateval", "layerprobe", "emulation"},
    3: {"pipeline", "pipeline_eval", "pipeline_stage3", "study_runner", "study_cells", "benchmark", "benchdata", "planner"},
    4: {"cli", "cli_stage1", "cli_tools", "__init__", "__main__"},
}
LEVEL = {module: level for level, modules in LEVELS.items() for module in modules}


#: A subpackage (the embedded demo, `demo/`) counts as one module, named by its folder.
SUBPACKAGES = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
MODULES = {p.stem for p in PACKAGE.glob("*.py")} | SUBPACKAGES
#: The embedded demo is a guest: only the pipeline's defaults and the `elo assets` command reach it.
DEMO_USERS = {"pipeline", "cli", "__init__"}


def _package_name(name: str) -> str:
    """What `from elo_cpt import name` imports: the module `name`, or else a name of the package's __init__."""
    return name if name in MODULES else "__init__"


def imported_modules(source: str) -> set[str]:
    """The package's modules a module's source imports, in any form: absolute or relative, `import elo_cpt[.x]`,
    `from elo_cpt[.x] import y`, `from . import x`, `from .x import y`, and `importlib.import_module("elo_cpt.x")`;
    at the top or inside functions. `__init__` stands for the package itself."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level > 1:
                continue  # above the package: not one of its modules
            module = node.module or ""
            if node.level == 0 and module != "elo_cpt" and not module.startswith("elo_cpt."):
                continue
            inner = module if node.level == 1 else module.removeprefix("elo_cpt").removeprefix(".")
            if inner:
                found.add(inner.split(".")[0])
            else:
                found.update(_package_name(alias.name) for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "elo_cpt":
                    found.add("__init__")
                elif alias.name.startswith("elo_cpt."):
                    found.add(alias.name.split(".")[1])
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            target = node.args[0].value
            if name in ("import_module", "__import__") and isinstance(target, str) and target.split(".")[0] == "elo_cpt":
                found.add(target.split(".")[1] if "." in target else "__init__")
    return found


def imports() -> dict[str, set[str]]:
    """Each module of the package (a subpackage as one) -> the package's modules it imports, itself left out."""
    found = {p.stem: imported_modules(p.read_text()) - {p.stem} for p in sorted(PACKAGE.glob("*.py"))}
    for name in sorted(SUBPACKAGES):
        found[name] = set().union(*(imported_modules(p.read_text()) for p in (PACKAGE / name).rglob("*.py"))) - {name}
    return found


def test_every_import_form_is_seen():
    source = """
import os, elo_cpt.config
import elo_cpt
import elo_cpt.data as d
from elo_cpt import report, EloError
from elo_cpt.train import pretrain
from . import surgery
from .engine import run_trainer
from .. import elsewhere
from elo_cptx import nothing
import elo_cptx

def lazy():
    from .study import plan
    importlib.import_module("elo_cpt.bench")
"""
    assert imported_modules(source) == {"config", "__init__", "data", "report", "train", "surgery", "engine", "study", "bench"}


def test_every_module_has_a_level():
    assert MODULES <= set(LEVEL), f"give these modules a level in tests/test_layout.py: {sorted(MODULES - set(LEVEL))}"


def test_imports_flow_downwards():
    upward = []
    for module, imported in imports().items():
        for name in sorted(imported & set(LEVEL)):
            if LEVEL[name] > LEVEL[module]:
                upward.append(f"{module} (level {LEVEL[module]}) imports {name} (level {LEVEL[name]})")
    assert not upward, upward


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph`, each as the modules of one strongly connected component (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles_within_a_level():
    """Within a level imports form no cycle either (lazy ones included), so every level has an order."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    same_level = {module: {n for n in imported & set(LEVEL) if LEVEL[n] == LEVEL[module]} for module, imported in imports().items()}
    assert not cycles(same_level), cycles(same_level)


def test_the_demo_stays_out_of_the_methods_way():
    users = {module for module, imported in imports().items() if "demo" in imported}
    assert users <= DEMO_USERS, f"only {sorted(DEMO_USERS)} may import the embedded demo, not {sorted(users - DEMO_USERS)}"


def test_modules_stay_readable():
    """One module per concern, each small enough to read in one sitting."""
    long = {p.name: n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"split these modules: {long}"


def test_api_names_are_not_module_names():
    """Importing a submodule binds its name on the package, so an API function named like a module (`study` in
    study.py) would turn into that module after its first call."""
    import importlib

    clashes = sorted(set(elo_cpt._API) & MODULES)
    assert not clashes, f"rename these modules, their names hide API functions: {clashes}"
    for name, (module, _) in elo_cpt._API.items():
        importlib.import_module(module)
        assert callable(getattr(elo_cpt, name)) and not isinstance(getattr(elo_cpt, name), type(elo_cpt)), name

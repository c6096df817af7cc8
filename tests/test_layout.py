"""The package's imports flow one way: CLI, then orchestration, then training and evaluation, then data and model
surgery, then leaves. A module may import its own level or lower ones, never a higher one (lazy imports inside
functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

import elo_cpt

PACKAGE = Path(elo_cpt.__file__).parent
LEVELS = {
    0: {"errors", "config", "checkpoint", "costmodel", "assets", "textformats", "report", "report_figures",
        "study_report", "samples", "precision", "hub", "distributed", "modelcard"},
    1: {"corpus", "tokencache", "data", "surgery", "stageclock", "chatvector", "chatdata", "chattokens"},
    2: {"engine", "train", "evaluation", "lmeval", "chateval"},
    3: {"pipeline", "study", "bench"},
    4: {"cli", "__init__", "__main__"},
}
LEVEL = {module: level for level, modules in LEVELS.items() for module in modules}


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "elo_cpt":
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("elo_cpt."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("elo_cpt."))
    return found


def test_every_module_has_a_level():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules <= set(LEVEL), f"give these modules a level in tests/test_layout.py: {sorted(modules - set(LEVEL))}"


def test_imports_flow_downwards():
    upward = []
    for path in sorted(PACKAGE.glob("*.py")):
        for name in imported_modules(path) & set(LEVEL):
            if LEVEL[name] > LEVEL[path.stem]:
                upward.append(f"{path.stem} (level {LEVEL[path.stem]}) imports {name} (level {LEVEL[name]})")
    assert not upward, upward


def test_modules_stay_readable():
    """One module per concern, each small enough to read in one sitting."""
    long = {p.name: n for p in PACKAGE.glob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"split these modules: {long}"

"""The package's imports go one way: config -> models/data/lora -> train -> metrics -> stats -> plots -> report.

Each module has a layer; a module may import only modules of a lower layer (imports inside functions
count too). A new module must be given a layer here, so the rule cannot be bypassed by omission.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lora_bench

PACKAGE = Path(lora_bench.__file__).parent

LAYERS = {
    # foundations: no package imports
    "faults": 0, "warm": 0, "atomic": 0, "config": 0, "lora": 0, "reference": 0,
    # sources, quantization and methods
    "quant": 1, "data": 1, "models": 1, "study": 1, "diagnostics": 1,
    "methods": 2, "record": 2, "instruct_data": 2, "predictions": 1,
    "causal": 3, "checkpoint": 3, "frozen": 3, "serving": 3,
    "train": 4,
    # metrics: the tidy tables read from records
    "tables": 5,
    "stats": 6, "variance": 7, "tuning": 7, "items": 7,
    "plots": 8,
    "report": 9,
    "cli": 10, "__main__": 11, "__init__": 11,
}


def package_imports(path: Path) -> set[str]:
    """Names of lora_bench modules that ``path`` imports, at any depth of its syntax tree."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                imported.add(node.module.split(".")[0])
            elif node.level == 1:
                imported.update(alias.name for alias in node.names)
            elif node.level == 0 and node.module and node.module.split(".")[0] == "lora_bench":
                parts = node.module.split(".")
                imported.update([parts[1]] if len(parts) > 1 else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[1] for alias in node.names
                            if alias.name.startswith("lora_bench."))
    return imported


def test_every_module_has_a_layer():
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    assert modules - set(LAYERS) == set(), "give each new module a layer in tests/test_architecture.py"


def test_imports_only_go_down_the_layers():
    upward = []
    for path in sorted(PACKAGE.glob("*.py")):
        for target in package_imports(path):
            if target in LAYERS and LAYERS[target] >= LAYERS[path.stem] and target != path.stem:
                upward.append(f"{path.stem} (layer {LAYERS[path.stem]}) imports {target} (layer {LAYERS[target]})")
    assert upward == []


def test_the_checker_sees_relative_absolute_and_function_level_imports(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text("from .train import x\nfrom . import plots\nimport lora_bench.stats\n"
                      "def f():\n    from lora_bench.report import y\n")
    assert package_imports(source) == {"train", "plots", "stats", "report"}

"""The package's folders are the pipeline, and its imports go one way.

Folders: ``config``/``study`` (what to run) -> ``adapters/`` (the LoRA and 4-bit layers) -> ``run/`` (one run:
model, data, method, task, training, record) -> ``analysis/`` (records -> tables -> statistics) -> ``report/``
(tables -> figures -> report) -> ``cli``. A module may import only modules of a lower layer and of its own or an
earlier stage folder (imports inside functions count too). Every module must be given a layer here, so the rule
cannot be bypassed by omission.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lora_bench

PACKAGE = Path(lora_bench.__file__).parent

LAYERS = {
    # foundations: no package imports
    "faults": 0, "warm": 0, "atomic": 0, "config": 0, "adapters.lora": 0, "report.reference": 0,
    # sources, quantization and methods
    "adapters.quant": 1, "run.data": 1, "run.models": 1, "study": 1, "run.diagnostics": 1, "run.predictions": 1,
    "run.methods": 2, "run.record": 2, "run.instruct_data": 2, "run.causal_lm": 2, "run.tasks.base": 2,
    "run.checkpoint": 3, "run.frozen": 3, "adapters.serving": 3,
    # the tasks (one module each) and their registry, which the loop reads
    "run.tasks.classification": 3, "run.tasks.instruct": 3, "run.tasks": 4,
    "run.train": 5,
    # analysis: the tidy tables read from records, then statistics
    "analysis.tables": 6, "analysis.columns": 1,
    "analysis.summary": 7, "analysis.compare": 8, "analysis.power": 9, "analysis.cost": 9,
    "analysis.stats": 10, "analysis.variance": 10, "analysis.tuning": 10, "analysis.items": 10,
    "analysis.claims": 10.5,  # tests the reference claims by seeds and, where predictions exist, by items
    "report.figures": 11, "report.formatting": 11,
    # the report's sections: shared parts, then one module per section, then the per-family dispatch
    "report.sections.common": 12,
    "report.sections.findings": 13, "report.sections.conditions": 13, "report.sections.overview": 13,
    "report.sections.memory_time": 13, "report.sections.lora_variants": 13, "report.sections.instruct": 13,
    "report.sections.tune": 13, "report.sections.trust": 13, "report.sections.seeds": 13,
    "report.sections.item_ranks": 13, "report.sections.failed": 13, "report.sections.references": 13,
    "report.sections.converged": 13, "report.sections.epochs": 14,
    "report.sections.family": 15,
    "report.render": 16,
    "cli": 17, "__main__": 18, "__init__": 18,
    # the stage folders' own __init__ files import nothing
    "adapters": 0, "run": 0, "analysis": 0, "report": 0, "report.sections": 0,
}
# Stage folders in pipeline order; top-level modules belong to no stage.
STAGES = ("adapters", "run", "analysis", "report")


def module_name(path: Path) -> str:
    """``run/train.py`` -> ``run.train``; a package's ``__init__.py`` is the package (the top one ``__init__``)."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def known_modules() -> set[str]:
    return {module_name(p) for p in PACKAGE.rglob("*.py")}


def package_imports(path: Path, modules: set[str] | None = None, own: str = "") -> set[str]:
    """Dotted names (below ``lora_bench``) of the package modules that ``path`` imports, at any depth of its syntax
    tree; ``own`` is the importing module's name, for relative imports."""
    modules = known_modules() if modules is None else modules
    imported = set()

    def resolve(base: str, names: list[str]) -> None:
        for name in names:
            candidate = f"{base}.{name}" if base else name
            if candidate in modules:
                imported.add(candidate)
            elif base:
                imported.add(base)
            elif name in modules:
                imported.add(name)

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names = [alias.name for alias in node.names]
            if node.level:
                package = own.split(".")[: max(0, len(own.split(".")) - node.level)] if "." in own else []
                base = ".".join(package + ([node.module] if node.module else []))
                resolve(base, names)
            elif node.module and node.module.split(".")[0] == "lora_bench":
                resolve(".".join(node.module.split(".")[1:]), names)
        elif isinstance(node, ast.Import):
            imported.update(alias.name.split(".", 1)[1] for alias in node.names
                            if alias.name.startswith("lora_bench."))
    return imported


def stage(module: str) -> int | None:
    head = module.split(".")[0]
    return STAGES.index(head) if head in STAGES and "." in module else None


def test_every_module_has_a_layer():
    assert known_modules() - set(LAYERS) == set(), "give each new module a layer in tests/test_architecture.py"
    assert set(LAYERS) - known_modules() == set(), "a module named here no longer exists"


def test_imports_only_go_down_the_layers_and_the_stages():
    modules = known_modules()
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = module_name(path)
        for target in package_imports(path, modules, own):
            if target == own or target not in LAYERS:
                continue
            if LAYERS[target] >= LAYERS[own]:
                wrong.append(f"{own} (layer {LAYERS[own]}) imports {target} (layer {LAYERS[target]})")
            if stage(own) is not None and stage(target) is not None and stage(target) > stage(own):
                wrong.append(f"{own} (stage {STAGES[stage(own)]}) imports {target} from a later stage")
    assert wrong == []


def test_the_top_level_holds_only_what_to_run_and_the_shared_infrastructure():
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top == {"__init__", "__main__", "cli", "config", "study", "atomic", "faults", "warm"}


def test_the_checker_sees_relative_absolute_and_function_level_imports(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text("from .train import x\nfrom . import figures\nimport lora_bench.analysis.stats\n"
                      "from lora_bench.report import render\nfrom lora_bench import config\n"
                      "def f():\n    from lora_bench.run.record import y\n")
    modules = {"run.train", "report.figures", "analysis.stats", "report.render", "config", "run.record"}
    # Relative imports resolve against the importing module's folder (here report/).
    assert package_imports(source, modules, own="report.sample") == {
        "report.train", "report.figures", "analysis.stats", "report.render", "config", "run.record"}


def test_files_are_published_only_by_the_one_atomic_writer():
    """Renames and moves into place live in lora_bench/atomic.py (files: atomic_output, folders: atomic_folder), so
    every writer gets the same guarantees (whole or nothing, same filesystem, plain-open permissions, killed
    writers' temporaries removed). The warm worker's socket is not a file the suite writes."""
    import re

    pattern = re.compile(r"\bos\.(?:replace|rename)\(|\bshutil\.move\(|\.rename\((?!columns)|\.replace\(\s*target")
    allowed = {"atomic", "warm"}
    offenders = [f"{module_name(path)}:{number}" for path in sorted(PACKAGE.rglob("*.py"))
                 if module_name(path) not in allowed
                 for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []

"""Import a script of ``benchmarks/`` by name: the folder is not a package, so that its scripts stay runnable as
``python benchmarks/<name>.py`` without lora-bench's tests or packaging knowing about them."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load_benchmark(name: str) -> ModuleType:
    """The module ``benchmarks/<name>.py``, executed afresh."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

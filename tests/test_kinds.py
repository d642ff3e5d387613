"""Family kinds are one registry: each kind's ``KindSpec`` (lora_bench.study.KINDS), figure
(report.figures.FIGURES) and report section (report.sections.family.KIND_SECTIONS) are found by name, and nothing
else dispatches on a kind's name."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import lora_bench
from lora_bench.report import figures
from lora_bench.report.render import TEMPLATES
from lora_bench.report.sections import family
from lora_bench.study import FAMILY_KINDS, GENERIC_KIND, KINDS, kind_spec

PACKAGE = Path(lora_bench.__file__).parent
CHECKED = [PACKAGE / "analysis", PACKAGE / "report"]


def test_every_kind_has_a_figure_and_a_section():
    assert set(FIGURES := figures.FIGURES) == set(KINDS), "give each kind of study.KINDS a figure (or plot_generic)"
    assert set(family.KIND_SECTIONS) == set(KINDS), "give each kind a section (or family.GENERIC_PARTS)"
    for name, spec in KINDS.items():
        assert callable(FIGURES[name])
        # A kind without parts must be reported elsewhere: the trust section.
        assert family.KIND_SECTIONS[name] or spec.trust, name


def test_every_section_part_has_its_template():
    parts = {part for parts in family.KIND_SECTIONS.values() for part in parts}
    for part in parts:
        assert (TEMPLATES / part.template).is_file(), part.template
        assert "part.data" in (TEMPLATES / part.template).read_text(), part.template


def test_unknown_kinds_fall_back_to_the_generic_ones():
    assert kind_spec("no_such_kind") is KINDS[GENERIC_KIND]
    assert figures.figure_function("no_such_kind") is figures.plot_generic
    assert family.section_parts("no_such_kind") is family.GENERIC_PARTS
    assert FAMILY_KINDS == tuple(name for name, spec in KINDS.items() if spec.selectable)


def _kind_literals(node: ast.AST) -> list[str]:
    """Kind names written as string literals in ``node``, directly or inside a tuple, list or set."""
    if isinstance(node, ast.Constant) and node.value in KINDS:
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [name for element in node.elts for name in _kind_literals(element)]
    return []


def kind_dispatch(source: str) -> list[str]:
    """Comparisons and membership tests of a kind name written as a literal (``kind == "epochs"``,
    ``kind in ("variance", "sweep")``, ``.isin(["epochs"])``): the dispatch the registry replaces."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            names = [n for operand in (node.left, *node.comparators) for n in _kind_literals(operand)]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "isin":
            names = [n for argument in node.args for n in _kind_literals(argument)]
        else:
            continue
        found += [f"line {node.lineno}: {name!r}" for name in names]
    return found


@pytest.mark.parametrize("path", sorted(p for folder in CHECKED for p in folder.rglob("*.py")),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_analysis_and_report_name_no_kind_in_a_comparison(path):
    assert kind_dispatch(path.read_text()) == [], "read the kind's KindSpec (lora_bench.study.KINDS) instead"


def test_templates_name_no_kind_in_a_comparison():
    pattern = re.compile(r"kind\s*(==|!=|in)\s*[\"'(\[]")
    assert [p.name for p in TEMPLATES.glob("*.j2") if pattern.search(p.read_text())] == []


def test_the_checker_sees_literal_dispatch():
    source = ('if kind == "epochs": pass\nx = k in ("variance", "sweep")\ny = runs["family_kind"].isin(["tune"])\n'
              'z = kind == SWEEP_KIND\nw = metrics.get("epochs")\n')
    assert kind_dispatch(source) == ["line 1: 'epochs'", "line 2: 'variance'", "line 2: 'sweep'", "line 3: 'tune'"]

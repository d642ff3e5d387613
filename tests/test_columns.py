"""Config columns are named through analysis.columns, checked against the run schema (issue: renaming a config
key must not silently break the analysis)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import lora_bench
from lora_bench.analysis.columns import cfg, config_columns
from lora_bench.analysis.tables import record_rows
from lora_bench.config import RunConfig, flatten

PACKAGE = Path(lora_bench.__file__).parent
LITERAL = re.compile(r"""["']cfg\.([a-z_.]+)["']""")
CALL = re.compile(r"""\bcfg\(f?["']([a-z_.{}]+)["']\)""")


def test_every_column_of_a_resolved_config_is_derived_from_the_schema():
    produced = {f"cfg.{key}" for key in flatten(RunConfig.from_dict({}).to_dict())}
    assert produced <= config_columns()
    assert {"cfg.method.lora.rank", "cfg.train.lr", "cfg.data.max_examples.test"} <= config_columns()


def test_a_key_the_schema_does_not_have_is_an_error_naming_it():
    with pytest.raises(KeyError, match="method.lora.rnak"):
        cfg("method.lora.rnak")


@pytest.mark.parametrize("folder", ["analysis", "report"])
def test_analysis_and_report_name_only_columns_the_schema_produces(folder):
    unknown = []
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        text = path.read_text()
        for key in LITERAL.findall(text) + [k for k in CALL.findall(text) if "{" not in k]:
            if f"cfg.{key}" not in config_columns():
                unknown.append(f"{path.relative_to(PACKAGE)}: cfg.{key}")
    assert unknown == []


def test_the_runs_table_has_the_columns_the_schema_names(tiny_run, tmp_path):
    record = {"schema_version": 1, "status": "ok", "run": {"family": "f", "variant": "v", "seed": 0},
              "config": RunConfig.from_dict(tiny_run).to_dict()}
    row, _ = record_rows(record, tmp_path / "runs" / "f" / "v" / "seed0.json")
    columns = {c for c in row if c.startswith("cfg.")}
    assert columns and columns <= config_columns()

"""Column names of the tidy tables that come from the run configuration, derived from its schema.

The runs table has one ``cfg.<dotted key>`` column per leaf of a run's resolved config (``analysis.tables``
flattens the record's ``config``). Analysis and report code that reads such a column names it through ``cfg``,
which checks the key against ``schemas/run.schema.yaml``: renaming a config key then fails at import, naming the
column, instead of silently reading an absent column as "not recorded". ``tests/test_columns.py`` also fails when
any module of ``analysis/`` or ``report/`` spells a ``"cfg.…"`` string the schema does not produce.
"""

from __future__ import annotations

from functools import cache

from lora_bench.config import load_schema

PREFIX = "cfg."


def _leaves(schema: dict, prefix: str = "") -> set[str]:
    # An object with named properties is a section; anything else (scalars, lists, free-form maps) is one column.
    properties = schema.get("properties") if schema.get("type") == "object" else None
    if not properties:
        return {prefix[:-1]} if prefix else set()
    leaves: set[str] = set()
    for key, child in properties.items():
        leaves |= _leaves(child, f"{prefix}{key}.")
    return leaves


@cache
def config_columns() -> frozenset[str]:
    """Every ``cfg.*`` column a run's resolved config can produce."""
    return frozenset(PREFIX + leaf for leaf in _leaves(load_schema("run")))


def cfg(key: str) -> str:
    """The runs-table column of config key ``key`` (``"method.lora.rank"`` -> ``"cfg.method.lora.rank"``)."""
    column = PREFIX + key
    if column not in config_columns():
        raise KeyError(f"{column!r} is not a column of the runs table: run.schema.yaml has no key {key!r}")
    return column

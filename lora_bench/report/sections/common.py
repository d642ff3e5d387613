"""What several sections of the report share: the primary endpoint, the section-part contract, setting texts and
the cost cells (ratios with Fieller intervals) of the memory_time and lora_variants sections."""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lora_bench.analysis.columns import cfg
from lora_bench.analysis.compare import EXACT_UNITS, baseline_variant
from lora_bench.analysis.cost import (
    COST_SUMMARY_COLUMNS,
    as_text,
)
from lora_bench.analysis.tuning import (
    decided_by,
    flags,
    same_score,
    tie_break_of,
    tie_break_spec,
    tie_margin_of,
    tied_with,
)
from lora_bench.report import figures
from lora_bench.report.formatting import finite, fmt_interval, fmt_p, fmt_percent, fmt_ratio, md_text, p_phrase
from lora_bench.study import kind_spec

PRIMARY_METRIC, PRIMARY_SPLIT = "accuracy", "test"


@dataclass(frozen=True)
class SectionPart:
    """One part of a family's section: ``build(family, tables)`` gives the context of ``template`` (a partial under
    ``templates/``, which reads it as ``part.data``), or None / empty to leave the part out."""

    template: str
    build: Callable[[str, dict], dict | None]
    # Its context's ``claims`` also go to the report's headline on memory and time.
    cost_headline: bool = False


def unique_text(runs: pd.DataFrame, column: str) -> list[str]:
    if column not in runs.columns:
        return []
    # A column that only some families set holds NaN elsewhere, which turns its integers into floats.
    values = runs[column].dropna().map(as_text)
    return [v for v in dict.fromkeys(values) if v]


def seed_text(seeds: list[int]) -> str:
    if not seeds:
        return "none"
    if seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2:
        return f"{seeds[0]}–{seeds[-1]}"
    return ", ".join(str(s) for s in seeds)


def data_description(runs: pd.DataFrame) -> str:
    """Data set names with their source, e.g. 'sentences (pang_lee)'."""
    names = unique_text(runs, cfg("data.name"))
    sources = unique_text(runs, cfg("data.source"))
    if not names:
        return ", ".join(sources) or "unknown data"
    text = ", ".join(names)
    extra = [s for s in sources if s not in names]
    return f"{text} ({', '.join(extra)})" if extra else text


def relative_url(path: Path, start: Path) -> str:
    relative = os.path.relpath(Path(path).resolve(), Path(start).resolve())
    return urllib.parse.quote(Path(relative).as_posix())


MEMORY_LABELS = {
    "peak_cuda_allocated": "peak CUDA memory allocated",
    "state_bytes": "weights + gradients + optimizer state",
}


def cost_summary(tables: dict) -> pd.DataFrame:
    cost = tables.get("cost_summary")
    return cost if cost is not None else pd.DataFrame(columns=COST_SUMMARY_COLUMNS)


def cost_test(tests: pd.DataFrame, family: str, variant: str, metric: str, baseline: str | None = None):
    """The tests row of one cost comparison (split ``none``), or None."""
    rows = tests[
        (tests["family"] == family)
        & (tests["variant"] == variant)
        & (tests["metric"] == metric)
        & (tests["split"] == "none")
    ]
    if baseline is not None:
        rows = rows[rows["baseline"] == baseline]
    return rows.iloc[0] if len(rows) else None


def is_exact(test) -> bool:
    return bool(test.get("exact", False)) if test is not None else False


def is_equal_count(test) -> bool:
    """Whether a counted quantity (bytes, parameters) was equal in every seed pair: the same value, which a t
    test cannot take (zero variance) and needs no test, rather than an untested difference."""
    return (test is not None and not is_exact(test) and test.get("unit") in EXACT_UNITS
            and test.get("diff") == 0 and test.get("diff_ci_low") == 0 and test.get("diff_ci_high") == 0)


def ratio_cells(test) -> tuple[str, str]:
    """(ratio with its 95 % interval, Holm p) of a cost comparison, for the table."""
    if test is None:
        return "–", "–"
    ratio = fmt_ratio(test.get("ratio"))
    if is_exact(test):
        return f"{ratio} (exact)", "exact"
    if is_equal_count(test):
        return f"{ratio} (equal)", "equal"
    interval = fmt_interval(test.get("ratio_ci_low"), test.get("ratio_ci_high"), fmt_ratio)
    return (f"{ratio} {interval}" if interval != "–" else ratio), fmt_p(test["p_holm"])


def ratio_phrase(test, what: str, baseline: str, label: str = "") -> str | None:
    """'uses 0.60× the memory of **lora** (...)' and the like, with the evidence; None without a test row."""
    if test is None or not finite(test.get("ratio")):
        return None
    exact, same = is_exact(test), is_equal_count(test)
    lead = what.format(ratio=("exactly " if exact or same else "") + fmt_ratio(test["ratio"]), baseline=baseline)
    details = [label] if label else []
    if exact or same:
        details.append("identical in every run of both" if exact else "equal in every seed pair: no difference")
        return f"{lead} ({'; '.join(details)})"
    if not finite(test["p_value"]):
        details.append(f"not tested: {md_text(test['note']) or 'no p-value'}")
        return f"{lead} ({'; '.join(details)})"
    low, high = test.get("ratio_ci_low"), test.get("ratio_ci_high")
    if finite(low) and finite(high):
        details.append(f"95% CI {fmt_ratio(low)} to {fmt_ratio(high)}")
    evidence = f"{test['test']}, Holm {p_phrase(test['p_holm'])}"
    details.append(evidence + ("" if bool(test["significant"]) else ": no significant difference"))
    return f"{lead} ({'; '.join(details)})"


def has_primary(summary: pd.DataFrame, family: str) -> bool:
    """Whether the family has any test accuracy from finished runs."""
    primary = (summary["metric"] == PRIMARY_METRIC) & (summary["split"] == PRIMARY_SPLIT)
    return bool((primary & (summary["family"] == family)).any())


def show_accuracy(family: str, tables: dict) -> bool:
    """Whether the family's section shows test accuracy: not for a kind without an accuracy table (tune), and not
    for a cost-only kind (memory_time) that evaluated none, so that it gets no table of dashes."""
    runs = tables["runs"]
    spec = kind_spec(str(runs.loc[runs["family"] == family, "family_kind"].iloc[0]))
    return (not spec.cost_only or has_primary(tables["summary"], family)) and spec.accuracy_table


def family_costs(family: str, tables: dict) -> tuple[pd.DataFrame, str | None, str]:
    """(the family's rows of ``cost_summary`` by variant, its baseline, its memory metric or '')."""
    cost = cost_summary(tables)
    cost = cost[cost["family"] == family].set_index("variant")
    memory = next((str(m) for m in cost["memory_metric"] if m), "") if len(cost) else ""
    return cost, baseline_variant(tables["runs"], family)[0], memory


def cost_by_variant(family: str, tables: dict, cost: pd.DataFrame) -> list[tuple[str, pd.Series]]:
    """(variant, its cost-summary row) in the figure's order, for the variants the cost summary has."""
    return [(variant, cost.loc[variant]) for variant in figures.variant_order(tables["runs"], family)
            if variant in cost.index]


def runs_cell(cost_row: pd.Series) -> str:
    """Finished runs of a variant, with its failed ones: '3' or '2 (1 failed)'."""
    failed = int(cost_row["n_failed"])
    return str(int(cost_row["n"])) + (f" ({failed} failed)" if failed else "")


def test_cells(test, diff: str) -> dict:
    """The difference, Holm p and verdict cells of a tests-table row (verdict 'not tested' without a p-value)."""
    return {"diff": diff, "p": fmt_p(test["p_holm"]),
            "verdict": str(test["verdict"]) if finite(test["p_value"]) else "not tested"}


NOT_TESTED = {"diff": "–", "p": "–", "verdict": "not tested"}


def tie_decision(grid: pd.DataFrame, setting: str, value: float) -> str:
    """How ``value``, chosen for ``setting`` where it tied others at the top of ``grid`` (one tuning family's
    tuning.parquet rows), won: by its mean over the tuning and tie seeds (``tune.tie_seeds``), or by the
    tie-break rule, alone or after the tie seeds tied again. Empty for a value that tied nothing."""
    rows = grid[grid["setting"] == setting].set_index("value")
    if value not in rows.index or not flags(rows, "tied")[value]:
        return ""
    row, others = rows.loc[value], tied_with(grid, setting, value)
    margin = tie_margin_of(row.get("tie_margin"))
    exact = all(same_score(rows["mean"].get(v), row["mean"]) for v in others)
    within = "" if exact else f" (within the tie margin, {fmt_percent(margin)} points)"
    tied = f"{within} with " + ", ".join(f"{v:g}" for v in others)
    spec = tie_break_spec(tie_break_of(row.get("tie_break")))
    rule = decided_by(spec, [rows[spec.column].get(v) if spec.column in rows else None for v in [value, *others]])
    tie_mean, n_tie = row.get("tie_mean"), int(row.get("n_tie_runs") or 0)
    if not n_tie or not finite(tie_mean):
        return f"tied{tied}; broken by {rule}"
    their = [rows["tie_mean"].get(v) for v in others]
    seeds = f"{n_tie} tie seed(s)"
    if any(finite(m) and same_score(m, tie_mean) for m in their):
        return (f"tied{tied} on the tuning seeds and again with {seeds} ({fmt_percent(tie_mean)} %); broken "
                f"by {rule}")
    versus = ", ".join(f"{fmt_percent(m) if finite(m) else '–'} % at {v:g}" for v, m in zip(others, their))
    return (f"tied{tied} on the tuning seeds; decided by {seeds}: {fmt_percent(tie_mean)} % over the tuning "
            f"and tie seeds vs {versus}")
